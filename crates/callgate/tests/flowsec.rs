//! The real binary refuses a flow or a realtime tool whose URL template lets a call's values
//! choose where a request goes (a variable in the scheme, host or port): `config check` exits
//! 64 naming the step or the tool.

mod common;

use std::process::Command;

use callgate_testkit::{TempDir, http};
use common::{BIN, Proc};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).output().expect("run callgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_url_template_with_a_variable_in_the_host_is_refused_naming_the_step_or_tool() {
    let dir = TempDir::new("flowsec-url");
    let flow = dir.path().join("flow.toml");
    std::fs::write(
        &flow,
        "[[step]]\nname = \"lookup\"\nkind = \"http\"\n\
         url = \"http://{{ivrIp}}/customers/{{caller}}\"\n",
    )
    .expect("write");
    let config = dir.path().join("callgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[[routes]]\nname = \"ivr\"\nagent = \"flow\"\n\
             settings = {{ file = {:?} }}\n",
            dir.path().join("data"),
            flow
        ),
    )
    .expect("write");
    let (code, stderr) = run(&[
        "config",
        "check",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("step \"lookup\": url: {{ivrIp}} is in the URL's user, host or port"),
        "{stderr}"
    );

    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[[routes]]\nname = \"ai\"\nagent = \"realtime\"\n\
             [routes.settings]\napi_key_env = \"PATH\"\n\
             [[routes.settings.tools]]\nname = \"crm\"\ndescription = \"d\"\n\
             url = \"https://crm.example.com:{{{{siteId}}}}/x\"\n",
            dir.path().join("data"),
        ),
    )
    .expect("write");
    let (code, stderr) = run(&[
        "config",
        "check",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("tools[0].url") && stderr.contains("{{siteId}} is in the URL's"),
        "{stderr}"
    );
}

#[test]
fn an_api_key_bound_for_clear_text_off_the_host_is_warned_about_once() {
    let dir = TempDir::new("flowsec-plaintext");
    let config = dir.path().join("callgate.toml");
    // Two routes with the same URL: one warning. Nothing connects during a check.
    let route = |name: &str| {
        format!(
            "[[routes]]\nname = {name:?}\nagent = \"realtime\"\nmatch = {{ callee = {name:?} }}\n\
             [routes.settings]\napi_key_env = \"PATH\"\nurl = \"ws://192.0.2.1/v1/realtime\"\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n{}{}[[routes]]\nname = \"local\"\nagent = \"realtime\"\n\
             [routes.settings]\napi_key_env = \"PATH\"\nurl = \"ws://127.0.0.1:9/v1/realtime\"\n",
            dir.path().join("data"),
            route("a"),
            route("b")
        ),
    )
    .expect("write");
    let (code, stderr) = run(&[
        "config",
        "check",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("in clear text"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("realtime url \"ws://192.0.2.1/v1/realtime\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exposes_the_flow_message_metrics() {
    let data = TempDir::new("flowsec-metrics");
    let config = data.path().join("callgate.toml");
    // The demo menu, the default route.
    std::fs::write(&config, "").expect("write");
    let server = Proc::serve(&data, Some(&config));
    let (status, text) = http::request(server.admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{text}");
    for name in [
        "# TYPE callgate_flow_messages_refused counter",
        "# TYPE callgate_flow_messages_stored_bytes gauge",
        "callgate_flow_messages_stored_bytes 0",
    ] {
        assert!(text.contains(name), "{name}: {text}");
    }
}
