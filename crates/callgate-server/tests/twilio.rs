//! Twilio Media Streams end to end over real sockets: a raw phone speaking Twilio's JSON as
//! Twilio does (connected, start, media, dtmf, mark, stop), the echo agent byte-exact, marks
//! returned, stop as the caller's hangup, the record, routes on `custom.<name>`, and the
//! `X-Twilio-Signature` check in the upgrade.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use callgate_server::auth::Secret;
use callgate_server::call_auth::{CallAuth, CallKey, TwilioToken};
use callgate_server::routes::parse_spec;
use callgate_testkit::{Phone, Received, spawn_server};
use serde_json::{Value, json};

const SID: &str = "MZ18ad3ab5a668481ce02b83e7395059f0";
const ACCOUNT: &str = "AC25e16e9a716a4a1786a7c83f58e30482";

fn connected() -> String {
    json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string()
}

fn start(call_sid: &str, params: Value) -> String {
    json!({"event": "start", "sequenceNumber": "1", "streamSid": SID,
        "start": {"streamSid": SID, "accountSid": ACCOUNT, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
    .to_string()
}

/// Twilio's side of a stream: counts its messages as Twilio does.
struct Twilio {
    phone: Phone,
    seq: u64,
    chunk: u64,
}

impl Twilio {
    async fn start(phone: Phone, call_sid: &str, params: Value) -> Self {
        let mut t = Self {
            phone,
            seq: 1,
            chunk: 0,
        };
        t.phone.text(connected()).await;
        t.phone.text(start(call_sid, params)).await;
        t
    }

    fn next(&mut self) -> String {
        self.seq += 1;
        self.seq.to_string()
    }

    async fn media(&mut self, audio: &[u8]) {
        self.chunk += 1;
        let seq = self.next();
        let m = json!({"event": "media", "sequenceNumber": seq, "streamSid": SID,
            "media": {"track": "inbound", "chunk": self.chunk.to_string(),
                "timestamp": ((self.chunk - 1) * 20).to_string(), "payload": BASE64.encode(audio)}});
        self.phone.text(m.to_string()).await;
    }

    async fn dtmf(&mut self, digit: &str) {
        let seq = self.next();
        let m = json!({"event": "dtmf", "sequenceNumber": seq, "streamSid": SID,
            "dtmf": {"track": "inbound_track", "digit": digit}});
        self.phone.text(m.to_string()).await;
    }

    async fn mark(&mut self, name: &str) {
        let seq = self.next();
        let m = json!({"event": "mark", "sequenceNumber": seq, "streamSid": SID,
            "mark": {"name": name}});
        self.phone.text(m.to_string()).await;
    }

    async fn stop(&mut self, call_sid: &str) {
        let seq = self.next();
        let m = json!({"event": "stop", "sequenceNumber": seq, "streamSid": SID,
            "stop": {"accountSid": ACCOUNT, "callSid": call_sid}});
        self.phone.text(m.to_string()).await;
    }
}

/// 20 ms frames of μ-law whose bytes follow a pattern (so a reordering or a loss shows).
fn ulaw_frames(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| (0..160).map(|j| ((i * 7 + j * 3) % 251) as u8).collect())
        .collect()
}

#[tokio::test]
async fn a_twilio_stream_is_echoed_byte_exact_with_marks_dtmf_and_stop_as_hangup() {
    let server = spawn_server(|_| {}).await;
    let phone = server.phone("/").await;
    let params = json!({"from": "+14155550100", "to": "+14155550199", "campaign": "spring"});
    let mut twilio = Twilio::start(phone, "CAecho", params).await;

    let frames = ulaw_frames(100);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for (i, f) in frames.iter().enumerate() {
        tick.tick().await;
        if i == 30 {
            twilio.dtmf("7").await;
        }
        if i == 40 {
            // Invalid input mid-call is recorded, never the end of the call.
            twilio.phone.text("not json").await;
        }
        twilio.media(f).await;
    }
    let sent: Vec<u8> = frames.concat();
    let mut echoed = Vec::new();
    let mut media_messages = 0;
    let mut marks = Vec::new();
    while echoed.len() < sent.len() {
        match twilio.phone.recv().await {
            Received::Text(t) => {
                let m: Value = serde_json::from_str(&t).expect("JSON");
                assert_eq!(m["streamSid"], SID, "{m}");
                match m["event"].as_str() {
                    Some("media") => {
                        let payload = m["media"]["payload"].as_str().expect("payload");
                        echoed.extend(BASE64.decode(payload).expect("base64"));
                        media_messages += 1;
                    }
                    Some("mark") => {
                        let name = m["mark"]["name"].as_str().expect("name").to_owned();
                        // Twilio returns a mark once the audio before it has played.
                        twilio.mark(&name).await;
                        marks.push(name);
                    }
                    other => panic!("unexpected {other:?}: {m}"),
                }
            }
            other => panic!("expected text, got {other:?}"),
        }
    }
    assert!(echoed == sent, "echo is byte-exact and in order");
    assert_eq!(media_messages, 100, "one media message per 20 ms frame");
    // A mark every second of continuous audio at least.
    assert!(!marks.is_empty(), "{marks:?}");
    assert_eq!(marks[0], "cg-1");

    twilio.stop("CAecho").await;
    // Marks of the last audio may still come first; then our close.
    let close = loop {
        match twilio.phone.recv().await {
            Received::Close(code, reason) => break (code, reason),
            Received::Text(t) => assert!(t.contains(r#""event":"mark""#), "{t}"),
            other => panic!("expected the close, got {other:?}"),
        }
    };
    assert_eq!(close, (1000, "stream stopped".to_owned()));

    let record = server.ended_call("CAecho").await;
    assert_eq!(record["protocol"], "twilio");
    assert_eq!(record["caller"], "+14155550100");
    assert_eq!(record["callee"], "+14155550199");
    assert_eq!(record["external_id"], "CAecho");
    assert_eq!(record["end_reason"], "peer_hangup");
    assert_eq!(record["hangup_by"], "peer");
    assert_eq!(record["dtmf"], "7");
    assert_eq!(record["bytes_in"], 16000);
    assert_eq!(record["bytes_out"], 16000);
    assert_eq!(record["frames_in"], 100);
    assert_eq!(record["frames_out"], 100);
    assert!(record["answered_at"].is_string());
    assert_eq!(
        record["audio_format"],
        json!({"phone_output_audio_format": "ULAW_8000", "phone_input_audio_format": "ULAW_8000"})
    );
    assert_eq!(record["call_config"]["callSid"], "CAecho");
    assert_eq!(record["call_config"]["streamSid"], SID);
    assert_eq!(
        record["call_config"]["customParameters"]["campaign"],
        "spring"
    );

    let id = record["id"].as_str().unwrap();
    let (_, events) = server.get(&format!("/api/calls/{id}/events")).await;
    let kinds: Vec<(&str, &Value)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), &e["detail"]))
        .collect();
    assert!(
        kinds
            .iter()
            .any(|(k, d)| *k == "dtmf" && d["digit"] == "7" && d["source"] == "protocol"),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, d)| *k == "protocol_error" && d["kind"] == "invalid_json"),
        "{kinds:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn routes_match_twilio_custom_parameters_and_a_close_without_stop_is_peer_closed() {
    let server = spawn_server(|c| {
        c.routes = vec![
            parse_spec(
                json!({"name": "spring", "agent": "tone",
                    "match": {"protocol": "twilio", "custom": {"campaign": "spring*"}}}),
                0,
            )
            .unwrap(),
            parse_spec(json!({"name": "rest", "agent": "echo"}), 1).unwrap(),
        ];
    })
    .await;
    for (sid, campaign, route) in [
        ("CAspring", "spring-26", "spring"),
        ("CAautumn", "autumn", "rest"),
    ] {
        let phone = server.phone("/twilio").await;
        let mut twilio = Twilio::start(phone, sid, json!({"campaign": campaign})).await;
        if route == "spring" {
            // The tone agent speaks first: its audio arrives as media.
            let m = twilio.phone.recv().await.json();
            assert_eq!(m["event"], "media", "{m}");
        } else {
            twilio.media(&[0xff; 160]).await;
            let m = twilio.phone.recv().await.json();
            assert_eq!(m["media"]["payload"], BASE64.encode([0xff; 160]));
        }
        twilio.phone.close(1000, "bye").await;
        let record = server.ended_call(sid).await;
        assert_eq!(record["route"], route);
        assert_eq!(record["end_reason"], "peer_closed");
        // No number parameters: empty numbers.
        assert_eq!(record["caller"], "");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_bad_start_is_closed_with_a_reason_and_no_record() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(connected()).await;
    let mut bad: Value = serde_json::from_str(&start("CAbad", json!({}))).unwrap();
    bad["start"]["mediaFormat"]["encoding"] = json!("audio/l16");
    phone.text(bad.to_string()).await;
    assert_eq!(
        phone.closed().await,
        (
            1003,
            r#"unsupported start.mediaFormat.encoding: "audio/l16""#.to_owned()
        )
    );
    let mut phone = server.phone("/twilio").await;
    phone.text(callgate_testkit::incoming_call("x")).await;
    assert_eq!(
        phone.closed().await,
        (
            1008,
            "this endpoint speaks twilio, got a inbound message".to_owned()
        )
    );
    assert!(server.calls().await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn connected_without_start_is_closed_at_the_handshake_deadline() {
    let server = spawn_server(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut phone = server.phone("/").await;
    phone.text(connected()).await;
    assert_eq!(
        phone.closed().await,
        (1008, "no start message within 300 ms".to_owned())
    );
    assert!(server.calls().await.is_empty(), "no record");
    server.shutdown().await;
}

#[tokio::test]
async fn x_twilio_signature_admits_streams_and_refuses_bad_or_missing_ones() {
    const TOKEN: &str = "twilio-auth-token-0123456789";
    const KEY: &str = "callbridge-key-0123456789";
    let server = spawn_server(|c| {
        c.call_auth = CallAuth {
            keys: vec![CallKey::new(
                "cb",
                Secret::from_text(KEY).expect("secret"),
                None,
            )],
            twilio: Some(TwilioToken::new(TOKEN)),
            ..CallAuth::default()
        };
    })
    .await;
    let token = TwilioToken::new(TOKEN);
    let host = server.call_addr.to_string();
    let signature = token.sign(&format!("wss://{host}/twilio"));

    // A good signature: admitted without a key, the call runs.
    let phone = Phone::try_connect(
        &server.url("/twilio"),
        &[("x-twilio-signature", signature.as_str())],
    )
    .await
    .expect("admitted");
    let mut twilio = Twilio::start(phone, "CAsigned", json!({})).await;
    twilio.media(&[1; 160]).await;
    assert_eq!(twilio.phone.recv().await.json()["event"], "media");
    twilio.stop("CAsigned").await;
    let record = server.ended_call("CAsigned").await;
    assert_eq!(record["end_reason"], "peer_hangup");
    assert_eq!(record["key_name"], Value::Null);

    // Signed for another URL, or by another token: refused in the upgrade.
    for bad in [
        token.sign(&format!("wss://{host}/other")),
        TwilioToken::new("another-token").sign(&format!("wss://{host}/twilio")),
        "garbage".to_owned(),
    ] {
        let refused = Phone::try_connect(
            &server.url("/twilio"),
            &[("x-twilio-signature", bad.as_str())],
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(refused.0, 401);
        let body: Value = serde_json::from_str(&refused.1).expect("a JSON refusal");
        assert_eq!(
            body,
            json!({"code": "bad_twilio_signature", "error": "invalid X-Twilio-Signature"})
        );
    }
    // Missing on /twilio: refused.
    let refused = Phone::try_connect(&server.url("/twilio"), &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.0, 401);
    assert!(refused.1.contains("X-Twilio-Signature"), "{}", refused.1);
    // A key in the query works instead.
    let phone = Phone::try_connect(&format!("{}?apiKey={KEY}", server.url("/twilio")), &[])
        .await
        .expect("admitted by key");
    let mut twilio = Twilio::start(phone, "CAkeyed", json!({})).await;
    twilio.stop("CAkeyed").await;
    assert_eq!(server.ended_call("CAkeyed").await["key_name"], "cb");
    // A signature admits a Twilio stream only.
    let other = token.sign(&format!("wss://{host}/"));
    let mut phone = Phone::try_connect(&server.url("/"), &[("x-twilio-signature", other.as_str())])
        .await
        .expect("admitted at the upgrade");
    phone.text(callgate_testkit::incoming_call("sneaky")).await;
    let (code, reason) = phone.closed().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("only a Twilio stream"), "{reason}");

    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"reason="bad_twilio_signature""#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"reason="missing_twilio_signature""#));
    server.shutdown().await;
}

#[tokio::test]
async fn without_keys_a_twilio_stream_needs_a_valid_signature() {
    let server = spawn_server(|c| {
        c.call_auth = CallAuth {
            twilio: Some(TwilioToken::new("tok-0123456789")),
            ..CallAuth::default()
        };
    })
    .await;
    // Another path: the upgrade cannot know it is Twilio; the start says so: closed 1008.
    let mut phone = server.phone("/").await;
    phone.text(connected()).await;
    phone.text(start("CAanon", json!({}))).await;
    let (code, reason) = phone.closed().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("X-Twilio-Signature"), "{reason}");
    // Other protocols need nothing.
    let mut phone = server.phone("/").await;
    phone.text(callgate_testkit::incoming_call("open")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    server.shutdown().await;
}
