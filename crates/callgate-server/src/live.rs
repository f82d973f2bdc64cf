//! The live calls, so the admin API can reach a call's task.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use callgate_proto::{AudioFormat, Command, Error};
use callgate_store::CallId;
use tokio::sync::{Notify, oneshot};

/// Capacity of a call's operator mailbox. Policy: a request to a full mailbox is refused at
/// once (the admin API answers 503): operators act rarely, so a full mailbox means the call
/// task is stuck, and waiting would only pile up requests.
pub(crate) const OPERATOR_QUEUE: usize = 8;

/// What an operator asks of a live call.
#[derive(Debug)]
pub(crate) enum Request {
    /// A protocol command (hangup, DTMF).
    Command(Command),
    /// Play this audio (already in the format the phone plays: decoded and resampled off the
    /// call task) to the caller, through the playout.
    Play { audio: bytes::Bytes },
    /// Drop whatever the caller has not heard yet.
    Clear,
}

/// The call's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Done.
    Done,
    /// Queued this much audio, ms.
    Queued { ms: u64 },
    /// Not queued: the call already holds as much operator audio as it may
    /// (`media::MAX_OPERATOR_MS`).
    QueueFull,
    /// Cleared.
    Cleared { dropped_ms: u64, played_ms: u64 },
}

/// A request from an operator, with the call's verdict sent back.
#[derive(Debug)]
pub(crate) struct Operator {
    pub(crate) request: Request,
    pub(crate) reply: oneshot::Sender<Result<Reply, Error>>,
}

/// A call's operator mailbox. Unlike a tokio channel, it allocates nothing until an operator
/// actually writes to it (a bounded tokio mpsc preallocates a 32-slot block: ~2 KB per call).
#[derive(Debug)]
pub(crate) struct Mailbox {
    inner: Mutex<Inner>,
    notify: Notify,
    /// The call's agent audio format: what its phone plays, and what operator audio is
    /// converted to.
    format: AudioFormat,
}

#[derive(Debug, Default)]
struct Inner {
    ops: VecDeque<Operator>,
    closed: bool,
}

/// Why a request was not posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Too many requests are waiting.
    Full,
    /// The call task no longer takes requests.
    Closed,
}

impl Mailbox {
    /// The call's agent audio format (what its phone plays).
    pub(crate) fn format(&self) -> AudioFormat {
        self.format
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A push or a pop cannot leave the queue invalid, even if a holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts a request without waiting.
    pub(crate) fn post(&self, op: Operator) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        if inner.ops.len() >= OPERATOR_QUEUE {
            return Err(Refused::Full);
        }
        inner.ops.push_back(op);
        drop(inner);
        self.notify.notify_one();
        Ok(())
    }

    /// The call no longer takes requests: later posts are refused, and requests still
    /// waiting are dropped (their askers learn the call is gone).
    pub(crate) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.ops.clear();
    }

    /// The next request waiting, if any.
    pub(crate) fn try_recv(&self) -> Option<Operator> {
        self.lock().ops.pop_front()
    }

    /// Resolves after a post. The call keeps one of these pinned across turns (registering a
    /// waiter once, not every turn) and drains the mailbox with `try_recv` when it fires; a
    /// post between two of them leaves a permit, so none is missed.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

/// Live calls by ID.
#[derive(Debug, Default)]
pub(crate) struct LiveCalls {
    calls: Mutex<HashMap<CallId, Arc<Mailbox>>>,
}

impl LiveCalls {
    fn lock(&self) -> MutexGuard<'_, HashMap<CallId, Arc<Mailbox>>> {
        // The map stays valid even if a holder panicked: every operation is a single insert,
        // remove or lookup.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a call whose phone plays agent audio in `format`; the returned mailbox is the
    /// call task's operator input.
    pub(crate) fn register(&self, id: CallId, format: AudioFormat) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            inner: Mutex::default(),
            notify: Notify::new(),
            format,
        });
        self.lock().insert(id, mailbox.clone());
        mailbox
    }

    /// Forgets a call.
    pub(crate) fn remove(&self, id: &CallId) {
        self.lock().remove(id);
    }

    /// The operator mailbox of a live call.
    pub(crate) fn get(&self, id: &CallId) -> Option<Arc<Mailbox>> {
        self.lock().get(id).cloned()
    }

    /// How many calls are live.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
