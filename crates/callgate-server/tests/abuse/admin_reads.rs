//! Item 6: unbounded admin reads.

use std::time::{Duration, Instant};

use callgate_testkit::callbridge_start;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::support::*;

/// The largest `GET /api/calls` reply: 8 MiB (`admin::MAX_LIST_BYTES`), exceeded only by a
/// page's first record, which is always sent.
const MAX_LIST_BYTES: usize = 8 << 20;

/// Item 6: `GET /api/calls/{id}/events` had no paging and built the whole reply on the async
/// workers: four requests on a call with 50,000 events took 303 MB and stalled every live call
/// ~200 ms; `GET /api/calls?limit=1000` over records with 1 MB fields made 76 MB replies. Here
/// a call sends that many events (10,000 are stored), records with 1 MB fields fill a page
/// many times over, and four readers page through all of it at once, again and again, while
/// the canary runs: every reply is bounded, the canary is not held up, memory stays bounded.
#[tokio::test]
async fn admin_reads_are_bounded_pages_that_hold_up_no_call() {
    let strength = Strength::get();
    let events_sent = strength.pick(3_000, 50_000);
    let big_records = strength.pick(10, 80);
    let readers = 4;
    let rounds = strength.pick(2, 10);
    let mut rig = Rig::start("item 6: unbounded admin reads", |_| {}).await;
    rig.bound_rss(192 << 20);
    let canary = rig.canary().await;
    let server = &rig.server;

    // A call with many events (unknown messages of ~300 bytes: 10,000 of them fill 3 MB).
    let mut chatty = place_call(server, ATTACKER, "chatty")
        .await
        .expect("answered");
    let pad = "p".repeat(256);
    for k in 0..events_sent {
        let text = format!(r#"{{"event":"noise","k":{k},"pad":"{pad}"}}"#);
        chatty.send(Message::Text(text.into())).await.unwrap();
    }
    assert_eq!(hang_up(&mut chatty, "chatty").await.0, 1000);
    let chatty_id = record_id(server.admin_addr, "chatty").await;
    // A call whose log is as large as one may be: 4 KiB kept of each message, 4 MiB in all
    // (about one page of 1,000 entries).
    let mut wordy = place_call(server, ATTACKER, "wordy")
        .await
        .expect("answered");
    let long = "w".repeat(5000);
    for k in 0..1100 {
        let text = format!(r#"{{"event":"noise","k":{k},"pad":"{long}"}}"#);
        wordy.send(Message::Text(text.into())).await.unwrap();
    }
    assert_eq!(hang_up(&mut wordy, "wordy").await.0, 1000);
    let wordy_id = record_id(server.admin_addr, "wordy").await;
    // Records with a 1 MB field each (siteId; the start message stays under 1 MiB).
    let site = "9".repeat(1_000_000);
    for k in 0..big_records {
        let mut start: serde_json::Value =
            serde_json::from_str(&callbridge_start(&format!("big-{k}"))).unwrap();
        start["call_config"]["siteId"] = json!(site);
        let mut ws = ws_from(server, ATTACKER, "/").await.expect("upgraded");
        ws.send(Message::Text(start.to_string().into()))
            .await
            .unwrap();
        ws.close(None).await.unwrap();
        let _ = close_of(&mut ws).await;
    }
    drop(site);
    let stored = all_events(server.admin_addr, &chatty_id).await;

    // Four readers at once, each paging through the log and reading the list's first page.
    let phase = rig.phase();
    let began = Instant::now();
    let admin = server.admin_addr;
    let logs = [chatty_id.as_str(), wordy_id.as_str()];
    let reader = |_| async move {
        let mut largest_page = 0usize;
        let mut largest_list = 0usize;
        let mut slowest = Duration::ZERO;
        for _ in 0..rounds {
            for id in logs {
                let mut after = 0u64;
                loop {
                    let sent = Instant::now();
                    let page =
                        admin_get(admin, &format!("/api/calls/{id}/events?after={after}")).await;
                    slowest = slowest.max(sent.elapsed());
                    assert_eq!(page.status, 200);
                    largest_page = largest_page.max(page.body.len());
                    let page = page.json().expect("a page parses");
                    assert!(page["events"].as_array().unwrap().len() <= 1000);
                    match page["next"].as_u64() {
                        Some(next) => after = next,
                        None => break,
                    }
                }
            }
            let sent = Instant::now();
            let list = admin_get(admin, "/api/calls?limit=1000").await;
            slowest = slowest.max(sent.elapsed());
            assert_eq!(list.status, 200);
            largest_list = largest_list.max(list.body.len());
            // Valid JSON within serde_json's depth limit, without building it in memory.
            serde_json::from_slice::<serde::de::IgnoredAny>(&list.body).expect("the list parses");
            let transcript = admin_get(admin, &format!("/api/calls/{}/transcript", logs[0])).await;
            assert_eq!(transcript.status, 200);
        }
        (largest_page, largest_list, slowest)
    };
    let results = futures_util::future::join_all((0..readers).map(reader)).await;
    let took = began.elapsed();
    let largest_page = results.iter().map(|r| r.0).max().unwrap_or(0);
    let largest_list = results.iter().map(|r| r.1).max().unwrap_or(0);
    let slowest = results.iter().map(|r| r.2).max().unwrap_or_default();
    let grew = phase.grew();
    let first_page = admin_get(admin, "/api/calls?limit=1000")
        .await
        .json()
        .unwrap();
    let on_first_page = first_page["calls"].as_array().unwrap().len();
    let capped = stored.iter().any(|e| e["kind"] == "record_capped");
    rig.figure("events sent", events_sent);
    rig.figure("events stored", stored.len());
    rig.figure("records of 1 MB", big_records);
    rig.figure("readers", readers);
    rig.figure("rounds per reader", rounds);
    rig.figure("largest events page (MiB)", mib(largest_page as u64));
    rig.figure("largest /api/calls reply (MiB)", mib(largest_list as u64));
    rig.figure(
        "records on the first page of /api/calls?limit=1000",
        on_first_page,
    );
    rig.figure("slowest request (ms)", ms(slowest));
    rig.figure("reading took (ms)", ms(took));
    rig.figure("memory growth while reading (MiB)", mib(grew));
    // Stored: at most 10,000 events (plus how the call ended), and the log says it was capped.
    rig.expect(
        stored.len() <= 10_003,
        format!("{} events stored", stored.len()),
    );
    rig.expect(
        capped == (events_sent > 10_000),
        format!("record_capped: {capped}"),
    );
    rig.expect(
        largest_list <= MAX_LIST_BYTES + (1 << 20),
        format!("a list reply of {largest_list} bytes"),
    );
    rig.expect(
        on_first_page < big_records,
        format!("the first page holds {on_first_page} records: not cut"),
    );
    rig.finish(canary).await;
}
