//! The call port's HTTP refusals over real sockets: each answer to an upgrade request that may
//! not become a call (no or a bad key, an address off the allowlist, a missing or bad Twilio
//! signature, a draining node, a source over its pending budget) is read whole from a raw
//! socket: its status, its `Content-Type`, its JSON body `{"code", "error"}` and the headers
//! each keeps (`WWW-Authenticate`, `Retry-After`).

use std::net::SocketAddr;
use std::time::Duration;

use callgate_server::auth::Secret;
use callgate_server::call_auth::{CallAuth, CallKey, TwilioToken};
use callgate_testkit::phone::WAIT;
use callgate_testkit::spawn_server;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "callbridge-key-0123456789";
const TWILIO_TOKEN: &str = "twilio-auth-token-0123456789";

/// An HTTP answer read whole from a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names in lower case, values as sent.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        Self {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The JSON body, after checking that the head says what it is and how long.
    fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        assert_eq!(
            self.header("content-length"),
            Some(self.body.len().to_string().as_str()),
            "{self:?}"
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// Checks status, JSON body and its code; returns the body's message.
    fn refusal(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_eq!(body["code"], code, "{self:?}");
        let error = body["error"].as_str().expect("an error message");
        assert!(!error.is_empty());
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(2),
            "only code and error: {self:?}"
        );
        error.to_owned()
    }
}

/// Reads everything the server sends until it closes the connection.
async fn read_all(tcp: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .expect("read");
    answer
}

/// A WebSocket upgrade request written by hand to `path` with `headers`, and the answer.
async fn upgrade(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    Answer::parse(&read_all(&mut tcp).await)
}

#[tokio::test]
async fn key_signature_and_allowlist_refusals_are_json() {
    let server = spawn_server(|c| {
        c.call_auth = CallAuth {
            keys: vec![CallKey::new(
                "cb",
                Secret::from_text(KEY).expect("secret"),
                None,
            )],
            twilio: Some(TwilioToken::new(TWILIO_TOKEN)),
            ..CallAuth::default()
        };
    })
    .await;
    let addr = server.call_addr;

    let missing = upgrade(addr, "/", &[]).await;
    let error = missing.refusal(401, "missing_key");
    assert!(error.contains("API key is required"), "{error}");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));

    let bad = upgrade(addr, "/", &[("x-api-key", "wrong-key-0123456789")]).await;
    assert_eq!(bad.refusal(401, "bad_key"), "invalid API key");
    assert_eq!(bad.header("www-authenticate"), Some("Bearer"));

    let unsigned = upgrade(addr, "/twilio", &[]).await;
    let error = unsigned.refusal(401, "missing_twilio_signature");
    assert!(error.contains("X-Twilio-Signature"), "{error}");

    let forged = upgrade(addr, "/twilio", &[("x-twilio-signature", "garbage")]).await;
    assert_eq!(
        forged.refusal(401, "bad_twilio_signature"),
        "invalid X-Twilio-Signature"
    );

    // Each refusal is counted under its code.
    let metrics = server.metrics_text().await;
    for code in [
        "missing_key",
        "bad_key",
        "missing_twilio_signature",
        "bad_twilio_signature",
    ] {
        let line = format!("callgate_connections_refused_total{{reason=\"{code}\"}} 1");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    server.shutdown().await;

    let server = spawn_server(|c| {
        c.call_auth = CallAuth {
            allow: vec!["10.0.0.0/8".parse().expect("a network")],
            ..CallAuth::default()
        };
    })
    .await;
    let off_list = upgrade(server.call_addr, "/", &[]).await;
    let error = off_list.refusal(403, "address_not_allowed");
    assert!(error.contains("not accepted from this address"), "{error}");
    assert_eq!(off_list.header("www-authenticate"), None);
    server.shutdown().await;
}

#[tokio::test]
async fn a_draining_nodes_refusal_is_json_with_retry_after() {
    let server = spawn_server(|_| {}).await;
    let (code, body) = server.post("/api/admin/drain", "").await;
    assert_eq!(code, 200, "{body}");
    let answer = upgrade(server.call_addr, "/", &[]).await;
    let error = answer.refusal(503, "draining");
    assert!(error.contains("takes no new calls"), "{error}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("connection"), Some("close"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_source_over_its_pending_budget_is_turned_away_with_json() {
    let server = spawn_server(|c| {
        c.max_pending_per_ip = 1;
        // The idle connection below stays pending for the whole test.
        c.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    // Accepted in order: this one holds the address's only pending place.
    let idle = TcpStream::connect(server.call_addr).await.expect("connect");
    // Turned away at accept; it sends nothing, so the close after the answer is a clean FIN.
    let mut over = TcpStream::connect(server.call_addr).await.expect("connect");
    let answer = Answer::parse(&read_all(&mut over).await);
    let error = answer.refusal(503, "pending_per_ip");
    assert!(error.contains("from this address"), "{error}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    drop(idle);
    server.shutdown().await;
}
