//! WebSocket connections for phones, and a thin driver around a proto phone session.

use std::time::Duration;

use bytes::Bytes;
use callgate_proto::{Close, Disconnect, Frame, Output, PhoneEvent, callbridge, inbound};
use futures_util::SinkExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Error;

/// A phone's WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Read buffer per connection: small, like the server's, so a thousand phones stay cheap.
pub const READ_BUFFER: usize = 4096;

/// Connects to a `ws://` URL with Nagle off and small buffers.
pub async fn connect(url: &str, timeout: Duration) -> Result<Ws, Error> {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20));
    let attempt = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(Error::Connect {
            url: url.to_owned(),
            detail: e.to_string(),
        }),
        Err(_) => Err(Error::Connect {
            url: url.to_owned(),
            detail: format!("no answer within {timeout:?}"),
        }),
    }
}

/// Either protocol's phone side.
#[derive(Debug)]
pub enum Phone {
    /// A CallBridge phone.
    CallBridge(callbridge::Phone),
    /// An inbound-gateway phone.
    Inbound(inbound::Phone),
}

impl Phone {
    /// Feeds a message from the server.
    pub fn handle(&mut self, message: Message) {
        match (self, message) {
            (Self::CallBridge(p), Message::Text(t)) => p.handle_text(&t),
            (Self::Inbound(p), Message::Text(t)) => p.handle_text(&t),
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
        }
    }

    /// Queues caller audio.
    pub fn send_audio(&mut self, data: Bytes) {
        match self {
            Self::CallBridge(p) => p.send_audio(data),
            Self::Inbound(p) => p.send_audio(data),
        }
    }

    /// The caller hangs up (CallBridge: close 1000; inbound: `hangup`, socket kept for the CDR).
    pub fn hangup(&mut self) {
        match self {
            Self::CallBridge(p) => p.hangup(),
            Self::Inbound(p) => p.hangup(),
        }
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output<PhoneEvent>> {
        match self {
            Self::CallBridge(p) => p.poll_output(),
            Self::Inbound(p) => p.poll_output(),
        }
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
