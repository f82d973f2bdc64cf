//! Native TLS over real sockets, with a certificate authority made in each test: calls over
//! `wss://`, the admin API over `https://`, certificates reloaded (asked, and when the files
//! change) without dropping live calls, bad replacements refused, and TLS handshakes that
//! hold nothing but a place in the pending budget.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use callgate_server::tls::{self, Files, Port};
use callgate_server::{Config, Server};
use callgate_testkit::http::request_tls;
use callgate_testkit::tls::{Connector, TLS12, TLS13, TestCa, presented, replace};
use callgate_testkit::{Phone, Received, TempDir, TestServer, cdr, incoming_call, spawn_server};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something the server does in the background (a bound, not a pace).
const WAIT: Duration = Duration::from_secs(10);

/// A server with TLS on both ports, and what a client needs to trust it.
struct Tls {
    server: TestServer,
    ca: TestCa,
    ca_file: PathBuf,
    call: Files,
    admin: Files,
    dir: TempDir,
}

impl Tls {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = TempDir::new("tls");
        let ca = TestCa::new("main");
        let ca_file = ca.write(dir.path(), "ca.pem");
        let call = ca.server_cert("call-a").write(dir.path(), "call");
        let admin = ca.server_cert("admin-a").write(dir.path(), "admin");
        let (c, a) = (call.clone(), admin.clone());
        let server = spawn_server(move |config| {
            config.tls = Some(c);
            config.admin_tls = Some(a);
            tweak(config);
        })
        .await;
        Self {
            server,
            ca,
            ca_file,
            call,
            admin,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("wss://{}/", self.server.call_addr)
    }

    async fn phone(&self) -> Phone {
        let connector =
            Connector::for_url(&self.url(), Some(&self.ca_file)).expect("a wss:// connector");
        Phone::connect_with(&self.url(), &connector)
            .await
            .expect("a wss:// call")
    }

    async fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = request_tls(
            self.server.admin_addr,
            &self.ca.connector(),
            "GET",
            path,
            None,
            &[],
        )
        .await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        )
    }

    async fn metrics(&self) -> String {
        match self.admin_get("/metrics").await {
            (200, serde_json::Value::String(text)) => text,
            other => panic!("metrics: {other:?}"),
        }
    }

    /// Waits until the metrics contain `line`.
    async fn metric_reaches(&self, line: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            if text.contains(line) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{line:?} never appeared in\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// An answered inbound call that echoes one frame.
async fn answered(phone: &mut Phone, id: &str) {
    phone.text(incoming_call(id)).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    echoes(phone).await;
}

async fn echoes(phone: &mut Phone) {
    phone.binary(vec![7u8; 320]).await;
    assert_eq!(phone.recv().await, Received::Binary(vec![7u8; 320].into()));
}

/// The caller hangs up, sends its CDR and sees the close.
async fn hang_up(mut phone: Phone, id: &str) {
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr(id)).await;
    assert_eq!(phone.closed().await.0, 1000);
}

#[tokio::test]
async fn calls_and_the_admin_api_speak_tls() {
    let t = Tls::start(|_| {}).await;
    let mut phone = t.phone().await;
    answered(&mut phone, "tls-inbound").await;
    let mut cb = t.phone().await;
    cb.text(callgate_testkit::callbridge_start("tls-cb")).await;
    assert_eq!(cb.recv().await.json()["type"], "started");
    echoes(&mut cb).await;
    cb.close(1000, "done").await;
    hang_up(phone, "tls-inbound").await;

    // The admin API answers over HTTPS only.
    let (status, health) = t.admin_get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let (status, list) = t.admin_get("/api/calls").await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["external_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tls-cb", "tls-inbound"]);
    let mut plain = TcpStream::connect(t.server.admin_addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("the server ends a plain-HTTP connection");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");

    // A plain ws:// phone gets no call.
    let plain_url = format!("ws://{}/", t.server.call_addr);
    let refused = Phone::connect_with(&plain_url, &Connector::for_url(&plain_url, None).unwrap())
        .await
        .err()
        .expect("no WebSocket without TLS");
    assert!(refused.contains("cannot connect"), "{refused}");

    // Both versions are spoken.
    for (versions, name) in [(&[&TLS12][..], "TLSv1_2"), (&[&TLS13][..], "TLSv1_3")] {
        let stream =
            callgate_testkit::tls::connect(t.server.call_addr, &t.ca.connector_with(versions))
                .await
                .unwrap();
        let version = stream.get_ref().1.protocol_version().unwrap();
        assert_eq!(format!("{version:?}"), name);
    }
    t.metric_reaches(r#"callgate_tls_handshakes_failed_total{port="admin"} 1"#)
        .await;
    t.metric_reaches(r#"callgate_tls_handshakes_failed_total{port="call"} 1"#)
        .await;
    let metrics = t.metrics().await;
    assert!(
        metrics.contains(r#"callgate_connections_refused_total{reason="tls_handshake"} 1"#),
        "{metrics}"
    );
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_to_new_connections_and_keeps_live_calls() {
    let t = Tls::start(|_| {}).await;
    let old_call = presented(t.server.call_addr, &t.ca).await;
    let mut live = t.phone().await;
    answered(&mut live, "live-through-reload").await;

    let call_b = t.ca.server_cert("call-b");
    let admin_b = t.ca.server_cert("admin-b");
    call_b.write_over(&t.call);
    admin_b.write_over(&t.admin);
    let outcomes = t.server.certificates.reload().await;
    assert_eq!(outcomes, vec![(Port::Call, Ok(())), (Port::Admin, Ok(()))]);

    let now = presented(t.server.call_addr, &t.ca).await;
    assert_ne!(now, old_call);
    assert_eq!(now, call_b.der);
    assert_eq!(presented(t.server.admin_addr, &t.ca).await, admin_b.der);
    // A new call is placed with the new certificate; the live one never noticed.
    let mut fresh = t.phone().await;
    answered(&mut fresh, "after-reload").await;
    echoes(&mut live).await;
    hang_up(live, "live-through-reload").await;
    hang_up(fresh, "after-reload").await;
    let (_, record) = t.admin_get("/api/calls?limit=2").await;
    for call in record["calls"].as_array().unwrap() {
        assert_eq!(call["end_reason"], "peer_hangup", "{call}");
    }
    t.metric_reaches(r#"callgate_tls_reloads_total{port="call",result="ok"} 1"#)
        .await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn changed_files_are_picked_up_and_a_bad_replacement_keeps_the_certificate_in_force() {
    let t = Tls::start(|c| c.tls_watch_interval = Duration::from_millis(20)).await;
    let mut live = t.phone().await;
    answered(&mut live, "live-through-changes").await;

    let b = t.ca.server_cert("call-b");
    b.write_over(&t.call);
    let deadline = tokio::time::Instant::now() + WAIT;
    while presented(t.server.call_addr, &t.ca).await != b.der {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.metric_reaches(r#"callgate_tls_reloads_total{port="call",result="ok"} 1"#)
        .await;

    // Not a certificate: refused, counted, and the one in force stays.
    replace(&t.call.cert, b"-----BEGIN CERTIFICATE-----\nnot base64!\n");
    t.metric_reaches(r#"callgate_tls_reloads_total{port="call",result="error"} 1"#)
        .await;
    assert_eq!(presented(t.server.call_addr, &t.ca).await, b.der);
    // A chain with another certificate's key: refused too.
    let c = t.ca.server_cert("call-c");
    replace(&t.call.cert, c.chain_pem.as_bytes());
    t.metric_reaches(r#"callgate_tls_reloads_total{port="call",result="error"} 2"#)
        .await;
    assert_eq!(presented(t.server.call_addr, &t.ca).await, b.der);
    // A reload asked for says why.
    let outcomes = t.server.certificates.reload().await;
    assert_eq!(
        outcomes[0],
        (
            Port::Call,
            Err(tls::Error::KeyMismatch {
                cert: t.call.cert.clone(),
                key: t.call.key.clone(),
            })
        )
    );
    assert_eq!(presented(t.server.call_addr, &t.ca).await, b.der);
    // The files settle on a good pair again: it is taken.
    c.write_over(&t.call);
    let deadline = tokio::time::Instant::now() + WAIT;
    while presented(t.server.call_addr, &t.ca).await != c.der {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    echoes(&mut live).await;
    hang_up(live, "live-through-changes").await;
    let _ = &t.dir;
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_certificate_is_refused() {
    let t = Tls::start(|_| {}).await;
    let other = TestCa::new("other");
    let other_file = other.write(t.dir.path(), "other-ca.pem");
    let connector = Connector::for_url(&t.url(), Some(&other_file)).unwrap();
    let error = Phone::connect_with(&t.url(), &connector)
        .await
        .err()
        .expect("a certificate from an unknown CA is refused");
    assert!(error.contains("UnknownIssuer"), "{error}");
    t.metric_reaches(r#"callgate_tls_handshakes_failed_total{port="call"} 1"#)
        .await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn an_address_the_allowlist_never_admits_gets_no_tls_handshake() {
    // Loopback is neither allowed nor a trusted proxy: the server must not even answer the
    // ClientHello.
    let t = Tls::start(|c| {
        c.call_auth.allow = vec!["192.0.2.0/24".parse().unwrap()];
    })
    .await;
    let connector = Connector::for_url(&t.url(), Some(&t.ca_file)).unwrap();
    let error = Phone::connect_with(&t.url(), &connector)
        .await
        .err()
        .expect("refused before the handshake");
    assert!(!error.contains("403"), "no HTTP answer at all: {error}");
    // A raw ClientHello start gets nothing back but the close.
    let mut raw = idle(t.server.call_addr, PARTIAL_HELLO).await;
    closed_by_server(&mut raw).await;
    t.metric_reaches(r#"callgate_connections_refused_total{reason="address_not_allowed"} 2"#)
        .await;
    let metrics = t.metrics().await;
    assert!(
        !metrics.contains(r#"callgate_tls_handshakes_failed_total{port="call"}"#),
        "no handshake was attempted: {metrics}"
    );
    t.server.shutdown().await;
}

/// Connects and sends `first` (possibly nothing), then holds the socket.
async fn idle(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(first).await.expect("write");
    stream
}

/// The start of a TLS record announcing a 512-byte handshake message that never comes.
const PARTIAL_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00];

/// Waits until the server has closed `stream` (end of stream, or a reset).
async fn closed_by_server(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    // End of stream or a reset: either way the server let it go.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the server closed the connection");
    assert!(rest.is_empty(), "the server sent {rest:?}");
}

#[tokio::test]
async fn an_idle_tls_handshake_is_dropped_at_the_handshake_deadline() {
    let t = Tls::start(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut silent = idle(t.server.call_addr, b"").await;
    let mut partial = idle(t.server.call_addr, PARTIAL_HELLO).await;
    closed_by_server(&mut silent).await;
    closed_by_server(&mut partial).await;
    t.metric_reaches(r#"callgate_connections_refused_total{reason="tls_handshake"} 2"#)
        .await;
    t.metric_reaches("callgate_connections_pending 0").await;
    let metrics = t.metrics().await;
    assert!(metrics.contains("callgate_calls_live 0"), "{metrics}");
    // The admin port's handshakes have the same deadline.
    let mut admin = idle(t.server.admin_addr, PARTIAL_HELLO).await;
    closed_by_server(&mut admin).await;
    t.metric_reaches(r#"callgate_tls_handshakes_failed_total{port="admin"} 1"#)
        .await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_idle_tls_handshakes_evicts_the_oldest_and_costs_live_calls_nothing() {
    let t = Tls::start(|c| {
        c.max_pending = 32;
        c.max_pending_per_ip = 10_000;
        c.max_calls = 4;
    })
    .await;
    let mut canary = t.phone().await;
    answered(&mut canary, "canary").await;
    let mut flood = Vec::new();
    for i in 0..1000 {
        let first = if i % 2 == 0 { &b""[..] } else { PARTIAL_HELLO };
        flood.push(idle(t.server.call_addr, first).await);
        if i % 250 == 0 {
            echoes(&mut canary).await;
        }
    }
    echoes(&mut canary).await;
    // A caller still gets through: its connection evicts the oldest pending one.
    let mut caller = t.phone().await;
    answered(&mut caller, "caller").await;
    // The oldest idle handshakes were dropped, holding no call slot.
    closed_by_server(&mut flood[0]).await;
    closed_by_server(&mut flood[1]).await;
    let metrics = t.metrics().await;
    let evicted = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"callgate_connections_refused_total{reason="pending_evicted"} "#)
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(evicted >= 1000 - 2 * 32, "{metrics}");
    assert!(metrics.contains("callgate_calls_live 2"), "{metrics}");
    echoes(&mut canary).await;
    drop(flood);
    t.metric_reaches("callgate_connections_pending 0").await;
    hang_up(canary, "canary").await;
    hang_up(caller, "caller").await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn idle_admin_handshakes_are_evicted_for_a_real_request() {
    // A deadline no test waits for: only eviction can make room.
    let t = Tls::start(|c| c.handshake_timeout = Duration::from_secs(600)).await;
    let mut idle_ones = Vec::new();
    for i in 0..(tls::MAX_ADMIN_HANDSHAKES + 8) {
        let first = if i % 2 == 0 { &b""[..] } else { PARTIAL_HELLO };
        idle_ones.push(idle(t.server.admin_addr, first).await);
    }
    let (status, health) = tokio::time::timeout(WAIT, t.admin_get("/healthz"))
        .await
        .expect("a request gets through while 72 handshakes are idle");
    assert_eq!(status, 200, "{health}");
    closed_by_server(&mut idle_ones[0]).await;
    let metrics = t.metrics().await;
    assert!(
        metrics.contains(r#"callgate_tls_handshakes_failed_total{port="admin"}"#),
        "{metrics}"
    );
    drop(idle_ones);
    t.server.shutdown().await;
}

#[tokio::test]
async fn bad_tls_files_stop_the_server_before_it_binds() {
    let dir = TempDir::new("tls-bad");
    let ca = TestCa::new("bind");
    let a = ca.server_cert("a").write(dir.path(), "a");
    let b = ca.server_cert("b").write(dir.path(), "b");
    let missing = Files {
        cert: dir.path().join("missing.pem"),
        key: a.key.clone(),
    };
    let mismatched = Files {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let no_key = Files {
        cert: a.cert.clone(),
        key: a.cert.clone(),
    };
    for (call, admin, port) in [
        (Some(missing), None, Port::Call),
        (None, Some(mismatched.clone()), Port::Admin),
        (Some(no_key.clone()), None, Port::Call),
    ] {
        let data = TempDir::new("tls-bad-data");
        let mut config = callgate_testkit::test_config(data.path());
        config.tls = call;
        config.admin_tls = admin;
        let error = match Server::bind(config).await {
            Ok(_) => panic!("the server bound with bad TLS files"),
            Err(e) => e,
        };
        assert!(error.is_config(), "{error}");
        match &error {
            callgate_server::Error::Tls { port: p, .. } => assert_eq!(*p, port),
            other => panic!("{other}"),
        }
        eprintln!("{error}");
    }
    assert_eq!(
        tls::check(&mismatched),
        Err(tls::Error::KeyMismatch {
            cert: a.cert.clone(),
            key: b.key.clone()
        })
    );
    assert_eq!(
        tls::check(&no_key),
        Err(tls::Error::NoKey {
            path: a.cert.clone()
        })
    );
    assert_eq!(tls::check(&a).map(|c| c.certificates), Ok(1));
    // A chain with its intermediate: the count says so.
    let chain = dir.path().join("chain.pem");
    std::fs::write(
        &chain,
        format!("{}{}", std::fs::read_to_string(&a.cert).unwrap(), ca.pem),
    )
    .unwrap();
    let with_chain = Files {
        cert: chain,
        key: a.key.clone(),
    };
    assert_eq!(tls::check(&with_chain).map(|c| c.certificates), Ok(2));
}
