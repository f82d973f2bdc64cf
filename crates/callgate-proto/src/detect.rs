//! Which protocol a connection speaks, from its first text message. A pure function.

use std::fmt;

use crate::json;
use crate::{Error, callbridge, inbound};

/// A phone-side protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Blumn AI's CallBridge.
    CallBridge,
    /// The inbound-call WebSocket API.
    Inbound,
}

impl Protocol {
    /// The stable name used in records, metrics and URL paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallBridge => "callbridge",
            Self::Inbound => "inbound",
        }
    }

    /// The protocol a URL path forces: `/callbridge` and `/inbound`; any other path detects.
    pub fn from_path(path: &str) -> Option<Self> {
        match path.trim_end_matches('/') {
            "/callbridge" => Some(Self::CallBridge),
            "/inbound" => Some(Self::Inbound),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A CallBridge session start.
    CallBridge(callbridge::Start),
    /// An inbound `incoming_call`.
    Inbound(inbound::IncomingCall),
}

impl Start {
    /// The protocol this message belongs to.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::CallBridge(_) => Protocol::CallBridge,
            Self::Inbound(_) => Protocol::Inbound,
        }
    }
}

/// Detects the protocol of a first message and parses it.
///
/// A message with `call_config` is CallBridge; one with `"event":"incoming_call"` is inbound.
/// `forced` (from the URL path) makes a message of the other protocol a
/// [`Error::ProtocolMismatch`] and gives precise errors for a malformed message of its own.
pub fn first_message(text: &str, forced: Option<Protocol>) -> Result<Start, Error> {
    let map = json::raw_map(text, "message")?;
    let event = json::string(&map, "event", "event").ok();
    let looks_like = if map.contains_key("call_config") {
        Some(Protocol::CallBridge)
    } else if event.as_deref() == Some("incoming_call") {
        Some(Protocol::Inbound)
    } else {
        None
    };
    match (looks_like, forced) {
        (Some(got), Some(expected)) if got != expected => {
            Err(Error::ProtocolMismatch { expected, got })
        }
        (Some(Protocol::CallBridge), _) | (None, Some(Protocol::CallBridge)) => {
            callbridge::Start::from_map(&map).map(Start::CallBridge)
        }
        (Some(Protocol::Inbound), _) => inbound::IncomingCall::from_map(&map).map(Start::Inbound),
        (None, Some(Protocol::Inbound)) => match event {
            Some(event) => Err(Error::UnexpectedMessage {
                what: format!("event {event:?} before incoming_call"),
            }),
            None => json::string(&map, "event", "event").and(Err(Error::UnrecognizedMessage)),
        },
        (None, None) => match event {
            Some(event) => Err(Error::UnexpectedMessage {
                what: format!("event {event:?} before incoming_call"),
            }),
            None => Err(Error::UnrecognizedMessage),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_force_protocols() {
        assert_eq!(
            Protocol::from_path("/callbridge"),
            Some(Protocol::CallBridge)
        );
        assert_eq!(Protocol::from_path("/inbound/"), Some(Protocol::Inbound));
        assert_eq!(Protocol::from_path("/"), None);
        assert_eq!(Protocol::from_path("/tenant/42/agent"), None);
    }

    #[test]
    fn detection_and_errors() {
        let inbound = r#"{"event":"incoming_call","callerId":"1","didNumber":"2","sessionId":"s"}"#;
        assert_eq!(
            first_message(inbound, None).unwrap().protocol(),
            Protocol::Inbound
        );
        assert_eq!(
            first_message(inbound, Some(Protocol::CallBridge)),
            Err(Error::ProtocolMismatch {
                expected: Protocol::CallBridge,
                got: Protocol::Inbound
            })
        );
        assert_eq!(
            first_message("{}", Some(Protocol::CallBridge)),
            Err(Error::MissingField {
                field: "call_config".into()
            })
        );
        assert_eq!(
            first_message("{}", Some(Protocol::Inbound)),
            Err(Error::MissingField {
                field: "event".into()
            })
        );
        assert_eq!(first_message("{}", None), Err(Error::UnrecognizedMessage));
        assert!(matches!(
            first_message("not json", None),
            Err(Error::InvalidJson { .. })
        ));
        assert!(matches!(
            first_message("[1]", None),
            Err(Error::WrongType { .. })
        ));
    }
}
