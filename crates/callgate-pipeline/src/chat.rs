//! The accumulator of an OpenAI chat completions stream (`POST /chat/completions` with
//! `stream: true` and `stream_options.include_usage: true`): each server-sent event's `data`
//! in ([`Accumulator::handle_data`]), what the answer says out ([`Delta`]) as it streams, and
//! at the end the whole answer ([`Answer`]).
//!
//! A chunk is `{"choices": [{"index": 0, "delta": {"content": "...", "tool_calls": [...]},
//! "finish_reason": null}]}`. Tool calls stream by `index`: the first fragment of a call
//! carries its `id` and `function.name`, later ones add to `function.arguments`. With
//! `include_usage` a last chunk has `"choices": []` and `usage` (`prompt_tokens`,
//! `completion_tokens`). The stream ends with `data: [DONE]`. An `{"error": {...}}` object in
//! the stream is the server's failure.

use serde::Deserialize;
use serde_json::Value;

/// The most tool calls one answer may carry (an index past it is the server's error).
pub const MAX_TOOL_CALLS: usize = 16;
/// The most text of one answer (content, or one tool call's arguments), bytes.
pub const MAX_TEXT: usize = 64 * 1024;

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    /// The call's id (echoed in the tool's result message).
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments: JSON text, as the model wrote it.
    pub arguments: String,
}

/// Token counts the API reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    /// Tokens read (the whole conversation sent).
    pub prompt_tokens: u64,
    /// Tokens written.
    pub completion_tokens: u64,
}

/// What one chunk added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// More of the answer's text.
    Content(String),
}

/// The whole answer, once the stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    /// The text.
    pub content: String,
    /// The tool calls, in index order.
    pub tool_calls: Vec<ToolCall>,
    /// `stop`, `length`, `tool_calls`, `content_filter`... (`None`: the server never said).
    pub finish_reason: Option<String>,
    /// The usage chunk, when the server sent one.
    pub usage: Option<Usage>,
}

/// Why the stream cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// A chunk that is not the documented JSON.
    #[error("a chat completions chunk is not valid: {0}")]
    Malformed(#[source] serde_json::Error),
    /// A tool call (by its index) was never given a name.
    #[error("a chat completions chunk is not valid: tool call {0} has no name")]
    NoToolName(usize),
    /// The server reported an error inside the stream.
    #[error("the LLM reported an error: {0}")]
    Server(String),
    /// The answer passed a bound.
    #[error("the LLM's answer is too long: {0}")]
    TooLong(&'static str),
    /// Data after `[DONE]`.
    #[error("data after the end of the stream")]
    AfterDone,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: ChunkDelta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct ChunkDelta {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolFragment>,
}

#[derive(Deserialize)]
struct ToolFragment {
    index: usize,
    id: Option<String>,
    function: Option<FunctionFragment>,
}

#[derive(Deserialize)]
struct FunctionFragment {
    name: Option<String>,
    arguments: Option<String>,
}

/// One stream's accumulator.
#[derive(Debug, Default)]
pub struct Accumulator {
    answer: Answer,
    done: bool,
}

impl Accumulator {
    /// An empty answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one event's `data`; returns the text it added (`None` when it added none).
    pub fn handle_data(&mut self, data: &str) -> Result<Option<Delta>, ChatError> {
        if self.done {
            return Err(ChatError::AfterDone);
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(None);
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(ChatError::Malformed)?;
        if let Some(error) = chunk.error {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(ChatError::Server(message));
        }
        if let Some(usage) = chunk.usage {
            self.answer.usage = Some(usage);
        }
        let mut added = String::new();
        // Only the first choice is asked for (`n` is never set).
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(text) = choice.delta.content {
                if self.answer.content.len() + text.len() > MAX_TEXT {
                    return Err(ChatError::TooLong("content"));
                }
                self.answer.content.push_str(&text);
                added.push_str(&text);
            }
            for fragment in choice.delta.tool_calls {
                if fragment.index >= MAX_TOOL_CALLS {
                    return Err(ChatError::TooLong("tool calls"));
                }
                let calls = &mut self.answer.tool_calls;
                if calls.len() <= fragment.index {
                    calls.resize_with(fragment.index + 1, ToolCall::default);
                }
                let call = &mut calls[fragment.index];
                if let Some(id) = fragment.id {
                    call.id = id;
                }
                if let Some(function) = fragment.function {
                    if let Some(name) = function.name {
                        call.name.push_str(&name);
                    }
                    if let Some(arguments) = function.arguments {
                        if call.arguments.len() + arguments.len() > MAX_TEXT {
                            return Err(ChatError::TooLong("tool arguments"));
                        }
                        call.arguments.push_str(&arguments);
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.answer.finish_reason = Some(reason);
            }
        }
        Ok((!added.is_empty()).then_some(Delta::Content(added)))
    }

    /// Whether `[DONE]` was read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The answer so far.
    pub fn answer(&self) -> &Answer {
        &self.answer
    }

    /// The whole answer. A tool call without a name (indexes the server skipped) is the
    /// server's error.
    pub fn finish(self) -> Result<Answer, ChatError> {
        if let Some(i) = self
            .answer
            .tool_calls
            .iter()
            .position(|c| c.name.is_empty())
        {
            return Err(ChatError::NoToolName(i));
        }
        Ok(self.answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chunk(delta: Value, finish: Option<&str>) -> String {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "m", "choices": [{"index": 0, "delta": delta,
               "finish_reason": finish}]})
        .to_string()
    }

    #[test]
    fn content_streams_and_usage_comes_last() {
        let mut a = Accumulator::new();
        assert_eq!(
            a.handle_data(&chunk(json!({"role": "assistant", "content": ""}), None))
                .unwrap(),
            None
        );
        assert_eq!(
            a.handle_data(&chunk(json!({"content": "안녕하세요. "}), None))
                .unwrap(),
            Some(Delta::Content("안녕하세요. ".into()))
        );
        a.handle_data(&chunk(json!({"content": "무엇을"}), None))
            .unwrap();
        a.handle_data(&chunk(json!({}), Some("stop"))).unwrap();
        let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                           "usage": {"prompt_tokens": 42, "completion_tokens": 7,
                                     "total_tokens": 49}});
        a.handle_data(&usage.to_string()).unwrap();
        a.handle_data("[DONE]").unwrap();
        assert!(a.is_done());
        assert!(matches!(a.handle_data("{}"), Err(ChatError::AfterDone)));
        let answer = a.finish().unwrap();
        assert_eq!(answer.content, "안녕하세요. 무엇을");
        assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            answer.usage,
            Some(Usage {
                prompt_tokens: 42,
                completion_tokens: 7
            })
        );
    }

    #[test]
    fn tool_calls_accumulate_by_index() {
        let mut a = Accumulator::new();
        let frag = |index: usize, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut f = json!({"index": index, "function": {"arguments": args}});
            if let Some(id) = id {
                f["id"] = json!(id);
                f["type"] = json!("function");
            }
            if let Some(name) = name {
                f["function"]["name"] = json!(name);
            }
            chunk(json!({"tool_calls": [f]}), None)
        };
        a.handle_data(&frag(0, Some("call_a"), Some("hang_up"), ""))
            .unwrap();
        a.handle_data(&frag(1, Some("call_b"), Some("lookup"), "{\"n\":"))
            .unwrap();
        a.handle_data(&frag(0, None, None, "{\"reason\":\"bye\"}"))
            .unwrap();
        a.handle_data(&frag(1, None, None, "3}")).unwrap();
        a.handle_data(&chunk(json!({}), Some("tool_calls")))
            .unwrap();
        let answer = a.finish().unwrap();
        assert_eq!(
            answer.tool_calls,
            vec![
                ToolCall {
                    id: "call_a".into(),
                    name: "hang_up".into(),
                    arguments: "{\"reason\":\"bye\"}".into()
                },
                ToolCall {
                    id: "call_b".into(),
                    name: "lookup".into(),
                    arguments: "{\"n\":3}".into()
                },
            ]
        );
        assert_eq!(answer.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn errors_and_nonsense_are_reported() {
        let mut a = Accumulator::new();
        assert!(matches!(
            a.handle_data(r#"{"error": {"message": "overloaded", "type": "server_error"}}"#),
            Err(ChatError::Server(m)) if m == "overloaded"
        ));
        assert!(matches!(
            Accumulator::new().handle_data("not json"),
            Err(ChatError::Malformed(_))
        ));
        let mut a = Accumulator::new();
        let far = chunk(
            json!({"tool_calls": [{"index": MAX_TOOL_CALLS, "id": "x"}]}),
            None,
        );
        assert!(matches!(
            a.handle_data(&far),
            Err(ChatError::TooLong("tool calls"))
        ));
        let mut a = Accumulator::new();
        a.handle_data(&chunk(
            json!({"tool_calls": [{"index": 1, "id": "x",
            "function": {"name": "f", "arguments": "{}"}}]}),
            None,
        ))
        .unwrap();
        assert!(matches!(a.finish(), Err(ChatError::NoToolName(0))));
    }
}
