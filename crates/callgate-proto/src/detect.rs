//! Which protocol a connection speaks, from its first text message: a pure function for the
//! protocols whose call starts with one message, and [`Handshake`] for all three (Twilio's call
//! starts with its second message, `start`, after `connected`).

use std::fmt;

use crate::json;
use crate::{Error, callbridge, inbound, twilio};

/// A phone-side protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Blumn AI's CallBridge.
    CallBridge,
    /// The inbound-call WebSocket API.
    Inbound,
    /// Twilio Media Streams (bidirectional), callgate as the bot.
    Twilio,
}

impl Protocol {
    /// The stable name used in records, metrics and URL paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallBridge => "callbridge",
            Self::Inbound => "inbound",
            Self::Twilio => "twilio",
        }
    }

    /// Every protocol.
    pub const ALL: [Self; 3] = [Self::CallBridge, Self::Inbound, Self::Twilio];

    /// The protocol of a stable name (`callbridge`, `inbound`, `twilio`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The protocol a URL path forces: `/callbridge`, `/inbound` and `/twilio`; any other path
    /// detects.
    pub fn from_path(path: &str) -> Option<Self> {
        match path.trim_end_matches('/') {
            "/callbridge" => Some(Self::CallBridge),
            "/inbound" => Some(Self::Inbound),
            "/twilio" => Some(Self::Twilio),
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
    /// A Twilio `start` (after `connected`).
    Twilio(twilio::Start),
}

impl Start {
    /// The protocol this message belongs to.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::CallBridge(_) => Protocol::CallBridge,
            Self::Inbound(_) => Protocol::Inbound,
            Self::Twilio(_) => Protocol::Twilio,
        }
    }
}

/// The messages before a call starts, whatever the protocol: feed each text message to
/// [`Handshake::handle_text`] until it gives the start (CallBridge and inbound: the first
/// message; Twilio: `start`, after `connected`) or an error to close with.
#[derive(Debug, Clone)]
pub struct Handshake {
    forced: Option<Protocol>,
    /// Twilio's `connected` came: the next message must be `start`.
    twilio: bool,
}

impl Handshake {
    /// A connection whose URL path forces `forced` (see [`Protocol::from_path`]).
    pub fn new(forced: Option<Protocol>) -> Self {
        Self {
            forced,
            twilio: false,
        }
    }

    /// Whether Twilio's `connected` came and `start` is awaited.
    pub fn awaits_twilio_start(&self) -> bool {
        self.twilio
    }

    /// One text message: `Ok(Some(start))` once the call's start is in, `Ok(None)` when another
    /// message is needed (after Twilio's `connected`), or the error to close with.
    pub fn handle_text(&mut self, text: &str) -> Result<Option<Start>, Error> {
        if self.twilio {
            let map = json::raw_map(text, "message")?;
            return match json::string(&map, "event", "event")?.as_str() {
                "start" => twilio::Start::from_map(&map).map(|s| Some(Start::Twilio(s))),
                "connected" => Err(Error::UnexpectedMessage {
                    what: "second connected".into(),
                }),
                other => Err(Error::UnexpectedMessage {
                    what: format!("event {other:?} before start"),
                }),
            };
        }
        let map = json::raw_map(text, "message")?;
        let event = json::string(&map, "event", "event").ok();
        if twilio::is_connected(event.as_deref()) {
            return match self.forced {
                None | Some(Protocol::Twilio) => {
                    self.twilio = true;
                    Ok(None)
                }
                Some(expected) => Err(Error::ProtocolMismatch {
                    expected,
                    got: Protocol::Twilio,
                }),
            };
        }
        if self.forced == Some(Protocol::Twilio) {
            let got = if map.contains_key("call_config") {
                Some(Protocol::CallBridge)
            } else if event.as_deref() == Some("incoming_call") {
                Some(Protocol::Inbound)
            } else {
                None
            };
            return Err(match (got, event) {
                (Some(got), _) => Error::ProtocolMismatch {
                    expected: Protocol::Twilio,
                    got,
                },
                (None, Some(event)) => Error::UnexpectedMessage {
                    what: format!("event {event:?} before connected"),
                },
                (None, None) => json::string(&map, "event", "event")
                    .err()
                    .unwrap_or(Error::UnrecognizedMessage),
            });
        }
        first_message(text, self.forced).map(Some)
    }
}

/// Detects the protocol of a first message and parses it: the protocols whose call starts with
/// one message. Twilio's `connected` is [`Error::UnexpectedMessage`] here: use [`Handshake`].
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
        (Some(Protocol::Twilio), _) | (None, Some(Protocol::Twilio)) => {
            Err(Error::UnexpectedMessage {
                what: "Twilio stream: the call starts with start, after connected".into(),
            })
        }
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
    fn twilio_handshake_takes_connected_then_start() {
        let start = r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1","start":{"streamSid":"MZ1","accountSid":"AC1","callSid":"CA1","tracks":["inbound"],"customParameters":{"from":"+1415"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;
        let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
        let mut h = Handshake::new(None);
        assert_eq!(h.handle_text(connected), Ok(None));
        assert!(h.awaits_twilio_start());
        let Ok(Some(Start::Twilio(s))) = h.handle_text(start) else {
            panic!("a twilio start");
        };
        assert_eq!(s.info.call_sid, "CA1");
        assert_eq!(s.caller(), "+1415");
        assert_eq!(s.callee(), "");
        let mut h = Handshake::new(Some(Protocol::Inbound));
        assert_eq!(
            h.handle_text(connected),
            Err(Error::ProtocolMismatch {
                expected: Protocol::Inbound,
                got: Protocol::Twilio
            })
        );
        let mut h = Handshake::new(Some(Protocol::Twilio));
        assert_eq!(
            h.handle_text(r#"{"event":"incoming_call"}"#),
            Err(Error::ProtocolMismatch {
                expected: Protocol::Twilio,
                got: Protocol::Inbound
            })
        );
        assert_eq!(
            Handshake::new(Some(Protocol::Twilio)).handle_text(r#"{"event":"media"}"#),
            Err(Error::UnexpectedMessage {
                what: r#"event "media" before connected"#.into()
            })
        );
        let mut h = Handshake::new(None);
        h.handle_text(connected).unwrap();
        assert_eq!(
            h.handle_text(r#"{"event":"media"}"#)
                .unwrap_err()
                .close_code(),
            crate::CloseCode::POLICY
        );
        let mut h = Handshake::new(None);
        assert!(h.handle_text(start).is_err(), "start before connected");
    }

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
