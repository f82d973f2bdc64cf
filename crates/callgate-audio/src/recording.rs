//! The call recording: one stereo 16-bit WAV per call, caller on the left exactly as received,
//! agent on the right exactly as played, aligned on the call's clock. The call task never
//! touches the file: it queues sample batches for one writer thread shared by every call.
//!
//! # Shape
//! - [`Recordings`], started once per server ([`Recordings::start`]), owns one dedicated OS
//!   thread, the writer. The writer alone does every file operation of every recording:
//!   creating the file and its directory, writing samples, rewriting the header, finalising.
//! - [`Recorder`], one call's handle ([`Recordings::create`]), is owned by the call task. Its
//!   methods never block and never do I/O: they copy the samples into a batch and queue it
//!   with `try_send`. The queue's policy (a full queue drops batches and counts them; the
//!   timeline is kept) is on [`Recordings`].
//!
//! # Alignment (done by the writer)
//! The caller channel is the caller's audio sample after sample (its position is its own
//! sample count). The agent channel is placed at the sample index the owner gives (the playout
//! clock's ms since the call started × rate), with silence where the agent said nothing. Every
//! batch carries its position, so a batch the queue dropped becomes silence of its length and
//! never shifts later audio. Samples are buffered only until the other channel catches up, and
//! a channel that runs more than [`SLACK_MS`] ahead makes the other one silent up to there, so
//! the writer's memory per recording stays bounded (silence is written in slack-sized steps).
//!
//! # Durability and failures
//! [`Recorder::sync`] asks the writer to rewrite the WAV header, so the file stays valid (up to
//! the last sync) even if the process is killed. A file that cannot be created or written
//! stops that recording only: the writer keeps the error and the recorder's next call returns
//! it. [`Recorder::finish`] (or dropping the recorder) queues the end; the file is complete once
//! the writer has processed it, which the [`Finished`] it returns tells. At shutdown, [`Recordings::close`] waits (awaitable, or blocking
//! with a bound) until everything queued before it is on disk; recordings still open then are
//! finished as they stand.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io::BufWriter;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Error, wav};

/// How far one channel may run ahead before the other is filled with silence.
pub const SLACK_MS: u64 = 500;

/// The sizes of the recording writer's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Sample batches (one [`Recorder::caller`] or [`Recorder::agent`] call each) that may
    /// wait for the writer, across every recording. Past this, batches are dropped. The queue's
    /// memory is at most this many batches (a 20 ms batch is 320 bytes at 8 kHz).
    pub queue: usize,
    /// Recordings open at once: created and not yet finished by the writer. Past this,
    /// [`Recordings::create`] refuses. Size it above the server's call limit: recordings of
    /// ended calls stay open until the writer has finished them.
    pub max_open: usize,
}

impl Default for Config {
    /// 4096 batches (in 20 ms batches, 40 s of one call's two directions or 0.4 s of a hundred
    /// calls'; 1.3 MB of samples at 8 kHz) and 1024 open recordings.
    fn default() -> Self {
        Self {
            queue: 4096,
            max_open: 1024,
        }
    }
}

/// The recording writer of a server: one OS thread doing every recording's file I/O, fed by
/// one bounded queue of messages from the call tasks.
///
/// # Queue policy
/// The call task must never block, so every message is queued with `try_send`:
/// - **Sample batches** ([`Recorder::caller`], [`Recorder::agent`]): at most
///   [`Config::queue`] wait at once. When the queue is full the batch is **dropped**, and
///   counted in that recording ([`Recorder::dropped`]) and in the server-wide total
///   ([`Recordings::dropped`], exported as a metric). The WAV keeps its timeline: a dropped
///   batch becomes silence of its length; audio after it stays where it belongs.
/// - **Control** (create, header sync, finish, close): never dropped. Room for it is
///   reserved beyond the batches: each of at most [`Config::max_open`] open recordings has
///   at most one create, one sync and one finish queued (a sync asked for while one is
///   queued is merged into it), plus one close for the whole writer.
///
/// So the channel holds at most `queue + 3 × max_open + 1` messages, and memory is bounded by
/// the queue, plus, per open recording, the writer's alignment buffers (about two
/// [`SLACK_MS`] of audio).
///
/// # Thread
/// The writer thread is started by [`Recordings::start`] and joined by [`Recordings::close`].
/// Dropping `Recordings` without closing asks the writer to stop (it finishes every open
/// recording first) but does not wait for it.
pub struct Recordings {
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Set once the close message is queued (by `close` or `drop`): it is sent once.
    closing: AtomicBool,
    /// The writer thread, until it is joined.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Recordings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recordings")
            .field("config", &self.shared.config)
            .field("open", &self.shared.open.load(Ordering::Relaxed))
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Recordings {
    /// Starts the writer thread.
    pub fn start(config: Config) -> Result<Self, Error> {
        let (recordings, writer) = Self::unstarted(config);
        let thread = std::thread::Builder::new()
            .name("callgate-recordings".into())
            .spawn(move || writer.run())
            .map_err(Error::RecordingWriterStart)?;
        *lock(&recordings.thread) = Some(thread);
        Ok(recordings)
    }

    /// Opens the recording of one call at `rate` samples per second, written to `path` (its
    /// directory is created if needed). Never blocks: the writer creates the file, and a
    /// failure to do so is returned by the recorder's next call.
    ///
    /// Fails if [`Config::max_open`] recordings are open, or once the writer is closed.
    pub fn create(&self, path: &Path, rate: u32) -> Result<Recorder, Error> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::RecordingStopped);
        }
        let limit = self.shared.config.max_open;
        self.shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| Error::TooManyRecordings { limit })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        let open = Message::Open {
            id,
            path: path.to_path_buf(),
            rate,
            ticket: Ticket(slot.clone()),
        };
        // Room is reserved for this control message (see the queue policy), so the only
        // failure is a writer that has stopped.
        if self.tx.try_send(open).is_err() {
            self.shared.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::RecordingStopped);
        }
        Ok(Recorder {
            id,
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            slot,
            caller_next: 0,
            agent_end: 0,
            dropped: 0,
            dropped_taken: 0,
            stopped: false,
            finished: false,
        })
    }

    /// Sample batches dropped because the queue was full, across every recording since the
    /// start (a counter for the metrics).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Recordings open now: created and not yet finished by the writer (a gauge).
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Stops the writer once it has processed everything queued so far: every recording
    /// finished before this call is complete on disk, and the ones still open are finished as
    /// they stand. Later calls on their recorders return [`Error::RecordingStopped`], and
    /// [`Recordings::create`] refuses.
    ///
    /// Returns at once; await the returned [`Closing`] (bound it with a timeout) or block on
    /// it with [`Closing::wait`]. Closing twice waits for the same end.
    pub fn close(&self) -> Closing<'_> {
        self.send_close();
        Closing { recordings: self }
    }

    /// A writer that is not running yet: tests drive it by hand.
    fn unstarted(config: Config) -> (Self, Writer) {
        let capacity = config
            .queue
            .saturating_add(config.max_open.saturating_mul(3))
            .saturating_add(1);
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared {
            config,
            batches: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            done: Mutex::new(Done::default()),
            done_changed: Condvar::new(),
        });
        let writer = Writer {
            rx,
            shared: shared.clone(),
            tracks: HashMap::new(),
        };
        let recordings = Self {
            tx,
            shared,
            next_id: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            thread: Mutex::new(None),
        };
        (recordings, writer)
    }

    fn send_close(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            // Room is reserved for the one close; if the writer has stopped, nothing is left
            // to close.
            let _ = self.tx.try_send(Message::Close);
        }
    }

    /// Joins the writer thread once it has signalled its end.
    fn join(&self) -> Result<(), Error> {
        let Some(thread) = lock(&self.thread).take() else {
            return Ok(());
        };
        // The writer signals its end from a guard dropped as its last act, so this returns
        // at once.
        thread.join().map_err(|_| Error::RecordingWriterPanicked)
    }
}

impl Drop for Recordings {
    fn drop(&mut self) {
        self.send_close();
    }
}

/// The end of the recording writer, from [`Recordings::close`]: a future that resolves once
/// everything queued before the close is on disk and the writer thread has ended, or a
/// blocking [`Closing::wait`].
#[derive(Debug)]
#[must_use = "the writer may still be writing unless this is awaited or waited on"]
pub struct Closing<'a> {
    recordings: &'a Recordings,
}

impl Closing<'_> {
    /// Blocks until the writer has ended, for at most `timeout`. For non-async callers; in
    /// async code, await the `Closing` instead.
    pub fn wait(self, timeout: Duration) -> Result<(), Error> {
        let shared = &self.recordings.shared;
        let done = lock(&shared.done);
        let (done, _) = shared
            .done_changed
            .wait_timeout_while(done, timeout, |d| !d.ended)
            .unwrap_or_else(PoisonError::into_inner);
        if !done.ended {
            return Err(Error::RecordingWriterBusy(timeout));
        }
        drop(done);
        self.recordings.join()
    }
}

impl Future for Closing<'_> {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let recordings = self.recordings;
        let mut done = lock(&recordings.shared.done);
        if !done.ended {
            if !done.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                done.wakers.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        drop(done);
        Poll::Ready(recordings.join())
    }
}

/// One call's recording, owned by the call task. Every method returns at once: samples are
/// copied into a batch and queued for the writer (see [`Recordings`] for what happens when
/// the queue is full). A failure of the file (it could not be created or written) is returned
/// by the next call after the writer met it; after that, calls return
/// [`Error::RecordingStopped`].
///
/// Dropping a recorder without [`Recorder::finish`] finishes it all the same.
pub struct Recorder {
    id: u64,
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    /// The caller sample index the next caller batch starts at (dropped batches included).
    caller_next: u64,
    /// The end of the latest agent audio placed (dropped batches included).
    agent_end: u64,
    /// Batches dropped since the start.
    dropped: u64,
    /// Of those, the ones already returned by `take_dropped`.
    dropped_taken: u64,
    /// A failure was returned, or the writer has stopped: nothing more is queued.
    stopped: bool,
    /// The finish message is queued.
    finished: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("id", &self.id)
            .field("caller_next", &self.caller_next)
            .field("dropped", &self.dropped)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Appends caller audio (left).
    pub fn caller(&mut self, samples: &[i16]) -> Result<(), Error> {
        self.check()?;
        let start = self.caller_next;
        self.caller_next += samples.len() as u64;
        if samples.is_empty() {
            return Ok(());
        }
        self.send_batch(|id| Message::Caller {
            id,
            start,
            samples: samples.to_vec(),
        })
    }

    /// Places agent audio (right) at sample index `at` of the call's clock. Audio that would
    /// start before what is already placed is appended right after it instead.
    pub fn agent(&mut self, at: u64, samples: &[i16]) -> Result<(), Error> {
        self.check()?;
        if samples.is_empty() {
            return Ok(());
        }
        self.agent_end = self.agent_end.max(at.saturating_add(samples.len() as u64));
        self.send_batch(|id| Message::Agent {
            id,
            at,
            samples: samples.to_vec(),
        })
    }

    /// Asks the writer to rewrite the header, so the file is valid as far as the writer has
    /// got (periodic, so a crash loses little). A sync asked for while one is queued is
    /// merged into it.
    pub fn sync(&mut self) -> Result<(), Error> {
        self.check()?;
        if !self.slot.sync_queued.swap(true, Ordering::AcqRel) {
            self.send_control(Message::Sync { id: self.id })?;
        }
        Ok(())
    }

    /// Queues the end of the recording: the writer writes what is left (the shorter channel
    /// padded with silence) and finalises the file. Never blocks. The returned [`Finished`]
    /// resolves once the file is complete on disk, with the failure if it is not (a failure
    /// this recorder has returned already resolves it at once with `RecordingStopped`).
    pub fn finish(mut self) -> Finished {
        let state = match self.check_file() {
            Ok(()) => FinishState::Writing(self.slot.clone()),
            Err(error) => FinishState::Known(Some(Err(error))),
        };
        self.send_finish();
        Finished { state }
    }

    /// Sample batches of this recording dropped because the queue was full, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Sample batches dropped since the last call of this (for the metrics).
    pub fn take_dropped(&mut self) -> u64 {
        let new = self.dropped - self.dropped_taken;
        self.dropped_taken = self.dropped;
        new
    }

    /// Returns the writer's failure (once), or `RecordingStopped` after it or once the writer
    /// has ended.
    fn check(&mut self) -> Result<(), Error> {
        self.check_file()?;
        // Checked here too because a closed writer's queue may look full for ever: batches
        // would be counted as dropped instead of the recording reported stopped.
        if self.shared.ended.load(Ordering::Acquire) {
            self.stopped = true;
            return Err(Error::RecordingStopped);
        }
        Ok(())
    }

    /// Returns the file's failure (once), or `RecordingStopped` after it.
    fn check_file(&mut self) -> Result<(), Error> {
        if self.stopped {
            return Err(Error::RecordingStopped);
        }
        if self.slot.failed.load(Ordering::Acquire) {
            self.stopped = true;
            return Err(self.slot.take_failure());
        }
        Ok(())
    }

    /// Queues a batch if the queue has room for it, else drops and counts it.
    fn send_batch(&mut self, message: impl FnOnce(u64) -> Message) -> Result<(), Error> {
        let queue = self.shared.config.queue;
        let admitted = self
            .shared
            .batches
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < queue).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.count_drop();
            return Ok(());
        }
        match self.tx.try_send(message(self.id)) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.shared.batches.fetch_sub(1, Ordering::AcqRel);
                self.count_drop();
                match error {
                    // Not expected: admission keeps the batches below the channel's capacity.
                    TrySendError::Full(_) => Ok(()),
                    TrySendError::Disconnected(_) => {
                        self.stopped = true;
                        Err(Error::RecordingStopped)
                    }
                }
            }
        }
    }

    /// Queues a control message, for which room is reserved.
    fn send_control(&mut self, message: Message) -> Result<(), Error> {
        self.tx.try_send(message).map_err(|_| {
            self.stopped = true;
            Error::RecordingStopped
        })
    }

    fn count_drop(&mut self) {
        self.dropped += 1;
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn send_finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // Sent even after a failure, so the writer forgets the recording. If the writer has
        // stopped, it finished the recording itself (or its ticket ended it).
        let _ = self.tx.try_send(Message::Finish {
            id: self.id,
            caller_end: self.caller_next,
            agent_end: self.agent_end,
        });
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.send_finish();
    }
}

/// The end of one recording, from [`Recorder::finish`]: a future that resolves once the writer
/// has finished the file (`Ok`: complete and valid on disk), or with why it could not. Await
/// it under a timeout where the file must be complete (before telling anyone it exists), or
/// drop it to not wait: the writer finishes the file all the same.
#[derive(Debug)]
#[must_use = "the file is complete only once this resolves; drop it explicitly to not wait"]
pub struct Finished {
    state: FinishState,
}

#[derive(Debug)]
enum FinishState {
    /// Known without the writer (taken when polled to the end).
    Known(Option<Result<(), Error>>),
    /// Up to the writer.
    Writing(Arc<Slot>),
}

impl Finished {
    /// Whether the outcome is known (polling would return it).
    pub fn is_done(&self) -> bool {
        match &self.state {
            FinishState::Known(_) => true,
            FinishState::Writing(slot) => lock(&slot.end).done,
        }
    }
}

impl Future for Finished {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            FinishState::Known(outcome) => {
                Poll::Ready(outcome.take().unwrap_or(Err(Error::RecordingStopped)))
            }
            FinishState::Writing(slot) => {
                let mut end = lock(&slot.end);
                if !end.done {
                    end.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                drop(end);
                let outcome = if slot.failed.load(Ordering::Acquire) {
                    Err(slot.take_failure())
                } else {
                    Ok(())
                };
                self.state = FinishState::Known(None);
                Poll::Ready(outcome)
            }
        }
    }
}

/// What the call side and the writer share.
struct Shared {
    config: Config,
    /// Batches queued and not yet taken by the writer.
    batches: AtomicUsize,
    /// Recordings created and not yet finished by the writer.
    open: AtomicUsize,
    /// Batches dropped, every recording.
    dropped: AtomicU64,
    /// The writer has ended: nothing queued from now on is read.
    ended: AtomicBool,
    done: Mutex<Done>,
    done_changed: Condvar,
}

/// Whether the writer has ended, and who waits for it.
#[derive(Default)]
struct Done {
    ended: bool,
    wakers: Vec<Waker>,
}

/// What one recorder and the writer share.
#[derive(Debug, Default)]
struct Slot {
    /// Set by the writer after `failure`.
    failed: AtomicBool,
    /// The writer's first failure, until the recorder returns it.
    failure: Mutex<Option<Error>>,
    /// A sync is queued.
    sync_queued: AtomicBool,
    /// Whether the writer is done with the file, and who waits for that.
    end: Mutex<SlotEnd>,
}

#[derive(Debug, Default)]
struct SlotEnd {
    done: bool,
    waker: Option<Waker>,
}

impl Slot {
    /// Records a failure; the first one is kept.
    fn fail(&self, error: Error) {
        let mut failure = lock(&self.failure);
        if !self.failed.load(Ordering::Acquire) {
            *failure = Some(error);
            self.failed.store(true, Ordering::Release);
        }
    }

    /// The failure, or `RecordingStopped` once it has been taken.
    fn take_failure(&self) -> Error {
        lock(&self.failure)
            .take()
            .unwrap_or(Error::RecordingStopped)
    }

    /// Marks the writer done with the file (once), with a failure if it is not complete.
    fn end(&self, error: Option<Error>) {
        let mut end = lock(&self.end);
        if end.done {
            return;
        }
        if let Some(error) = error {
            self.fail(error);
        }
        end.done = true;
        if let Some(waker) = end.waker.take() {
            waker.wake();
        }
    }
}

/// The writer's side of a recording: carried by its open message, then by its track. Dropped
/// without an explicit end (the message discarded by a stopped writer, a panic), it ends the
/// recording as stopped, so a [`Finished`] always resolves.
struct Ticket(Arc<Slot>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.end(Some(Error::RecordingStopped));
    }
}

/// What a recorder tells the writer.
enum Message {
    Open {
        id: u64,
        path: PathBuf,
        rate: u32,
        ticket: Ticket,
    },
    Caller {
        id: u64,
        /// Caller sample index of the first sample.
        start: u64,
        samples: Vec<i16>,
    },
    Agent {
        id: u64,
        at: u64,
        samples: Vec<i16>,
    },
    Sync {
        id: u64,
    },
    Finish {
        id: u64,
        /// Caller samples sent, dropped ones included: the left channel is at least this long.
        caller_end: u64,
        /// The end of the last agent audio sent, dropped or not.
        agent_end: u64,
    },
    Close,
}

/// The writer: runs on its own thread and owns every open file.
struct Writer {
    rx: Receiver<Message>,
    shared: Arc<Shared>,
    tracks: HashMap<u64, Track>,
}

impl Writer {
    fn run(mut self) {
        // Dropped last, panics included: whoever waits in `close` is released.
        let _ended = EndGuard(self.shared.clone());
        while let Ok(message) = self.rx.recv() {
            if self.handle(message).is_break() {
                break;
            }
        }
        self.finish_all();
    }

    /// Processes one message; breaks on close.
    fn handle(&mut self, message: Message) -> ControlFlow<()> {
        match message {
            Message::Open {
                id,
                path,
                rate,
                ticket,
            } => {
                self.tracks.insert(id, Track::open(&path, rate, ticket));
            }
            Message::Caller { id, start, samples } => {
                self.shared.batches.fetch_sub(1, Ordering::AcqRel);
                if let Some(track) = self.tracks.get_mut(&id) {
                    track.apply(|w| w.caller(start, &samples));
                }
            }
            Message::Agent { id, at, samples } => {
                self.shared.batches.fetch_sub(1, Ordering::AcqRel);
                if let Some(track) = self.tracks.get_mut(&id) {
                    track.apply(|w| w.agent(at, &samples));
                }
            }
            Message::Sync { id } => {
                if let Some(track) = self.tracks.get_mut(&id) {
                    track.ticket.0.sync_queued.store(false, Ordering::Release);
                    track.apply(TrackWriter::sync);
                }
            }
            Message::Finish {
                id,
                caller_end,
                agent_end,
            } => {
                if let Some(track) = self.tracks.remove(&id) {
                    track.finish(caller_end, agent_end);
                }
                self.shared.open.fetch_sub(1, Ordering::AcqRel);
            }
            Message::Close => return ControlFlow::Break(()),
        }
        ControlFlow::Continue(())
    }

    /// Finishes every recording still open, as it stands.
    fn finish_all(&mut self) {
        for (_, track) in self.tracks.drain() {
            track.finish(0, 0);
        }
    }

    /// Processes what is queued now, without waiting (tests drive the writer with this).
    #[cfg(test)]
    fn drain(&mut self) -> ControlFlow<()> {
        while let Ok(message) = self.rx.try_recv() {
            self.handle(message)?;
        }
        ControlFlow::Continue(())
    }
}

/// Marks the writer ended when dropped.
struct EndGuard(Arc<Shared>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Release);
        let mut done = lock(&self.0.done);
        done.ended = true;
        for waker in done.wakers.drain(..) {
            waker.wake();
        }
        self.0.done_changed.notify_all();
    }
}

/// One recording, on the writer.
struct Track {
    ticket: Ticket,
    /// `None` once the file failed: the rest of the recording is ignored.
    writer: Option<TrackWriter>,
}

impl Track {
    fn open(path: &Path, rate: u32, ticket: Ticket) -> Self {
        match TrackWriter::create(path, rate) {
            Ok(w) => Self {
                ticket,
                writer: Some(w),
            },
            Err(error) => {
                ticket.0.fail(error);
                Self {
                    ticket,
                    writer: None,
                }
            }
        }
    }

    fn apply(&mut self, op: impl FnOnce(&mut TrackWriter) -> Result<(), Error>) {
        if let Some(w) = &mut self.writer
            && let Err(error) = op(w)
        {
            self.writer = None;
            self.ticket.0.fail(error);
        }
    }

    /// Finishes the file and tells whoever waits for it.
    fn finish(self, caller_end: u64, agent_end: u64) {
        // A track without a writer has its failure recorded already.
        let error = self
            .writer
            .and_then(|w| w.finish(caller_end, agent_end).err());
        self.ticket.0.end(error);
    }
}

/// The largest number of stereo frames a WAV file holds (its data length is a `u32` of bytes).
const MAX_FRAMES: u64 = (u32::MAX as u64 - 64) / 4;

/// One recording's file and alignment buffers.
struct TrackWriter {
    file: hound::WavWriter<BufWriter<File>>,
    rate: u32,
    /// Left samples from frame `written` on.
    left: VecDeque<i16>,
    /// Right samples from frame `written` on.
    right: VecDeque<i16>,
    /// Stereo frames written so far.
    written: u64,
    /// The caller sample index the next caller sample has (silence the slack rule put on the
    /// left is not counted).
    caller_next: u64,
}

impl TrackWriter {
    /// Creates the file (and its directory).
    fn create(path: &Path, rate: u32) -> Result<Self, Error> {
        let io = |e| Error::Wav(hound::Error::IoError(e));
        if let Some(dir) = path.parent() {
            // Recordings are private to the server's user, whatever the umask.
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(io)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(io)?;
        Ok(Self {
            file: hound::WavWriter::new(BufWriter::new(file), wav::spec(rate, 2))?,
            rate,
            left: VecDeque::new(),
            right: VecDeque::new(),
            written: 0,
            caller_next: 0,
        })
    }

    fn caller(&mut self, start: u64, samples: &[i16]) -> Result<(), Error> {
        // Batches before this one were dropped: silence in their place.
        self.pad_left(start.saturating_sub(self.caller_next))?;
        self.left.extend(samples.iter().copied());
        self.caller_next = start + samples.len() as u64;
        self.write_ready()
    }

    fn agent(&mut self, at: u64, samples: &[i16]) -> Result<(), Error> {
        let end = self.written + self.right.len() as u64;
        self.pad_right(at.saturating_sub(end))?;
        self.right.extend(samples.iter().copied());
        self.write_ready()
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.file.flush()?;
        Ok(())
    }

    /// Pads each channel to the end the recorder announced, then the shorter one to the
    /// longer, writes everything and finalises the file.
    fn finish(mut self, caller_end: u64, agent_end: u64) -> Result<(), Error> {
        self.pad_left(caller_end.saturating_sub(self.caller_next))?;
        let end = self.written + self.right.len() as u64;
        self.pad_right(agent_end.saturating_sub(end))?;
        let n = self.left.len().max(self.right.len());
        self.left.resize(n, 0);
        self.right.resize(n, 0);
        self.write_frames(n)?;
        self.file.finalize()?;
        Ok(())
    }

    fn slack(&self) -> usize {
        (u64::from(self.rate) * SLACK_MS / 1000) as usize
    }

    /// Appends `n` samples of silence to the left, a slack at a time, so a long gap is written
    /// out as it is added instead of being held in memory.
    fn pad_left(&mut self, n: u64) -> Result<(), Error> {
        self.check_room(n)?;
        self.caller_next += n;
        let step = self.slack().max(1) as u64;
        let mut rest = n;
        while rest > 0 {
            let k = rest.min(step);
            self.left.extend(std::iter::repeat_n(0, k as usize));
            self.write_ready()?;
            rest -= k;
        }
        Ok(())
    }

    /// Appends `n` samples of silence to the right, a slack at a time.
    fn pad_right(&mut self, n: u64) -> Result<(), Error> {
        self.check_room(n)?;
        let step = self.slack().max(1) as u64;
        let mut rest = n;
        while rest > 0 {
            let k = rest.min(step);
            self.right.extend(std::iter::repeat_n(0, k as usize));
            self.write_ready()?;
            rest -= k;
        }
        Ok(())
    }

    /// Fails if `n` more frames would not fit in a WAV file (also a guard against a bogus
    /// position writing silence for ever).
    fn check_room(&self, n: u64) -> Result<(), Error> {
        let buffered = self.left.len().max(self.right.len()) as u64;
        if self.written.saturating_add(buffered).saturating_add(n) > MAX_FRAMES {
            return Err(Error::RecordingFull);
        }
        Ok(())
    }

    fn write_ready(&mut self) -> Result<(), Error> {
        let slack = self.slack();
        // A channel far ahead means the other is silent: fill it.
        if self.left.len() > self.right.len() + slack {
            let n = self.left.len() - slack;
            self.right.resize(n.max(self.right.len()), 0);
        } else if self.right.len() > self.left.len() + slack {
            let n = self.right.len() - slack;
            self.left.resize(n.max(self.left.len()), 0);
        }
        let ready = self.left.len().min(self.right.len());
        self.write_frames(ready)
    }

    fn write_frames(&mut self, n: usize) -> Result<(), Error> {
        if self.written + n as u64 > MAX_FRAMES {
            return Err(Error::RecordingFull);
        }
        for (l, r) in self.left.drain(..n).zip(self.right.drain(..n)) {
            self.file.write_sample(l)?;
            self.file.write_sample(r)?;
        }
        self.written += n as u64;
        Ok(())
    }
}

/// Locks, ignoring poison: every value behind these locks stays consistent across a panic
/// (each is set in one step).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::task::Wake;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("callgate-rec-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The left and right channels of a stereo WAV.
    fn read_stereo(path: &Path) -> (Vec<i16>, Vec<i16>) {
        let reader = hound::WavReader::open(path).unwrap();
        assert_eq!(reader.spec().channels, 2);
        let samples: Vec<i16> = reader.into_samples::<i16>().map(Result::unwrap).collect();
        let left = samples.iter().step_by(2).copied().collect();
        let right = samples.iter().skip(1).step_by(2).copied().collect();
        (left, right)
    }

    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls a future to completion on this thread (no runtime in this crate).
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
            std::thread::park();
        }
    }

    #[test]
    fn channels_align_and_the_file_is_valid_before_finish() {
        let dir = temp_dir("align");
        let path = dir.join("r.wav");
        let (recordings, mut writer) = Recordings::unstarted(Config::default());
        let mut r = recordings.create(&path, 8000).unwrap();
        let caller: Vec<i16> = (0..8000).map(|i| (i % 1000) as i16).collect();
        r.caller(&caller[..4000]).unwrap();
        // The agent speaks from 0.25 s for 0.1 s.
        r.agent(2000, &[7; 800]).unwrap();
        r.caller(&caller[4000..]).unwrap();
        r.sync().unwrap();
        assert!(writer.drain().is_continue());
        // Valid as it stands (what a crash would leave).
        let partial = hound::WavReader::open(&path).unwrap();
        assert_eq!(partial.spec().channels, 2);
        assert!(partial.len() > 0);
        let finished = r.finish();
        assert!(!finished.is_done(), "the writer has not run yet");
        assert!(writer.drain().is_continue());
        assert!(finished.is_done());
        block_on(finished).unwrap();
        let (left, right) = read_stereo(&path);
        assert_eq!(
            left, caller,
            "the caller channel is exactly what was received"
        );
        assert!(right[..2000].iter().all(|&s| s == 0));
        assert!(right[2000..2800].iter().all(|&s| s == 7));
        assert!(right[2800..].iter().all(|&s| s == 0));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_recording_through_the_writer_thread_is_sample_exact() {
        let dir = temp_dir("exact");
        let path = dir.join("r.wav");
        // A queue larger than everything sent: nothing may be dropped.
        let recordings = Recordings::start(Config {
            queue: 1000,
            max_open: 4,
        })
        .unwrap();
        let mut r = recordings.create(&path, 8000).unwrap();
        let caller: Vec<i16> = (0..16_000).map(|i| (i % 3000) as i16 - 1500).collect();
        let agent: Vec<i16> = (0..4000).map(|i| (i % 700) as i16 + 1).collect();
        // 20 ms frames as a call sends them; the agent speaks from 0.5 s to 1 s.
        for (k, frame) in caller.chunks(160).enumerate() {
            r.caller(frame).unwrap();
            let at = k * 160;
            if (4000..8000).contains(&at) {
                r.agent(at as u64, &agent[at - 4000..at - 3840]).unwrap();
            }
            if k % 25 == 0 {
                r.sync().unwrap();
            }
        }
        // Complete on disk once this resolves, with the writer still running.
        block_on(r.finish()).unwrap();
        assert_eq!(recordings.dropped(), 0);
        let (left, right) = read_stereo(&path);
        assert_eq!(left, caller, "the caller channel is exactly as given");
        assert_eq!(right.len(), caller.len());
        assert!(right[..4000].iter().all(|&s| s == 0));
        assert_eq!(right[4000..8000], agent[..], "the agent is at its index");
        assert!(right[8000..].iter().all(|&s| s == 0));
        block_on(recordings.close()).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_queue_drops_batches_counts_them_and_keeps_the_timeline() {
        let dir = temp_dir("full");
        let path = dir.join("r.wav");
        let (recordings, mut writer) = Recordings::unstarted(Config {
            queue: 4,
            max_open: 1,
        });
        let mut r = recordings.create(&path, 8000).unwrap();
        let frame = |k: i16| [k + 1; 100];
        // The writer is stalled: four batches fit, the next three are dropped.
        for k in 0..6 {
            r.caller(&frame(k)).unwrap();
        }
        r.agent(50, &[9; 100]).unwrap();
        assert_eq!(r.dropped(), 3);
        assert_eq!(r.take_dropped(), 3);
        assert!(writer.drain().is_continue());
        // The writer caught up: room again, until the queue is full once more.
        for k in 6..10 {
            r.caller(&frame(k)).unwrap();
            if k == 7 {
                r.agent(750, &[9; 50]).unwrap();
            }
        }
        assert_eq!(r.dropped(), 4, "frame 9 did not fit");
        assert_eq!(r.take_dropped(), 1);
        assert_eq!(r.take_dropped(), 0);
        assert_eq!(recordings.dropped(), 4);
        let finished = r.finish();
        assert!(writer.drain().is_continue());
        block_on(finished).unwrap();
        let (left, right) = read_stereo(&path);
        assert_eq!(
            left.len(),
            1000,
            "dropped audio keeps its length, as silence"
        );
        for k in 0..10 {
            let expected = if matches!(k, 4 | 5 | 9) { 0 } else { k + 1 };
            let got = &left[k as usize * 100..(k as usize + 1) * 100];
            assert!(got.iter().all(|&s| s == expected), "caller frame {k}");
        }
        assert!(
            right[..750].iter().all(|&s| s == 0),
            "the dropped agent batch is silent"
        );
        assert!(right[750..800].iter().all(|&s| s == 9));
        assert!(right[800..].iter().all(|&s| s == 0));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn finish_and_close_leave_valid_wavs() {
        let dir = temp_dir("close");
        let recordings = Recordings::start(Config::default()).unwrap();
        let mut a = recordings.create(&dir.join("a.wav"), 8000).unwrap();
        a.caller(&[3; 800]).unwrap();
        a.agent(100, &[4; 100]).unwrap();
        let a_finished = a.finish();
        // Still open at close: finished as it stands.
        let mut b = recordings.create(&dir.join("b.wav"), 16_000).unwrap();
        b.caller(&[5; 400]).unwrap();
        b.agent(0, &[6; 200]).unwrap();
        let mut c = recordings.create(&dir.join("c.wav"), 8000).unwrap();
        block_on(recordings.close()).unwrap();
        assert!(a_finished.is_done());
        block_on(a_finished).unwrap();
        block_on(b.finish()).unwrap();

        let (left, right) = read_stereo(&dir.join("a.wav"));
        assert_eq!(left, vec![3; 800]);
        assert_eq!(right[100..200], [4; 100]);
        let reader = hound::WavReader::open(dir.join("b.wav")).unwrap();
        assert_eq!(reader.spec().sample_rate, 16_000);
        let (left, right) = read_stereo(&dir.join("b.wav"));
        assert_eq!(left, vec![5; 400]);
        assert_eq!(right[..200], [6; 200]);

        assert!(matches!(c.caller(&[1; 10]), Err(Error::RecordingStopped)));
        assert!(matches!(
            recordings.create(&dir.join("d.wav"), 8000),
            Err(Error::RecordingStopped)
        ));
        // Closing again waits for the same end.
        recordings.close().wait(Duration::from_secs(600)).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_unwritable_path_is_reported_by_the_next_call() {
        let dir = temp_dir("unwritable");
        std::fs::create_dir_all(&dir).unwrap();
        let blocker = dir.join("not-a-dir");
        std::fs::write(&blocker, b"").unwrap();
        let (recordings, mut writer) = Recordings::unstarted(Config::default());
        // Creating never blocks: the file is made by the writer.
        let mut r = recordings.create(&blocker.join("r.wav"), 8000).unwrap();
        r.caller(&[1; 160]).unwrap();
        assert!(writer.drain().is_continue());
        assert!(matches!(r.caller(&[1; 160]), Err(Error::Wav(_))));
        assert!(matches!(
            r.agent(0, &[1; 160]),
            Err(Error::RecordingStopped)
        ));
        assert!(matches!(r.sync(), Err(Error::RecordingStopped)));
        assert!(matches!(block_on(r.finish()), Err(Error::RecordingStopped)));
        // Seen first by finish.
        let second = recordings.create(&blocker.join("s.wav"), 8000).unwrap();
        assert!(writer.drain().is_continue());
        assert!(matches!(block_on(second.finish()), Err(Error::Wav(_))));
        assert!(writer.drain().is_continue());
        assert_eq!(recordings.open(), 0, "the failed recordings are forgotten");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn dropping_a_recorder_finishes_its_file() {
        let dir = temp_dir("drop");
        let path = dir.join("r.wav");
        let (recordings, mut writer) = Recordings::unstarted(Config::default());
        let mut r = recordings.create(&path, 8000).unwrap();
        r.caller(&[2; 320]).unwrap();
        drop(r);
        assert!(writer.drain().is_continue());
        assert_eq!(recordings.open(), 0);
        assert_eq!(read_stereo(&path).0, vec![2; 320]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn open_recordings_are_bounded() {
        let dir = temp_dir("bounded");
        let (recordings, mut writer) = Recordings::unstarted(Config {
            queue: 8,
            max_open: 1,
        });
        let first = recordings.create(&dir.join("a.wav"), 8000).unwrap();
        assert!(matches!(
            recordings.create(&dir.join("b.wav"), 8000),
            Err(Error::TooManyRecordings { limit: 1 })
        ));
        let finished = first.finish();
        // Open until the writer has finished it.
        assert_eq!(recordings.open(), 1);
        assert!(writer.drain().is_continue());
        assert_eq!(recordings.open(), 0);
        block_on(finished).unwrap();
        recordings.create(&dir.join("b.wav"), 8000).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_finish_resolves_even_if_the_writer_never_sees_it() {
        let dir = temp_dir("unseen");
        let (recordings, writer) = Recordings::unstarted(Config::default());
        let r = recordings.create(&dir.join("r.wav"), 8000).unwrap();
        let finished = r.finish();
        // A writer gone with the messages still queued (it stopped, or it panicked).
        drop(writer);
        assert!(finished.is_done());
        assert!(matches!(block_on(finished), Err(Error::RecordingStopped)));
    }

    #[test]
    fn handles_move_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Recordings>();
        send_sync::<Recorder>();
        send_sync::<Closing<'static>>();
        send_sync::<Finished>();
    }

    #[test]
    fn waiting_for_a_writer_that_never_runs_is_bounded() {
        let (recordings, _writer) = Recordings::unstarted(Config::default());
        assert!(matches!(
            recordings.close().wait(Duration::ZERO),
            Err(Error::RecordingWriterBusy(_))
        ));
    }
}
