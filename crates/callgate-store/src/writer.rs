//! The async front of the store: one writer thread owns the backend and only writes;
//! reads go to the reader threads of [`crate::reader`].
//!
//! Callers send operations over a bounded channel ([`WRITER_QUEUE`] entries). The thread takes
//! whatever is queued (up to [`BATCH`] operations) and runs it in one transaction, so a burst
//! of call starts costs one commit, not one each. Replies are sent only after the commit.
//!
//! Channel policy, by operation:
//! - start, end, CDR, late usage, events and transcript: awaited, with the handle's timeout (waiting for
//!   room counts against it); the caller learns of a failure.
//! - answer time and progress (periodic counters, DTMF, usage): `try_send`; dropped (logged)
//!   when the queue is full, since the next progress or the end supersedes it.
//! - [`StoreHandle::try_append_events`] and [`StoreHandle::try_append_transcript`]: `try_send`;
//!   when the queue is full the entries are given back, never dropped.
//! - [`StoreHandle::end_now`], for drop guards that cannot await: `try_send`; when the queue
//!   is full the end goes to an overflow list the writer drains into its next batch. That list
//!   holds at most one end per live call. An end is lost only if the writer is gone; the
//!   record is then ended as `interrupted` at the next start.
//!
//! After each batch that committed, the writer bumps a commit counter ([`Commits`], from
//! [`StoreHandle::commits`]): anyone may wait for "the store holds more than when I last
//! looked" (tests waiting for a record) without polling. It costs one counter update per
//! batch, never one per operation; it holds one value, so it is bounded whoever watches.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::notice::{Calls, Notice, Tap};
use crate::outbox::{NewDelivery, Subscription};
use crate::reader::{self, READER_QUEUE, READERS, Read, Reply};
use crate::{
    CallFilter, CallId, CallRecord, Counters, Ended, Error, EventRecord, NewCall, NewEvent,
    NewTranscriptEntry, Page, Reader, Stats, Store, TranscriptEntry, UnixMillis,
};

/// How many operations may wait for the writer.
pub const WRITER_QUEUE: usize = 4096;
/// The most operations committed in one transaction.
pub const BATCH: usize = 512;

enum Op {
    Insert(NewCall, Reply<()>),
    Answered(CallId, UnixMillis),
    Progress(CallId, Counters, String, Option<String>),
    End(CallId, Ended, Option<Reply<()>>),
    Cdr(CallId, String, Reply<()>),
    Usage(CallId, String, Reply<()>),
    Events(CallId, Vec<NewEvent>, Option<Reply<()>>),
    Transcript(CallId, Vec<NewTranscriptEntry>, Option<Reply<()>>),
    Delete(CallId, Reply<bool>),
    /// An event that is not a call write (a node's): published and enqueued like the others.
    Announce(Box<Notice>),
    DeleteBefore(UnixMillis, u32, Reply<Vec<CallId>>),
    /// Nothing to do but run a batch, which drains the overflow (see [`StoreHandle::end_now`]).
    Wake,
    /// Time for the store's background work ([`Store::tick`]), sent by the tick thread.
    Tick,
    Close(oneshot::Sender<()>),
}

/// Drop-guard ends that found the queue full; the writer drains it into every batch. Each
/// call ends once, so it never holds more entries than there are live calls.
type Overflow = Arc<Mutex<Vec<(CallId, Ended)>>>;

/// Locks the overflow. Nothing panics while holding it, and a `Vec` left by a panic is still
/// a valid list, so a poisoned lock is used as is.
fn lock(overflow: &Overflow) -> std::sync::MutexGuard<'_, Vec<(CallId, Ended)>> {
    overflow
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cloneable handle to the store: writes go to the writer thread, reads to the readers.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    /// The writer's queue; see the module docs for the policy of each operation.
    tx: mpsc::Sender<Op>,
    /// Ends [`StoreHandle::end_now`] could not queue, for the writer's next batch.
    overflow: Overflow,
    /// The readers' shared queue ([`crate::reader`]): awaited with `timeout`.
    reads: mpsc::Sender<Read>,
    timeout: Duration,
    /// What the writer and the backend count, for the metrics.
    stats: Arc<Stats>,
    /// The writer's commit counter ([`StoreHandle::commits`]).
    commits: watch::Receiver<u64>,
}

/// The writer's commit counter: how many batches it has committed since it started. A
/// reader of the store who did not find what it looked for waits for the next commit
/// ([`Commits::changed`]) and looks again; a commit that happens while it looks is not
/// missed, since [`Commits::mark_seen`] comes before the look.
///
/// Policy: one value, overwritten by each commit (a watcher that falls behind sees the
/// latest count, never a queue); the writer never waits for a watcher.
#[derive(Debug, Clone)]
pub struct Commits(watch::Receiver<u64>);

impl Commits {
    /// Batches committed so far.
    pub fn count(&self) -> u64 {
        *self.0.borrow()
    }

    /// Notes the current count as seen, and returns it: [`Commits::changed`] then waits for
    /// a commit after this one. Call it before reading the store.
    pub fn mark_seen(&mut self) -> u64 {
        *self.0.borrow_and_update()
    }

    /// Waits for a commit after the last count seen (at once if one happened already), and
    /// returns the new count; [`Error::Closed`] once the writer has stopped (no commit will
    /// come). Not bounded here: callers put their own bound around it.
    pub async fn changed(&mut self) -> Result<u64, Error> {
        self.0.changed().await.map_err(|_| Error::Closed)?;
        Ok(*self.0.borrow_and_update())
    }
}

impl StoreHandle {
    /// Starts the writer thread, which owns `store` until [`StoreHandle::close`], and
    /// [`READERS`] reader threads on readers opened from it. `timeout` bounds every awaited
    /// operation.
    pub fn start<S: Store>(store: S, timeout: Duration) -> Result<Self, Error> {
        let readers = (0..READERS)
            .map(|_| store.open_reader())
            .collect::<Result<Vec<_>, _>>()?;
        Self::start_with_readers(store, readers, timeout)
    }

    /// Like [`StoreHandle::start`], with readers of the caller's choosing: one thread each.
    /// With no readers, every read fails with [`Error::Closed`].
    pub fn start_with_readers<R: Reader>(
        store: impl Store,
        readers: Vec<R>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        Self::start_tapped(store, readers, timeout, Events::default())
    }

    /// Like [`StoreHandle::start`], handing the notices of every committed batch to
    /// `events.tap` (on the writer thread, after the commit: see [`crate::notice`]), and
    /// adding those its webhooks subscribe to to the outbox, in the same transaction.
    pub fn start_with_events<S: Store>(
        store: S,
        timeout: Duration,
        events: Events,
    ) -> Result<Self, Error> {
        let readers = (0..READERS)
            .map(|_| store.open_reader())
            .collect::<Result<Vec<_>, _>>()?;
        Self::start_tapped(store, readers, timeout, events)
    }

    fn start_tapped<R: Reader>(
        mut store: impl Store,
        readers: Vec<R>,
        timeout: Duration,
        events: Events,
    ) -> Result<Self, Error> {
        let stats = Arc::new(Stats::default());
        store.attach_stats(stats.clone());
        let (reads, queue) = mpsc::channel(READER_QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for (i, r) in readers.into_iter().enumerate() {
            let queue = queue.clone();
            // If a later spawn fails, dropping `reads` on return stops the threads started.
            thread::Builder::new()
                .name(format!("callgate-store-read-{i}"))
                .spawn(move || reader::run(r, queue))
                .map_err(|source| Error::Thread {
                    name: "store reader",
                    source,
                })?;
        }
        drop(queue);
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let overflow = Overflow::default();
        let drained = overflow.clone();
        // The tick thread stops when the writer drops `stop` (it has ended), or when every
        // handle is gone (it holds only a weak sender, so it never keeps the writer alive).
        let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(1);
        if let Some(every) = store.tick_interval() {
            let weak = tx.downgrade();
            thread::Builder::new()
                .name("callgate-store-tick".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(every)
                    {
                        let Some(tx) = weak.upgrade() else { return };
                        // Full: the writer is busy, and runs the store's work with its batch.
                        let _ = tx.try_send(Op::Tick);
                    }
                })
                .map_err(|source| Error::Thread {
                    name: "store tick",
                    source,
                })?;
        }
        let writer_stats = stats.clone();
        let (committed, commits) = watch::channel(0);
        thread::Builder::new()
            .name("callgate-store".into())
            .spawn(move || {
                writer(store, rx, drained, &writer_stats, events, &committed);
                drop(stop);
            })
            .map_err(|source| Error::Thread {
                name: "store writer",
                source,
            })?;
        Ok(Self {
            tx,
            overflow,
            reads,
            timeout,
            stats,
            commits,
        })
    }

    /// The writer's commit counter, bumped after each committed batch: wait on it instead of
    /// polling the store for a write to show up.
    pub fn commits(&self) -> Commits {
        Commits(self.commits.clone())
    }

    /// What the store counts (journal backlog, write latency, failures), for the metrics.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Inserts the record of a call that just started, and waits for the commit.
    pub async fn insert_call(&self, call: NewCall) -> Result<(), Error> {
        self.ask(|r| Op::Insert(call, r)).await
    }

    /// Notes the answer time (not awaited: a record without it is still a record).
    pub fn mark_answered(&self, id: CallId, at: UnixMillis) {
        self.offer(Op::Answered(id, at));
    }

    /// Writes running counters, DTMF and usage (a JSON object; `None` keeps the stored one);
    /// skipped if the writer is backed up.
    pub fn update_progress(
        &self,
        id: CallId,
        counters: Counters,
        dtmf: String,
        usage: Option<String>,
    ) {
        self.offer(Op::Progress(id, counters, dtmf, usage));
    }

    /// Ends the record and waits for the commit.
    pub async fn end_call(&self, id: CallId, ended: Ended) -> Result<(), Error> {
        self.ask(|r| Op::End(id, ended, Some(r))).await
    }

    /// Ends the record without waiting, for drop guards; never lost while the store runs.
    /// If the queue is full, the end goes to an overflow list that the writer drains into
    /// its next batch (it is bounded by the number of live calls: a call ends once).
    /// Returns false only if the writer is gone (the store was closed or failed): the record
    /// then stays open and is ended as `interrupted` at the next start.
    pub fn end_now(&self, id: CallId, ended: Ended) -> bool {
        use mpsc::error::TrySendError;
        let (id, ended) = match self.tx.try_send(Op::End(id, ended, None)) {
            Ok(()) => return true,
            Err(TrySendError::Full(Op::End(id, ended, _))) => (id, ended),
            // Closed; or cannot happen: try_send gives back the operation it was given.
            Err(_) => return false,
        };
        lock(&self.overflow).push((id, ended));
        // The writer may have emptied the queue since it was full, and be waiting for work:
        // wake it. If the queue is full again, there is work queued after the push, and the
        // writer drains the overflow after taking it.
        !matches!(self.tx.try_send(Op::Wake), Err(TrySendError::Closed(_)))
    }

    /// Stores the CDR verbatim and waits for the commit.
    pub async fn set_cdr(&self, id: CallId, raw: String) -> Result<(), Error> {
        self.ask(|r| Op::Cdr(id, raw, r)).await
    }

    /// Replaces the call's usage (a JSON object), even after its end, and waits for the
    /// commit: an agent's last figures, reported after the record ended.
    pub async fn set_usage(&self, id: CallId, usage: String) -> Result<(), Error> {
        self.ask(|r| Op::Usage(id, usage, r)).await
    }

    /// Appends events and waits for the commit.
    pub async fn append_events(&self, id: CallId, events: Vec<NewEvent>) -> Result<(), Error> {
        self.ask(|r| Op::Events(id, events, Some(r))).await
    }

    /// Publishes an event that is no call write (a node's), after the next commit, and adds
    /// it to the outbox for the webhooks that take it. Not awaited; dropped (logged) if the
    /// writer is backed up.
    pub fn announce(&self, notice: Notice) {
        self.offer(Op::Announce(Box::new(notice)));
    }

    /// Appends events without waiting; gives them back if the writer is backed up, so the
    /// caller can keep them and try again (events are never dropped).
    pub fn try_append_events(
        &self,
        id: CallId,
        events: Vec<NewEvent>,
    ) -> Result<(), Vec<NewEvent>> {
        match self.tx.try_send(Op::Events(id, events, None)) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Op::Events(_, events, _) => Err(events),
                // Cannot happen: try_send gives back the operation it was given.
                _ => Err(Vec::new()),
            },
        }
    }

    /// Deletes an ended call's record, events and transcript and waits for the commit; false
    /// if there is no ended call with this id.
    pub async fn delete_call(&self, id: CallId) -> Result<bool, Error> {
        self.ask(|r| Op::Delete(id, r)).await
    }

    /// Deletes up to `limit` calls that ended before `before`, oldest first, and waits for
    /// the commit; returns their ids (so their files can go too).
    pub async fn delete_ended_before(
        &self,
        before: UnixMillis,
        limit: u32,
    ) -> Result<Vec<CallId>, Error> {
        self.ask(|r| Op::DeleteBefore(before, limit, r)).await
    }

    /// Appends transcript entries and waits for the commit.
    pub async fn append_transcript(
        &self,
        id: CallId,
        entries: Vec<NewTranscriptEntry>,
    ) -> Result<(), Error> {
        self.ask(|r| Op::Transcript(id, entries, Some(r))).await
    }

    /// Appends transcript entries without waiting; gives them back if the writer is backed
    /// up, so the caller can keep them and try again.
    pub fn try_append_transcript(
        &self,
        id: CallId,
        entries: Vec<NewTranscriptEntry>,
    ) -> Result<(), Vec<NewTranscriptEntry>> {
        match self.tx.try_send(Op::Transcript(id, entries, None)) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Op::Transcript(_, entries, _) => Err(entries),
                // Cannot happen: try_send gives back the operation it was given.
                _ => Err(Vec::new()),
            },
        }
    }

    /// The calls `filter` selects, newest first (read by a reader thread).
    pub async fn list_calls(&self, filter: CallFilter) -> Result<Vec<CallRecord>, Error> {
        ask(&self.reads, self.timeout, |r| {
            Read::List(Box::new(filter), r)
        })
        .await
    }

    /// One call (read by a reader thread).
    pub async fn call(&self, id: CallId) -> Result<Option<CallRecord>, Error> {
        ask(&self.reads, self.timeout, |r| Read::Call(id, r)).await
    }

    /// One call's event log, or `None` if the call does not exist (read by a reader thread).
    pub async fn events(&self, id: CallId, page: Page) -> Result<Option<Vec<EventRecord>>, Error> {
        ask(&self.reads, self.timeout, |r| Read::Events(id, page, r)).await
    }

    /// One call's transcript, or `None` if the call does not exist (read by a reader thread).
    pub async fn transcript(
        &self,
        id: CallId,
        page: Page,
    ) -> Result<Option<Vec<TranscriptEntry>>, Error> {
        ask(&self.reads, self.timeout, |r| Read::Transcript(id, page, r)).await
    }

    /// Commits everything queued before this call, then stops the writer; then stops the
    /// readers once they have answered the reads already queued. Later operations on any
    /// clone of the handle fail with [`Error::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Close(tx)).await.is_ok() {
            // The writer answers after its last commit; if it is gone, there is nothing to wait for.
            let _ = rx.await;
        }
        // Bounded like any read: if the readers are stuck, give up rather than hang shutdown.
        // An error means they are gone already or stuck; either way there is nothing to add.
        let _ = ask(&self.reads, self.timeout, Read::Close).await;
    }

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, Error> {
        ask(&self.tx, self.timeout, op).await
    }

    fn offer(&self, op: Op) {
        if let Err(e) = self.tx.try_send(op) {
            tracing::warn!(
                full = matches!(e, mpsc::error::TrySendError::Full(_)),
                "Store queue refused a progress update."
            );
        }
    }
}

/// Sends a request carrying a reply channel and waits for the answer, all within `timeout`.
async fn ask<M, T>(
    queue: &mpsc::Sender<M>,
    timeout: Duration,
    request: impl FnOnce(Reply<T>) -> M,
) -> Result<T, Error> {
    let (tx, rx) = oneshot::channel();
    let work = async {
        queue.send(request(tx)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

/// Results of one batch, sent only after the commit.
type Done = Box<dyn FnOnce(Option<&str>) + Send>;

fn reply<T: Send + 'static>(tx: Reply<T>, result: Result<T, Error>) -> Done {
    Box::new(move |commit_error: Option<&str>| {
        let result = match commit_error {
            Some(e) => Err(Error::Commit {
                detail: e.to_owned(),
            }),
            None => result,
        };
        // The asker may have timed out and gone; nothing to do then.
        let _ = tx.send(result);
    })
}

/// Where the writer's events go.
#[derive(Default)]
pub struct Events {
    /// Receives the events of each committed batch.
    pub tap: Option<Arc<dyn Tap>>,
    /// This node's name (the outbox rows' `node`: it delivers them).
    pub node: String,
    /// The webhook endpoints and the events each takes (none: no outbox rows).
    pub webhooks: Vec<Subscription>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("tap", &self.tap.is_some())
            .field("node", &self.node)
            .field("webhooks", &self.webhooks)
            .finish()
    }
}

fn writer(
    mut store: impl Store,
    mut rx: mpsc::Receiver<Op>,
    overflow: Overflow,
    stats: &Stats,
    events: Events,
    committed: &watch::Sender<u64>,
) {
    let Events {
        tap,
        node,
        webhooks,
    } = events;
    let mut batch = Vec::with_capacity(BATCH);
    let mut calls = Calls::default();
    let mut notices: Vec<Notice> = Vec::new();
    while let Some(op) = rx.blocking_recv() {
        if matches!(op, Op::Tick) {
            store.tick();
            continue;
        }
        batch.push(op);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut done: Vec<Done> = Vec::with_capacity(batch.len());
        let mut close = None;
        let ops = std::mem::take(&mut batch);
        // Taken after the queued operations: an end pushed while the queue was full is
        // picked up by the batch that takes the operations queued before or after it.
        let ends = std::mem::take(&mut *lock(&overflow));
        if !ends.is_empty() {
            tracing::warn!(
                ends = ends.len(),
                "Store queue was full; writing call ends from the overflow."
            );
        }
        let started = Instant::now();
        let result = store.transaction(|s| {
            for op in ops {
                match op {
                    Op::Close(tx) => close = Some(tx),
                    op => done.push(apply(s, op, &mut calls, &mut notices)),
                }
            }
            for (id, ended) in ends {
                done.push(apply(s, Op::End(id, ended, None), &mut calls, &mut notices));
            }
            // In the same transaction: an event is in the outbox if and only if the store
            // holds what it reports.
            if !webhooks.is_empty() && !notices.is_empty() {
                let rows = NewDelivery::for_notices(&node, &webhooks, &notices);
                if !rows.is_empty() {
                    s.enqueue_deliveries(&rows)?;
                }
            }
            Ok(())
        });
        stats.write_latency.observe(started.elapsed());
        let commit_error = result.err().map(|e| e.to_string());
        if let Some(e) = &commit_error {
            stats.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "Store commit failed.");
        }
        for d in done {
            d(commit_error.as_deref());
        }
        // After the replies: whoever wakes on the count finds the batch's writes readable,
        // and its awaited writes answered. `send_modify` notifies even with no watcher.
        if commit_error.is_none() {
            committed.send_modify(|n| *n += 1);
        }
        // Only what the store holds is announced.
        if let (Some(tap), None, false) = (&tap, &commit_error, notices.is_empty()) {
            tap.publish(&notices);
        }
        notices.clear();
        if let Some(tx) = close {
            store.closing();
            let _ = tx.send(());
            return;
        }
    }
}

/// Applies one operation inside the batch's transaction, adding the notices of what it
/// wrote (if it wrote it) to `notices`.
fn apply(store: &mut impl Store, op: Op, calls: &mut Calls, notices: &mut Vec<Notice>) -> Done {
    let log = |what: &str, r: Result<(), Error>| {
        if let Err(error) = r {
            tracing::error!(%error, what, "Store write failed.");
        }
    };
    match op {
        Op::Insert(call, tx) => {
            let r = store.insert_call(&call);
            if r.is_ok() {
                notices.push(calls.started(&call));
            }
            reply(tx, r)
        }
        Op::Answered(id, at) => {
            let r = store.mark_answered(&id, at);
            if r.is_ok() {
                notices.push(calls.answered(&id, at));
            }
            log("answered", r);
            Box::new(|_| {})
        }
        Op::Progress(id, counters, dtmf, usage) => {
            log(
                "progress",
                store.update_progress(&id, &counters, &dtmf, usage.as_deref()),
            );
            Box::new(|_| {})
        }
        Op::End(id, ended, tx) => {
            let r = store.end_call(&id, &ended);
            if r.is_ok() {
                notices.extend(calls.ended(&id, &ended));
            }
            match tx {
                Some(tx) => reply(tx, r),
                None => {
                    log("end", r);
                    Box::new(|_| {})
                }
            }
        }
        Op::Cdr(id, raw, tx) => reply(tx, store.set_cdr(&id, &raw)),
        Op::Usage(id, usage, tx) => reply(tx, store.set_usage(&id, &usage)),
        Op::Events(id, events, tx) => {
            let r = store.append_events(&id, &events);
            if r.is_ok() {
                calls.events(&id, &events, notices);
            }
            match tx {
                Some(tx) => reply(tx, r),
                None => {
                    log("events", r);
                    Box::new(|_| {})
                }
            }
        }
        Op::Transcript(id, entries, tx) => {
            let r = store.append_transcript(&id, &entries);
            if r.is_ok() {
                calls.transcript(&id, &entries, notices);
            }
            match tx {
                Some(tx) => reply(tx, r),
                None => {
                    log("transcript", r);
                    Box::new(|_| {})
                }
            }
        }
        Op::Delete(id, tx) => reply(tx, store.delete_call(&id)),
        Op::DeleteBefore(before, limit, tx) => reply(tx, store.delete_ended_before(before, limit)),
        Op::Announce(notice) => {
            notices.push(*notice);
            Box::new(|_| {})
        }
        Op::Wake | Op::Tick => Box::new(|_| {}),
        Op::Close(tx) => {
            let _ = tx.send(());
            Box::new(|_| {})
        }
    }
}
