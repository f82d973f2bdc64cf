//! The webhook outbox: every event a webhook endpoint subscribes to, kept until it is
//! delivered (or given up).
//!
//! Rows are added by the store writer in the same transaction as the writes they report
//! ([`Store::enqueue_deliveries`](crate::Store::enqueue_deliveries)): an event is in the
//! outbox if and only if the store holds what it says. With PostgreSQL a batch the database
//! cannot take goes to the local journal, its outbox rows with it, and they reach the
//! database (and their endpoints) when it is back.
//!
//! Delivery works on an [`Outbox`]: a connection of its own (like the node roster), used by
//! the server's delivery tasks off the runtime. Each node delivers the rows it wrote
//! (`node`); per endpoint, strictly in order: only the oldest row not given up (the head) is
//! ever due.

use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::notice::{Kind, Notice};
use crate::pg::Conn;
use crate::{Error, PgUrl, UnixMillis};

/// The SQL of the outbox table, the same text for both backends but for the key (a macro,
/// for `concat!` in the migrations).
macro_rules! outbox_sql {
    ($seq:literal, $flag:literal) => {
        concat!(
            "CREATE TABLE webhook_outbox (\n    seq ",
            $seq,
            ",\n",
            r#"    node        TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    next_at     BIGINT NOT NULL,
    failed      "#,
            $flag,
            r#" NOT NULL DEFAULT FALSE,
    UNIQUE (endpoint, event_id)
);
CREATE INDEX webhook_outbox_queue ON webhook_outbox (node, endpoint, failed, seq);
"#
        )
    };
}
pub(crate) use outbox_sql;

/// What an endpoint subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The endpoint (its URL): the outbox's queue name.
    pub endpoint: String,
    /// The event types it takes; `None`: every type (`*`).
    pub kinds: Option<Vec<Kind>>,
}

impl Subscription {
    /// Whether this endpoint takes events of `kind`.
    pub fn wants(&self, kind: Kind) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }
}

/// A row to add: one event for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDelivery {
    /// The node that delivers it (the one that wrote it).
    pub node: String,
    /// The endpoint.
    pub endpoint: String,
    /// The event's id (`webhook-id`).
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The JSON body, as sent on every attempt.
    pub body: String,
    /// When it was enqueued, ms.
    pub created_at: i64,
}

impl NewDelivery {
    /// The rows for `notices`: one per notice and subscribed endpoint.
    pub fn for_notices(node: &str, subs: &[Subscription], notices: &[Notice]) -> Vec<Self> {
        let now = UnixMillis::now().0;
        let mut rows = Vec::new();
        for n in notices {
            let mut body = None;
            for s in subs.iter().filter(|s| s.wants(n.kind)) {
                rows.push(Self {
                    node: node.to_owned(),
                    endpoint: s.endpoint.clone(),
                    event_id: n.id.clone(),
                    event_type: n.kind.as_str().to_owned(),
                    body: body.get_or_insert_with(|| n.body()).clone(),
                    created_at: now,
                });
            }
        }
        rows
    }
}

/// A row of the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivery {
    /// Its place in the outbox (per-endpoint order).
    #[serde(skip)]
    pub seq: i64,
    /// The endpoint.
    pub endpoint: String,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The JSON body.
    #[serde(skip)]
    pub body: String,
    /// When it was enqueued.
    pub created_at: UnixMillis,
    /// Attempts so far.
    pub attempts: u32,
    /// What the last attempt got (`200`, `503`, `timeout`, `unreachable`), if any.
    pub last_status: Option<String>,
    /// When the next attempt is due (null once given up).
    pub next_attempt: Option<UnixMillis>,
    /// `pending` or `failed` (given up).
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "pending"))]
    pub state: &'static str,
}

const COLUMNS: &str = "seq, endpoint, event_id, event_type, body, created_at, attempts, \
                       last_status, next_at, failed";

/// A connection to the outbox, for the delivery tasks (it blocks: run it off the runtime).
pub struct Outbox(Backend);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Backend::Sqlite(_) => f.write_str("Outbox(Sqlite)"),
            Backend::Postgres { url, .. } => write!(f, "Outbox({url:?})"),
        }
    }
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per node, built once and never moved on a hot path"
)]
enum Backend {
    Sqlite(rusqlite::Connection),
    Postgres { url: PgUrl, conn: Option<Conn> },
}

fn row_values(
    seq: i64,
    endpoint: String,
    event_id: String,
    event_type: String,
    body: String,
    (created_at, attempts, last_status, next_at, failed): (i64, i64, Option<String>, i64, bool),
) -> Delivery {
    Delivery {
        seq,
        endpoint,
        event_id,
        event_type,
        body,
        created_at: UnixMillis(created_at),
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_status,
        next_attempt: (!failed).then_some(UnixMillis(next_at)),
        state: if failed { "failed" } else { "pending" },
    }
}

fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(row_values(
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        (r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?),
    ))
}

fn pg_row(r: &postgres::Row) -> Result<Delivery, postgres::Error> {
    Ok(row_values(
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
        (
            r.try_get(5)?,
            i64::from(r.try_get::<_, i32>(6)?),
            r.try_get(7)?,
            r.try_get(8)?,
            r.try_get(9)?,
        ),
    ))
}

impl Outbox {
    /// The outbox in the SQLite database of `data_dir` (opened by the store first, which
    /// migrates it).
    pub fn sqlite(data_dir: &std::path::Path) -> Result<Self, Error> {
        let conn = rusqlite::Connection::open(data_dir.join("callgate.db"))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Self(Backend::Sqlite(conn)))
    }

    /// The outbox in PostgreSQL; nothing is connected until the first call.
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
            *conn = None;
        }
        Ok(result?)
    }

    /// The head of `endpoint`'s queue for `node`: its oldest row not given up, due or not.
    pub fn head(&mut self, node: &str, endpoint: &str) -> Result<Option<Delivery>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM webhook_outbox WHERE node = $1 AND endpoint = $2 \
             AND failed = FALSE ORDER BY seq LIMIT 1"
        );
        match &mut self.0 {
            Backend::Sqlite(c) => Ok(c
                .prepare_cached(&sql.replace('$', "?"))?
                .query_row(params![node, endpoint], sqlite_row)
                .optional()?),
            Backend::Postgres { url, conn } => Self::pg(url, conn, |c| {
                c.client
                    .query_opt(&sql, &[&node, &endpoint])?
                    .map(|r| pg_row(&r))
                    .transpose()
            }),
        }
    }

    /// The row was delivered: it leaves the outbox.
    pub fn delivered(&mut self, seq: i64) -> Result<(), Error> {
        let sql = "DELETE FROM webhook_outbox WHERE seq = $1";
        match &mut self.0 {
            Backend::Sqlite(c) => {
                c.prepare_cached(&sql.replace('$', "?"))?.execute([seq])?;
                Ok(())
            }
            Backend::Postgres { url, conn } => {
                Self::pg(url, conn, |c| c.client.execute(sql, &[&seq]).map(|_| ()))
            }
        }
    }

    /// An attempt failed with `status`: try again at `next` or, with `None`, give up (the
    /// row stays, as failed, and no longer holds up the endpoint's queue).
    pub fn attempt_failed(
        &mut self,
        seq: i64,
        status: &str,
        next: Option<UnixMillis>,
    ) -> Result<(), Error> {
        let sql = "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = $2, \
                   next_at = $3, failed = $4 WHERE seq = $1";
        let (next_at, failed) = (next.map_or(0, |n| n.0), next.is_none());
        match &mut self.0 {
            Backend::Sqlite(c) => {
                c.prepare_cached(&sql.replace('$', "?"))?
                    .execute(params![seq, status, next_at, failed])?;
                Ok(())
            }
            Backend::Postgres { url, conn } => Self::pg(url, conn, |c| {
                c.client
                    .execute(sql, &[&seq, &status, &next_at, &failed])
                    .map(|_| ())
            }),
        }
    }

    /// Up to `limit` rows of `node` (pending and failed), oldest first.
    pub fn list(&mut self, node: &str, limit: u32) -> Result<Vec<Delivery>, Error> {
        let sql =
            format!("SELECT {COLUMNS} FROM webhook_outbox WHERE node = $1 ORDER BY seq LIMIT $2");
        let limit = i64::from(limit);
        match &mut self.0 {
            Backend::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sql.replace('$', "?"))?;
                let rows = stmt.query_map(params![node, limit], sqlite_row)?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Backend::Postgres { url, conn } => Self::pg(url, conn, |c| {
                c.client
                    .query(&sql, &[&node, &limit])?
                    .iter()
                    .map(pg_row)
                    .collect()
            }),
        }
    }

    /// How many rows of `node` wait for delivery (not given up).
    pub fn pending(&mut self, node: &str) -> Result<u64, Error> {
        let sql = "SELECT COUNT(*) FROM webhook_outbox WHERE node = $1 AND failed = FALSE";
        let n: i64 = match &mut self.0 {
            Backend::Sqlite(c) => c
                .prepare_cached(&sql.replace('$', "?"))?
                .query_row([node], |r| r.get(0))?,
            Backend::Postgres { url, conn } => {
                Self::pg(url, conn, |c| c.client.query_one(sql, &[&node])?.try_get(0))?
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Drops the PostgreSQL connection, if any (it blocks: off the runtime).
    pub fn disconnect(&mut self) {
        if let Backend::Postgres { conn, .. } = &mut self.0 {
            *conn = None;
        }
    }
}

/// The insert both backends run for each row (ignored when present: a journal replayed
/// twice adds each row once).
pub(crate) const INSERT: &str = "INSERT INTO webhook_outbox (node, endpoint, event_id, \
     event_type, body, created_at, next_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
     ON CONFLICT (endpoint, event_id) DO NOTHING";
