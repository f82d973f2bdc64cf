//! Item 7: per-call growth from the wire.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::support::*;

/// Sends `messages` on an answered call, then 10 frames of audio that must come back byte for
/// byte (the call goes on), then hangs up. Returns the call's record and its event log.
async fn flood(
    rig: &Rig,
    id: &str,
    messages: impl Iterator<Item = String>,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let server = &rig.server;
    let mut ws = place_call(server, ATTACKER, id).await.expect("answered");
    for text in messages {
        ws.send(Message::Text(text.into())).await.expect("sent");
    }
    for k in 0..10u8 {
        let frame = vec![k + 1; 320];
        ws.send(Message::Binary(frame.clone().into()))
            .await
            .expect("sent");
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(&b[..], &frame[..], "the call's own echo");
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("the call was dropped: {other:?}"),
            }
        }
    }
    assert_eq!(hang_up(&mut ws, id).await.0, 1000);
    let record_id = record_id(server.admin_addr, id).await;
    let record = ended_record(server.admin_addr, &record_id).await;
    let events = all_events(server.admin_addr, &record_id).await;
    assert_eq!(record["end_reason"], "peer_hangup", "{record}");
    let capped = events
        .iter()
        .filter(|e| e["kind"] == "record_capped")
        .count();
    assert_eq!(capped, 1, "record_capped is written once");
    // At most 10,000 entries (and how the call ended) and 4 MiB of text, each text at most
    // 4 KiB.
    assert!(events.len() <= 10_003, "{}", events.len());
    let texts = || events.iter().filter_map(|e| e["detail"]["text"].as_str());
    assert!(texts().map(str::len).sum::<usize>() <= 4 << 20);
    assert!(texts().all(|t| t.len() <= 4096));
    assert!(
        record["dtmf"].as_str().unwrap_or("").len() <= 1000,
        "{}",
        record["dtmf"]
    );
    (record, events)
}

/// Item 7: unknown messages were stored verbatim with no cap (100 x 1 MB grew the data dir by
/// 136 MB in 1.2 s), as were the `dtmf` string and the event list. Here one call sends 1 MB
/// unknown messages, thousands of 8 KiB ones and more keys than the record keeps (its bytes
/// cap), another over 10,000 small messages (its entries cap): each record stops at its caps
/// and says so once (`record_capped`), the data dir grows by about the caps and no more, and
/// both calls go on echoing their audio.
#[tokio::test]
async fn what_one_call_stores_is_capped_and_the_call_goes_on() {
    let strength = Strength::get();
    let huge = strength.pick(20, 100);
    let medium = strength.pick(1_200, 2_000);
    let keys = strength.pick(1_100, 2_000);
    let small = strength.pick(10_500, 50_000);
    let mut rig = Rig::start("item 7: per-call growth", |_| {}).await;
    rig.bound_rss(strength.pick(96, 128) << 20);
    let canary = rig.canary().await;
    let data_before = dir_bytes(&rig.server.config.data_dir);
    let megabyte = format!(r#"{{"event":"noise","pad":"{}"}}"#, "m".repeat(1_000_000));
    let eight_k = format!(r#"{{"event":"noise","pad":"{}"}}"#, "k".repeat(8 * 1024));
    let phase = rig.phase();

    let began = Instant::now();
    let digits = (0..keys).map(|k| format!(r#"{{"event":"dtmf","digit":"{}"}}"#, k % 10));
    let (big, big_events) = flood(
        &rig,
        "grower",
        std::iter::repeat_n(megabyte.clone(), huge)
            .chain(std::iter::repeat_n(eight_k.clone(), medium))
            .chain(digits),
    )
    .await;
    let big_took = began.elapsed();
    let grew_big = dir_bytes(&rig.server.config.data_dir).saturating_sub(data_before);
    let (_, small_events) = flood(
        &rig,
        "chatter",
        (0..small).map(|k| format!(r#"{{"event":"noise","k":{k}}}"#)),
    )
    .await;
    let grew = dir_bytes(&rig.server.config.data_dir).saturating_sub(data_before);
    let sent_mb = (huge * megabyte.len() + medium * eight_k.len()) as f64 / 1e6;
    let metrics = rig.server.metrics_text().await;
    let dropped = metric(&metrics, "callgate_record_entries_dropped_total ").unwrap_or(0.0);
    rig.figure("1 MB messages", huge);
    rig.figure("8 KiB messages", medium);
    rig.figure("keys", keys);
    rig.figure("small messages (second call)", small);
    rig.figure("first call: sent (MB)", sent_mb);
    rig.figure("first call: flood, echo, hangup took (ms)", ms(big_took));
    rig.figure("first call: data dir growth (MiB)", mib(grew_big));
    rig.figure("first call: events stored", big_events.len());
    rig.figure(
        "first call: keys kept",
        big["dtmf"].as_str().unwrap_or("").len(),
    );
    rig.figure("second call: events stored", small_events.len());
    rig.figure("both calls: data dir growth (MiB)", mib(grew));
    rig.figure("entries counted, not stored", dropped);
    rig.figure("memory growth (MiB)", mib(phase.grew()));
    assert!(dropped > 0.0);
    // The data dir holds about the caps (4 MiB of text, 10,000 entries a call), not what was
    // sent.
    assert!(grew < 24 << 20, "the data dir grew by {} MiB", grew >> 20);
    rig.finish(canary).await;
}
