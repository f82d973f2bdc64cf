//! The store's threads: reads never wait behind writes, and no write waits behind reads.
//! Synchronised with channels and gates only; latencies are printed, never asserted. Each
//! test runs on SQLite and, with `CALLGATE_TEST_PG`, on PostgreSQL (see `common`).

#![allow(
    clippy::unwrap_used,
    reason = "tests, whose bodies run on both backends from #[test] wrappers: a failure is the test failing"
)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use callgate_store::writer::WRITER_QUEUE;
use callgate_store::{
    AnyReader, AnyStore, CallFilter, CallId, CallRecord, Counters, Ended, Error, EventRecord,
    NewCall, NewEvent, NewTranscriptEntry, Page, Reader, SqliteStore, Store, StoreHandle,
    TranscriptEntry, UnixMillis,
};
use common::{Backend, TempDir, off_runtime};
use tokio::sync::mpsc;

/// Runs an async test on SQLite and, when enabled, on PostgreSQL.
macro_rules! on_both {
    ($sqlite:ident, $postgres:ident, $body:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            $body(Backend::new(false, stringify!($sqlite)).unwrap()).await;
        }
        #[tokio::test]
        async fn $postgres() {
            if let Some(b) = Backend::new(true, stringify!($postgres)) {
                $body(b).await;
            }
        }
    };
}

/// Opens the backend's store off the test's runtime; the backend goes back with it, to live
/// as long as the test.
fn open(backend: Backend) -> (AnyStore, Backend) {
    off_runtime(move || (backend.open(), backend))
}

/// Long enough never to fire in a passing run; the tests do not rely on it.
const TIMEOUT: Duration = Duration::from_secs(60);

fn new_call(i: u32) -> NewCall {
    NewCall {
        id: CallId::new(),
        protocol: "inbound".into(),
        caller: "1".into(),
        callee: "2".into(),
        external_id: format!("ext-{i}"),
        call_config: None,
        phone_output_audio_format: "PCM_8000".into(),
        phone_input_audio_format: "PCM_8000".into(),
        started_at: UnixMillis(i64::from(i)),
        recording: false,
        route: Some("sales".into()),
        agent: Some("echo".into()),
        key_name: None,
        node: None,
    }
}

/// A gate the test opens once.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

#[allow(
    clippy::unwrap_used,
    reason = "a test helper: a failure is the test failing"
)]
impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// A reader whose listings wait at a gate, after saying they have started.
struct GatedReader {
    inner: AnyReader,
    entered: mpsc::Sender<()>,
    gate: Arc<Gate>,
}

#[allow(
    clippy::unwrap_used,
    reason = "a test helper: a failure is the test failing"
)]
impl Reader for GatedReader {
    fn list_calls(&mut self, filter: &CallFilter) -> Result<Vec<CallRecord>, Error> {
        self.entered.blocking_send(()).unwrap();
        self.gate.wait();
        self.inner.list_calls(filter)
    }
    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, Error> {
        self.inner.call(id)
    }
    fn events(&mut self, id: &CallId, page: Page) -> Result<Option<Vec<EventRecord>>, Error> {
        self.inner.events(id, page)
    }
    fn transcript(
        &mut self,
        id: &CallId,
        page: Page,
    ) -> Result<Option<Vec<TranscriptEntry>>, Error> {
        self.inner.transcript(id, page)
    }
}

on_both!(
    sqlite_inserts_commit_while_every_reader_is_stuck,
    postgres_inserts_commit_while_every_reader_is_stuck,
    inserts_commit_while_every_reader_is_stuck
);

async fn inserts_commit_while_every_reader_is_stuck(backend: Backend) {
    let (store, _backend) = open(backend);
    let gate = Arc::new(Gate::default());
    let (entered, mut entered_rx) = mpsc::channel(8);
    let readers = (0..2)
        .map(|_| GatedReader {
            inner: store.open_reader().unwrap(),
            entered: entered.clone(),
            gate: gate.clone(),
        })
        .collect();
    let handle = StoreHandle::start_with_readers(store, readers, TIMEOUT).unwrap();
    let reads = async {
        tokio::join!(
            handle.list_calls(CallFilter::newest(1000)),
            handle.list_calls(CallFilter::newest(1000)),
        )
    };
    let writes = async {
        // Both reader threads are inside a read that cannot finish until the gate opens.
        entered_rx.recv().await.unwrap();
        entered_rx.recv().await.unwrap();
        for i in 0..200 {
            handle.insert_call(new_call(i)).await.unwrap();
        }
        gate.open();
    };
    let ((a, b), ()) = tokio::join!(reads, writes);
    // The reads ran after the gate opened, so after all the inserts.
    assert_eq!(a.unwrap().len(), 200);
    assert_eq!(b.unwrap().len(), 200);
    handle.close().await;
}

/// Inserts `n` calls one after another; returns each insert's latency.
#[allow(
    clippy::unwrap_used,
    reason = "a test helper: a failure is the test failing"
)]
async fn insert_many(handle: &StoreHandle, from: u32, n: u32) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n as usize);
    for i in from..from + n {
        let t = Instant::now();
        handle.insert_call(new_call(i)).await.unwrap();
        latencies.push(t.elapsed());
    }
    latencies
}

fn summary(mut l: Vec<Duration>) -> String {
    l.sort();
    let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize];
    format!(
        "p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        l[l.len() - 1]
    )
}

on_both!(
    sqlite_inserts_complete_under_a_reader_hammering_the_list,
    postgres_inserts_complete_under_a_reader_hammering_the_list,
    inserts_complete_under_a_reader_hammering_the_list
);

async fn inserts_complete_under_a_reader_hammering_the_list(backend: Backend) {
    let dir = TempDir::new();
    // SQLite in a file (WAL, as served), not in memory.
    let (store, _backend) = match backend {
        Backend::Sqlite => (
            AnyStore::Sqlite(SqliteStore::open(&dir.0).unwrap()),
            backend,
        ),
        backend => open(backend),
    };
    let handle = StoreHandle::start(store, TIMEOUT).unwrap();
    // Enough rows that each listing of 1000 is real work.
    insert_many(&handle, 0, 1000).await;

    let alone = insert_many(&handle, 1000, 200).await;

    let done = AtomicBool::new(false);
    let hammer = async {
        let mut lists = 0u32;
        while !done.load(Ordering::Relaxed) {
            let listed = handle.list_calls(CallFilter::newest(1000)).await.unwrap();
            assert_eq!(listed.len(), 1000);
            lists += 1;
        }
        lists
    };
    let writes = async {
        let l = insert_many(&handle, 1200, 200).await;
        done.store(true, Ordering::Relaxed);
        l
    };
    let (lists, hammered) = tokio::join!(hammer, writes);
    assert_eq!(hammered.len(), 200);
    let total = handle.list_calls(CallFilter::newest(2000)).await.unwrap();
    assert_eq!(total.len(), 1400);
    println!("200 inserts alone: {}", summary(alone));
    println!(
        "200 inserts while a reader listed 1000 calls {lists} times: {}",
        summary(hammered)
    );
    handle.close().await;
}

/// A store whose next batch, once armed, waits at a gate after saying it has started. Its
/// "transaction" is no transaction (each write commits alone): the test needs only the wait.
struct GatedStore {
    inner: AnyStore,
    armed: Arc<AtomicBool>,
    entered: mpsc::Sender<()>,
    gate: Arc<Gate>,
}

#[allow(
    clippy::unwrap_used,
    reason = "a test helper: a failure is the test failing"
)]
impl Store for GatedStore {
    type Reader = AnyReader;
    fn open_reader(&self) -> Result<AnyReader, Error> {
        self.inner.open_reader()
    }
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.blocking_send(()).unwrap();
            self.gate.wait();
        }
        f(self)
    }
    fn insert_call(&mut self, call: &NewCall) -> Result<(), Error> {
        self.inner.insert_call(call)
    }
    fn mark_answered(&mut self, id: &CallId, at: UnixMillis) -> Result<(), Error> {
        self.inner.mark_answered(id, at)
    }
    fn update_progress(
        &mut self,
        id: &CallId,
        counters: &Counters,
        dtmf: &str,
        usage: Option<&str>,
    ) -> Result<(), Error> {
        self.inner.update_progress(id, counters, dtmf, usage)
    }
    fn end_call(&mut self, id: &CallId, ended: &Ended) -> Result<(), Error> {
        self.inner.end_call(id, ended)
    }
    fn set_cdr(&mut self, id: &CallId, raw: &str) -> Result<(), Error> {
        self.inner.set_cdr(id, raw)
    }
    fn set_usage(&mut self, id: &CallId, usage: &str) -> Result<(), Error> {
        self.inner.set_usage(id, usage)
    }
    fn append_events(&mut self, id: &CallId, events: &[NewEvent]) -> Result<(), Error> {
        self.inner.append_events(id, events)
    }
    fn append_transcript(
        &mut self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
    ) -> Result<(), Error> {
        self.inner.append_transcript(id, entries)
    }
    fn enqueue_deliveries(
        &mut self,
        rows: &[callgate_store::outbox::NewDelivery],
    ) -> Result<(), Error> {
        self.inner.enqueue_deliveries(rows)
    }

    fn delete_call(&mut self, id: &CallId) -> Result<bool, Error> {
        self.inner.delete_call(id)
    }

    fn delete_ended_before(
        &mut self,
        before: UnixMillis,
        limit: u32,
    ) -> Result<Vec<CallId>, Error> {
        self.inner.delete_ended_before(before, limit)
    }

    fn end_interrupted(&mut self, node: &str, at: UnixMillis) -> Result<u64, Error> {
        self.inner.end_interrupted(node, at)
    }
}

/// A writer over a [`GatedStore`]: once `armed`, its next batch stops inside the store (and
/// says so on `entered_rx`) until `gate` opens.
struct Gated {
    handle: StoreHandle,
    armed: Arc<AtomicBool>,
    gate: Arc<Gate>,
    entered_rx: mpsc::Receiver<()>,
    _backend: Backend,
}

fn gated(backend: Backend) -> Gated {
    let (inner, _backend) = open(backend);
    let armed = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Gate::default());
    let (entered, entered_rx) = mpsc::channel(1);
    let store = GatedStore {
        inner,
        armed: armed.clone(),
        entered,
        gate: gate.clone(),
    };
    Gated {
        handle: StoreHandle::start(store, TIMEOUT).unwrap(),
        armed,
        gate,
        entered_rx,
        _backend,
    }
}

on_both!(
    sqlite_a_drop_guard_end_lands_even_when_the_queue_is_full,
    postgres_a_drop_guard_end_lands_even_when_the_queue_is_full,
    a_drop_guard_end_lands_even_when_the_queue_is_full
);

async fn a_drop_guard_end_lands_even_when_the_queue_is_full(backend: Backend) {
    let Gated {
        handle,
        armed,
        gate,
        mut entered_rx,
        _backend,
    } = gated(backend);
    let call = new_call(1);
    let id = call.id.clone();
    handle.insert_call(call).await.unwrap();
    let event = || {
        vec![NewEvent {
            at: UnixMillis(1),
            kind: "filler".into(),
            detail: "{}".into(),
        }]
    };

    // Hold the writer inside a batch, then fill its queue to the brim.
    armed.store(true, Ordering::SeqCst);
    handle.try_append_events(id.clone(), event()).unwrap();
    entered_rx.recv().await.unwrap();
    let mut queued = 0;
    while handle.try_append_events(id.clone(), event()).is_ok() {
        queued += 1;
    }
    assert_eq!(queued, WRITER_QUEUE);

    let ended = Ended {
        at: UnixMillis(50),
        reason: "internal_error".into(),
        hangup_by: "server".into(),
        counters: Counters::default(),
        dtmf: String::new(),
        usage: Some("{\"input_tokens\":3}".into()),
    };
    assert!(handle.end_now(id.clone(), ended));

    gate.open();
    // An awaited write queued after everything else: once it commits, so has the end.
    handle.insert_call(new_call(2)).await.unwrap();
    let record = handle.call(id.clone()).await.unwrap().unwrap();
    assert_eq!(record.end_reason.as_deref(), Some("internal_error"));
    assert_eq!(record.ended_at, Some(UnixMillis(50)));
    assert_eq!(
        record.usage.map(|u| u.get().to_owned()).as_deref(),
        Some("{\"input_tokens\":3}")
    );
    let events = handle.events(id, Page::all()).await.unwrap().unwrap();
    assert_eq!(events.len(), WRITER_QUEUE + 1);
    handle.close().await;
}

on_both!(
    sqlite_the_commit_counter_moves_after_the_commit_and_wakes_a_waiter,
    postgres_the_commit_counter_moves_after_the_commit_and_wakes_a_waiter,
    the_commit_counter_moves_after_the_commit_and_wakes_a_waiter
);

async fn the_commit_counter_moves_after_the_commit_and_wakes_a_waiter(backend: Backend) {
    let Gated {
        handle,
        armed,
        gate,
        mut entered_rx,
        _backend,
    } = gated(backend);
    let mut commits = handle.commits();
    let before = commits.mark_seen();
    armed.store(true, Ordering::SeqCst);
    let call = new_call(1);
    let id = call.id.clone();
    let write = handle.insert_call(call);
    let watch = async {
        // The writer holds the insert's batch at the door of its transaction: nothing is
        // committed, so the count has not moved and a read finds nothing.
        entered_rx.recv().await.unwrap();
        assert_eq!(commits.count(), before);
        assert!(handle.call(id.clone()).await.unwrap().is_none());
        gate.open();
        let after = tokio::time::timeout(TIMEOUT, commits.changed())
            .await
            .expect("a commit wakes the waiter")
            .unwrap();
        assert_eq!(after, before + 1);
        // Whoever wakes on the count finds the write.
        assert!(handle.call(id.clone()).await.unwrap().is_some());
    };
    let (written, ()) = tokio::join!(write, watch);
    written.unwrap();
    handle.close().await;
    // Once the writer has stopped, waiting says so instead of waiting forever.
    let closed = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Err(e) = commits.changed().await {
                return e;
            }
        }
    })
    .await
    .expect("the end of the writer wakes the waiter");
    assert!(matches!(closed, Error::Closed), "{closed:?}");
}
