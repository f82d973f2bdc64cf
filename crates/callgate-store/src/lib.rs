//! Call records: what callgate keeps of every call, and where.
//!
//! # Layout
//! - [`record`]: the values: [`NewCall`], [`Ended`], [`CallRecord`], [`EventRecord`],
//!   [`TranscriptEntry`], [`CallFilter`]...
//! - [`Store`] and [`Reader`]: the synchronous write and read sides a backend implements.
//! - [`sqlite`]: the embedded default backend (WAL, schema migrations, read-only readers).
//! - [`postgres`]: the shared backend of a cluster, with its local journal for the times the
//!   database is away (`journal`).
//! - [`backend`]: [`AnyStore`], either one, chosen by [`Location`] at start; schema status
//!   and migrations for `callgate migrate`.
//! - [`writer`]: [`StoreHandle`], the async front. One writer thread owns the [`Store`] behind
//!   a bounded channel, commits whatever is queued in one transaction, and only writes.
//! - [`notice`]: what the writer announces after each commit (call started, answered, DTMF,
//!   transcript turns, ended) to its [`notice::Tap`]: the live event stream and webhooks.
//! - [`outbox`]: the webhook outbox: rows added in the writer's transactions, delivered by
//!   the server through an [`outbox::Outbox`] connection of its own.
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

pub mod backend;
mod files;
mod journal;
#[macro_use]
pub mod nodes;
pub mod notice;
pub mod outbox;
mod pg;
pub mod postgres;
pub mod reader;
pub mod record;
pub mod sqlite;
mod stats;
pub mod writer;

pub use backend::{AnyReader, AnyStore, Location};
pub use journal::JOURNAL_MAX_BYTES;
pub use nodes::{Beat, LostNode, NodeInfo, NodeRecord, NodeState, Registry};
pub use postgres::{PgReader, PgStore, PgUrl};
pub use stats::{LATENCY_BUCKETS, LatencyHistogram, Stats};

pub use record::{
    CallFilter, CallId, CallRecord, Counters, Ended, EventRecord, NewCall, NewEvent,
    NewTranscriptEntry, TextMatch, TranscriptEntry, UnixMillis,
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
    /// PostgreSQL reported an error, or could not be reached.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// The `store_url` (or its CA file) cannot work.
    #[error("invalid store_url: {problem}")]
    StoreUrl {
        /// What is wrong, naming the setting.
        problem: String,
    },
    /// The local journal could not be read or written.
    #[error("store journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The local journal is at its bound: the batch was not kept.
    #[error(
        "the store journal is full ({bytes} of {max} bytes): the database has been away too long"
    )]
    JournalFull {
        /// Bytes in the journal.
        bytes: u64,
        /// Its bound.
        max: u64,
    },
    /// The operation needs the database, which is unavailable (the store is journaling).
    #[error("the database is unavailable")]
    Unavailable,
    /// A call with this ID is already stored.
    #[error("call {0} is already stored")]
    Duplicate(CallId),
    /// There is no call with this ID.
    #[error("no call {0}")]
    NoSuchCall(CallId),
    /// The data directory or database file could not be prepared.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// The path that failed.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database was written by a newer callgate.
    #[error(
        "database schema version {found} is newer than this callgate supports ({supported}): \
         run the newer callgate, or restore a backup"
    )]
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
    /// Replaces the call's usage (a JSON object), ended or not: an agent's last figures can
    /// arrive after its call's record ended (the agent hears of the end after the record).
    fn set_usage(&mut self, id: &CallId, usage: &str) -> Result<(), Error>;
    /// Appends to the call's event log, in order.
    fn append_events(&mut self, id: &CallId, events: &[NewEvent]) -> Result<(), Error>;
    /// Appends to the call's transcript, in order.
    fn append_transcript(
        &mut self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
    ) -> Result<(), Error>;
    /// Receives the counters the store keeps up to date (the writer's; a backend may add its
    /// own, like the journal's backlog).
    fn attach_stats(&mut self, stats: std::sync::Arc<Stats>) {
        let _ = stats;
    }
    /// How often the writer calls [`Store::tick`] when it has nothing else to do (`None`:
    /// never).
    fn tick_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Background work between batches (the PostgreSQL store retries its journal).
    fn tick(&mut self) {}
    /// The writer is about to stop, after its last batch: last chance for background work
    /// (the PostgreSQL store tries its journal once more, whatever its backoff says).
    fn closing(&mut self) {}
    /// Ends every record `node` left open (by a crash) with end reason `interrupted`, and
    /// records with no node (written before records carried one). Other nodes' records are
    /// left alone: with a shared database they may be live.
    fn end_interrupted(&mut self, node: &str, at: UnixMillis) -> Result<u64, Error>;
    /// Adds rows to the webhook outbox (a row already there is left as it is).
    fn enqueue_deliveries(&mut self, rows: &[outbox::NewDelivery]) -> Result<(), Error>;
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

/// One schema migration of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Its number, from 1, in order.
    pub version: i64,
    /// What it does, for `callgate migrate`.
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

/// Where a database's schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// `sqlite` or `postgresql`.
    pub backend: &'static str,
    /// The version applied (0: none).
    pub current: i64,
    /// The newest version this callgate knows.
    pub known: i64,
    /// The migrations not applied yet, in order.
    pub pending: Vec<Migration>,
}

impl SchemaStatus {
    pub(crate) fn new(backend: &'static str, current: i64, migrations: &[Migration]) -> Self {
        Self {
            backend,
            current,
            known: migrations.last().map_or(0, |m| m.version),
            pending: migrations
                .iter()
                .filter(|m| m.version > current)
                .copied()
                .collect(),
        }
    }

    /// Whether the database was written by a newer callgate.
    pub fn is_too_new(&self) -> bool {
        self.current > self.known
    }
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
