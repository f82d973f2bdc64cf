//! A raw WebSocket phone: sends exactly what a test says and reports exactly what arrives.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a phone waits for the server before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

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
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Phone {
    /// Connects to a `ws://` URL.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connect");
        Self { ws }
    }

    /// Connects with extra request headers; a refused upgrade gives its HTTP status and body.
    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request().expect("a ws:// URL");
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(Self { ws }),
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
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send text");
    }

    /// Sends a binary message.
    pub async fn binary(&mut self, data: impl Into<Bytes>) {
        self.ws
            .send(Message::Binary(data.into()))
            .await
            .expect("send binary");
    }

    /// Sends a binary message, returning false if the connection is gone.
    pub async fn try_binary(&mut self, data: impl Into<Bytes>) -> bool {
        self.ws.send(Message::Binary(data.into())).await.is_ok()
    }

    /// Closes with this code.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_connection(self) {
        drop(self);
    }

    /// The next message (pings and pongs skipped), waiting at most [`WAIT`].
    pub async fn recv(&mut self) -> Received {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server answered in time");
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
