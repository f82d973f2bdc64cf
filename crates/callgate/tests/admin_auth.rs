//! The admin API's tokens with the real binary: `[admin] tokens` from the config file, the
//! refusal to start unprotected off loopback, and errors naming the token and the field.

mod common;

use std::process::Command;

use callgate_testkit::{TempDir, http};
use common::{BIN, Proc};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CALLGATE_AGENT")
        .env_remove("CALLGATE_CONFIG")
        .env_remove("CALLGATE_ADMIN_LISTEN")
        .output()
        .expect("run callgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_unprotected_admin_api_off_loopback_does_not_start() {
    let data = TempDir::new("admin-open");
    let dir = data.path().to_str().unwrap();
    let (code, stderr) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "0.0.0.0:0",
        "--data-dir",
        dir,
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("admin.tokens") && stderr.contains("behind_auth"),
        "{stderr}"
    );

    let config = data.path().join("bad.toml");
    std::fs::write(
        &config,
        "[admin]\ntokens = [{ name = \"ops\", role = \"operator\", token_env = \"CG_NOT_SET_ANYWHERE\" }]\n",
    )
    .unwrap();
    let (code, stderr) = run(&["routes", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("admin.tokens[0] (\"ops\"): token_env") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    std::fs::write(
        &config,
        "[admin]\ntokens = [{ name = \"ops\", role = \"root\", token_sha256 = \"00\" }]\n",
    )
    .unwrap();
    let (code, stderr) = run(&["routes", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("role: unknown role \"root\""), "{stderr}");
    // Digests that are 64 bytes but not 64 hex digits: refused (exit 64), never a panic
    // (exit 101), in both places a digest is read.
    let good = "a".repeat(64);
    for bad in [format!("€{}", &good[3..]), format!("+{}", &good[1..])] {
        assert_eq!(bad.len(), 64);
        for text in [
            format!(
                "[admin]\ntokens = [{{ name = \"ops\", role = \"read\", token_sha256 = {bad:?} }}]\n"
            ),
            format!("[call_auth]\nkeys = [{{ name = \"cb\", key_sha256 = {bad:?} }}]\n"),
        ] {
            std::fs::write(&config, &text).unwrap();
            let (code, stderr) = run(&["config", "check", "--config", config.to_str().unwrap()]);
            assert_eq!(code, Some(64), "{text}: {stderr}");
            assert!(stderr.contains("64 hex digits"), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[tokio::test]
async fn tokens_from_the_config_file_guard_the_admin_api() {
    let data = TempDir::new("admin-tokens");
    let secret = data.path().join("ops.token");
    std::fs::write(&secret, "ops-secret-0123456789abcdef\n").unwrap();
    let config = data.path().join("callgate.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\ntokens = [{{ name = \"ops\", role = \"operator\", token_file = {:?} }}]\n",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let server = Proc::serve(&data, Some(&config));
    let (status, body) = http::request(server.admin, "GET", "/api/calls", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = http::request_with(
        server.admin,
        "GET",
        "/api/calls",
        None,
        &[("Authorization", "Bearer ops-secret-0123456789abcdef")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        http::request(server.admin, "GET", "/healthz", None).await.0,
        200
    );
}

#[tokio::test]
async fn call_keys_from_the_config_file_guard_the_call_port() {
    let data = TempDir::new("call-keys");
    let secret = data.path().join("gw.key");
    std::fs::write(&secret, "gw-secret-0123456789abcdef\n").unwrap();
    let config = data.path().join("callgate.toml");
    let keys = format!(
        "[call_auth]\nkeys = [{{ name = \"gw\", key_file = {:?} }}]\nallow = [\"127.0.0.0/8\", \"::1\"]\n",
        secret.display().to_string()
    );
    std::fs::write(&config, &keys).unwrap();
    let server = Proc::serve(&data, Some(&config));
    let sim = |url: String| {
        Command::new(BIN)
            .args([
                "sim",
                "--json",
                "--id",
                "keyed",
                "--hangup-at",
                "200ms",
                "--url",
                &url,
            ])
            .output()
            .expect("run callgate sim")
    };
    let refused = sim(format!("ws://{}/", server.calls));
    assert_eq!(
        refused.status.code(),
        Some(1),
        "no key: the call cannot be placed"
    );
    let placed = sim(format!(
        "ws://{}/?apiKey=gw-secret-0123456789abcdef",
        server.calls
    ));
    assert!(
        placed.status.success(),
        "{}",
        String::from_utf8_lossy(&placed.stderr)
    );
    let record = server.last_call().await;
    assert_eq!(record["key_name"], "gw", "{record}");

    // A key limited to a route that does not exist is a configuration error.
    std::fs::write(
        &config,
        format!("{keys}\n[[routes]]\nname = \"main\"\nagent = \"echo\"\n")
            .replace("key_file", "routes = [\"sales\"], key_file"),
    )
    .unwrap();
    let (code, stderr) = run(&["routes", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("call_auth.keys[0] (\"gw\"): routes: there is no route named \"sales\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn sighup_rotates_the_admin_tokens() {
    let data = TempDir::new("admin-rotate");
    let secret = data.path().join("ops.token");
    std::fs::write(&secret, "first-secret-0123456789\n").unwrap();
    let config = data.path().join("callgate.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\ntokens = [{{ name = \"ops\", role = \"operator\", token_file = {:?} }}]\n",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let server = Proc::serve(&data, Some(&config));
    let status = |token: &'static str| {
        let addr = server.admin;
        async move {
            let auth = format!("Bearer {token}");
            http::request_with(addr, "GET", "/api/calls", None, &[("Authorization", &auth)])
                .await
                .0
        }
    };
    assert_eq!(status("first-secret-0123456789").await, 200);
    std::fs::write(&secret, "second-secret-0123456789\n").unwrap();
    server.hangup_signal();
    let line = server.wait_for("reloaded the routes, the call keys and the admin tokens");
    assert!(line.contains("admin_tokens=1"), "{line}");
    assert_eq!(status("first-secret-0123456789").await, 401);
    assert_eq!(status("second-secret-0123456789").await, 200);
    // A token file that is gone: the reload is refused and the tokens in force stay.
    std::fs::remove_file(&secret).unwrap();
    server.hangup_signal();
    let line = server.wait_for("cannot reload");
    assert!(line.contains("token_file"), "{line}");
    assert_eq!(status("second-secret-0123456789").await, 200);
}

#[tokio::test]
async fn a_reload_cannot_open_the_admin_port_really_bound() {
    let data = TempDir::new("admin-rebind");
    let config = data.path().join("callgate.toml");
    std::fs::write(
        &config,
        "admin_listen = \"0.0.0.0:0\"\n[admin]\ntokens = [{ name = \"ops\", role = \"operator\", \
         token_env = \"CG_TEST_OPS_TOKEN\" }]\n",
    )
    .unwrap();
    let server = Proc::serve_on(
        &data,
        Some(&config),
        None,
        &[("CG_TEST_OPS_TOKEN", "ops-secret-0123456789")],
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.admin.port()));
    assert_eq!(http::request(addr, "GET", "/api/calls", None).await.0, 401);
    // The file now says loopback and has no [admin]: fine for a fresh start, but the port
    // bound is still 0.0.0.0 until a restart.
    std::fs::write(&config, "admin_listen = \"127.0.0.1:0\"\n").unwrap();
    server.hangup_signal();
    let line = server.wait_for("cannot reload");
    assert!(
        line.contains("admin.tokens") && line.contains("0.0.0.0"),
        "{line}"
    );
    let (status, body) = http::request(addr, "GET", "/api/calls", None).await;
    assert_eq!(status, 401, "the tokens in force stay: {body}");
}
