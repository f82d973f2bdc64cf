//! The real `callgate serve` for process tests: started on free ports, its log read as it
//! goes, killed and reaped whatever the test does.

#![allow(dead_code, reason = "each test binary uses part of this module")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use callgate_testkit::{Phone, TempDir, http, incoming_call};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_callgate");

/// How long the server may take to log what a test waits for (a bound, not a pace).
pub(crate) const LOG_WAIT: Duration = Duration::from_secs(30);

/// A running `callgate serve`, its addresses and its log.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) calls: SocketAddr,
    pub(crate) admin: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Never leave a server behind, whatever the test did.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    #[allow(
        clippy::zombie_processes,
        reason = "Proc's Drop kills and reaps the child on every path"
    )]
    pub(crate) fn serve(data: &TempDir, config: Option<&Path>) -> Self {
        Self::serve_on(data, config, Some("127.0.0.1:0"), &[])
    }

    /// [`Proc::serve`] with `--admin-listen` given (`None`: the file's, or the default) and
    /// these environment variables set for the server.
    #[allow(
        clippy::zombie_processes,
        reason = "Proc's Drop kills and reaps the child on every path"
    )]
    pub(crate) fn serve_on(
        data: &TempDir,
        config: Option<&Path>,
        admin: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(BIN);
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        if let Some(admin) = admin {
            command.args(["--admin-listen", admin]);
        }
        command.arg("--data-dir").arg(data.path());
        command.envs(env.iter().copied());
        match config {
            Some(config) => {
                command.arg("--config").arg(config);
            }
            // Without a file the default is the demo menu: these tests want the echo agent.
            None => {
                command.args(["--agent", "echo"]);
            }
        }
        let mut child = command
            .env_remove("CALLGATE_AGENT")
            .env_remove("CALLGATE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start callgate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut proc = Self {
            child,
            calls: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
        };
        let line = proc.wait_for("Server listening.");
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).expect("field") + name.len() + 1;
            line[start..]
                .split_whitespace()
                .next()
                .expect("value")
                .parse()
                .expect("address")
        };
        proc.calls = field("calls");
        proc.admin = field("admin");
        proc
    }

    /// The first log line from now on that contains `text`.
    pub(crate) fn wait_for(&self, text: &str) -> String {
        loop {
            let line = self
                .log
                .recv_timeout(LOG_WAIT)
                .unwrap_or_else(|e| panic!("the server logged {text:?} ({e})"));
            if line.contains(text) {
                return line;
            }
        }
    }

    pub(crate) fn hangup_signal(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/", self.calls)
    }

    /// The newest call record.
    pub(crate) async fn last_call(&self) -> serde_json::Value {
        let (status, body) = http::request(self.admin, "GET", "/api/calls?limit=1", None).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["calls"][0].clone()
    }

    /// The record of the call `external_id` once it has ended: the end is awaited on the
    /// server's live event stream (`call.ended`), never polled.
    pub(crate) async fn ended_call(&self, external_id: &str) -> serde_json::Value {
        callgate_testkit::sse::ended_call(self.admin, &[], external_id).await
    }

    /// Places an inbound call, waits for the answer and returns its record (route chosen).
    pub(crate) async fn inbound_call(&self, id: &str) -> serde_json::Value {
        let mut phone = Phone::connect(&self.url()).await;
        phone.text(incoming_call(id)).await;
        assert_eq!(phone.recv_json().await["event"], "answer");
        let record = self.last_call().await;
        assert_eq!(record["external_id"], id, "{record}");
        phone.close(1000, "done").await;
        record
    }
}
