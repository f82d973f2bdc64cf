//! Routes in the configuration file, with the real binary: bad route files exit 64 naming the
//! file, the route and the field; `routes check` and `routes which`; SIGHUP puts a new table in
//! force for new calls and keeps the old one when the new file is bad; a call no route takes
//! is refused with 1008 and recorded as `no_route`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use callgate_testkit::{Phone, TempDir, callbridge_start};
use common::{BIN, Proc};

/// Routes by the test calls' facts: CallBridge agentId `agent-main`, inbound DID `0212345678`.
const FIRST: &str = r#"
[[routes]]
name = "cb-main"
agent = "echo"
match = { protocol = "callbridge", agent_id = "agent-main" }

[[routes]]
name = "first"
agent = "echo"
"#;

const SECOND: &str = r#"
[[routes]]
name = "dids"
agent = "tone"
[routes.match]
callee = ["0212*", "0700*"]
[routes.settings]
frequency_hz = 600
"#;

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs the binary; returns its exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CALLGATE_AGENT")
        .env_remove("CALLGATE_CONFIG")
        .output()
        .expect("run callgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_route_files_exit_64_naming_the_file_the_route_and_the_field() {
    let dir = TempDir::new("bad-routes");
    let route = |name: &str, agent: &str, rest: &str| {
        format!("[[routes]]\nname = \"{name}\"\nagent = \"{agent}\"\n{rest}\n")
    };
    let cases: Vec<(String, &[&str])> = vec![
        (
            route("typo", "echo", "[routes.match]\nagentid = \"x\""),
            &["route \"typo\"", "match.agentid", "unknown field"],
        ),
        (
            route("who", "parrot", ""),
            &["route \"who\"", "agent", "unknown agent \"parrot\""],
        ),
        (
            route("pat", "echo", "match = { callee = \"07*1\" }"),
            &["route \"pat\"", "match.callee", "only at the end"],
        ),
        (
            route("twice", "echo", "match = { callee = \"1\" }") + &route("twice", "echo", ""),
            &[
                "route \"twice\"",
                "name",
                "another route already has this name",
            ],
        ),
        (
            route("all", "echo", "") + &route("late", "echo", "match = { callee = \"1\" }"),
            &["route \"late\"", "match", "could never match"],
        ),
        (
            route("t", "tone", "[routes.settings]\nfrequency_hz = \"x\""),
            &["route \"t\"", "settings.frequency_hz"],
        ),
        (
            route("t0", "tone", "[routes.settings]\nfrequency_hz = 0"),
            &["route \"t0\"", "settings.frequency_hz"],
        ),
        (
            route("tk", "tone", "[routes.settings]\nloudness = 3"),
            &["route \"tk\"", "settings", "loudness"],
        ),
        (
            format!("agent = \"echo\"\n{}", route("r", "echo", "")),
            &["`agent` and [[routes]]", "use one or the other"],
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad-{i}.toml"), text);
        let file = file.to_str().expect("utf-8 path");
        for command in [&["serve"][..], &["routes", "check"]] {
            let args: Vec<&str> = command.iter().copied().chain(["--config", file]).collect();
            let (code, _, stderr) = run(&args);
            assert_eq!(code, Some(64), "{args:?}\n{text}\n{stderr}");
            assert!(stderr.contains(file), "names the file: {stderr}");
            for needle in *expected {
                assert!(stderr.contains(needle), "{needle:?} in {stderr}");
            }
        }
    }
    // --agent on the command line with the file's routes: one or the other.
    let file = write(&dir, "routes.toml", FIRST);
    let file = file.to_str().expect("utf-8 path");
    let (code, _, stderr) = run(&["serve", "--config", file, "--agent", "echo"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--agent") && stderr.contains("one or the other"));
}

#[test]
fn routes_check_prints_the_table_and_which_names_the_route() {
    let dir = TempDir::new("check");
    let text = format!("{SECOND}{FIRST}");
    let file = write(&dir, "routes.toml", &text);
    let file = file.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = run(&["routes", "check", "--config", file]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(stdout.starts_with("Configuration OK"), "{stdout}");
    assert!(stdout.contains(file), "{stdout}");
    assert_eq!(lines[1], ["#", "route", "agent", "match"], "{stdout}");
    assert_eq!(lines[2], ["1", "dids", "tone", "callee=0212*|0700*"]);
    assert_eq!(
        lines[3],
        [
            "2",
            "cb-main",
            "echo",
            "protocol=callbridge",
            "agent_id=agent-main"
        ]
    );
    assert_eq!(
        lines[4],
        ["3*", "first", "echo", "(default:", "every", "call)"]
    );
    assert!(lines[5].contains(&"default"), "{stdout}");

    // No file: --agent makes the one default route.
    let (code, stdout, _) = run(&["routes", "check", "--agent", "tone"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("no config file"), "{stdout}");
    assert!(stdout.contains("1*  default  tone"), "{stdout}");

    let which = |args: &[&str]| {
        let all: Vec<&str> = ["routes", "which", "--config", file]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        run(&all)
    };
    let (code, stdout, _) = which(&["--protocol", "inbound", "--callee", "07001"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim(), "route \"dids\" (agent tone)");
    let (code, stdout, _) = which(&["--protocol", "callbridge", "--agent-id", "agent-main"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim(), "route \"cb-main\" (agent echo)");
    let (code, stdout, _) = which(&["--protocol", "inbound", "--callee", "0311"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim(), "route \"first\" (agent echo)");

    // Without a default route, a call that matches nothing has no route: exit 1.
    let file = write(&dir, "no-default.toml", SECOND);
    let file = file.to_str().expect("utf-8 path");
    let (code, stdout, _) = run(&[
        "routes",
        "which",
        "--config",
        file,
        "--protocol",
        "callbridge",
        "--agent-id",
        "sales",
        "--callee",
        "0311",
    ]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("no route matches"), "{stdout}");
    // Inbound calls carry no agentId: asking with one is a usage error.
    let (code, _, stderr) = run(&[
        "routes",
        "which",
        "--protocol",
        "inbound",
        "--agent-id",
        "x",
    ]);
    assert_eq!(code, Some(64), "{stderr}");
}

#[tokio::test]
async fn sighup_puts_new_routes_in_force_and_keeps_them_when_the_file_is_bad() {
    let dir = TempDir::new("sighup");
    let data = TempDir::new("sighup-data");
    let file = write(&dir, "callgate.toml", FIRST);
    let server = Proc::serve(&data, Some(&file));

    let record = server.inbound_call("before").await;
    assert_eq!(record["route"], "first", "{record}");
    assert_eq!(record["agent"], "echo");
    let mut phone = Phone::connect(&server.url()).await;
    phone.text(callbridge_start("cb-before")).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    let record = server.last_call().await;
    assert_eq!(record["route"], "cb-main", "{record}");
    phone.close(1000, "done").await;

    write(&dir, "callgate.toml", SECOND);
    server.hangup_signal();
    let line = server.wait_for("reloaded the routes");
    assert!(line.contains("routes=1"), "{line}");
    let record = server.inbound_call("after").await;
    assert_eq!(record["route"], "dids", "{record}");
    assert_eq!(record["agent"], "tone");

    // A bad file: the error names the file, the route and the field; the table stays.
    write(
        &dir,
        "callgate.toml",
        "[[routes]]\nname = \"broken\"\nagent = \"echo\"\nmatch = { callee = \"02*2\" }\n",
    );
    server.hangup_signal();
    let line = server.wait_for("cannot reload the routes");
    assert!(line.contains("ERROR"), "{line}");
    let path = file.to_str().expect("utf-8 path");
    for needle in [path, "route \"broken\"", "match.callee"] {
        assert!(line.contains(needle), "{needle:?} in {line}");
    }
    let record = server.inbound_call("after-bad").await;
    assert_eq!(record["route"], "dids", "{record}");

    // A file that cannot be parsed at all keeps the table too.
    write(&dir, "callgate.toml", "[[routes]\n");
    server.hangup_signal();
    let line = server.wait_for("cannot reload the routes");
    assert!(line.contains("invalid config file"), "{line}");
    let record = server.inbound_call("after-garbage").await;
    assert_eq!(record["route"], "dids", "{record}");
}

#[tokio::test]
async fn sighup_without_a_config_file_reloads_nothing() {
    let data = TempDir::new("sighup-none");
    let server = Proc::serve(&data, None);
    server.hangup_signal();
    server.wait_for("nothing to reload");
    let record = server.inbound_call("still-default").await;
    assert_eq!(record["route"], "default", "{record}");
    assert_eq!(record["agent"], "echo", "the --agent it was started with");
}

#[tokio::test]
async fn a_call_no_route_takes_is_refused_with_1008_and_recorded_as_no_route() {
    let dir = TempDir::new("no-route");
    let data = TempDir::new("no-route-data");
    let file = write(&dir, "callgate.toml", SECOND);
    let server = Proc::serve(&data, Some(&file));
    // Blocking is fine here: the server is another process.
    let out = Command::new(BIN)
        .args(["sim", "--json", "--protocol", "inbound", "--id", "nowhere"])
        .args(["--callee", "0311112222", "--url", &server.url()])
        .output()
        .expect("run callgate sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("sim --json");
    assert_eq!(report["summary"]["close_code"], 1008, "{report}");
    let record = server.ended_call("nowhere").await;
    assert_eq!(record["external_id"], "nowhere", "{record}");
    assert_eq!(record["end_reason"], "no_route");
    assert!(record["route"].is_null(), "{record}");
}
