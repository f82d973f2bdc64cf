//! Call records: what callgate keeps of every call, and where.
//!
//! # Layout
//! - [`record`]: the values: [`NewCall`], [`Ended`], [`CallRecord`], [`EventRecord`],
//!   [`TranscriptEntry`], [`CallFilter`]...
//! - [`Store`] and [`Reader`]: the synchronous write and read sides a backend implements.
//! - [`sqlite`]: the embedded default backend (WAL, schema migrations, read-only readers).
//! - [`writer`]: [`StoreHandle`], the async front. One writer thread owns the [`Store`] behind
//!   a bounded channel, commits whatever is queued in one transaction, and only writes.
//! - [`reader`]: the reader threads ([`reader::READERS`]), each with its own read-only
//!   [`Reader`], behind their own bounded channel. Listings and lookups never wait for the
//!   writer's transactions, and never delay a write.
//!
//! # Policies
//! Every awaited operation, read or write, is bounded by the handle's timeout. Each channel's
//! policy when full is in the [`writer`] and [`reader`] docs. In short: progress updates may
//! be dropped. Events and transcript entries offered without waiting are given back. A
//! drop guard's end is never dropped.
//!
//! # Invariants
//! A record is inserted when the call starts and ended exactly once; a record whose `ended_at`
//! is still null when the store opens was left by a crash and is ended with `interrupted`.
//! Event and transcript entries are numbered from 1 per call, in the order appended.
//! This crate depends on no other callgate crate: codes (protocol, end reason, route, agent,
//! speaker) are strings here.

pub mod reader;
pub mod record;
pub mod sqlite;
pub mod writer;

pub use record::{
    CallFilter, CallId, CallRecord, Counters, Ended, EventRecord, NewCall, NewEvent,
    NewTranscriptEntry, TranscriptEntry, UnixMillis,
};
pub use sqlite::{SqliteReader, SqliteStore};
pub use writer::StoreHandle;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The data directory or database file could not be prepared.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// The path that failed.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database was written by a newer callgate.
    #[error("database schema version {found} is newer than this callgate supports ({supported})")]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Newest version known here.
        supported: i64,
    },
    /// The transaction holding this operation failed to commit.
    #[error("commit failed: {detail}")]
    Commit {
        /// What the database said.
        detail: String,
    },
    /// A store thread could not be started (the system refused a new thread). This is a
    /// resource problem of the host, not a configuration error.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// Which thread.
        name: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The writer (for a write) or the readers (for a read) are gone: the store was closed,
    /// or its threads failed.
    #[error("the store is not running")]
    Closed,
    /// The writer or a reader did not accept or answer in time.
    #[error("the store did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// The write side of call-record storage. Methods are synchronous: a backend runs on the
/// writer thread, the only thread that writes.
pub trait Store: Send + 'static {
    /// The read side of this backend.
    type Reader: Reader;
    /// Opens a read-only view of the same data for a reader thread. It sees what this store
    /// has committed (a backend may show more, see [`sqlite::SqliteStore::open_in_memory`]).
    fn open_reader(&self) -> Result<Self::Reader, Error>;
    /// Runs the queued operations of one batch in one transaction.
    fn transaction<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error>
    where
        Self: Sized;
    /// Inserts the record of a call that just started.
    fn insert_call(&mut self, call: &NewCall) -> Result<(), Error>;
    /// Notes when the call was answered.
    fn mark_answered(&mut self, id: &CallId, at: UnixMillis) -> Result<(), Error>;
    /// Writes the running audio counters, DTMF and usage (a JSON object) of a live call.
    /// A `usage` of `None` leaves the stored usage as it is.
    fn update_progress(
        &mut self,
        id: &CallId,
        counters: &Counters,
        dtmf: &str,
        usage: Option<&str>,
    ) -> Result<(), Error>;
    /// Ends the record (once; a second end is ignored).
    fn end_call(&mut self, id: &CallId, ended: &Ended) -> Result<(), Error>;
    /// Stores the phone system's CDR, verbatim.
    fn set_cdr(&mut self, id: &CallId, raw: &str) -> Result<(), Error>;
    /// Appends to the call's event log, in order.
    fn append_events(&mut self, id: &CallId, events: &[NewEvent]) -> Result<(), Error>;
    /// Appends to the call's transcript, in order.
    fn append_transcript(
        &mut self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
    ) -> Result<(), Error>;
    /// Ends every record left open (by a crash) with end reason `interrupted`.
    fn end_interrupted(&mut self, at: UnixMillis) -> Result<u64, Error>;
    /// Deletes an ended call's record, events and transcript; false if there is no ended
    /// call with this id (a live call is never deleted).
    fn delete_call(&mut self, id: &CallId) -> Result<bool, Error>;
    /// Deletes up to `limit` calls that ended before `before` (oldest first), with their
    /// events and transcripts; returns their ids.
    fn delete_ended_before(&mut self, before: UnixMillis, limit: u32)
    -> Result<Vec<CallId>, Error>;
}

/// The read side of call-record storage, run on the reader threads, never on the writer.
pub trait Reader: Send + 'static {
    /// The calls `filter` selects, newest first.
    fn list_calls(&mut self, filter: &CallFilter) -> Result<Vec<CallRecord>, Error>;
    /// One call.
    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, Error>;
    /// A page of one call's event log, or `None` if the call does not exist.
    fn events(&mut self, id: &CallId, page: Page) -> Result<Option<Vec<EventRecord>>, Error>;
    /// A page of one call's transcript, or `None` if the call does not exist.
    fn transcript(
        &mut self,
        id: &CallId,
        page: Page,
    ) -> Result<Option<Vec<TranscriptEntry>>, Error>;
}

/// Which entries of a call's event log or transcript: those after sequence number `after`
/// (0: from the start), at most `limit`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The last sequence number already seen.
    pub after: u64,
    /// The most entries.
    pub limit: u32,
}

impl Page {
    /// Every entry.
    pub fn all() -> Self {
        Self {
            after: 0,
            limit: u32::MAX,
        }
    }
}
