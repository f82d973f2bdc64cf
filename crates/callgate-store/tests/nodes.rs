//! The node roster: registration, heartbeats, the dead-node sweep (exactly one closer, no
//! resurrection). SQLite always; PostgreSQL with `CALLGATE_TEST_PG` (see `common`).

#![allow(clippy::unwrap_used, reason = "tests: a failure is the test failing")]

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use callgate_store::{
    Beat, CallId, Ended, NewCall, NodeInfo, NodeState, Page, Reader, Registry, SqliteStore, Store,
    UnixMillis,
};
use common::{PgSchema, TempDir, off_runtime, pg_url};

const TIMEOUT: Duration = Duration::from_secs(10);

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        admin_url: format!("http://{id}:4144"),
        version: "0.1.0".into(),
        incarnation: uuid::Uuid::now_v7().to_string(),
    }
}

fn call(node: &str, t: i64) -> NewCall {
    NewCall {
        id: CallId::new(),
        protocol: "inbound".into(),
        caller: "1".into(),
        callee: "2".into(),
        external_id: "x".into(),
        call_config: None,
        phone_output_audio_format: "PCM_8000".into(),
        phone_input_audio_format: "PCM_8000".into(),
        started_at: UnixMillis(t),
        recording: false,
        route: None,
        agent: None,
        key_name: None,
        node: Some(node.into()),
    }
}

fn ended(at: i64) -> Ended {
    Ended {
        at: UnixMillis(at),
        reason: "peer_hangup".into(),
        hangup_by: "peer".into(),
        counters: Default::default(),
        dtmf: String::new(),
        usage: None,
    }
}

#[test]
fn sqlite_holds_this_node_only_and_a_clean_exit_removes_it() {
    let dir = TempDir::new();
    let _store = SqliteStore::open(&dir.0).unwrap();
    let mut roster = Registry::sqlite(&dir.0).unwrap();
    let old = node("old-name");
    assert_eq!(
        roster
            .beat(&old, NodeState::Serving, 0, UnixMillis(1_000))
            .unwrap(),
        Beat::Registered
    );
    let me = node("a");
    assert_eq!(
        roster
            .beat(&me, NodeState::Serving, 3, UnixMillis(2_000))
            .unwrap(),
        Beat::Registered
    );
    assert_eq!(
        roster
            .beat(&me, NodeState::Draining, 2, UnixMillis(4_000))
            .unwrap(),
        Beat::Refreshed
    );
    let nodes = roster.nodes(TIMEOUT, UnixMillis(5_000)).unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].id, "a");
    assert_eq!(nodes[0].admin_url, "http://a:4144");
    assert_eq!(nodes[0].state, NodeState::Draining);
    assert_eq!(nodes[0].live_calls, 2);
    assert_eq!(nodes[0].started_at, UnixMillis(2_000));
    assert_eq!(nodes[0].heartbeat_at, UnixMillis(4_000));
    // Seen from later than the timeout, a silent node is dead.
    let late = roster.nodes(TIMEOUT, UnixMillis(14_001)).unwrap();
    assert_eq!(late[0].state, NodeState::Dead);
    assert!(
        roster
            .sweep("a", TIMEOUT, UnixMillis(99_000))
            .unwrap()
            .is_empty()
    );
    roster.leave(&me).unwrap();
    assert!(roster.nodes(TIMEOUT, UnixMillis(5_000)).unwrap().is_empty());
}

#[test]
fn postgres_a_dead_node_is_closed_once_by_one_survivor_and_stays_closed() {
    let Some(url) = pg_url("postgres_a_dead_node_is_closed_once_by_one_survivor_and_stays_closed")
    else {
        return;
    };
    let schema = PgSchema::new(&url);
    let mut store = schema.open();
    let url = schema.url.clone();
    off_runtime(move || {
        let (a, b, c) = (node("a"), node("b"), node("c"));
        let roster = || Registry::postgres(url.clone());
        let (mut ra, mut rb, mut rc) = (roster(), roster(), roster());
        for (r, n) in [(&mut ra, &a), (&mut rb, &b), (&mut rc, &c)] {
            assert_eq!(
                r.beat(n, NodeState::Serving, 1, UnixMillis(1_000)).unwrap(),
                Beat::Registered
            );
        }
        // a holds two live calls and one ended; b holds one live call.
        let a_live = [call("a", 500), call("a", 600)];
        let a_done = call("a", 700);
        let b_live = call("b", 800);
        for c in a_live.iter().chain([&a_done, &b_live]) {
            store.insert_call(c).unwrap();
        }
        store.end_call(&a_done.id, &ended(900)).unwrap();
        store
            .append_events(
                &a_live[0].id,
                &[callgate_store::NewEvent {
                    at: UnixMillis(950),
                    kind: "dtmf".into(),
                    detail: "{}".into(),
                }],
            )
            .unwrap();

        // Within the timeout nobody is dead.
        assert!(
            rb.sweep("b", TIMEOUT, UnixMillis(10_999))
                .unwrap()
                .is_empty()
        );
        // b and c keep beating; a falls silent.
        for (r, n) in [(&mut rb, &b), (&mut rc, &c)] {
            assert_eq!(
                r.beat(n, NodeState::Serving, 1, UnixMillis(12_000))
                    .unwrap(),
                Beat::Refreshed
            );
        }
        // b and c sweep at the same moment: exactly one of them closes a's calls.
        let barrier = Arc::new(Barrier::new(2));
        let sweep = |mut r: Registry, me: &'static str, barrier: Arc<Barrier>| {
            std::thread::spawn(move || {
                barrier.wait();
                let lost = r.sweep(me, TIMEOUT, UnixMillis(12_000)).unwrap();
                (r, me, lost)
            })
        };
        let tb = sweep(rb, "b", barrier.clone());
        let tc = sweep(rc, "c", barrier);
        let (rb, _, lost_b) = tb.join().unwrap();
        let (_rc, _, lost_c) = tc.join().unwrap();
        let all: Vec<_> = lost_b.iter().chain(&lost_c).collect();
        assert_eq!(all.len(), 1, "one sweeper declares a dead: {all:?}");
        assert_eq!(all[0].node, "a");
        assert_eq!(all[0].closed, 2);
        let closer = if lost_b.is_empty() { "c" } else { "b" };

        let mut reader = store.open_reader().unwrap();
        for c in &a_live {
            let r = reader.call(&c.id).unwrap().unwrap();
            assert_eq!(r.end_reason.as_deref(), Some("interrupted"));
            assert_eq!(r.hangup_by.as_deref(), Some("server"));
            assert_eq!(r.ended_at, Some(UnixMillis(12_000)));
            assert_eq!(r.node.as_deref(), Some("a"));
            let events = reader.events(&c.id, Page::all()).unwrap().unwrap();
            let lost: Vec<_> = events.iter().filter(|e| e.kind == "node_lost").collect();
            assert_eq!(lost.len(), 1, "{events:?}");
            assert_eq!(
                lost[0].detail,
                serde_json::json!({"node": "a", "closed_by": closer})
            );
        }
        // The first call's earlier event is still first; node_lost comes after it.
        let first = reader.events(&a_live[0].id, Page::all()).unwrap().unwrap();
        assert_eq!(
            first
                .iter()
                .map(|e| (e.seq, e.kind.as_str()))
                .collect::<Vec<_>>(),
            [(1, "dtmf"), (2, "node_lost")]
        );
        let done = reader.call(&a_done.id).unwrap().unwrap();
        assert_eq!(done.end_reason.as_deref(), Some("peer_hangup"));
        let b_rec = reader.call(&b_live.id).unwrap().unwrap();
        assert_eq!(b_rec.ended_at, None, "the survivor's own call is untouched");

        // The roster says a is dead; a sweep later finds nothing more.
        let mut rb = rb;
        let nodes = rb.nodes(TIMEOUT, UnixMillis(12_000)).unwrap();
        let states: Vec<_> = nodes.iter().map(|n| (n.id.as_str(), n.state)).collect();
        assert_eq!(
            states,
            [
                ("a", NodeState::Dead),
                ("b", NodeState::Serving),
                ("c", NodeState::Serving)
            ]
        );
        // Later, c has fallen silent too: it is declared dead (no calls to close), and a is
        // not declared again.
        let later = rb.sweep("b", TIMEOUT, UnixMillis(30_000)).unwrap();
        assert_eq!(
            later,
            [callgate_store::LostNode {
                node: "c".into(),
                closed: 0
            }]
        );

        // a comes back (a healed partition): it cannot refresh its dead row, re-registers,
        // and its calls' late ends do not reopen or re-end the closed records.
        assert_eq!(
            ra.beat(&a, NodeState::Serving, 2, UnixMillis(31_000))
                .unwrap(),
            Beat::Rejoined
        );
        assert_eq!(
            ra.beat(&a, NodeState::Serving, 2, UnixMillis(33_000))
                .unwrap(),
            Beat::Refreshed
        );
        // Its call's task still logs events: this writer numbered the call's log up to 1
        // before the sweep added node_lost as 2. They are kept, after node_lost, none lost
        // to the sweep's number.
        let late = |kind: &str, at: i64| callgate_store::NewEvent {
            at: UnixMillis(at),
            kind: kind.into(),
            detail: "{}".into(),
        };
        store
            .append_events(&a_live[0].id, &[late("late_1", 31_500)])
            .unwrap();
        store
            .append_events(
                &a_live[0].id,
                &[late("late_2", 31_600), late("late_3", 31_700)],
            )
            .unwrap();
        store.end_call(&a_live[0].id, &ended(32_000)).unwrap();
        let log = reader.events(&a_live[0].id, Page::all()).unwrap().unwrap();
        assert_eq!(
            log.iter()
                .map(|e| (e.seq, e.kind.as_str()))
                .collect::<Vec<_>>(),
            [
                (1, "dtmf"),
                (2, "node_lost"),
                (3, "late_1"),
                (4, "late_2"),
                (5, "late_3")
            ]
        );
        let r = reader.call(&a_live[0].id).unwrap().unwrap();
        assert_eq!(r.end_reason.as_deref(), Some("interrupted"));
        assert_eq!(r.ended_at, Some(UnixMillis(12_000)));
        let nodes = rb.nodes(TIMEOUT, UnixMillis(33_000)).unwrap();
        assert_eq!(nodes[0].state, NodeState::Serving);
        assert_eq!(nodes[0].started_at, UnixMillis(31_000));
        // A restarted node (new incarnation) is registered, not refreshed.
        let a2 = node("a");
        assert_eq!(
            ra.beat(&a2, NodeState::Serving, 0, UnixMillis(34_000))
                .unwrap(),
            Beat::Registered
        );
        ra.leave(&a).unwrap();
        assert_eq!(
            rb.nodes(TIMEOUT, UnixMillis(34_000)).unwrap().len(),
            3,
            "an old incarnation cannot remove the new one"
        );
        ra.leave(&a2).unwrap();
        assert_eq!(rb.nodes(TIMEOUT, UnixMillis(34_000)).unwrap().len(), 2);
    });
    drop(schema);
}
