//! Both protocols end to end over real sockets: answer, byte-exact echo of real-time audio,
//! DTMF, hangup, CDR, and the record through the admin API.

use std::time::Duration;

use callgate_testkit::audio::{frames, speechlike_pcm16};
use callgate_testkit::{Received, callbridge_start, cdr, incoming_call, spawn_server};
use serde_json::json;

const RECORD_FIELDS: [&str; 24] = [
    "id",
    "protocol",
    "caller",
    "callee",
    "external_id",
    "call_config",
    "audio_format",
    "started_at",
    "answered_at",
    "ended_at",
    "end_reason",
    "hangup_by",
    "bytes_in",
    "bytes_out",
    "frames_in",
    "frames_out",
    "dtmf",
    "cdr",
    "recording",
    "route",
    "agent",
    "usage",
    "key_name",
    "node",
];

fn assert_fields(record: &serde_json::Value) {
    let mut keys: Vec<&str> = record
        .as_object()
        .expect("record is an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut expected = RECORD_FIELDS.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected);
}

/// Sends `audio` in 20 ms frames at real-time pace, calling `between(i)` before frame i.
async fn paced(frames: &[bytes::Bytes], mut send: impl AsyncFnMut(usize, bytes::Bytes)) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for (i, f) in frames.iter().enumerate() {
        tick.tick().await;
        send(i, f.clone()).await;
    }
}

#[tokio::test]
async fn inbound_call_echoes_audio_records_dtmf_and_stores_the_cdr_verbatim() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("sess-echo")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));

    let audio = speechlike_pcm16(3000, 8000, 7);
    let sent = frames(&audio, 320);
    assert_eq!(sent.len(), 150);
    paced(&sent, async |i, f| {
        match i {
            30 => phone.text(r#"{"event":"dtmf","digit":"1"}"#).await,
            60 => phone.text(r#"{"event":"dtmf","digit":"*"}"#).await,
            90 => phone.text(r##"{"event":"dtmf","digit":"#"}"##).await,
            120 => phone.text(r#"{"event":"dtmf","digit":"D"}"#).await,
            _ => {}
        }
        phone.binary(f).await;
    })
    .await;

    let mut echoed = Vec::new();
    let mut echoed_frames = 0;
    while echoed.len() < audio.len() {
        match phone.recv().await {
            Received::Binary(b) => {
                echoed.extend_from_slice(&b);
                echoed_frames += 1;
            }
            other => panic!("expected echoed audio, got {other:?}"),
        }
    }
    assert!(echoed == audio, "echo is byte-exact and in order");
    assert_eq!(echoed_frames, 150);

    phone.text(r#"{"event":"hangup"}"#).await;
    let cdr_text = cdr("sess-echo");
    phone.text(cdr_text.clone()).await;
    assert_eq!(phone.closed().await, (1000, "call ended".to_owned()));

    let record = server.ended_call("sess-echo").await;
    assert_fields(&record);
    assert_eq!(record["protocol"], "inbound");
    assert_eq!(record["caller"], "01099998888");
    assert_eq!(record["callee"], "0212345678");
    assert_eq!(record["call_config"], serde_json::Value::Null);
    assert_eq!(record["dtmf"], "1*#D");
    assert_eq!(record["end_reason"], "peer_hangup");
    assert_eq!(record["hangup_by"], "peer");
    assert_eq!(record["bytes_in"], 48000);
    assert_eq!(record["bytes_out"], 48000);
    assert_eq!(record["frames_in"], 150);
    assert_eq!(record["frames_out"], 150);
    assert!(record["answered_at"].is_string());
    assert_eq!(
        record["audio_format"],
        json!({"phone_output_audio_format": "PCM_8000", "phone_input_audio_format": "PCM_8000"})
    );
    // Verbatim: the exact bytes as sent, number formatting ("4.50") included.
    let id = record["id"].as_str().unwrap();
    let raw = callgate_testkit::http::request(
        server.admin_addr,
        "GET",
        &format!("/api/calls/{id}"),
        None,
    )
    .await
    .1;
    assert!(raw.contains(&cdr_text), "CDR stored verbatim in {raw}");

    let (status, events) = server.get(&format!("/api/calls/{id}/events")).await;
    assert_eq!(status, 200);
    let digits: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "dtmf")
        .map(|e| e["detail"]["digit"].as_str().unwrap())
        .collect();
    assert_eq!(digits, ["1", "*", "#", "D"]);
    server.shutdown().await;
}

#[tokio::test]
async fn callbridge_call_answers_with_started_and_echoes_audio() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/any/operator/path").await;
    phone.text(callbridge_start("10014473")).await;
    let started = phone.recv().await.json();
    assert_eq!(
        started,
        json!({
            "type": "started",
            "call_config": {
                "siteId": "921004322052", "caller": "01012341234", "callee": "07012345678",
                "cdrId": "10014473", "callActionId": "1.758187055878E9",
                "ivrIp": "192.168.150.103:29034", "agentId": "agent-main", "agentType": "voice"
            },
            "audio_format": {
                "phone_output_audio_format": "PCM_8000",
                "phone_input_audio_format": "PCM_8000"
            }
        })
    );

    let audio = speechlike_pcm16(3000, 8000, 11);
    let sent = frames(&audio, 320);
    paced(&sent, async |_, f| phone.binary(f).await).await;
    let mut echoed = Vec::new();
    while echoed.len() < audio.len() {
        match phone.recv().await {
            Received::Binary(b) => echoed.extend_from_slice(&b),
            other => panic!("expected echoed audio, got {other:?}"),
        }
    }
    assert!(echoed == audio, "echo is byte-exact and in order");
    phone.close(1000, "caller hung up").await;
    assert_eq!(phone.closed().await.0, 1000);

    let record = server.ended_call("10014473").await;
    assert_fields(&record);
    assert_eq!(record["protocol"], "callbridge");
    assert_eq!(record["caller"], "01012341234");
    assert_eq!(record["callee"], "07012345678");
    assert_eq!(record["end_reason"], "peer_closed");
    assert_eq!(record["hangup_by"], "peer");
    assert_eq!(record["bytes_in"], 48000);
    assert_eq!(record["bytes_out"], 48000);
    assert_eq!(record["cdr"], serde_json::Value::Null);
    assert_eq!(record["call_config"]["callActionId"], "1.758187055878E9");
    assert_eq!(record["call_config"]["siteId"], "921004322052");
    server.shutdown().await;
}
