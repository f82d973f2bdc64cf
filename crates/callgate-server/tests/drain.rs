//! Drain: a node that takes no new calls keeps its live ones to their natural end, and stops by
//! itself once they have; undrain, the drain timeout and a second signal.

use std::net::SocketAddr;

use callgate_server::Phase;
use callgate_server::auth::{AdminAuth, Role, Token};
use callgate_testkit::{
    Phone, Received, TestServer, callbridge_start, cdr, http, incoming_call, spawn_server,
    spawn_server_in,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket upgrade request written by hand, and the whole raw answer (the server closes
/// the connection after a refusal).
async fn raw_upgrade(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(callgate_testkit::phone::WAIT, tcp.read_to_end(&mut answer));
    read.await
        .expect("the server answers and closes")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The refusal a draining node gives an upgrade: a 503 with Retry-After, never a 101.
fn assert_draining_refusal(answer: &str) {
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("draining"), "{answer}");
}

async fn status(server: &TestServer, path: &str) -> (u16, Value) {
    server.get(path).await
}

/// An inbound call, answered and echoing.
async fn live_inbound(server: &TestServer, id: &str) -> Phone {
    let mut phone = server.phone("/").await;
    phone.text(incoming_call(id)).await;
    assert_eq!(phone.recv_json().await["event"], "answer");
    echoes(&mut phone, 7).await;
    phone
}

/// One frame out, the same frame back.
async fn echoes(phone: &mut Phone, fill: u8) {
    phone.binary(vec![fill; 320]).await;
    match phone.recv().await {
        Received::Binary(b) => assert_eq!(&b[..], &[fill; 320][..]),
        other => panic!("expected the echo, got {other:?}"),
    }
}

/// The caller hangs up an inbound call the normal way: `hangup`, then the CDR.
async fn caller_hangs_up(phone: &mut Phone, id: &str) {
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr(id)).await;
    assert_eq!(phone.closed().await.0, 1000);
}

#[tokio::test]
async fn terminate_refuses_new_calls_keeps_the_live_one_and_stops_when_it_ends() {
    let server = spawn_server(|_| {}).await;
    let mut live = live_inbound(&server, "drain-live").await;
    assert_eq!(status(&server, "/readyz").await.0, 200);

    assert_eq!(
        server.lifecycle.terminate().await,
        Phase::Draining { exiting: true }
    );
    let (code, body) = status(&server, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "draining");
    assert_eq!(body["exiting"], true);
    assert_eq!(body["live_calls"], 1);
    let (code, body) = status(&server, "/healthz").await;
    assert_eq!(code, 200, "liveness stays up while draining: {body}");
    assert_eq!(body["status"], "draining");

    // A new call is refused before any WebSocket exists, with a hint to retry.
    assert_draining_refusal(&raw_upgrade(server.call_addr).await);
    let refused = Phone::try_connect(&server.url("/"), &[]).await.err();
    assert_eq!(refused.map(|(code, _)| code), Some(503));

    // The live call goes on as if nothing happened, and the server waits for it.
    for fill in 1..=5 {
        echoes(&mut live, fill).await;
    }
    assert!(!server.is_stopped(), "stopped with a call still live");
    caller_hangs_up(&mut live, "drain-live").await;

    // The server stops by itself, every record written.
    let data = server.stopped().await;
    let again = spawn_server_in(data, |_| {}).await;
    let calls = again.calls().await;
    assert_eq!(
        calls.len(),
        1,
        "the refused calls left no record: {calls:?}"
    );
    let record = &calls[0];
    assert_eq!(record["external_id"], "drain-live");
    assert_eq!(record["end_reason"], "peer_hangup", "{record}");
    assert_eq!(record["hangup_by"], "peer", "{record}");
    assert_eq!(record["bytes_in"], 320 * 6, "{record}");
    assert!(record["cdr"].is_object(), "{record}");
    again.shutdown().await;
}

#[tokio::test]
async fn an_operator_drain_stays_up_and_undrain_takes_calls_again() {
    let server = spawn_server(|_| {}).await;
    let mut live = live_inbound(&server, "op-live").await;

    let (code, body) = server.post("/api/admin/drain", "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "draining");
    assert_eq!(body["exiting"], false);
    assert_eq!(status(&server, "/readyz").await.0, 503);
    assert_draining_refusal(&raw_upgrade(server.call_addr).await);
    // Idempotent.
    assert_eq!(server.post("/api/admin/drain", "").await.0, 200);

    // The last call ending does not stop an operator's drain.
    echoes(&mut live, 9).await;
    caller_hangs_up(&mut live, "op-live").await;
    let (_, body) = status(&server, "/readyz").await;
    assert_eq!(body["status"], "draining");
    assert!(!server.is_stopped());

    let (code, body) = server.post("/api/admin/undrain", "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "serving");
    let (code, body) = status(&server, "/readyz").await;
    assert_eq!((code, &body["status"]), (200, &Value::from("serving")));
    let mut again = live_inbound(&server, "op-after").await;
    caller_hangs_up(&mut again, "op-after").await;

    // Once the process is told to exit, undrain is refused.
    let mut last = live_inbound(&server, "op-last").await;
    assert_eq!(
        server.lifecycle.drain().await,
        Phase::Draining { exiting: false }
    );
    assert_eq!(
        server.lifecycle.terminate().await,
        Phase::Draining { exiting: true }
    );
    let (code, body) = server.post("/api/admin/undrain", "").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["code"], "exiting");
    caller_hangs_up(&mut last, "op-last").await;
    let data = server.stopped().await;
    let reopened = spawn_server_in(data, |_| {}).await;
    let calls = reopened.calls().await;
    assert_eq!(calls.len(), 3);
    assert!(
        calls.iter().all(|c| c["end_reason"] == "peer_hangup"),
        "{calls:?}"
    );
    reopened.shutdown().await;
}

#[tokio::test]
async fn drain_and_undrain_need_the_operator_role() {
    let server = spawn_server(|c| {
        c.admin_auth = AdminAuth {
            tokens: vec![
                Token::from_secret("viewer", Role::Read, "read-secret-0123456789abcdef").unwrap(),
            ],
            ..AdminAuth::default()
        };
    })
    .await;
    let read = [("Authorization", "Bearer read-secret-0123456789abcdef")];
    for path in ["/api/admin/drain", "/api/admin/undrain"] {
        let (code, _) = http::request_with(server.admin_addr, "POST", path, Some(""), &read).await;
        assert_eq!(code, 403, "{path}");
        let (code, _) = http::request(server.admin_addr, "POST", path, Some("")).await;
        assert_eq!(code, 401, "{path}");
    }
    // Load balancers probe without a token.
    let (code, _) = http::request(server.admin_addr, "GET", "/readyz", None).await;
    assert_eq!(code, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn the_drain_timeout_ends_the_remaining_calls_as_server_shutdown() {
    let server = spawn_server(|c| c.drain_timeout = std::time::Duration::from_millis(300)).await;
    let mut cb = server.phone("/").await;
    cb.text(callbridge_start("timeout-cb")).await;
    cb.recv().await;
    echoes(&mut cb, 1).await;
    server.lifecycle.terminate().await;
    // The call keeps working until the timeout ends it.
    assert_eq!(cb.closed().await, (1001, "server shutting down".to_owned()));
    let data = server.stopped().await;
    let again = spawn_server_in(data, |_| {}).await;
    let calls = again.calls().await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["end_reason"], "server_shutdown", "{}", calls[0]);
    assert_eq!(calls[0]["hangup_by"], "server");
    again.shutdown().await;
}

#[tokio::test]
async fn a_second_terminate_or_an_interrupt_ends_the_calls_now() {
    for second_terminate in [true, false] {
        let server = spawn_server(|_| {}).await;
        let mut cb = server.phone("/").await;
        cb.text(callbridge_start("second")).await;
        cb.recv().await;
        server.lifecycle.terminate().await;
        echoes(&mut cb, 2).await;
        let phase = if second_terminate {
            server.lifecycle.terminate().await
        } else {
            server.lifecycle.interrupt().await
        };
        assert_eq!(phase, Phase::Stopping);
        assert_eq!(cb.closed().await, (1001, "server shutting down".to_owned()));
        let data = server.stopped().await;
        let again = spawn_server_in(data, |_| {}).await;
        let calls = again.calls().await;
        assert_eq!(calls[0]["end_reason"], "server_shutdown", "{}", calls[0]);
        again.shutdown().await;
    }
}

#[tokio::test]
async fn a_terminate_with_no_call_stops_at_once() {
    let server = spawn_server(|_| {}).await;
    assert_eq!(server.lifecycle.terminate().await, Phase::Stopping);
    server.stopped().await;
}
