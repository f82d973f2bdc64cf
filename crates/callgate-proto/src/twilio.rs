//! Twilio Media Streams, bidirectional (`<Connect><Stream>`), as a phone protocol
//! (`docs/protocols/twilio.md`).
//!
//! Twilio is the WebSocket client. It sends `connected`, then `start` (the call's start: ids,
//! `customParameters`, the media format), then `media` (base64 μ-law 8 kHz), `dtmf`, `mark`
//! (our marks coming back once played) and finally `stop`. We answer nothing to `connected` or
//! `start`; we send `media`, `mark` and `clear`. Every message both ways is one JSON object in
//! a text frame; no binary frames are used.
//!
//! # Message types
//! [`ToBot`] (what Twilio sends) and [`ToTwilio`] (what a bot sends) are public serde types of
//! every message, so that the side of callgate that plays Twilio towards a bot can share them.
//! Counters (`sequenceNumber`, `chunk`, `timestamp`) are written as strings, as Twilio does,
//! and read from a string or a number ([`Counter`]).
//!
//! # Decoding contract
//! Before the call starts, a bad message is fatal ([`crate::detect::Handshake`] gives the
//! error and its close code). Once it is live, an invalid message (not JSON, a binary frame, an
//! unknown event, a `media` without a valid payload, a `mark` without a name) becomes a
//! [`CallEvent::Violation`]: recorded and counted, never the end of the call.
//!
//! # Marks and clear
//! The server session places marks (`cg-<n>`) when its owner asks ([`Session::handle_mark`]:
//! at the end of an utterance, every second of continuous audio) and reports each one Twilio
//! returns as [`CallEvent::MarkPlayed`], unless a [`Session::handle_clear`] sent since it was
//! placed made Twilio return it unplayed (such returns are swallowed).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::call::{CallEvent, Command, Disconnect, PhoneCore, PhoneEvent};
use crate::json::{self, RawMap};
use crate::{Close, CloseCode, Digit, EndReason, Error, Frame, Output, Protocol};

/// The only media format of a bidirectional stream.
pub const ENCODING: &str = "audio/x-mulaw";
/// Its sample rate.
pub const SAMPLE_RATE: u32 = 8000;
/// Bytes of μ-law in 20 ms.
pub const FRAME_BYTES: usize = 160;

/// A counter on the wire: sent as a string of decimal digits, read from a string or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Counter(pub u64);

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Counter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Counter;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a counter (a string of digits or a number)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Counter, E> {
                Ok(Counter(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Counter, E> {
                v.parse()
                    .map(Counter)
                    .map_err(|_| E::custom(format!("{v:?} is not a counter")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `start.mediaFormat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    /// `audio/x-mulaw`.
    pub encoding: String,
    /// 8000.
    pub sample_rate: u32,
    /// 1.
    pub channels: u32,
}

impl Default for MediaFormat {
    fn default() -> Self {
        Self {
            encoding: ENCODING.to_owned(),
            sample_rate: SAMPLE_RATE,
            channels: 1,
        }
    }
}

/// The `start` object of the `start` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartInfo {
    /// The stream's id (`MZ…`).
    pub stream_sid: String,
    /// The account (`AC…`).
    pub account_sid: String,
    /// The call (`CA…`).
    pub call_sid: String,
    /// `["inbound"]` for a bidirectional stream.
    #[serde(default)]
    pub tracks: Vec<String>,
    /// The TwiML `<Parameter>`s, all strings.
    #[serde(default)]
    pub custom_parameters: BTreeMap<String, String>,
    /// The audio format.
    pub media_format: MediaFormat,
}

/// The `media` object Twilio sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaIn {
    /// `inbound`.
    pub track: String,
    /// Number of this audio message, from 1.
    pub chunk: Counter,
    /// Milliseconds since the stream began.
    pub timestamp: Counter,
    /// Base64 of raw μ-law.
    pub payload: String,
}

/// The `dtmf` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DtmfInfo {
    /// `inbound_track`.
    pub track: String,
    /// The key.
    pub digit: String,
}

/// The `mark` object (both ways).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkInfo {
    /// The mark's name.
    pub name: String,
}

/// The `stop` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopInfo {
    /// As in `start`.
    pub account_sid: String,
    /// As in `start`.
    pub call_sid: String,
}

/// The `media` object a bot sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaOut {
    /// Base64 of raw μ-law, any length.
    pub payload: String,
}

/// A message from Twilio to the bot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum ToBot {
    /// First message, once.
    Connected {
        /// `Call`.
        protocol: String,
        /// `1.0.0`.
        version: String,
    },
    /// Second message, once: the call's start.
    #[serde(rename_all = "camelCase")]
    Start {
        /// `1`.
        sequence_number: Counter,
        /// The stream's id.
        stream_sid: String,
        /// The call.
        start: StartInfo,
    },
    /// Caller audio.
    #[serde(rename_all = "camelCase")]
    Media {
        /// One more on every message.
        sequence_number: Counter,
        /// The stream's id.
        stream_sid: String,
        /// The audio.
        media: MediaIn,
    },
    /// A key the caller pressed.
    #[serde(rename_all = "camelCase")]
    Dtmf {
        /// One more on every message.
        sequence_number: Counter,
        /// The stream's id.
        stream_sid: String,
        /// The key.
        dtmf: DtmfInfo,
    },
    /// A bot's mark, played (or dropped by a `clear`).
    #[serde(rename_all = "camelCase")]
    Mark {
        /// One more on every message.
        sequence_number: Counter,
        /// The stream's id.
        stream_sid: String,
        /// The mark.
        mark: MarkInfo,
    },
    /// The stream ended.
    #[serde(rename_all = "camelCase")]
    Stop {
        /// One more on every message.
        sequence_number: Counter,
        /// The stream's id.
        stream_sid: String,
        /// As in `start`.
        stop: StopInfo,
    },
}

/// A message from the bot to Twilio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum ToTwilio {
    /// Audio to play after what is buffered.
    #[serde(rename_all = "camelCase")]
    Media {
        /// The stream's id.
        stream_sid: String,
        /// The audio.
        media: MediaOut,
    },
    /// A marker after the audio sent so far.
    #[serde(rename_all = "camelCase")]
    Mark {
        /// The stream's id.
        stream_sid: String,
        /// The mark.
        mark: MarkInfo,
    },
    /// Drop the buffered audio and return every pending mark.
    #[serde(rename_all = "camelCase")]
    Clear {
        /// The stream's id.
        stream_sid: String,
    },
}

impl ToBot {
    /// The message as compact JSON.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and string maps always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl ToTwilio {
    /// The message as compact JSON.
    pub fn to_json(&self) -> String {
        // A struct of strings always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The call's start, from the `start` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The `start` object, as parsed.
    pub info: StartInfo,
}

/// Names of the custom parameters that carry the caller's number, first present wins.
pub const CALLER_PARAMETERS: [&str; 4] = ["caller", "from", "From", "from_number"];
/// Names of the custom parameters that carry the called number, first present wins.
pub const CALLEE_PARAMETERS: [&str; 4] = ["callee", "to", "To", "to_number"];

impl Start {
    /// Parses a whole `start` message (its `event` must be `start`).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let map = json::raw_map(text, "message")?;
        match json::string(&map, "event", "event")?.as_str() {
            "start" => Self::from_map(&map),
            other => Err(Error::UnexpectedMessage {
                what: format!("event {other:?} before start"),
            }),
        }
    }

    pub(crate) fn from_map(map: &RawMap<'_>) -> Result<Self, Error> {
        let Some(raw) = map.get("start").filter(|r| r.get() != "null") else {
            return Err(Error::MissingField {
                field: "start".into(),
            });
        };
        let s = json::raw_map(raw.get(), "start")?;
        let stream_sid = json::string(&s, "streamSid", "start.streamSid")?;
        let account_sid = json::string(&s, "accountSid", "start.accountSid")?;
        let call_sid = json::string(&s, "callSid", "start.callSid")?;
        let tracks = match s.get("tracks") {
            Some(r) if r.get() != "null" => {
                serde_json::from_str::<Vec<String>>(r.get()).map_err(|_| Error::WrongType {
                    field: "start.tracks".into(),
                    expected: "a list of strings",
                })?
            }
            _ => Vec::new(),
        };
        let custom_parameters = match s.get("customParameters") {
            Some(r) if r.get() != "null" => {
                serde_json::from_str::<BTreeMap<String, String>>(r.get()).map_err(|_| {
                    Error::WrongType {
                        field: "start.customParameters".into(),
                        expected: "an object of strings",
                    }
                })?
            }
            _ => BTreeMap::new(),
        };
        let Some(raw_format) = s.get("mediaFormat").filter(|r| r.get() != "null") else {
            return Err(Error::MissingField {
                field: "start.mediaFormat".into(),
            });
        };
        let f = json::raw_map(raw_format.get(), "start.mediaFormat")?;
        let encoding = json::string(&f, "encoding", "start.mediaFormat.encoding")?;
        let number = |name: &str| -> Result<u32, Error> {
            let field = format!("start.mediaFormat.{name}");
            let Some(r) = f.get(name).filter(|r| r.get() != "null") else {
                return Err(Error::MissingField { field });
            };
            serde_json::from_str::<u32>(r.get()).map_err(|_| Error::WrongType {
                field,
                expected: "a number",
            })
        };
        let sample_rate = number("sampleRate")?;
        let channels = number("channels")?;
        let unsupported = |field: &str, value: String| Error::UnsupportedFormat {
            field: format!("start.mediaFormat.{field}"),
            value,
        };
        if encoding != ENCODING {
            return Err(unsupported("encoding", encoding));
        }
        if sample_rate != SAMPLE_RATE {
            return Err(unsupported("sampleRate", sample_rate.to_string()));
        }
        if channels != 1 {
            return Err(unsupported("channels", channels.to_string()));
        }
        Ok(Self {
            info: StartInfo {
                stream_sid,
                account_sid,
                call_sid,
                tracks,
                custom_parameters,
                media_format: MediaFormat {
                    encoding,
                    sample_rate,
                    channels,
                },
            },
        })
    }

    /// The caller's number: the first present of [`CALLER_PARAMETERS`], or empty.
    pub fn caller(&self) -> &str {
        self.first_parameter(&CALLER_PARAMETERS)
    }

    /// The called number: the first present of [`CALLEE_PARAMETERS`], or empty.
    pub fn callee(&self) -> &str {
        self.first_parameter(&CALLEE_PARAMETERS)
    }

    fn first_parameter(&self, names: &[&str]) -> &str {
        names
            .iter()
            .find_map(|n| self.info.custom_parameters.get(*n))
            .map_or("", String::as_str)
    }

    /// The `start` message as Twilio sends it (phone side).
    pub fn to_json(&self) -> String {
        ToBot::Start {
            sequence_number: Counter(1),
            stream_sid: self.info.stream_sid.clone(),
            start: self.info.clone(),
        }
        .to_json()
    }
}

/// Twilio's `connected` message.
pub fn connected_json() -> String {
    ToBot::Connected {
        protocol: "Call".into(),
        version: "1.0.0".into(),
    }
    .to_json()
}

/// Whether a parsed message is Twilio's `connected`.
pub(crate) fn is_connected(event: Option<&str>) -> bool {
    event == Some("connected")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ringing,
    Answered,
    Closed,
}

/// The server (bot) side of one Twilio Media Streams call.
///
/// Drive it as the other sessions (see the crate docs). Answering sends nothing (Twilio
/// expects no reply); audio goes out as `media` of whatever the owner hands it (the playout
/// clock hands it 20 ms at a time); a hang-up from our side is the socket's close (1000), after
/// which Twilio runs the TwiML after `<Connect>`.
#[derive(Debug)]
pub struct Session {
    start: Start,
    state: State,
    out: VecDeque<Output<CallEvent>>,
    /// The number of the last mark placed (`cg-<n>`), 0 before the first.
    last_mark: u64,
    /// Marks placed and not returned yet.
    pending: VecDeque<u64>,
    /// Marks up to this number were placed before a `clear`: Twilio returns them unplayed.
    cleared_through: u64,
}

impl Session {
    /// A session for a stream that began with `start`.
    pub fn new(_now: Instant, start: Start) -> Self {
        Self {
            start,
            state: State::Ringing,
            out: VecDeque::new(),
            last_mark: 0,
            pending: VecDeque::new(),
            cleared_through: 0,
        }
    }

    /// The start message.
    pub fn start(&self) -> &Start {
        &self.start
    }

    /// A text message from Twilio.
    pub fn handle_text(&mut self, _now: Instant, text: &str) {
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
        match event.as_str() {
            "media" => match media_payload(&map) {
                Ok(audio) => self.event(CallEvent::Audio(audio)),
                Err(error) => self.violation(error),
            },
            "dtmf" => {
                match object(&map, "dtmf").and_then(|d| json::string(&d, "digit", "dtmf.digit")) {
                    Ok(d) => match Digit::parse(&d) {
                        Some(digit) => self.event(CallEvent::Dtmf(digit)),
                        None => self.violation(Error::InvalidDigit { value: d }),
                    },
                    Err(error) => self.violation(error),
                }
            }
            "mark" => {
                match object(&map, "mark").and_then(|m| json::string(&m, "name", "mark.name")) {
                    Ok(name) => self.mark_returned(&name),
                    Err(error) => self.violation(error),
                }
            }
            "stop" => {
                self.state = State::Closed;
                self.event(CallEvent::Ended(EndReason::PeerHangup));
                // Twilio closes the socket next; we close our side as a bot would.
                self.out.push_back(Output::Close(Close::new(
                    CloseCode::NORMAL,
                    "stream stopped",
                )));
            }
            "start" | "connected" => self.violation(Error::UnexpectedMessage {
                what: format!("second {event}"),
            }),
            _ => self.violation(Error::UnknownEvent { event }),
        }
    }

    /// A binary message: Twilio sends none; recorded as a violation, the call goes on.
    pub fn handle_binary(&mut self, _now: Instant, _data: Bytes) {
        if self.state != State::Closed {
            self.violation(Error::UnexpectedMessage {
                what: "binary message (Twilio Media Streams sends JSON text only)".into(),
            });
        }
    }

    /// Twilio closed without `stop`, or the connection dropped.
    pub fn handle_peer_close(&mut self, _now: Instant, how: Disconnect) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.event(CallEvent::Ended(how.end_reason()));
        }
    }

    /// A fatal problem found below the session (e.g. a message over the size limit).
    pub fn handle_violation(&mut self, now: Instant, error: Error) {
        if self.state == State::Closed {
            return;
        }
        let close = Close::new(error.close_code(), error.to_string());
        self.event(CallEvent::Violation(error));
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
                // Twilio expects no reply: the stream is live once `start` arrived.
                self.state = State::Answered;
                self.event(CallEvent::Answered);
                Ok(())
            }
            (Command::Answer, _) => Ok(()),
            (Command::Audio(data), State::Answered) => {
                let media = ToTwilio::Media {
                    stream_sid: self.start.info.stream_sid.clone(),
                    media: MediaOut {
                        payload: BASE64.encode(&data),
                    },
                };
                self.send(media.to_json());
                Ok(())
            }
            (Command::Audio(_), _) => Err(Error::InvalidState {
                operation: "audio",
                state: "not answered",
            }),
            (Command::Dtmf { .. }, _) => Err(Error::Unsupported {
                operation: "DTMF",
                protocol: Protocol::Twilio,
            }),
            (Command::Hangup(reason), _) => {
                let close = Close::new(reason.close_code(), reason.close_reason());
                self.end(now, reason, close);
                Ok(())
            }
        }
    }

    /// Places a mark (`cg-<n>`) after the audio sent so far and returns its number; Twilio
    /// returns it once that audio has played ([`CallEvent::MarkPlayed`]). `None` when the call
    /// is not answered or is over.
    pub fn handle_mark(&mut self, _now: Instant) -> Option<u64> {
        if self.state != State::Answered {
            return None;
        }
        self.last_mark += 1;
        let n = self.last_mark;
        self.pending.push_back(n);
        let mark = ToTwilio::Mark {
            stream_sid: self.start.info.stream_sid.clone(),
            mark: MarkInfo {
                name: format!("cg-{n}"),
            },
        };
        self.send(mark.to_json());
        Some(n)
    }

    /// Sends `clear`: Twilio drops what it has not played and returns every pending mark,
    /// which are then not reported as played.
    pub fn handle_clear(&mut self, _now: Instant) {
        if self.state != State::Answered {
            return;
        }
        self.cleared_through = self.last_mark;
        let clear = ToTwilio::Clear {
            stream_sid: self.start.info.stream_sid.clone(),
        };
        self.send(clear.to_json());
    }

    /// No timers in this protocol; present for the common session shape.
    pub fn handle_timeout(&mut self, _now: Instant) {}

    /// The server is shutting down: close with 1001.
    pub fn handle_shutdown(&mut self, now: Instant) {
        let close = Close::new(CloseCode::GOING_AWAY, "server shutting down");
        self.end(now, EndReason::ServerShutdown, close);
    }

    /// The next deadline: never.
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output<CallEvent>> {
        self.out.pop_front()
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn mark_returned(&mut self, name: &str) {
        let n = name
            .strip_prefix("cg-")
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| self.pending.contains(n));
        let Some(n) = n else {
            return self.violation(Error::UnexpectedMessage {
                what: format!("mark {name:?} that is not pending"),
            });
        };
        // Marks come back in order; any placed before this one are done too.
        while self.pending.front().is_some_and(|&p| p <= n) {
            self.pending.pop_front();
        }
        if n > self.cleared_through {
            self.event(CallEvent::MarkPlayed(n));
        }
    }

    fn end(&mut self, _now: Instant, reason: EndReason, close: Close) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.event(CallEvent::Ended(reason));
        self.out.push_back(Output::Close(close));
    }

    fn send(&mut self, text: String) {
        self.out.push_back(Output::Send(Frame::Text(text)));
    }

    fn event(&mut self, event: CallEvent) {
        self.out.push_back(Output::Event(event));
    }

    fn violation(&mut self, error: Error) {
        self.event(CallEvent::Violation(error));
    }
}

fn object<'a>(map: &RawMap<'a>, name: &str) -> Result<RawMap<'a>, Error> {
    let Some(raw) = map.get(name).filter(|r| r.get() != "null") else {
        return Err(Error::MissingField { field: name.into() });
    };
    json::raw_map(raw.get(), name)
}

fn media_payload(map: &RawMap<'_>) -> Result<Bytes, Error> {
    let media = object(map, "media")?;
    let payload = json::string(&media, "payload", "media.payload")?;
    BASE64
        .decode(payload.as_bytes())
        .map(Bytes::from)
        .map_err(|_| Error::WrongType {
            field: "media.payload".into(),
            expected: "base64",
        })
}

/// The Twilio side of one stream: what the simulator, load generator and tests use.
///
/// It sends `connected` and `start` at once and counts the stream as answered (Twilio has no
/// answer); caller audio goes out as `media` with `chunk`, `timestamp` (20 ms per 160 bytes)
/// and `sequenceNumber`; a mark from the server is returned at once (audio is taken as played
/// when it arrives: callgate paces it in real time), so a `clear` has nothing to return.
#[derive(Debug)]
pub struct Phone {
    core: PhoneCore,
    start: Start,
    sequence: u64,
    chunk: u64,
    /// Milliseconds of caller audio sent.
    audio_ms: u64,
}

impl Phone {
    /// Starts a stream: queues `connected` and `start`.
    pub fn new(start: &Start) -> Self {
        let mut core = PhoneCore::new(connected_json());
        core.send(Frame::Text(start.to_json()));
        core.answer();
        core.event(PhoneEvent::Answered);
        Self {
            core,
            start: start.clone(),
            sequence: 1,
            chunk: 0,
            audio_ms: 0,
        }
    }

    fn next_sequence(&mut self) -> Counter {
        self.sequence += 1;
        Counter(self.sequence)
    }

    /// A text message from the server: `media`, `mark` (returned at once), `clear`.
    pub fn handle_text(&mut self, text: &str) {
        let parsed = json::raw_map(text, "message")
            .and_then(|m| Ok((json::string(&m, "event", "event")?, m)));
        let event = match parsed {
            Ok((event, map)) => match event.as_str() {
                "media" => match object(&map, "media")
                    .and_then(|m| json::string(&m, "payload", "media.payload"))
                    .and_then(|p| {
                        BASE64.decode(p.as_bytes()).map_err(|_| Error::WrongType {
                            field: "media.payload".into(),
                            expected: "base64",
                        })
                    }) {
                    Ok(audio) => PhoneEvent::Audio(Bytes::from(audio)),
                    Err(error) => PhoneEvent::Violation(error),
                },
                "mark" => {
                    match object(&map, "mark").and_then(|m| json::string(&m, "name", "mark.name")) {
                        Ok(name) => {
                            let sequence_number = self.next_sequence();
                            let echo = ToBot::Mark {
                                sequence_number,
                                stream_sid: self.start.info.stream_sid.clone(),
                                mark: MarkInfo { name },
                            };
                            self.core.send(Frame::Text(echo.to_json()));
                            return;
                        }
                        Err(error) => PhoneEvent::Violation(error),
                    }
                }
                // Marks are returned on arrival, so a clear finds nothing pending to return.
                "clear" => return,
                _ => PhoneEvent::Unknown(text.to_owned()),
            },
            Err(error) => PhoneEvent::Violation(error),
        };
        self.core.event(event);
    }

    /// A binary message: not part of the protocol.
    pub fn handle_binary(&mut self, _data: Bytes) {
        self.core
            .event(PhoneEvent::Violation(Error::UnexpectedMessage {
                what: "binary message (Twilio Media Streams sends JSON text only)".into(),
            }));
    }

    /// The server closed (the bot ended the stream) or the connection dropped.
    pub fn handle_peer_close(&mut self, how: Disconnect) {
        self.core.peer_close(how);
    }

    /// Sends caller audio (raw μ-law) as one `media` message.
    pub fn send_audio(&mut self, data: Bytes) {
        self.chunk += 1;
        let sequence_number = self.next_sequence();
        let media = ToBot::Media {
            sequence_number,
            stream_sid: self.start.info.stream_sid.clone(),
            media: MediaIn {
                track: "inbound".into(),
                chunk: Counter(self.chunk),
                timestamp: Counter(self.audio_ms),
                payload: BASE64.encode(&data),
            },
        };
        self.audio_ms += (data.len() as u64) / 8;
        self.core.send(Frame::Text(media.to_json()));
    }

    /// The caller pressed a key.
    pub fn send_dtmf(&mut self, digit: Digit) {
        let sequence_number = self.next_sequence();
        let dtmf = ToBot::Dtmf {
            sequence_number,
            stream_sid: self.start.info.stream_sid.clone(),
            dtmf: DtmfInfo {
                track: "inbound_track".into(),
                digit: digit.to_string(),
            },
        };
        self.core.send(Frame::Text(dtmf.to_json()));
    }

    /// The caller hangs up: `stop`, then the socket's close (1000), as Twilio does.
    pub fn hangup(&mut self) {
        let sequence_number = self.next_sequence();
        let stop = ToBot::Stop {
            sequence_number,
            stream_sid: self.start.info.stream_sid.clone(),
            stop: StopInfo {
                account_sid: self.start.info.account_sid.clone(),
                call_sid: self.start.info.call_sid.clone(),
            },
        };
        self.core.send(Frame::Text(stop.to_json()));
        self.core
            .close(Close::new(CloseCode::NORMAL, "stream stopped"));
    }

    /// Whether the stream started (always, once created).
    pub fn is_answered(&self) -> bool {
        self.core.is_answered()
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output<PhoneEvent>> {
        self.core.poll_output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_strings_and_numbers_and_write_strings() {
        let m: ToBot = serde_json::from_str(
            r#"{"event":"media","sequenceNumber":3,"streamSid":"MZ1","media":{"track":"inbound","chunk":"2","timestamp":40,"payload":""}}"#,
        )
        .unwrap();
        let ToBot::Media {
            sequence_number,
            media,
            ..
        } = &m
        else {
            panic!("media");
        };
        assert_eq!(
            (*sequence_number, media.chunk, media.timestamp),
            (Counter(3), Counter(2), Counter(40))
        );
        assert!(m.to_json().contains(r#""sequenceNumber":"3""#));
        assert!(m.to_json().contains(r#""timestamp":"40""#));
        assert!(serde_json::from_str::<Counter>("\"x1\"").is_err());
        assert!(serde_json::from_str::<Counter>("true").is_err());
    }

    #[test]
    fn messages_to_twilio_match_the_documented_shape() {
        let clear = ToTwilio::Clear {
            stream_sid: "MZ1".into(),
        };
        assert_eq!(clear.to_json(), r#"{"event":"clear","streamSid":"MZ1"}"#);
        let mark = ToTwilio::Mark {
            stream_sid: "MZ1".into(),
            mark: MarkInfo { name: "a".into() },
        };
        assert_eq!(
            mark.to_json(),
            r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"a"}}"#
        );
        assert_eq!(
            connected_json(),
            r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#
        );
    }
}
