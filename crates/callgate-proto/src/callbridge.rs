//! The CallBridge agent-session protocol (`docs/specs/protocols.md`).
//!
//! CallBridge connects, sends one start message (`call_config` + `audio_format`), we reply
//! `started`, then raw audio flows both ways as binary messages until either side closes. No
//! other message is defined: any other text is kept as an unknown event, never fatal.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use crate::call::{CallEvent, Command, Disconnect, PhoneCore, PhoneEvent};
use crate::json::{self, RawMap};
use crate::{AudioFormat, Close, CloseCode, EndReason, Error, Frame, Output, Protocol};

/// The `call_config` object. Every field is an opaque string, kept exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallConfig {
    /// Site (tenant) ID.
    pub site_id: String,
    /// Calling party number.
    pub caller: String,
    /// Called party number.
    pub callee: String,
    /// The call's CDR ID in CallBridge (our external ID).
    pub cdr_id: String,
    /// PBX channel ID of the connected call.
    pub call_action_id: String,
    /// CallBridge telephony server, `IP:Port`.
    pub ivr_ip: String,
    /// Which agent should handle the call.
    pub agent_id: String,
    /// Agent type.
    pub agent_type: String,
}

/// The two audio formats of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFormats {
    /// What the phone side sends us (the caller's voice).
    pub phone_output: AudioFormat,
    /// What we send the phone side (what the caller hears).
    pub phone_input: AudioFormat,
}

impl Default for AudioFormats {
    fn default() -> Self {
        Self {
            phone_output: AudioFormat::Pcm8000,
            phone_input: AudioFormat::Pcm8000,
        }
    }
}

impl AudioFormats {
    /// The `audio_format` object as JSON.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"phone_output_audio_format":"{}","phone_input_audio_format":"{}"}}"#,
            self.phone_output, self.phone_input
        )
    }
}

/// The session-start message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The call's configuration.
    pub call_config: CallConfig,
    /// The audio formats (defaults filled in).
    pub audio_format: AudioFormats,
    /// The `call_config` object's exact text, echoed back in `started`.
    raw_call_config: String,
}

impl Start {
    /// Builds a start message to send (phone side).
    pub fn new(call_config: CallConfig, audio_format: AudioFormats) -> Self {
        // Serialising a struct of strings cannot fail.
        let raw_call_config = serde_json::to_string(&call_config).unwrap_or_default();
        Self {
            call_config,
            audio_format,
            raw_call_config,
        }
    }

    /// Parses a whole start message.
    pub fn parse(text: &str) -> Result<Self, Error> {
        Self::from_map(&json::raw_map(text, "message")?)
    }

    pub(crate) fn from_map(map: &RawMap<'_>) -> Result<Self, Error> {
        let Some(raw_cc) = map.get("call_config").filter(|r| r.get() != "null") else {
            return Err(Error::MissingField {
                field: "call_config".into(),
            });
        };
        let cc = json::raw_map(raw_cc.get(), "call_config")?;
        let field = |name: &str| json::opaque(&cc, name, &format!("call_config.{name}"));
        // Fields are checked in the documented order, so the first missing one is named.
        let call_config = CallConfig {
            site_id: field("siteId")?,
            caller: field("caller")?,
            callee: field("callee")?,
            cdr_id: field("cdrId")?,
            call_action_id: field("callActionId")?,
            ivr_ip: field("ivrIp")?,
            agent_id: field("agentId")?,
            agent_type: field("agentType")?,
        };
        let audio_format = match map.get("audio_format") {
            Some(raw) if raw.get() != "null" => {
                let af = json::raw_map(raw.get(), "audio_format")?;
                AudioFormats {
                    phone_output: format_field(&af, "phone_output_audio_format")?,
                    phone_input: format_field(&af, "phone_input_audio_format")?,
                }
            }
            _ => AudioFormats::default(),
        };
        Ok(Self {
            call_config,
            audio_format,
            raw_call_config: raw_cc.get().to_owned(),
        })
    }

    /// The start message as JSON (phone side).
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"call_config":{},"audio_format":{}}}"#,
            self.raw_call_config,
            self.audio_format.to_json()
        )
    }

    /// Our `started` reply: the call_config exactly as received and the formats we use.
    pub fn started_json(&self) -> String {
        format!(
            r#"{{"type":"started","call_config":{},"audio_format":{}}}"#,
            self.raw_call_config,
            self.audio_format.to_json()
        )
    }
}

fn format_field(af: &RawMap<'_>, name: &str) -> Result<AudioFormat, Error> {
    let path = format!("audio_format.{name}");
    if json::is_absent(af.get(name)) {
        return Ok(AudioFormat::Pcm8000);
    }
    let value = json::string(af, name, &path)?;
    value
        .parse()
        .map_err(|_| Error::UnsupportedFormat { field: path, value })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ringing,
    Answered,
    Closed,
}

/// The server (agent) side of one CallBridge call.
///
/// Drive it by calling `handle_*` with the current time and draining [`Session::poll_output`]
/// after every call. It never reads the clock and never touches a socket.
#[derive(Debug)]
pub struct Session {
    start: Start,
    state: State,
    out: VecDeque<Output<CallEvent>>,
}

impl Session {
    /// A session for a call whose start message was `start`. Nothing is sent until the owner
    /// answers with [`Command::Answer`].
    pub fn new(_now: Instant, start: Start) -> Self {
        Self {
            start,
            state: State::Ringing,
            out: VecDeque::new(),
        }
    }

    /// The start message.
    pub fn start(&self) -> &Start {
        &self.start
    }

    /// A text message from CallBridge. None is defined after the start: each is kept as an
    /// unknown event and the call goes on.
    pub fn handle_text(&mut self, _now: Instant, text: &str) {
        if self.state == State::Closed {
            return;
        }
        self.out
            .push_back(Output::Event(CallEvent::Unknown(text.to_owned())));
    }

    /// A binary message from CallBridge: caller audio.
    pub fn handle_binary(&mut self, _now: Instant, data: Bytes) {
        if self.state != State::Closed {
            self.out.push_back(Output::Event(CallEvent::Audio(data)));
        }
    }

    /// CallBridge closed the connection or it dropped: the call is over.
    pub fn handle_peer_close(&mut self, _now: Instant, how: Disconnect) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.out
                .push_back(Output::Event(CallEvent::Ended(how.end_reason())));
        }
    }

    /// A fatal problem found below the session (e.g. a message over the size limit).
    pub fn handle_violation(&mut self, now: Instant, error: Error) {
        if self.state == State::Closed {
            return;
        }
        let close = Close::new(error.close_code(), error.to_string());
        self.out
            .push_back(Output::Event(CallEvent::Violation(error)));
        self.end(now, EndReason::ProtocolError, close);
    }

    /// A command from the agent or an operator.
    pub fn handle_command(&mut self, now: Instant, command: Command) -> Result<(), Error> {
        match (command, self.state) {
            (_, State::Closed) => Err(Error::InvalidState {
                operation: "this",
                state: "over",
            }),
            (Command::Answer, State::Ringing) => {
                self.state = State::Answered;
                self.out
                    .push_back(Output::Send(Frame::Text(self.start.started_json())));
                self.out.push_back(Output::Event(CallEvent::Answered));
                Ok(())
            }
            (Command::Answer, _) => Ok(()),
            (Command::Audio(data), State::Answered) => {
                self.out.push_back(Output::Send(Frame::Binary(data)));
                Ok(())
            }
            (Command::Audio(_), _) => Err(Error::InvalidState {
                operation: "audio",
                state: "not answered",
            }),
            (Command::Dtmf { .. }, _) => Err(Error::Unsupported {
                operation: "DTMF",
                protocol: Protocol::CallBridge,
            }),
            (Command::Hangup(reason), _) => {
                let close = Close::new(reason.close_code(), reason.close_reason());
                self.end(now, reason, close);
                Ok(())
            }
        }
    }

    /// No timers in this protocol; present for the common session shape.
    pub fn handle_timeout(&mut self, _now: Instant) {}

    /// The server is shutting down: close with 1001.
    pub fn handle_shutdown(&mut self, now: Instant) {
        let close = Close::new(CloseCode::GOING_AWAY, "server shutting down");
        self.end(now, EndReason::ServerShutdown, close);
    }

    /// The next deadline at which [`Session::handle_timeout`] must be called: never.
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output<CallEvent>> {
        self.out.pop_front()
    }

    /// Whether the session is over (nothing more will be sent).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn end(&mut self, _now: Instant, reason: EndReason, close: Close) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.out.push_back(Output::Event(CallEvent::Ended(reason)));
        self.out.push_back(Output::Close(close));
    }
}

/// The phone (CallBridge) side of one call: what the simulator, load generator and tests use.
#[derive(Debug)]
pub struct Phone {
    core: PhoneCore,
}

impl Phone {
    /// Starts a call: queues the start message.
    pub fn new(start: &Start) -> Self {
        Self {
            core: PhoneCore::new(start.to_json()),
        }
    }

    /// A text message from the server: `started`, or something undefined.
    pub fn handle_text(&mut self, text: &str) {
        let started = json::raw_map(text, "message")
            .ok()
            .and_then(|m| json::string(&m, "type", "type").ok())
            .is_some_and(|t| t == "started");
        if started && self.core.answer() {
            self.core.event(PhoneEvent::Answered);
        } else {
            self.core.event(PhoneEvent::Unknown(text.to_owned()));
        }
    }

    /// Audio from the server.
    pub fn handle_binary(&mut self, data: Bytes) {
        self.core.event(PhoneEvent::Audio(data));
    }

    /// The server closed or the connection dropped.
    pub fn handle_peer_close(&mut self, how: Disconnect) {
        self.core.peer_close(how);
    }

    /// Sends caller audio.
    pub fn send_audio(&mut self, data: Bytes) {
        self.core.send(Frame::Binary(data));
    }

    /// The caller hangs up: CallBridge closes the connection with 1000.
    pub fn hangup(&mut self) {
        self.core
            .close(Close::new(CloseCode::NORMAL, "caller hung up"));
    }

    /// Whether the server answered.
    pub fn is_answered(&self) -> bool {
        self.core.is_answered()
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output<PhoneEvent>> {
        self.core.poll_output()
    }
}
