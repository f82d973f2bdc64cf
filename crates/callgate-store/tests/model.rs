//! Both stores (SQLite always; PostgreSQL with `CALLGATE_TEST_PG`, see `common`) checked
//! against an in-memory model over random operation sequences, and their shared contract.

#![allow(
    clippy::unwrap_used,
    reason = "tests, whose bodies run on both backends from #[test] wrappers: a failure is the test failing"
)]

mod common;

use std::collections::BTreeMap;

use callgate_store::{
    CallFilter, CallId, CallRecord, Counters, Ended, NewCall, NewEvent, NewTranscriptEntry, Page,
    Reader, Store, TextMatch, UnixMillis,
};
use common::Backend;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, i64, u8),
    Answer(u8, i64),
    Progress(u8, u16, String, Option<u8>),
    End(u8, i64, u8, Option<u8>),
    Cdr(u8, String),
    Events(u8, u8),
    Transcript(u8, u8, bool),
    EndInterrupted(i64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let id = 0u8..6;
    prop::collection::vec(
        prop_oneof![
            (id.clone(), 0i64..1000, 0u8..9).prop_map(|(i, t, r)| Op::Insert(i, t, r)),
            (id.clone(), 0i64..2000).prop_map(|(i, t)| Op::Answer(i, t)),
            (
                id.clone(),
                any::<u16>(),
                "[0-9*#]{0,4}",
                prop::option::of(0u8..100)
            )
                .prop_map(|(i, n, d, u)| Op::Progress(i, n, d, u)),
            (id.clone(), 0i64..3000, 0u8..3, prop::option::of(0u8..100))
                .prop_map(|(i, t, r, u)| Op::End(i, t, r, u)),
            (id.clone(), "\\PC{0,20}").prop_map(|(i, c)| Op::Cdr(i, c)),
            (id.clone(), 1u8..4).prop_map(|(i, n)| Op::Events(i, n)),
            (id.clone(), 1u8..4, any::<bool>()).prop_map(|(i, n, b)| Op::Transcript(i, n, b)),
            (0i64..3000).prop_map(Op::EndInterrupted),
        ],
        1..40,
    )
}

/// A listing to check: limit, route, agent, protocol, end reason, cursor (indexes into the
/// value tables below; out of range means "not set").
type FilterSpec = (u32, u8, u8, u8, u8, u8);

fn filters() -> impl Strategy<Value = Vec<FilterSpec>> {
    prop::collection::vec((0u32..8, 0u8..4, 0u8..4, 0u8..3, 0u8..5, 0u8..8), 1..6)
}

/// What the model keeps of a call.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    started_at: i64,
    protocol: String,
    route: Option<String>,
    agent: Option<String>,
    answered_at: Option<i64>,
    ended_at: Option<i64>,
    end_reason: Option<String>,
    counters: Counters,
    dtmf: String,
    usage: Option<String>,
    cdr: Option<String>,
    events: Vec<String>,
    transcript: Vec<(String, bool)>,
}

const REASONS: [&str; 3] = ["peer_hangup", "agent_hangup", "server_shutdown"];
const ROUTES: [&str; 3] = ["sales", "support", "it's; DROP TABLE calls"];
const AGENTS: [&str; 3] = ["echo", "flow", "realtime"];
const PROTOCOLS: [&str; 2] = ["inbound", "callbridge"];

fn id(i: u8) -> CallId {
    CallId::from_string(format!("call-{i}"))
}

fn usage(u: u8) -> String {
    format!("{{\"input_tokens\":{u}}}")
}

/// Route and agent from one number: `None` for a call refused before routing.
fn routing(r: u8) -> (Option<String>, Option<String>) {
    match r {
        0 => (None, None),
        r => (
            Some(ROUTES[usize::from(r % 3)].to_owned()),
            Some(AGENTS[usize::from(r / 3 % 3)].to_owned()),
        ),
    }
}

/// The node holding call `i`: this node (`a`, the one that ends its leftovers), another
/// node, or none (a record from before nodes).
fn node_of(i: u8) -> Option<String> {
    match i % 3 {
        0 => Some("a".to_owned()),
        1 => Some("b".to_owned()),
        _ => None,
    }
}

fn new_call(i: u8, t: i64, r: u8) -> NewCall {
    let (route, agent) = routing(r);
    NewCall {
        id: id(i),
        protocol: PROTOCOLS[usize::from(i % 2)].into(),
        caller: "1".into(),
        callee: "2".into(),
        external_id: format!("ext-{i}"),
        call_config: None,
        phone_output_audio_format: "PCM_8000".into(),
        phone_input_audio_format: "PCM_8000".into(),
        started_at: UnixMillis(t),
        recording: i.is_multiple_of(2),
        route,
        agent,
        key_name: None,
        node: node_of(i),
    }
}

fn filter(spec: FilterSpec) -> CallFilter {
    let (limit, route, agent, protocol, reason, before) = spec;
    let pick = |table: &[&str], k: u8| table.get(usize::from(k)).map(|s| (*s).to_owned());
    CallFilter {
        limit,
        route: pick(&ROUTES, route),
        agent: pick(&AGENTS, agent),
        protocol: pick(&PROTOCOLS, protocol),
        end_reason: pick(&["peer_hangup", "interrupted", "no_such_reason"], reason),
        before: (before < 7).then(|| id(before)),
        ..CallFilter::default()
    }
}

/// The IDs the model says `f` lists, in order.
fn model_list(model: &BTreeMap<u8, Model>, f: &CallFilter) -> Vec<String> {
    let key = |i: u8, m: &Model| (m.started_at, id(i).to_string());
    let cursor = match &f.before {
        None => None,
        Some(b) => match model.iter().find(|(i, _)| id(**i) == *b) {
            Some((i, m)) => Some(key(*i, m)),
            // A cursor naming no call: an empty page.
            None => return Vec::new(),
        },
    };
    let matches = |want: &Option<String>, have: &Option<String>| {
        want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
    };
    let mut listed: Vec<(i64, String)> = model
        .iter()
        .filter(|(_, m)| matches(&f.route, &m.route))
        .filter(|(_, m)| matches(&f.agent, &m.agent))
        .filter(|(_, m)| matches(&f.protocol, &Some(m.protocol.clone())))
        .filter(|(_, m)| matches(&f.end_reason, &m.end_reason))
        .map(|(i, m)| key(*i, m))
        .filter(|k| cursor.as_ref().is_none_or(|c| k < c))
        .collect();
    listed.sort_by(|a, b| b.cmp(a));
    listed.truncate(f.limit as usize);
    listed.into_iter().map(|k| k.1).collect()
}

fn ids(records: &[CallRecord]) -> Vec<String> {
    records.iter().map(|r| r.id.to_string()).collect()
}

proptest! {
    #[test]
    fn sqlite_matches_the_model(ops in ops(), filters in filters(), page in 1u32..4) {
        let backend = Backend::new(false, "sqlite_matches_the_model").unwrap();
        matches_the_model(&mut backend.open(), ops, filters, page)?;
    }
}

proptest! {
    // Each case opens a schema of its own on the server: fewer cases than SQLite's 256.
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn postgres_matches_the_model(ops in ops(), filters in filters(), page in 1u32..4) {
        let Some(backend) = Backend::new(true, "postgres_matches_the_model") else {
            return Ok(());
        };
        matches_the_model(&mut backend.open(), ops, filters, page)?;
    }
}

#[allow(clippy::unwrap_used, reason = "a test: a failure is the test failing")]
fn matches_the_model(
    store: &mut impl Store,
    ops: Vec<Op>,
    filters: Vec<FilterSpec>,
    page: u32,
) -> Result<(), TestCaseError> {
    {
        let mut model: BTreeMap<u8, Model> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(i, t, r) => {
                    let call = new_call(i, t, r);
                    let r = store.insert_call(&call);
                    prop_assert_eq!(r.is_ok(), !model.contains_key(&i));
                    model.entry(i).or_insert(Model {
                        started_at: t,
                        protocol: call.protocol,
                        route: call.route,
                        agent: call.agent,
                        ..Model::default()
                    });
                }
                Op::Answer(i, t) => {
                    store.mark_answered(&id(i), UnixMillis(t)).unwrap();
                    if let Some(m) = model.get_mut(&i) {
                        m.answered_at.get_or_insert(t);
                    }
                }
                Op::Progress(i, n, dtmf, u) => {
                    let c = Counters {
                        bytes_in: u64::from(n) * 320,
                        bytes_out: u64::from(n) * 160,
                        frames_in: u64::from(n),
                        frames_out: u64::from(n) / 2,
                    };
                    let u = u.map(usage);
                    store
                        .update_progress(&id(i), &c, &dtmf, u.as_deref())
                        .unwrap();
                    if let Some(m) = model.get_mut(&i).filter(|m| m.ended_at.is_none()) {
                        m.counters = c;
                        m.dtmf = dtmf;
                        m.usage = u.or(m.usage.take());
                    }
                }
                Op::End(i, t, r, u) => {
                    let ended = Ended {
                        at: UnixMillis(t),
                        reason: REASONS[r as usize].into(),
                        hangup_by: "peer".into(),
                        counters: Counters {
                            bytes_in: 1,
                            ..Counters::default()
                        },
                        dtmf: "9".into(),
                        usage: u.map(usage),
                    };
                    store.end_call(&id(i), &ended).unwrap();
                    if let Some(m) = model.get_mut(&i).filter(|m| m.ended_at.is_none()) {
                        m.ended_at = Some(t);
                        m.end_reason = Some(ended.reason.clone());
                        m.counters = ended.counters;
                        m.dtmf = ended.dtmf.clone();
                        m.usage = ended.usage.clone().or(m.usage.take());
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
                Op::Transcript(i, n, interrupted) => {
                    let entries: Vec<NewTranscriptEntry> = (0..n)
                        .map(|k| NewTranscriptEntry {
                            speaker: if k % 2 == 0 { "caller" } else { "agent" }.into(),
                            text: format!("words {k}"),
                            start_ms: u64::from(k) * 1000,
                            end_ms: u64::from(k) * 1000 + 900,
                            interrupted,
                        })
                        .collect();
                    let r = store.append_transcript(&id(i), &entries);
                    prop_assert_eq!(r.is_ok(), model.contains_key(&i));
                    if let Some(m) = model.get_mut(&i) {
                        m.transcript
                            .extend(entries.into_iter().map(|e| (e.text, e.interrupted)));
                    }
                }
                Op::EndInterrupted(t) => {
                    let n = store.end_interrupted("a", UnixMillis(t)).unwrap();
                    let mut expected = 0;
                    // Another node's open records may be live: they stay open.
                    for (_, m) in model.iter_mut().filter(|(i, m)| {
                        m.ended_at.is_none() && node_of(**i).as_deref() != Some("b")
                    }) {
                        m.ended_at = Some(t.max(m.started_at));
                        m.end_reason = Some("interrupted".into());
                        expected += 1;
                    }
                    prop_assert_eq!(n, expected);
                }
            }
        }
        let reader = &mut store.open_reader().unwrap();
        // Newest first, ties broken by id, descending.
        let all = CallFilter::newest(1000);
        let listed = reader.list_calls(&all).unwrap();
        prop_assert_eq!(ids(&listed), model_list(&model, &all));
        prop_assert_eq!(listed.len(), model.len());
        for spec in filters {
            let f = filter(spec);
            prop_assert_eq!(ids(&reader.list_calls(&f).unwrap()), model_list(&model, &f));
        }
        // Paging with the cursor walks the whole listing, each call once.
        let mut paged = Vec::new();
        let mut f = CallFilter::newest(page);
        loop {
            let ids = ids(&reader.list_calls(&f).unwrap());
            let Some(last) = ids.last() else { break };
            f.before = Some(CallId::from_string(last.clone()));
            paged.extend(ids);
        }
        prop_assert_eq!(paged, model_list(&model, &all));
        for (i, m) in &model {
            let r = reader.call(&id(*i)).unwrap().unwrap();
            prop_assert_eq!(r.started_at, UnixMillis(m.started_at));
            prop_assert_eq!(&r.protocol, &m.protocol);
            prop_assert_eq!(&r.route, &m.route);
            prop_assert_eq!(&r.agent, &m.agent);
            prop_assert_eq!(r.answered_at, m.answered_at.map(UnixMillis));
            prop_assert_eq!(r.ended_at, m.ended_at.map(UnixMillis));
            prop_assert_eq!(&r.end_reason, &m.end_reason);
            prop_assert_eq!(r.bytes_in, m.counters.bytes_in);
            prop_assert_eq!(r.frames_out, m.counters.frames_out);
            prop_assert_eq!(&r.dtmf, &m.dtmf);
            prop_assert_eq!(
                r.usage.as_ref().map(|u| u.get().to_owned()),
                m.usage.clone()
            );
            prop_assert_eq!(r.cdr.as_ref().map(|c| c.get().to_owned()), m.cdr.clone());
            let events = reader.events(&id(*i), Page::all()).unwrap().unwrap();
            prop_assert_eq!(
                events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
                m.events.clone()
            );
            prop_assert!(
                events
                    .iter()
                    .enumerate()
                    .all(|(k, e)| e.seq == k as u64 + 1)
            );
            let transcript = reader.transcript(&id(*i), Page::all()).unwrap().unwrap();
            prop_assert_eq!(
                transcript
                    .iter()
                    .map(|e| (e.text.clone(), e.interrupted))
                    .collect::<Vec<_>>(),
                m.transcript.clone()
            );
            prop_assert!(
                transcript
                    .iter()
                    .enumerate()
                    .all(|(k, e)| e.seq == k as u64 + 1)
            );
        }
        prop_assert!(reader.call(&id(99)).unwrap().is_none());
        prop_assert!(reader.events(&id(99), Page::all()).unwrap().is_none());
        prop_assert!(reader.transcript(&id(99), Page::all()).unwrap().is_none());
    }
    Ok(())
}

/// Runs a test on SQLite and, when enabled, on PostgreSQL.
macro_rules! on_both {
    ($sqlite:ident, $postgres:ident, $body:ident) => {
        #[test]
        fn $sqlite() {
            $body(&Backend::new(false, stringify!($sqlite)).unwrap());
        }
        #[test]
        fn $postgres() {
            if let Some(b) = Backend::new(true, stringify!($postgres)) {
                $body(&b);
            }
        }
    };
}

on_both!(
    sqlite_event_logs_and_transcripts_are_read_in_pages,
    postgres_event_logs_and_transcripts_are_read_in_pages,
    event_logs_and_transcripts_are_read_in_pages
);
on_both!(
    sqlite_ended_calls_are_deleted_with_everything_they_own_and_live_ones_never,
    postgres_ended_calls_are_deleted_with_everything_they_own_and_live_ones_never,
    ended_calls_are_deleted_with_everything_they_own_and_live_ones_never
);
on_both!(
    sqlite_a_listing_with_a_byte_budget_stops_one_record_past_it,
    postgres_a_listing_with_a_byte_budget_stops_one_record_past_it,
    a_listing_with_a_byte_budget_stops_one_record_past_it
);

#[tokio::test]
async fn sqlite_the_writer_commits_in_order_and_close_flushes() {
    the_writer_commits_in_order_and_close_flushes(Backend::new(false, "sqlite").unwrap()).await;
}

#[tokio::test]
async fn postgres_the_writer_commits_in_order_and_close_flushes() {
    if let Some(b) = Backend::new(
        true,
        "postgres_the_writer_commits_in_order_and_close_flushes",
    ) {
        the_writer_commits_in_order_and_close_flushes(b).await;
    }
}

async fn the_writer_commits_in_order_and_close_flushes(backend: Backend) {
    let (store, _backend) = common::off_runtime(move || (backend.open(), backend));
    let handle =
        callgate_store::StoreHandle::start(store, std::time::Duration::from_secs(5)).unwrap();
    handle.insert_call(new_call(1, 10, 1)).await.unwrap();
    handle.update_progress(
        id(1),
        Counters {
            bytes_in: 5,
            ..Counters::default()
        },
        "1".into(),
        Some(usage(3)),
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
    let said = NewTranscriptEntry {
        speaker: "caller".into(),
        text: "hello".into(),
        start_ms: 100,
        end_ms: 900,
        interrupted: false,
    };
    assert!(
        handle
            .try_append_transcript(id(1), vec![said.clone()])
            .is_ok()
    );
    handle
        .append_transcript(id(1), vec![said.clone()])
        .await
        .unwrap();
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
                usage: None,
            },
        )
        .await
        .unwrap();
    let r = handle.call(id(1)).await.unwrap().unwrap();
    assert_eq!(r.bytes_in, 7);
    assert_eq!(r.dtmf, "12");
    assert_eq!(r.usage.map(|u| u.get().to_owned()), Some(usage(3)));
    // An agent's last figures come after the end: they replace the usage, nothing else.
    handle.set_usage(id(1), usage(9)).await.unwrap();
    let r = handle.call(id(1)).await.unwrap().unwrap();
    assert_eq!(r.usage.map(|u| u.get().to_owned()), Some(usage(9)));
    assert_eq!((r.bytes_in, r.dtmf.as_str()), (7, "12"));
    assert_eq!(r.end_reason.as_deref(), Some("peer_hangup"));
    assert_eq!(
        handle
            .events(id(1), Page::all())
            .await
            .unwrap()
            .unwrap()
            .len(),
        1
    );
    let transcript = handle
        .transcript(id(1), Page::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        transcript.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(
        handle
            .transcript(id(2), Page::all())
            .await
            .unwrap()
            .is_none()
    );
    // A duplicate insert is refused, and the writer goes on.
    assert!(handle.insert_call(new_call(1, 10, 0)).await.is_err());
    handle.close().await;
    assert!(matches!(
        handle.list_calls(CallFilter::newest(1)).await,
        Err(callgate_store::Error::Closed)
    ));
}

fn event_logs_and_transcripts_are_read_in_pages(backend: &Backend) {
    let mut store = backend.open();
    store.insert_call(&new_call(1, 1, 0)).unwrap();
    let events: Vec<NewEvent> = (0..5)
        .map(|k| NewEvent {
            at: UnixMillis(k),
            kind: format!("k{k}"),
            detail: "{}".into(),
        })
        .collect();
    store.append_events(&id(1), &events).unwrap();
    let said: Vec<NewTranscriptEntry> = (0..5)
        .map(|k| NewTranscriptEntry {
            speaker: "agent".into(),
            text: format!("t{k}"),
            start_ms: k,
            end_ms: k,
            interrupted: false,
        })
        .collect();
    store.append_transcript(&id(1), &said).unwrap();
    let reader = &mut store.open_reader().unwrap();
    let page = Page { after: 2, limit: 2 };
    let seqs: Vec<u64> = reader
        .events(&id(1), page)
        .unwrap()
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [3, 4]);
    let texts: Vec<String> = reader
        .transcript(&id(1), page)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, ["t2", "t3"]);
    let last = Page {
        after: 5,
        limit: 10,
    };
    assert!(reader.events(&id(1), last).unwrap().unwrap().is_empty());
    assert!(
        reader.events(&id(2), last).unwrap().is_none(),
        "no such call"
    );
}

fn ended_calls_are_deleted_with_everything_they_own_and_live_ones_never(backend: &Backend) {
    let mut store = backend.open();
    for i in 1..=3 {
        store.insert_call(&new_call(i, i64::from(i), 0)).unwrap();
        store
            .append_events(
                &id(i),
                &[NewEvent {
                    at: UnixMillis(1),
                    kind: "k".into(),
                    detail: "{}".into(),
                }],
            )
            .unwrap();
    }
    let end = |at: i64| Ended {
        at: UnixMillis(at),
        reason: "peer_hangup".into(),
        hangup_by: "peer".into(),
        counters: Counters::default(),
        dtmf: String::new(),
        usage: None,
    };
    store.end_call(&id(1), &end(10)).unwrap();
    store.end_call(&id(2), &end(20)).unwrap();
    assert!(!store.delete_call(&id(3)).unwrap(), "call 3 is live");
    assert_eq!(
        store.delete_ended_before(UnixMillis(15), 10).unwrap(),
        [id(1)]
    );
    assert!(store.delete_call(&id(2)).unwrap());
    assert!(!store.delete_call(&id(2)).unwrap(), "already gone");
    let reader = &mut store.open_reader().unwrap();
    let left: Vec<CallId> = reader
        .list_calls(&CallFilter::newest(10))
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(left, [id(3)]);
    assert!(reader.events(&id(1), Page::all()).unwrap().is_none());
    assert_eq!(
        reader.events(&id(3), Page::all()).unwrap().unwrap().len(),
        1
    );
}

fn a_listing_with_a_byte_budget_stops_one_record_past_it(backend: &Backend) {
    let mut store = backend.open();
    // Ten calls whose call_config holds 100 kB each.
    let config = format!("{{\"siteId\":\"{}\"}}", "9".repeat(100_000));
    for i in 1..=10 {
        let mut call = new_call(i, i64::from(i), 0);
        call.call_config = Some(config.clone());
        store.insert_call(&call).unwrap();
    }
    let reader = &mut store.open_reader().unwrap();
    let all = reader.list_calls(&CallFilter::newest(10)).unwrap();
    let each = all[0].text_bytes();
    assert!(each > 100_000, "{each}");
    // A budget of three and a half records: four read to pass it, and one more.
    let budget = CallFilter {
        max_bytes: Some(each * 7 / 2),
        ..CallFilter::newest(10)
    };
    let listed = reader.list_calls(&budget).unwrap();
    assert_eq!(ids(&listed), ids(&all[..5]));
    // The first record alone over the budget: it, and one more.
    let tiny = CallFilter {
        max_bytes: Some(1),
        ..CallFilter::newest(10)
    };
    assert_eq!(ids(&reader.list_calls(&tiny).unwrap()), ids(&all[..2]));
    // Fewer records than the budget holds: all of them.
    let ample = CallFilter {
        max_bytes: Some(each * 100),
        ..CallFilter::newest(10)
    };
    assert_eq!(reader.list_calls(&ample).unwrap().len(), 10);
}

/// The cluster filters: live, node, since/until, caller/callee exact or by prefix.
fn the_cluster_filters_select_what_they_name(backend: &Backend) {
    let mut store = backend.open();
    let mk = |i: u8, t: i64, node: &str, caller: &str, callee: &str| NewCall {
        node: Some(node.into()),
        caller: caller.into(),
        callee: callee.into(),
        ..new_call(i, t, 1)
    };
    let calls = [
        mk(1, 1_000, "a", "0101", "0201"),
        mk(2, 2_000, "b", "01012", "0202"),
        mk(3, 3_000, "a", "0102", "0301"),
        mk(4, 4_000, "b", "0101", "02"),
    ];
    for c in &calls {
        store.insert_call(c).unwrap();
    }
    store
        .end_call(
            &calls[0].id,
            &Ended {
                at: UnixMillis(1_500),
                reason: "peer_hangup".into(),
                hangup_by: "peer".into(),
                counters: Default::default(),
                dtmf: String::new(),
                usage: None,
            },
        )
        .unwrap();
    let reader = &mut store.open_reader().unwrap();
    let mut list = |f: CallFilter| -> Vec<String> {
        let mut ids: Vec<String> = reader
            .list_calls(&CallFilter { limit: 50, ..f })
            .unwrap()
            .iter()
            .map(|r| r.external_id.clone())
            .collect();
        ids.sort();
        ids
    };
    let ext = |is: &[u8]| is.iter().map(|i| format!("ext-{i}")).collect::<Vec<_>>();
    assert_eq!(
        list(CallFilter {
            live: true,
            ..Default::default()
        }),
        ext(&[2, 3, 4])
    );
    assert_eq!(
        list(CallFilter {
            node: Some("a".into()),
            ..Default::default()
        }),
        ext(&[1, 3])
    );
    assert_eq!(
        list(CallFilter {
            since: Some(UnixMillis(2_000)),
            until: Some(UnixMillis(4_000)),
            ..Default::default()
        }),
        ext(&[2, 3])
    );
    let m = |t: &str| TextMatch::parse(t);
    assert_eq!(
        list(CallFilter {
            caller: m("0101"),
            ..Default::default()
        }),
        ext(&[1, 4])
    );
    assert_eq!(
        list(CallFilter {
            caller: m("0101*"),
            ..Default::default()
        }),
        ext(&[1, 2, 4])
    );
    assert_eq!(
        list(CallFilter {
            callee: m("02*"),
            ..Default::default()
        }),
        ext(&[1, 2, 4])
    );
    assert_eq!(
        list(CallFilter {
            callee: m("020*"),
            ..Default::default()
        }),
        ext(&[1, 2])
    );
    assert_eq!(
        list(CallFilter {
            live: true,
            node: Some("b".into()),
            callee: m("02"),
            ..Default::default()
        }),
        ext(&[4])
    );
    assert_eq!(TextMatch::parse("*"), None);
    assert_eq!(TextMatch::parse("0*1"), None);
}

on_both!(
    sqlite_cluster_filters,
    postgres_cluster_filters,
    the_cluster_filters_select_what_they_name
);
