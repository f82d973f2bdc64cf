//! The Realtime API's events as callgate uses them (GA names; the retired beta names are
//! accepted where they mean the same thing). Parsing happens on the connection's task, off the
//! call: audio arrives decoded.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

/// A server event callgate acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// `session.created`.
    SessionCreated,
    /// `session.updated`.
    SessionUpdated,
    /// `response.created`.
    ResponseCreated {
        /// The response.
        id: String,
    },
    /// `response.output_item.added` (and beta `conversation.item.created` for model items).
    ItemAdded {
        /// The response, when known.
        response_id: Option<String>,
        /// The item.
        item: Item,
    },
    /// `response.output_audio.delta` (beta `response.audio.delta`), decoded.
    AudioDelta {
        /// The response.
        response_id: String,
        /// The item.
        item_id: String,
        /// Audio in the session's output format.
        audio: Bytes,
    },
    /// `response.output_audio.done` (beta `response.audio.done`).
    AudioDone {
        /// The item.
        item_id: String,
    },
    /// `response.output_audio_transcript.delta` (beta `response.audio_transcript.delta`).
    TranscriptDelta {
        /// The item.
        item_id: String,
        /// More text.
        delta: String,
    },
    /// `response.output_audio_transcript.done` (beta `response.audio_transcript.done`).
    TranscriptDone {
        /// The item.
        item_id: String,
        /// The whole text.
        transcript: String,
    },
    /// `response.function_call_arguments.done`.
    FunctionCall {
        /// The response.
        response_id: Option<String>,
        /// The function-call item.
        item_id: Option<String>,
        /// The call's id (for the output).
        call_id: String,
        /// The function (absent on beta servers: taken from the item).
        name: Option<String>,
        /// The arguments: a JSON text.
        arguments: String,
    },
    /// `response.done`.
    ResponseDone {
        /// The response.
        id: String,
        /// `completed`, `cancelled`, `failed`, `incomplete`.
        status: String,
        /// Why (cancelled/failed/incomplete).
        status_details: Value,
        /// Function calls among the output items.
        calls: Vec<Item>,
        /// Token usage.
        usage: Value,
    },
    /// `input_audio_buffer.speech_started`.
    SpeechStarted {
        /// The caller's item to come.
        item_id: String,
        /// Position in the session's input audio, ms.
        audio_start_ms: u64,
    },
    /// `input_audio_buffer.speech_stopped`.
    SpeechStopped {
        /// The caller's item.
        item_id: String,
        /// Position in the session's input audio, ms.
        audio_end_ms: u64,
    },
    /// `conversation.item.input_audio_transcription.completed`.
    CallerTranscript {
        /// The caller's item.
        item_id: String,
        /// What the caller said (approximately).
        transcript: String,
    },
    /// `error`.
    Error(ApiError),
    /// Anything else (acknowledgements, rate limits, deltas callgate does not need).
    Other(String),
}

/// An output item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Item {
    /// The item's id.
    #[serde(default)]
    pub id: String,
    /// `message`, `function_call`...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `assistant`, `user`...
    #[serde(default)]
    pub role: Option<String>,
    /// Function calls: the function.
    #[serde(default)]
    pub name: Option<String>,
    /// Function calls: the call's id.
    #[serde(default)]
    pub call_id: Option<String>,
    /// Function calls: the arguments (JSON text).
    #[serde(default)]
    pub arguments: Option<String>,
}

/// An `error` event's body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ApiError {
    /// `invalid_request_error`, `server_error`...
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// `invalid_api_key`, `response_cancel_not_active`... (often null).
    #[serde(default)]
    pub code: Option<String>,
    /// Words.
    #[serde(default)]
    pub message: Option<String>,
    /// The client event it answers, if that event had an id.
    #[serde(default)]
    pub event_id: Option<String>,
}

impl ApiError {
    /// The code, or `""`.
    pub fn code(&self) -> &str {
        self.code.as_deref().unwrap_or("")
    }

    /// The message, or `""`.
    pub fn message(&self) -> &str {
        self.message.as_deref().unwrap_or("")
    }

    /// An error that means the configuration is wrong: retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self.code(),
            "invalid_api_key"
                | "beta_api_shape_disabled"
                | "model_not_found"
                | "insufficient_quota"
        )
    }
}

/// Why an event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable {kind} event: {problem}")]
pub struct ParseError {
    /// The event's type, if it had one.
    pub kind: String,
    /// What was wrong.
    pub problem: String,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default)]
    response_id: String,
    #[serde(default)]
    item_id: String,
    #[serde(borrow)]
    delta: std::borrow::Cow<'a, str>,
}

/// Reads one server event (a text frame).
pub fn parse(text: &str) -> Result<ServerEvent, ParseError> {
    let head: Head<'_> = serde_json::from_str(text).map_err(|e| ParseError {
        kind: String::new(),
        problem: e.to_string(),
    })?;
    let kind = head.kind.as_ref();
    let bad = |e: &dyn std::fmt::Display| ParseError {
        kind: kind.to_owned(),
        problem: e.to_string(),
    };
    // Audio first: it is most of the traffic and needs no `Value`.
    if matches!(kind, "response.output_audio.delta" | "response.audio.delta") {
        let d: Delta<'_> = serde_json::from_str(text).map_err(|e| bad(&e))?;
        let audio = B64.decode(d.delta.as_bytes()).map_err(|e| bad(&e))?;
        return Ok(ServerEvent::AudioDelta {
            response_id: d.response_id,
            item_id: d.item_id,
            audio: Bytes::from(audio),
        });
    }
    let v: Value = serde_json::from_str(text).map_err(|e| bad(&e))?;
    let s = |key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
    let n = |key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    Ok(match kind {
        "session.created" => ServerEvent::SessionCreated,
        "session.updated" => ServerEvent::SessionUpdated,
        "response.created" => ServerEvent::ResponseCreated {
            id: v["response"]["id"].as_str().unwrap_or("").to_owned(),
        },
        "response.output_item.added" | "conversation.item.created" => {
            let item: Item = serde_json::from_value(v["item"].clone()).map_err(|e| bad(&e))?;
            let response_id = v
                .get("response_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            // Beta servers announce model items with `conversation.item.created`; a user
            // item (or one without a response) is not the model's output.
            if kind == "conversation.item.created" && item.role.as_deref() != Some("assistant") {
                return Ok(ServerEvent::Other(kind.to_owned()));
            }
            ServerEvent::ItemAdded { response_id, item }
        }
        "response.output_audio.done" | "response.audio.done" => ServerEvent::AudioDone {
            item_id: s("item_id"),
        },
        "response.output_audio_transcript.delta" | "response.audio_transcript.delta" => {
            ServerEvent::TranscriptDelta {
                item_id: s("item_id"),
                delta: s("delta"),
            }
        }
        "response.output_audio_transcript.done" | "response.audio_transcript.done" => {
            ServerEvent::TranscriptDone {
                item_id: s("item_id"),
                transcript: s("transcript"),
            }
        }
        "response.function_call_arguments.done" => ServerEvent::FunctionCall {
            response_id: v
                .get("response_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            item_id: v.get("item_id").and_then(Value::as_str).map(str::to_owned),
            call_id: s("call_id"),
            name: v.get("name").and_then(Value::as_str).map(str::to_owned),
            arguments: s("arguments"),
        },
        "response.done" => {
            let r = &v["response"];
            let calls = r["output"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| serde_json::from_value::<Item>(i.clone()).ok())
                        .filter(|i| i.kind == "function_call")
                        .collect()
                })
                .unwrap_or_default();
            ServerEvent::ResponseDone {
                id: r["id"].as_str().unwrap_or("").to_owned(),
                status: r["status"].as_str().unwrap_or("").to_owned(),
                status_details: r["status_details"].clone(),
                calls,
                usage: r["usage"].clone(),
            }
        }
        "input_audio_buffer.speech_started" => ServerEvent::SpeechStarted {
            item_id: s("item_id"),
            audio_start_ms: n("audio_start_ms"),
        },
        "input_audio_buffer.speech_stopped" => ServerEvent::SpeechStopped {
            item_id: s("item_id"),
            audio_end_ms: n("audio_end_ms"),
        },
        "conversation.item.input_audio_transcription.completed" => ServerEvent::CallerTranscript {
            item_id: s("item_id"),
            transcript: s("transcript"),
        },
        "error" => {
            ServerEvent::Error(serde_json::from_value(v["error"].clone()).map_err(|e| bad(&e))?)
        }
        other => ServerEvent::Other(other.to_owned()),
    })
}

/// Client events, as the text frames sent.
pub mod client {
    use super::*;

    /// `input_audio_buffer.append`.
    pub fn append(audio: &[u8]) -> String {
        // Built by hand: this is 50 events a second per call.
        let mut out = String::with_capacity(48 + audio.len() * 4 / 3);
        out.push_str(r#"{"type":"input_audio_buffer.append","audio":""#);
        B64.encode_string(audio, &mut out);
        out.push_str("\"}");
        out
    }

    /// `session.update` with `session`.
    pub fn session_update(session: &Value) -> String {
        json!({"type": "session.update", "event_id": "cg_session", "session": session}).to_string()
    }

    /// A text message item (`role` `user`: `input_text`; `assistant`: `output_text`).
    pub fn text_item(role: &str, text: &str) -> String {
        let kind = if role == "assistant" {
            "output_text"
        } else {
            "input_text"
        };
        json!({"type": "conversation.item.create",
               "item": {"type": "message", "role": role,
                        "content": [{"type": kind, "text": text}]}})
        .to_string()
    }

    /// `response.create`.
    pub fn response_create() -> String {
        r#"{"type":"response.create","event_id":"cg_create"}"#.to_owned()
    }

    /// `response.cancel` of response `id`.
    pub fn response_cancel(id: &str) -> String {
        json!({"type": "response.cancel", "event_id": "cg_cancel", "response_id": id}).to_string()
    }

    /// `conversation.item.truncate`.
    pub fn truncate(item_id: &str, audio_end_ms: u64) -> String {
        json!({"type": "conversation.item.truncate", "event_id": "cg_truncate",
               "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms})
        .to_string()
    }

    /// `conversation.item.delete`.
    pub fn delete(item_id: &str) -> String {
        json!({"type": "conversation.item.delete", "event_id": "cg_delete",
               "item_id": item_id})
        .to_string()
    }

    /// A tool's result.
    pub fn function_output(call_id: &str, output: &str) -> String {
        json!({"type": "conversation.item.create",
               "item": {"type": "function_call_output", "call_id": call_id,
                        "output": output}})
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_is_decoded_under_ga_and_beta_names() {
        for name in ["response.output_audio.delta", "response.audio.delta"] {
            let text = format!(
                r#"{{"type":"{name}","event_id":"e","response_id":"r","item_id":"i",
                    "output_index":0,"content_index":0,"delta":"AQID"}}"#
            );
            assert_eq!(
                parse(&text).unwrap(),
                ServerEvent::AudioDelta {
                    response_id: "r".into(),
                    item_id: "i".into(),
                    audio: Bytes::from_static(&[1, 2, 3]),
                }
            );
        }
        assert!(parse(r#"{"type":"response.audio.delta","delta":"!!"}"#).is_err());
        assert_eq!(
            parse(r#"{"type":"response.audio_transcript.done","item_id":"i","transcript":"hi"}"#)
                .unwrap(),
            ServerEvent::TranscriptDone {
                item_id: "i".into(),
                transcript: "hi".into()
            }
        );
    }

    #[test]
    fn response_done_lists_function_calls_and_errors_keep_their_code() {
        let done = parse(
            r#"{"type":"response.done","response":{"id":"resp_1","status":"completed",
               "output":[{"id":"item_1","type":"message","role":"assistant"},
                         {"id":"item_2","type":"function_call","name":"hang_up",
                          "call_id":"call_1","arguments":"{}"}],
               "usage":{"total_tokens":10}}}"#,
        )
        .unwrap();
        let ServerEvent::ResponseDone { calls, usage, .. } = done else {
            panic!("{done:?}")
        };
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].call_id.as_deref(), Some("call_1"));
        assert_eq!(usage["total_tokens"], 10);
        let e = parse(
            r#"{"type":"error","error":{"type":"invalid_request_error",
               "code":"invalid_api_key","message":"Incorrect API key","param":null}}"#,
        )
        .unwrap();
        let ServerEvent::Error(e) = e else { panic!() };
        assert!(e.is_fatal());
        assert_eq!(
            parse(r#"{"type":"rate_limits.updated"}"#).unwrap(),
            ServerEvent::Other("rate_limits.updated".into())
        );
    }

    #[test]
    fn appends_are_valid_json_with_base64() {
        let text = client::append(&[0, 255, 16]);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "input_audio_buffer.append");
        assert_eq!(v["audio"], "AP8Q");
    }
}
