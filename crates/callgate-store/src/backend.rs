//! The backend chosen at start: SQLite in the data directory (the default) or PostgreSQL
//! (`store_url`), behind one [`Store`] type the writer runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    CallFilter, CallId, CallRecord, Counters, Ended, Error, EventRecord, NewCall, NewEvent,
    NewTranscriptEntry, Page, PgReader, PgStore, PgUrl, Reader, SchemaStatus, SqliteReader,
    SqliteStore, Stats, Store, TranscriptEntry, UnixMillis, postgres, sqlite,
};

/// Where call records live.
#[allow(
    clippy::large_enum_variant,
    reason = "one per store (or thread), built once and never moved on a hot path"
)]
#[derive(Debug, Clone)]
pub enum Location {
    /// `callgate.db` in the data directory.
    Sqlite {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// A PostgreSQL database; the journal lives in the data directory.
    Postgres {
        /// The database.
        url: PgUrl,
        /// The data directory (for the journal).
        data_dir: PathBuf,
    },
}

impl Location {
    /// Opens the store, applying pending migrations (a schema newer than this callgate
    /// knows is refused with [`Error::SchemaTooNew`]).
    pub fn open(&self) -> Result<AnyStore, Error> {
        Ok(match self {
            Self::Sqlite { data_dir } => {
                let journal = PgStore::journal_path(data_dir);
                if journal.metadata().is_ok_and(|m| m.len() > 0) {
                    tracing::error!(
                        path = %journal.display(),
                        "The PostgreSQL store's journal holds records not yet written, and this \
                         node now uses SQLite: start it with its store_url again to write them."
                    );
                }
                AnyStore::Sqlite(SqliteStore::open(data_dir)?)
            }
            Self::Postgres { url, data_dir } => AnyStore::Postgres(PgStore::open(url, data_dir)?),
        })
    }

    /// Where the schema stands, changing nothing.
    pub fn schema_status(&self) -> Result<SchemaStatus, Error> {
        match self {
            Self::Sqlite { data_dir } => sqlite::schema_status(data_dir),
            Self::Postgres { url, .. } => postgres::schema_status(url),
        }
    }

    /// Applies the pending migrations; returns the status before.
    pub fn migrate(&self) -> Result<SchemaStatus, Error> {
        let before = self.schema_status()?;
        if before.is_too_new() {
            return Err(Error::SchemaTooNew {
                found: before.current,
                supported: before.known,
            });
        }
        match self {
            Self::Sqlite { data_dir } => drop(SqliteStore::open(data_dir)?),
            Self::Postgres { url, .. } => drop(postgres::apply_migrations(url)?),
        }
        Ok(before)
    }
}

/// Either backend's writer side.
#[allow(
    clippy::large_enum_variant,
    reason = "one per store (or thread), built once and never moved on a hot path"
)]
#[derive(Debug)]
pub enum AnyStore {
    /// SQLite.
    Sqlite(SqliteStore),
    /// PostgreSQL.
    Postgres(PgStore),
}

/// Either backend's reader side.
#[allow(
    clippy::large_enum_variant,
    reason = "one per store (or thread), built once and never moved on a hot path"
)]
#[derive(Debug)]
pub enum AnyReader {
    /// SQLite.
    Sqlite(SqliteReader),
    /// PostgreSQL.
    Postgres(PgReader),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Self::Sqlite($s) => $e,
            Self::Postgres($s) => $e,
        }
    };
}

impl Store for AnyStore {
    type Reader = AnyReader;

    fn open_reader(&self) -> Result<AnyReader, Error> {
        Ok(match self {
            Self::Sqlite(s) => AnyReader::Sqlite(s.open_reader()?),
            Self::Postgres(s) => AnyReader::Postgres(s.open_reader()?),
        })
    }

    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        match self {
            Self::Sqlite(s) => s.begin()?,
            Self::Postgres(s) => s.begin(),
        }
        let result = f(self);
        each!(self, s => s.finish(result))
    }

    fn attach_stats(&mut self, stats: Arc<Stats>) {
        each!(self, s => s.attach_stats(stats))
    }

    fn tick_interval(&self) -> Option<Duration> {
        each!(self, s => s.tick_interval())
    }

    fn tick(&mut self) {
        each!(self, s => s.tick())
    }

    fn closing(&mut self) {
        each!(self, s => s.closing())
    }

    fn insert_call(&mut self, call: &NewCall) -> Result<(), Error> {
        each!(self, s => s.insert_call(call))
    }

    fn mark_answered(&mut self, id: &CallId, at: UnixMillis) -> Result<(), Error> {
        each!(self, s => s.mark_answered(id, at))
    }

    fn update_progress(
        &mut self,
        id: &CallId,
        counters: &Counters,
        dtmf: &str,
        usage: Option<&str>,
    ) -> Result<(), Error> {
        each!(self, s => s.update_progress(id, counters, dtmf, usage))
    }

    fn end_call(&mut self, id: &CallId, ended: &Ended) -> Result<(), Error> {
        each!(self, s => s.end_call(id, ended))
    }

    fn set_cdr(&mut self, id: &CallId, raw: &str) -> Result<(), Error> {
        each!(self, s => s.set_cdr(id, raw))
    }

    fn set_usage(&mut self, id: &CallId, usage: &str) -> Result<(), Error> {
        each!(self, s => s.set_usage(id, usage))
    }

    fn append_events(&mut self, id: &CallId, events: &[NewEvent]) -> Result<(), Error> {
        each!(self, s => s.append_events(id, events))
    }

    fn append_transcript(
        &mut self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
    ) -> Result<(), Error> {
        each!(self, s => s.append_transcript(id, entries))
    }

    fn end_interrupted(&mut self, node: &str, at: UnixMillis) -> Result<u64, Error> {
        each!(self, s => s.end_interrupted(node, at))
    }

    fn enqueue_deliveries(&mut self, rows: &[crate::outbox::NewDelivery]) -> Result<(), Error> {
        each!(self, s => s.enqueue_deliveries(rows))
    }

    fn delete_call(&mut self, id: &CallId) -> Result<bool, Error> {
        each!(self, s => s.delete_call(id))
    }

    fn delete_ended_before(
        &mut self,
        before: UnixMillis,
        limit: u32,
    ) -> Result<Vec<CallId>, Error> {
        each!(self, s => s.delete_ended_before(before, limit))
    }
}

impl Reader for AnyReader {
    fn list_calls(&mut self, filter: &CallFilter) -> Result<Vec<CallRecord>, Error> {
        each!(self, r => r.list_calls(filter))
    }

    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, Error> {
        each!(self, r => r.call(id))
    }

    fn events(&mut self, id: &CallId, page: Page) -> Result<Option<Vec<EventRecord>>, Error> {
        each!(self, r => r.events(id, page))
    }

    fn transcript(
        &mut self,
        id: &CallId,
        page: Page,
    ) -> Result<Option<Vec<TranscriptEntry>>, Error> {
        each!(self, r => r.transcript(id, page))
    }
}
