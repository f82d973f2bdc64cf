//! TLS with the real tools and the real binary: `sim` and `load` over `wss://` with a CA file
//! (and refused with the wrong one), `config check` validating the TLS files, and SIGHUP
//! reloading the certificates and the admin tokens of a running `callgate serve`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use callgate_phone::load::{self, LoadOptions, Mix};
use callgate_phone::sim::{self, SimOptions, Source};
use callgate_server::tls::Files;
use callgate_testkit::http::request_tls;
use callgate_testkit::tls::{TestCa, presented, replace};
use callgate_testkit::{TempDir, TestServer, spawn_server};
use common::{BIN, Proc};

/// A server whose call port speaks TLS with a certificate of `ca`.
async fn tls_server(ca: &TestCa, dir: &TempDir) -> TestServer {
    let files = ca.server_cert("server").write(dir.path(), "server");
    spawn_server(move |c| c.tls = Some(files)).await
}

/// Runs the binary; returns its exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CALLGATE_AGENT")
        .env_remove("CALLGATE_CONFIG")
        .env_remove("CALLGATE_TLS_CERT")
        .env_remove("CALLGATE_TLS_KEY")
        .output()
        .expect("run callgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[tokio::test]
async fn sim_and_load_call_a_tls_server_with_a_ca_file_and_a_wrong_ca_is_refused() {
    let dir = TempDir::new("tools-tls");
    let ca = TestCa::new("tools");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server = tls_server(&ca, &dir).await;
    let url = format!("wss://{}/", server.call_addr);

    let summary = sim::run(
        &SimOptions {
            url: url.clone(),
            ca_file: Some(ca_file.clone()),
            call_id: "sim-wss".into(),
            source: Source::Tone {
                hz: 440.0,
                duration: Duration::from_millis(400),
            },
            ..SimOptions::default()
        },
        |_| {},
    )
    .await
    .expect("a call over wss://");
    assert_eq!(summary.frames_sent, 20);
    assert_eq!(summary.rtt.expect("echoed").samples, 20);
    assert_eq!(summary.close_code, 1000);
    assert_eq!(
        server.ended_call("sim-wss").await["end_reason"],
        "peer_hangup"
    );

    let report = load::run(
        &LoadOptions {
            url: url.clone(),
            ca_file: Some(ca_file.clone()),
            calls: 4,
            ramp: 0.0,
            duration: Duration::from_secs(1),
            mix: Mix::Mixed,
            ..LoadOptions::default()
        },
        |_| {},
    )
    .await
    .expect("a load over wss://");
    assert_eq!(report.calls_ok, 4, "{:?}", report.calls_failed);
    assert_eq!((report.frames.lost, report.frames.corrupt), (0, 0));
    assert!(report.frames.received >= 4 * 40, "{:?}", report.frames);

    // The wrong CA: the handshake is refused, no call is placed.
    let other = TestCa::new("other").write(dir.path(), "other.pem");
    let error = sim::run(
        &SimOptions {
            url: url.clone(),
            ca_file: Some(other),
            call_id: "sim-wrong-ca".into(),
            ..SimOptions::default()
        },
        |_| {},
    )
    .await
    .expect_err("an untrusted certificate");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    // A CA file that is not one, and a CA file for ws://: said so before connecting.
    let error = sim::run(
        &SimOptions {
            url: url.clone(),
            ca_file: Some(dir.path().join("server.key")),
            ..SimOptions::default()
        },
        |_| {},
    )
    .await
    .expect_err("a key is not a CA certificate");
    assert!(
        error.to_string().contains("no certificate in it"),
        "{error}"
    );
    let error = sim::run(
        &SimOptions {
            url: format!("ws://{}/", server.call_addr),
            ca_file: Some(ca_file),
            ..SimOptions::default()
        },
        |_| {},
    )
    .await
    .expect_err("a CA file with ws://");
    assert!(error.to_string().contains("is for wss:// URLs"), "{error}");
    assert_eq!(
        server.calls().await.len(),
        5,
        "sim-wss and the 4 load calls"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_sim_command_takes_a_ca_file_and_says_when_one_is_needed() {
    let dir = TempDir::new("sim-cli-tls");
    let ca = TestCa::new("cli");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server = tls_server(&ca, &dir).await;
    let url = format!("wss://{}/", server.call_addr);
    // Off the runtime: the server runs on this test's thread.
    let sim = |extra: Vec<String>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "sim",
                "--json",
                "--id",
                "cli-wss",
                "--hangup-at",
                "200ms",
                "--url",
                &url,
            ];
            args.extend(extra.iter().map(String::as_str));
            run(&args)
        })
    };
    let (code, stdout, stderr) = sim(vec!["--ca-file".into(), path(&ca_file).into()])
        .await
        .expect("sim ran");
    assert_eq!(code, Some(0), "{stderr}");
    let out: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(out["summary"]["close_code"], 1000, "{out}");
    // Without a CA file the system's CAs are used, and they do not know the test CA (or the
    // system has none): either way the message says what to give.
    let (code, _, stderr) = sim(Vec::new()).await.expect("sim ran");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--ca-file"), "{stderr}");
    server.shutdown().await;
}

#[test]
fn config_check_validates_the_tls_files() {
    let dir = TempDir::new("check-tls");
    let ca = TestCa::new("check");
    let a = ca.server_cert("a").write(dir.path(), "a");
    let b = ca.server_cert("b").write(dir.path(), "b");
    let config = dir.path().join("callgate.toml");
    let check = |toml: &str| {
        std::fs::write(&config, toml).unwrap();
        run(&[
            "config",
            "check",
            "--agent",
            "echo",
            "--config",
            path(&config),
        ])
    };
    let tls = |table: &str, files: &Files| {
        format!(
            "[{table}]\ncert = {:?}\nkey = {:?}\n",
            path(&files.cert),
            path(&files.key)
        )
    };

    let (code, stdout, stderr) = check(&format!("{}{}", tls("tls", &a), tls("admin.tls", &b)));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "TLS on the call port (wss://): {} (1 certificate in the chain), key {}",
            path(&a.cert),
            path(&a.key)
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("TLS on the admin port (https://)"),
        "{stdout}"
    );

    let mismatched = Files {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let (code, _, stderr) = check(&tls("admin.tls", &mismatched));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("TLS certificate of the admin port: the private key in")
            && stderr.contains("does not belong to the first certificate"),
        "{stderr}"
    );
    let missing = Files {
        cert: dir.path().join("nowhere.pem"),
        key: a.key.clone(),
    };
    let (code, _, stderr) = check(&tls("tls", &missing));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("nowhere.pem"), "{stderr}");
    let (code, _, stderr) = check(&format!("[tls]\ncert = {:?}\n", path(&a.cert)));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("tls: a certificate without its key: give tls.key (or --tls-key) too"),
        "{stderr}"
    );
    let (code, _, stderr) = check(&format!("[tls]\ncert = {:?}\nchain = 1\n", path(&a.cert)));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("chain"), "{stderr}");

    // The flags, over the file: a good key from the command line fixes a bad one in the file.
    std::fs::write(&config, tls("tls", &mismatched)).unwrap();
    let (code, stdout, stderr) = run(&[
        "config",
        "check",
        "--agent",
        "echo",
        "--config",
        path(&config),
        "--tls-key",
        path(&a.key),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("TLS on the call port"), "{stdout}");
}

#[tokio::test]
async fn sighup_reloads_the_certificates_and_the_admin_tokens() {
    let dir = TempDir::new("sighup-tls");
    let data = TempDir::new("sighup-tls-data");
    let ca = TestCa::new("sighup");
    let call = ca.server_cert("call-a").write(dir.path(), "call");
    let admin = ca.server_cert("admin-a").write(dir.path(), "admin");
    let token = dir.path().join("ops.token");
    std::fs::write(&token, "first-token-0123456789\n").unwrap();
    let config = dir.path().join("callgate.toml");
    std::fs::write(
        &config,
        format!(
            "agent = \"echo\"\n[tls]\ncert = {:?}\nkey = {:?}\n\n[admin]\n\
             tokens = [{{ name = \"ops\", role = \"operator\", token_file = {:?} }}]\n\
             [admin.tls]\ncert = {:?}\nkey = {:?}\n",
            path(&call.cert),
            path(&call.key),
            path(&token),
            path(&admin.cert),
            path(&admin.key)
        ),
    )
    .unwrap();
    let server = Proc::serve(&data, Some(&config));
    let get = |bearer: &'static str| {
        let connector = ca.connector();
        let addr = server.admin;
        async move {
            let auth = format!("Bearer {bearer}");
            request_tls(
                addr,
                &connector,
                "GET",
                "/api/calls",
                None,
                &[("Authorization", &auth)],
            )
            .await
            .0
        }
    };
    assert_eq!(get("first-token-0123456789").await, 200);
    let call_a = presented(server.calls, &ca).await;

    let call_b = ca.server_cert("call-b");
    let admin_b = ca.server_cert("admin-b");
    call_b.write_over(&call);
    admin_b.write_over(&admin);
    std::fs::write(&token, "second-token-0123456789\n").unwrap();
    server.hangup_signal();
    let line = server.wait_for("reloaded the routes, the call keys and the admin tokens");
    assert!(line.contains("admin_tokens=1"), "{line}");
    assert_eq!(presented(server.calls, &ca).await, call_b.der);
    assert_ne!(call_b.der, call_a);
    assert_eq!(presented(server.admin, &ca).await, admin_b.der);
    assert_eq!(get("first-token-0123456789").await, 401);
    assert_eq!(get("second-token-0123456789").await, 200);

    // A bad certificate file: said, at error, naming the file; the one in force stays, and the
    // rest of the configuration still reloads.
    replace(&call.cert, b"not a certificate");
    server.hangup_signal();
    let line = server.wait_for("Cannot reload the TLS certificate");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(path(&call.cert)) && line.contains("port=\"call\""),
        "{line}"
    );
    server.wait_for("reloaded the routes, the call keys and the admin tokens");
    assert_eq!(presented(server.calls, &ca).await, call_b.der);
}
