//! A PostgreSQL schema of a test's own on the server named by `CALLGATE_TEST_PG` (started by
//! `scripts/pg-test-server`), dropped when the test ends. Tests that need PostgreSQL say
//! SKIPPED and return when the variable is not set.

use std::io::Write;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// Debian's psql, which runs the schema's DDL.
pub const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// A schema of the test's own, dropped at the end.
pub struct Schema {
    admin: String,
    name: String,
    /// The schema's URL (`search_path` set), for `--store-url` or `PgUrl::parse`.
    pub url: String,
}

impl Schema {
    /// A new schema, or `None` (after saying SKIPPED `test`) without `CALLGATE_TEST_PG`.
    pub fn new(test: &str) -> Option<Self> {
        let Ok(admin) = std::env::var("CALLGATE_TEST_PG") else {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: PostgreSQL tests need CALLGATE_TEST_PG=postgres://... \
                 (start one with `eval \"$(scripts/pg-test-server start)\"`)"
            );
            return None;
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("t_{}_{nanos}", std::process::id());
        psql(&admin, &format!("CREATE SCHEMA {name}"));
        let sep = if admin.contains('?') { '&' } else { '?' };
        let url = format!("{admin}{sep}options=-csearch_path%3D{name}");
        Some(Self { admin, name, url })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        psql(&self.admin, &format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

/// Runs `sql` with psql as the admin URL's user; panics with psql's message if it fails.
pub fn psql(admin: &str, sql: &str) {
    let out = Command::new(PSQL)
        .args([admin, "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
