//! The SQLite store checked against an in-memory model over random operation sequences.

use std::collections::BTreeMap;

use callgate_store::{CallId, Counters, Ended, NewCall, NewEvent, SqliteStore, Store, UnixMillis};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, i64),
    Answer(u8, i64),
    Progress(u8, u16, String),
    End(u8, i64, u8),
    Cdr(u8, String),
    Events(u8, u8),
    EndInterrupted(i64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let id = 0u8..6;
    prop::collection::vec(
        prop_oneof![
            (id.clone(), 0i64..1000).prop_map(|(i, t)| Op::Insert(i, t)),
            (id.clone(), 0i64..2000).prop_map(|(i, t)| Op::Answer(i, t)),
            (id.clone(), any::<u16>(), "[0-9*#]{0,4}").prop_map(|(i, n, d)| Op::Progress(i, n, d)),
            (id.clone(), 0i64..3000, 0u8..3).prop_map(|(i, t, r)| Op::End(i, t, r)),
            (id.clone(), "\\PC{0,20}").prop_map(|(i, c)| Op::Cdr(i, c)),
            (id.clone(), 1u8..4).prop_map(|(i, n)| Op::Events(i, n)),
            (0i64..3000).prop_map(Op::EndInterrupted),
        ],
        1..40,
    )
}

/// What the model keeps of a call.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    started_at: i64,
    answered_at: Option<i64>,
    ended_at: Option<i64>,
    end_reason: Option<String>,
    counters: Counters,
    dtmf: String,
    cdr: Option<String>,
    events: Vec<String>,
}

const REASONS: [&str; 3] = ["peer_hangup", "agent_hangup", "server_shutdown"];

fn id(i: u8) -> CallId {
    CallId::from_string(format!("call-{i}"))
}

fn new_call(i: u8, t: i64) -> NewCall {
    NewCall {
        id: id(i),
        protocol: "inbound".into(),
        caller: "1".into(),
        callee: "2".into(),
        external_id: format!("ext-{i}"),
        call_config: None,
        phone_output_audio_format: "PCM_8000".into(),
        phone_input_audio_format: "PCM_8000".into(),
        started_at: UnixMillis(t),
        recording: i.is_multiple_of(2),
    }
}

proptest! {
    #[test]
    fn sqlite_matches_the_model(ops in ops()) {
        let mut store = SqliteStore::open_in_memory().unwrap();
        let mut model: BTreeMap<u8, Model> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(i, t) => {
                    let r = store.insert_call(&new_call(i, t));
                    prop_assert_eq!(r.is_ok(), !model.contains_key(&i));
                    model.entry(i).or_insert(Model { started_at: t, ..Model::default() });
                }
                Op::Answer(i, t) => {
                    store.mark_answered(&id(i), UnixMillis(t)).unwrap();
                    if let Some(m) = model.get_mut(&i) {
                        m.answered_at.get_or_insert(t);
                    }
                }
                Op::Progress(i, n, dtmf) => {
                    let c = Counters {
                        bytes_in: u64::from(n) * 320,
                        bytes_out: u64::from(n) * 160,
                        frames_in: u64::from(n),
                        frames_out: u64::from(n) / 2,
                    };
                    store.update_progress(&id(i), &c, &dtmf).unwrap();
                    if let Some(m) = model.get_mut(&i).filter(|m| m.ended_at.is_none()) {
                        m.counters = c;
                        m.dtmf = dtmf;
                    }
                }
                Op::End(i, t, r) => {
                    let ended = Ended {
                        at: UnixMillis(t),
                        reason: REASONS[r as usize].into(),
                        hangup_by: "peer".into(),
                        counters: Counters { bytes_in: 1, ..Counters::default() },
                        dtmf: "9".into(),
                    };
                    store.end_call(&id(i), &ended).unwrap();
                    if let Some(m) = model.get_mut(&i).filter(|m| m.ended_at.is_none()) {
                        m.ended_at = Some(t);
                        m.end_reason = Some(ended.reason.clone());
                        m.counters = ended.counters;
                        m.dtmf = ended.dtmf.clone();
                    }
                }
                Op::Cdr(i, raw) => {
                    let raw = serde_json::to_string(&raw).unwrap();
                    store.set_cdr(&id(i), &raw).unwrap();
                    if let Some(m) = model.get_mut(&i) {
                        m.cdr = Some(raw);
                    }
                }
                Op::Events(i, n) => {
                    let events: Vec<NewEvent> = (0..n)
                        .map(|k| NewEvent {
                            at: UnixMillis(0),
                            kind: format!("k{k}"),
                            detail: "{}".into(),
                        })
                        .collect();
                    let r = store.append_events(&id(i), &events);
                    prop_assert_eq!(r.is_ok(), model.contains_key(&i));
                    if let Some(m) = model.get_mut(&i) {
                        m.events.extend(events.into_iter().map(|e| e.kind));
                    }
                }
                Op::EndInterrupted(t) => {
                    let n = store.end_interrupted(UnixMillis(t)).unwrap();
                    let mut expected = 0;
                    for m in model.values_mut().filter(|m| m.ended_at.is_none()) {
                        m.ended_at = Some(t.max(m.started_at));
                        m.end_reason = Some("interrupted".into());
                        expected += 1;
                    }
                    prop_assert_eq!(n, expected);
                }
            }
        }
        // Newest first, ties broken by id, descending.
        let mut order: Vec<(i64, String, u8)> =
            model.iter().map(|(i, m)| (m.started_at, id(*i).to_string(), *i)).collect();
        order.sort_by(|a, b| b.cmp(a));
        let listed = store.list_calls(1000).unwrap();
        prop_assert_eq!(
            listed.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(),
            order.iter().map(|o| o.1.clone()).collect::<Vec<_>>()
        );
        for (i, m) in &model {
            let r = store.call(&id(*i)).unwrap().unwrap();
            prop_assert_eq!(r.started_at, UnixMillis(m.started_at));
            prop_assert_eq!(r.answered_at, m.answered_at.map(UnixMillis));
            prop_assert_eq!(r.ended_at, m.ended_at.map(UnixMillis));
            prop_assert_eq!(&r.end_reason, &m.end_reason);
            prop_assert_eq!(r.bytes_in, m.counters.bytes_in);
            prop_assert_eq!(r.frames_out, m.counters.frames_out);
            prop_assert_eq!(&r.dtmf, &m.dtmf);
            prop_assert_eq!(r.cdr.as_ref().map(|c| c.get().to_owned()), m.cdr.clone());
            let events = store.events(&id(*i)).unwrap().unwrap();
            prop_assert_eq!(
                events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
                m.events.clone()
            );
            prop_assert!(events.iter().enumerate().all(|(k, e)| e.seq == k as u64 + 1));
        }
        prop_assert!(store.call(&id(99)).unwrap().is_none());
        prop_assert!(store.events(&id(99)).unwrap().is_none());
    }
}

#[tokio::test]
async fn the_writer_commits_in_order_and_close_flushes() {
    let store = SqliteStore::open_in_memory().unwrap();
    let handle =
        callgate_store::StoreHandle::start(store, std::time::Duration::from_secs(5)).unwrap();
    handle.insert_call(new_call(1, 10)).await.unwrap();
    handle.update_progress(
        id(1),
        Counters {
            bytes_in: 5,
            ..Counters::default()
        },
        "1".into(),
    );
    assert!(
        handle
            .try_append_events(
                id(1),
                vec![NewEvent {
                    at: UnixMillis(1),
                    kind: "a".into(),
                    detail: "{}".into()
                }]
            )
            .is_ok()
    );
    handle
        .end_call(
            id(1),
            Ended {
                at: UnixMillis(20),
                reason: "peer_hangup".into(),
                hangup_by: "peer".into(),
                counters: Counters {
                    bytes_in: 7,
                    ..Counters::default()
                },
                dtmf: "12".into(),
            },
        )
        .await
        .unwrap();
    let r = handle.call(id(1)).await.unwrap().unwrap();
    assert_eq!(r.bytes_in, 7);
    assert_eq!(r.dtmf, "12");
    assert_eq!(handle.events(id(1)).await.unwrap().unwrap().len(), 1);
    // A duplicate insert is refused, and the writer goes on.
    assert!(handle.insert_call(new_call(1, 10)).await.is_err());
    handle.close().await;
    assert!(matches!(
        handle.list_calls(1).await,
        Err(callgate_store::Error::Closed)
    ));
}
