//! WebSocket connections for phones (`ws://` and `wss://`), and a thin driver around a proto
//! phone session.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callgate_proto::{Close, Disconnect, Frame, Output, PhoneEvent, callbridge, inbound, twilio};
use futures_util::SinkExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::either::Either;

use crate::Error;

/// A phone's connection: plain TCP (`ws://`) or TLS over it (`wss://`; boxed, so plain
/// connections do not carry a TLS connection's size).
pub type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// A phone's WebSocket.
pub type Ws = WebSocketStream<Stream>;

/// Read buffer per connection: small, like the server's, so a thousand phones stay cheap.
pub const READ_BUFFER: usize = 4096;

/// How phones reach a server: `ws://`, or `wss://` trusting the certificate authorities of a
/// CA file, or the system's when there is none. Built once per run and shared by every call
/// (the root certificates are read once).
#[derive(Clone)]
pub struct Connector {
    tls: Option<TlsConnector>,
    /// The roots are the system's (an untrusted certificate then hints at a CA file).
    system_roots: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// The connector for `url`: plain for `ws://`; for `wss://`, TLS 1.3 or 1.2 (rustls on
    /// ring) trusting only the CA certificates in `ca_file` (PEM), or without one, the
    /// system's root certificates. A CA file with a `ws://` URL is an error (it would not be
    /// used), and so is a `wss://` URL with neither a CA file nor system certificates.
    pub fn for_url(url: &str, ca_file: Option<&Path>) -> Result<Self, Error> {
        let secure = match scheme(url)? {
            Scheme::Ws => false,
            Scheme::Wss => true,
        };
        if !secure {
            if let Some(path) = ca_file {
                return Err(Error::Options(format!(
                    "a CA file ({}) is for wss:// URLs; {url} is plain ws://",
                    path.display()
                )));
            }
            return Ok(Self {
                tls: None,
                system_roots: false,
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::Options(format!("TLS setup: {e}")))?;
        let config = match ca_file {
            Some(path) => builder
                .with_root_certificates(roots(path)?)
                .with_no_client_auth(),
            None => {
                let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| {
                    Error::Options(format!(
                        "{url} needs the certificate authority that signed the server's \
                         certificate, and the system's could not be used ({e}): give the CA \
                         certificate as a PEM file (callgate sim/load --ca-file FILE)"
                    ))
                })?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            }
        };
        Ok(Self {
            tls: Some(TlsConnector::from(Arc::new(config))),
            system_roots: ca_file.is_none(),
        })
    }

    /// Whether this connector speaks TLS (`wss://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// A URL's WebSocket scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Ws,
    Wss,
}

fn scheme(url: &str) -> Result<Scheme, Error> {
    let bad = |detail: &str| Error::Connect {
        url: url.to_owned(),
        detail: detail.to_owned(),
    };
    let (scheme, _) = url
        .split_once("://")
        .ok_or_else(|| bad("not a URL (write ws://HOST:PORT/ or wss://HOST:PORT/)"))?;
    match scheme.to_ascii_lowercase().as_str() {
        "ws" => Ok(Scheme::Ws),
        "wss" => Ok(Scheme::Wss),
        _ => Err(bad("the scheme must be ws:// or wss://")),
    }
}

/// The CA certificates of a PEM file, as the only roots trusted.
fn roots(path: &Path) -> Result<rustls::RootCertStore, Error> {
    let bad = |detail: String| Error::Options(format!("CA file {}: {detail}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("invalid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(roots)
}

/// Connects to a `ws://` or `wss://` URL (the `connector` made for it) with Nagle off and
/// small buffers; TCP, TLS and the upgrade together within `timeout`.
pub async fn connect(url: &str, connector: &Connector, timeout: Duration) -> Result<Ws, Error> {
    let failed = |detail: String| Error::Connect {
        url: url.to_owned(),
        detail,
    };
    match tokio::time::timeout(timeout, dial(url, connector)).await {
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(Dial::Refused(status))) => Err(Error::Refused {
            url: url.to_owned(),
            status,
        }),
        Ok(Err(Dial::Failed(detail))) => Err(failed(detail)),
        Err(_) => Err(failed(format!("no answer within {timeout:?}"))),
    }
}

/// Why a dial failed.
enum Dial {
    /// The server answered the upgrade with this HTTP status.
    Refused(u16),
    /// Anything else.
    Failed(String),
}

impl From<String> for Dial {
    fn from(detail: String) -> Self {
        Self::Failed(detail)
    }
}

impl From<&str> for Dial {
    fn from(detail: &str) -> Self {
        Self::Failed(detail.to_owned())
    }
}

async fn dial(url: &str, connector: &Connector) -> Result<Ws, Dial> {
    let secure = scheme(url).map_err(|e| e.to_string())? == Scheme::Wss;
    let request = url.into_client_request().map_err(|e| e.to_string())?;
    let uri = request.uri();
    let host = uri.host().ok_or("the URL has no host")?;
    // `[::1]` in a URL is the address `::1`.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let stream = match (&connector.tls, secure) {
        (None, false) => Either::Left(tcp),
        (Some(tls), true) => {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))?;
            let tls = tls.connect(name, tcp).await.map_err(|e| {
                let untrusted = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
                let hint = if untrusted && connector.system_roots {
                    " (checked against the system's certificate authorities: for a private \
                     CA, give its certificate as a PEM file with --ca-file)"
                } else {
                    ""
                };
                format!("TLS handshake failed: {e}{hint}")
            })?;
            Either::Right(Box::new(tls))
        }
        (None, true) => return Err("a wss:// URL needs a TLS connector".into()),
        (Some(_), false) => return Err("a ws:// URL with a TLS connector".into()),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| match e {
            WsError::Http(response) => Dial::Refused(response.status().as_u16()),
            other => Dial::Failed(other.to_string()),
        })?;
    Ok(ws)
}

/// Any protocol's phone side.
#[derive(Debug)]
pub enum Phone {
    /// A CallBridge phone.
    CallBridge(callbridge::Phone),
    /// An inbound-gateway phone.
    Inbound(inbound::Phone),
    /// Twilio Media Streams (callgate sees us as Twilio).
    Twilio(twilio::Phone),
}

impl Phone {
    /// Feeds a message from the server.
    pub fn handle(&mut self, message: Message) {
        match (self, message) {
            (Self::CallBridge(p), Message::Text(t)) => p.handle_text(&t),
            (Self::Inbound(p), Message::Text(t)) => p.handle_text(&t),
            (Self::Twilio(p), Message::Text(t)) => p.handle_text(&t),
            (Self::Twilio(p), Message::Binary(b)) => p.handle_binary(b),
            (Self::Twilio(p), Message::Close(_)) => p.handle_peer_close(Disconnect::Closed),
            (Self::CallBridge(p), Message::Binary(b)) => p.handle_binary(b),
            (Self::Inbound(p), Message::Binary(b)) => p.handle_binary(b),
            (Self::CallBridge(p), Message::Close(_)) => p.handle_peer_close(Disconnect::Closed),
            (Self::Inbound(p), Message::Close(_)) => p.handle_peer_close(Disconnect::Closed),
            _ => {}
        }
    }

    /// The connection dropped.
    pub fn dropped(&mut self) {
        match self {
            Self::CallBridge(p) => p.handle_peer_close(Disconnect::Dropped),
            Self::Inbound(p) => p.handle_peer_close(Disconnect::Dropped),
            Self::Twilio(p) => p.handle_peer_close(Disconnect::Dropped),
        }
    }

    /// Queues caller audio.
    pub fn send_audio(&mut self, data: Bytes) {
        match self {
            Self::CallBridge(p) => p.send_audio(data),
            Self::Inbound(p) => p.send_audio(data),
            Self::Twilio(p) => p.send_audio(data),
        }
    }

    /// The caller hangs up (CallBridge: close 1000; inbound: `hangup`, socket kept for the CDR;
    /// Twilio: `stop`, then close 1000).
    pub fn hangup(&mut self) {
        match self {
            Self::CallBridge(p) => p.hangup(),
            Self::Inbound(p) => p.hangup(),
            Self::Twilio(p) => p.hangup(),
        }
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output<PhoneEvent>> {
        match self {
            Self::CallBridge(p) => p.poll_output(),
            Self::Inbound(p) => p.poll_output(),
            Self::Twilio(p) => p.poll_output(),
        }
    }
}

/// The `start` a simulated Twilio stream sends: `callSid` is `call_id`; `streamSid` is `MZ`
/// and 32 hex digits derived from it; the numbers go in `customParameters` as `from` and `to`
/// (with `extra` parameters after them).
pub fn twilio_start(
    call_id: &str,
    caller: &str,
    callee: &str,
    extra: &[(String, String)],
) -> twilio::Start {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    call_id.hash(&mut h);
    let a = h.finish();
    a.hash(&mut h);
    let stream_sid = format!("MZ{a:016x}{:016x}", h.finish());
    let mut custom_parameters = std::collections::BTreeMap::new();
    custom_parameters.insert("from".to_owned(), caller.to_owned());
    custom_parameters.insert("to".to_owned(), callee.to_owned());
    custom_parameters.extend(extra.iter().cloned());
    twilio::Start {
        info: twilio::StartInfo {
            stream_sid: stream_sid.clone(),
            account_sid: "AC00000000000000000000000000000000".to_owned(),
            call_sid: call_id.to_owned(),
            tracks: vec!["inbound".to_owned()],
            custom_parameters,
            media_format: twilio::MediaFormat::default(),
        },
    }
}

/// What carrying out a phone's outputs produced.
#[derive(Debug, Default)]
pub struct Drained {
    /// Events for the owner.
    pub events: Vec<PhoneEvent>,
    /// We sent a close frame.
    pub closed: bool,
}

/// Sends the phone's queued frames and returns its events.
pub async fn drain(phone: &mut Phone, ws: &mut Ws) -> Result<Drained, Error> {
    let mut drained = Drained::default();
    while let Some(output) = phone.poll_output() {
        match output {
            Output::Send(frame) => send(ws, frame).await?,
            Output::Close(close) => {
                send_close(ws, close).await;
                drained.closed = true;
            }
            Output::Event(e) => drained.events.push(e),
        }
    }
    Ok(drained)
}

/// Sends one frame.
pub async fn send(ws: &mut Ws, frame: Frame) -> Result<(), Error> {
    let message = match frame {
        Frame::Text(t) => Message::Text(t.into()),
        Frame::Binary(b) => Message::Binary(b),
    };
    ws.send(message)
        .await
        .map_err(|e| Error::WebSocket(e.to_string()))
}

/// Sends a close frame (errors ignored: the peer may be gone already).
pub async fn send_close(ws: &mut Ws, close: Close) {
    let frame = CloseFrame {
        code: close.code.0.into(),
        reason: close.reason.into(),
    };
    let _ = ws.close(Some(frame)).await;
}

/// A close frame's code and reason, from a received message.
pub fn close_of(message: &Message) -> Option<(u16, String)> {
    match message {
        Message::Close(Some(f)) => Some((f.code.into(), f.reason.to_string())),
        Message::Close(None) => Some((1005, String::new())),
        _ => None,
    }
}

/// Whether a read error is just the connection ending.
pub fn is_disconnect(error: &WsError) -> bool {
    matches!(
        error,
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) | WsError::Protocol(_)
    )
}
