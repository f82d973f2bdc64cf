//! The reader threads: reads never wait behind the writer.
//!
//! [`READERS`] threads, each with its own read-only [`Reader`] on the same
//! database, take requests from one shared bounded queue ([`READER_QUEUE`] entries): whichever
//! thread is free answers the next request. A read runs outside the writer's transactions, so
//! an admin API polling the calls never delays a call start, and a slow read holds up only
//! other reads.
//!
//! Queue policy: every read is awaited with the handle's timeout (waiting for room in the
//! queue counts against it); on expiry the caller gets [`Error::Timeout`] and a
//! reader that later picks up the abandoned request skips it. Reads are never dropped silently.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use crate::{CallFilter, CallId, CallRecord, Error, EventRecord, Page, Reader, TranscriptEntry};

/// How many reader threads [`StoreHandle::start`](crate::StoreHandle::start) runs.
pub const READERS: usize = 2;
/// How many reads may wait for a reader.
pub const READER_QUEUE: usize = 64;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the readers.
pub(crate) enum Read {
    List(Box<CallFilter>, Reply<Vec<CallRecord>>),
    Call(CallId, Reply<Option<CallRecord>>),
    Events(CallId, Page, Reply<Option<Vec<EventRecord>>>),
    Transcript(CallId, Page, Reply<Option<Vec<TranscriptEntry>>>),
    /// Refuse new reads (then say so), answer those queued, then stop.
    Close(Reply<()>),
}

/// The queue the reader threads share.
pub(crate) type Queue = Arc<Mutex<mpsc::Receiver<Read>>>;

/// One reader thread's loop: it returns once the queue is closed and empty.
pub(crate) fn run(mut reader: impl Reader, queue: Queue) {
    loop {
        let read = {
            // The lock is held only while waiting for the next request, so free threads
            // queue up here and each request goes to exactly one of them. Nothing panics
            // while holding it; a poisoned lock still guards a valid receiver.
            let mut rx = queue.lock().unwrap_or_else(PoisonError::into_inner);
            match rx.blocking_recv() {
                Some(Read::Close(done)) => {
                    rx.close();
                    // The closer may have given up waiting; nothing to do then.
                    let _ = done.send(Ok(()));
                    continue;
                }
                Some(read) => read,
                None => return,
            }
        };
        answer(&mut reader, read);
    }
}

fn answer(reader: &mut impl Reader, read: Read) {
    fn send<T>(tx: Reply<T>, query: impl FnOnce() -> Result<T, Error>) {
        // The asker timed out and left: no one would see the answer.
        if tx.is_closed() {
            return;
        }
        // The asker may leave while the query runs; nothing to do then.
        let _ = tx.send(query());
    }
    match read {
        Read::List(filter, tx) => send(tx, || reader.list_calls(&filter)),
        Read::Call(id, tx) => send(tx, || reader.call(&id)),
        Read::Events(id, page, tx) => send(tx, || reader.events(&id, page)),
        Read::Transcript(id, page, tx) => send(tx, || reader.transcript(&id, page)),
        Read::Close(_) => {}
    }
}
