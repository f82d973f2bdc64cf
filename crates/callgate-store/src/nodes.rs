//! The node roster: each node registers itself in the `nodes` table and heartbeats; a node
//! whose heartbeat lapsed is declared dead by exactly one survivor, which closes its open
//! records as `interrupted` with a `node_lost` event.
//!
//! # Time
//! Every operation takes the wall-clock time from its caller (`now`, Unix milliseconds), so
//! the rules are tested without waiting. Nodes compare each other's heartbeats with their own
//! clocks: keep them synchronised (NTP) to well under `node_timeout`.
//!
//! # Fencing
//! With PostgreSQL, declaring a node dead is one conditional `UPDATE nodes ... WHERE state <>
//! 'dead' AND heartbeat_at < deadline RETURNING id`, in the same transaction as the records
//! it closes: two survivors sweeping at once serialise on the row lock, and the second finds
//! the node already dead, so records are ended once. A heartbeat only lands on the row of this
//! node's own incarnation while it is not dead (`WHERE incarnation = $ AND state <> 'dead'`):
//! a dead node that comes back cannot make itself alive again silently; it re-registers
//! ([`Beat::Rejoined`]), and the records closed for it stay closed (every write of an end is
//! `WHERE ended_at IS NULL`).
//!
//! With SQLite the table holds this node only: nobody else can sweep.

use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::pg::Conn;
use crate::{Error, PgUrl, UnixMillis};

/// What a node is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Taking calls.
    Serving,
    /// Taking no new calls, waiting for its live ones to end.
    Draining,
    /// Its heartbeat lapsed for `node_timeout`.
    Dead,
}

impl NodeState {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Dead => "dead",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "serving" => Self::Serving,
            "draining" => Self::Draining,
            _ => Self::Dead,
        }
    }
}

/// A node as `GET /api/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeRecord {
    /// `node_id`.
    pub id: String,
    /// Where other nodes reach its admin API.
    pub admin_url: String,
    /// Its callgate version.
    pub version: String,
    /// When this incarnation registered.
    pub started_at: UnixMillis,
    /// Its last heartbeat.
    pub heartbeat_at: UnixMillis,
    /// `serving`, `draining` or `dead` (stored dead, or a heartbeat older than the timeout).
    pub state: NodeState,
    /// Its live calls at its last heartbeat.
    pub live_calls: u64,
}

/// Who this node is.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// `node_id`.
    pub id: String,
    /// `advertise_admin`.
    pub admin_url: String,
    /// The callgate version.
    pub version: String,
    /// This process's own ID, new at each start: a heartbeat only refreshes its own row.
    pub incarnation: String,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The row was this node's, alive, and is refreshed.
    Refreshed,
    /// There was no row of this incarnation (first beat, or the row was removed or replaced).
    Registered,
    /// The node had been declared dead (its heartbeats failed for `node_timeout`): it is
    /// registered again; its records closed meanwhile stay closed.
    Rejoined,
}

/// A node declared dead by a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostNode {
    /// Its `node_id`.
    pub node: String,
    /// How many of its open records were closed as `interrupted`.
    pub closed: u64,
}

/// Schema of the roster, the same text for both backends (a macro, for `concat!` in the
/// migrations).
macro_rules! nodes_sql {
    () => {
        r#"
CREATE TABLE nodes (
    id           TEXT PRIMARY KEY,
    admin_url    TEXT NOT NULL,
    version      TEXT NOT NULL,
    incarnation  TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    state        TEXT NOT NULL,
    live_calls   BIGINT NOT NULL DEFAULT 0
);
"#
    };
}

const NODE_COLUMNS: &str = "id, admin_url, version, started_at, heartbeat_at, state, live_calls";

/// A connection to the roster, for the node's heartbeat thread (it blocks).
#[derive(Debug)]
pub struct Registry(Backend);

#[allow(
    clippy::large_enum_variant,
    reason = "one per node (or admin API), built once and never moved on a hot path"
)]
enum Backend {
    /// The SQLite file in the data directory.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL; connected on first use, and again after a failure.
    Postgres {
        /// The database.
        url: PgUrl,
        /// The open connection, if any.
        conn: Option<Conn>,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(_) => f.write_str("Sqlite"),
            Self::Postgres { url, .. } => write!(f, "Postgres({url:?})"),
        }
    }
}

fn dead_after(now: UnixMillis, timeout: Duration) -> i64 {
    now.0
        .saturating_sub(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX))
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Registry {
    /// A roster in the SQLite database of `data_dir` (opened by the store first, which
    /// migrates it).
    pub fn sqlite(data_dir: &std::path::Path) -> Result<Self, Error> {
        let conn = rusqlite::Connection::open(data_dir.join("callgate.db"))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Self(Backend::Sqlite(conn)))
    }

    /// A roster in PostgreSQL; nothing is connected until the first call.
    pub fn postgres(url: PgUrl) -> Self {
        Self(Backend::Postgres { url, conn: None })
    }

    fn pg<T>(
        url: &PgUrl,
        conn: &mut Option<Conn>,
        f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, Error> {
        let c = match conn.take() {
            Some(c) if !c.client.is_closed() => c,
            _ => url.connect()?,
        };
        let result = f(conn.insert(c));
        if result.is_err() {
            // The next call starts from a fresh connection (and no half-open transaction).
            *conn = None;
        }
        Ok(result?)
    }

    /// Refreshes this node's row (or registers it) with its state and live calls.
    pub fn beat(
        &mut self,
        me: &NodeInfo,
        state: NodeState,
        live_calls: u64,
        now: UnixMillis,
    ) -> Result<Beat, Error> {
        let refresh = "UPDATE nodes SET heartbeat_at = $1, state = $2, live_calls = $3 \
                       WHERE id = $4 AND incarnation = $5 AND state <> 'dead'";
        let was_dead = "SELECT state FROM nodes WHERE id = $1";
        let register = "INSERT INTO nodes (id, admin_url, version, incarnation, started_at, \
                        heartbeat_at, state, live_calls) VALUES ($1, $2, $3, $4, $5, $5, $6, $7) \
                        ON CONFLICT (id) DO UPDATE SET admin_url = excluded.admin_url, \
                        version = excluded.version, incarnation = excluded.incarnation, \
                        started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, \
                        state = excluded.state, live_calls = excluded.live_calls";
        let state = state.as_str();
        let live = as_i64(live_calls);
        let before: Option<String> = match &mut self.0 {
            Backend::Sqlite(conn) => {
                // This node only: a row of another ID is a former name of this data dir.
                conn.execute("DELETE FROM nodes WHERE id <> ?1", [&me.id])?;
                let n = conn.execute(
                    &refresh.replace('$', "?"),
                    params![now.0, state, live, me.id, me.incarnation],
                )?;
                if n > 0 {
                    return Ok(Beat::Refreshed);
                }
                let before = conn
                    .query_row(&was_dead.replace('$', "?"), [&me.id], |r| r.get(0))
                    .optional()?;
                conn.execute(
                    &register.replace('$', "?"),
                    params![
                        me.id,
                        me.admin_url,
                        me.version,
                        me.incarnation,
                        now.0,
                        state,
                        live
                    ],
                )?;
                before
            }
            Backend::Postgres { url, conn } => {
                let outcome = Self::pg(url, conn, |c| {
                    let n =
                        c.execute(refresh, &[&now.0, &state, &live, &me.id, &me.incarnation])?;
                    if n > 0 {
                        return Ok(None);
                    }
                    let mut tx = c.client.transaction()?;
                    let before = tx
                        .query_opt(&format!("{was_dead} FOR UPDATE"), &[&me.id])?
                        .map(|r| r.try_get::<_, String>(0))
                        .transpose()?;
                    tx.execute(
                        register,
                        &[
                            &me.id,
                            &me.admin_url,
                            &me.version,
                            &me.incarnation,
                            &now.0,
                            &state,
                            &live,
                        ],
                    )?;
                    tx.commit()?;
                    Ok(Some(before))
                })?;
                match outcome {
                    None => return Ok(Beat::Refreshed),
                    Some(before) => before,
                }
            }
        };
        Ok(match before.as_deref() {
            Some("dead") => Beat::Rejoined,
            _ => Beat::Registered,
        })
    }

    /// Declares dead every other node whose heartbeat is older than `timeout`, and closes
    /// its open records as `interrupted` with a `node_lost` event naming this node. Only
    /// PostgreSQL has other nodes: with SQLite, nothing to do.
    pub fn sweep(
        &mut self,
        me: &str,
        timeout: Duration,
        now: UnixMillis,
    ) -> Result<Vec<LostNode>, Error> {
        let Backend::Postgres { url, conn } = &mut self.0 else {
            return Ok(Vec::new());
        };
        let deadline = dead_after(now, timeout);
        Self::pg(url, conn, |c| {
            let mut tx = c.client.transaction()?;
            let dead: Vec<String> = tx
                .query(
                    "UPDATE nodes SET state = 'dead' WHERE id <> $1 AND state <> 'dead' \
                     AND heartbeat_at < $2 RETURNING id",
                    &[&me, &deadline],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let mut lost = Vec::with_capacity(dead.len());
            for node in dead {
                let detail = serde_json::json!({"node": node, "closed_by": me}).to_string();
                let closed = tx.query(
                    "UPDATE calls SET ended_at = GREATEST($1, started_at), \
                     end_reason = 'interrupted', hangup_by = 'server' \
                     WHERE node = $2 AND ended_at IS NULL RETURNING id",
                    &[&now.0, &node],
                )?;
                for row in &closed {
                    let id: String = row.try_get(0)?;
                    tx.execute(
                        "INSERT INTO call_events (call_id, seq, at, kind, detail) \
                         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, 'node_lost', $3 \
                         FROM call_events WHERE call_id = $1",
                        &[&id, &now.0, &detail],
                    )?;
                }
                lost.push(LostNode {
                    node,
                    closed: closed.len() as u64,
                });
            }
            tx.commit()?;
            Ok(lost)
        })
    }

    /// Closes the PostgreSQL connection, if open. Call it off any async runtime (the client
    /// blocks on a runtime of its own, also when it is dropped); then drop the registry
    /// anywhere.
    pub fn disconnect(&mut self) {
        if let Backend::Postgres { conn, .. } = &mut self.0 {
            *conn = None;
        }
    }

    /// Removes this node's row (a clean exit: its calls have ended and are written).
    pub fn leave(&mut self, me: &NodeInfo) -> Result<(), Error> {
        match &mut self.0 {
            Backend::Sqlite(conn) => {
                conn.execute(
                    "DELETE FROM nodes WHERE id = ?1 AND incarnation = ?2",
                    [&me.id, &me.incarnation],
                )?;
                Ok(())
            }
            Backend::Postgres { url, conn } => Self::pg(url, conn, |c| {
                c.execute(
                    "DELETE FROM nodes WHERE id = $1 AND incarnation = $2",
                    &[&me.id, &me.incarnation],
                )
                .map(drop)
            }),
        }
    }

    /// The roster, by ID; a node whose heartbeat is older than `timeout` shows as dead.
    pub fn nodes(&mut self, timeout: Duration, now: UnixMillis) -> Result<Vec<NodeRecord>, Error> {
        let deadline = dead_after(now, timeout);
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id");
        let raw: Vec<(String, String, String, i64, i64, String, i64)> = match &mut self.0 {
            Backend::Sqlite(conn) => conn
                .prepare(&sql)?
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?
                .collect::<Result<_, _>>()?,
            Backend::Postgres { url, conn } => Self::pg(url, conn, |c| {
                c.query(&sql, &[])?
                    .iter()
                    .map(|r| {
                        Ok((
                            r.try_get(0)?,
                            r.try_get(1)?,
                            r.try_get(2)?,
                            r.try_get(3)?,
                            r.try_get(4)?,
                            r.try_get(5)?,
                            r.try_get(6)?,
                        ))
                    })
                    .collect()
            })?,
        };
        Ok(raw
            .into_iter()
            .map(|(id, admin_url, version, started, beat, state, live)| {
                let state = match NodeState::parse(&state) {
                    _ if beat < deadline => NodeState::Dead,
                    s => s,
                };
                NodeRecord {
                    id,
                    admin_url,
                    version,
                    started_at: UnixMillis(started),
                    heartbeat_at: UnixMillis(beat),
                    state,
                    live_calls: u64::try_from(live).unwrap_or(0),
                }
            })
            .collect())
    }
}
