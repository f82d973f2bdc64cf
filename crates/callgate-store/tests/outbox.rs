//! Events and the webhook outbox: the writer announces what a committed batch wrote (and
//! nothing it refused), adds the rows each endpoint subscribes to in the same transaction,
//! and the outbox serves one head per endpoint, in order, with failed rows out of the way.

#![allow(clippy::unwrap_used, reason = "tests: a failure is the test failing")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callgate_store::notice::{Kind, Notice, Tap};
use callgate_store::outbox::{Outbox, Subscription};
use callgate_store::writer::Events;
use callgate_store::{
    CallId, Counters, Ended, NewCall, NewEvent, NewTranscriptEntry, SqliteStore, StoreHandle,
    UnixMillis,
};
use common::TempDir;

#[derive(Default)]
struct Collect(Mutex<Vec<Notice>>);

impl Tap for Collect {
    fn publish(&self, notices: &[Notice]) {
        self.0.lock().unwrap().extend_from_slice(notices);
    }
}

fn call(external: &str) -> NewCall {
    NewCall {
        id: CallId::new(),
        protocol: "inbound".into(),
        caller: "01012345678".into(),
        callee: "0212345678".into(),
        external_id: external.into(),
        call_config: None,
        phone_output_audio_format: "PCM_8000".into(),
        phone_input_audio_format: "PCM_8000".into(),
        started_at: UnixMillis(1_000_000),
        recording: false,
        route: Some("default".into()),
        agent: Some("echo".into()),
        key_name: None,
        node: Some("n1".into()),
    }
}

#[tokio::test]
async fn committed_writes_are_announced_and_enqueued_for_the_endpoints_that_take_them() {
    let dir = TempDir::new();
    let store = SqliteStore::open(&dir.0).unwrap();
    let tap = Arc::new(Collect::default());
    let handle = StoreHandle::start_with_events(
        store,
        Duration::from_secs(5),
        Events {
            tap: Some(tap.clone()),
            node: "n1".into(),
            webhooks: vec![
                Subscription {
                    endpoint: "http://all".into(),
                    kinds: None,
                },
                Subscription {
                    endpoint: "http://ends".into(),
                    kinds: Some(vec![Kind::CallEnded]),
                },
            ],
        },
    )
    .unwrap();
    let c = call("sess-1");
    let id = c.id.clone();
    handle.insert_call(c).await.unwrap();
    let dtmf = NewEvent {
        at: UnixMillis(1_000_500),
        kind: "dtmf".into(),
        detail: r#"{"digit":"5","source":"protocol"}"#.into(),
    };
    let other = NewEvent {
        at: UnixMillis(1_000_600),
        kind: "speech_started".into(),
        detail: r#"{"at_ms":600}"#.into(),
    };
    handle
        .append_events(id.clone(), vec![dtmf, other])
        .await
        .unwrap();
    let turn = NewTranscriptEntry {
        speaker: "agent".into(),
        text: "hello".into(),
        start_ms: 100,
        end_ms: 900,
        interrupted: false,
    };
    handle
        .append_transcript(id.clone(), vec![turn])
        .await
        .unwrap();
    // Refused by the store (no such call): no event.
    let ghost = CallId::new();
    let refused = NewEvent {
        at: UnixMillis(1_000_700),
        kind: "dtmf".into(),
        detail: r#"{"digit":"9"}"#.into(),
    };
    assert!(handle.append_events(ghost, vec![refused]).await.is_err());
    let ended = Ended {
        at: UnixMillis(1_003_000),
        reason: "peer_hangup".into(),
        hangup_by: "peer".into(),
        counters: Counters::default(),
        dtmf: "5".into(),
        usage: None,
    };
    handle.end_call(id.clone(), ended.clone()).await.unwrap();
    // A second end is no event.
    handle.end_call(id.clone(), ended).await.unwrap();
    handle.close().await;

    let got = tap.0.lock().unwrap().clone();
    let kinds: Vec<Kind> = got.iter().map(|n| n.kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::CallStarted,
            Kind::CallDtmf,
            Kind::CallTranscript,
            Kind::CallEnded
        ]
    );
    for n in &got {
        assert_eq!(n.data["call_id"], id.as_str());
        assert_eq!(n.data["external_id"], "sess-1");
    }
    assert_eq!(got[1].data["digit"], "5");
    assert_eq!(got[2].data["text"], "hello");
    assert_eq!(
        got[2].at,
        UnixMillis(1_000_900),
        "a turn is dated when it ended"
    );
    assert_eq!(got[3].data["duration_ms"], 3000);

    let mut outbox = Outbox::sqlite(&dir.0).unwrap();
    let all = outbox.list("n1", 100).unwrap();
    let for_all: Vec<&str> = all
        .iter()
        .filter(|d| d.endpoint == "http://all")
        .map(|d| d.event_id.as_str())
        .collect();
    let ids: Vec<&str> = got.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(for_all, ids, "every event, in order");
    let ends: Vec<&str> = all
        .iter()
        .filter(|d| d.endpoint == "http://ends")
        .map(|d| d.event_type.as_str())
        .collect();
    assert_eq!(ends, ["call.ended"]);
    assert_eq!(outbox.pending("n1").unwrap(), 5);
    assert_eq!(
        outbox.pending("n2").unwrap(),
        0,
        "rows are the writing node's"
    );
    let body: serde_json::Value = serde_json::from_str(&all[0].body).unwrap();
    assert_eq!(body["type"], "call.started");
    assert_eq!(body["data"]["caller"], "01012345678");

    // One head per endpoint; a failed row stays listed but no longer holds up the queue.
    let head = outbox.head("n1", "http://all").unwrap().unwrap();
    assert_eq!(head.event_id, ids[0]);
    assert_eq!(head.attempts, 0);
    outbox
        .attempt_failed(head.seq, "503", Some(UnixMillis(5)))
        .unwrap();
    let again = outbox.head("n1", "http://all").unwrap().unwrap();
    assert_eq!((again.seq, again.attempts), (head.seq, 1));
    assert_eq!(again.last_status.as_deref(), Some("503"));
    assert_eq!(again.next_attempt, Some(UnixMillis(5)));
    outbox.attempt_failed(head.seq, "timeout", None).unwrap();
    let next = outbox.head("n1", "http://all").unwrap().unwrap();
    assert_eq!(next.event_id, ids[1]);
    outbox.delivered(next.seq).unwrap();
    assert_eq!(
        outbox.head("n1", "http://all").unwrap().unwrap().event_id,
        ids[2]
    );
    let listed = outbox.list("n1", 100).unwrap();
    let failed: Vec<&str> = listed
        .iter()
        .filter(|d| d.state == "failed")
        .map(|d| d.event_id.as_str())
        .collect();
    assert_eq!(failed, [ids[0]]);
    assert_eq!(outbox.pending("n1").unwrap(), 3);
}
