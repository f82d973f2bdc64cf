//! Item 12: deep JSON in what is stored.

use callgate_testkit::{callbridge_start, incoming_call};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::support::*;

/// Nesting the issue tried.
const DEPTH: usize = 100_000;

/// `[[[...1...]]]`, `depth` arrays deep.
fn deep(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Sends a text message and waits for nothing (the server keeps or refuses it).
async fn text(ws: &mut Ws, text: String) {
    ws.send(Message::Text(text.into())).await.expect("sent");
}

/// One frame of audio that must come back unchanged: the call is still a call.
async fn still_echoes(ws: &mut Ws) {
    let frame = vec![7u8; 320];
    ws.send(Message::Binary(frame.clone().into()))
        .await
        .expect("sent");
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(&b[..], &frame[..]);
                return;
            }
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("the call was dropped: {other:?}"),
        }
    }
}

/// Item 12: a CDR nested 100,000 deep was stored and served verbatim, after which `GET
/// /api/calls` could not be parsed by common JSON readers (depth limits of 128). Here calls
/// send 100,000-deep JSON everywhere the wire lets them (the CDR, an unknown message, a DTMF
/// message's extra field, a start message's extra field, the CallBridge `call_config`): the
/// calls go on, the CDR is kept as a JSON string with a `cdr_invalid` event, and every list,
/// record and event log parses with serde_json's default depth limit (128).
#[tokio::test]
async fn deep_json_is_kept_as_text_and_every_reply_parses() {
    let calls = Strength::get().pick(3, 50);
    let mut rig = Rig::start("item 12: deep JSON in stored fields", |_| {}).await;
    let canary = rig.canary().await;
    let server = &rig.server;
    let admin = server.admin_addr;
    let nested = deep(DEPTH);
    let mut ids = Vec::new();
    for k in 0..calls {
        // Inbound: a start message, an unknown message and a key with a deep field, a deep
        // bare array (not an object: a protocol error), then a deep CDR.
        let session = format!("deep-{k}");
        let start = incoming_call(&session).replacen(
            "\"callerId\"",
            &format!("\"extra\":{nested},\"callerId\""),
            1,
        );
        let mut ws = ws_from(server, ATTACKER, "/").await.expect("upgraded");
        text(&mut ws, start).await;
        text(&mut ws, format!(r#"{{"event":"noise","x":{nested}}}"#)).await;
        text(
            &mut ws,
            format!(r#"{{"event":"dtmf","digit":"5","x":{nested}}}"#),
        )
        .await;
        text(&mut ws, nested.clone()).await;
        still_echoes(&mut ws).await;
        text(&mut ws, r#"{"event":"hangup"}"#.to_owned()).await;
        let cdr = format!(r#"{{"event":"cdr","sessionId":"{session}","x":{nested}}}"#);
        text(&mut ws, cdr.clone()).await;
        assert_eq!(close_of(&mut ws).await.0, 1000);
        let id = record_id(admin, &session).await;
        let record = ended_record(admin, &id).await;
        assert_eq!(
            record["cdr"].as_str(),
            Some(cdr.as_str()),
            "kept as a string"
        );
        assert_eq!(record["dtmf"], "5");
        let events = all_events(admin, &id).await;
        assert!(
            events.iter().any(|e| e["kind"] == "cdr_invalid"
                && e["detail"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("100001 levels"))),
            "{events:?}"
        );
        ids.push(id);
    }
    // CallBridge: a deep field in call_config (the start message is answered; the record
    // keeps the documented fields), and deep text mid-call.
    let start = callbridge_start("deep-cb").replacen(
        "\"siteId\"",
        &format!("\"extra\":{nested},\"siteId\""),
        1,
    );
    let mut ws = ws_from(server, ATTACKER, "/").await.expect("upgraded");
    text(&mut ws, start).await;
    text(&mut ws, format!(r#"{{"type":"noise","x":{nested}}}"#)).await;
    still_echoes(&mut ws).await;
    ws.close(None).await.unwrap();
    let _ = close_of(&mut ws).await;
    let id = record_id(admin, "deep-cb").await;
    let record = ended_record(admin, &id).await;
    all_events(admin, &id).await;
    ids.push(id);

    // Every record, alone and in the list (the rig checks every page of it), parses.
    for id in &ids {
        let record = admin_get(admin, &format!("/api/calls/{id}")).await;
        record.json().expect("a record parses");
    }
    let config = &record["call_config"];
    rig.figure("calls", calls + 1);
    rig.figure("nesting sent", DEPTH);
    rig.figure(
        "the CallBridge record's call_config (bytes)",
        config.to_string().len(),
    );
    rig.expect(
        config["cdrId"] == "deep-cb" && config.get("extra").is_none(),
        format!("the record's call_config: {config:.200}"),
    );
    rig.finish(canary).await;
}
