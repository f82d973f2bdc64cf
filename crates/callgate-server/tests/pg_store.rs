//! The PostgreSQL store under a running server: calls go on while PostgreSQL is stopped, and
//! their records are all there, once, when it is back. Runs when `CALLGATE_TEST_PG` is set (a
//! machine with PostgreSQL: `scripts/pg-test-server`), on a server of its own (port
//! `CALLGATE_TEST_PG_SERVER_PORT`, default 25435) since it stops it; says SKIPPED otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use callgate_store::PgUrl;
use callgate_testkit::audio::{frames, speechlike_pcm16};
use callgate_testkit::{Received, TestServer, cdr, incoming_call, spawn_server, spawn_server_in};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server")
}

/// A PostgreSQL server of the test's own, stopped and removed at the end.
struct Pg {
    url: String,
    dir: String,
}

impl Pg {
    fn start() -> Option<Self> {
        if std::env::var("CALLGATE_TEST_PG").is_err() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED pg_store: PostgreSQL tests need CALLGATE_TEST_PG=postgres://... \
                 (start one with `eval \"$(scripts/pg-test-server start)\"`)"
            );
            return None;
        }
        let port = std::env::var("CALLGATE_TEST_PG_SERVER_PORT").unwrap_or("25435".into());
        let out = Command::new(script())
            .args(["start", &port])
            .output()
            .expect("pg-test-server runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("text");
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .expect("printed")
                .trim_matches('\'')
                .to_owned()
        };
        Some(Self {
            url: value("CALLGATE_TEST_PG"),
            dir: value("CALLGATE_TEST_PG_DIR"),
        })
    }

    fn run(&self, what: &str) {
        let ok = Command::new(script())
            .args([what, &self.dir])
            .status()
            .expect("pg-test-server runs")
            .success();
        assert!(ok, "pg-test-server {what}");
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["stop", &self.dir]).status();
    }
}

/// One inbound echo call, from start to the caller's hangup and CDR.
async fn echo_call(server: &TestServer, id: &str, seed: u32) {
    let mut phone = server.phone("/").await;
    phone.text(incoming_call(id)).await;
    phone.recv().await;
    let audio = speechlike_pcm16(400, 8000, seed);
    for f in frames(&audio, 320) {
        phone.binary(f).await;
    }
    let mut echoed = Vec::new();
    while echoed.len() < audio.len() {
        match phone.recv().await {
            Received::Binary(b) => echoed.extend_from_slice(&b),
            other => panic!("call {id}: expected audio, got {other:?}"),
        }
    }
    assert!(echoed == audio, "call {id}: the echo is exact");
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr(id)).await;
    assert_eq!(phone.closed().await.0, 1000, "call {id} ends normally");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_on_while_postgres_is_stopped_and_their_records_arrive_once() {
    let Some(pg) = Pg::start() else { return };
    let url = PgUrl::parse(&pg.url, None).expect("test URL");
    let with_pg = |c: &mut callgate_server::Config| c.store_url = Some(url.clone());
    let mut server = spawn_server(with_pg).await;

    echo_call(&server, "before", 1).await;
    server.ended_call("before").await;

    // PostgreSQL stops: a call starts, talks and ends as if nothing happened.
    pg.run("pause");
    echo_call(&server, "during", 2).await;
    let metrics = server.metrics_text().await;
    assert!(
        !metrics.contains("callgate_store_backlog 0\n"),
        "the journal holds the call's records:\n{metrics}"
    );
    assert!(
        metrics.contains("callgate_store_write_failures_total 0\n"),
        "{metrics}"
    );

    // PostgreSQL is back; the server stops (its writer writes the journal last) and a new
    // one starts on the same data directory and database.
    pg.run("resume");
    server.begin_shutdown();
    let dir = server.stopped().await;
    let again = spawn_server_in(dir, with_pg).await;
    let calls = again.calls().await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    for id in ["before", "during"] {
        let c = again.ended_call(id).await;
        assert_eq!(c["end_reason"], "peer_hangup", "{c}");
        assert_eq!(c["bytes_in"], 6400, "{c}");
        assert!(c["cdr"].is_object(), "{c}");
        let (status, events) = again
            .get(&format!(
                "/api/calls/{}/events",
                c["id"].as_str().expect("id")
            ))
            .await;
        assert_eq!(status, 200, "{events}");
        let seqs: Vec<u64> = events["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect();
        assert!(!seqs.is_empty(), "{events}");
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "once each"
        );
    }
    again.shutdown().await;
}
