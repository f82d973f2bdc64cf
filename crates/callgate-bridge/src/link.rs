//! The connection to the bot, polled by the agent on the call's own task (no task of its own,
//! no channel hop: a caller frame goes out and the bot's answer comes in with no cross-task
//! wake-up). It connects (TCP, TLS for `wss://`, the upgrade with the route's headers and
//! `X-Twilio-Signature`) under `connect_timeout`, then [`Link::next`] reads the bot's socket,
//! turning each frame into a [`BotMessage`] (JSON parsed, audio base64-decoded), and flushes
//! what [`Link::send`] queued; the driver calls `next` in every turn of its `select!`, so what
//! one turn queued goes out in one write.
//!
//! Bounds and policies: the bot's socket is not read while the agent holds 120 s of its audio
//! (the driver passes `read = false`; TCP pushes back) while the caller's audio is still
//! written to it. What the bot has not read waits in the socket's buffers and then in
//! [`OUTGOING_LIMIT`] bytes of the WebSocket's write buffer (10 s of the caller's `media`);
//! when that is full too, the bot counts as dropped (it stopped reading). A message from the
//! bot is at most [`MAX_MESSAGE`] (4 MiB): parsing and decoding one on the call's task takes a
//! few milliseconds at worst; a bot sends 20 ms chunks in practice.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::{Sink, Stream as _};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::either::Either;

use crate::core::{BotClosed, BotMessage, ConnectFailure};
use callgate_proto::twilio::ToTwilio;

/// The largest message accepted from the bot (a minute of audio in one `media` is ~640 kB).
const MAX_MESSAGE: usize = 4 << 20;
/// The WebSocket's write buffer is written out at this size, or at the end of each turn.
const WRITE_BUFFER: usize = 64 << 10;
/// What may wait in the write buffer beyond [`WRITE_BUFFER`] before the bot counts as
/// dropped: 10 s of the caller's `media` (~330 bytes every 20 ms).
pub(crate) const OUTGOING_LIMIT: usize = 170 << 10;

/// What the connection reports.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The upgrade succeeded.
    Opened,
    /// A message from the bot, `bytes` long on the wire.
    Message { message: BotMessage, bytes: usize },
    /// The connection ended after it was open.
    Closed(BotClosed),
    /// The connection could not be opened.
    Failed(ConnectFailure),
}

/// Where and how to connect, for one call.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// The URL, rendered for the call.
    pub(crate) url: String,
    /// Upgrade headers (names checked at load), the signature included.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// How long the TCP connect, TLS and the upgrade may take.
    pub(crate) connect_timeout: Duration,
}

type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
type Ws = tokio_tungstenite::WebSocketStream<Stream>;
type Connecting = Pin<Box<dyn Future<Output = Result<Ws, ConnectFailure>> + Send>>;

/// The bot's connection, in the state it is in.
pub(crate) struct Link {
    state: State,
    /// Something was queued since the last flush.
    dirty: bool,
}

enum State {
    Connecting(Connecting),
    Open(Box<Ws>),
    /// The bot's close was read (and reported); its answer is being flushed.
    Closing(Box<Ws>),
    /// Nothing more to do: closed, failed or never made.
    Done,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Connecting(_) => "connecting",
            State::Open(_) => "open",
            State::Closing(_) => "closing",
            State::Done => "done",
        };
        f.debug_struct("Link").field("state", &state).finish()
    }
}

impl Link {
    /// Starts connecting to `endpoint` (the connection is made as [`Link::next`] is polled).
    pub(crate) fn connect(endpoint: Endpoint) -> Self {
        let connecting = async move {
            match tokio::time::timeout(endpoint.connect_timeout, connect(&endpoint)).await {
                Ok(result) => result,
                Err(_) => Err(ConnectFailure {
                    kind: "timeout",
                    reason: format!("no connection within {:?}", endpoint.connect_timeout),
                }),
            }
        };
        Self {
            state: State::Connecting(Box::pin(connecting)),
            dirty: false,
        }
    }

    /// A link that will never connect (the URL could not be made).
    pub(crate) fn none() -> Self {
        Self {
            state: State::Done,
            dirty: false,
        }
    }

    /// The next event: the connection opened or failed, a message read (only when `read`),
    /// the connection ended. Flushes what was queued meanwhile. Pending forever once done.
    pub(crate) async fn next(&mut self, read: bool) -> LinkEvent {
        std::future::poll_fn(|cx| self.poll_next_event(cx, read)).await
    }

    fn poll_next_event(&mut self, cx: &mut Context<'_>, read: bool) -> Poll<LinkEvent> {
        match &mut self.state {
            State::Connecting(connecting) => {
                let result = std::task::ready!(connecting.as_mut().poll(cx));
                Poll::Ready(match result {
                    Ok(ws) => {
                        self.state = State::Open(Box::new(ws));
                        LinkEvent::Opened
                    }
                    Err(failure) => {
                        self.state = State::Done;
                        LinkEvent::Failed(failure)
                    }
                })
            }
            State::Open(ws) => {
                if self.dirty {
                    match Pin::new(&mut **ws).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.dirty = false,
                        Poll::Ready(Err(e)) => {
                            self.state = State::Done;
                            return Poll::Ready(LinkEvent::Closed(BotClosed {
                                code: None,
                                reason: format!("cannot write: {e}"),
                                close_frame: false,
                            }));
                        }
                        Poll::Pending => {}
                    }
                }
                if !read {
                    return Poll::Pending;
                }
                let frame = std::task::ready!(Pin::new(&mut **ws).poll_next(cx));
                let (message, bytes) = match frame {
                    Some(Ok(Message::Text(text))) => (parse(text.as_str()), text.len()),
                    Some(Ok(Message::Binary(data))) => (
                        BotMessage::Invalid {
                            kind: "binary",
                            message: format!("a binary frame of {} bytes", data.len()),
                        },
                        data.len(),
                    ),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = match frame {
                            Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                            None => (None, String::new()),
                        };
                        // tungstenite queued the answer: flush it while the call goes on.
                        if let State::Open(ws) = std::mem::replace(&mut self.state, State::Done) {
                            self.state = State::Closing(ws);
                            cx.waker().wake_by_ref();
                        }
                        return Poll::Ready(LinkEvent::Closed(BotClosed {
                            code,
                            reason,
                            close_frame: true,
                        }));
                    }
                    Some(Ok(_)) => {
                        // A ping (its pong is queued) or a pong: flush, then read on.
                        self.dirty = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Some(Err(e)) => {
                        self.state = State::Done;
                        return Poll::Ready(LinkEvent::Closed(BotClosed {
                            code: None,
                            reason: format!("connection error: {e}"),
                            close_frame: false,
                        }));
                    }
                    None => {
                        self.state = State::Done;
                        return Poll::Ready(LinkEvent::Closed(BotClosed {
                            code: None,
                            reason: "the connection ended without a close".into(),
                            close_frame: false,
                        }));
                    }
                };
                Poll::Ready(LinkEvent::Message { message, bytes })
            }
            State::Closing(ws) => {
                if Pin::new(&mut **ws).poll_close(cx).is_ready() {
                    self.state = State::Done;
                }
                Poll::Pending
            }
            State::Done => Poll::Pending,
        }
    }

    /// Queues a text frame for the bot (written by the next [`Link::next`], or at once when
    /// [`WRITE_BUFFER`] fills). Dropped if the link is not open. An error means the bot is
    /// gone: it stopped reading ([`OUTGOING_LIMIT`] unread), or the connection failed.
    pub(crate) fn send(&mut self, text: String) -> Result<(), BotClosed> {
        let State::Open(ws) = &mut self.state else {
            return Ok(());
        };
        match Pin::new(&mut **ws).start_send(Message::text(text)) {
            Ok(()) => {
                self.dirty = true;
                Ok(())
            }
            Err(e) => {
                self.state = State::Done;
                let reason = match e {
                    tungstenite::Error::WriteBufferFull(_) => {
                        "the bot stopped reading (10 s of audio unread)".to_owned()
                    }
                    e => format!("cannot write: {e}"),
                };
                Err(BotClosed {
                    code: None,
                    reason,
                    close_frame: false,
                })
            }
        }
    }

    /// Closes the connection (1000 `call ended`, after what was queued), waiting at most
    /// `wait` for it to be written; what was still connecting is abandoned.
    pub(crate) async fn close(&mut self, wait: Duration) {
        let mut ws = match std::mem::replace(&mut self.state, State::Done) {
            State::Open(mut ws) => {
                let frame = tungstenite::protocol::CloseFrame {
                    code: CloseCode::Normal,
                    reason: "call ended".into(),
                };
                let _ = Pin::new(&mut *ws).start_send(Message::Close(Some(frame)));
                ws
            }
            State::Closing(ws) => ws,
            State::Connecting(_) | State::Done => return,
        };
        let closing = std::future::poll_fn(|cx| Pin::new(&mut *ws).poll_close(cx));
        let _ = tokio::time::timeout(wait, closing).await;
    }
}

/// The fields of a bot message callgate reads when it is not a well-formed [`ToTwilio`]
/// (`streamSid` missing or mistyped is not checked).
#[derive(Deserialize)]
struct Loose {
    event: Option<String>,
    media: Option<LooseMedia>,
    mark: Option<LooseMark>,
}

#[derive(Deserialize)]
struct LooseMedia {
    payload: Option<String>,
}

#[derive(Deserialize)]
struct LooseMark {
    name: Option<String>,
}

/// The fields callgate reads, borrowed from the text: the fast path for the message a bot
/// sends 50 times a second (`media`), with no copy of its payload. A string with escapes
/// cannot be borrowed; such a message takes the owned path ([`parse_owned`]).
#[derive(Deserialize)]
struct Borrowed<'a> {
    #[serde(borrow)]
    event: Option<&'a str>,
    #[serde(borrow)]
    media: Option<BorrowedMedia<'a>>,
    mark: Option<LooseMark>,
}

#[derive(Deserialize)]
struct BorrowedMedia<'a> {
    #[serde(borrow)]
    payload: Option<&'a str>,
}

/// A bot message, parsed.
pub(crate) fn parse(text: &str) -> BotMessage {
    match serde_json::from_str::<Borrowed<'_>>(text) {
        Ok(m) => classify(
            m.event.unwrap_or_default(),
            m.media.and_then(|m| m.payload),
            m.mark.and_then(|m| m.name),
        ),
        Err(_) => parse_owned(text),
    }
}

/// A bot message, parsed into owned fields: Twilio's own shape first, then field by field.
fn parse_owned(text: &str) -> BotMessage {
    let (event, payload, name) = match serde_json::from_str::<ToTwilio>(text) {
        Ok(ToTwilio::Media { media, .. }) => ("media".to_owned(), Some(media.payload), None),
        Ok(ToTwilio::Mark { mark, .. }) => ("mark".to_owned(), None, Some(mark.name)),
        Ok(ToTwilio::Clear { .. }) => return BotMessage::Clear,
        Err(_) => match serde_json::from_str::<Loose>(text) {
            Ok(loose) => (
                loose.event.unwrap_or_default(),
                loose.media.and_then(|m| m.payload),
                loose.mark.and_then(|m| m.name),
            ),
            Err(e) => {
                return BotMessage::Invalid {
                    kind: "not_json",
                    message: format!("not a JSON object: {e}"),
                };
            }
        },
    };
    classify(&event, payload.as_deref(), name)
}

/// The message from its event, `media.payload` and `mark.name`.
fn classify(event: &str, payload: Option<&str>, name: Option<String>) -> BotMessage {
    match event {
        "media" => match payload.map(|p| BASE64.decode(p.as_bytes())) {
            Some(Ok(audio)) => BotMessage::Media(Bytes::from(audio)),
            Some(Err(e)) => BotMessage::Invalid {
                kind: "bad_media",
                message: format!("media.payload is not base64: {e}"),
            },
            None => BotMessage::Invalid {
                kind: "bad_media",
                message: "media without media.payload".into(),
            },
        },
        "mark" => match name {
            Some(name) if !name.is_empty() => BotMessage::Mark(name),
            _ => BotMessage::Invalid {
                kind: "bad_mark",
                message: "mark without mark.name".into(),
            },
        },
        "clear" => BotMessage::Clear,
        "" => BotMessage::Invalid {
            kind: "unknown_event",
            message: "a message without an event".into(),
        },
        other => BotMessage::Invalid {
            kind: "unknown_event",
            message: format!(
                "unknown event {:?}",
                other.chars().take(40).collect::<String>()
            ),
        },
    }
}

/// A [`ConnectFailure`] of `kind`.
fn failure(kind: &'static str) -> impl FnOnce(String) -> ConnectFailure {
    move |reason| ConnectFailure { kind, reason }
}

async fn connect(endpoint: &Endpoint) -> Result<Ws, ConnectFailure> {
    let mut request = endpoint
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| failure("url")(format!("bad url: {e}")))?;
    let uri = request.uri().clone();
    let tls = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| failure("url")("the url has no host".to_owned()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    for (name, value) in &endpoint.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| failure("url")(format!("header {name:?}: {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| failure("url")(format!("header {name}: {e}")))?;
        request.headers_mut().insert(name, value);
    }
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failure("connect")(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream: Stream = if tls {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| failure("url")(format!("bad host name {host:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(endpoint.tls.clone());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| failure("tls")(format!("TLS with {host}: {e}")))?;
        Either::Right(tls)
    } else {
        Either::Left(tcp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + OUTGOING_LIMIT)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(failure("upgrade")(format!(
            "the bot refused the upgrade: HTTP {}",
            response.status().as_u16()
        ))),
        Err(e) => Err(failure("upgrade")(format!("WebSocket upgrade failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_messages_are_read_as_twilio_reads_them() {
        let media = r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAEC"}}"#;
        assert_eq!(
            parse(media),
            BotMessage::Media(Bytes::from_static(&[0, 1, 2]))
        );
        // streamSid is not checked.
        let bare = r#"{"event":"media","media":{"payload":"AAEC"}}"#;
        assert_eq!(
            parse(bare),
            BotMessage::Media(Bytes::from_static(&[0, 1, 2]))
        );
        let mark = r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"m1"}}"#;
        assert_eq!(parse(mark), BotMessage::Mark("m1".into()));
        assert_eq!(
            parse(r#"{"event":"clear","streamSid":"MZ1"}"#),
            BotMessage::Clear
        );
        assert_eq!(parse(r#"{"event":"clear"}"#), BotMessage::Clear);
        // Escapes cannot be borrowed: the owned path reads them the same.
        assert_eq!(
            parse(r#"{"event":"media","media":{"payload":"AA\/C"}}"#),
            BotMessage::Media(Bytes::from_static(&[0, 15, 194]))
        );
        assert_eq!(
            parse(r#"{"event":"m\u0061rk","mark":{"name":"a\"b"}}"#),
            BotMessage::Mark("a\"b".into())
        );
        let kind = |text: &str| match parse(text) {
            BotMessage::Invalid { kind, .. } => kind,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(kind("nope"), "not_json");
        assert_eq!(kind(r#"{"event":"dance"}"#), "unknown_event");
        assert_eq!(kind(r#"{"streamSid":"MZ1"}"#), "unknown_event");
        assert_eq!(
            kind(r#"{"event":"media","media":{"payload":"!!"}}"#),
            "bad_media"
        );
        assert_eq!(kind(r#"{"event":"media"}"#), "bad_media");
        assert_eq!(kind(r#"{"event":"mark","mark":{}}"#), "bad_mark");
        assert_eq!(kind(r#"{"event":"mark","mark":{"name":""}}"#), "bad_mark");
    }
}
