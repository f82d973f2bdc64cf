//! The Realtime double against a real WebSocket client: the handshake rules, session
//! validation, caller audio, spoken responses, truncation, cancellation, function calls,
//! barge-in, and how connections end.

use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use callgate_testkit::realtime::{
    Auto, BadKey, Closed, Double, DoubleConfig, Format, ItemKind, Role, Session,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(10);

/// How a client's connection ended.
#[derive(Debug, PartialEq)]
enum End {
    Close(u16, String),
    /// A read error without a close frame (reset, or EOF mid-protocol).
    Error(String),
    /// The stream ended without a close frame or an error.
    Eof,
}

/// A bare Realtime client: sends what the test says, reports what arrives.
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, (u16, String)> {
        let mut request = url.into_client_request().expect("a ws:// URL");
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(WsError::Http(response)) => Err((
                response.status().as_u16(),
                String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            )),
            Err(other) => panic!("connect: {other}"),
        }
    }

    /// Connects with the right key, then reads `session.created`.
    async fn connect(double: &Double) -> (Self, Value) {
        let url = format!("{}?model=gpt-realtime", double.url());
        let mut client = Self::try_connect(&url, &[("authorization", "Bearer test-key")])
            .await
            .expect("the double accepts the right key");
        let created = client.recv_type("session.created").await;
        (client, created)
    }

    async fn send(&mut self, event: Value) {
        self.ws
            .send(Message::Text(event.to_string().into()))
            .await
            .expect("send an event");
    }

    /// The next server event.
    async fn recv(&mut self) -> Value {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the double answered in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text).expect("a JSON text event");
                }
                Some(Ok(Message::Close(frame))) => {
                    panic!("closed while expecting an event: {frame:?}")
                }
                Some(Ok(_)) => continue,
                other => panic!("connection ended while expecting an event: {other:?}"),
            }
        }
    }

    async fn recv_type(&mut self, type_: &str) -> Value {
        let event = self.recv().await;
        assert_eq!(event["type"], type_, "{event}");
        event
    }

    /// Events up to and including the first of this type.
    async fn until(&mut self, type_: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.recv().await;
            let done = event["type"] == type_;
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// The next `error` event's `error` object.
    async fn error(&mut self) -> Value {
        self.recv_type("error").await["error"].clone()
    }

    /// Reads until the connection ends (answering a close frame, as a client must).
    async fn end(&mut self) -> End {
        let mut closed = None;
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the connection ended in time");
            match next {
                Some(Ok(Message::Close(frame))) => {
                    closed = Some(frame.map_or((1005, String::new()), |f| {
                        (f.code.into(), f.reason.to_string())
                    }));
                }
                Some(Ok(_)) => continue,
                end => {
                    return match (closed, end) {
                        (Some((code, reason)), _) => End::Close(code, reason),
                        (None, Some(Err(e))) => End::Error(e.to_string()),
                        (None, _) => End::Eof,
                    };
                }
            }
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().expect("every event has a type"))
        .collect()
}

fn append(audio: &[u8]) -> Value {
    json!({"type": "input_audio_buffer.append", "audio": BASE64_STANDARD.encode(audio)})
}

/// A double and one configured session: G.711 µ-law both ways, server VAD, transcription on.
async fn pcmu_session(config: DoubleConfig) -> (Double, Client, Session) {
    let mut double = Double::start(config).await;
    let (mut client, _) = Client::connect(&double).await;
    let mut session = double.session().await;
    client
        .send(json!({"type": "session.update", "session": {
            "type": "realtime",
            "instructions": "You are the front desk.",
            "output_modalities": ["audio"],
            "audio": {
                "input": {"format": {"type": "audio/pcmu"},
                          "transcription": {"model": "gpt-4o-mini-transcribe"},
                          "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
                "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
            },
            "tools": [{"type": "function", "name": "lookup", "description": "Look up an order.",
                       "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}],
            "tool_choice": "auto",
        }}))
        .await;
    client.recv_type("session.updated").await;
    session.expect("session.update").await;
    (double, client, session)
}

#[tokio::test]
async fn the_beta_header_is_refused_with_4000() {
    let mut double = Double::start(DoubleConfig::default()).await;
    let mut client = Client::try_connect(
        &double.url(),
        &[
            ("authorization", "Bearer test-key"),
            ("openai-beta", "realtime=v1"),
        ],
    )
    .await
    .unwrap();
    let error = client.error().await;
    assert_eq!(error["code"], "beta_api_shape_disabled");
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(
        error["message"],
        "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
    );
    assert!(matches!(client.end().await, End::Close(4000, _)));
    assert_eq!(double.connections(), 1);

    // The next, correct connection is the first session handed out.
    let (_client, created) = Client::connect(&double).await;
    let session = double.session().await;
    assert_eq!(session.request().path, "/v1/realtime");
    assert_eq!(session.request().model(), Some("gpt-realtime"));
    assert_eq!(session.request().beta_header(), None);
    assert_eq!(created["session"]["type"], "realtime");
    assert_eq!(double.connections(), 2);
}

#[tokio::test]
async fn a_bad_key_is_closed_with_3000() {
    let double = Double::start(DoubleConfig::default()).await;
    for headers in [
        &[("authorization", "Bearer sk-wrong-key-1234")][..],
        &[][..],
    ] {
        let mut client = Client::try_connect(&double.url(), headers).await.unwrap();
        let error = client.error().await;
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], "invalid_api_key");
        assert_eq!(
            client.end().await,
            End::Close(3000, "invalid_request_error.invalid_api_key".to_owned())
        );
    }
    let mut client = Client::try_connect(
        &double.url(),
        &[("authorization", "Bearer sk-wrong-key-1234")],
    )
    .await
    .unwrap();
    let message = client.error().await["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with("Incorrect API key provided: sk-"),
        "{message}"
    );
    assert!(
        !message.contains("wrong-key"),
        "the key is masked: {message}"
    );
    assert_eq!(double.connections(), 3);
}

#[tokio::test]
async fn a_bad_key_can_be_refused_at_the_upgrade_with_401() {
    let config = DoubleConfig {
        bad_key: BadKey::Http401,
        ..DoubleConfig::default()
    };
    let double = Double::start(config).await;
    let (status, body) =
        Client::try_connect(&double.url(), &[("authorization", "Bearer nope-nope-nope")])
            .await
            .err()
            .unwrap();
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, body) = Client::try_connect(&double.url(), &[]).await.err().unwrap();
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("You didn't provide an API key")
    );
    assert_eq!(double.connections(), 2);
}

#[tokio::test]
async fn session_update_is_validated_and_merged() {
    let mut double = Double::start(DoubleConfig::default()).await;
    let (mut client, created) = Client::connect(&double).await;
    let mut session = double.session().await;
    assert!(created["event_id"].as_str().unwrap().starts_with("event_"));
    assert_eq!(
        created["session"]["audio"]["input"]["turn_detection"]["type"],
        "server_vad"
    );

    // No session.type: refused as a whole, with the client's event_id.
    client
        .send(json!({"type": "session.update", "event_id": "evt_1",
                     "session": {"instructions": "Hi", "audio": {"output": {"voice": "cedar"}}}}))
        .await;
    let error = client.error().await;
    assert_eq!(error["code"], "missing_required_parameter");
    assert_eq!(error["param"], "session.type");
    assert_eq!(
        error["message"],
        "Missing required parameter: 'session.type'."
    );
    assert_eq!(error["event_id"], "evt_1");

    // The beta's flat fields.
    client
        .send(json!({"type": "session.update",
                     "session": {"type": "realtime", "modalities": ["audio", "text"],
                                 "input_audio_format": "g711_ulaw", "voice": "alloy"}}))
        .await;
    let error = client.error().await;
    assert_eq!(error["code"], "unknown_parameter");
    assert_eq!(
        error["message"],
        "Unknown parameter: 'session.input_audio_format'."
    );
    client
        .send(json!({"type": "session.update", "session": {"type": "realtime", "modalities": ["audio"]}}))
        .await;
    let error = client.error().await;
    assert_eq!(error["message"], "Unknown parameter: 'session.modalities'.");
    assert_eq!(error["param"], "session.modalities");
    assert_eq!(error["event_id"], Value::Null);

    // A good update: only what is present changes.
    client
        .send(
            json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcma"}, "turn_detection": null},
                      "output": {"voice": "cedar"}}}}),
        )
        .await;
    let updated = client.recv_type("session.updated").await;
    let s = &updated["session"];
    assert_eq!(s["audio"]["input"]["format"], json!({"type": "audio/pcma"}));
    assert_eq!(s["audio"]["input"]["turn_detection"], Value::Null);
    assert_eq!(s["audio"]["output"]["voice"], "cedar");
    assert_eq!(
        s["audio"]["output"]["format"],
        json!({"type": "audio/pcm", "rate": 24000})
    );
    assert_eq!(s["instructions"], created["session"]["instructions"]);

    for _ in 0..4 {
        session.expect("session.update").await;
    }
    assert_eq!(session.input_format(), Format::Pcma);
    assert_eq!(session.output_format(), Format::Pcm24k);
    assert_eq!(session.errors().len(), 3);
}

#[tokio::test]
async fn appends_accumulate_and_bad_events_get_errors() {
    let (_double, mut client, mut session) = pcmu_session(DoubleConfig::default()).await;
    let audio = Format::Pcmu.tone(60, 1);
    for frame in audio.chunks(160) {
        client.send(append(frame)).await;
    }
    session.wait_appended(audio.len()).await;
    assert_eq!(session.appended(), audio);

    client
        .send(json!({"type": "input_audio_buffer.append", "event_id": "evt_b64", "audio": "not base64!"}))
        .await;
    let error = client.error().await;
    assert_eq!(error["param"], "audio");
    assert_eq!(error["event_id"], "evt_b64");
    assert_eq!(session.appended_len(), audio.len());

    // A beta event name and a made-up one.
    client
        .send(json!({"type": "scooby.dooby.doo", "event_id": "evt_x"}))
        .await;
    let error = client.error().await;
    assert_eq!(error["code"], "invalid_value");
    assert_eq!(error["param"], "type");
    assert_eq!(error["event_id"], "evt_x");
    assert!(
        error["message"].as_str().unwrap().starts_with(
            "Invalid value: 'scooby.dooby.doo'. Supported values are: 'session.update'"
        ),
        "{error}"
    );
    assert_eq!(session.next().await["type"], "scooby.dooby.doo");

    // Committing 60 ms by hand is too little.
    client
        .send(json!({"type": "input_audio_buffer.commit"}))
        .await;
    let error = client.error().await;
    assert_eq!(error["code"], "input_audio_buffer_commit_empty");
    assert_eq!(
        error["message"],
        "Error committing input audio buffer: buffer too small. Expected at least 100ms of \
         audio, but buffer only has 60.00ms of audio."
    );
}

#[tokio::test]
async fn speak_sends_the_documented_order() {
    let config = DoubleConfig {
        audio_per_delta_ms: 100,
        ..DoubleConfig::default()
    };
    let (_double, mut client, mut session) = pcmu_session(config).await;
    client.send(json!({"type": "response.create"})).await;
    session.expect("response.create").await;
    let audio = Format::Pcmu.tone(250, 2);
    let spoken = session.speak(&audio, "Hello there, how can I help?").await;
    let events = client.until("response.done").await;
    assert_eq!(
        types(&events),
        [
            "response.created",
            "rate_limits.updated",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_audio.delta",
            "response.output_audio_transcript.delta",
            "response.output_audio.delta",
            "response.output_audio_transcript.delta",
            "response.output_audio.delta",
            "response.output_audio_transcript.delta",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
    );
    let mut got = Vec::new();
    let mut transcript = String::new();
    for e in &events {
        assert!(e["event_id"].as_str().unwrap().starts_with("event_"));
        match e["type"].as_str().unwrap() {
            "response.output_audio.delta" => {
                assert_eq!(e["item_id"], spoken.item_id.as_str());
                assert_eq!(e["response_id"], spoken.response_id.as_str());
                assert_eq!(e["content_index"], 0);
                got.extend(
                    BASE64_STANDARD
                        .decode(e["delta"].as_str().unwrap())
                        .unwrap(),
                );
            }
            "response.output_audio_transcript.delta" => {
                transcript.push_str(e["delta"].as_str().unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(got, audio);
    assert_eq!(transcript, "Hello there, how can I help?");
    assert_eq!(
        BASE64_STANDARD
            .decode(events[5]["delta"].as_str().unwrap())
            .unwrap()
            .len(),
        800
    );
    assert_eq!(events[12]["transcript"], "Hello there, how can I help?");
    assert!(spoken.response_id.starts_with("resp_") && spoken.item_id.starts_with("item_"));
    let done = &events[16]["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["id"], spoken.response_id.as_str());
    assert_eq!(done["output"][0]["content"][0]["type"], "output_audio");
    assert!(done["output"][0]["content"][0].get("audio").is_none());
    assert_eq!(done["usage"]["output_token_details"]["audio_tokens"], 5);
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let item = session.item(&spoken.item_id).unwrap();
    assert_eq!(item.audio_ms, 250);
    assert_eq!(
        item.kind,
        ItemKind::Message {
            role: Role::Assistant
        }
    );
    assert_eq!(session.active_response(), None);
    assert_eq!(session.responses().len(), 1);
}

#[tokio::test]
async fn truncation_follows_the_service_rules() {
    let (_double, mut client, mut session) = pcmu_session(DoubleConfig::default()).await;
    client
        .send(
            json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": "Greet the caller."}]}}),
        )
        .await;
    let added = client.recv_type("conversation.item.added").await;
    let user_item = added["item"]["id"].as_str().unwrap().to_owned();
    client.recv_type("conversation.item.done").await;
    client.send(json!({"type": "response.create"})).await;
    session.expect("conversation.item.create").await;
    let spoken = session
        .answer_create(&Format::Pcmu.tone(1000, 3), "Welcome to the front desk.")
        .await;
    client.until("response.done").await;

    // Too long: the exact message, code null, the client's event_id.
    client
        .send(
            json!({"type": "conversation.item.truncate", "event_id": "evt_t1",
                     "item_id": spoken.item_id, "content_index": 0, "audio_end_ms": 1500}),
        )
        .await;
    let error = client.error().await;
    assert_eq!(
        error["message"],
        "Audio content of 1000ms is already shorter than 1500ms"
    );
    assert_eq!(error["code"], Value::Null);
    assert_eq!(error["event_id"], "evt_t1");

    // Nothing played, or not model audio.
    for (item, end) in [(spoken.item_id.as_str(), 0), (user_item.as_str(), 300)] {
        client
            .send(
                json!({"type": "conversation.item.truncate", "item_id": item,
                         "content_index": 0, "audio_end_ms": end}),
            )
            .await;
        let error = client.error().await;
        assert_eq!(
            error["message"],
            "Only model output audio messages can be truncated"
        );
        assert_eq!(error["code"], Value::Null);
    }
    client
        .send(
            json!({"type": "conversation.item.truncate", "item_id": "item_nope",
                     "content_index": 0, "audio_end_ms": 10}),
        )
        .await;
    assert_eq!(
        client.error().await["message"],
        "Item with item_id not found: item_nope"
    );

    // Within the audio: truncated, and the item is cut to that length.
    client
        .send(
            json!({"type": "conversation.item.truncate", "item_id": spoken.item_id,
                     "content_index": 0, "audio_end_ms": 640}),
        )
        .await;
    let truncated = client.recv_type("conversation.item.truncated").await;
    assert_eq!(truncated["item_id"], spoken.item_id.as_str());
    assert_eq!(truncated["audio_end_ms"], 640);
    let item = session.item(&spoken.item_id).unwrap();
    assert_eq!((item.audio_ms, item.truncated_ms), (1000, Some(640)));
    client
        .send(
            json!({"type": "conversation.item.truncate", "item_id": spoken.item_id,
                     "content_index": 0, "audio_end_ms": 700}),
        )
        .await;
    assert_eq!(
        client.error().await["message"],
        "Audio content of 640ms is already shorter than 700ms"
    );
    client
        .send(json!({"type": "conversation.item.retrieve", "item_id": spoken.item_id}))
        .await;
    let retrieved = client.recv_type("conversation.item.retrieved").await;
    let part = &retrieved["item"]["content"][0];
    assert_eq!(part["transcript"], "", "truncation drops the transcript");
    assert_eq!(
        BASE64_STANDARD
            .decode(part["audio"].as_str().unwrap())
            .unwrap()
            .len(),
        640 * 8
    );

    client
        .send(json!({"type": "conversation.item.delete", "item_id": spoken.item_id}))
        .await;
    assert_eq!(
        client.recv_type("conversation.item.deleted").await["item_id"],
        spoken.item_id.as_str()
    );
    assert!(session.item(&spoken.item_id).unwrap().deleted);
    client
        .send(json!({"type": "conversation.item.delete", "item_id": spoken.item_id}))
        .await;
    assert_eq!(client.error().await["param"], "item_id");
}

#[tokio::test]
async fn cancel_with_and_without_a_response() {
    let (_double, mut client, mut session) = pcmu_session(DoubleConfig::default()).await;
    client
        .send(json!({"type": "response.cancel", "event_id": "evt_c1"}))
        .await;
    let error = client.error().await;
    assert_eq!(error["code"], "response_cancel_not_active");
    assert_eq!(
        error["message"],
        "Cancellation failed: no active response found"
    );
    assert_eq!(error["event_id"], "evt_c1");

    client.send(json!({"type": "response.create"})).await;
    session.expect("response.cancel").await;
    session.expect("response.create").await;
    let spoken = session.begin_speaking().await;
    assert!(
        session
            .speak_more(&Format::Pcmu.tone(200, 4), "One moment")
            .await
    );
    client.send(json!({"type": "response.cancel"})).await;
    session.expect("response.cancel").await;
    let events = client.until("response.done").await;
    let tail: Vec<&str> = types(&events)
        .into_iter()
        .filter(|t| !t.ends_with(".delta"))
        .collect();
    assert_eq!(
        tail,
        [
            "response.created",
            "rate_limits.updated",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
    );
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["status"], "cancelled");
    assert_eq!(
        done["status_details"],
        json!({"type": "cancelled", "reason": "client_cancelled"})
    );
    assert_eq!(done["output"][0]["status"], "incomplete");
    assert_eq!(done["output"][0]["id"], spoken.item_id.as_str());
    // The stream is over: nothing more goes out for it.
    assert!(
        !session
            .speak_more(&Format::Pcmu.tone(100, 5), " more")
            .await
    );
    assert_eq!(session.finish_response().await, None);
    assert_eq!(session.item(&spoken.item_id).unwrap().audio_ms, 200);
}

#[tokio::test]
async fn response_create_while_one_is_active_is_refused() {
    let (_double, mut client, mut session) = pcmu_session(DoubleConfig::default()).await;
    client.send(json!({"type": "response.create"})).await;
    let created = client.recv_type("response.created").await;
    let id = created["response"]["id"].as_str().unwrap().to_owned();
    client.recv_type("rate_limits.updated").await;
    client
        .send(json!({"type": "response.create", "event_id": "evt_r2"}))
        .await;
    let error = client.error().await;
    assert_eq!(error["code"], "conversation_already_has_active_response");
    assert_eq!(error["event_id"], "evt_r2");
    assert!(
        error["message"].as_str().unwrap().starts_with(&format!(
            "Conversation already has an active response in progress: {id}."
        )),
        "{error}"
    );
    // Beta-style overrides are refused before anything else.
    client
        .send(json!({"type": "response.create", "response": {"modalities": ["audio"]}}))
        .await;
    assert_eq!(
        client.error().await["message"],
        "Unknown parameter: 'response.modalities'."
    );
    session.expect("response.create").await;
    session.expect("response.create").await;
    session.expect("response.create").await;
    assert_eq!(session.active_response(), Some(id));
}

#[tokio::test]
async fn function_calls_and_their_outputs() {
    let (_double, mut client, mut session) = pcmu_session(DoubleConfig::default()).await;
    client
        .send(json!({"type": "conversation.item.create", "event_id": "evt_f0",
                     "item": {"type": "function_call_output", "call_id": "call_unknown", "output": "{}"}}))
        .await;
    let error = client.error().await;
    assert_eq!(error["param"], "item.call_id");
    assert_eq!(error["event_id"], "evt_f0");

    client.send(json!({"type": "response.create"})).await;
    session.expect("conversation.item.create").await;
    session.expect("response.create").await;
    let called = session
        .call_function(
            "lookup",
            "call_Abc123",
            r#"{"order":"A-1234-5678-90"}"#,
            Some((&Format::Pcmu.tone(300, 6), "Let me check that.")),
        )
        .await;
    let events = client.until("response.done").await;
    let seq: Vec<&str> = types(&events)
        .into_iter()
        .filter(|t| !t.ends_with(".delta"))
        .skip(10) // created, rate limits, and the spoken item's added/done events
        .collect();
    assert_eq!(
        seq,
        [
            "response.output_item.added",
            "conversation.item.added",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
    );
    let args: String = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(args, r#"{"order":"A-1234-5678-90"}"#);
    let done_args = events
        .iter()
        .find(|e| e["type"] == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done_args["name"], "lookup");
    assert_eq!(done_args["call_id"], "call_Abc123");
    let output = &events.last().unwrap()["response"]["output"];
    assert_eq!(output[0]["id"], called.audio_item_id.as_deref().unwrap());
    assert_eq!(output[1]["type"], "function_call");
    assert_eq!(output[1]["call_id"], "call_Abc123");
    assert_eq!(output[1]["status"], "completed");

    client
        .send(json!({"type": "conversation.item.create",
                     "item": {"type": "function_call_output", "call_id": "call_Abc123",
                              "output": "{\"status\":\"shipped\"}"}}))
        .await;
    let added = client.recv_type("conversation.item.added").await;
    assert_eq!(added["previous_item_id"], called.item_id.as_str());
    assert_eq!(added["item"]["type"], "function_call_output");
    client.recv_type("conversation.item.done").await;
    // The service never answers a tool output by itself.
    session.expect("conversation.item.create").await;
    assert_eq!(session.active_response(), None);
}

#[tokio::test]
async fn speech_started_interrupts_a_running_response() {
    let (_double, mut client, mut session) = pcmu_session(DoubleConfig::default()).await;
    client.send(json!({"type": "response.create"})).await;
    session.expect("response.create").await;
    let spoken = session.begin_speaking().await;
    session
        .speak_more(&Format::Pcmu.tone(500, 7), "I can certainly")
        .await;
    let user_item = session.speech_started(1200).await;
    let before = client.until("input_audio_buffer.speech_started").await;
    assert_eq!(
        before
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta")
            .count(),
        5
    );
    let started = before.last().unwrap();
    assert_eq!(started["type"], "input_audio_buffer.speech_started");
    assert_eq!(started["audio_start_ms"], 1200);
    assert_eq!(started["item_id"], user_item.as_str());
    let events = client.until("response.done").await;
    assert_eq!(
        types(&events),
        [
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
    );
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["status_details"]["reason"], "turn_detected");
    assert_eq!(session.item(&spoken.item_id).unwrap().status, "incomplete");

    // The agent's own cancel now finds nothing running.
    client.send(json!({"type": "response.cancel"})).await;
    assert_eq!(client.error().await["code"], "response_cancel_not_active");

    // The turn ends: commit, the caller's item, and (create_response) a new response.
    session.speech_stopped(2400).await;
    let events = client.until("rate_limits.updated").await;
    assert_eq!(
        types(&events),
        [
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
            "rate_limits.updated",
        ]
    );
    assert_eq!(events[1]["item_id"], user_item.as_str());
    assert_eq!(events[1]["previous_item_id"], spoken.item_id.as_str());
    session
        .caller_transcript(&user_item, "Actually, wait.")
        .await;
    let transcript = client
        .recv_type("conversation.item.input_audio_transcription.completed")
        .await;
    assert_eq!(transcript["transcript"], "Actually, wait.");
    assert!(session.active_response().is_some());
}

#[tokio::test]
async fn without_interrupt_response_the_response_runs_on() {
    let config = DoubleConfig {
        interrupt_response: Some(false),
        ..DoubleConfig::default()
    };
    let (_double, mut client, mut session) = pcmu_session(config).await;
    client.send(json!({"type": "response.create"})).await;
    session.expect("response.create").await;
    session.begin_speaking().await;
    session.speech_started(100).await;
    client.until("input_audio_buffer.speech_started").await;
    assert!(
        session
            .speak_more(&Format::Pcmu.tone(100, 8), "Still talking")
            .await
    );
    let done = session.finish_response().await.unwrap();
    assert_eq!(done["status"], "completed");
    let events = client.until("response.done").await;
    assert!(types(&events).contains(&"response.output_audio.delta"));
}

#[tokio::test]
async fn abrupt_drop_and_closes() {
    let mut double = Double::start(DoubleConfig::default()).await;

    // A reset: the client sees an error, never a close frame.
    let (mut client, _) = Client::connect(&double).await;
    let session = double.session().await;
    session.drop_abruptly();
    let end = client.end().await;
    assert!(matches!(end, End::Error(_)), "{end:?}");

    // The double closes; the client answers.
    let (mut client, _) = Client::connect(&double).await;
    let session = double.session().await;
    let (closed, end) = tokio::join!(session.close(1011, "server error"), client.end());
    assert_eq!(end, End::Close(1011, "server error".to_owned()));
    assert_eq!(
        closed,
        Closed::Double {
            code: 1011,
            reason: "server error".to_owned()
        }
    );

    // The client closes; the double notices.
    let (mut client, _) = Client::connect(&double).await;
    let mut session = double.session().await;
    client
        .ws
        .close(Some(CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    assert_eq!(
        session.closed().await,
        Closed::Client {
            code: 1000,
            reason: "bye".to_owned()
        }
    );

    // The client vanishes.
    let (client, _) = Client::connect(&double).await;
    let mut session = double.session().await;
    drop(client);
    assert_eq!(session.closed().await, Closed::Abrupt);
}

#[tokio::test]
async fn auto_mode_answers_by_itself() {
    let config = DoubleConfig {
        auto: Some(Auto {
            answer_ms: 300,
            speech_every_ms: Some(200),
            transcript: "Sure.".to_owned(),
        }),
        ..DoubleConfig::default()
    };
    let double = Double::start(config).await;
    let (mut client, _) = Client::connect(&double).await;
    client
        .send(json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}}))
        .await;
    client.recv_type("session.updated").await;

    // response.create: answered at once.
    client.send(json!({"type": "response.create"})).await;
    let events = client.until("response.done").await;
    let audio: usize = events
        .iter()
        .filter(|e| e["type"] == "response.output_audio.delta")
        .map(|e| {
            BASE64_STANDARD
                .decode(e["delta"].as_str().unwrap())
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(audio, 300 * 8);

    // 200 ms of caller audio: a whole turn and its answer.
    for frame in Format::Pcmu.silence(200).chunks(160) {
        client.send(append(frame)).await;
    }
    let events = client.until("response.done").await;
    assert_eq!(
        types(&events)[..6],
        [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
        ]
    );
    assert_eq!(events[1]["audio_end_ms"], 200);
    assert_eq!(events.last().unwrap()["response"]["status"], "completed");
}

#[tokio::test]
async fn auto_mode_holds_many_sessions_at_once() {
    let config = DoubleConfig {
        auto: Some(Auto {
            answer_ms: 100,
            speech_every_ms: Some(100),
            transcript: "Yes.".to_owned(),
        }),
        ..DoubleConfig::default()
    };
    let double = Double::start(config).await;
    let call = |seed: u32| {
        let double = &double;
        async move {
            let (mut client, _) = Client::connect(double).await;
            client
                .send(
                    json!({"type": "session.update", "session": {"type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/pcma"}}}}}),
                )
                .await;
            client.recv_type("session.updated").await;
            for frame in Format::Pcma.tone(100, seed).chunks(160) {
                client.send(append(frame)).await;
            }
            let events = client.until("response.done").await;
            client.ws.close(None).await.expect("close");
            events.len()
        }
    };
    let calls: Vec<_> = (0..200).map(call).collect();
    let counts = futures_util::future::join_all(calls).await;
    // The turn (5 events), response.created and rate_limits.updated, the item's 3 opening
    // events, one audio and one transcript delta, its 5 closing events, response.done.
    assert!(counts.iter().all(|&n| n == 18), "{counts:?}");
    assert_eq!(double.connections(), 200);
}
