//! One WebSocket connection to the Realtime service, on a task of its own: it connects
//! (TCP, TLS for `wss://`, the upgrade with the key), turns every frame it reads into a
//! [`ServerEvent`] (JSON parsed, audio base64-decoded) for the call's agent, and writes what
//! the agent sends (audio appends encoded here).
//!
//! Channels: toward the agent, [`EVENTS`] deep, shared by a call's connections (tagged with
//! their generation); policy when full: this task waits, so the service's socket is not read
//! (TCP pushes back). From the agent, [`OUTGOING`] deep per connection; policy when full: the
//! agent treats the connection as lost (the service has not read 10 s of the caller's audio).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::either::Either;

use crate::core::{Lost, Outgoing};
use crate::protocol::{self, ServerEvent, client};

/// Events from the connections toward the agent (see the module docs for the policy).
pub(crate) const EVENTS: usize = 64;
/// Messages toward one connection: 500 is 10 s of 20 ms caller frames.
pub(crate) const OUTGOING: usize = 500;
/// The largest frame accepted from the service (an audio delta is a few hundred kB at most).
const MAX_FRAME: usize = 16 << 20;
/// How often the connection is pinged when the service has been quiet.
const PING_EVERY: Duration = Duration::from_secs(5);
/// A service silent this long (not even a pong) is gone: a half-open connection or a hung
/// server is noticed within it.
const SILENCE_LIMIT: Duration = Duration::from_secs(15);
/// The longest one write to the service may take.
const WRITE_LIMIT: Duration = Duration::from_secs(5);

/// What a connection reports.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The upgrade succeeded.
    Opened { conn: u64 },
    /// A server event, read at `received`.
    Event {
        conn: u64,
        event: ServerEvent,
        received: std::time::Instant,
    },
    /// The connection ended or could not be opened.
    Lost { conn: u64, lost: Lost },
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) url: String,
    pub(crate) key: String,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// How long the TCP connect, TLS and the upgrade may take.
    pub(crate) connect_timeout: Duration,
}

/// tokio's clock (paused in tests): this task is driver code, so it may read the clock.
#[allow(
    clippy::disallowed_methods,
    reason = "the connection's task is I/O: it times pings and stamps what it reads"
)]
fn clock() -> Instant {
    Instant::now()
}

/// Runs connection `conn` until it ends or `outgoing` closes (then it closes with 1000).
pub(crate) async fn run(
    conn: u64,
    endpoint: Arc<Endpoint>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    events: mpsc::Sender<LinkEvent>,
) {
    let attempt = tokio::time::timeout(endpoint.connect_timeout, connect(&endpoint)).await;
    let ws = match attempt.unwrap_or_else(|_| {
        Err(Lost::Broken(format!(
            "no connection within {:?}",
            endpoint.connect_timeout
        )))
    }) {
        Ok(ws) => ws,
        Err(lost) => {
            let _ = events.send(LinkEvent::Lost { conn, lost }).await;
            return;
        }
    };
    if events.send(LinkEvent::Opened { conn }).await.is_err() {
        return;
    }
    if let Some(lost) = serve(conn, ws, &mut outgoing, &events).await {
        let _ = events.send(LinkEvent::Lost { conn, lost }).await;
    }
}

/// Serves open connection `conn` until it is lost (`Some`), or until `outgoing` closes (it
/// closes with 1000) or the agent is gone (`None`).
async fn serve(
    conn: u64,
    ws: tokio_tungstenite::WebSocketStream<Stream>,
    outgoing: &mut mpsc::Receiver<Outgoing>,
    events: &mpsc::Sender<LinkEvent>,
) -> Option<Lost> {
    let (mut sink, mut stream) = ws.split();
    let mut heard = clock();
    let mut ping = tokio::time::interval_at(heard + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                let silent = heard.elapsed();
                if silent >= SILENCE_LIMIT {
                    let reason = format!("no word from the service for {SILENCE_LIMIT:?}");
                    return Some(Lost::Broken(reason));
                }
                if silent >= PING_EVERY {
                    let ping = sink.send(Message::Ping(Default::default()));
                    if !matches!(tokio::time::timeout(WRITE_LIMIT, ping).await, Ok(Ok(()))) {
                        return Some(Lost::Broken("cannot ping the service".into()));
                    }
                }
            }
            frame = stream.next() => {
                heard = clock();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        if !forward(conn, text.as_str(), heard.into_std(), events).await {
                            return None;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => return Some(closed(frame)),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(Lost::Broken(format!("connection error: {e}"))),
                    None => {
                        let reason = "the connection ended without a close";
                        return Some(Lost::Broken(reason.into()));
                    }
                }
            }
            message = outgoing.recv() => {
                let Some(message) = message else {
                    let _ = sink
                        .send(Message::Close(Some(tungstenite::protocol::CloseFrame {
                            code: CloseCode::Normal,
                            reason: "call ended".into(),
                        })))
                        .await;
                    return None;
                };
                if let Err(lost) = write(&mut sink, message).await {
                    return Some(lost);
                }
            }
        }
    }
}

/// A text frame from the service, read at `received`, parsed and handed to the agent;
/// `false` when the agent is gone. An unreadable event is skipped.
async fn forward(
    conn: u64,
    text: &str,
    received: std::time::Instant,
    events: &mpsc::Sender<LinkEvent>,
) -> bool {
    let event = match protocol::parse(text) {
        Ok(event) => event,
        Err(e) => {
            tracing::debug!(error = %e, "Unreadable event from the AI service.");
            return true;
        }
    };
    let event = LinkEvent::Event {
        conn,
        event,
        received,
    };
    events.send(event).await.is_ok()
}

/// The service's close frame, as a loss (1005: no code). Whether the code means a
/// configuration error is the core's decision.
fn closed(frame: Option<tungstenite::protocol::CloseFrame>) -> Lost {
    let (code, reason) = frame
        .map(|f| (u16::from(f.code), f.reason.to_string()))
        .unwrap_or((1005, String::new()));
    Lost::Closed { code, reason }
}

/// Writes `message` to the service, within [`WRITE_LIMIT`].
async fn write(
    sink: &mut (impl futures_util::Sink<Message, Error = tungstenite::Error> + Unpin),
    message: Outgoing,
) -> Result<(), Lost> {
    let text = match message {
        Outgoing::Append(audio) => client::append(&audio),
        Outgoing::Text(text) => text,
    };
    match tokio::time::timeout(WRITE_LIMIT, sink.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Lost::Broken(format!("cannot write: {e}"))),
        Err(_) => Err(Lost::Broken(format!(
            "a write to the service took more than {WRITE_LIMIT:?}"
        ))),
    }
}

type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Connects to the service: the transport, then the upgrade with the key.
async fn connect(endpoint: &Endpoint) -> Result<tokio_tungstenite::WebSocketStream<Stream>, Lost> {
    let stream = transport(endpoint).await?;
    let mut request = endpoint
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| Lost::Unusable(format!("bad url: {e}")))?;
    let bearer = format!("Bearer {}", endpoint.key)
        .parse()
        .map_err(|_| Lost::Unusable("the API key is not a valid header value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            // A 401's body quotes part of the key: only other answers are kept.
            let body = match status {
                401 => String::new(),
                _ => response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).chars().take(200).collect())
                    .unwrap_or_default(),
            };
            Err(Lost::Refused { status, body })
        }
        Err(e) => Err(Lost::Broken(format!("WebSocket upgrade failed: {e}"))),
    }
}

/// TCP to the URL's host, and TLS over it for `wss://`.
async fn transport(endpoint: &Endpoint) -> Result<Stream, Lost> {
    let url =
        reqwest::Url::parse(&endpoint.url).map_err(|e| Lost::Unusable(format!("bad url: {e}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| Lost::Unusable("the url has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = url.scheme() == "wss";
    let port = url.port().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Lost::Broken(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream: Stream = if tls {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| Lost::Unusable(format!("bad host name {host:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(endpoint.tls.clone());
        let tls = connector.connect(name, tcp).await.map_err(|e| {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
            let reason = format!("TLS with {host}: {e}");
            if certificate {
                Lost::Untrusted(reason)
            } else {
                Lost::Broken(reason)
            }
        })?;
        Either::Right(tls)
    } else {
        Either::Left(tcp)
    };
    Ok(stream)
}
