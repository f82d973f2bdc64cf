//! PostgreSQL stopped mid-run: writes go on (into the local journal), and once the server is
//! back every record, event and transcript entry arrives, in order, exactly once. These tests
//! start a PostgreSQL of their own (`scripts/pg-test-server`, port
//! `CALLGATE_TEST_PG_OUTAGE_PORT`, default 25433, plus 1 and 5 for the other tests) so that stopping it disturbs no other test;
//! they run when `CALLGATE_TEST_PG` is set (a machine with PostgreSQL), and say SKIPPED
//! otherwise.

#![allow(clippy::unwrap_used, reason = "tests: a failure is the test failing")]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use callgate_store::{
    AnyStore, CallId, Counters, Ended, NewCall, NewEvent, NewTranscriptEntry, Page, PgStore, PgUrl,
    StoreHandle, UnixMillis,
};
use common::{Server, TempDir, off_runtime, pg_url};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The server for a test (each test its own port: the base plus `offset`), or `None`
/// (loudly) without PostgreSQL on this machine.
fn server(name: &str, offset: u16) -> Option<Server> {
    pg_url(name)?;
    let port = std::env::var("CALLGATE_TEST_PG_OUTAGE_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(25433);
    Some(Server::start(port + offset, false))
}

fn new_call(n: i64) -> NewCall {
    NewCall {
        id: CallId::new(),
        protocol: "inbound".into(),
        caller: "010".into(),
        callee: "020".into(),
        external_id: format!("ext-{n}"),
        call_config: None,
        phone_output_audio_format: "PCM_8000".into(),
        phone_input_audio_format: "PCM_8000".into(),
        started_at: UnixMillis(n),
        recording: false,
        route: Some("default".into()),
        agent: Some("echo".into()),
        key_name: None,
        node: None,
    }
}

fn events(from: u32, n: u32) -> Vec<NewEvent> {
    (from..from + n)
        .map(|k| NewEvent {
            at: UnixMillis(i64::from(k)),
            kind: format!("e{k}"),
            detail: "{}".into(),
        })
        .collect()
}

fn said(k: u64) -> NewTranscriptEntry {
    NewTranscriptEntry {
        speaker: "caller".into(),
        text: format!("words {k}"),
        start_ms: k,
        end_ms: k + 1,
        interrupted: false,
    }
}

fn ended(at: i64, reason: &str) -> Ended {
    Ended {
        at: UnixMillis(at),
        reason: reason.into(),
        hangup_by: "peer".into(),
        counters: Counters {
            bytes_in: 320,
            ..Counters::default()
        },
        dtmf: "1".into(),
        usage: None,
    }
}

async fn kinds(handle: &StoreHandle, id: &CallId) -> Vec<(u64, String)> {
    handle
        .events(id.clone(), Page::all())
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.kind))
        .collect()
}

fn expected(range: std::ops::Range<u32>) -> Vec<(u64, String)> {
    range.map(|k| (u64::from(k) + 1, format!("e{k}"))).collect()
}

#[tokio::test]
async fn records_written_while_postgres_is_stopped_arrive_once_when_it_is_back() {
    let Some(server) = server("records_written_while_postgres_is_stopped_arrive_once", 0) else {
        return;
    };
    let dir = TempDir::new();
    let url = PgUrl::parse(&server.url, None).unwrap();
    let (u, d) = (url.clone(), dir.0.clone());
    let store = off_runtime(move || PgStore::open(&u, &d).unwrap());
    let handle = StoreHandle::start(AnyStore::Postgres(store), TIMEOUT).unwrap();
    let stats = handle.stats();
    let mut backlog = stats.backlog();

    // Before: call A starts and logs a little.
    let a = new_call(1);
    let a_id = a.id.clone();
    handle.insert_call(a).await.unwrap();
    handle
        .append_events(a_id.clone(), events(0, 3))
        .await
        .unwrap();
    handle
        .append_transcript(a_id.clone(), vec![said(0)])
        .await
        .unwrap();

    // PostgreSQL stops (pg_ctl stop -m fast: connections cut). Every awaited write still
    // succeeds, once it is in the journal.
    server.run("pause");
    let b = new_call(2);
    let b_id = b.id.clone();
    handle.insert_call(b).await.unwrap();
    handle
        .append_events(a_id.clone(), events(3, 2))
        .await
        .unwrap();
    handle
        .append_events(b_id.clone(), events(0, 4))
        .await
        .unwrap();
    handle
        .try_append_events(b_id.clone(), events(4, 1))
        .unwrap();
    handle.mark_answered(b_id.clone(), UnixMillis(3));
    handle
        .append_transcript(a_id.clone(), vec![said(1), said(2)])
        .await
        .unwrap();
    handle
        .set_cdr(a_id.clone(), "{\"cdr\":1}".into())
        .await
        .unwrap();
    handle
        .end_call(a_id.clone(), ended(10, "peer_hangup"))
        .await
        .unwrap();
    assert!(handle.end_now(b_id.clone(), ended(11, "agent_hangup")));
    // A second end of A is ignored, journaled or not.
    handle
        .end_call(a_id.clone(), ended(12, "server_shutdown"))
        .await
        .unwrap();
    // Reads need the database.
    assert!(handle.call(a_id.clone()).await.is_err());
    // Deletions too: refused, not queued.
    assert!(handle.delete_call(a_id.clone()).await.is_err());
    assert!(
        *backlog.borrow_and_update() > 0,
        "the journal holds the batches"
    );
    assert!(stats.journaled_batches.load(Ordering::Relaxed) > 0);
    assert!(dir.0.join("store-journal.jsonl").metadata().unwrap().len() > 0);

    // PostgreSQL is back: the writer replays the journal on its own (its tick).
    server.run("resume");
    backlog.wait_for(|b| *b == 0).await.unwrap();
    // A write after the replay lands behind it.
    handle
        .append_events(b_id.clone(), events(5, 1))
        .await
        .unwrap();

    let ra = handle.call(a_id.clone()).await.unwrap().unwrap();
    assert_eq!(ra.end_reason.as_deref(), Some("peer_hangup"));
    assert_eq!(ra.ended_at, Some(UnixMillis(10)));
    assert_eq!(
        ra.cdr.map(|c| c.get().to_owned()).as_deref(),
        Some("{\"cdr\":1}")
    );
    assert_eq!(kinds(&handle, &a_id).await, expected(0..5));
    let transcript: Vec<(u64, String)> = handle
        .transcript(a_id.clone(), Page::all())
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.text))
        .collect();
    assert_eq!(
        transcript,
        vec![
            (1, "words 0".to_owned()),
            (2, "words 1".to_owned()),
            (3, "words 2".to_owned())
        ]
    );
    let rb = handle.call(b_id.clone()).await.unwrap().unwrap();
    assert_eq!(rb.answered_at, Some(UnixMillis(3)));
    assert_eq!(rb.end_reason.as_deref(), Some("agent_hangup"));
    assert_eq!(kinds(&handle, &b_id).await, expected(0..6));
    assert_eq!(stats.write_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        dir.0.join("store-journal.jsonl").metadata().unwrap().len(),
        0,
        "emptied once written"
    );
    handle.close().await;
}

#[tokio::test]
async fn a_journal_replayed_twice_writes_each_entry_once() {
    let Some(server) = server("a_journal_replayed_twice_writes_each_entry_once", 1) else {
        return;
    };
    let dir = TempDir::new();
    let url = PgUrl::parse(&server.url, None).unwrap();
    // A journal as a crash leaves it when the commit of its batches was cut off (or its
    // replay was, before the file was emptied): the same lines, written twice.
    let id = CallId::new();
    let line = format!(
        concat!(
            "[{{\"op\":\"insert\",\"call\":{{\"id\":\"{id}\",\"protocol\":\"inbound\",",
            "\"caller\":\"1\",\"callee\":\"2\",\"external_id\":\"x\",\"call_config\":null,",
            "\"phone_output_audio_format\":\"PCM_8000\",\"phone_input_audio_format\":\"PCM_8000\",",
            "\"started_at\":5,\"recording\":false,\"route\":null,\"agent\":null,\"key_name\":null}}}},",
            "{{\"op\":\"events\",\"id\":\"{id}\",\"first_seq\":1,\"events\":[",
            "{{\"at\":1,\"kind\":\"a\",\"detail\":\"{{}}\"}},{{\"at\":2,\"kind\":\"b\",\"detail\":\"{{}}\"}}]}},",
            "{{\"op\":\"end\",\"id\":\"{id}\",\"ended\":{{\"at\":9,\"reason\":\"peer_hangup\",",
            "\"hangup_by\":\"peer\",\"counters\":{{\"bytes_in\":1,\"bytes_out\":0,\"frames_in\":0,",
            "\"frames_out\":0}},\"dtmf\":\"\",\"usage\":null}}}}]\n"
        ),
        id = id
    );
    let journal = dir.0.join("store-journal.jsonl");
    for _ in 0..2 {
        let mut text = std::fs::read_to_string(&journal).unwrap_or_default();
        text.push_str(&line);
        std::fs::write(&journal, &text).unwrap();
        let (u, d) = (url.clone(), dir.0.clone());
        // Opening replays the journal, then empties it.
        let store = off_runtime(move || PgStore::open(&u, &d).unwrap());
        assert_eq!(store.journaled_batches(), 0);
        let handle = StoreHandle::start(AnyStore::Postgres(store), TIMEOUT).unwrap();
        let kinds: Vec<(u64, String)> = kinds(&handle, &id).await;
        assert_eq!(kinds, vec![(1, "a".to_owned()), (2, "b".to_owned())]);
        let r = handle.call(id.clone()).await.unwrap().unwrap();
        assert_eq!(r.ended_at, Some(UnixMillis(9)));
        handle.close().await;
        // Put the same batch back (twice in the file the second time round).
        std::fs::write(&journal, &line).unwrap();
    }
}

#[tokio::test]
async fn a_full_journal_refuses_batches_and_keeps_what_it_accepted() {
    let Some(server) = server("a_full_journal_refuses_batches", 5) else {
        return;
    };
    let dir = TempDir::new();
    let url = PgUrl::parse(&server.url, None).unwrap();
    let (u, d) = (url.clone(), dir.0.clone());
    let store = off_runtime(move || PgStore::open_with_journal_bound(&u, &d, 4000).unwrap());
    let handle = StoreHandle::start(AnyStore::Postgres(store), TIMEOUT).unwrap();
    let stats = handle.stats();
    let call = new_call(1);
    let id = call.id.clone();
    handle.insert_call(call).await.unwrap();

    server.run("pause");
    let big = |k: u32| {
        vec![NewEvent {
            at: UnixMillis(i64::from(k)),
            kind: format!("e{k}"),
            detail: format!("{{\"pad\":\"{}\"}}", "x".repeat(500)),
        }]
    };
    let mut accepted = 0u32;
    let refused = loop {
        match handle.append_events(id.clone(), big(accepted)).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100, "the journal never filled");
    };
    assert!(accepted >= 3, "{accepted} batches fitted");
    assert!(refused.to_string().contains("journal is full"), "{refused}");
    assert!(stats.write_failures.load(Ordering::Relaxed) >= 1);
    assert!(stats.backlog_bytes.load(Ordering::Relaxed) <= 4000);

    server.run("resume");
    stats.backlog().wait_for(|b| *b == 0).await.unwrap();
    assert_eq!(kinds(&handle, &id).await, expected(0..accepted));
    handle.close().await;
}
