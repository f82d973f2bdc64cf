//! Every bad input gets its close code and a reason naming the problem; mid-call mistakes are
//! recorded and the call goes on.

use std::time::Duration;

use callgate_testkit::{Received, TestServer, callbridge_start, incoming_call, spawn_server};
use serde_json::json;

async fn refused_with(server: &TestServer, path: &str, first: Option<Received>) -> (u16, String) {
    let mut phone = server.phone(path).await;
    match first {
        Some(Received::Text(t)) => phone.text(t).await,
        Some(Received::Binary(b)) => phone.binary(b).await,
        _ => {}
    }
    phone.closed().await
}

fn text(s: impl Into<String>) -> Option<Received> {
    Some(Received::Text(s.into()))
}

#[tokio::test]
async fn bad_first_messages_close_with_the_right_code_and_reason() {
    let server = spawn_server(|c| {
        c.handshake_timeout = Duration::from_millis(300);
        c.max_message_size = 4096;
    })
    .await;
    let cases: Vec<(&str, Option<Received>, u16, &str)> = vec![
        ("/", None, 1008, "no start message within 300 ms"),
        ("/", text("hello"), 1007, "invalid JSON"),
        ("/", text("[1,2]"), 1002, "message must be a JSON object"),
        (
            "/",
            text(r#"{"hello":"world"}"#),
            1008,
            "unrecognized first message",
        ),
        (
            "/",
            text(r#"{"event":"dtmf","digit":"1"}"#),
            1008,
            "unexpected event \"dtmf\" before incoming_call",
        ),
        (
            "/",
            Some(Received::Binary(vec![0u8; 320].into())),
            1008,
            "binary message before the start message",
        ),
        (
            "/",
            text(callbridge_start("1").replace(r#""cdrId":"1","#, "")),
            1002,
            "missing call_config.cdrId",
        ),
        (
            "/",
            text(callbridge_start("1").replace(r#""caller":"01012341234""#, r#""caller":true"#)),
            1002,
            "call_config.caller must be a string",
        ),
        (
            "/",
            text(callbridge_start("1").replace(
                r#""phone_output_audio_format":"PCM_8000""#,
                r#""phone_output_audio_format":"MP3_44100""#,
            )),
            1003,
            "unsupported audio_format.phone_output_audio_format: \"MP3_44100\"",
        ),
        (
            "/",
            text(r#"{"event":"incoming_call","callerId":"1","sessionId":"s"}"#),
            1002,
            "missing didNumber",
        ),
        (
            "/callbridge",
            text(incoming_call("s")),
            1008,
            "this endpoint speaks callbridge, got a inbound message",
        ),
        ("/inbound", text(r#"{"x":1}"#), 1002, "missing event"),
        (
            "/callbridge",
            text(r#"{"x":1}"#),
            1002,
            "missing call_config",
        ),
        (
            "/",
            text(format!(r#"{{"pad":"{}"}}"#, "x".repeat(5000))),
            1009,
            "message exceeds the maximum size of 4096 bytes",
        ),
    ];
    for (path, first, code, reason) in cases {
        let (got_code, got_reason) = refused_with(&server, path, first.clone()).await;
        assert_eq!(got_code, code, "close code for {first:?} on {path}");
        assert!(
            got_reason.starts_with(reason),
            "reason for {first:?}: {got_reason:?} should start with {reason:?}"
        );
    }
    // None of these became a call.
    assert!(server.calls().await.is_empty());
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"callgate_protocol_errors_total{kind="missing_field"} 4"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"callgate_protocol_errors_total{kind="handshake_timeout"} 1"#));
    server.shutdown().await;
}

#[tokio::test]
async fn mid_call_mistakes_are_recorded_and_the_call_goes_on() {
    let server = spawn_server(|c| c.max_message_size = 4096).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("mid")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    phone.text(r#"{"event":"dtmf","digit":"x"}"#).await;
    phone.text(r#"{"event":"mystery","value":42}"#).await;
    phone.text("not json at all").await;
    phone.text(r#"{"event":"dtmf","digit":"5"}"#).await;
    // The call still echoes.
    phone.binary(vec![1u8, 2, 3, 4]).await;
    assert_eq!(
        phone.recv().await,
        Received::Binary(vec![1u8, 2, 3, 4].into())
    );
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(callgate_testkit::cdr("mid")).await;
    assert_eq!(phone.closed().await.0, 1000);

    let record = server.ended_call("mid").await;
    assert_eq!(record["dtmf"], "5");
    assert_eq!(record["end_reason"], "peer_hangup");
    let id = record["id"].as_str().unwrap();
    let (_, events) = server.get(&format!("/api/calls/{id}/events")).await;
    let events = events["events"].as_array().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "protocol_error",
            "unknown_message",
            "protocol_error",
            "dtmf",
            "ended",
            "cdr_received"
        ]
    );
    assert_eq!(events[0]["detail"]["kind"], "invalid_digit");
    assert_eq!(events[0]["detail"]["message"], "invalid DTMF digit \"x\"");
    assert_eq!(
        events[1]["detail"]["text"],
        r#"{"event":"mystery","value":42}"#
    );
    assert_eq!(events[2]["detail"]["kind"], "invalid_json");
    assert_eq!(events[4]["detail"]["reason"], "peer_hangup");
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_message_mid_call_closes_with_1009_and_ends_the_record() {
    let server = spawn_server(|c| c.max_message_size = 4096).await;
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("big")).await;
    assert_eq!(phone.recv().await.json()["type"], "started");
    phone.binary(vec![0u8; 8192]).await;
    let (code, reason) = phone.closed().await;
    assert_eq!(code, 1009);
    assert_eq!(reason, "message exceeds the maximum size of 4096 bytes");
    let record = server.ended_call("big").await;
    assert_eq!(record["end_reason"], "protocol_error");
    server.shutdown().await;
}

#[tokio::test]
async fn callbridge_text_after_start_is_kept_and_not_fatal() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("ctl")).await;
    assert_eq!(phone.recv().await.json()["type"], "started");
    phone.text(r#"{"type":"transfer","target":"1234"}"#).await;
    phone.binary(vec![9u8; 320]).await;
    assert_eq!(phone.recv().await, Received::Binary(vec![9u8; 320].into()));
    phone.close(1000, "bye").await;
    let record = server.ended_call("ctl").await;
    let id = record["id"].as_str().unwrap();
    let (_, events) = server.get(&format!("/api/calls/{id}/events")).await;
    assert_eq!(events["events"][0]["kind"], "unknown_message");
    assert_eq!(
        events["events"][0]["detail"]["text"],
        r#"{"type":"transfer","target":"1234"}"#
    );
    server.shutdown().await;
}

#[tokio::test]
async fn calls_over_the_limit_are_refused_with_1013() {
    let server = spawn_server(|c| c.max_calls = 2).await;
    let mut a = server.phone("/").await;
    a.text(incoming_call("a")).await;
    a.recv().await;
    let mut b = server.phone("/").await;
    b.text(callbridge_start("b")).await;
    b.recv().await;
    let mut c = server.phone("/").await;
    let (code, reason) = c.closed().await;
    assert_eq!(code, 1013);
    assert_eq!(reason, "call limit reached (2 live calls)");
    // The live calls are undisturbed.
    a.binary(vec![5u8; 10]).await;
    assert_eq!(a.recv().await, Received::Binary(vec![5u8; 10].into()));
    // When one ends, a new call gets in.
    b.close(1000, "bye").await;
    server.ended_call("b").await;
    let mut d = server.phone("/").await;
    d.text(incoming_call("d")).await;
    assert_eq!(d.recv().await.json(), json!({"event": "answer"}));
    let metrics = server.metrics_text().await;
    assert!(metrics.contains(r#"callgate_connections_refused_total{reason="call_limit"} 1"#));
    server.shutdown().await;
}

#[tokio::test]
async fn an_abrupt_disconnect_ends_the_record() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("gone")).await;
    phone.recv().await;
    phone.binary(vec![1u8; 320]).await;
    assert!(matches!(phone.recv().await, Received::Binary(_)));
    phone.drop_connection();
    let record = server.ended_call("gone").await;
    assert_eq!(record["end_reason"], "peer_disconnected");
    assert_eq!(record["hangup_by"], "peer");
    assert_eq!(record["bytes_in"], 320);
    server.shutdown().await;
}
