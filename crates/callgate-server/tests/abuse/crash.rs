//! `kill -9` with live calls: a real `callgate serve` process, killed and started again on the
//! same data dir. Needs the binary: `bench/abuse.sh` builds it and passes it in `CALLGATE_BIN`
//! (this crate's tests cannot build another crate's binary), so `cargo test` skips it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use callgate_testkit::phone::WAIT;
use callgate_testkit::{TempDir, incoming_call};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::support::*;

/// A `callgate serve` process on free ports, killed when dropped.
struct Process {
    child: Child,
    calls: SocketAddr,
    admin: SocketAddr,
}

impl Process {
    /// Starts `bin` on `data` and waits until it listens; returns it and how long that took.
    fn serve(bin: &str, data: &TempDir) -> (Self, Duration) {
        let began = Instant::now();
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--agent", "echo", "--data-dir"])
            .arg(data.path())
            .env_remove("CALLGATE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("callgate starts");
        let stderr = child.stderr.take().expect("its log");
        let (tx, log) = mpsc::channel();
        // Drained to the end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = loop {
            let line = log.recv_timeout(WAIT * 3).expect("the server listens");
            if line.contains("Server listening.") {
                break line;
            }
        };
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).expect("field") + name.len() + 1;
            line[start..]
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .expect("an address")
        };
        let process = Self {
            calls: field("calls"),
            admin: field("admin"),
            child,
        };
        (process, began.elapsed())
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.calls)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -9` with 100 live calls (the short version of the harness has no binary to kill).
/// The killed server's phones see their connections die; the server started again on the same
/// data dir ends every one of those records as `interrupted`, serves its lists whole, and a
/// canary on it keeps its p99 under 50 ms with no frame lost.
#[tokio::test]
#[ignore = "needs a callgate binary in CALLGATE_BIN: bench/abuse.sh runs it"]
async fn kill_9_with_100_live_calls() {
    let bin = std::env::var("CALLGATE_BIN").expect("CALLGATE_BIN: the callgate binary to kill");
    let calls = 100;
    let _one_at_a_time = one_at_a_time().await;
    let data = TempDir::new("crash");
    let (first, _) = Process::serve(&bin, &data);
    let mut phones = Vec::new();
    for k in 0..calls {
        let (mut ws, _) = tokio_tungstenite::connect_async(first.url())
            .await
            .expect("connected");
        ws.send(Message::Text(incoming_call(&format!("live-{k}")).into()))
            .await
            .unwrap();
        // Answered, then one frame echoed: a call in progress.
        ws.send(Message::Binary(vec![3u8; 320].into()))
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("in time")
            {
                Some(Ok(Message::Binary(_))) => break,
                Some(Ok(_)) => continue,
                other => panic!("call {k}: {other:?}"),
            }
        }
        phones.push(ws);
    }
    let before_kill = Usage::of(first.child.id());
    let mut first = first;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    let mut dead = 0;
    for ws in &mut phones {
        loop {
            match tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("in time")
            {
                Some(Ok(Message::Close(_))) => panic!("a close frame from a killed process"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break,
            }
        }
        dead += 1;
    }
    drop(phones);

    let (second, restart) = Process::serve(&bin, &data);
    let before = Usage::of(second.child.id());
    let canary = Canary::place(
        &second.url(),
        second.admin,
        &incoming_call("canary"),
        "canary",
    )
    .await;
    // Every record of the killed server, while the canary runs.
    let mut interrupted = 0;
    for k in 0..calls {
        let id = record_id(second.admin, &format!("live-{k}")).await;
        let record = ended_record(second.admin, &id).await;
        assert_eq!(record["end_reason"], "interrupted", "{record}");
        interrupted += 1;
    }
    canary.alive(100).await;
    let peak = Usage::of(second.child.id());
    let run = canary.end_on(second.admin).await;
    let records = check_records(second.admin).await;
    let stats = Stats::of(&run.frames());
    report(&json!({
        "attack": "kill -9 with 100 live calls",
        "strength": Strength::get().as_str(),
        "canary": {
            "frames": stats.frames, "lost": stats.lost, "p50_ms": ms(stats.p50),
            "p99_ms": ms(stats.p99), "max_ms": ms(stats.max), "judged_frames": stats.frames,
            "judged_lost": stats.lost, "judged_p99_ms": ms(stats.p99),
            "problems": run.problems,
        },
        "rss": {"before": before.rss, "peak": peak.rss, "after": peak.rss,
            "killed": before_kill.rss},
        "fds": {"before": before.fds, "peak": peak.fds, "after": peak.fds,
            "killed": before_kill.fds},
        "records": match &records {
            Ok(n) => json!({"consistent": true, "count": n}),
            Err(e) => json!({"consistent": false, "problem": e}),
        },
        "figures": {
            "live calls killed": calls,
            "connections that died with the process": dead,
            "restart on the same data dir (ms)": ms(restart),
            "records ended as interrupted": interrupted,
            "note": "memory and descriptors are the restarted server process's",
        },
    }));
    assert!(run.problems.is_empty(), "{:?}", run.problems);
    assert_eq!(stats.lost, 0);
    assert!(stats.p99 < P99_BOUND, "{stats:?}");
    assert_eq!(records.expect("records"), calls + 1);
}
