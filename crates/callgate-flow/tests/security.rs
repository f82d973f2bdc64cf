//! The flow agent against a hostile phone and hostile servers (issue 15): call values are data
//! in webhook URLs, webhooks follow no redirect, and what `record` may store is bounded. Real
//! sockets throughout: the testkit's phone, a real local HTTP server recording what it got.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use callgate_agent::Catalog;
use callgate_flow::metrics::FlowCollector;
use callgate_flow::{FlowEnv, FlowMetrics};
use callgate_server::routes::parse_spec;
use callgate_testkit::audio::speechlike_pcm16;
use callgate_testkit::{TempDir, TestServer, spawn_server_with_catalog};
use callgate_testkit::{cdr, incoming_call};
use serde_json::{Value, json};

/// A server running `flow` as its only route, with the data dir `dir`; the flow's metrics
/// are on its `/metrics`.
async fn server_with_flow(dir: &TempDir, flow: &str) -> TestServer {
    let file = dir.path().join("flow.toml");
    std::fs::write(&file, flow).expect("write flow");
    let mut catalog = Catalog::builtin();
    let metrics = FlowMetrics::new();
    callgate_flow::register_with_metrics(
        &mut catalog,
        FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
            stt: None,
        },
        metrics.clone(),
        |_| {},
    );
    let data = dir.path().to_path_buf();
    spawn_server_with_catalog(&catalog, move |c| {
        c.data_dir = data;
        c.metrics = vec![Arc::new(FlowCollector(metrics))];
        c.routes = vec![
            parse_spec(
                json!({"name": "ivr", "agent": "flow", "settings": {"file": file}}),
                0,
            )
            .expect("route"),
        ];
    })
    .await
}

/// The flow_step events of a call, as (name, phase, detail).
async fn flow_steps(server: &TestServer, id: &str) -> Vec<(String, String, Value)> {
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "agent" && e["detail"]["name"] == "flow_step")
        .map(|e| {
            let d = &e["detail"];
            (
                d["step"].as_str().unwrap_or("").to_owned(),
                d["phase"].as_str().unwrap_or("").to_owned(),
                d.clone(),
            )
        })
        .collect()
}

fn end_of(steps: &[(String, String, Value)], name: &str) -> Value {
    steps
        .iter()
        .find(|(n, p, _)| n == name && p == "end")
        .map(|(_, _, d)| d.clone())
        .unwrap_or_else(|| panic!("no end of {name}: {steps:?}"))
}

/// A local HTTP server that records the raw path and query of every request: `/moved`
/// answers a redirect to `/landed`, everything else `{}`.
async fn recorder() -> (
    String,
    Arc<Mutex<Vec<String>>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    let app = Router::new().fallback(move |uri: Uri| {
        let keep = keep.clone();
        async move {
            let raw = uri
                .path_and_query()
                .map_or_else(String::new, |pq| pq.as_str().to_owned());
            keep.lock().expect("lock").push(raw);
            if uri.path() == "/moved" {
                (StatusCode::FOUND, [(header::LOCATION, "/landed")], "").into_response()
            } else {
                axum::Json(json!({})).into_response()
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("local server");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    callgate_server::Tasks::new().spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    (format!("http://{addr}"), seen, stop)
}

/// A CallBridge start whose caller and siteId are the phone's choice.
fn callbridge_start(cdr_id: &str, caller: &str, site: &str) -> String {
    json!({
        "call_config": {"siteId": site, "caller": caller, "callee": "07012345678",
                        "cdrId": cdr_id, "callActionId": "1.7E9", "ivrIp": "10.0.0.1:29034",
                        "agentId": "agent-main", "agentType": "voice"},
        "audio_format": {"phone_output_audio_format": "PCM_8000",
                         "phone_input_audio_format": "PCM_8000"}
    })
    .to_string()
}

/// Places a CallBridge call and waits until the server has closed it.
async fn callbridge_call(server: &TestServer, cdr_id: &str, caller: &str, site: &str) -> Value {
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start(cdr_id, caller, site)).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    phone.closed().await;
    server.ended_call(cdr_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_values_in_a_webhook_url_are_data_not_syntax() {
    let (base, seen, stop) = recorder().await;
    let dir = TempDir::new("flow-url");
    let flow = format!(
        r#"
        [[step]]
        name = "answer"
        kind = "answer"
        [[step]]
        name = "lookup"
        kind = "http"
        url = "{base}/customers/{{{{caller}}}}/lookup"
        on_error = "failed"
        [[step]]
        name = "site"
        kind = "http"
        url = "{base}/sites?site={{{{siteId}}}}&v=1"
        on_error = "failed"
        [[step]]
        name = "bye"
        kind = "hangup"
        [[step]]
        name = "failed"
        kind = "hangup"
        "#
    );
    let server = server_with_flow(&dir, &flow).await;
    // The issue's attacks: a caller number that climbs to an admin path, a siteId that adds
    // a query parameter.
    let record = callbridge_call(
        &server,
        "url-1",
        "0101234/../../../admin/delete?token=x#",
        "S1&admin=true",
    )
    .await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    assert_eq!(end_of(&steps, "lookup")["next"], "site", "{steps:?}");
    assert_eq!(end_of(&steps, "site")["next"], "bye", "{steps:?}");
    assert_eq!(
        *seen.lock().expect("lock"),
        [
            "/customers/0101234%2F..%2F..%2F..%2Fadmin%2Fdelete%3Ftoken%3Dx%23/lookup",
            "/sites?site=S1%26admin%3Dtrue&v=1",
        ],
        "the requests went to the intended path and query, the values intact as data"
    );

    // A caller that is a whole dot segment: no request, the step's on_error.
    seen.lock().expect("lock").clear();
    let record = callbridge_call(&server, "url-2", "..", "S1").await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let lookup = end_of(&steps, "lookup");
    assert_eq!(lookup["next"], "failed", "{steps:?}");
    assert!(
        lookup["error"]
            .as_str()
            .is_some_and(|e| e.contains("path segment")),
        "{lookup:?}"
    );
    assert!(
        seen.lock().expect("lock").is_empty(),
        "no request was made: {:?}",
        seen.lock().expect("lock")
    );
    let _ = stop.send(());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_redirect_is_not_followed_and_takes_on_error() {
    let (base, seen, stop) = recorder().await;
    let dir = TempDir::new("flow-redirect");
    let flow = format!(
        r#"
        [[step]]
        name = "answer"
        kind = "answer"
        [[step]]
        name = "hook"
        kind = "http"
        url = "{base}/moved"
        on_error = "failed"
        [[step]]
        name = "bye"
        kind = "hangup"
        [[step]]
        name = "failed"
        kind = "hangup"
        "#
    );
    let server = server_with_flow(&dir, &flow).await;
    let record = callbridge_call(&server, "redirect-1", "0101", "S1").await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let hook = end_of(&steps, "hook");
    assert_eq!(hook["next"], "failed", "{steps:?}");
    assert_eq!(hook["status"], 302, "{hook:?}");
    assert_eq!(
        *seen.lock().expect("lock"),
        ["/moved"],
        "the redirect's target was never asked"
    );
    let _ = stop.send(());
    server.shutdown().await;
}

/// One metric's value in the metrics text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An inbound call that leaves `ms` of speech then presses `#`; its record once ended.
async fn leave_message(server: &TestServer, session: &str, ms: u32) -> Value {
    let mut phone = server.phone("/").await;
    phone.text(incoming_call(session)).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let sent = speechlike_pcm16(ms, 8000, 7);
    for frame in sent.chunks(320) {
        phone.binary(frame.to_vec()).await;
    }
    phone
        .text(json!({"event": "dtmf", "digit": "#"}).to_string())
        .await;
    assert_eq!(phone.recv_json().await, json!({"event": "hangup"}));
    phone.text(cdr(session)).await;
    phone.closed().await;
    server.ended_call(session).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_total_cap_a_record_step_stores_nothing_and_takes_on_full() {
    let dir = TempDir::new("flow-messages-cap");
    // Room for one second and a bit: one 0.5 s message fits, then less than the one second
    // a recording needs at least is left.
    let flow = r#"
        [messages]
        max_total_bytes = 20000
        [[step]]
        name = "msg"
        kind = "record"
        max_length = "1s"
        on_full = "full"
        next = "bye"
        [[step]]
        name = "bye"
        kind = "hangup"
        [[step]]
        name = "full"
        kind = "hangup"
    "#;
    let server = server_with_flow(&dir, flow).await;
    let record = leave_message(&server, "cap-1", 500).await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    assert_eq!(end_of(&steps, "msg")["next"], "bye", "{steps:?}");
    let path = dir.path().join(format!("messages/{id}/msg.wav"));
    assert_eq!(std::fs::metadata(&path).expect("the WAV").len(), 8044);

    // Private whatever the umask: 0600 files in 0700 directories.
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    };
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join(format!("messages/{id}"))), 0o700);
    assert_eq!(mode(&dir.path().join("messages")), 0o700);

    let record = leave_message(&server, "cap-2", 500).await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let end = end_of(&steps, "msg");
    assert_eq!(end["next"], "full", "{steps:?}");
    assert_eq!(end["refused"], "full", "{end}");
    assert!(
        !dir.path().join(format!("messages/{id}")).exists(),
        "nothing was written for the refused call"
    );
    let text = server.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "callgate_flow_messages_refused_total{reason=\"full\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "callgate_flow_messages_saved_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "callgate_flow_messages_saved_bytes_total"),
        8044.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "callgate_flow_messages_stored_bytes"),
        8044.0,
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cannot_record_more_than_its_share() {
    let dir = TempDir::new("flow-messages-call");
    // 1.5 s per call: a second recording after a full first one is refused.
    let flow = r#"
        [messages]
        max_call_bytes = 24044
        [[step]]
        name = "first"
        kind = "record"
        max_length = "1s"
        [[step]]
        name = "second"
        kind = "record"
        max_length = "1s"
        on_full = "full"
        next = "bye"
        [[step]]
        name = "bye"
        kind = "hangup"
        [[step]]
        name = "full"
        kind = "hangup"
    "#;
    let server = server_with_flow(&dir, flow).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("share-1")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    // Up to max_length: the first recording ends by itself after 1 s of audio.
    let sent = speechlike_pcm16(1000, 8000, 3);
    for frame in sent.chunks(320) {
        phone.binary(frame.to_vec()).await;
    }
    assert_eq!(phone.recv_json().await, json!({"event": "hangup"}));
    phone.text(cdr("share-1")).await;
    phone.closed().await;
    let record = server.ended_call("share-1").await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    assert_eq!(end_of(&steps, "first")["ms"], 1000, "{steps:?}");
    let second = end_of(&steps, "second");
    assert_eq!(second["next"], "full", "{steps:?}");
    assert_eq!(second["refused"], "call_limit", "{second}");
    let text = server.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "callgate_flow_messages_refused_total{reason=\"call_limit\"}"
        ),
        1.0,
        "{text}"
    );
    server.shutdown().await;
}
