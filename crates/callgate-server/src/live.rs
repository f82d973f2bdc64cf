//! The live calls, so the admin API can reach a call's task.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use callgate_proto::{Command, Error};
use callgate_store::CallId;
use tokio::sync::{mpsc, oneshot};

/// Capacity of a call's operator channel. Policy: the admin handler awaits a slot under its
/// request timeout; operators act rarely, so a full channel means the call task is stuck.
pub(crate) const OPERATOR_QUEUE: usize = 8;

/// What an operator asks of a live call.
#[derive(Debug)]
pub(crate) enum Request {
    /// A protocol command (hangup, DTMF).
    Command(Command),
    /// Play mono audio at this rate to the caller, through the playout.
    Play { samples: Vec<i16>, rate: u32 },
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
    /// Cleared.
    Cleared { dropped_ms: u64, played_ms: u64 },
}

/// A request from an operator, with the call's verdict sent back.
#[derive(Debug)]
pub(crate) struct Operator {
    pub(crate) request: Request,
    pub(crate) reply: oneshot::Sender<Result<Reply, Error>>,
}

/// Live calls by ID.
#[derive(Debug, Default)]
pub(crate) struct LiveCalls {
    calls: Mutex<HashMap<CallId, mpsc::Sender<Operator>>>,
}

impl LiveCalls {
    fn lock(&self) -> MutexGuard<'_, HashMap<CallId, mpsc::Sender<Operator>>> {
        // The map stays valid even if a holder panicked: every operation is a single insert,
        // remove or lookup.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a call; the returned receiver is the call task's operator input.
    pub(crate) fn register(&self, id: CallId) -> mpsc::Receiver<Operator> {
        let (tx, rx) = mpsc::channel(OPERATOR_QUEUE);
        self.lock().insert(id, tx);
        rx
    }

    /// Forgets a call.
    pub(crate) fn remove(&self, id: &CallId) {
        self.lock().remove(id);
    }

    /// The operator channel of a live call.
    pub(crate) fn get(&self, id: &CallId) -> Option<mpsc::Sender<Operator>> {
        self.lock().get(id).cloned()
    }

    /// How many calls are live.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
