//! Why a call ended: a closed set of stable codes, stored in records and used as metric labels.

use std::fmt;

use crate::CloseCode;

/// Who ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HangupBy {
    /// The phone side (caller hung up, gateway closed or misbehaved).
    Peer,
    /// The agent handling the call.
    Agent,
    /// An operator, through the admin API.
    Operator,
    /// callgate itself (shutdown, crash recovery, internal failure).
    Server,
}

impl HangupBy {
    /// The stable code stored in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::Agent => "agent",
            Self::Operator => "operator",
            Self::Server => "server",
        }
    }
}

/// Why a call ended. The codes (`as_str`) are stable: they are stored in records and used as
/// metric labels, and `docs/specs/end-reasons.md` lists them. Never rename one; add new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The phone side sent `hangup` (inbound) or a CDR before any hangup, or `stop` (Twilio).
    PeerHangup,
    /// The phone side closed the WebSocket with a close frame (the normal CallBridge end).
    PeerClosed,
    /// The connection dropped without a close frame (TCP reset, network loss).
    PeerDisconnected,
    /// The phone side broke the protocol badly enough that the call could not go on.
    ProtocolError,
    /// Writing to the phone side timed out: it stopped reading.
    SendTimeout,
    /// The agent hung up.
    AgentHangup,
    /// The agent failed (returned an error or panicked).
    AgentFailed,
    /// An operator hung up through the admin API.
    OperatorHangup,
    /// The server shut down while the call was live.
    ServerShutdown,
    /// The server died while the call was live; the record was closed at the next start.
    Interrupted,
    /// callgate itself failed while handling the call (a bug: please report it).
    InternalError,
    /// No route matched the call and there is no default route: it was refused unanswered.
    NoRoute,
}

impl EndReason {
    /// Every reason, for documentation and metric pre-registration.
    pub const ALL: [Self; 12] = [
        Self::PeerHangup,
        Self::PeerClosed,
        Self::PeerDisconnected,
        Self::ProtocolError,
        Self::SendTimeout,
        Self::AgentHangup,
        Self::AgentFailed,
        Self::OperatorHangup,
        Self::ServerShutdown,
        Self::Interrupted,
        Self::InternalError,
        Self::NoRoute,
    ];

    /// The stable snake_case code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerHangup => "peer_hangup",
            Self::PeerClosed => "peer_closed",
            Self::PeerDisconnected => "peer_disconnected",
            Self::ProtocolError => "protocol_error",
            Self::SendTimeout => "send_timeout",
            Self::AgentHangup => "agent_hangup",
            Self::AgentFailed => "agent_failed",
            Self::OperatorHangup => "operator_hangup",
            Self::ServerShutdown => "server_shutdown",
            Self::Interrupted => "interrupted",
            Self::InternalError => "internal_error",
            Self::NoRoute => "no_route",
        }
    }

    /// Who ended the call.
    pub fn hangup_by(self) -> HangupBy {
        match self {
            Self::PeerHangup
            | Self::PeerClosed
            | Self::PeerDisconnected
            | Self::ProtocolError
            | Self::SendTimeout => HangupBy::Peer,
            Self::AgentHangup => HangupBy::Agent,
            Self::OperatorHangup => HangupBy::Operator,
            Self::AgentFailed
            | Self::ServerShutdown
            | Self::Interrupted
            | Self::InternalError
            | Self::NoRoute => HangupBy::Server,
        }
    }

    /// The close code a server session sends when it ends the call for this reason.
    pub(crate) fn close_code(self) -> CloseCode {
        match self {
            Self::ServerShutdown => CloseCode::GOING_AWAY,
            Self::AgentFailed | Self::InternalError => CloseCode::INTERNAL,
            Self::NoRoute => CloseCode::POLICY,
            _ => CloseCode::NORMAL,
        }
    }

    /// The close reason a server session sends when it ends the call for this reason.
    pub(crate) fn close_reason(self) -> &'static str {
        match self {
            Self::AgentHangup => "call ended by agent",
            Self::OperatorHangup => "call ended by operator",
            Self::ServerShutdown => "server shutting down",
            Self::AgentFailed => "agent failed",
            Self::InternalError => "internal error",
            Self::NoRoute => "no route for this call",
            _ => "call ended",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
