//! Webhooks over real sockets: a local receiver that checks every Standard Webhooks
//! signature, down for a while then back (every event delivered, in order, the same
//! `webhook-id` on each retry), and across a restart of callgate (nothing lost). With
//! `CALLGATE_TEST_STANDARDWEBHOOKS` set to a Python with the `standardwebhooks` library, the
//! deliveries are also verified by that library.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use callgate_server::tasks::Tasks;
use callgate_server::webhooks::{Endpoint, Retry};
use callgate_testkit::pg::Schema;
use callgate_testkit::{TempDir, TestServer, cdr, incoming_call, spawn_server, spawn_server_in};
use serde_json::{Value, json};
use tokio::sync::watch;

const KEY: [u8; 24] = *b"callgate-webhook-test-k1";

fn secret() -> String {
    format!("whsec_{}", STANDARD.encode(KEY))
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    accepted: bool,
}

#[derive(Debug, Default)]
struct Inbox {
    accept: bool,
    got: Vec<Got>,
}

/// A webhook receiver on 127.0.0.1: answers 204 when accepting, 503 otherwise.
struct Receiver {
    addr: SocketAddr,
    inbox: Arc<Mutex<Inbox>>,
    seen: watch::Receiver<usize>,
    stop: tokio_util::sync::CancellationToken,
}

#[derive(Clone)]
struct Hook {
    inbox: Arc<Mutex<Inbox>>,
    seen: Arc<watch::Sender<usize>>,
}

async fn hook(State(h): State<Hook>, headers: HeaderMap, body: String) -> StatusCode {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let accepted = {
        let mut inbox = h.inbox.lock().expect("inbox");
        let accepted = inbox.accept;
        inbox.got.push(Got {
            id: header("webhook-id"),
            timestamp: header("webhook-timestamp"),
            signature: header("webhook-signature"),
            body,
            accepted,
        });
        accepted
    };
    h.seen.send_modify(|n| *n += 1);
    if accepted {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

impl Receiver {
    async fn start(listener: tokio::net::TcpListener, accept: bool) -> Self {
        let addr = listener.local_addr().expect("bound");
        let inbox = Arc::new(Mutex::new(Inbox {
            accept,
            got: Vec::new(),
        }));
        let (tx, seen) = watch::channel(0);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(Hook {
                inbox: inbox.clone(),
                seen: Arc::new(tx),
            });
        let stop = tokio_util::sync::CancellationToken::new();
        let server =
            axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        Tasks::new().spawn(async move {
            let _ = server.await;
        });
        Self {
            addr,
            inbox,
            seen,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn set_accept(&self, accept: bool) {
        self.inbox.lock().expect("inbox").accept = accept;
    }

    fn got(&self) -> Vec<Got> {
        self.inbox.lock().expect("inbox").got.clone()
    }

    /// Waits (on the receiver's own signal) until `done` holds for what it got.
    async fn wait_for(&mut self, what: &str, done: impl Fn(&[Got]) -> bool) {
        let inbox = self.inbox.clone();
        let wait = self
            .seen
            .wait_for(|_| done(&inbox.lock().expect("inbox").got));
        let result = tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .map(|r| r.is_ok());
        let got = self.got();
        assert_eq!(result, Ok(true), "receiver: {what}: got {got:#?}");
    }

    /// The events accepted, in order.
    fn accepted(&self) -> Vec<Got> {
        self.got().into_iter().filter(|g| g.accepted).collect()
    }
}

/// Checks one request's signature as the Standard Webhooks specification says: any of the
/// space-separated `v1,<base64>` equals HMAC-SHA256(key, `id.timestamp.body`).
fn signed(g: &Got) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &KEY);
    let content = format!("{}.{}.{}", g.id, g.timestamp, g.body);
    g.signature.split(' ').any(|s| {
        s.strip_prefix("v1,")
            .and_then(|b| STANDARD.decode(b).ok())
            .is_some_and(|sig| ring::hmac::verify(&key, content.as_bytes(), &sig).is_ok())
    })
}

fn webhook(url: &str) -> Endpoint {
    Endpoint::parse(url, &["*".into()], &secret(), Duration::from_secs(2)).expect("endpoint")
}

fn fast_retry() -> Retry {
    Retry {
        first: Duration::from_millis(50),
        ..Retry::default()
    }
}

/// An inbound call to the echo agent: keys 1 and 2, then the caller hangs up.
async fn call(server: &TestServer, session: &str) {
    let mut phone = server.phone("/").await;
    phone.text(incoming_call(session)).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    phone.text(r#"{"event":"dtmf","digit":"1"}"#).await;
    phone.text(r#"{"event":"dtmf","digit":"2"}"#).await;
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr(session)).await;
    phone.closed().await;
}

fn body(g: &Got) -> Value {
    serde_json::from_str(&g.body).expect("JSON body")
}

fn ended(session: &str) -> impl Fn(&[Got]) -> bool + '_ {
    move |got: &[Got]| {
        got.iter().any(|g| {
            let b = body(g);
            g.accepted && b["type"] == "call.ended" && b["data"]["external_id"] == session
        })
    }
}

async fn deliveries(server: &TestServer) -> Value {
    let (status, v) = server.get("/api/webhooks/deliveries").await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_signed_and_in_order() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut receiver = Receiver::start(listener, false).await;
    let url = receiver.url();
    let server = spawn_server(|c| {
        c.webhooks = vec![webhook(&url)];
        c.webhook_retry = fast_retry();
    })
    .await;
    call(&server, "sess-hook").await;
    // The head is refused (503) again and again; the rest waits behind it, in order.
    receiver
        .wait_for("three refused attempts", |got| got.len() >= 3)
        .await;
    let waiting = deliveries(&server).await;
    let rows = waiting["deliveries"].as_array().expect("rows");
    assert_eq!(rows.len(), 5, "{waiting}");
    assert_eq!(rows[0]["type"], "call.started");
    assert_eq!(rows[0]["state"], "pending");
    assert_eq!(rows[0]["endpoint"], url.as_str());
    assert!(rows[0]["attempts"].as_u64().unwrap() >= 1, "{waiting}");
    assert_eq!(rows[0]["last_status"], "503");
    assert!(rows[0]["next_attempt"].is_string());
    assert_eq!(rows[1]["attempts"], 0, "only the head is tried: {waiting}");
    let head = rows[0]["event_id"].as_str().unwrap().to_owned();

    receiver.set_accept(true);
    receiver
        .wait_for("the call's end", ended("sess-hook"))
        .await;
    let got = receiver.got();
    assert!(got.iter().all(signed), "every attempt is signed: {got:#?}");
    // Every attempt before the receiver came back was the head, with the same webhook-id.
    let refused: Vec<&Got> = got.iter().filter(|g| !g.accepted).collect();
    assert!(refused.len() >= 3 && refused.iter().all(|g| g.id == head));
    let accepted = receiver.accepted();
    let types: Vec<Value> = accepted.iter().map(|g| body(g)["type"].clone()).collect();
    assert_eq!(
        types,
        [
            "call.started",
            "call.answered",
            "call.dtmf",
            "call.dtmf",
            "call.ended"
        ]
    );
    assert_eq!(accepted[0].id, head);
    let expected: Vec<&Value> = rows.iter().map(|r| &r["event_id"]).collect();
    let ids: Vec<Value> = accepted.iter().map(|g| json!(g.id)).collect();
    assert_eq!(
        ids.iter().collect::<Vec<_>>(),
        expected,
        "in the outbox's order"
    );
    assert_eq!(body(&accepted[2])["data"]["digit"], "1");
    assert_eq!(body(&accepted[4])["data"]["reason"], "peer_hangup");
    for g in &accepted {
        assert_eq!(body(g)["data"]["external_id"], "sess-hook");
    }
    let after = deliveries(&server).await;
    assert_eq!(after["pending"], 0, "{after}");
    let (status, bad) = server.get("/api/webhooks/deliveries?nope=1").await;
    assert_eq!((status, &bad["code"]), (400, &json!("bad_query")), "{bad}");
    let (status, bad) = server.get("/api/webhooks/deliveries?limit=0").await;
    assert_eq!((status, &bad["code"]), (400, &json!("bad_limit")), "{bad}");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"callgate_webhook_attempts_total{result="delivered"} 5"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"callgate_webhook_attempts_total{result="refused"}"#));
    python_verifies(&accepted);
    server.shutdown().await;
    receiver.stop.cancel();
}

#[tokio::test]
async fn events_waiting_when_callgate_stops_are_delivered_after_it_restarts() {
    restart(None).await;
}

#[tokio::test]
async fn on_postgresql_events_waiting_when_callgate_stops_are_delivered_after_it_restarts() {
    let Some(schema) = Schema::new("webhooks") else {
        return;
    };
    let url = callgate_store::PgUrl::parse(&schema.url, None).expect("url");
    restart(Some(url.clone())).await;
}

async fn restart(store_url: Option<callgate_store::PgUrl>) {
    // A port nothing listens on yet: the receiver is down while the first server runs.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let url = format!("http://{addr}/hook");
    let pg = store_url.clone();
    let first = spawn_server(|c| {
        c.webhooks = vec![webhook(&url)];
        c.webhook_retry = fast_retry();
        c.store_url = pg;
    })
    .await;
    call(&first, "sess-r1").await;
    call(&first, "sess-r2").await;
    let before = deliveries(&first).await;
    let rows = before["deliveries"].as_array().expect("rows").clone();
    // Two calls: started, answered, two keys, ended; all written when the calls ended.
    assert_eq!(rows.len(), 10, "{before}");
    let mut first = first;
    first.begin_shutdown();
    let dir: TempDir = first.stopped().await;

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind the reserved port");
    let mut receiver = Receiver::start(listener, true).await;
    let second = spawn_server_in(dir, |c| {
        c.webhooks = vec![webhook(&url)];
        c.webhook_retry = fast_retry();
        c.store_url = store_url;
    })
    .await;
    receiver
        .wait_for("the first server's last event", |got| {
            got.iter()
                .any(|g| g.accepted && body(g)["type"] == "node.stopping")
        })
        .await;
    let accepted = receiver.accepted();
    assert!(accepted.iter().all(signed));
    let ids: Vec<&str> = accepted.iter().map(|g| g.id.as_str()).collect();
    let expected: Vec<&str> = rows
        .iter()
        .map(|r| r["event_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids[..expected.len()],
        expected[..],
        "every event, in order, once"
    );
    assert_eq!(
        body(accepted.last().expect("one")).get("type"),
        Some(&json!("node.stopping"))
    );
    assert!(ended("sess-r2")(&accepted));
    second.shutdown().await;
    receiver.stop.cancel();
}

/// With `CALLGATE_TEST_STANDARDWEBHOOKS=<python>`, that Python's `standardwebhooks` library
/// verifies every delivery (its own HMAC, base64 and header parsing).
fn python_verifies(got: &[Got]) {
    let Ok(python) = std::env::var("CALLGATE_TEST_STANDARDWEBHOOKS") else {
        eprintln!("SKIPPED the standardwebhooks check: CALLGATE_TEST_STANDARDWEBHOOKS is not set");
        return;
    };
    let messages: Vec<Value> = got
        .iter()
        .map(|g| {
            json!({"id": g.id, "timestamp": g.timestamp, "signature": g.signature, "body": g.body})
        })
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, messages = sys.argv[1], json.loads(sys.stdin.read())
hook = Webhook(secret)
for m in messages:
    hook.verify(m["body"], {"webhook-id": m["id"], "webhook-timestamp": m["timestamp"],
                            "webhook-signature": m["signature"]})
print(len(messages))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script, &secret()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    use std::io::Write as _;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(json!(messages).to_string().as_bytes())
        .expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("python ends");
    assert!(out.status.success(), "standardwebhooks refused a delivery");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        got.len().to_string()
    );
}
