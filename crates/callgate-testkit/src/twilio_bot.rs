//! A Twilio Media Streams bot double: a WebSocket server on `127.0.0.1:0` that a `bridge`
//! route connects to, for the bridge's tests and benchmark.
//!
//! Each connection is handed to the test as a [`BotConn`]: the upgrade's path and headers,
//! whether its `X-Twilio-Signature` checked out, every message callgate sent (parsed JSON), and
//! methods to send what a bot sends (`media`, `mark`, `clear`), close or drop the socket.
//! With [`BotConfig::echo`] the connection's own task also echoes every caller `media` back
//! byte for byte (the echo bot of the round-trip tests and `examples/twilio-echo-bot.rs`).
//! With [`BotConfig::auth_token`] the upgrade is refused (403) unless its signature is
//! Twilio's for that token, as a bot that validates Twilio requests does.
//!
//! Every await of the test's side ([`Bot::accept`], [`BotConn::recv`], the sends) is bounded
//! by [`crate::phone::WAIT`]: a connection or message that never comes fails the test with a
//! message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use callgate_server::Tasks;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::phone::WAIT;

/// `work`, or a panic naming `what` if it takes longer than [`WAIT`].
async fn bounded<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("bot double: {what} took longer than {WAIT:?}"))
}

/// How the double behaves.
#[derive(Debug, Clone, Default)]
pub struct BotConfig {
    /// Refuse upgrades whose `X-Twilio-Signature` is not Twilio's for this token.
    pub auth_token: Option<String>,
    /// Echo every caller `media` back at once (same payload).
    pub echo: bool,
    /// Keep no [`BotConn`] for the test (a benchmark's echo bot: nothing is recorded).
    pub unobserved: bool,
}

/// What a bot does next.
#[derive(Debug)]
enum Action {
    Text(String),
    Close(u16, String),
    Drop,
}

/// The running double.
pub struct Bot {
    addr: SocketAddr,
    conns: mpsc::Receiver<BotConn>,
    refused: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Bot {
    fn drop(&mut self) {
        // New connections are refused; those open end with their sockets.
        self.accept.abort();
    }
}

/// One connection from callgate.
pub struct BotConn {
    /// The path requested (with its query).
    pub path: String,
    /// The upgrade's headers, names lowercase.
    pub headers: Vec<(String, String)>,
    messages: mpsc::Receiver<Value>,
    actions: mpsc::Sender<Action>,
    stream_sid: String,
}

impl Bot {
    /// Listens on `127.0.0.1:0`.
    pub async fn start(config: BotConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, conns) = mpsc::channel(1024);
        let refused = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let config = Arc::new(config);
        let (r, e) = (refused.clone(), echoed.clone());
        let tasks = Tasks::new();
        let accept = tasks.clone().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (tx, config, r, e) = (tx.clone(), config.clone(), r.clone(), e.clone());
                tasks.spawn(serve(stream, config, tx, r, e));
            }
        });
        Self {
            addr,
            conns,
            refused,
            echoed,
            accept,
        }
    }

    /// `ws://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The next connection (at most [`crate::phone::WAIT`]).
    pub async fn accept(&mut self) -> BotConn {
        bounded("waiting for a connection from callgate", self.conns.recv())
            .await
            .expect("the bot double runs")
    }

    /// Upgrades refused for a bad or missing signature.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Media messages echoed, all connections.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

/// Twilio's signature of a GET to `url`.
pub fn signature(token: &str, url: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, token.as_bytes());
    BASE64.encode(ring::hmac::sign(&key, url.as_bytes()).as_ref())
}

async fn serve(
    stream: tokio::net::TcpStream,
    config: Arc<BotConfig>,
    conns: mpsc::Sender<BotConn>,
    refused: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
) {
    let mut path = String::new();
    let mut headers = Vec::new();
    #[allow(clippy::result_large_err, reason = "tungstenite's callback type")]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        path = request.uri().to_string();
        headers = request
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        if let Some(token) = &config.auth_token {
            let host = request
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            let url = format!("ws://{host}{}", request.uri());
            let given = request
                .headers()
                .get("x-twilio-signature")
                .and_then(|h| h.to_str().ok());
            if given != Some(signature(token, &url).as_str()) {
                refused.fetch_add(1, Ordering::Relaxed);
                let mut refusal = ErrorResponse::new(Some("bad signature".into()));
                *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
                return Err(refusal);
            }
        }
        Ok(response)
    };
    let ws_config = WebSocketConfig::default().read_buffer_size(4096);
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(ws_config)).await
    else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (msg_tx, messages) = mpsc::channel(100_000);
    let (actions, mut action_rx) = mpsc::channel(1024);
    let mut observed = None;
    if !config.unobserved {
        observed = Some(msg_tx);
        let _ = conns.try_send(BotConn {
            path,
            headers,
            messages,
            actions,
            stream_sid: String::new(),
        });
    } else {
        drop(actions);
    }
    let mut stream_sid = String::new();
    loop {
        tokio::select! {
            frame = source.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                if value["event"] == "start" {
                    stream_sid = value["streamSid"].as_str().unwrap_or_default().to_owned();
                }
                if config.echo && value["event"] == "media" {
                    let reply = json!({"event": "media", "streamSid": stream_sid,
                                       "media": {"payload": value["media"]["payload"]}});
                    if sink.send(Message::text(reply.to_string())).await.is_err() {
                        return;
                    }
                    echoed.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(tx) = &observed {
                    let _ = tx.try_send(value);
                }
            }
            action = action_rx.recv(), if observed.is_some() => match action {
                Some(Action::Text(t)) => {
                    if sink.send(Message::text(t)).await.is_err() {
                        return;
                    }
                }
                Some(Action::Close(code, reason)) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: code.into(),
                            reason: reason.into(),
                        })))
                        .await;
                    // Read on until callgate answers the close.
                    while let Some(Ok(m)) = source.next().await {
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                    return;
                }
                // Dropping both halves resets the TCP connection without a close frame.
                Some(Action::Drop) | None => return,
            },
        }
    }
}

impl BotConn {
    /// The next message callgate sent (at most [`crate::phone::WAIT`]); `None` once the
    /// connection ended.
    pub async fn recv(&mut self) -> Option<Value> {
        let v = bounded("waiting for a message from callgate", self.messages.recv()).await?;
        if v["event"] == "start" {
            self.stream_sid = v["streamSid"].as_str().unwrap_or_default().to_owned();
        }
        Some(v)
    }

    /// A message already received, if any (does not wait).
    pub fn try_recv(&mut self) -> Option<Value> {
        self.messages.try_recv().ok()
    }

    /// The next message of `event`, skipping `connected` and `media` (panics on another event
    /// or the end).
    pub async fn expect(&mut self, event: &str) -> Value {
        loop {
            let v = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("the connection ended before {event:?}"));
            if v["event"] == event {
                return v;
            }
            assert!(
                v["event"] == "media" || v["event"] == "connected",
                "expected {event:?}, got {v}"
            );
        }
    }

    /// The `streamSid` from `start`.
    pub fn stream_sid(&self) -> &str {
        &self.stream_sid
    }

    async fn act(&self, action: Action) {
        let _ = bounded(
            "handing an action to the connection",
            self.actions.send(action),
        )
        .await;
    }

    /// Sends any text, as it is.
    pub async fn send_text(&self, text: impl Into<String>) {
        self.act(Action::Text(text.into())).await;
    }

    /// Sends `media` with this μ-law audio.
    pub async fn media(&self, audio: &[u8]) {
        let m = json!({"event": "media", "streamSid": self.stream_sid,
                       "media": {"payload": BASE64.encode(audio)}});
        self.send_text(m.to_string()).await;
    }

    /// Sends a `mark`.
    pub async fn mark(&self, name: &str) {
        let m = json!({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}});
        self.send_text(m.to_string()).await;
    }

    /// Sends `clear`.
    pub async fn clear(&self) {
        let m = json!({"event": "clear", "streamSid": self.stream_sid});
        self.send_text(m.to_string()).await;
    }

    /// Closes with `code` and waits for callgate's answer.
    pub async fn close(&self, code: u16, reason: &str) {
        self.act(Action::Close(code, reason.into())).await;
    }

    /// Drops the TCP connection without a close frame.
    pub async fn drop_connection(&self) {
        self.act(Action::Drop).await;
    }

    /// An upgrade header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
