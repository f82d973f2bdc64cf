//! The connection to the bot, on a task of its own: it connects (TCP, TLS for `wss://`, the
//! upgrade with the route's headers and `X-Twilio-Signature`), reads the bot's socket
//! continuously, turning each frame into a [`BotMessage`] (JSON parsed, audio base64-decoded
//! here, off the call task), and writes the text the core made.
//!
//! Channels: toward the agent, [`EVENTS`] deep; policy when full: the bot's socket is not read
//! further (TCP pushes back) while the caller's audio is still written to it; the agent stops
//! taking events only while 120 s of the bot's audio wait for the playout. From the agent, [`OUTGOING`] deep; policy when
//! full: the agent treats the bot as dropped (it has not read 10 s of the caller's audio).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::either::Either;

use crate::core::{BotClosed, BotMessage};
use callgate_proto::twilio::ToTwilio;

/// Events from the connection toward the agent (see the module docs for the policy).
pub(crate) const EVENTS: usize = 64;
/// Messages toward the bot: 500 is 10 s of 20 ms caller frames.
pub(crate) const OUTGOING: usize = 500;
/// The largest message accepted from the bot (a minute of audio in one `media` is ~640 kB).
const MAX_MESSAGE: usize = 4 << 20;
/// The longest one write to the bot may take.
const WRITE_LIMIT: Duration = Duration::from_secs(5);

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
    Failed(String),
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

/// Runs the connection until it ends or `outgoing` closes (then it closes with 1000).
pub(crate) async fn run(
    endpoint: Endpoint,
    mut outgoing: mpsc::Receiver<String>,
    events: mpsc::Sender<LinkEvent>,
) {
    let attempt = tokio::time::timeout(endpoint.connect_timeout, connect(&endpoint)).await;
    let ws = match attempt {
        Ok(Ok(ws)) => ws,
        Ok(Err(reason)) => {
            let _ = events.send(LinkEvent::Failed(reason)).await;
            return;
        }
        Err(_) => {
            let reason = format!("no connection within {:?}", endpoint.connect_timeout);
            let _ = events.send(LinkEvent::Failed(reason)).await;
            return;
        }
    };
    if events.send(LinkEvent::Opened).await.is_err() {
        return;
    }
    let (mut sink, mut stream) = ws.split();
    // A message read but not yet taken by the agent: the socket is not read further until it
    // is (TCP pushes back), while the caller's audio keeps being written.
    let mut pending: Option<LinkEvent> = None;
    let closed = loop {
        tokio::select! {
            permit = events.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else { return };
                if let Some(event) = pending.take() {
                    permit.send(event);
                }
            }
            frame = stream.next(), if pending.is_none() => {
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
                        break BotClosed { code, reason, close_frame: true };
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break BotClosed {
                        code: None,
                        reason: format!("connection error: {e}"),
                        close_frame: false,
                    },
                    None => break BotClosed {
                        code: None,
                        reason: "the connection ended without a close".into(),
                        close_frame: false,
                    },
                };
                pending = Some(LinkEvent::Message { message, bytes });
            }
            text = outgoing.recv() => {
                let Some(text) = text else {
                    let close = Message::Close(Some(tungstenite::protocol::CloseFrame {
                        code: CloseCode::Normal,
                        reason: "call ended".into(),
                    }));
                    let _ = tokio::time::timeout(WRITE_LIMIT, sink.send(close)).await;
                    return;
                };
                match tokio::time::timeout(WRITE_LIMIT, sink.send(Message::text(text))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break BotClosed {
                        code: None,
                        reason: format!("cannot write: {e}"),
                        close_frame: false,
                    },
                    Err(_) => break BotClosed {
                        code: None,
                        reason: format!("a write to the bot took more than {WRITE_LIMIT:?}"),
                        close_frame: false,
                    },
                }
            }
        }
    };
    // Answer the bot's close (or end ours) on the wire, bounded, before reporting.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    if let Some(event) = pending
        && events.send(event).await.is_err()
    {
        return;
    }
    let _ = events.send(LinkEvent::Closed(closed)).await;
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

/// A bot message, parsed.
pub(crate) fn parse(text: &str) -> BotMessage {
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
    match event.as_str() {
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

type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

async fn connect(
    endpoint: &Endpoint,
) -> Result<tokio_tungstenite::WebSocketStream<Stream>, String> {
    let mut request = endpoint
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad url: {e}"))?;
    let uri = request.uri().clone();
    let tls = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| "the url has no host".to_owned())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    for (name, value) in &endpoint.headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name:?}: {e}"))?;
        let value = HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?;
        request.headers_mut().insert(name, value);
    }
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream: Stream = if tls {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("bad host name {host:?}: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(endpoint.tls.clone());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        Either::Right(tls)
    } else {
        Either::Left(tcp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(format!(
            "the bot refused the upgrade: HTTP {}",
            response.status().as_u16()
        )),
        Err(e) => Err(format!("WebSocket upgrade failed: {e}")),
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
