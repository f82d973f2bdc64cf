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
//!
//! Priority: on Linux the reader threads run at nice [`READER_NICE`]. A read of a thousand live
//! calls for the console takes a few milliseconds of CPU; on a machine with no CPU to spare it
//! would take them from the call tasks, which run at the default priority and must keep 20 ms
//! audio frames on time. The reads then wait instead; on an idle machine nothing changes.

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

/// The nice value (Linux) of the reader threads: below the call tasks' default 0.
pub const READER_NICE: i32 = 10;

/// The queue the reader threads share.
pub(crate) type Queue = Arc<Mutex<mpsc::Receiver<Read>>>;

/// One reader thread's loop: it returns once the queue is closed and empty.
pub(crate) fn run(mut reader: impl Reader, queue: Queue) {
    lower_priority();
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

/// Lowers the calling thread's priority to [`READER_NICE`] (on Linux, `setpriority` on the
/// calling task changes that thread only). Refused (a sandbox without the right): the reads run
/// at the default priority, as on other systems.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, READER_NICE) {
        tracing::debug!(%error, "store reader: could not lower its priority");
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_reader_thread_lowers_its_own_priority_and_only_its_own() {
        let before = rustix::process::getpriority_process(None).expect("own priority");
        let reader = std::thread::spawn(|| {
            lower_priority();
            rustix::process::getpriority_process(None).expect("reader's priority")
        })
        .join()
        .expect("reader thread");
        // A process already running at READER_NICE or lower priority cannot tell.
        if before < READER_NICE {
            assert_eq!(reader, READER_NICE, "the reader thread runs at READER_NICE");
        }
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own priority"),
            before,
            "the other threads (the caller's) keep their priority"
        );
    }
}
