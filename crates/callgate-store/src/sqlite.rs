//! The embedded default backend: one SQLite file in the data dir, in WAL mode.
//!
//! `synchronous = NORMAL` in WAL mode means a committed transaction survives a crash of the
//! process (what `kill -9` tests), and only a power loss can take the last few commits.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::record::{AudioFormats, raw_json};
use crate::{
    CallId, CallRecord, Counters, Ended, Error, EventRecord, NewCall, NewEvent, Store, UnixMillis,
};

/// Schema migrations, applied in order; `PRAGMA user_version` is how many have run.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
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
    r#"
ALTER TABLE calls ADD COLUMN recording INTEGER NOT NULL DEFAULT 0;
"#,
];

/// Call records in one SQLite database.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) `callgate.db` in `data_dir` and migrates it.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Open {
            path: data_dir.display().to_string(),
            source,
        })?;
        let conn = Connection::open(data_dir.join("callgate.db"))?;
        Self::from_connection(conn)
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, Error> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(conn: Connection) -> Result<Self, Error> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Self { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), Error> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(Error::SchemaTooNew {
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }
}

const RECORD_COLUMNS: &str = "id, protocol, caller, callee, external_id, call_config, \
     phone_output_audio_format, phone_input_audio_format, started_at, answered_at, ended_at, \
     end_reason, hangup_by, bytes_in, bytes_out, frames_in, frames_out, dtmf, cdr, recording";

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
    })
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                // Rolling back after a failure: a second failure here adds nothing to report.
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn insert_call(&mut self, c: &NewCall) -> Result<(), Error> {
        self.conn
            .prepare_cached(
                "INSERT INTO calls (id, protocol, caller, callee, external_id, call_config, \
                 phone_output_audio_format, phone_input_audio_format, started_at, recording) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
            ])?;
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

    fn update_progress(&mut self, id: &CallId, c: &Counters, dtmf: &str) -> Result<(), Error> {
        self.conn
            .prepare_cached(
                "UPDATE calls SET bytes_in = ?2, bytes_out = ?3, frames_in = ?4, \
                 frames_out = ?5, dtmf = ?6 WHERE id = ?1 AND ended_at IS NULL",
            )?
            .execute(params![
                id.as_str(),
                as_i64(c.bytes_in),
                as_i64(c.bytes_out),
                as_i64(c.frames_in),
                as_i64(c.frames_out),
                dtmf
            ])?;
        Ok(())
    }

    fn end_call(&mut self, id: &CallId, e: &Ended) -> Result<(), Error> {
        let c = &e.counters;
        self.conn
            .prepare_cached(
                "UPDATE calls SET ended_at = ?2, end_reason = ?3, hangup_by = ?4, \
                 bytes_in = ?5, bytes_out = ?6, frames_in = ?7, frames_out = ?8, dtmf = ?9 \
                 WHERE id = ?1 AND ended_at IS NULL",
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
                e.dtmf
            ])?;
        Ok(())
    }

    fn set_cdr(&mut self, id: &CallId, raw: &str) -> Result<(), Error> {
        self.conn
            .prepare_cached("UPDATE calls SET cdr = ?2 WHERE id = ?1")?
            .execute(params![id.as_str(), raw])?;
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

    fn end_interrupted(&mut self, at: UnixMillis) -> Result<u64, Error> {
        let n = self.conn.execute(
            "UPDATE calls SET ended_at = MAX(?1, started_at), end_reason = 'interrupted', \
             hangup_by = 'server' WHERE ended_at IS NULL",
            [at.0],
        )?;
        Ok(n as u64)
    }

    fn list_calls(&mut self, limit: u32) -> Result<Vec<CallRecord>, Error> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM calls ORDER BY started_at DESC, id DESC LIMIT ?1"
        ))?;
        let rows = stmt.query_map([limit], record)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {RECORD_COLUMNS} FROM calls WHERE id = ?1"))?;
        Ok(stmt.query_row([id.as_str()], record).optional()?)
    }

    fn events(&mut self, id: &CallId) -> Result<Option<Vec<EventRecord>>, Error> {
        if self.call(id)?.is_none() {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at, kind, detail FROM call_events WHERE call_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([id.as_str()], |r| {
            let detail: String = r.get(3)?;
            Ok(EventRecord {
                seq: r.get::<_, i64>(0)?.max(0) as u64,
                at: UnixMillis(r.get(1)?),
                kind: r.get(2)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        })?;
        Ok(Some(rows.collect::<Result<_, _>>()?))
    }
}
