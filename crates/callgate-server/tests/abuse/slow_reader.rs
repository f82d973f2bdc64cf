//! Item 8: a phone that stops reading.

use std::time::{Duration, Instant};

use callgate_server::Tasks;
use callgate_testkit::callbridge_start;
use callgate_testkit::phone::WAIT;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::support::*;

/// Item 8: a phone that stops reading used to be dropped only once the kernel's auto-sized
/// send buffer (megabytes) was full and one write then took `write_timeout`: 31 s at
/// PCM_48000 with a 2 s `write_timeout`. Now the send buffer is bounded and the phone's
/// backlog is measured (pings it answers once it has read everything before them), so it is
/// dropped within about `write_timeout` at any format.
#[tokio::test]
async fn a_phone_that_stops_reading_is_dropped_within_write_timeout_at_pcm_48000() {
    stops_reading("PCM_48000", 1920).await;
}

/// The same at PCM_8000, where the old kernel buffers held about 175 s of audio.
#[tokio::test]
async fn a_phone_that_stops_reading_is_dropped_within_write_timeout_at_pcm_8000() {
    stops_reading("PCM_8000", 320).await;
}

async fn stops_reading(format: &str, frame_bytes: usize) {
    let write_timeout = Duration::from_secs(2);
    let mut rig = Rig::start(
        &format!("item 8: a phone that stops reading, {format}"),
        move |c| c.write_timeout = write_timeout,
    )
    .await;
    let canary = rig.canary().await;
    let server = &rig.server;

    let ws = ws_from(server, ATTACKER, "/").await.expect("upgraded");
    let (mut tx, mut rx) = ws.split();
    let start = callbridge_start("deaf").replace("PCM_8000", format);
    tx.send(Message::Text(start.into()))
        .await
        .expect("start sent");
    loop {
        match tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    // Real-time audio (20 ms frames), echoed at the same rate; the sender stops when the
    // connection is gone (or after 60 s).
    let sender = Tasks::new().spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..3000 {
            tick.tick().await;
            if tx
                .send(Message::Binary(vec![7u8; frame_bytes].into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // It reads a second of echoes (answering pings on the way), then stops reading.
    let mut echoes = 0;
    while echoes < 50 {
        match tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Binary(_))) => echoes += 1,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let stopped = Instant::now();
    let mut record = None;
    while stopped.elapsed() < Duration::from_secs(60) {
        let found = server
            .calls()
            .await
            .into_iter()
            .find(|c| c["external_id"] == "deaf" && !c["ended_at"].is_null());
        if found.is_some() {
            record = found;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped_after = stopped.elapsed();
    rig.figure(
        "write_timeout 2 s: a phone that stopped reading was dropped after (ms)",
        ms(dropped_after),
    );
    rig.figure(
        "end reason",
        record
            .as_ref()
            .and_then(|r| r["end_reason"].as_str())
            .unwrap_or("not ended")
            .to_owned(),
    );
    let record = record.expect("the deaf phone's call ended within 60 s");
    assert_eq!(record["end_reason"], "send_timeout");
    assert!(dropped_after < write_timeout * 3, "{dropped_after:?}");
    // Seen by the backlog measurement (an unanswered ping), not by a write that blocked.
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"callgate_send_timeouts_total{detected_by="ping"} 1"#),
        "{metrics}"
    );
    drop(rx);
    let _ = sender.await;
    rig.finish(canary).await;
}
