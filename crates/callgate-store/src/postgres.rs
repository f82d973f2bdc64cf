//! The PostgreSQL backend: the same contract as [`crate::sqlite`], in a database every node
//! of a cluster can share.
//!
//! # Connections
//! The synchronous `postgres` client (tokio-postgres under a current-thread runtime of its
//! own) fits the store's threads: the writer thread owns one connection, each reader thread
//! one more. A dropped connection is opened again on the next use. TLS is rustls on ring
//! ([`PgUrl`]: `sslmode=disable|require|verify-full`).
//!
//! # When PostgreSQL is down or slow
//! Calls never wait for the database: the writer is behind a bounded queue already. A batch
//! the database cannot take (the connection fails, or a statement or commit times out) goes
//! to the local journal (`store-journal.jsonl`) in the data directory, made durable before its
//! callers are answered; while the journal holds batches, new ones are appended behind them
//! (so the order stays the order of the calls), and the writer tries the database again with
//! backoff (0.5 s doubling to 30 s). Once it answers, the journal is replayed in order, each
//! batch in its own transaction; every journaled write is idempotent (keyed by call ID and
//! per-call sequence numbers given before the first attempt), so a batch whose commit was cut
//! off is written exactly once. Deletions (the admin API's `DELETE`, retention) and
//! [`Store::end_interrupted`] need the database and fail while it is away.
//!
//! # Text
//! PostgreSQL text cannot hold NUL characters (SQLite's can): a NUL in any stored text is
//! written as U+FFFD, so one odd field cannot fail a whole batch.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postgres::Row;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;

use crate::journal::{self, Journal, Op};
pub use crate::pg::PgUrl;
use crate::pg::{BACKOFF, Conn, is_unavailable, unavailable};
use crate::record::{AudioFormats, RECORD_COLUMNS, prefix_end, raw_json, text_value};
use crate::{
    CallFilter, CallId, CallRecord, Counters, Ended, Error, EventRecord, Migration, NewCall,
    NewEvent, NewTranscriptEntry, Page, Reader, SchemaStatus, Stats, Store, TranscriptEntry,
    UnixMillis,
};

/// Schema migrations, applied in order; the table `callgate_schema` lists those applied.
/// Never edit one that has shipped: append a new one. (Numbered on their own: the SQLite
/// file's versions are its own.)
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "calls, call_events, call_transcript",
        sql: r#"
CREATE TABLE calls (
    id          TEXT COLLATE "C" PRIMARY KEY,
    protocol    TEXT NOT NULL,
    caller      TEXT NOT NULL,
    callee      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    call_config TEXT,
    phone_output_audio_format TEXT NOT NULL,
    phone_input_audio_format  TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    answered_at BIGINT,
    ended_at    BIGINT,
    end_reason  TEXT,
    hangup_by   TEXT,
    bytes_in    BIGINT NOT NULL DEFAULT 0,
    bytes_out   BIGINT NOT NULL DEFAULT 0,
    frames_in   BIGINT NOT NULL DEFAULT 0,
    frames_out  BIGINT NOT NULL DEFAULT 0,
    dtmf        TEXT NOT NULL DEFAULT '',
    cdr         TEXT,
    recording   BOOLEAN NOT NULL DEFAULT FALSE,
    route       TEXT,
    agent       TEXT,
    usage       TEXT,
    key_name    TEXT
);
CREATE INDEX calls_started ON calls (started_at DESC, id DESC);
CREATE INDEX calls_open ON calls (id) WHERE ended_at IS NULL;
CREATE INDEX calls_ended ON calls (ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX calls_route ON calls (route, started_at DESC, id DESC);
CREATE INDEX calls_agent ON calls (agent, started_at DESC, id DESC);
CREATE TABLE call_events (
    call_id TEXT COLLATE "C" NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL,
    PRIMARY KEY (call_id, seq)
);
CREATE TABLE call_transcript (
    call_id     TEXT COLLATE "C" NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    speaker     TEXT NOT NULL,
    text        TEXT NOT NULL,
    start_ms    BIGINT NOT NULL,
    end_ms      BIGINT NOT NULL,
    interrupted BOOLEAN NOT NULL,
    PRIMARY KEY (call_id, seq)
);
"#,
    },
    // The node that holds the call: a node closes only its own leftovers at start (the
    // database is shared), and the admin API filters by node.
    Migration {
        version: 2,
        name: "calls.node, nodes",
        sql: concat!(
            r#"
ALTER TABLE calls ADD COLUMN node TEXT;
CREATE INDEX calls_node ON calls (node, started_at DESC, id DESC);
CREATE INDEX calls_node_open ON calls (node) WHERE ended_at IS NULL;
CREATE INDEX calls_caller ON calls ((caller COLLATE "C"), started_at DESC, id DESC);
CREATE INDEX calls_callee ON calls ((callee COLLATE "C"), started_at DESC, id DESC);
"#,
            nodes_sql!()
        ),
    },
    // Webhooks: events waiting for their endpoints.
    Migration {
        version: 3,
        name: "webhook_outbox",
        sql: crate::outbox::outbox_sql!("BIGSERIAL PRIMARY KEY", "BOOLEAN"),
    },
];

/// Key of the advisory lock that serialises migrations of nodes starting together.
const MIGRATION_LOCK: i64 = 0x6361_6c6c_6761_7465; // "callgate"
/// Applies the pending migrations (under an advisory lock, so nodes starting together take
/// turns), or refuses a schema newer than [`MIGRATIONS`].
fn migrate(conn: &mut Conn) -> Result<(), Error> {
    let client = &mut conn.client;
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL statement_timeout = 0")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS callgate_schema (\
         version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )?;
    let current: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM callgate_schema", &[])?
        .try_get(0)?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if current > known {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: known,
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(m.sql)?;
        tx.execute(
            "INSERT INTO callgate_schema (version, name, applied_at) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &UnixMillis::now().0],
        )?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "Applied a store migration."
        );
    }
    tx.commit()?;
    Ok(())
}

/// The schema's state in the database at `url`, changing nothing.
pub fn schema_status(url: &PgUrl) -> Result<SchemaStatus, Error> {
    let mut conn = url.connect()?;
    let exists: bool = conn
        .client
        .query_one("SELECT to_regclass('callgate_schema') IS NOT NULL", &[])?
        .try_get(0)?;
    let current: i64 = match exists {
        false => 0,
        true => conn
            .client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM callgate_schema", &[])?
            .try_get(0)?,
    };
    Ok(SchemaStatus::new("postgresql", current, MIGRATIONS))
}

/// Applies the pending migrations of the database at `url`; returns the status before.
pub fn apply_migrations(url: &PgUrl) -> Result<SchemaStatus, Error> {
    let before = schema_status(url)?;
    if before.current > before.known {
        return Err(Error::SchemaTooNew {
            found: before.current,
            supported: before.known,
        });
    }
    migrate(&mut url.connect()?)?;
    Ok(before)
}

/// The last sequence numbers given to a call's event log and transcript.
#[derive(Debug, Clone, Copy, Default)]
struct Seqs {
    events: u64,
    transcript: u64,
}

/// The most calls whose sequence numbers the writer remembers; past it, it forgets them all
/// and reads them again from the database as needed.
const SEQS_MAX: usize = 100_000;

/// How the current batch is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Inside a database transaction.
    Direct,
    /// Recorded for the journal only (the database is unavailable).
    Journal,
    /// A statement was refused (not for unavailability): the batch fails as a whole.
    Failed,
}

/// Call records in PostgreSQL: the writer's connection, and the journal of what it could
/// not write yet.
pub struct PgStore {
    url: PgUrl,
    conn: Option<Conn>,
    mode: Mode,
    /// What the current batch wrote, for the journal if its commit fails.
    ops: Vec<Op>,
    /// Why the current batch failed (mode `Failed`).
    failure: Option<String>,
    /// Whether a batch is open ([`PgStore::begin`]); writes outside one (tests, the start's
    /// interrupted ends) commit alone and are not kept for the journal.
    in_batch: bool,
    seqs: HashMap<CallId, Seqs>,
    journal: Journal,
    /// When to try the database again, and the wait after that.
    retry: (Instant, Duration),
    stats: Arc<Stats>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url)
            .field("journal_batches", &self.journal.batches())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects, applies pending migrations, opens the journal in `data_dir` (bounded by
    /// [`crate::JOURNAL_MAX_BYTES`]) and replays what it holds.
    pub fn open(url: &PgUrl, data_dir: &Path) -> Result<Self, Error> {
        Self::open_with_journal_bound(url, data_dir, journal::JOURNAL_MAX_BYTES)
    }

    /// Like [`PgStore::open`], with the journal bounded by `max_bytes`.
    pub fn open_with_journal_bound(
        url: &PgUrl,
        data_dir: &Path,
        max_bytes: u64,
    ) -> Result<Self, Error> {
        let mut conn = url.connect()?;
        migrate(&mut conn)?;
        let journal = Journal::open(data_dir, max_bytes)?;
        let mut store = Self {
            url: url.clone(),
            conn: Some(conn),
            mode: Mode::Direct,
            ops: Vec::new(),
            failure: None,
            in_batch: false,
            seqs: HashMap::new(),
            journal,
            retry: (Instant::now(), BACKOFF.0),
            stats: Arc::default(),
        };
        if !store.journal.is_empty() {
            tracing::warn!(
                batches = store.journal.batches(),
                "The store journal holds batches from before the restart; replaying them."
            );
            if !store.replay() {
                return Err(Error::Unavailable);
            }
        }
        Ok(store)
    }

    /// Batches in the journal, waiting for the database.
    pub fn journaled_batches(&self) -> u64 {
        self.journal.batches()
    }

    /// Where the journal lives.
    pub fn journal_path(data_dir: &Path) -> PathBuf {
        data_dir.join(journal::FILE_NAME)
    }

    fn publish_backlog(&self) {
        self.stats
            .set_backlog(self.journal.batches(), self.journal.bytes());
    }

    fn conn(&mut self) -> Result<&mut Conn, postgres::Error> {
        let conn = match self.conn.take() {
            Some(c) if !c.client.is_closed() => c,
            _ => self.url.connect()?,
        };
        Ok(self.conn.insert(conn))
    }

    /// The connection for a statement: inside a batch, only the one its transaction began on
    /// (a new one would run the statement outside that transaction, and lose what the old one
    /// had written); outside a batch, any (opened if needed).
    fn stmt_conn(&mut self) -> Result<&mut Conn, Error> {
        if !self.in_batch {
            return Ok(self.conn()?);
        }
        match self.conn.as_mut() {
            Some(c) if !c.client.is_closed() => Ok(c),
            _ => Err(Error::Unavailable),
        }
    }

    fn retry_later(&mut self) {
        let (_, wait) = self.retry;
        self.retry = (Instant::now() + wait, (wait * 2).min(BACKOFF.1));
    }

    /// Writes the journal to the database, batch by batch; true once it is empty.
    fn replay(&mut self) -> bool {
        let batches = match self.journal.pending() {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "Cannot read the store journal.");
                self.retry_later();
                return false;
            }
        };
        let count = batches.len();
        for batch in batches {
            let result = self.conn().map_err(Error::from).and_then(|c| {
                c.client.batch_execute("BEGIN")?;
                for op in &batch.ops {
                    exec(c, op, true)?;
                }
                c.client.batch_execute("COMMIT")?;
                Ok(())
            });
            match result {
                Ok(()) => self.journal.replayed_to(batch.end),
                Err(Error::Postgres(e)) if unavailable(&e) => {
                    tracing::debug!(error = %e, "The database is still unavailable.");
                    self.conn = None;
                    self.retry_later();
                    return false;
                }
                Err(error) => {
                    // The database refused the batch itself: keep it aside for the operator
                    // rather than retrying it forever in front of every later batch.
                    tracing::error!(%error, ops = batch.ops.len(), "The database refused a journaled batch; kept in the rejected file.");
                    self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(c) = self.conn.as_mut() {
                        let _ = c.client.batch_execute("ROLLBACK");
                    }
                    if let Err(error) = self.journal.reject(&batch.ops) {
                        tracing::error!(%error, "Cannot keep the refused batch.");
                    }
                    self.journal.replayed_to(batch.end);
                }
            }
        }
        if let Err(error) = self.journal.clear() {
            tracing::error!(%error, "Cannot empty the store journal.");
            return false;
        }
        self.retry = (Instant::now(), BACKOFF.0);
        self.publish_backlog();
        tracing::info!(
            batches = count,
            "The database is back; the store journal is written."
        );
        true
    }

    /// Starts a batch: in a database transaction when the journal is empty and the database
    /// answers, else for the journal.
    pub(crate) fn begin(&mut self) {
        self.ops.clear();
        self.failure = None;
        self.in_batch = true;
        if !self.journal.is_empty() && Instant::now() >= self.retry.0 {
            self.replay();
        }
        if !self.journal.is_empty() {
            self.mode = Mode::Journal;
            return;
        }
        match self.conn().and_then(|c| c.client.batch_execute("BEGIN")) {
            Ok(()) => self.mode = Mode::Direct,
            Err(error) => {
                self.unavailable_now(&error);
            }
        }
    }

    fn unavailable_now(&mut self, error: &dyn fmt::Display) {
        if self.mode != Mode::Journal {
            tracing::warn!(%error, "The database is unavailable; journaling call records locally.");
        }
        self.conn = None;
        self.mode = Mode::Journal;
        self.retry_later();
    }

    /// Ends the batch: commit, or journal it.
    pub(crate) fn finish<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        let ops = std::mem::take(&mut self.ops);
        let outcome = match (self.mode, &result) {
            (Mode::Direct, Ok(_)) => {
                let commit = self
                    .stmt_conn()
                    .and_then(|c| Ok(c.client.batch_execute("COMMIT")?));
                match commit {
                    Ok(()) => Ok(()),
                    Err(e) if is_unavailable(&e) => {
                        // Committed or not, nobody knows: the journal's replay is idempotent.
                        self.unavailable_now(&e);
                        self.journal_batch(&ops)
                    }
                    Err(e) => Err(e),
                }
            }
            (Mode::Journal, Ok(_)) => self.journal_batch(&ops),
            (Mode::Direct | Mode::Failed, _) | (Mode::Journal, Err(_)) => {
                if let Some(c) = self.conn.as_mut() {
                    let _ = c.client.batch_execute("ROLLBACK");
                }
                Err(Error::Commit {
                    detail: self.failure.take().unwrap_or_else(|| "batch failed".into()),
                })
            }
        };
        self.in_batch = false;
        self.publish_backlog();
        match outcome {
            Ok(()) => result,
            Err(e) => {
                // Sequence numbers given in the lost batch are not in the database: read them
                // again when next needed.
                self.seqs.clear();
                Err(e)
            }
        }
    }

    fn journal_batch(&mut self, ops: &[Op]) -> Result<(), Error> {
        if ops.is_empty() {
            return Ok(());
        }
        match self.journal.append(ops) {
            Ok(()) => {
                self.stats.journaled_batches.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, ops = ops.len(), "Cannot journal a batch the database could not take; it is lost.");
                Err(error)
            }
        }
    }

    /// Runs one write (or records it, when journaling); `Ok(false)` when the database says it
    /// changed nothing.
    fn write(&mut self, op: Op) -> Result<u64, Error> {
        match self.mode {
            Mode::Failed => Err(Error::Commit {
                detail: self.failure.clone().unwrap_or_default(),
            }),
            Mode::Journal => {
                self.ops.push(op);
                Ok(1)
            }
            Mode::Direct => {
                let result = self.stmt_conn().and_then(|c| exec(c, &op, false));
                match result {
                    Ok(n) => {
                        if self.in_batch {
                            self.ops.push(op);
                        }
                        Ok(n)
                    }
                    // Inside a batch, what the database cannot take goes to the journal.
                    Err(e) if self.in_batch && is_unavailable(&e) => {
                        self.unavailable_now(&e);
                        self.ops.push(op);
                        Ok(1)
                    }
                    Err(e) => {
                        self.refused(&e);
                        Err(e)
                    }
                }
            }
        }
    }

    /// After the database refused a statement inside a batch, its transaction is aborted:
    /// the rest of the batch fails with it. (A duplicate insert or an unknown call is
    /// answered without any statement failing.)
    fn refused(&mut self, e: &Error) {
        if self.in_batch && matches!(e, Error::Postgres(_)) {
            self.mode = Mode::Failed;
            self.failure = Some(e.to_string());
        }
    }

    /// The last sequence numbers of a call: remembered, or read (`None`: no such call); when
    /// journaling and not remembered, unknown (`Some(None)`).
    fn seqs(&mut self, id: &CallId) -> Result<Option<Option<Seqs>>, Error> {
        if let Some(s) = self.seqs.get(id) {
            return Ok(Some(Some(*s)));
        }
        if self.mode != Mode::Direct {
            return Ok(Some(None));
        }
        let read = self.stmt_conn().and_then(|c| {
            Ok(c.query(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM call_events WHERE call_id = $1), \
                 (SELECT COALESCE(MAX(seq), 0) FROM call_transcript WHERE call_id = $1) \
                 FROM calls WHERE id = $1",
                &[&id.as_str()],
            )?)
        });
        match read {
            Ok(rows) => match rows.first() {
                None => Ok(None),
                Some(row) => {
                    let s = Seqs {
                        events: count(row.try_get(0)?),
                        transcript: count(row.try_get(1)?),
                    };
                    self.remember(id, s);
                    Ok(Some(Some(s)))
                }
            },
            Err(e) if self.in_batch && is_unavailable(&e) => {
                self.unavailable_now(&e);
                Ok(Some(None))
            }
            Err(e) => Err(e),
        }
    }

    fn remember(&mut self, id: &CallId, s: Seqs) {
        if self.seqs.len() >= SEQS_MAX && !self.seqs.contains_key(id) {
            self.seqs.clear();
        }
        self.seqs.insert(id.clone(), s);
    }

    /// Fails a write that needs the database while it is away.
    fn needs_database(&self) -> Result<(), Error> {
        match self.mode {
            Mode::Direct => Ok(()),
            Mode::Journal => Err(Error::Unavailable),
            Mode::Failed => Err(Error::Commit {
                detail: self.failure.clone().unwrap_or_default(),
            }),
        }
    }

    /// Runs a read-write statement that cannot be journaled (deletions, interrupted ends).
    fn direct<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T, Error>) -> Result<T, Error> {
        self.needs_database()?;
        let result = self.stmt_conn().and_then(f);
        match result {
            Err(e) if is_unavailable(&e) => {
                if self.in_batch {
                    self.unavailable_now(&e);
                }
                Err(Error::Unavailable)
            }
            Err(e) => {
                self.refused(&e);
                Err(e)
            }
            ok => ok,
        }
    }
}

/// Text as PostgreSQL can store it (no NUL).
fn clean(s: &str) -> Cow<'_, str> {
    match s.contains('\0') {
        false => Cow::Borrowed(s),
        true => Cow::Owned(s.replace('\0', "\u{FFFD}")),
    }
}

fn clean_opt(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(clean)
}

/// The sequence number of a batch's first row in `table` (`call_events`, `call_transcript`):
/// the one the batch was given, or the call's next one in the store.
fn first_seq_of(
    c: &mut Conn,
    table: &'static str,
    id: &str,
    given: Option<u64>,
) -> Result<i64, Error> {
    if let Some(s) = given {
        return Ok(as_i64(s));
    }
    let rows = c.query(
        &format!("SELECT COALESCE(MAX(seq), 0) + 1 FROM {table} WHERE call_id = $1"),
        &[&id],
    )?;
    Ok(rows
        .first()
        .map(|r| r.try_get::<_, i64>(0))
        .transpose()?
        .unwrap_or(1))
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

/// Runs one journaled write. Every statement is idempotent; `replay` also turns a duplicate
/// insert into success (it is this very insert, committed before the connection failed).
fn exec(c: &mut Conn, op: &Op, replay: bool) -> Result<u64, Error> {
    match op {
        Op::Insert { call } => {
            let n = c.execute(
                "INSERT INTO calls (id, protocol, caller, callee, external_id, call_config, \
                 phone_output_audio_format, phone_input_audio_format, started_at, recording, \
                 route, agent, key_name, node) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &clean(call.id.as_str()),
                    &clean(&call.protocol),
                    &clean(&call.caller),
                    &clean(&call.callee),
                    &clean(&call.external_id),
                    &clean_opt(&call.call_config),
                    &clean(&call.phone_output_audio_format),
                    &clean(&call.phone_input_audio_format),
                    &call.started_at.0,
                    &call.recording,
                    &clean_opt(&call.route),
                    &clean_opt(&call.agent),
                    &clean_opt(&call.key_name),
                    &clean_opt(&call.node),
                ],
            )?;
            if n == 0 && !replay {
                return Err(Error::Duplicate(call.id.clone()));
            }
            Ok(n)
        }
        Op::Answered { id, at } => Ok(c.execute(
            "UPDATE calls SET answered_at = $2 WHERE id = $1 AND answered_at IS NULL",
            &[&id.as_str(), &at.0],
        )?),
        Op::Progress {
            id,
            counters: k,
            dtmf,
            usage,
        } => Ok(c.execute(
            "UPDATE calls SET bytes_in = $2, bytes_out = $3, frames_in = $4, frames_out = $5, \
             dtmf = $6, usage = COALESCE($7, usage) WHERE id = $1 AND ended_at IS NULL",
            &[
                &id.as_str(),
                &as_i64(k.bytes_in),
                &as_i64(k.bytes_out),
                &as_i64(k.frames_in),
                &as_i64(k.frames_out),
                &clean(dtmf),
                &clean_opt(usage),
            ],
        )?),
        Op::End { id, ended: e } => {
            let k = &e.counters;
            Ok(c.execute(
                "UPDATE calls SET ended_at = $2, end_reason = $3, hangup_by = $4, \
                 bytes_in = $5, bytes_out = $6, frames_in = $7, frames_out = $8, dtmf = $9, \
                 usage = COALESCE($10, usage) WHERE id = $1 AND ended_at IS NULL",
                &[
                    &id.as_str(),
                    &e.at.0,
                    &clean(&e.reason),
                    &clean(&e.hangup_by),
                    &as_i64(k.bytes_in),
                    &as_i64(k.bytes_out),
                    &as_i64(k.frames_in),
                    &as_i64(k.frames_out),
                    &clean(&e.dtmf),
                    &clean_opt(&e.usage),
                ],
            )?)
        }
        Op::Cdr { id, raw } => Ok(c.execute(
            "UPDATE calls SET cdr = $2 WHERE id = $1",
            &[&id.as_str(), &clean(raw)],
        )?),
        Op::Usage { id, usage } => Ok(c.execute(
            "UPDATE calls SET usage = $2 WHERE id = $1",
            &[&id.as_str(), &clean(usage)],
        )?),
        Op::Events {
            id,
            first_seq,
            events,
        } => {
            let first = first_seq_of(c, "call_events", id.as_str(), *first_seq)?;
            let mut n = 0;
            // A `node_lost` event (added by another node's sweep while this node was cut
            // off: `nodes::Registry::sweep`) took the next number of the call's log; an event
            // numbered at or after it by this node moves one place up. A record is closed
            // once, so a log holds at most one `node_lost`: the shift is the same on every
            // attempt and every replay of the journal, and the write stays idempotent.
            for (i, e) in events.iter().enumerate() {
                n += c.execute(
                    "INSERT INTO call_events (call_id, seq, at, kind, detail) \
                     SELECT $1, $2 + (SELECT COUNT(*) FROM call_events \
                         WHERE call_id = $1 AND kind = 'node_lost' AND seq <= $2), $3, $4, $5 \
                     WHERE EXISTS (SELECT 1 FROM calls WHERE id = $1) \
                     ON CONFLICT (call_id, seq) DO NOTHING",
                    &[
                        &id.as_str(),
                        &(first + i as i64),
                        &e.at.0,
                        &clean(&e.kind),
                        &clean(&e.detail),
                    ],
                )?;
            }
            Ok(n)
        }
        Op::Transcript {
            id,
            first_seq,
            entries,
        } => {
            let first = first_seq_of(c, "call_transcript", id.as_str(), *first_seq)?;
            let mut n = 0;
            for (i, e) in entries.iter().enumerate() {
                n += c.execute(
                    "INSERT INTO call_transcript \
                     (call_id, seq, speaker, text, start_ms, end_ms, interrupted) \
                     SELECT $1, $2, $3, $4, $5, $6, $7 \
                     WHERE EXISTS (SELECT 1 FROM calls WHERE id = $1) \
                     ON CONFLICT (call_id, seq) DO NOTHING",
                    &[
                        &id.as_str(),
                        &(first + i as i64),
                        &clean(&e.speaker),
                        &clean(&e.text),
                        &as_i64(e.start_ms),
                        &as_i64(e.end_ms),
                        &e.interrupted,
                    ],
                )?;
            }
            Ok(n)
        }
        Op::Outbox { rows } => {
            let mut n = 0;
            for r in rows {
                n += c.execute(
                    crate::outbox::INSERT,
                    &[
                        &clean(&r.node),
                        &clean(&r.endpoint),
                        &clean(&r.event_id),
                        &clean(&r.event_type),
                        &clean(&r.body),
                        &r.created_at,
                    ],
                )?;
            }
            Ok(n)
        }
        Op::Delete { id } => Ok(c.execute(
            "DELETE FROM calls WHERE id = $1 AND ended_at IS NOT NULL",
            &[&id.as_str()],
        )?),
    }
}

impl Store for PgStore {
    type Reader = PgReader;

    fn open_reader(&self) -> Result<PgReader, Error> {
        Ok(PgReader {
            url: self.url.clone(),
            conn: None,
        })
    }

    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.begin();
        let result = f(self);
        self.finish(result)
    }

    fn attach_stats(&mut self, stats: Arc<Stats>) {
        self.stats = stats;
        self.publish_backlog();
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(BACKOFF.0)
    }

    fn tick(&mut self) {
        if !self.journal.is_empty() && Instant::now() >= self.retry.0 {
            self.replay();
        }
    }

    fn closing(&mut self) {
        if !self.journal.is_empty() && !self.replay() {
            tracing::warn!(
                batches = self.journal.batches(),
                "Stopping with call records in the store journal; they are written at the next start."
            );
        }
    }

    fn insert_call(&mut self, call: &NewCall) -> Result<(), Error> {
        let id = call.id.clone();
        self.write(Op::Insert { call: call.clone() })?;
        self.remember(&id, Seqs::default());
        Ok(())
    }

    fn enqueue_deliveries(&mut self, rows: &[crate::outbox::NewDelivery]) -> Result<(), Error> {
        self.write(Op::Outbox {
            rows: rows.to_vec(),
        })?;
        Ok(())
    }

    fn mark_answered(&mut self, id: &CallId, at: UnixMillis) -> Result<(), Error> {
        self.write(Op::Answered { id: id.clone(), at })?;
        Ok(())
    }

    fn update_progress(
        &mut self,
        id: &CallId,
        counters: &Counters,
        dtmf: &str,
        usage: Option<&str>,
    ) -> Result<(), Error> {
        self.write(Op::Progress {
            id: id.clone(),
            counters: *counters,
            dtmf: dtmf.to_owned(),
            usage: usage.map(str::to_owned),
        })?;
        Ok(())
    }

    fn end_call(&mut self, id: &CallId, ended: &Ended) -> Result<(), Error> {
        self.write(Op::End {
            id: id.clone(),
            ended: ended.clone(),
        })?;
        Ok(())
    }

    fn set_cdr(&mut self, id: &CallId, raw: &str) -> Result<(), Error> {
        self.write(Op::Cdr {
            id: id.clone(),
            raw: raw.to_owned(),
        })?;
        Ok(())
    }

    fn set_usage(&mut self, id: &CallId, usage: &str) -> Result<(), Error> {
        self.write(Op::Usage {
            id: id.clone(),
            usage: usage.to_owned(),
        })?;
        Ok(())
    }

    fn append_events(&mut self, id: &CallId, events: &[NewEvent]) -> Result<(), Error> {
        let first_seq = match self.seqs(id)? {
            None => return Err(Error::NoSuchCall(id.clone())),
            Some(None) => None,
            Some(Some(s)) => {
                let mut s2 = s;
                s2.events += events.len() as u64;
                self.remember(id, s2);
                Some(s.events + 1)
            }
        };
        self.write(Op::Events {
            id: id.clone(),
            first_seq,
            events: events.to_vec(),
        })?;
        Ok(())
    }

    fn append_transcript(
        &mut self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
    ) -> Result<(), Error> {
        let first_seq = match self.seqs(id)? {
            None => return Err(Error::NoSuchCall(id.clone())),
            Some(None) => None,
            Some(Some(s)) => {
                let mut s2 = s;
                s2.transcript += entries.len() as u64;
                self.remember(id, s2);
                Some(s.transcript + 1)
            }
        };
        self.write(Op::Transcript {
            id: id.clone(),
            first_seq,
            entries: entries.to_vec(),
        })?;
        Ok(())
    }

    fn end_interrupted(&mut self, node: &str, at: UnixMillis) -> Result<u64, Error> {
        self.direct(|c| {
            Ok(c.execute(
                "UPDATE calls SET ended_at = GREATEST($1, started_at), \
                 end_reason = 'interrupted', hangup_by = 'server' \
                 WHERE ended_at IS NULL AND (node = $2 OR node IS NULL)",
                &[&at.0, &node],
            )?)
        })
    }

    fn delete_call(&mut self, id: &CallId) -> Result<bool, Error> {
        let op = Op::Delete { id: id.clone() };
        let n = self.direct(|c| exec(c, &op, false))?;
        self.seqs.remove(id);
        if n > 0 && self.in_batch {
            self.ops.push(op);
        }
        Ok(n > 0)
    }

    fn delete_ended_before(
        &mut self,
        before: UnixMillis,
        limit: u32,
    ) -> Result<Vec<CallId>, Error> {
        let ids: Vec<CallId> = self.direct(|c| {
            let rows = c.query(
                "WITH gone AS (DELETE FROM calls WHERE id IN (SELECT id FROM calls \
                 WHERE ended_at IS NOT NULL AND ended_at < $1 ORDER BY ended_at LIMIT $2) \
                 RETURNING id, ended_at) SELECT id FROM gone ORDER BY ended_at, id",
                &[&before.0, &i64::from(limit)],
            )?;
            rows.iter()
                .map(|r| Ok(CallId::from_string(r.try_get(0)?)))
                .collect()
        })?;
        for id in &ids {
            self.seqs.remove(id);
            if self.in_batch {
                self.ops.push(Op::Delete { id: id.clone() });
            }
        }
        Ok(ids)
    }
}

/// A connection for a reader thread (opened on first use, and again after a failure).
pub struct PgReader {
    url: PgUrl,
    conn: Option<Conn>,
}

impl fmt::Debug for PgReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReader")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn record(row: &Row) -> Result<CallRecord, postgres::Error> {
    let time = |i: usize| -> Result<Option<UnixMillis>, postgres::Error> {
        Ok(row.try_get::<_, Option<i64>>(i)?.map(UnixMillis))
    };
    Ok(CallRecord {
        id: CallId::from_string(row.try_get(0)?),
        protocol: row.try_get(1)?,
        caller: row.try_get(2)?,
        callee: row.try_get(3)?,
        external_id: row.try_get(4)?,
        call_config: row.try_get::<_, Option<String>>(5)?.and_then(raw_json),
        audio_format: AudioFormats {
            phone_output_audio_format: row.try_get(6)?,
            phone_input_audio_format: row.try_get(7)?,
        },
        started_at: UnixMillis(row.try_get(8)?),
        answered_at: time(9)?,
        ended_at: time(10)?,
        end_reason: row.try_get(11)?,
        hangup_by: row.try_get(12)?,
        bytes_in: count(row.try_get(13)?),
        bytes_out: count(row.try_get(14)?),
        frames_in: count(row.try_get(15)?),
        frames_out: count(row.try_get(16)?),
        dtmf: row.try_get(17)?,
        cdr: row.try_get::<_, Option<String>>(18)?.and_then(raw_json),
        recording: row.try_get(19)?,
        route: row.try_get(20)?,
        agent: row.try_get(21)?,
        usage: row.try_get::<_, Option<String>>(22)?.and_then(raw_json),
        key_name: row.try_get(23)?,
        node: row.try_get(24)?,
    })
}

impl PgReader {
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, Error> {
        let conn = match self.conn.take() {
            Some(c) if !c.client.is_closed() => c,
            _ => self.url.connect()?,
        };
        let result = f(self.conn.insert(conn));
        if let Err(e) = &result
            && unavailable(e)
        {
            self.conn = None;
        }
        Ok(result?)
    }

    fn exists(c: &mut Conn, id: &CallId) -> Result<bool, postgres::Error> {
        Ok(!c
            .query("SELECT 1 FROM calls WHERE id = $1", &[&id.as_str()])?
            .is_empty())
    }
}

impl Reader for PgReader {
    fn list_calls(&mut self, f: &CallFilter) -> Result<Vec<CallRecord>, Error> {
        let before = f.before.as_ref().map(CallId::as_str);
        let limit = i64::from(f.limit);
        let mut sql = format!("SELECT {RECORD_COLUMNS} FROM calls WHERE TRUE");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        let (since, until) = (f.since.map(|t| t.0), f.until.map(|t| t.0));
        let (caller, callee) = (text_value(&f.caller), text_value(&f.callee));
        let caller_end = prefix_end(&f.caller);
        let callee_end = prefix_end(&f.callee);
        let exact = |m: &Option<crate::TextMatch>| matches!(m, Some(crate::TextMatch::Exact(_)));
        let (caller_op, callee_op) = (
            if exact(&f.caller) {
                "caller COLLATE \"C\" = "
            } else {
                "caller COLLATE \"C\" >= "
            },
            if exact(&f.callee) {
                "callee COLLATE \"C\" = "
            } else {
                "callee COLLATE \"C\" >= "
            },
        );
        if f.live {
            sql.push_str(" AND ended_at IS NULL");
        }
        let filters: [(&str, Option<&(dyn ToSql + Sync)>); 12] = [
            ("route = ", f.route.as_ref().map(|v| v as _)),
            ("agent = ", f.agent.as_ref().map(|v| v as _)),
            ("protocol = ", f.protocol.as_ref().map(|v| v as _)),
            ("end_reason = ", f.end_reason.as_ref().map(|v| v as _)),
            ("node = ", f.node.as_ref().map(|v| v as _)),
            ("started_at >= ", since.as_ref().map(|v| v as _)),
            ("started_at < ", until.as_ref().map(|v| v as _)),
            (caller_op, caller.as_ref().map(|v| v as _)),
            (
                "caller COLLATE \"C\" < ",
                caller_end.as_ref().map(|v| v as _),
            ),
            (callee_op, callee.as_ref().map(|v| v as _)),
            (
                "callee COLLATE \"C\" < ",
                callee_end.as_ref().map(|v| v as _),
            ),
            (
                "(started_at, id) < (SELECT started_at, id FROM calls WHERE id = ",
                before.as_ref().map(|v| v as _),
            ),
        ];
        for (fragment, value) in filters {
            if let Some(value) = value {
                params.push(value);
                sql.push_str(" AND ");
                sql.push_str(fragment);
                sql.push_str(&format!("${}", params.len()));
                if fragment.starts_with('(') {
                    sql.push(')');
                }
            }
        }
        params.push(&limit);
        sql.push_str(&format!(
            " ORDER BY started_at DESC, id DESC LIMIT ${}",
            params.len()
        ));
        let budget = f.max_bytes.unwrap_or(u64::MAX);
        self.with(|c| {
            let statement = c.statement(&sql)?;
            let mut rows = c.client.query_raw(&statement, params)?;
            let (mut calls, mut bytes) = (Vec::new(), 0u64);
            while let Some(row) = rows.next()? {
                let call = record(&row)?;
                if bytes > budget {
                    // The one record more, then no further.
                    calls.push(call);
                    break;
                }
                bytes = bytes.saturating_add(call.text_bytes());
                calls.push(call);
            }
            Ok(calls)
        })
    }

    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, Error> {
        let sql = format!("SELECT {RECORD_COLUMNS} FROM calls WHERE id = $1");
        self.with(|c| {
            c.query(&sql, &[&id.as_str()])?
                .first()
                .map(record)
                .transpose()
        })
    }

    fn events(&mut self, id: &CallId, page: Page) -> Result<Option<Vec<EventRecord>>, Error> {
        self.with(|c| {
            if !Self::exists(c, id)? {
                return Ok(None);
            }
            let rows = c.query(
                "SELECT seq, at, kind, detail FROM call_events WHERE call_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3",
                &[&id.as_str(), &as_i64(page.after), &i64::from(page.limit)],
            )?;
            let events = rows
                .iter()
                .map(|r| {
                    let detail: String = r.try_get(3)?;
                    Ok(EventRecord {
                        seq: count(r.try_get(0)?),
                        at: UnixMillis(r.try_get(1)?),
                        kind: r.try_get(2)?,
                        detail: serde_json::from_str(&detail)
                            .unwrap_or(serde_json::Value::String(detail)),
                    })
                })
                .collect::<Result<_, postgres::Error>>()?;
            Ok(Some(events))
        })
    }

    fn transcript(
        &mut self,
        id: &CallId,
        page: Page,
    ) -> Result<Option<Vec<TranscriptEntry>>, Error> {
        self.with(|c| {
            if !Self::exists(c, id)? {
                return Ok(None);
            }
            let rows = c.query(
                "SELECT seq, speaker, text, start_ms, end_ms, interrupted FROM call_transcript \
                 WHERE call_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&id.as_str(), &as_i64(page.after), &i64::from(page.limit)],
            )?;
            let entries = rows
                .iter()
                .map(|r| {
                    Ok(TranscriptEntry {
                        seq: count(r.try_get(0)?),
                        speaker: r.try_get(1)?,
                        text: r.try_get(2)?,
                        start_ms: count(r.try_get(3)?),
                        end_ms: count(r.try_get(4)?),
                        interrupted: r.try_get(5)?,
                    })
                })
                .collect::<Result<_, postgres::Error>>()?;
            Ok(Some(entries))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_become_replacement_characters() {
        assert_eq!(clean("a\0b"), "a\u{FFFD}b");
        assert!(matches!(clean("ab"), Cow::Borrowed("ab")));
    }
}
