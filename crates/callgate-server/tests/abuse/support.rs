//! What the abuse tests share: connections from chosen loopback addresses, a canary call,
//! placing a call. Also used by `tests/abuse_logs.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callgate_testkit::phone::WAIT;
use callgate_testkit::{Phone, Received, TestServer, cdr, incoming_call};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Where real callers (and the canary) connect from.
pub(crate) const CALLER: [u8; 4] = [127, 0, 0, 1];
/// Where attacks come from.
pub(crate) const ATTACKER: [u8; 4] = [127, 0, 0, 2];

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// A TCP connection to the call listener from this loopback address.
pub(crate) async fn connect_from(server: &TestServer, ip: [u8; 4]) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    socket.connect(server.call_addr).await
}

/// A WebSocket to `path` from this loopback address, or why there is none.
pub(crate) async fn ws_from(server: &TestServer, ip: [u8; 4], path: &str) -> Result<Ws, String> {
    let stream = connect_from(server, ip)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(server.url(path), stream),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("upgrade: {e}")),
        Err(_) => Err("upgrade: no answer".into()),
    }
}

/// The close a WebSocket gets: code and reason (1006: none).
pub(crate) async fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return (f.code.into(), f.reason.to_string()),
            Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return (1006, String::new()),
            Err(_) => panic!("no close within {WAIT:?}"),
        }
    }
}

/// A normal echo call that runs during an attack and must keep echoing, byte for byte.
pub(crate) struct Canary {
    phone: Phone,
    id: String,
    echoed: u64,
    slowest: Duration,
}

impl Canary {
    pub(crate) async fn start(server: &TestServer, id: &str) -> Self {
        let mut phone = server.phone("/").await;
        phone.text(incoming_call(id)).await;
        assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
        let mut canary = Self {
            phone,
            id: id.to_owned(),
            echoed: 0,
            slowest: Duration::ZERO,
        };
        canary.echo().await;
        canary
    }

    /// One frame out and back, byte-exact.
    pub(crate) async fn echo(&mut self) {
        let frame = vec![(self.echoed % 251) as u8 + 1; 320];
        let sent = Instant::now();
        self.phone.binary(frame.clone()).await;
        assert_eq!(
            self.phone.recv().await,
            Received::Binary(frame.into()),
            "canary echo {}",
            self.echoed
        );
        self.slowest = self.slowest.max(sent.elapsed());
        self.echoed += 1;
    }

    /// Hangs up; the record says the call went to the end with every frame.
    pub(crate) async fn end(mut self, server: &TestServer) {
        self.echo().await;
        eprintln!(
            "canary: {} frames echoed, slowest round trip {:?}",
            self.echoed, self.slowest
        );
        // Generous: a frame on loopback takes well under 50 ms; an attack that stalled the
        // canary's task would show here.
        assert!(
            self.slowest < Duration::from_secs(1),
            "canary round trip {:?}",
            self.slowest
        );
        self.phone.text(r#"{"event":"hangup"}"#).await;
        self.phone.text(cdr(&self.id)).await;
        assert_eq!(self.phone.closed().await.0, 1000);
        let record = server.ended_call(&self.id).await;
        assert_eq!(record["end_reason"], "peer_hangup");
        assert_eq!(record["frames_in"], self.echoed);
        assert_eq!(record["frames_out"], self.echoed);
    }
}

/// Places a call from `ip`: `Ok` once answered, else what happened instead.
pub(crate) async fn place_call(server: &TestServer, ip: [u8; 4], id: &str) -> Result<Ws, String> {
    let mut ws = ws_from(server, ip, "/").await?;
    ws.send(Message::Text(incoming_call(id).into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        return match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(t)))) if t.contains("answer") => Ok(ws),
            Ok(Some(Ok(Message::Close(f)))) => Err(format!("closed: {f:?}")),
            other => Err(format!("no answer: {other:?}")),
        };
    }
}
