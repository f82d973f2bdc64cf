//! A rolling restart for real, through HAProxy: the short version of
//! `bench/rolling-restart.sh` (two nodes of this binary, HAProxy with `deploy/haproxy.cfg`,
//! `callgate load --for` through it; node A drained with SIGTERM and restarted, then node B).
//! The script checks that no call was refused or dropped, no frame lost, and that every record
//! on both nodes ended by the caller.
//!
//! Twice: each node with its own SQLite, and both nodes as a cluster on one PostgreSQL
//! (`CALLGATE_TEST_PG`, a schema of the test's own), where the records are read through one
//! node's API and each must name the node that held it.
//!
//! Runs only with `CALLGATE_TEST_HAPROXY=1`: it needs `haproxy` and `curl`, and the fixed
//! ports of `deploy/haproxy.cfg` (14143, 14243-14244, 14343-14344, 14404) free (the tests
//! run one at a time: `.config/nextest.toml`). About a minute each.

use std::path::Path;
use std::process::Command;

use callgate_testkit::TempDir;
use callgate_testkit::pg::Schema;

#[test]
fn a_rolling_restart_through_haproxy_refuses_and_drops_no_call() {
    if std::env::var_os("CALLGATE_TEST_HAPROXY").is_none() {
        eprintln!(
            "skipped: set CALLGATE_TEST_HAPROXY=1 to run the rolling restart through HAProxy"
        );
        return;
    }
    roll(None);
}

#[test]
fn a_rolling_restart_of_a_cluster_on_postgresql_refuses_and_drops_no_call() {
    if std::env::var_os("CALLGATE_TEST_HAPROXY").is_none() {
        eprintln!(
            "skipped: set CALLGATE_TEST_HAPROXY=1 to run the rolling restart through HAProxy"
        );
        return;
    }
    let Some(schema) = Schema::new("rolling_restart_postgresql") else {
        return;
    };
    roll(Some(&schema.url));
}

/// Runs the short version of the script, on PostgreSQL when `store_url` is given.
fn roll(store_url: Option<&str>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/rolling-restart.sh");
    let out = TempDir::new("rolling-restart");
    let status = Command::new("bash")
        .arg(&script)
        .env("CALLGATE_BIN", env!("CARGO_BIN_EXE_callgate"))
        .envs([
            ("CALLS", "20"),
            ("DURATION", "5s"),
            ("FOR", "30s"),
            ("SETTLE", "5"),
            ("RAMP", "20"),
        ])
        .env("OUT", out.path())
        .env("STORE_URL", store_url.unwrap_or_default())
        .env_remove("SUMMARY")
        .status()
        .expect("run bench/rolling-restart.sh");
    if !status.success() {
        for file in ["timeline.txt", "figures.txt", "load.log", "haproxy.log"] {
            let text = std::fs::read_to_string(out.path().join(file)).unwrap_or_default();
            eprintln!("--- {file}\n{text}");
        }
    }
    assert!(status.success(), "the rolling restart failed: {status}");
}
