//! A raw WebSocket phone: sends exactly what a test says and reports exactly what arrives.

use std::time::Duration;

use bytes::Bytes;
use callgate_phone::conn::{Connector, Stream, Ws};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// How long a phone waits for the server before a test fails: every await of a phone
/// (connect, send, close, receive) is bounded by it.
pub const WAIT: Duration = Duration::from_secs(10);

/// `work`, or a panic naming `what` if it takes longer than [`WAIT`].
async fn bounded<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("phone: {what} took longer than {WAIT:?}"))
}

/// What arrived from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// A close frame: code and reason.
    Close(u16, String),
    /// The connection ended without a close frame.
    Eof,
}

impl Received {
    /// The text message parsed as JSON; panics on anything else.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Self::Text(t) => serde_json::from_str(t).expect("JSON text"),
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// One phone-side connection.
pub struct Phone {
    ws: Ws,
}

/// Connects a plain WebSocket (tungstenite's default settings, Nagle on), as
/// `tokio_tungstenite::connect_async` does for `ws://`.
async fn connect_plain(request: Request) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let uri = request.uri();
    let host = uri.host().expect("the URL has a host");
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host, port)).await?;
    let (ws, _) = tokio_tungstenite::client_async(request, Stream::Left(tcp)).await?;
    Ok(ws)
}

impl Phone {
    /// Connects to a `ws://` URL.
    pub async fn connect(url: &str) -> Self {
        let request = url.into_client_request().expect("a ws:// URL");
        let ws = bounded("the WebSocket connect", connect_plain(request))
            .await
            .expect("WebSocket connect");
        Self { ws }
    }

    /// Connects to a `ws://` or `wss://` URL with the phone tools' connector (for `wss://`,
    /// one trusting the test CA), or says why it could not.
    pub async fn connect_with(url: &str, connector: &Connector) -> Result<Self, String> {
        callgate_phone::conn::connect(url, connector, WAIT)
            .await
            .map(|ws| Self { ws })
            .map_err(|e| e.to_string())
    }

    /// Connects with extra request headers; a refused upgrade gives its HTTP status and body.
    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, (u16, String)> {
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request().expect("a ws:// URL");
        for (name, value) in headers {
            // Appended: a name given twice is sent as two header lines.
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        match bounded("the WebSocket connect", connect_plain(request)).await {
            Ok(ws) => Ok(Self { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
                response.status().as_u16(),
                response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            )),
            Err(other) => panic!("WebSocket connect: {other}"),
        }
    }

    /// Sends a text message.
    pub async fn text(&mut self, text: impl Into<String>) {
        bounded(
            "sending text",
            self.ws.send(Message::Text(text.into().into())),
        )
        .await
        .expect("send text");
    }

    /// Sends a binary message.
    pub async fn binary(&mut self, data: impl Into<Bytes>) {
        bounded("sending binary", self.ws.send(Message::Binary(data.into())))
            .await
            .expect("send binary");
    }

    /// Sends a binary message, returning false if the connection is gone.
    pub async fn try_binary(&mut self, data: impl Into<Bytes>) -> bool {
        bounded("sending binary", self.ws.send(Message::Binary(data.into())))
            .await
            .is_ok()
    }

    /// Closes with this code.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        let _ = bounded("sending a close", self.ws.close(Some(frame))).await;
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_connection(self) {
        drop(self);
    }

    /// The next message (pings and pongs skipped), waiting at most [`WAIT`].
    pub async fn recv(&mut self) -> Received {
        loop {
            let next = bounded("waiting for the server", self.ws.next()).await;
            return match next {
                Some(Ok(Message::Text(t))) => Received::Text(t.to_string()),
                Some(Ok(Message::Binary(b))) => Received::Binary(b),
                Some(Ok(Message::Close(Some(f)))) => {
                    Received::Close(f.code.into(), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => Received::Close(1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    eprintln!("phone read error: {e}");
                    Received::Eof
                }
                None => Received::Eof,
            };
        }
    }

    /// The next text message as JSON, skipping binary audio.
    pub async fn recv_json(&mut self) -> serde_json::Value {
        loop {
            match self.recv().await {
                Received::Binary(_) => continue,
                other => return other.json(),
            }
        }
    }

    /// Waits for the close frame, skipping messages; returns its code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match self.recv().await {
                Received::Close(code, reason) => return (code, reason),
                Received::Eof => return (1006, String::new()),
                _ => continue,
            }
        }
    }
}
