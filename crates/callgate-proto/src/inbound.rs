//! The inbound-call WebSocket protocol (`docs/specs/protocols.md`).
//!
//! The gateway connects and sends `incoming_call`; we `answer`; audio flows both ways as binary
//! messages; either side sends `hangup`; the gateway then sends a `cdr` and closes. We wait for
//! the CDR a bounded time after the hangup ([`Config::cdr_timeout`]), then close ourselves.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::call::{CallEvent, CdrReport, Command, Disconnect, PhoneCore, PhoneEvent};
use crate::json::{self, RawMap};
use crate::{Close, CloseCode, Digit, DtmfDuration, EndReason, Error, Frame, Output};

/// The `incoming_call` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingCall {
    /// The caller's number.
    pub caller_id: String,
    /// The dialled number.
    pub did_number: String,
    /// The gateway's unique call ID (our external ID).
    pub session_id: String,
}

impl IncomingCall {
    /// Parses a whole `incoming_call` message.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let map = json::raw_map(text, "message")?;
        match json::string(&map, "event", "event")?.as_str() {
            "incoming_call" => Self::from_map(&map),
            other => Err(Error::UnexpectedMessage {
                what: format!("event {other:?} before incoming_call"),
            }),
        }
    }

    pub(crate) fn from_map(map: &RawMap<'_>) -> Result<Self, Error> {
        Ok(Self {
            caller_id: json::opaque(map, "callerId", "callerId")?,
            did_number: json::opaque(map, "didNumber", "didNumber")?,
            session_id: json::opaque(map, "sessionId", "sessionId")?,
        })
    }

    /// The message as JSON (phone side).
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"event":"incoming_call","callerId":{},"didNumber":{},"sessionId":{}}}"#,
            json::quote(&self.caller_id),
            json::quote(&self.did_number),
            json::quote(&self.session_id)
        )
    }
}

/// A call detail record as documented. Parsing is for validation and for the phone side; the
/// server stores the CDR's exact text whatever this says.
#[derive(Debug, Clone, PartialEq)]
pub struct Cdr {
    /// The call's session ID.
    pub session_id: String,
    /// The destination.
    pub destination: String,
    /// ISO 8601 start time.
    pub start_time: String,
    /// ISO 8601 answer time; absent or null for an unanswered call.
    pub answer_time: Option<String>,
    /// ISO 8601 end time.
    pub end_time: String,
    /// Total duration in seconds (integer or fractional).
    pub duration: f64,
    /// Billable seconds (integer or fractional).
    pub billable_seconds: f64,
    /// Disposition, e.g. `ANSWERED`.
    pub disposition: String,
    /// Who hung up, as the gateway says it.
    pub hangup_by: String,
    /// Hangup cause code, string or number on the wire, kept as its exact text.
    pub hangup_cause_code: String,
    /// Hangup cause text.
    pub hangup_cause_text: String,
}

impl Cdr {
    /// Parses a whole `cdr` message.
    pub fn parse(text: &str) -> Result<Self, Error> {
        Self::from_map(&json::raw_map(text, "message")?)
    }

    fn from_map(map: &RawMap<'_>) -> Result<Self, Error> {
        let s = |name: &str| json::opaque(map, name, &format!("cdr.{name}"));
        let num = |name: &str| -> Result<f64, Error> {
            let path = format!("cdr.{name}");
            let Some(raw) = map.get(name).filter(|r| r.get() != "null") else {
                return Err(Error::MissingField { field: path });
            };
            serde_json::from_str::<f64>(raw.get()).map_err(|_| Error::WrongType {
                field: path,
                expected: "a number",
            })
        };
        Ok(Self {
            session_id: s("sessionId")?,
            destination: s("destination")?,
            start_time: s("startTime")?,
            answer_time: if json::is_absent(map.get("answerTime")) {
                None
            } else {
                Some(s("answerTime")?)
            },
            end_time: s("endTime")?,
            duration: num("duration")?,
            billable_seconds: num("billableSeconds")?,
            disposition: s("disposition")?,
            hangup_by: s("hangupBy")?,
            hangup_cause_code: s("hangupCauseCode")?,
            hangup_cause_text: s("hangupCauseText")?,
        })
    }

    /// The message as JSON (phone side). A cause code that is a canonical integer (`16`, not
    /// `016`) is sent as a number, as the gateway's documentation shows it.
    pub fn to_json(&self) -> String {
        let c = self.hangup_cause_code.as_bytes();
        let canonical_integer =
            !c.is_empty() && c.iter().all(u8::is_ascii_digit) && (c.len() == 1 || c[0] != b'0');
        let code = if canonical_integer {
            self.hangup_cause_code.clone()
        } else {
            json::quote(&self.hangup_cause_code)
        };
        let answer = self
            .answer_time
            .as_deref()
            .map_or_else(|| "null".to_owned(), json::quote);
        format!(
            concat!(
                r#"{{"event":"cdr","sessionId":{},"destination":{},"startTime":{},"#,
                r#""answerTime":{},"endTime":{},"duration":{},"billableSeconds":{},"#,
                r#""disposition":{},"hangupBy":{},"hangupCauseCode":{},"hangupCauseText":{}}}"#
            ),
            json::quote(&self.session_id),
            json::quote(&self.destination),
            json::quote(&self.start_time),
            answer,
            json::quote(&self.end_time),
            number(self.duration),
            number(self.billable_seconds),
            json::quote(&self.disposition),
            json::quote(&self.hangup_by),
            code,
            json::quote(&self.hangup_cause_text),
        )
    }
}

/// Formats seconds the way a person writes them: `12` rather than `12.0`.
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_finite() {
        format!("{v}")
    } else {
        "0".to_owned()
    }
}

/// Settings of the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long to wait for the CDR after the call ends.
    pub cdr_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cdr_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Ringing,
    Answered,
    /// The call ended; the connection stays open for the CDR until `deadline`.
    AwaitingCdr {
        deadline: Instant,
        close: Close,
    },
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::Ringing => "ringing",
            Self::Answered => "answered",
            Self::AwaitingCdr { .. } => "over",
            Self::Closed => "closed",
        }
    }
}

/// The server (agent) side of one inbound call.
///
/// Drive it by calling `handle_*` with the current time, draining [`Session::poll_output`] after
/// every call, and calling [`Session::handle_timeout`] when [`Session::poll_timeout`] passes.
#[derive(Debug)]
pub struct Session {
    call: IncomingCall,
    config: Config,
    state: State,
    out: VecDeque<Output<CallEvent>>,
}

impl Session {
    /// A session for a call that began with `call`. Nothing is sent until the owner answers.
    pub fn new(_now: Instant, call: IncomingCall, config: Config) -> Self {
        Self {
            call,
            config,
            state: State::Ringing,
            out: VecDeque::new(),
        }
    }

    /// The `incoming_call` that started the call.
    pub fn incoming(&self) -> &IncomingCall {
        &self.call
    }

    /// A text message from the gateway.
    pub fn handle_text(&mut self, now: Instant, text: &str) {
        if self.state == State::Closed {
            return;
        }
        let map = match json::raw_map(text, "message") {
            Ok(map) => map,
            Err(error) => return self.violation(error),
        };
        let event = match json::string(&map, "event", "event") {
            Ok(event) => event,
            Err(error) => return self.violation(error),
        };
        let live = matches!(self.state, State::Ringing | State::Answered);
        match event.as_str() {
            "dtmf" if live => match json::string(&map, "digit", "digit") {
                Ok(d) => match Digit::parse(&d) {
                    Some(digit) => self.event(CallEvent::Dtmf(digit)),
                    None => self.violation(Error::InvalidDigit { value: d }),
                },
                Err(error) => self.violation(error),
            },
            "hangup" if live => self.hang_up(now, EndReason::PeerHangup, CloseCode::NORMAL),
            "cdr" => {
                if live {
                    // A CDR before any hangup means the call is over on the gateway's side.
                    self.hang_up(now, EndReason::PeerHangup, CloseCode::NORMAL);
                }
                let problem = Cdr::from_map(&map).err();
                self.event(CallEvent::Cdr(CdrReport {
                    raw: text.to_owned(),
                    problem,
                }));
                if let State::AwaitingCdr { close, .. } = &self.state {
                    let close = close.clone();
                    self.close(close);
                }
            }
            "incoming_call" => self.violation(Error::UnexpectedMessage {
                what: "second incoming_call".into(),
            }),
            // Unknown events, and dtmf/hangup that race with the end of the call.
            _ => self.event(CallEvent::Unknown(text.to_owned())),
        }
    }

    /// A binary message from the gateway: caller audio. Audio after the hangup is dropped.
    pub fn handle_binary(&mut self, _now: Instant, data: Bytes) {
        if matches!(self.state, State::Ringing | State::Answered) {
            self.event(CallEvent::Audio(data));
        }
    }

    /// The gateway closed or the connection dropped.
    pub fn handle_peer_close(&mut self, _now: Instant, how: Disconnect) {
        match self.state {
            State::Ringing | State::Answered => self.event(CallEvent::Ended(how.end_reason())),
            State::AwaitingCdr { .. } => self.event(CallEvent::CdrMissing),
            State::Closed => return,
        }
        self.state = State::Closed;
    }

    /// A fatal problem found below the session (e.g. a message over the size limit).
    pub fn handle_violation(&mut self, _now: Instant, error: Error) {
        if self.state == State::Closed {
            return;
        }
        let close = Close::new(error.close_code(), error.to_string());
        let live = matches!(self.state, State::Ringing | State::Answered);
        self.event(CallEvent::Violation(error));
        if live {
            self.event(CallEvent::Ended(EndReason::ProtocolError));
        } else {
            self.event(CallEvent::CdrMissing);
        }
        self.close(close);
    }

    /// A command from the agent or an operator.
    pub fn handle_command(&mut self, now: Instant, command: Command) -> Result<(), Error> {
        let state = self.state.name();
        match (command, &self.state) {
            (Command::Answer, State::Ringing) => {
                self.state = State::Answered;
                self.send_text(r#"{"event":"answer"}"#.to_owned());
                self.event(CallEvent::Answered);
                Ok(())
            }
            (Command::Answer, State::Answered) => Ok(()),
            (Command::Audio(data), State::Answered) => {
                self.out.push_back(Output::Send(Frame::Binary(data)));
                Ok(())
            }
            (Command::Dtmf { digit, duration }, State::Answered) => {
                if !digit.is_sendable() {
                    return Err(Error::InvalidDigit {
                        value: digit.to_string(),
                    });
                }
                self.send_text(format!(
                    r#"{{"event":"dtmf","digit":"{digit}","duration":{}}}"#,
                    duration.as_millis()
                ));
                Ok(())
            }
            (Command::Hangup(reason), State::Ringing | State::Answered) => {
                self.hang_up(now, reason, reason.close_code());
                Ok(())
            }
            (Command::Answer, _) => Err(Error::InvalidState {
                operation: "answer",
                state,
            }),
            (Command::Audio(_), _) => Err(Error::InvalidState {
                operation: "audio",
                state,
            }),
            (Command::Dtmf { .. }, _) => Err(Error::InvalidState {
                operation: "DTMF",
                state,
            }),
            (Command::Hangup(_), _) => Err(Error::InvalidState {
                operation: "hangup",
                state,
            }),
        }
    }

    /// Time passed: gives up on the CDR when its wait is over.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::AwaitingCdr { deadline, close } = &self.state
            && now >= *deadline
        {
            let close = close.clone();
            self.event(CallEvent::CdrMissing);
            self.close(close);
        }
    }

    /// The server is shutting down: hang up, wait (bounded) for the CDR, close with 1001.
    pub fn handle_shutdown(&mut self, now: Instant) {
        match &mut self.state {
            State::Ringing | State::Answered => {
                self.hang_up(now, EndReason::ServerShutdown, CloseCode::GOING_AWAY);
            }
            State::AwaitingCdr { close, .. } => {
                *close = Close::new(CloseCode::GOING_AWAY, "server shutting down");
            }
            State::Closed => {}
        }
    }

    /// The next deadline at which [`Session::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingCdr { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output<CallEvent>> {
        self.out.pop_front()
    }

    /// Whether the session is over (nothing more will be sent).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn hang_up(&mut self, now: Instant, reason: EndReason, code: CloseCode) {
        if reason != EndReason::PeerHangup {
            self.send_text(r#"{"event":"hangup"}"#.to_owned());
        }
        self.event(CallEvent::Ended(reason));
        self.state = State::AwaitingCdr {
            deadline: now + self.config.cdr_timeout,
            close: Close::new(code, reason.close_reason()),
        };
    }

    fn close(&mut self, close: Close) {
        self.state = State::Closed;
        self.out.push_back(Output::Close(close));
    }

    fn send_text(&mut self, text: String) {
        self.out.push_back(Output::Send(Frame::Text(text)));
    }

    fn event(&mut self, event: CallEvent) {
        self.out.push_back(Output::Event(event));
    }

    fn violation(&mut self, error: Error) {
        self.event(CallEvent::Violation(error));
    }
}

/// The phone (gateway) side of one inbound call.
#[derive(Debug)]
pub struct Phone {
    core: PhoneCore,
}

impl Phone {
    /// Starts a call: queues `incoming_call`.
    pub fn new(call: &IncomingCall) -> Self {
        Self {
            core: PhoneCore::new(call.to_json()),
        }
    }

    /// A text message from the server.
    pub fn handle_text(&mut self, text: &str) {
        let event = match json::raw_map(text, "message")
            .and_then(|m| Ok((json::string(&m, "event", "event")?, m)))
        {
            Ok((event, map)) => match event.as_str() {
                "answer" if self.core.answer() => PhoneEvent::Answered,
                "hangup" => PhoneEvent::Hangup,
                "dtmf" => match server_dtmf(&map) {
                    Ok((digit, duration)) => PhoneEvent::Dtmf { digit, duration },
                    Err(error) => PhoneEvent::Violation(error),
                },
                _ => PhoneEvent::Unknown(text.to_owned()),
            },
            Err(error) => PhoneEvent::Violation(error),
        };
        self.core.event(event);
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

    /// The caller pressed a key.
    pub fn send_dtmf(&mut self, digit: Digit) {
        self.core.send(Frame::Text(format!(
            r#"{{"event":"dtmf","digit":"{digit}"}}"#
        )));
    }

    /// The caller hangs up (the connection stays open for the CDR).
    pub fn hangup(&mut self) {
        self.core
            .send(Frame::Text(r#"{"event":"hangup"}"#.to_owned()));
    }

    /// Sends the CDR, then closes the connection as the gateway does.
    pub fn send_cdr(&mut self, cdr: &Cdr) {
        self.core.send(Frame::Text(cdr.to_json()));
        self.close();
    }

    /// Closes the connection with 1000.
    pub fn close(&mut self) {
        self.core.close(Close::new(CloseCode::NORMAL, "call ended"));
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

fn server_dtmf(map: &RawMap<'_>) -> Result<(Digit, DtmfDuration), Error> {
    let d = json::string(map, "digit", "digit")?;
    let digit = Digit::parse_sendable(&d).ok_or(Error::InvalidDigit { value: d })?;
    let raw = map
        .get("duration")
        .ok_or_else(|| Error::MissingField {
            field: "duration".into(),
        })?
        .get();
    let duration = raw
        .parse::<u64>()
        .ok()
        .and_then(DtmfDuration::from_millis)
        .ok_or_else(|| Error::InvalidDuration {
            value: raw.to_owned(),
        })?;
    Ok((digit, duration))
}
