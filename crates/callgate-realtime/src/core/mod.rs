//! The sans-IO core of one AI call: the Realtime session's state, the agent's audio on the
//! call's playout timeline, barge-in and truncation, tools, the record, and the connection's
//! life (set-up, outage, reconnection, renewal, fallback). Events and time in, outputs out;
//! the driver (`agent.rs`) does the I/O and decides nothing.
//!
//! # Shape
//! Time is an argument (`std::time::Instant`; this crate's `clippy.toml` bans reading the
//! clock). Inputs: [`Core::handle_call_event`] (caller audio, DTMF, marks, clears, the end),
//! [`Core::handle_caller_audio`], [`Core::handle_opened`], [`Core::handle_server`],
//! [`Core::handle_lost`], [`Core::handle_tool_done`], [`Core::handle_cleared`] and
//! [`Core::handle_timeout`]. Outputs: effects for the driver in [`Core::poll_output`], the
//! commands for the call in order, each with its epoch, in [`Core::front`] / [`Core::pop`]
//! (sent whenever the call takes them), and the next deadline in [`Core::poll_timeout`]. The
//! driver loop: after every `handle_*`, drain `poll_output`; once [`Core::is_finished`], send
//! what `front` still gives (the record's last entries: the turns still playing and the tools
//! still running when the call ended) and return; otherwise wait for the next input, the
//! deadline, or the call taking `front`.
//!
//! # Layout: one module per concern, each with its state enum
//! - `link`: the session and its connection ([`Lost`] and which losses are fatal, outage,
//!   backoff, reconnection with the conversation re-sent, renewal make-before-break).
//! - `response`: the model's response lifecycle (requested, running, cancelled; the
//!   `response.create` callgate owes; the service's errors; the answer's latency).
//! - `timeline`: the playback timeline (what was sent, what was heard, truncation at a
//!   clear, marks).
//! - `tools`: function calls (built-in and HTTP) and their answers.
//! - `turns`: the caller's speech and the transcript, and the history that seeds a new
//!   session.
//! - `timer`: the one timer table: a deadline per kind, [`Core::poll_timeout`] its minimum.
//!
//! # The timeline
//! Every sample of agent audio the core hands the call advances the timeline (in samples of
//! the phone's output format). The call reports what the caller heard as a total since the
//! call began (`played_ms` in marks and interruptions), and after a clear nothing sent before
//! it plays, so at every interruption the timeline is re-based to the reported total. An
//! assistant item occupies `[start, start + sent)` of it, so the audio of that item the caller
//! heard is `played - start`, capped at what was sent and at what the service sent for it.
//!
//! # Epochs
//! The commands for the call wait here in the kit's `Outbox`, stamped with the epoch the core
//! last learned of (a barge-in's, a clear's). Audio made before a clear keeps its old epoch,
//! so the call drops it even if it was already in the call's channel; the outbox drops it at
//! once.

mod link;
mod response;
#[cfg(test)]
pub(crate) mod tests;
mod timeline;
mod timer;
mod tools;
mod turns;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_agent::{AgentCommand, AgentEvent, CallInfo, Epoch, RecordEvent};
use callgate_audio::{AudioFormat, Converter};
use callgate_kit::outbox::Outbox;
use serde_json::{Value, json};

use crate::protocol::ServerEvent;
use crate::{Plan, ServiceFormat, SessionFormats};

pub use callgate_kit::tools::ToolDone;
pub use timeline::cut_text;

use self::link::Session;
use self::response::Responses;
use self::timeline::Timeline;
use self::timer::{Timer, Timers};
use self::tools::Tools;
use self::turns::Turns;

/// Caller audio kept while no session is ready (connecting, reconnecting), ms; older audio
/// is dropped first.
pub const MAX_BUFFERED_MS: u64 = 2000;
/// Turns re-sent to a new session (the most recent ones).
pub const MAX_SEED_TURNS: usize = 40;
/// Characters of conversation re-sent to a new session (the most recent ones).
pub const MAX_SEED_CHARS: usize = 16_000;
/// Error events recorded per call (more are counted, not stored).
const MAX_ERROR_EVENTS: u32 = 20;

/// What the core asks the driver to do (the commands for the call are in [`Core::front`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send to connection `conn` (dropped if that connection is gone).
    Send {
        /// The connection.
        conn: u64,
        /// What to send.
        message: Outgoing,
    },
    /// Clear the call's playout now (`AgentIo::clear`), then report the epoch it returns to
    /// [`Core::handle_cleared`]. What waits in the core for the call was dropped already.
    Clear,
    /// Open connection `conn` (and set it up: the core drives the session).
    Connect {
        /// The connection.
        conn: u64,
    },
    /// Close connection `conn` (1000).
    Close {
        /// The connection.
        conn: u64,
    },
    /// Run a tool off the call task and hand back [`ToolDone`].
    Tool(ToolCall),
    /// Something the metrics count.
    Count(Counted),
    /// A response's latency, for the metrics.
    Latency {
        /// From the end of the caller's speech (the service's `speech_stopped`) to the first
        /// audio of the answer arriving.
        backend: Duration,
        /// From that audio arriving to its first frame going to the phone.
        callgate: Duration,
    },
}

/// What the metrics count (see [`crate::metrics::RealtimeMetrics`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A session was set up (first, after a drop, or a renewal).
    Connected,
    /// The connection was lost mid-call.
    Outage,
    /// The AI could not be reached: the fallback message played.
    Fallback,
    /// A barge-in cut the AI's audio.
    BargeIn,
    /// A tool call ended, successfully or not.
    Tool {
        /// Whether it succeeded.
        ok: bool,
    },
}

/// A message for the Realtime connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Caller audio in the session's input format (the connection encodes the append).
    Append(Bytes),
    /// A client event, as text.
    Text(String),
}

/// A tool to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The call's id (for the output).
    pub call_id: String,
    /// Which tool.
    pub tool: ToolKind,
    /// The arguments, validated against the tool's schema.
    pub arguments: Value,
}

/// The tools the driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// `tools[index]` of the route.
    Http(usize),
    /// CallBridge's agent-terminate.
    AgentTerminate,
    /// CallBridge's messages/send-direct (a text message to the caller).
    SendSms,
}

/// How a connection to the service ended, or why it could not be opened, as the connection
/// saw it. What that means for the call (retry, or give up at once) is the core's decision:
/// [`Lost::is_fatal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The service sent a close frame (code `1005`: a frame without a code, or none).
    Closed {
        /// The close code.
        code: u16,
        /// The close frame's reason.
        reason: String,
    },
    /// The upgrade was answered with an HTTP status.
    Refused {
        /// The status.
        status: u16,
        /// The start of the answer's body (empty for a 401, which quotes the key).
        body: String,
    },
    /// The service's certificate is not trusted (the message says why).
    Untrusted(String),
    /// The endpoint cannot work as configured: its URL, host name, or the key as a header.
    Unusable(String),
    /// The connection could not be made, or broke: I/O, a timeout, a silent service, a
    /// service that stopped reading, an expired session.
    Broken(String),
}

impl Lost {
    /// Whether retrying cannot help: the configuration is wrong. A close with 3000 (a bad
    /// key), 4000 (the retired beta shape) or 1008 (policy); an upgrade refused with any
    /// status but 429 and 5xx (401, 403, 404: a key or URL problem); an untrusted certificate;
    /// an unusable endpoint.
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::Closed { code, .. } => matches!(code, 3000 | 4000 | 1008),
            Self::Refused { status, .. } => !(*status == 429 || *status >= 500),
            Self::Untrusted(_) | Self::Unusable(_) => true,
            Self::Broken(_) => false,
        }
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed { code, reason } => {
                write!(f, "the service closed the connection ({code} {reason})")
            }
            Self::Refused { status, body } => {
                write!(
                    f,
                    "the service refused the connection: HTTP {status} {body}"
                )
            }
            Self::Untrusted(what) | Self::Unusable(what) | Self::Broken(what) => f.write_str(what),
        }
    }
}

/// The call's phase, as far as the agent is concerned. It only moves forward: a barge-in or
/// a reconnection cannot undo a hang-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The conversation goes on.
    Live,
    /// CallBridge accepted agent-terminate: it announces and ends the call; the AI must not
    /// start another response.
    Terminating,
    /// The agent asked the call to hang up (after what is queued has played).
    HangingUp,
    /// The call has ended: nothing more reaches it.
    Ended,
}

/// The audio formats of the call's two sides (the phone's, the service's) and the converters
/// between them.
#[derive(Debug)]
struct Formats {
    /// The service formats of the session.
    session: SessionFormats,
    /// Samples per second of the phone's output.
    phone_rate: u64,
    /// Caller audio (phone input) to the session's input format.
    to_service: Converter,
    /// The service's audio to the phone's output format.
    from_service: Converter,
}

impl Formats {
    fn new(setting: crate::settings::AudioSetting, call: &CallInfo) -> Self {
        let session = SessionFormats::choose(setting, call.input_format, call.output_format);
        // The formats were checked when the call started; identical rates cannot fail.
        let to_service = Converter::new(call.input_format, session.input.phone_format())
            .or_else(|_| Converter::new(call.input_format, call.input_format))
            .expect("an identity converter");
        let from_service = Converter::new(session.output.phone_format(), call.output_format)
            .or_else(|_| Converter::new(call.output_format, call.output_format))
            .expect("an identity converter");
        Self {
            session,
            phone_rate: u64::from(call.output_format.sample_rate()),
            to_service,
            from_service,
        }
    }
}

/// The core of one call.
#[derive(Debug)]
pub struct Core {
    plan: Arc<Plan>,
    call: CallInfo,
    /// When the call began (`at_ms` and record times count from it).
    started: Instant,
    formats: Formats,
    phase: Phase,
    timers: Timers,
    /// Effects for the driver.
    out: VecDeque<Output>,
    /// Commands for the call, stamped with their epoch.
    outbox: Outbox,
    /// The session and its connection.
    session: Session,
    /// The model's responses.
    response: Responses,
    /// The agent's audio on the call's playout.
    timeline: Timeline,
    /// Function calls.
    tools: Tools,
    /// The caller's speech and the transcript.
    turns: Turns,
    /// Errors the service reported (the first [`MAX_ERROR_EVENTS`] are recorded).
    errors: u32,
}

impl Core {
    /// A core for `call`, which began at `started`, in the call's `epoch`; the first outputs
    /// answer the call and open the first connection.
    pub fn new(
        plan: Arc<Plan>,
        call: CallInfo,
        epoch: Epoch,
        started: Instant,
        now: Instant,
    ) -> Self {
        let formats = Formats::new(plan.settings.audio, &call);
        let mut timers = Timers::default();
        timers.set(Timer::MaxDuration, now + plan.settings.max_duration.0);
        let mut core = Self {
            plan,
            call,
            started,
            formats,
            phase: Phase::Live,
            timers,
            out: VecDeque::new(),
            outbox: Outbox::new(epoch),
            session: Session::new(now),
            response: Responses::default(),
            timeline: Timeline::default(),
            tools: Tools::default(),
            turns: Turns::default(),
            errors: 0,
        };
        core.command(AgentCommand::Answer);
        core.connect(now);
        core
    }

    /// The next effect for the driver.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Core::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next command for the call, with its epoch. Once the call has ended, only what its
    /// record still takes (transcript turns, events, usage).
    pub fn front(&self) -> Option<(Epoch, AgentCommand)> {
        self.outbox.front()
    }

    /// The command from [`Core::front`] was taken by the call.
    pub fn pop(&mut self) {
        self.outbox.pop();
    }

    /// Whether the agent is done: the call has ended, so no event will come and only the
    /// record's last entries are left in [`Core::front`]. The driver sends those and returns
    /// (its connections close as it drops them).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The connection currently in use, if any.
    pub fn current_conn(&self) -> Option<u64> {
        self.session.current_conn()
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        if self.timers.fire(Timer::MaxDuration, now) {
            let limit = self.plan.settings.max_duration.0.as_millis() as u64;
            self.event("max_duration", json!({ "max_duration_ms": limit }));
            self.hang_up();
        }
        self.link_timeout(now);
    }

    /// Caller audio (phone input format).
    pub fn handle_caller_audio(&mut self, now: Instant, audio: &Bytes) {
        if self.phase == Phase::Ended || self.session.has_failed() {
            return;
        }
        let chunk = self.formats.to_service.convert(audio);
        if chunk.is_empty() {
            return;
        }
        if self.session.is_ready() {
            self.append(now, chunk);
        } else {
            let max = MAX_BUFFERED_MS * self.formats.session.input.bytes_per_ms();
            self.session.input.buffer(chunk, max);
        }
    }

    /// Something happened on the call.
    pub fn handle_call_event(&mut self, now: Instant, event: AgentEvent) {
        match event {
            AgentEvent::Audio(audio) => self.handle_caller_audio(now, &audio),
            AgentEvent::BargeIn(i) => {
                // The call's own VAD cleared the playout (and dropped the old epoch's audio).
                self.outbox.barged_in(i.epoch);
                self.cancel_response();
                self.settle(now, i, "callgate", false);
            }
            AgentEvent::Cleared(i) => {
                self.outbox.advance(i.epoch);
                if self.timeline.take_own_clear() {
                    self.settle(now, i, "service", true);
                } else {
                    self.settle(now, i, "operator", false);
                }
            }
            AgentEvent::Mark {
                id,
                played_ms,
                at_ms,
                state,
            } => self.mark(now, id, played_ms, at_ms, state),
            AgentEvent::Refused { command, reason } => {
                tracing::debug!(?command, %reason, "Command refused by the call.");
            }
            AgentEvent::Ended(_) => self.end(now),
            _ => {}
        }
    }

    /// The driver cleared the call's playout (after [`Output::Clear`]); `epoch` is the new one.
    pub fn handle_cleared(&mut self, epoch: Epoch) {
        self.outbox.cleared(epoch);
    }

    /// The connection `conn` is open: the service's `session.created` comes next.
    pub fn handle_opened(&mut self, _now: Instant, _conn: u64) {}

    /// An event from connection `conn`, read at `received`.
    pub fn handle_server(
        &mut self,
        now: Instant,
        conn: u64,
        event: ServerEvent,
        received: Instant,
    ) {
        if self.phase == Phase::Ended {
            return;
        }
        if self.session.renewal_conn() == Some(conn) {
            self.renewal_event(now, conn, event);
            return;
        }
        if self.current_conn() == Some(conn) {
            self.route(now, event, received);
        }
    }

    /// An event of the session in use, to the concern it belongs to.
    fn route(&mut self, now: Instant, event: ServerEvent, received: Instant) {
        match event {
            ServerEvent::SessionCreated => self.session_created(),
            ServerEvent::SessionUpdated => self.session_updated(now),
            ServerEvent::ResponseCreated { id } => self.response_created(id),
            ServerEvent::ItemAdded { response_id, item } => self.item_added(response_id, item),
            ServerEvent::AudioDelta {
                response_id,
                item_id,
                audio,
            } => self.audio(&response_id, &item_id, &audio, received),
            ServerEvent::AudioDone { item_id } => self.audio_done(item_id),
            ServerEvent::TranscriptDelta { item_id, delta } => {
                self.timeline.transcript_delta(&item_id, &delta);
            }
            ServerEvent::TranscriptDone {
                item_id,
                transcript,
            } => self.timeline.transcript_done(&item_id, transcript),
            ServerEvent::FunctionCall {
                response_id,
                item_id,
                call_id,
                name,
                arguments,
            } => {
                let name = name.or_else(|| self.tools.item_name(item_id.as_deref()));
                let name = name.unwrap_or_default();
                self.function_call(now, response_id, call_id, name, arguments);
            }
            ServerEvent::ResponseDone {
                id,
                status,
                status_details,
                calls,
                usage,
            } => self.response_done(now, id, &status, status_details, calls, &usage),
            ServerEvent::SpeechStarted {
                item_id,
                audio_start_ms,
            } => self.speech_started(item_id, audio_start_ms),
            ServerEvent::SpeechStopped {
                item_id,
                audio_end_ms,
            } => self.speech_stopped(item_id, audio_end_ms, received),
            ServerEvent::CallerTranscript {
                item_id,
                transcript,
            } => self.caller_transcript(now, &item_id, &transcript),
            ServerEvent::Error(e) => self.api_error(now, e),
            ServerEvent::Other(_) => {}
        }
    }

    // ---- helpers every concern uses ----

    /// Call time, ms.
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Whether the agent has asked the call to hang up.
    fn hanging_up(&self) -> bool {
        self.phase == Phase::HangingUp
    }

    fn command(&mut self, command: AgentCommand) {
        self.outbox.push(command);
    }

    fn event(&mut self, name: &str, detail: Value) {
        self.command(AgentCommand::Event(Box::new(RecordEvent {
            name: name.to_owned(),
            detail,
        })));
    }

    fn count(&mut self, counted: Counted) {
        self.out.push_back(Output::Count(counted));
    }

    /// Sends a client event on the ready session (nothing when none is ready).
    fn send(&mut self, text: String) {
        if let Some(conn) = self.session.ready_conn() {
            self.send_on(conn, text);
        }
    }

    fn send_on(&mut self, conn: u64, text: String) {
        self.out.push_back(Output::Send {
            conn,
            message: Outgoing::Text(text),
        });
    }

    fn close(&mut self, conn: u64) {
        self.out.push_back(Output::Close { conn });
    }

    fn hang_up(&mut self) {
        if matches!(self.phase, Phase::Live | Phase::Terminating) {
            self.phase = Phase::HangingUp;
            self.timers.stop(Timer::MaxDuration);
            self.renewal_stopped();
            self.command(AgentCommand::Hangup);
        }
    }

    fn play_prompt(&mut self, prompt: &callgate_kit::audio::PromptAudio) {
        for chunk in prompt.chunks(self.call.output_format) {
            self.command(AgentCommand::Audio(chunk));
        }
    }

    /// The call ended: what was playing and the tools still running are recorded (the only
    /// commands left for the call, which keeps them in the record), the connections close.
    fn end(&mut self, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        let at = self.ms(now);
        self.timeline_ended(at);
        self.tools_ended(now);
        self.session_ended();
        self.timers.stop_all();
        self.outbox.ended();
        self.phase = Phase::Ended;
    }
}

impl ServiceFormat {
    /// The service format `setting` gives a side of the call whose phone format is `phone`.
    fn choose(setting: crate::settings::AudioSetting, phone: AudioFormat) -> Self {
        use crate::ServiceFormat as W;
        use crate::settings::AudioSetting as S;
        match setting {
            S::Pcm => W::Pcm24k,
            S::Pcmu => W::Pcmu,
            S::Pcma => W::Pcma,
            S::Auto => match phone {
                AudioFormat::Alaw8000 => W::Pcma,
                AudioFormat::Ulaw8000 | AudioFormat::Pcm8000 => W::Pcmu,
                _ => W::Pcm24k,
            },
        }
    }
}

impl SessionFormats {
    /// The session's formats for a call whose phone sends `input` and plays `output`.
    pub fn choose(
        setting: crate::settings::AudioSetting,
        input: AudioFormat,
        output: AudioFormat,
    ) -> Self {
        Self {
            input: ServiceFormat::choose(setting, input),
            output: ServiceFormat::choose(setting, output),
        }
    }
}
