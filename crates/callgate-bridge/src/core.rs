//! The sans-IO core of one bridged call: callgate playing Twilio towards the user's bot.
//!
//! Inputs, each with the time: the call's events ([`Core::handle_call_event`]), the bot's
//! connection opening, its messages (parsed off the call task) and its end
//! ([`Core::handle_opened`], [`Core::handle_bot`], [`Core::handle_bot_closed`],
//! [`Core::handle_connect_failed`]), the epoch of a clear the driver carried out
//! ([`Core::handle_cleared`]) and time ([`Core::handle_timeout`]). Outputs: text for the bot
//! and the other effects in [`Core::poll_output`], the commands for the call in order in
//! [`Core::front`] / [`Core::pop`] (sent whenever the call takes them), the next deadline in
//! [`Core::poll_timeout`]. No channels, sockets or clock reads here.
//!
//! # What the bot sees
//! Exactly what Twilio sends (`docs/bridge.md`): `connected` and `start` at once on connect,
//! one `media` per 20 ms of caller audio (μ-law 8 kHz, 160 bytes, `chunk` from 1, `timestamp`
//! on the receive clock), `dtmf` per key, each of its marks back once the audio before it was
//! played to the caller (the call's playout reports it), every pending mark at once on a
//! clear, and `stop` when the call ends.
//!
//! # The bot's audio
//! Cut into pieces of at most [`PIECE_BYTES`] and queued here in order with its marks, then
//! handed to the call as the playout takes it; up to [`QUEUE_LIMIT_BYTES`] (120 s) waits here,
//! beyond that the driver stops reading the bot ([`Core::accepts_bot_input`]). A clear drops
//! what waits here and what the call has not played (the driver's `AgentIo::clear`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use callgate_agent::{AgentCommand, AgentEvent, Epoch, MarkState, RecordEvent};
use callgate_kit::outbox::Outbox;
use callgate_proto::EndReason;
use callgate_proto::twilio::{
    self, Counter, DtmfInfo, MarkInfo, MediaFormat, StartInfo, StopInfo, ToBot,
};
use serde_json::json;

/// Bytes of μ-law in 20 ms: one `media` message to the bot.
pub const FRAME_BYTES: usize = twilio::FRAME_BYTES;
/// The bot's audio is handed to the call in pieces of at most 200 ms, so a clear finds little
/// in the call's channel.
pub const PIECE_BYTES: usize = 1600;
/// The most bot audio waiting here: 120 s of μ-law.
pub const QUEUE_LIMIT_BYTES: u64 = 120 * 8000;
/// Arrival jitter of the caller's audio absorbed into the `timestamp`s (a longer gap is a
/// pause: the timestamp jumps forward by it).
pub const JITTER_MS: u64 = 200;
/// How often the usage counters are reported to the call while they change.
pub const USAGE_EVERY: Duration = Duration::from_secs(1);
/// Invalid bot messages kept in the record, one event each (all are counted).
pub const INVALID_EVENTS_KEPT: u64 = 10;

/// The ids a stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamIds {
    /// `MZ` + 32 hex, one per bot connection.
    pub stream_sid: String,
    /// callgate's call id.
    pub call_sid: String,
    /// The route's `account_sid`.
    pub account_sid: String,
}

/// A message from the bot, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BotMessage {
    /// `media`: μ-law audio, decoded.
    Media(Bytes),
    /// `mark` with its name.
    Mark(String),
    /// `clear`.
    Clear,
    /// Anything the bot may not send: a kind (`not_json`, `binary`, `unknown_event`,
    /// `bad_media`, `bad_mark`) and what was wrong.
    Invalid {
        /// A stable code.
        kind: &'static str,
        /// In words.
        message: String,
    },
}

/// How the bot's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotClosed {
    /// The close frame's code; `None` when the frame had none (1005) or there was no frame.
    pub code: Option<u16>,
    /// The close frame's reason, or what went wrong.
    pub reason: String,
    /// Whether a close frame came (`false`: the connection was lost).
    pub close_frame: bool,
}

impl BotClosed {
    /// A close that is a hang-up: a close frame with 1000, 1001 or no code.
    pub fn is_hangup(&self) -> bool {
        self.close_frame && matches!(self.code, None | Some(1000 | 1001))
    }
}

/// An effect for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A text frame for the bot.
    Send(String),
    /// Close the bot's connection (with 1000, after what was sent).
    CloseBot,
    /// Clear the call's playout at once (`AgentIo::clear`), then [`Core::handle_cleared`].
    Clear,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The connection is being opened.
    Connecting { since: Instant },
    /// The stream is up: `start` was sent at `stream_start`.
    Open { stream_start: Instant },
    /// The bot is gone; what it queued plays out, then the call hangs up.
    BotGone,
    /// The call ended.
    Ended,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingMark {
    id: u64,
    name: String,
}

/// Per-call figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Text bytes sent to the bot.
    pub bytes_to_bot: u64,
    /// Text bytes received from the bot.
    pub bytes_from_bot: u64,
    /// `media` messages sent to the bot.
    pub frames_to_bot: u64,
    /// Caller frames dropped because the bot's socket was not open yet.
    pub dropped_before_open: u64,
    /// Invalid messages from the bot.
    pub invalid: u64,
    /// Marks echoed to the bot.
    pub marks_echoed: u64,
}

/// What one call counted for the shared metrics since the driver last took it
/// ([`Core::take_stats`]; `crate::metrics::BridgeMetrics::merge`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The bot's socket opened, this long after the call started.
    pub connected: Option<Duration>,
    /// The bot could not be reached: `url`, `connect`, `tls`, `upgrade`, `timeout`, `closed`.
    pub connect_failure: Option<&'static str>,
    /// The bot's connection ended: `bot` (its close: 1000, 1001 or none), `bot_error` (another
    /// code), `lost` (no close frame, or it stopped reading), `callgate` (the call ended).
    pub disconnect: Option<&'static str>,
    /// The fallback started.
    pub fallback: bool,
    /// Invalid messages from the bot, by kind.
    pub invalid: Vec<(&'static str, u64)>,
    /// Marks echoed as played.
    pub marks_played: u64,
    /// Marks echoed as cleared.
    pub marks_cleared: u64,
    /// Clears, by who asked (`bot`, `callgate`: a barge-in, `operator`).
    pub clears: Vec<(&'static str, u64)>,
    /// Text bytes sent to the bot.
    pub bytes_to_bot: u64,
    /// Text bytes received from the bot.
    pub bytes_from_bot: u64,
}

impl Stats {
    fn add(list: &mut Vec<(&'static str, u64)>, key: &'static str) {
        match list.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => list.push((key, 1)),
        }
    }
}

/// Why the bot's connection could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    /// A stable code: `url`, `connect`, `tls`, `upgrade`, `timeout`.
    pub kind: &'static str,
    /// In words.
    pub reason: String,
}

/// One bridged call.
#[derive(Debug)]
pub struct Core {
    ids: StreamIds,
    custom_parameters: BTreeMap<String, String>,
    phase: Phase,
    sequence: u64,
    chunk: u64,
    next_timestamp: Option<u64>,
    /// Caller audio short of a whole frame.
    partial: BytesMut,
    outbox: Outbox,
    /// Record events and usage: sent before the outbox's audio.
    urgent: VecDeque<AgentCommand>,
    queued_audio: u64,
    marks: VecDeque<PendingMark>,
    next_mark: u64,
    /// Played position last reported by the call, ms.
    played_ms: u64,
    /// Whether the next `Cleared` report is for the bot's clear.
    bot_clears: u64,
    fallback: Vec<Bytes>,
    outputs: VecDeque<Output>,
    counters: Counters,
    reported: (u64, u64, u64),
    next_usage: Option<Instant>,
    stats: Stats,
    /// Bytes each way the metrics were told of.
    stats_bytes: (u64, u64),
}

impl Core {
    /// A call whose bot connection starts opening `now`; `fallback` is what the caller hears
    /// if the bot cannot be reached or drops (μ-law pieces; empty: hang up).
    pub fn new(
        ids: StreamIds,
        custom_parameters: BTreeMap<String, String>,
        fallback: Vec<Bytes>,
        epoch: Epoch,
        now: Instant,
    ) -> Self {
        Self {
            ids,
            custom_parameters,
            phase: Phase::Connecting { since: now },
            sequence: 0,
            chunk: 0,
            next_timestamp: None,
            partial: BytesMut::new(),
            outbox: Outbox::new(epoch),
            urgent: VecDeque::new(),
            queued_audio: 0,
            marks: VecDeque::new(),
            next_mark: 0,
            played_ms: 0,
            bot_clears: 0,
            fallback,
            outputs: VecDeque::new(),
            counters: Counters::default(),
            reported: (0, 0, 0),
            next_usage: None,
            stats: Stats::default(),
            stats_bytes: (0, 0),
        }
    }

    /// What the call counted since the last call, for the shared metrics.
    pub fn take_stats(&mut self) -> Stats {
        let (to, from) = self.stats_bytes;
        self.stats.bytes_to_bot = self.counters.bytes_to_bot - to;
        self.stats.bytes_from_bot = self.counters.bytes_from_bot - from;
        self.stats_bytes = (self.counters.bytes_to_bot, self.counters.bytes_from_bot);
        std::mem::take(&mut self.stats)
    }

    /// The figures so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether the call is over for the bridge (nothing more will be sent to the bot).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Whether the driver should read the bot's next message (false while 120 s of its audio
    /// wait here: the bot's socket is then not read, and TCP pushes back).
    pub fn accepts_bot_input(&self) -> bool {
        self.queued_audio < QUEUE_LIMIT_BYTES
    }

    /// The bot's connection is open: `connected` and `start` go out at once.
    pub fn handle_opened(&mut self, now: Instant) {
        let Phase::Connecting { since } = self.phase else {
            return;
        };
        self.phase = Phase::Open { stream_start: now };
        // The bot picked up: the call is answered now, so the caller's audio flows to it.
        self.urgent.push_back(AgentCommand::Answer);
        self.send(twilio::connected_json());
        self.sequence = 1;
        let start = ToBot::Start {
            sequence_number: Counter(1),
            stream_sid: self.ids.stream_sid.clone(),
            start: StartInfo {
                stream_sid: self.ids.stream_sid.clone(),
                account_sid: self.ids.account_sid.clone(),
                call_sid: self.ids.call_sid.clone(),
                tracks: vec!["inbound".into()],
                custom_parameters: std::mem::take(&mut self.custom_parameters),
                media_format: MediaFormat::default(),
            },
        };
        self.send(start.to_json());
        let latency = now.saturating_duration_since(since);
        self.stats.connected = Some(latency);
        let latency = latency.as_millis() as u64;
        self.record(json!({
            "what": "connected",
            "latency_ms": latency,
            "stream_sid": self.ids.stream_sid,
            "audio_dropped_before_open_frames": self.counters.dropped_before_open,
        }));
        self.next_usage = Some(now + USAGE_EVERY);
    }

    /// The bot could not be reached (connect, TLS or upgrade failed, or took too long).
    pub fn handle_connect_failed(&mut self, now: Instant, failure: ConnectFailure) {
        let Phase::Connecting { since } = self.phase else {
            return;
        };
        let ConnectFailure { kind, reason } = failure;
        self.stats.connect_failure = Some(kind);
        let after = now.saturating_duration_since(since).as_millis() as u64;
        self.record(json!({"what": "unreachable", "reason": reason, "after_ms": after}));
        self.fall_back(&format!("bot unreachable: {reason}"));
    }

    /// The bot's connection ended (its close frame, or the connection lost).
    pub fn handle_bot_closed(&mut self, now: Instant, closed: BotClosed) {
        if !matches!(self.phase, Phase::Open { .. }) {
            if matches!(self.phase, Phase::Connecting { .. }) {
                let failure = ConnectFailure {
                    kind: "closed",
                    reason: closed.reason,
                };
                self.handle_connect_failed(now, failure);
            }
            return;
        }
        self.stats.disconnect = Some(match (closed.is_hangup(), closed.close_frame) {
            (true, _) => "bot",
            (false, true) => "bot_error",
            (false, false) => "lost",
        });
        self.record(json!({
            "what": "disconnect",
            "by": "bot",
            "code": closed.code,
            "reason": closed.reason,
            "close_frame": closed.close_frame,
        }));
        if closed.is_hangup() {
            // The goodbye the bot queued plays in full, then the call ends.
            self.phase = Phase::BotGone;
            self.outbox.push(AgentCommand::Hangup);
        } else {
            let why = match (closed.close_frame, closed.code) {
                (false, _) => format!("bot dropped: {}", closed.reason),
                (true, Some(code)) => format!("bot closed with {code}: {}", closed.reason),
                (true, None) => format!("bot closed: {}", closed.reason),
            };
            self.fall_back(&why);
        }
    }

    /// A message from the bot (`bytes`: its size on the wire).
    pub fn handle_bot(&mut self, _now: Instant, message: BotMessage, bytes: usize) {
        self.counters.bytes_from_bot += bytes as u64;
        if !matches!(self.phase, Phase::Open { .. }) {
            return;
        }
        match message {
            BotMessage::Media(audio) => {
                let mut start = 0;
                while start < audio.len() {
                    let end = (start + PIECE_BYTES).min(audio.len());
                    self.queued_audio += (end - start) as u64;
                    self.outbox
                        .push(AgentCommand::Audio(audio.slice(start..end)));
                    start = end;
                }
            }
            BotMessage::Mark(name) => {
                self.next_mark += 1;
                let id = self.next_mark;
                self.marks.push_back(PendingMark { id, name });
                self.outbox.push(AgentCommand::Mark(id));
            }
            BotMessage::Clear => {
                self.bot_clears += 1;
                self.outputs.push_back(Output::Clear);
                self.queued_audio = 0;
                // The driver clears the call now and reports the epoch; what waits here goes.
                self.outbox.cleared(self.outbox.epoch());
                self.echo_all_marks(None);
            }
            BotMessage::Invalid { kind, message } => {
                self.counters.invalid += 1;
                Stats::add(&mut self.stats.invalid, kind);
                let n = self.counters.invalid;
                if n <= INVALID_EVENTS_KEPT {
                    tracing::debug!(kind, %message, "Invalid message from the bot.");
                    self.record(json!({"what": "invalid", "kind": kind, "message": message}));
                } else if n.is_power_of_two() {
                    tracing::debug!(count = n, "Invalid messages from the bot keep coming.");
                }
            }
        }
    }

    /// The driver cleared the call (after [`Output::Clear`]); `epoch` is the new one.
    pub fn handle_cleared(&mut self, epoch: Epoch) {
        self.outbox.cleared(epoch);
    }

    /// Something happened on the call.
    pub fn handle_call_event(&mut self, now: Instant, event: AgentEvent) {
        match event {
            AgentEvent::Audio(audio) => self.caller_audio(now, audio),
            AgentEvent::Dtmf(digit) => {
                if let Some(seq) = self.next_sequence() {
                    let message = ToBot::Dtmf {
                        sequence_number: Counter(seq),
                        stream_sid: self.ids.stream_sid.clone(),
                        dtmf: DtmfInfo {
                            track: "inbound_track".into(),
                            digit: digit.as_char().to_string(),
                        },
                    };
                    self.send(message.to_json());
                }
            }
            AgentEvent::Mark {
                id,
                played_ms,
                state,
                ..
            } => {
                self.played_ms = self.played_ms.max(played_ms);
                if self.marks.iter().any(|m| m.id == id) {
                    self.echo_all_marks(Some((id, state)));
                }
            }
            AgentEvent::BargeIn(i) => {
                self.played_ms = self.played_ms.max(i.played_ms);
                self.outbox.barged_in(i.epoch);
                self.queued_audio = 0;
                Stats::add(&mut self.stats.clears, "callgate");
                self.record(json!({
                    "what": "clear", "by": "callgate", "cause": "barge_in",
                    "played_ms": i.played_ms, "dropped_ms": i.dropped_ms,
                }));
                self.echo_all_marks(None);
            }
            AgentEvent::Cleared(i) => {
                self.played_ms = self.played_ms.max(i.played_ms);
                self.outbox.advance(i.epoch);
                let by = if self.bot_clears > 0 {
                    self.bot_clears -= 1;
                    "bot"
                } else {
                    "operator"
                };
                Stats::add(&mut self.stats.clears, by);
                if by == "operator" {
                    // An operator's clear drops the bot's audio as a barge-in does.
                    self.outbox.cleared(i.epoch);
                    self.queued_audio = 0;
                    self.echo_all_marks(None);
                }
                self.record(json!({
                    "what": "clear", "by": by,
                    "played_ms": i.played_ms, "dropped_ms": i.dropped_ms,
                }));
            }
            AgentEvent::Ended(reason) => self.call_ended(now, reason),
            AgentEvent::AudioLost { .. }
            | AgentEvent::SpeechStarted { .. }
            | AgentEvent::SpeechStopped { .. }
            | AgentEvent::Refused { .. } => {}
        }
    }

    /// Time passed: the usage counters are reported when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.next_usage
            && now >= at
        {
            self.report_usage();
            self.next_usage = (!self.is_finished()).then(|| now + USAGE_EVERY);
        }
    }

    /// The next deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_usage
    }

    /// The next effect.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next command for the call, with its epoch.
    pub fn front(&self) -> Option<(Epoch, AgentCommand)> {
        match self.urgent.front() {
            Some(c) => Some((self.outbox.epoch(), c.clone())),
            None => self.outbox.front(),
        }
    }

    /// The command from [`Core::front`] was taken by the call.
    pub fn pop(&mut self) {
        if self.urgent.pop_front().is_some() {
            return;
        }
        if let Some((_, AgentCommand::Audio(a))) = self.outbox.front() {
            self.queued_audio = self.queued_audio.saturating_sub(a.len() as u64);
        }
        self.outbox.pop();
    }

    fn caller_audio(&mut self, now: Instant, audio: Bytes) {
        let Phase::Open { stream_start } = self.phase else {
            if matches!(self.phase, Phase::Connecting { .. }) {
                self.counters.dropped_before_open += (audio.len() / FRAME_BYTES).max(1) as u64;
            }
            return;
        };
        let elapsed = now.saturating_duration_since(stream_start).as_millis() as u64;
        if self.partial.is_empty() && audio.len() == FRAME_BYTES {
            self.media(elapsed, &audio);
            return;
        }
        self.partial.extend_from_slice(&audio);
        while self.partial.len() >= FRAME_BYTES {
            let frame = self.partial.split_to(FRAME_BYTES);
            self.media(elapsed, &frame);
        }
    }

    fn media(&mut self, elapsed_ms: u64, frame: &[u8]) {
        let timestamp = match self.next_timestamp {
            Some(next) if elapsed_ms <= next + JITTER_MS => next,
            _ => elapsed_ms.max(self.next_timestamp.unwrap_or(0)),
        };
        self.next_timestamp = Some(timestamp + 20);
        let Some(seq) = self.next_sequence() else {
            return;
        };
        self.chunk += 1;
        self.counters.frames_to_bot += 1;
        let text = media_json(&self.ids.stream_sid, seq, self.chunk, timestamp, frame);
        self.send(text);
    }

    /// Echoes pending marks in order: up to and including `upto`'s id (reported by the call
    /// with its state), or all of them (a clear: each counts as cleared).
    fn echo_all_marks(&mut self, upto: Option<(u64, MarkState)>) {
        while let Some(front) = self.marks.front() {
            let (state, last) = match upto {
                Some((id, state)) if front.id == id => (state, true),
                Some((id, _)) if front.id > id => break,
                Some(_) => (MarkState::Played, false),
                None => (MarkState::Cleared, false),
            };
            let Some(mark) = self.marks.pop_front() else {
                break;
            };
            self.counters.marks_echoed += 1;
            match state {
                MarkState::Played => self.stats.marks_played += 1,
                MarkState::Cleared => self.stats.marks_cleared += 1,
            }
            self.record(json!({
                "what": "mark",
                "name": mark.name,
                "played_ms": self.played_ms,
                "state": match state {
                    MarkState::Played => "played",
                    MarkState::Cleared => "cleared",
                },
            }));
            if let Some(seq) = self.next_sequence() {
                let message = ToBot::Mark {
                    sequence_number: Counter(seq),
                    stream_sid: self.ids.stream_sid.clone(),
                    mark: MarkInfo { name: mark.name },
                };
                self.send(message.to_json());
            }
            if last {
                break;
            }
        }
    }

    fn call_ended(&mut self, _now: Instant, reason: EndReason) {
        match self.phase {
            Phase::Open { .. } => {
                if let Some(seq) = self.next_sequence() {
                    let stop = ToBot::Stop {
                        sequence_number: Counter(seq),
                        stream_sid: self.ids.stream_sid.clone(),
                        stop: StopInfo {
                            account_sid: self.ids.account_sid.clone(),
                            call_sid: self.ids.call_sid.clone(),
                        },
                    };
                    self.send(stop.to_json());
                }
                self.stats.disconnect = Some("callgate");
                self.record(json!({
                    "what": "disconnect", "by": "callgate", "code": 1000,
                    "reason": reason.as_str(),
                }));
                self.outputs.push_back(Output::CloseBot);
            }
            Phase::Connecting { .. } => self.outputs.push_back(Output::CloseBot),
            Phase::BotGone | Phase::Ended => {}
        }
        self.phase = Phase::Ended;
        self.marks.clear();
        self.report_usage();
        self.next_usage = None;
    }

    fn fall_back(&mut self, why: &str) {
        if matches!(self.phase, Phase::Connecting { .. }) {
            // Never answered: answer to play the fallback.
            self.urgent.push_back(AgentCommand::Answer);
        }
        self.phase = Phase::BotGone;
        self.marks.clear();
        self.stats.fallback = true;
        self.record(json!({
            "what": "fallback",
            "reason": why,
            "audio": if self.fallback.is_empty() { "none" } else { "played" },
        }));
        let pieces = self.fallback.clone();
        self.outbox
            .extend(pieces.into_iter().map(AgentCommand::Audio));
        self.outbox.push(AgentCommand::Hangup);
        self.report_usage();
    }

    fn next_sequence(&mut self) -> Option<u64> {
        if !matches!(self.phase, Phase::Open { .. }) {
            return None;
        }
        self.sequence += 1;
        Some(self.sequence)
    }

    fn send(&mut self, text: String) {
        self.counters.bytes_to_bot += text.len() as u64;
        self.outputs.push_back(Output::Send(text));
    }

    fn record(&mut self, detail: serde_json::Value) {
        self.urgent
            .push_back(AgentCommand::Event(Box::new(RecordEvent {
                name: "bridge".into(),
                detail,
            })));
    }

    fn report_usage(&mut self) {
        let c = self.counters;
        let (to, from, invalid) = self.reported;
        let mut amounts = Vec::new();
        if c.bytes_to_bot > to {
            amounts.push(("bridge_bytes_to_bot".into(), (c.bytes_to_bot - to) as f64));
        }
        if c.bytes_from_bot > from {
            amounts.push((
                "bridge_bytes_from_bot".into(),
                (c.bytes_from_bot - from) as f64,
            ));
        }
        if c.invalid > invalid {
            amounts.push((
                "bridge_invalid_messages".into(),
                (c.invalid - invalid) as f64,
            ));
        }
        self.reported = (c.bytes_to_bot, c.bytes_from_bot, c.invalid);
        if !amounts.is_empty() {
            self.urgent.push_back(AgentCommand::Usage(amounts));
        }
    }
}

/// The caller's `media` message, written by hand: the one message sent 50 times a second, of
/// a fixed shape, so it is built in one allocation with the base64 encoded in place (no
/// intermediate strings, no serializer). Byte for byte what `ToBot::Media` serialises to (a
/// test checks it); `stream_sid` is `MZ` and hex digits, nothing to escape.
fn media_json(stream_sid: &str, seq: u64, chunk: u64, timestamp: u64, frame: &[u8]) -> String {
    let mut s = String::with_capacity(128 + stream_sid.len() + frame.len().div_ceil(3) * 4);
    s.push_str(r#"{"event":"media","sequenceNumber":""#);
    push_u64(&mut s, seq);
    s.push_str(r#"","streamSid":""#);
    s.push_str(stream_sid);
    s.push_str(r#"","media":{"track":"inbound","chunk":""#);
    push_u64(&mut s, chunk);
    s.push_str(r#"","timestamp":""#);
    push_u64(&mut s, timestamp);
    s.push_str(r#"","payload":""#);
    BASE64.encode_string(frame, &mut s);
    s.push_str(r#""}}"#);
    s
}

/// Appends `n` in decimal.
fn push_u64(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        s.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use callgate_agent::Interruption;
    use callgate_proto::Digit;
    use callgate_proto::twilio::MediaIn;
    use serde_json::Value;

    use super::*;

    fn ids() -> StreamIds {
        StreamIds {
            stream_sid: "MZ00112233445566778899aabbccddeeff".into(),
            call_sid: "call-1".into(),
            account_sid: "AC1".into(),
        }
    }

    fn core(t0: Instant) -> Core {
        let params = BTreeMap::from([("from_number".to_owned(), "100".to_owned())]);
        Core::new(
            ids(),
            params,
            vec![Bytes::from_static(b"fallback")],
            Epoch(0),
            t0,
        )
    }

    #[allow(clippy::disallowed_methods, reason = "the tests' origin of time")]
    fn origin() -> Instant {
        Instant::now()
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// The JSON sent to the bot so far (other outputs are returned by name).
    fn sent(core: &mut Core) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(o) = core.poll_output() {
            match o {
                Output::Send(text) => out.push(serde_json::from_str(&text).unwrap()),
                Output::CloseBot => out.push(Value::from("CLOSE")),
                Output::Clear => out.push(Value::from("CLEAR")),
            }
        }
        out
    }

    /// The commands for the call, taken as the call would.
    fn commands(core: &mut Core) -> Vec<AgentCommand> {
        let mut out = Vec::new();
        while let Some((_, c)) = core.front() {
            core.pop();
            out.push(c);
        }
        out
    }

    fn events(commands: &[AgentCommand]) -> Vec<Value> {
        commands
            .iter()
            .filter_map(|c| match c {
                AgentCommand::Event(e) if e.name == "bridge" => Some(e.detail.clone()),
                _ => None,
            })
            .collect()
    }

    fn audio(commands: &[AgentCommand]) -> Vec<u8> {
        commands
            .iter()
            .filter_map(|c| match c {
                AgentCommand::Audio(a) => Some(a.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn open(t0: Instant) -> Core {
        let mut c = core(t0);
        c.handle_opened(ms(t0, 40));
        sent(&mut c);
        commands(&mut c);
        c
    }

    #[test]
    fn connected_then_start_then_media_with_twilios_counters() {
        let t0 = origin();
        let mut c = core(t0);
        c.handle_call_event(ms(t0, 10), AgentEvent::Audio(Bytes::from(vec![1u8; 160])));
        assert!(c.front().is_none(), "not answered before the bot picks up");
        c.handle_opened(ms(t0, 40));
        let out = sent(&mut c);
        assert_eq!(
            out[0],
            serde_json::json!({"event":"connected","protocol":"Call","version":"1.0.0"})
        );
        assert_eq!(out[1]["event"], "start");
        assert_eq!(out[1]["sequenceNumber"], "1");
        assert_eq!(out[1]["start"]["callSid"], "call-1");
        assert_eq!(out[1]["start"]["accountSid"], "AC1");
        assert_eq!(out[1]["start"]["tracks"], serde_json::json!(["inbound"]));
        assert_eq!(out[1]["start"]["customParameters"]["from_number"], "100");
        assert_eq!(out[1]["start"]["mediaFormat"]["encoding"], "audio/x-mulaw");
        assert_eq!(out[1]["start"]["mediaFormat"]["sampleRate"], 8000);
        let cmds = commands(&mut c);
        assert_eq!(cmds[0], AgentCommand::Answer);
        let connected = &events(&cmds)[0];
        assert_eq!(connected["latency_ms"], 40);
        assert_eq!(connected["audio_dropped_before_open_frames"], 1);
        // 40 ms in one event: two frames; then 30 ms later one more (jitter absorbed), then a
        // pause of a second: the timestamp jumps.
        c.handle_call_event(ms(t0, 60), AgentEvent::Audio(Bytes::from(vec![2u8; 320])));
        c.handle_call_event(ms(t0, 90), AgentEvent::Audio(Bytes::from(vec![3u8; 100])));
        c.handle_call_event(ms(t0, 95), AgentEvent::Audio(Bytes::from(vec![3u8; 60])));
        c.handle_call_event(ms(t0, 1100), AgentEvent::Audio(Bytes::from(vec![4u8; 160])));
        c.handle_call_event(ms(t0, 1110), AgentEvent::Dtmf(Digit::D5));
        let out = sent(&mut c);
        let field = |i: usize, f: &str| out[i]["media"][f].as_str().unwrap().to_owned();
        assert_eq!(out.len(), 5);
        assert_eq!(
            (0..4).map(|i| field(i, "chunk")).collect::<Vec<_>>(),
            ["1", "2", "3", "4"]
        );
        assert_eq!(
            (0..4).map(|i| field(i, "timestamp")).collect::<Vec<_>>(),
            ["20", "40", "60", "1060"]
        );
        assert_eq!(
            out.iter()
                .map(|m| m["sequenceNumber"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["2", "3", "4", "5", "6"]
        );
        assert_eq!(field(2, "payload"), BASE64.encode([3u8; 160]));
        assert_eq!(out[0]["media"]["track"], "inbound");
        assert_eq!(out[0]["streamSid"], ids().stream_sid);
        assert_eq!(out[4]["event"], "dtmf");
        assert_eq!(
            out[4]["dtmf"],
            serde_json::json!({"track":"inbound_track","digit":"5"})
        );
    }

    #[test]
    fn the_hand_written_media_is_byte_for_byte_what_the_serializer_writes() {
        for (seq, chunk, ts, frame) in [
            (2u64, 1u64, 0u64, vec![0u8; 160]),
            (10, 9, 1_060, (0..=255).collect::<Vec<u8>>()),
            (u64::MAX, 1_000_000, 86_400_000, vec![0xFF, 0x7F]),
            (7, 3, 40, Vec::new()),
        ] {
            let serde = ToBot::Media {
                sequence_number: Counter(seq),
                stream_sid: ids().stream_sid,
                media: MediaIn {
                    track: "inbound".into(),
                    chunk: Counter(chunk),
                    timestamp: Counter(ts),
                    payload: BASE64.encode(&frame),
                },
            }
            .to_json();
            assert_eq!(media_json(&ids().stream_sid, seq, chunk, ts, &frame), serde);
        }
    }

    #[test]
    fn each_thing_is_counted_once_for_the_metrics_and_taken_once() {
        let t0 = origin();
        let mut c = core(t0);
        c.handle_opened(ms(t0, 40));
        c.handle_call_event(ms(t0, 60), AgentEvent::Audio(Bytes::from(vec![1u8; 160])));
        c.handle_bot(ms(t0, 70), BotMessage::Mark("a".into()), 30);
        c.handle_bot(ms(t0, 80), BotMessage::Clear, 20);
        for _ in 0..2 {
            let invalid = BotMessage::Invalid {
                kind: "not_json",
                message: "x".into(),
            };
            c.handle_bot(ms(t0, 90), invalid, 5);
        }
        c.handle_call_event(
            ms(t0, 100),
            AgentEvent::Cleared(Interruption {
                played_ms: 0,
                dropped_ms: 0,
                at_ms: 100,
                epoch: Epoch(1),
            }),
        );
        c.handle_call_event(ms(t0, 120), AgentEvent::Ended(EndReason::PeerHangup));
        let to_bot = c.counters().bytes_to_bot;
        let stats = c.take_stats();
        assert_eq!(
            stats,
            Stats {
                connected: Some(Duration::from_millis(40)),
                connect_failure: None,
                disconnect: Some("callgate"),
                fallback: false,
                invalid: vec![("not_json", 2)],
                marks_played: 0,
                marks_cleared: 1,
                clears: vec![("bot", 1)],
                bytes_to_bot: to_bot,
                bytes_from_bot: 60,
            }
        );
        assert!(
            to_bot > 300,
            "connected, start, media, mark, stop: {to_bot}"
        );
        assert_eq!(c.take_stats(), Stats::default(), "nothing counted twice");

        let mut c = core(t0);
        c.handle_bot_closed(
            ms(t0, 5),
            BotClosed {
                code: Some(1011),
                reason: "no".into(),
                close_frame: true,
            },
        );
        let stats = c.take_stats();
        assert_eq!(stats.connect_failure, Some("closed"));
        assert!(stats.fallback);
    }

    #[test]
    fn marks_come_back_in_order_only_when_the_call_reports_them_played() {
        let t0 = origin();
        let mut c = open(t0);
        c.handle_bot(
            ms(t0, 50),
            BotMessage::Media(Bytes::from(vec![9u8; 4000])),
            10,
        );
        c.handle_bot(ms(t0, 50), BotMessage::Mark("a".into()), 10);
        c.handle_bot(
            ms(t0, 50),
            BotMessage::Media(Bytes::from(vec![8u8; 160])),
            10,
        );
        c.handle_bot(ms(t0, 50), BotMessage::Mark("b".into()), 10);
        assert!(sent(&mut c).is_empty(), "nothing is echoed on receipt");
        let cmds = commands(&mut c);
        assert_eq!(audio(&cmds).len(), 4160);
        let pieces: Vec<usize> = cmds
            .iter()
            .filter_map(|x| match x {
                AgentCommand::Audio(a) => Some(a.len()),
                _ => None,
            })
            .collect();
        assert_eq!(pieces, [1600, 1600, 800, 160], "cut into 200 ms pieces");
        assert_eq!(
            cmds.iter()
                .filter(|x| matches!(x, AgentCommand::Mark(_)))
                .count(),
            2
        );
        let played = |id| AgentEvent::Mark {
            id,
            played_ms: 520,
            at_ms: 600,
            state: MarkState::Played,
        };
        c.handle_call_event(ms(t0, 600), played(1));
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["event"], "mark");
        assert_eq!(out[0]["mark"]["name"], "a");
        c.handle_call_event(ms(t0, 620), played(2));
        let out = sent(&mut c);
        assert_eq!(out[0]["mark"]["name"], "b");
        let recorded = events(&commands(&mut c));
        assert_eq!(recorded[0]["what"], "mark");
        assert_eq!(recorded[0]["played_ms"], 520);
        assert_eq!(recorded[1]["name"], "b");
    }

    #[test]
    fn a_clear_drops_the_queue_and_echoes_every_pending_mark_at_once() {
        let t0 = origin();
        let mut c = open(t0);
        c.handle_bot(
            ms(t0, 50),
            BotMessage::Media(Bytes::from(vec![9u8; 1600])),
            10,
        );
        c.handle_bot(ms(t0, 50), BotMessage::Mark("a".into()), 10);
        // The call takes the first piece and the mark; the rest waits here.
        let first = commands(&mut c);
        assert_eq!(audio(&first).len(), 1600);
        c.handle_bot(
            ms(t0, 60),
            BotMessage::Media(Bytes::from(vec![7u8; 3200])),
            10,
        );
        c.handle_bot(ms(t0, 60), BotMessage::Mark("b".into()), 10);
        c.handle_bot(ms(t0, 70), BotMessage::Clear, 10);
        let out = sent(&mut c);
        assert_eq!(out[0], Value::from("CLEAR"));
        assert_eq!(
            out[1..]
                .iter()
                .map(|m| m["mark"]["name"].clone())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        c.handle_cleared(Epoch(1));
        let after = commands(&mut c);
        assert!(audio(&after).is_empty(), "the queued audio is dropped");
        assert!(!after.iter().any(|x| matches!(x, AgentCommand::Mark(_))));
        // The call's own report of the cleared mark is not echoed twice.
        c.handle_call_event(
            ms(t0, 80),
            AgentEvent::Mark {
                id: 1,
                played_ms: 100,
                at_ms: 80,
                state: MarkState::Cleared,
            },
        );
        assert!(sent(&mut c).is_empty());
        c.handle_call_event(
            ms(t0, 80),
            AgentEvent::Cleared(Interruption {
                played_ms: 100,
                dropped_ms: 100,
                at_ms: 80,
                epoch: Epoch(1),
            }),
        );
        let recorded = events(&commands(&mut c));
        assert_eq!(recorded.last().unwrap()["what"], "clear");
        assert_eq!(recorded.last().unwrap()["by"], "bot");
        assert_eq!(recorded.last().unwrap()["played_ms"], 100);
        // Audio after the clear plays in the new epoch.
        c.handle_bot(
            ms(t0, 90),
            BotMessage::Media(Bytes::from(vec![1u8; 160])),
            10,
        );
        assert_eq!(c.front().map(|(e, _)| e), Some(Epoch(1)));
    }

    #[test]
    fn a_barge_in_echoes_the_pending_marks_as_twilio_would() {
        let t0 = origin();
        let mut c = open(t0);
        c.handle_bot(
            ms(t0, 50),
            BotMessage::Media(Bytes::from(vec![9u8; 800])),
            10,
        );
        c.handle_bot(ms(t0, 50), BotMessage::Mark("m".into()), 10);
        c.handle_call_event(
            ms(t0, 100),
            AgentEvent::BargeIn(Interruption {
                played_ms: 40,
                dropped_ms: 60,
                at_ms: 100,
                epoch: Epoch(3),
            }),
        );
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["mark"]["name"], "m");
        let cmds = commands(&mut c);
        assert!(audio(&cmds).is_empty());
        assert_eq!(
            events(&cmds)
                .iter()
                .filter(|e| e["cause"] == "barge_in")
                .count(),
            1
        );
    }

    #[test]
    fn a_bot_that_closes_hangs_up_after_its_audio_one_that_drops_gets_the_fallback() {
        let t0 = origin();
        let mut c = open(t0);
        c.handle_bot(
            ms(t0, 50),
            BotMessage::Media(Bytes::from(vec![9u8; 320])),
            10,
        );
        c.handle_bot_closed(
            ms(t0, 60),
            BotClosed {
                code: Some(1000),
                reason: "bye".into(),
                close_frame: true,
            },
        );
        let cmds = commands(&mut c);
        assert_eq!(
            audio(&cmds),
            vec![9u8; 320],
            "the goodbye plays, no fallback"
        );
        assert_eq!(cmds.last(), Some(&AgentCommand::Hangup));
        assert_eq!(events(&cmds).last().unwrap()["by"], "bot");
        assert_eq!(events(&cmds).last().unwrap()["code"], 1000);

        let mut c = open(t0);
        c.handle_bot(
            ms(t0, 50),
            BotMessage::Media(Bytes::from(vec![9u8; 320])),
            10,
        );
        c.handle_bot_closed(
            ms(t0, 60),
            BotClosed {
                code: None,
                reason: "reset".into(),
                close_frame: false,
            },
        );
        let cmds = commands(&mut c);
        let mut expected = vec![9u8; 320];
        expected.extend_from_slice(b"fallback");
        assert_eq!(audio(&cmds), expected, "queued audio, then the fallback");
        assert_eq!(cmds.last(), Some(&AgentCommand::Hangup));
        let why = events(&cmds)
            .into_iter()
            .find(|e| e["what"] == "fallback")
            .unwrap();
        assert!(
            why["reason"].as_str().unwrap().contains("bot dropped"),
            "{why}"
        );

        let mut c = core(t0);
        commands(&mut c);
        c.handle_connect_failed(
            ms(t0, 3000),
            ConnectFailure {
                kind: "connect",
                reason: "connection refused".into(),
            },
        );
        let cmds = commands(&mut c);
        assert_eq!(audio(&cmds), b"fallback");
        let recorded = events(&cmds);
        assert_eq!(recorded[0]["what"], "unreachable");
        assert_eq!(recorded[0]["after_ms"], 3000);
        assert!(sent(&mut c).is_empty(), "nothing was ever sent to the bot");
    }

    #[test]
    fn the_end_of_the_call_sends_stop_and_closes() {
        let t0 = origin();
        let mut c = open(t0);
        c.handle_bot(ms(t0, 50), BotMessage::Mark("never".into()), 10);
        c.handle_call_event(ms(t0, 70), AgentEvent::Ended(EndReason::PeerHangup));
        let out = sent(&mut c);
        assert_eq!(out.len(), 2, "{out:?}: a pending mark is not echoed");
        assert_eq!(out[0]["event"], "stop");
        assert_eq!(out[0]["stop"]["callSid"], "call-1");
        assert_eq!(out[0]["stop"]["accountSid"], "AC1");
        assert_eq!(out[1], Value::from("CLOSE"));
        assert!(c.is_finished());
        let cmds = commands(&mut c);
        let usage = cmds.iter().find_map(|x| match x {
            AgentCommand::Usage(u) => Some(u.clone()),
            _ => None,
        });
        let usage = usage.expect("usage reported");
        assert!(
            usage
                .iter()
                .any(|(n, v)| n == "bridge_bytes_to_bot" && *v > 100.0)
        );
        assert!(
            usage
                .iter()
                .any(|(n, v)| n == "bridge_bytes_from_bot" && *v == 10.0)
        );
    }

    #[test]
    fn invalid_messages_are_counted_not_fatal_and_a_full_queue_stops_reading() {
        let t0 = origin();
        let mut c = open(t0);
        for _ in 0..20 {
            c.handle_bot(
                ms(t0, 50),
                BotMessage::Invalid {
                    kind: "not_json",
                    message: "x".into(),
                },
                3,
            );
        }
        assert_eq!(c.counters().invalid, 20);
        let cmds = commands(&mut c);
        assert_eq!(events(&cmds).len() as u64, INVALID_EVENTS_KEPT);
        assert!(!c.is_finished());
        let minute = Bytes::from(vec![0u8; 60 * 8000]);
        c.handle_bot(ms(t0, 60), BotMessage::Media(minute.clone()), 10);
        assert!(c.accepts_bot_input());
        c.handle_bot(ms(t0, 60), BotMessage::Media(minute), 10);
        assert!(!c.accepts_bot_input(), "120 s wait: the bot is not read");
        c.pop();
        assert!(
            c.accepts_bot_input(),
            "room again once the call takes a piece"
        );
    }
}
