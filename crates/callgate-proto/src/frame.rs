//! WebSocket-level values, independent of any WebSocket library.

use bytes::Bytes;

/// One WebSocket data message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text message (JSON signalling in both protocols).
    Text(String),
    /// A binary message (raw audio in both protocols).
    Binary(Bytes),
}

/// A WebSocket close status code (RFC 6455 §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the call ended normally.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the server is shutting down.
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: the peer broke the protocol (missing or mistyped field).
    pub const PROTOCOL: Self = Self(1002);
    /// 1003: the peer sent data we cannot accept (e.g. an unsupported audio format).
    pub const UNSUPPORTED: Self = Self(1003);
    /// 1007: the payload is not what its type promises (e.g. text that is not JSON).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: a policy was violated (unknown first message, timeout, binary before start).
    pub const POLICY: Self = Self(1008);
    /// 1009: a message exceeded the maximum size.
    pub const TOO_BIG: Self = Self(1009);
    /// 1011: the server failed (e.g. the agent crashed).
    pub const INTERNAL: Self = Self(1011);
    /// 1013: try again later (the call limit is reached).
    pub const TRY_AGAIN_LATER: Self = Self(1013);
}

/// A close frame to send: code and a human-readable reason naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The status code.
    pub code: CloseCode,
    /// The reason; at most 123 bytes on the wire (RFC 6455), see [`Close::new`].
    pub reason: String,
}

impl Close {
    /// Builds a close frame, truncating the reason on a character boundary to the 123 bytes a
    /// close frame can carry.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > 123 {
            let mut end = 123;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Self { code, reason }
    }
}

/// Generic output of a sans-IO session: drained with `poll_output` after every `handle_*` call.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<E> {
    /// Send this message to the peer.
    Send(Frame),
    /// Send this close frame; the session is over and produces nothing after it.
    Close(Close),
    /// Something happened that the owner (record, agent, metrics) must know.
    Event(E),
}
