//! The real binary: bad configuration exits 64 before binding; a `kill -9` during live calls
//! leaves records that the next start closes as `interrupted`; SIGINT ends live calls and
//! shuts down cleanly; SIGTERM drains: the live call goes on to its end, then exit 0.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use callgate_testkit::{Phone, Received, TempDir, callbridge_start, http, incoming_call};
use common::{BIN, Proc};

async fn calls(admin: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http::request(admin, "GET", "/api/calls", None).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["calls"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn kill_9_during_live_calls_then_restart_closes_them_as_interrupted() {
    let data = TempDir::new("crash");
    let mut first = Proc::serve(&data, None);
    let mut phones = Vec::new();
    for n in 0..3 {
        let mut phone = Phone::connect(&format!("ws://{}/", first.calls)).await;
        if n == 0 {
            phone.text(callbridge_start("crash-0")).await;
        } else {
            phone.text(incoming_call(&format!("crash-{n}"))).await;
        }
        phone.recv().await;
        phone.binary(vec![3u8; 320]).await;
        assert!(matches!(phone.recv().await, Received::Binary(_)));
        phones.push(phone);
    }
    let live = calls(first.admin).await;
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|c| c["ended_at"].is_null()));

    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    for phone in &mut phones {
        assert_eq!(
            phone.closed().await.0,
            1006,
            "the connection died with the process"
        );
    }

    let mut second = Proc::serve(&data, None);
    let records = calls(second.admin).await;
    assert_eq!(records.len(), 3);
    for c in &records {
        assert_eq!(c["end_reason"], "interrupted", "{c}");
        assert_eq!(c["hangup_by"], "server");
        assert!(c["ended_at"].is_string());
    }
    // The restarted server takes calls again.
    let mut phone = Phone::connect(&format!("ws://{}/", second.calls)).await;
    phone.text(incoming_call("after-crash")).await;
    assert_eq!(phone.recv().await.json()["event"], "answer");

    // SIGINT: a clean stop with exit code 0, and the live call ends as server_shutdown.
    let pid = second.child.id().to_string();
    let status = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    assert_eq!(phone.recv_json().await["event"], "hangup");
    phone.text(callgate_testkit::cdr("after-crash")).await;
    assert_eq!(phone.closed().await.0, 1001);
    let exit = second.child.wait().expect("exit status");
    assert_eq!(exit.code(), Some(0));
    let third = Proc::serve(&data, None);
    let records = calls(third.admin).await;
    let after = records
        .iter()
        .find(|c| c["external_id"] == "after-crash")
        .expect("record");
    assert_eq!(after["end_reason"], "server_shutdown");
    drop(third);
}

fn signal(proc: &Proc, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &proc.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_drains_then_exits_0_once_the_caller_hangs_up() {
    let data = TempDir::new("sigterm");
    let mut server = Proc::serve(&data, None);
    let mut phone = Phone::connect(&server.url()).await;
    phone.text(incoming_call("term-live")).await;
    assert_eq!(phone.recv_json().await["event"], "answer");

    signal(&server, "TERM");
    server.wait_for("Draining: taking no new calls");
    let (status, body) = http::request(server.admin, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    let (status, _) = http::request(server.admin, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let refused = Phone::try_connect(&server.url(), &[]).await.err();
    assert_eq!(refused.map(|(code, _)| code), Some(503));

    // The live call still echoes, and the process waits for it.
    for fill in 1..=3u8 {
        phone.binary(vec![fill; 320]).await;
        match phone.recv().await {
            Received::Binary(b) => assert_eq!(&b[..], &[fill; 320][..]),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    assert!(
        server.child.try_wait().expect("status").is_none(),
        "exited with a call live"
    );
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(callgate_testkit::cdr("term-live")).await;
    assert_eq!(phone.closed().await.0, 1000);
    let exit = server.child.wait().expect("exit status");
    assert_eq!(exit.code(), Some(0));
    server.wait_for("Drained: no call left");

    let again = Proc::serve(&data, None);
    let records = calls(again.admin).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["end_reason"], "peer_hangup", "{}", records[0]);
    assert_eq!(records[0]["hangup_by"], "peer");
}

fn exit_code(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run callgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_64_naming_the_problem() {
    let dir = TempDir::new("config");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nmax_cals = 5\n").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let flow = dir.path().join("flow.toml");
    std::fs::write(&flow, "[[step]]\nname = \"a\"\nkind = \"dance\"\n").expect("write");
    let flow = flow.to_str().expect("utf-8 path");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["serve", "--flow", flow],
            vec![],
            "step \"a\": kind: unknown step kind \"dance\"",
        ),
        (
            vec!["serve", "--flow", flow, "--agent", "echo"],
            vec![],
            "--agent and --flow",
        ),
        (
            vec!["serve", "--listen", "nowhere"],
            vec![],
            "invalid listen \"nowhere\"",
        ),
        (
            vec!["serve", "--agent", "parrot"],
            vec![],
            "unknown agent \"parrot\"",
        ),
        (
            vec!["serve", "--config", file],
            vec![],
            "unknown field `max_cals`",
        ),
        (
            vec!["serve", "--config", "/no/such.toml"],
            vec![],
            "cannot read config file",
        ),
        (
            vec!["serve"],
            vec![("CALLGATE_CDR_TIMEOUT", "soon")],
            "invalid cdr_timeout \"soon\"",
        ),
        (
            vec!["serve"],
            vec![("CALLGATE_MAX_CALLS", "0")],
            "invalid setting max_calls",
        ),
        (
            vec!["serve"],
            vec![("CALLGATE_INBOUND_AUDIO_FORMAT", "MP3")],
            "invalid inbound_audio_format \"MP3\"",
        ),
        (
            vec!["serve", "--no-such-flag"],
            vec![],
            "unexpected argument",
        ),
    ];
    for (args, env, message) in cases {
        let (code, stderr) = exit_code(&args, &env);
        assert_eq!(code, Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?} {env:?}: {stderr}");
    }
}

#[test]
fn a_flows_warnings_are_printed_at_start() {
    let dir = TempDir::new("flow-warning");
    let flow = dir.path().join("flow.toml");
    std::fs::write(
        &flow,
        "[[step]]\nname = \"a\"\nkind = \"hangup\"\n[[step]]\nname = \"lost\"\nkind = \"hangup\"\n",
    )
    .expect("write");
    let flow = flow.to_str().expect("utf-8 path");
    let (code, stderr) = exit_code(&["routes", "check", "--flow", flow], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("callgate: warning: flow")
            && stderr.contains("step \"lost\" is never reached"),
        "{stderr}"
    );
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    // The file's bad max_calls is overridden by the flag, so the only failure left is the bad
    // agent from the environment, which beats the file's good one.
    let dir = TempDir::new("precedence");
    let file = dir.path().join("ok.toml");
    std::fs::write(&file, "agent = \"echo\"\nmax_calls = 0\n").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let (code, stderr) = exit_code(
        &["serve", "--config", file, "--max-calls", "5"],
        &[("CALLGATE_AGENT", "parrot")],
    );
    assert_eq!(code, Some(64));
    assert!(stderr.contains("unknown agent \"parrot\""), "{stderr}");
    let (code, stderr) = exit_code(&["serve", "--config", file], &[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("invalid setting max_calls"), "{stderr}");
}
