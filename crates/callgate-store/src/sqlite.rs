//! The embedded default backend: one SQLite file in the data dir, in WAL mode.
//!
//! `synchronous = NORMAL` in WAL mode means a committed transaction survives a crash of the
//! process (what `kill -9` tests), and only a power loss can take the last few commits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, ToSql, params};

use crate::files::{private_dir, private_file};
use crate::record::{AudioFormats, RECORD_COLUMNS, prefix_end, raw_json, text_value};
use crate::{
    CallFilter, CallId, CallRecord, Counters, Ended, Error, EventRecord, Migration, NewCall,
    NewEvent, NewTranscriptEntry, Page, Reader, SchemaStatus, Store, TextMatch, TranscriptEntry,
    UnixMillis,
};

/// Schema migrations, applied in order; `PRAGMA user_version` is how many have run.
/// Never edit one that has shipped: append a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "calls, call_events",
        sql: r#"
CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    protocol    TEXT NOT NULL,
    caller      TEXT NOT NULL,
    callee      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    call_config TEXT,
    phone_output_audio_format TEXT NOT NULL,
    phone_input_audio_format  TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    answered_at INTEGER,
    ended_at    INTEGER,
    end_reason  TEXT,
    hangup_by   TEXT,
    bytes_in    INTEGER NOT NULL DEFAULT 0,
    bytes_out   INTEGER NOT NULL DEFAULT 0,
    frames_in   INTEGER NOT NULL DEFAULT 0,
    frames_out  INTEGER NOT NULL DEFAULT 0,
    dtmf        TEXT NOT NULL DEFAULT '',
    cdr         TEXT
);
CREATE INDEX calls_started ON calls (started_at DESC);
CREATE INDEX calls_open ON calls (ended_at) WHERE ended_at IS NULL;
CREATE TABLE call_events (
    call_id TEXT NOT NULL REFERENCES calls (id),
    seq     INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL,
    PRIMARY KEY (call_id, seq)
) WITHOUT ROWID;
"#,
    },
    Migration {
        version: 2,
        name: "calls.recording",
        sql: r#"
ALTER TABLE calls ADD COLUMN recording INTEGER NOT NULL DEFAULT 0;
"#,
    },
    // The agent platform: who handled the call, what it cost, what was said. The indexes carry
    // `id` too, so a filtered page is read in listing order straight from the index, cursor
    // included, without sorting ties.
    Migration {
        version: 3,
        name: "calls.route, agent, usage; call_transcript",
        sql: r#"
ALTER TABLE calls ADD COLUMN route TEXT;
ALTER TABLE calls ADD COLUMN agent TEXT;
ALTER TABLE calls ADD COLUMN usage TEXT;
CREATE INDEX calls_route ON calls (route, started_at DESC, id DESC);
CREATE INDEX calls_agent ON calls (agent, started_at DESC, id DESC);
CREATE TABLE call_transcript (
    call_id     TEXT NOT NULL REFERENCES calls (id),
    seq         INTEGER NOT NULL,
    speaker     TEXT NOT NULL,
    text        TEXT NOT NULL,
    start_ms    INTEGER NOT NULL,
    end_ms      INTEGER NOT NULL,
    interrupted INTEGER NOT NULL,
    PRIMARY KEY (call_id, seq)
) WITHOUT ROWID;
"#,
    },
    // Who placed the call: the name of the API key the phone system presented.
    Migration {
        version: 4,
        name: "calls.key_name",
        sql: r#"
ALTER TABLE calls ADD COLUMN key_name TEXT;
"#,
    },
    // The node that holds the call: a node closes only its own leftovers at start, and the
    // admin API filters by node.
    Migration {
        version: 5,
        name: "calls.node, nodes",
        sql: concat!(
            r#"
ALTER TABLE calls ADD COLUMN node TEXT;
CREATE INDEX calls_node ON calls (node, started_at DESC, id DESC);
CREATE INDEX calls_caller ON calls (caller, started_at DESC, id DESC);
CREATE INDEX calls_callee ON calls (callee, started_at DESC, id DESC);
"#,
            nodes_sql!()
        ),
    },
    // Webhooks: events waiting for their endpoints.
    Migration {
        version: 6,
        name: "webhook_outbox",
        sql: crate::outbox::outbox_sql!("INTEGER PRIMARY KEY AUTOINCREMENT", "BOOLEAN"),
    },
];

/// Call records in one SQLite database: the writer's connection.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// Where [`Store::open_reader`] connects.
    source: Source,
    /// Records were deleted in the current transaction: once it commits, the WAL is
    /// checkpointed and truncated so their pages leave it too.
    deleted: bool,
}

/// Which database a store is, so readers can open the same one.
#[derive(Debug, Clone)]
enum Source {
    /// A file, in WAL mode.
    File(PathBuf),
    /// A named shared-cache in-memory database (a `file:` URI).
    Memory(String),
}

/// A read-only connection to a [`SqliteStore`]'s database, for a reader thread.
#[derive(Debug)]
pub struct SqliteReader {
    conn: Connection,
}

impl SqliteStore {
    /// Copies the WAL into the database and truncates it to zero bytes, so what was deleted
    /// is gone from the WAL too. Readers in the middle of a read can keep some frames from
    /// being copied this time: that is logged at debug, and the next checkpoint takes them.
    fn truncate_wal(&self) {
        let result = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        match result {
            Ok(0) => {}
            Ok(_) => tracing::debug!("WAL checkpoint blocked by a reader; the next one retries."),
            Err(error) => tracing::warn!(%error, "Cannot checkpoint the WAL."),
        }
    }
}

impl Drop for SqliteStore {
    /// At shutdown the WAL is emptied into the database, so no record, deleted or not,
    /// stays behind in it.
    fn drop(&mut self) {
        if matches!(self.source, Source::File(_)) {
            self.truncate_wal();
        }
    }
}

/// How long a connection waits for a lock held by another before it reports busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

impl SqliteStore {
    /// Opens (creating if needed) `callgate.db` in `data_dir` and migrates it.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let open_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Open { path, source }
        };
        private_dir(data_dir).map_err(open_error(data_dir))?;
        let path = data_dir.join("callgate.db");
        // Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        // database file's permissions.
        private_file(&path).map_err(open_error(&path))?;
        let conn = Connection::open(&path)?;
        Self::from_connection(conn, Source::File(path))
    }

    /// A fresh in-memory database (tests). It is a named shared-cache database, so the
    /// readers from [`Store::open_reader`] see it; it lives while any connection to it is
    /// open. Its readers read uncommitted data (shared-cache readers would otherwise lock
    /// tables against the writer): they may see a batch before its commit, which a file
    /// store in WAL mode never shows.
    pub fn open_in_memory() -> Result<Self, Error> {
        let uri = format!(
            "file:callgate-{}?mode=memory&cache=shared",
            uuid::Uuid::now_v7().simple()
        );
        let conn = Connection::open(&uri)?;
        Self::from_connection(conn, Source::Memory(uri))
    }

    fn from_connection(conn: Connection, source: Source) -> Result<Self, Error> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted records are overwritten, not just unlinked from the b-tree: a deleted call
        // cannot be read back from the file's free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Room for every statement the writer runs (about twenty), so that none is evicted
        // and parsed again (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mut store = Self {
            conn,
            source,
            deleted: false,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), Error> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let supported = MIGRATIONS.last().map_or(0, |m| m.version);
        if version > supported {
            return Err(Error::SchemaTooNew {
                found: version,
                supported,
            });
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(m.sql)?;
            tx.pragma_update(None, "user_version", m.version)?;
            tx.commit()?;
            if version > 0 {
                tracing::info!(
                    version = m.version,
                    name = m.name,
                    "Applied a store migration."
                );
            }
        }
        Ok(())
    }

    /// Starts a batch's transaction. `BEGIN`, `COMMIT` and `ROLLBACK` are cached statements
    /// like every other write: the writer runs a batch for every few operations, and parsing
    /// them anew each time showed in its profile.
    pub(crate) fn begin(&mut self) -> Result<(), Error> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(())
    }

    /// Commits the batch's transaction, or rolls it back after a failure.
    pub(crate) fn finish<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        match result {
            Ok(v) => {
                self.conn.prepare_cached("COMMIT")?.execute([])?;
                if std::mem::take(&mut self.deleted) {
                    self.truncate_wal();
                }
                Ok(v)
            }
            Err(e) => {
                self.deleted = false;
                // Rolling back after a failure: a second failure here adds nothing to report.
                let _ = self
                    .conn
                    .prepare_cached("ROLLBACK")
                    .and_then(|mut s| s.execute([]));
                Err(e)
            }
        }
    }
}

/// The schema's state in `data_dir`'s database, changing nothing (a missing file is a
/// database with nothing applied).
pub fn schema_status(data_dir: &Path) -> Result<SchemaStatus, Error> {
    let path = data_dir.join("callgate.db");
    let current =
        match path.exists() {
            false => 0,
            true => Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?
                .query_row("PRAGMA user_version", [], |r| r.get(0))?,
        };
    Ok(SchemaStatus::new("sqlite", current, MIGRATIONS))
}

fn record(row: &Row<'_>) -> rusqlite::Result<CallRecord> {
    let count = |i: usize| -> rusqlite::Result<u64> { Ok(row.get::<_, i64>(i)?.max(0) as u64) };
    let time = |i: usize| -> rusqlite::Result<Option<UnixMillis>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(UnixMillis))
    };
    Ok(CallRecord {
        id: CallId::from_string(row.get(0)?),
        protocol: row.get(1)?,
        caller: row.get(2)?,
        callee: row.get(3)?,
        external_id: row.get(4)?,
        call_config: row.get::<_, Option<String>>(5)?.and_then(raw_json),
        audio_format: AudioFormats {
            phone_output_audio_format: row.get(6)?,
            phone_input_audio_format: row.get(7)?,
        },
        started_at: UnixMillis(row.get(8)?),
        answered_at: time(9)?,
        ended_at: time(10)?,
        end_reason: row.get(11)?,
        hangup_by: row.get(12)?,
        bytes_in: count(13)?,
        bytes_out: count(14)?,
        frames_in: count(15)?,
        frames_out: count(16)?,
        dtmf: row.get(17)?,
        cdr: row.get::<_, Option<String>>(18)?.and_then(raw_json),
        recording: row.get::<_, i64>(19)? != 0,
        route: row.get(20)?,
        agent: row.get(21)?,
        usage: row.get::<_, Option<String>>(22)?.and_then(raw_json),
        key_name: row.get(23)?,
        node: row.get(24)?,
    })
}

/// The listing query for the filters that are set. The text is assembled only from fixed
/// fragments chosen by which filters are present (so each shape is prepared once and can use
/// its index); every value is a bound parameter, named after its filter.
fn list_sql(f: &CallFilter) -> String {
    let mut sql = format!("SELECT {RECORD_COLUMNS} FROM calls WHERE 1");
    let fragments = [
        (f.route.is_some(), " AND route = :route"),
        (f.agent.is_some(), " AND agent = :agent"),
        (f.protocol.is_some(), " AND protocol = :protocol"),
        (f.end_reason.is_some(), " AND end_reason = :end_reason"),
        (f.live, " AND ended_at IS NULL"),
        (f.node.is_some(), " AND node = :node"),
        (f.since.is_some(), " AND started_at >= :since"),
        (f.until.is_some(), " AND started_at < :until"),
        (
            matches!(f.caller, Some(TextMatch::Exact(_))),
            " AND caller = :caller",
        ),
        (
            matches!(f.caller, Some(TextMatch::Prefix(_))),
            " AND caller >= :caller",
        ),
        (prefix_end(&f.caller).is_some(), " AND caller < :caller_end"),
        (
            matches!(f.callee, Some(TextMatch::Exact(_))),
            " AND callee = :callee",
        ),
        (
            matches!(f.callee, Some(TextMatch::Prefix(_))),
            " AND callee >= :callee",
        ),
        (prefix_end(&f.callee).is_some(), " AND callee < :callee_end"),
        (
            f.before.is_some(),
            " AND (started_at, id) < (SELECT started_at, id FROM calls WHERE id = :before)",
        ),
    ];
    for (set, fragment) in fragments {
        if set {
            sql.push_str(fragment);
        }
    }
    sql.push_str(" ORDER BY started_at DESC, id DESC LIMIT :limit");
    sql
}

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    type Reader = SqliteReader;

    fn open_reader(&self) -> Result<SqliteReader, Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match &self.source {
            Source::File(path) => Connection::open_with_flags(path, flags)?,
            Source::Memory(uri) => {
                let conn = Connection::open_with_flags(uri, flags)?;
                // Shared-cache readers take table locks that would make the writer fail
                // with SQLITE_LOCKED (busy_timeout does not apply there); reading
                // uncommitted takes none.
                conn.pragma_update(None, "read_uncommitted", true)?;
                conn
            }
        };
        // In WAL mode a reader waits only in rare cases (recovery after a crash).
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(SqliteReader { conn })
    }

    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.begin()?;
        let result = f(self);
        self.finish(result)
    }

    fn insert_call(&mut self, c: &NewCall) -> Result<(), Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO calls (id, protocol, caller, callee, external_id, call_config, \
                 phone_output_audio_format, phone_input_audio_format, started_at, recording, \
                 route, agent, key_name, node) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                c.id.as_str(),
                c.protocol,
                c.caller,
                c.callee,
                c.external_id,
                c.call_config,
                c.phone_output_audio_format,
                c.phone_input_audio_format,
                c.started_at.0,
                c.recording,
                c.route,
                c.agent,
                c.key_name,
                c.node,
            ])?;
        Ok(())
    }

    fn enqueue_deliveries(&mut self, rows: &[crate::outbox::NewDelivery]) -> Result<(), Error> {
        let mut stmt = self
            .conn
            .prepare_cached(&crate::outbox::INSERT.replace('$', "?"))?;
        for r in rows {
            stmt.execute(params![
                r.node,
                r.endpoint,
                r.event_id,
                r.event_type,
                r.body,
                r.created_at
            ])?;
        }
        Ok(())
    }

    fn mark_answered(&mut self, id: &CallId, at: UnixMillis) -> Result<(), Error> {
        self.conn
            .prepare_cached(
                "UPDATE calls SET answered_at = ?2 WHERE id = ?1 AND answered_at IS NULL",
            )?
            .execute(params![id.as_str(), at.0])?;
        Ok(())
    }

    fn update_progress(
        &mut self,
        id: &CallId,
        c: &Counters,
        dtmf: &str,
        usage: Option<&str>,
    ) -> Result<(), Error> {
        self.conn
            .prepare_cached(
                "UPDATE calls SET bytes_in = ?2, bytes_out = ?3, frames_in = ?4, \
                 frames_out = ?5, dtmf = ?6, usage = COALESCE(?7, usage) \
                 WHERE id = ?1 AND ended_at IS NULL",
            )?
            .execute(params![
                id.as_str(),
                as_i64(c.bytes_in),
                as_i64(c.bytes_out),
                as_i64(c.frames_in),
                as_i64(c.frames_out),
                dtmf,
                usage
            ])?;
        Ok(())
    }

    fn end_call(&mut self, id: &CallId, e: &Ended) -> Result<(), Error> {
        let c = &e.counters;
        self.conn
            .prepare_cached(
                "UPDATE calls SET ended_at = ?2, end_reason = ?3, hangup_by = ?4, \
                 bytes_in = ?5, bytes_out = ?6, frames_in = ?7, frames_out = ?8, dtmf = ?9, \
                 usage = COALESCE(?10, usage) WHERE id = ?1 AND ended_at IS NULL",
            )?
            .execute(params![
                id.as_str(),
                e.at.0,
                e.reason,
                e.hangup_by,
                as_i64(c.bytes_in),
                as_i64(c.bytes_out),
                as_i64(c.frames_in),
                as_i64(c.frames_out),
                e.dtmf,
                e.usage
            ])?;
        Ok(())
    }

    fn set_cdr(&mut self, id: &CallId, raw: &str) -> Result<(), Error> {
        self.conn
            .prepare_cached("UPDATE calls SET cdr = ?2 WHERE id = ?1")?
            .execute(params![id.as_str(), raw])?;
        Ok(())
    }

    fn set_usage(&mut self, id: &CallId, usage: &str) -> Result<(), Error> {
        self.conn
            .prepare_cached("UPDATE calls SET usage = ?2 WHERE id = ?1")?
            .execute(params![id.as_str(), usage])?;
        Ok(())
    }

    fn append_events(&mut self, id: &CallId, events: &[NewEvent]) -> Result<(), Error> {
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM call_events WHERE call_id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))?;
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO call_events (call_id, seq, at, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (i, e) in events.iter().enumerate() {
            insert.execute(params![
                id.as_str(),
                next + 1 + i as i64,
                e.at.0,
                e.kind,
                e.detail
            ])?;
        }
        Ok(())
    }

    fn append_transcript(
        &mut self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
    ) -> Result<(), Error> {
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM call_transcript WHERE call_id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))?;
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO call_transcript \
             (call_id, seq, speaker, text, start_ms, end_ms, interrupted) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (i, e) in entries.iter().enumerate() {
            insert.execute(params![
                id.as_str(),
                next + 1 + i as i64,
                e.speaker,
                e.text,
                as_i64(e.start_ms),
                as_i64(e.end_ms),
                e.interrupted
            ])?;
        }
        Ok(())
    }

    fn delete_call(&mut self, id: &CallId) -> Result<bool, Error> {
        let ended: bool = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM calls WHERE id = ?1 AND ended_at IS NOT NULL")?
            .query_row([id.as_str()], |r| r.get::<_, i64>(0))?
            > 0;
        if !ended {
            return Ok(false);
        }
        self.delete(id)?;
        self.deleted = true;
        Ok(true)
    }

    fn delete_ended_before(
        &mut self,
        before: UnixMillis,
        limit: u32,
    ) -> Result<Vec<CallId>, Error> {
        let ids: Vec<CallId> = self
            .conn
            .prepare_cached(
                "SELECT id FROM calls WHERE ended_at IS NOT NULL AND ended_at < ?1 \
                 ORDER BY ended_at LIMIT ?2",
            )?
            .query_map(params![before.0, limit], |r| {
                Ok(CallId::from_string(r.get(0)?))
            })?
            .collect::<Result<_, _>>()?;
        for id in &ids {
            self.delete(id)?;
        }
        self.deleted |= !ids.is_empty();
        Ok(ids)
    }

    fn end_interrupted(&mut self, node: &str, at: UnixMillis) -> Result<u64, Error> {
        let n = self.conn.execute(
            "UPDATE calls SET ended_at = MAX(?1, started_at), end_reason = 'interrupted', \
             hangup_by = 'server' WHERE ended_at IS NULL AND (node = ?2 OR node IS NULL)",
            params![at.0, node],
        )?;
        Ok(n as u64)
    }
}

impl SqliteStore {
    fn delete(&mut self, id: &CallId) -> Result<(), Error> {
        for sql in [
            "DELETE FROM call_events WHERE call_id = ?1",
            "DELETE FROM call_transcript WHERE call_id = ?1",
            "DELETE FROM calls WHERE id = ?1",
        ] {
            self.conn.prepare_cached(sql)?.execute([id.as_str()])?;
        }
        Ok(())
    }
}

impl Reader for SqliteReader {
    fn list_calls(&mut self, f: &CallFilter) -> Result<Vec<CallRecord>, Error> {
        let mut stmt = self.conn.prepare_cached(&list_sql(f))?;
        let before = f.before.as_ref().map(CallId::as_str);
        let (caller, callee) = (text_value(&f.caller), text_value(&f.callee));
        let (caller_end, callee_end) = (prefix_end(&f.caller), prefix_end(&f.callee));
        let (since, until) = (f.since.map(|t| t.0), f.until.map(|t| t.0));
        let values: [(&str, &dyn ToSql); 13] = [
            (":route", &f.route),
            (":agent", &f.agent),
            (":protocol", &f.protocol),
            (":end_reason", &f.end_reason),
            (":node", &f.node),
            (":since", &since),
            (":until", &until),
            (":caller", &caller),
            (":caller_end", &caller_end),
            (":callee", &callee),
            (":callee_end", &callee_end),
            (":before", &before),
            (":limit", &f.limit),
        ];
        // Only the parameters this shape of the query names.
        let named: Vec<(&str, &dyn ToSql)> = values
            .into_iter()
            .filter(|(name, _)| stmt.parameter_index(name).ok().flatten().is_some())
            .collect();
        let rows = stmt.query_map(named.as_slice(), record)?;
        let budget = f.max_bytes.unwrap_or(u64::MAX);
        let (mut calls, mut bytes) = (Vec::new(), 0u64);
        for call in rows {
            let call = call?;
            if bytes > budget {
                // The one record more, then no further.
                calls.push(call);
                break;
            }
            bytes = bytes.saturating_add(call.text_bytes());
            calls.push(call);
        }
        Ok(calls)
    }

    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {RECORD_COLUMNS} FROM calls WHERE id = ?1"))?;
        Ok(stmt.query_row([id.as_str()], record).optional()?)
    }

    fn events(&mut self, id: &CallId, page: Page) -> Result<Option<Vec<EventRecord>>, Error> {
        if self.call(id)?.is_none() {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at, kind, detail FROM call_events WHERE call_id = ?1 AND seq > ?2 \
             ORDER BY seq LIMIT ?3",
        )?;
        let args = params![id.as_str(), as_i64(page.after), page.limit];
        let rows = stmt.query_map(args, |r| {
            let detail: String = r.get(3)?;
            Ok(EventRecord {
                seq: count(r.get(0)?),
                at: UnixMillis(r.get(1)?),
                kind: r.get(2)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        })?;
        Ok(Some(rows.collect::<Result<_, _>>()?))
    }

    fn transcript(
        &mut self,
        id: &CallId,
        page: Page,
    ) -> Result<Option<Vec<TranscriptEntry>>, Error> {
        if self.call(id)?.is_none() {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, speaker, text, start_ms, end_ms, interrupted FROM call_transcript \
             WHERE call_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let args = params![id.as_str(), as_i64(page.after), page.limit];
        let rows = stmt.query_map(args, |r| {
            Ok(TranscriptEntry {
                seq: count(r.get(0)?),
                speaker: r.get(1)?,
                text: r.get(2)?,
                start_ms: count(r.get(3)?),
                end_ms: count(r.get(4)?),
                interrupted: r.get::<_, i64>(5)? != 0,
            })
        })?;
        Ok(Some(rows.collect::<Result<_, _>>()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's time on a CPU, ns (Linux's schedstat; the wall clock on a shared machine
    /// also counts other processes' time).
    fn cpu_ns() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// What a one-write batch (the progress write every call makes) costs with `BEGIN` and
    /// `COMMIT` as cached statements, against parsing them each time (as before), alternating
    /// in one process: `cargo test --release -p callgate-store --lib batch_cost -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a benchmark: run it in release with --ignored --nocapture"]
    fn batch_cost() {
        let mut store = SqliteStore::open_in_memory().unwrap();
        let id = CallId::from_string("bench".into());
        let counters = Counters::default();
        const BATCHES: u64 = 100_000;
        let (mut cached, mut parsed) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            let t = cpu_ns();
            for _ in 0..BATCHES {
                store
                    .transaction(|s| s.update_progress(&id, &counters, "", None))
                    .unwrap();
            }
            cached.push((cpu_ns() - t) / BATCHES);
            let t = cpu_ns();
            for _ in 0..BATCHES {
                store.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                store.update_progress(&id, &counters, "", None).unwrap();
                store.conn.execute_batch("COMMIT").unwrap();
            }
            parsed.push((cpu_ns() - t) / BATCHES);
        }
        cached.sort_unstable();
        parsed.sort_unstable();
        println!(
            "one-write batch, ns of CPU (min/median/max): cached {}/{}/{}, parsed {}/{}/{}",
            cached[0], cached[3], cached[6], parsed[0], parsed[3], parsed[6]
        );
        assert!(cached[0] > 0, "the thread's CPU time is readable");
    }

    fn plan(store: &SqliteReader, f: &CallFilter) -> String {
        let sql = format!("EXPLAIN QUERY PLAN {}", list_sql(f));
        let mut stmt = store.conn.prepare(&sql).unwrap();
        let mut rows = stmt.raw_query();
        let mut plan = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            plan.push(row.get::<_, String>(3).unwrap());
        }
        plan.join("; ")
    }

    #[test]
    fn filtered_pages_are_read_from_their_index() {
        let store = SqliteStore::open_in_memory()
            .unwrap()
            .open_reader()
            .unwrap();
        let by_route = CallFilter {
            route: Some("sales".into()),
            before: Some(CallId::from_string("x".into())),
            ..CallFilter::newest(50)
        };
        let p = plan(&store, &by_route);
        assert!(p.contains("USING INDEX calls_route"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let by_agent = CallFilter {
            agent: Some("echo".into()),
            ..CallFilter::newest(50)
        };
        let p = plan(&store, &by_agent);
        assert!(p.contains("USING INDEX calls_agent"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let by_node = CallFilter {
            node: Some("node-a".into()),
            ..CallFilter::newest(50)
        };
        let p = plan(&store, &by_node);
        assert!(p.contains("USING INDEX calls_node"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let by_caller = CallFilter {
            caller: Some(TextMatch::Exact("0101".into())),
            ..CallFilter::newest(50)
        };
        let p = plan(&store, &by_caller);
        assert!(p.contains("USING INDEX calls_caller"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let by_prefix = CallFilter {
            callee: Some(TextMatch::Prefix("02".into())),
            ..CallFilter::newest(50)
        };
        let p = plan(&store, &by_prefix);
        assert!(p.contains("calls_callee"), "{p}");
        let live = CallFilter {
            live: true,
            ..CallFilter::newest(50)
        };
        let p = plan(&store, &live);
        assert!(p.contains("calls_open"), "{p}");
    }
}
