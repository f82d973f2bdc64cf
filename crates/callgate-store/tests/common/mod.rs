//! The backends the store's tests run against: SQLite always; PostgreSQL when
//! `CALLGATE_TEST_PG` names a server (`scripts/pg-test-server start` prints it), each test in
//! a schema of its own so tests run in parallel. Without it the PostgreSQL tests say loudly
//! that they are skipped.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::large_enum_variant,
    clippy::unwrap_used,
    reason = "test helpers: each test binary uses a part; a failure is the test failing"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use callgate_store::{AnyStore, PgStore, PgUrl, SqliteStore};

/// The variable naming the test server.
pub const PG_VAR: &str = "CALLGATE_TEST_PG";

/// The test server's URL, or `None` after saying (past the test harness's capture) that the
/// PostgreSQL test `name` is skipped.
pub fn pg_url(name: &str) -> Option<String> {
    match std::env::var(PG_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            // Once per test (a property test asks for every case).
            static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let mut said = SAID
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if said.iter().any(|n| n == name) {
                return None;
            }
            said.push(name.to_owned());
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {name}: PostgreSQL tests need {PG_VAR}=postgres://... \
                 (start one with `eval \"$(scripts/pg-test-server start)\"`)"
            );
            None
        }
    }
}

/// A data directory removed at the end of the test.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("callgate-store-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A schema of its own on the test server, dropped at the end of the test, and a data
/// directory for the journal.
pub struct PgSchema {
    admin: String,
    pub name: String,
    /// The URL whose connections use the schema.
    pub url: PgUrl,
    pub dir: TempDir,
}

/// Runs `f` on a thread of its own: the synchronous PostgreSQL client runs a runtime of its
/// own, which cannot start inside a test's runtime.
pub fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

impl PgSchema {
    pub fn new(admin: &str) -> Self {
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        let (a, n) = (admin.to_owned(), name.clone());
        off_runtime(move || {
            let mut c = postgres::Client::connect(&a, postgres::NoTls).unwrap();
            c.batch_execute(&format!("CREATE SCHEMA {n}")).unwrap();
        });
        let sep = if admin.contains('?') { '&' } else { '?' };
        let url =
            PgUrl::parse(&format!("{admin}{sep}options=-csearch_path%3D{name}"), None).unwrap();
        Self {
            admin: admin.to_owned(),
            name,
            url,
            dir: TempDir::new(),
        }
    }

    /// A fresh store in the schema (migrated).
    pub fn open(&self) -> PgStore {
        let (url, dir) = (self.url.clone(), self.dir.0.clone());
        off_runtime(move || PgStore::open(&url, &dir).unwrap())
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (a, n) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&a, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA {n} CASCADE"));
            }
        })
        .join();
    }
}

/// Which backend a test runs on.
pub enum Backend {
    Sqlite,
    Postgres(PgSchema),
}

impl Backend {
    /// SQLite in memory, or PostgreSQL in a fresh schema (`None`, loudly, when not enabled).
    pub fn new(postgres: bool, name: &str) -> Option<Self> {
        match postgres {
            false => Some(Self::Sqlite),
            true => pg_url(name).map(|url| Self::Postgres(PgSchema::new(&url))),
        }
    }

    /// A fresh, empty store.
    pub fn open(&self) -> AnyStore {
        match self {
            Self::Sqlite => AnyStore::Sqlite(SqliteStore::open_in_memory().unwrap()),
            Self::Postgres(schema) => AnyStore::Postgres(schema.open()),
        }
    }
}

/// `scripts/pg-test-server`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server")
}

/// A PostgreSQL server of the test's own (for tests that stop it, or need TLS), stopped and removed at the end.
pub struct Server {
    /// Its URL (`sslmode=disable`).
    pub url: String,
    dir: String,
    /// The CA of its certificate, with TLS.
    pub ca: Option<PathBuf>,
}

impl Server {
    /// Starts one on `port`, with TLS (its CA in `ca`) if `tls`.
    pub fn start(port: u16, tls: bool) -> Self {
        let out = Command::new(script())
            .args(["start", &port.to_string()])
            .env("PG_TEST_SSL", if tls { "1" } else { "0" })
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg-test-server start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap()
                .trim_matches('\'')
                .to_owned()
        };
        Self {
            url: value("CALLGATE_TEST_PG"),
            dir: value("CALLGATE_TEST_PG_DIR"),
            ca: tls.then(|| PathBuf::from(value("CALLGATE_TEST_PG_CA"))),
        }
    }

    /// `pause` (pg_ctl stop) or `resume` it.
    pub fn run(&self, what: &str) {
        let status = Command::new(script())
            .args([what, &self.dir])
            .status()
            .unwrap();
        assert!(status.success(), "pg-test-server {what}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["stop", &self.dir]).status();
    }
}
