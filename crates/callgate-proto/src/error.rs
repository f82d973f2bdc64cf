//! What the phone side (or an agent) can get wrong, and the close code each mistake earns.

use crate::Protocol;
use crate::frame::CloseCode;

/// A protocol error. Fatal before the call starts (the connection is closed with
/// [`Error::close_code`] and the message as reason); recorded and survived once the call is live,
/// except [`Error::MessageTooBig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A text message is not valid JSON.
    #[error("invalid JSON: {detail}")]
    InvalidJson {
        /// What the JSON parser said.
        detail: String,
    },
    /// The first message is neither a CallBridge start nor an inbound `incoming_call`.
    #[error(
        "unrecognized first message: expected a CallBridge call_config or an inbound incoming_call event"
    )]
    UnrecognizedMessage,
    /// A required field is absent.
    #[error("missing {field}")]
    MissingField {
        /// The field's path, e.g. `call_config.cdrId`.
        field: String,
    },
    /// A field has the wrong JSON type.
    #[error("{field} must be {expected}")]
    WrongType {
        /// The field's path.
        field: String,
        /// What it must be, e.g. "a string".
        expected: &'static str,
    },
    /// An audio format name that callgate does not support.
    #[error("unsupported {field}: {value:?}")]
    UnsupportedFormat {
        /// The field's path, e.g. `audio_format.phone_output_audio_format`.
        field: String,
        /// The value as sent.
        value: String,
    },
    /// Audio (a binary message) arrived before the start message.
    #[error("binary message before the start message")]
    BinaryBeforeStart,
    /// The start message did not arrive in time.
    #[error("no start message within {ms} ms")]
    HandshakeTimeout {
        /// The limit that ran out.
        ms: u64,
    },
    /// A message exceeded the configured maximum size.
    #[error("message exceeds the maximum size of {max} bytes")]
    MessageTooBig {
        /// The maximum, in bytes.
        max: usize,
    },
    /// The URL path forces one protocol and the first message belongs to another.
    #[error("this endpoint speaks {expected}, got a {got} message")]
    ProtocolMismatch {
        /// The protocol the path forces.
        expected: Protocol,
        /// The protocol the message belongs to.
        got: Protocol,
    },
    /// An inbound event we do not know.
    #[error("unknown event {event:?}")]
    UnknownEvent {
        /// The event name as sent.
        event: String,
    },
    /// A message that is valid but not allowed now (e.g. a second `incoming_call`).
    #[error("unexpected {what}")]
    UnexpectedMessage {
        /// What arrived.
        what: String,
    },
    /// A DTMF digit outside the allowed set.
    #[error("invalid DTMF digit {value:?}")]
    InvalidDigit {
        /// The digit as sent.
        value: String,
    },
    /// A DTMF duration outside 1..=1000 ms.
    #[error("invalid DTMF duration {value} (must be 1..=1000 ms)")]
    InvalidDuration {
        /// The duration as given.
        value: String,
    },
    /// The protocol has no such operation (e.g. DTMF on CallBridge).
    #[error("{operation} is not supported by the {protocol} protocol")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
        /// The call's protocol.
        protocol: Protocol,
    },
    /// The call is not in a state that allows the operation (e.g. DTMF after hangup).
    #[error("{operation} is not possible: the call is {state}")]
    InvalidState {
        /// What was asked.
        operation: &'static str,
        /// The call's state.
        state: &'static str,
    },
}

impl Error {
    /// The WebSocket close code this error earns when it ends a connection.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::InvalidJson { .. } => CloseCode::INVALID_PAYLOAD,
            Self::MissingField { .. } | Self::WrongType { .. } | Self::InvalidDigit { .. } => {
                CloseCode::PROTOCOL
            }
            Self::InvalidDuration { .. } => CloseCode::PROTOCOL,
            Self::UnsupportedFormat { .. } | Self::Unsupported { .. } => CloseCode::UNSUPPORTED,
            Self::MessageTooBig { .. } => CloseCode::TOO_BIG,
            Self::UnrecognizedMessage
            | Self::BinaryBeforeStart
            | Self::HandshakeTimeout { .. }
            | Self::ProtocolMismatch { .. }
            | Self::UnknownEvent { .. }
            | Self::UnexpectedMessage { .. }
            | Self::InvalidState { .. } => CloseCode::POLICY,
        }
    }

    /// A stable snake_case kind, used as a metric label and in event logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidJson { .. } => "invalid_json",
            Self::UnrecognizedMessage => "unrecognized_message",
            Self::MissingField { .. } => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::UnsupportedFormat { .. } => "unsupported_format",
            Self::BinaryBeforeStart => "binary_before_start",
            Self::HandshakeTimeout { .. } => "handshake_timeout",
            Self::MessageTooBig { .. } => "message_too_big",
            Self::ProtocolMismatch { .. } => "protocol_mismatch",
            Self::UnknownEvent { .. } => "unknown_event",
            Self::UnexpectedMessage { .. } => "unexpected_message",
            Self::InvalidDigit { .. } => "invalid_digit",
            Self::InvalidDuration { .. } => "invalid_duration",
            Self::Unsupported { .. } => "unsupported",
            Self::InvalidState { .. } => "invalid_state",
        }
    }
}
