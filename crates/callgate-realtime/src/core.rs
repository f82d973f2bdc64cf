//! The sans-IO core of one AI call: the Realtime session's state, the agent's audio on the
//! call's playout timeline, barge-in and truncation, tools, the record, and the connection's
//! life (set-up, outage, reconnection, renewal, fallback). Events and time in, [`Output`]s
//! out; the driver (`agent.rs`) does the I/O.
//!
//! # The timeline
//! Every sample of agent audio the core hands the call advances `queued` (in samples of the
//! phone's output format). The call reports what the caller heard as a total since the call
//! began (`played_ms` in marks and interruptions), and after a clear nothing sent before it
//! plays, so at every interruption the timeline is re-based to the reported total. An
//! assistant item occupies `[start, start + sent)` of it, so the audio of that item the caller
//! heard is `played - start`, capped at what was sent and at what the service sent for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callgate_agent::{
    AgentCommand, AgentEvent, CallInfo, Interruption, MarkState, RecordEvent, Speaker, Turn,
};
use callgate_audio::{AudioFormat, Converter};
use callgate_proto::{Digit, DtmfDuration, Protocol};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::protocol::{ApiError, ServerEvent, client};
use crate::settings::Builtin;
use crate::{Plan, Wire};

/// Caller audio kept while no session is ready (connecting, reconnecting), ms; older audio
/// is dropped first.
pub const MAX_BUFFERED_MS: u64 = 2000;
/// Turns re-sent to a new session (the most recent ones).
pub const MAX_SEED_TURNS: usize = 40;
/// Characters of conversation re-sent to a new session (the most recent ones).
pub const MAX_SEED_CHARS: usize = 16_000;
/// Error events recorded per call (more are counted, not stored).
const MAX_ERROR_EVENTS: u32 = 20;
/// Speech timings kept for caller turns whose transcript has not come yet.
const MAX_PENDING_SPEECH: usize = 64;

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send to connection `conn` (dropped if that connection is gone).
    Send {
        /// The connection.
        conn: u64,
        /// What to send.
        message: Outgoing,
    },
    /// Play audio to the caller (phone output format).
    Audio(Bytes),
    /// A command for the call.
    Command(AgentCommand),
    /// Clear the playout now (and drop the driver's queued audio).
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

pub use callgate_kit::tools::ToolDone;

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The configuration is wrong (bad key, refused upgrade, beta shape): retrying cannot help.
    pub fatal: bool,
    /// What happened, in words.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Connection `conn` is being opened and set up; given up at `deadline`.
    Connecting { conn: u64, deadline: Instant },
    /// Connection `conn` is ready (`session.updated` came).
    Ready { conn: u64, since: Instant },
    /// No connection; the next attempt at `at`.
    Waiting { at: Instant },
    /// Given up: the fallback message is playing, the call hangs up.
    Failed,
}

/// An assistant audio item on its way to the caller.
#[derive(Debug)]
struct Spoken {
    id: String,
    response_id: String,
    /// The connection (session) it belongs to: only that session may be told to cut it.
    conn: u64,
    /// Clears the core had asked for when it was made (its own clear settles older items).
    clears: u64,
    /// Whether its first audio was queued (and its Start mark placed).
    queued: bool,
    /// Agent audio heard since the call began when its first sample played (its Start mark's
    /// `played_ms`): the call's own count, exact whatever else played before it.
    start_played: Option<u64>,
    /// Samples (phone output) sent for it.
    sent: u64,
    /// Bytes received from the service (its output format).
    wire_bytes: u64,
    text: String,
    audio_done: bool,
    /// When its first sample played, ms since the call began.
    started_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkKind {
    /// The item starts playing.
    Start,
    /// The first frame of an answer left: the latency measurement ends.
    First,
    /// The item has played to its end.
    End,
}

#[derive(Debug)]
struct PendingTool {
    name: String,
    arguments: String,
    started: Instant,
    /// The session that asked: its answer goes nowhere else.
    conn: u64,
}

/// The service's response, by our bookkeeping. Only `response.done` (or an error answering our
/// `response.create`) makes it `Idle` again: a cancelled response still runs until then.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Response {
    Idle,
    /// We sent `response.create`; the service has not named it yet.
    Requested {
        /// Cancel it as soon as it is named (a barge-in came first).
        cancel: bool,
        /// It answers tool outputs (asked again if the service refuses it).
        for_tools: bool,
    },
    /// Running on the service.
    Running {
        id: String,
        cancelled: bool,
    },
}

/// A new session being set up while the old one still serves the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Renewal {
    conn: u64,
    deadline: Instant,
    ready: bool,
}

/// How long a failed renewal waits before the next try (the old session goes on meanwhile).
const RENEW_RETRY: Duration = Duration::from_secs(30);
/// Function calls remembered to ignore their repeats (`.done` and `response.done` both list
/// them).
const MAX_SEEN_CALLS: usize = 64;

/// The core of one call.
#[derive(Debug)]
pub struct Core {
    plan: Arc<Plan>,
    call: CallInfo,
    started: Instant,
    wire: Wire,
    phone_rate: u64,
    to_service: Converter,
    from_service: Converter,
    out: VecDeque<Output>,

    link: Link,
    conn: u64,
    /// When the current outage began (also the start of the call until the first session).
    outage: Option<Instant>,
    attempts: u32,
    ever_ready: bool,
    greeted: bool,
    hanging_up: bool,
    /// CallBridge accepted agent-terminate: it ends the call; no new response.
    terminating: bool,
    ended: bool,
    max_duration_at: Instant,
    /// When the session is due for renewal (`session_max` after it began, or a retry).
    renew_at: Option<Instant>,
    /// The renewal is due: it starts at the next quiet moment.
    renew_due: bool,
    renewing: Option<Renewal>,
    /// Whether a response was running when the connection dropped (answer again after).
    answer_after_seed: bool,

    buffered: VecDeque<Bytes>,
    buffered_bytes: u64,
    /// Input audio appended in this session, bytes (service format).
    appended_bytes: u64,
    /// Call time of the last append, ms.
    last_append_ms: u64,

    response: Response,
    /// Responses we stopped listening to (barge-in).
    cancelled: VecDeque<String>,
    /// A `response.create` is owed (tool outputs) once no response runs.
    create_wanted: bool,
    /// Whether our last `response.create` was to answer tool outputs.
    last_create_for_tools: bool,

    spoken: Vec<Spoken>,
    /// Clears the core asked for (see [`Spoken::clears`]).
    clears: u64,
    /// Function-call items by id: (name, call_id) (beta servers name the function only here).
    call_items: HashMap<String, (String, String)>,
    next_mark: u64,
    marks: HashMap<u64, (String, MarkKind)>,
    /// The clear the core asked for is pending: its `Cleared` settles the timeline.
    clearing: bool,

    tools: HashMap<String, PendingTool>,
    seen_calls: VecDeque<String>,
    hangup_call: Option<String>,

    /// The service's `speech_stopped` arrival, until the answer's first audio.
    turn_end: Option<Instant>,
    /// When the first audio of the answer arrived, until its first frame leaves.
    first_audio: Option<(Instant, Duration)>,
    speech: VecDeque<(String, u64, Option<u64>)>,
    caller_speaking: bool,

    history: VecDeque<(Speaker, String)>,
    errors: u32,
}

impl Core {
    /// A core for `call`; the first outputs answer the call and open the first connection.
    pub fn new(plan: Arc<Plan>, call: CallInfo, started: Instant, now: Instant) -> Self {
        let wire = Wire::choose(plan.settings.audio, call.input_format, call.output_format);
        let phone_rate = u64::from(call.output_format.sample_rate());
        // The formats were checked when the call started; identical rates cannot fail.
        let to_service = Converter::new(call.input_format, wire.input.format())
            .or_else(|_| Converter::new(call.input_format, call.input_format))
            .expect("an identity converter");
        let from_service = Converter::new(wire.output.format(), call.output_format)
            .or_else(|_| Converter::new(call.output_format, call.output_format))
            .expect("an identity converter");
        let max_duration_at = now + plan.settings.max_duration.0;
        let mut core = Self {
            plan,
            call,
            started,
            wire,
            phone_rate,
            to_service,
            from_service,
            out: VecDeque::new(),
            link: Link::Waiting { at: now },
            conn: 0,
            outage: Some(now),
            attempts: 0,
            ever_ready: false,
            greeted: false,
            hanging_up: false,
            terminating: false,
            ended: false,
            max_duration_at,
            renew_at: None,
            renew_due: false,
            renewing: None,
            answer_after_seed: false,
            buffered: VecDeque::new(),
            buffered_bytes: 0,
            appended_bytes: 0,
            last_append_ms: 0,
            response: Response::Idle,
            cancelled: VecDeque::new(),
            create_wanted: false,
            last_create_for_tools: false,
            spoken: Vec::new(),
            clears: 0,
            call_items: HashMap::new(),
            next_mark: 1,
            marks: HashMap::new(),
            clearing: false,
            tools: HashMap::new(),
            seen_calls: VecDeque::new(),
            hangup_call: None,
            turn_end: None,
            first_audio: None,
            speech: VecDeque::new(),
            caller_speaking: false,
            history: VecDeque::new(),
            errors: 0,
        };
        core.out.push_back(Output::Command(AgentCommand::Answer));
        core.connect(now);
        core
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Core::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        let link = match self.link {
            Link::Connecting { deadline, .. } => Some(deadline),
            Link::Waiting { at } => Some(at),
            Link::Ready { .. } => match self.renewing {
                Some(r) if !r.ready => Some(r.deadline),
                Some(_) => None,
                None => self.renew_at,
            },
            Link::Failed => None,
        };
        let max = (!self.hanging_up).then_some(self.max_duration_at);
        match (link, max) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the call is over for the agent (it may return once its queue is sent).
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// The connection currently in use, if any.
    pub fn current_conn(&self) -> Option<u64> {
        match self.link {
            Link::Connecting { conn, .. } | Link::Ready { conn, .. } => Some(conn),
            _ => None,
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    fn event(&mut self, name: &str, detail: Value) {
        self.out
            .push_back(Output::Command(AgentCommand::Event(Box::new(
                RecordEvent {
                    name: name.to_owned(),
                    detail,
                },
            ))));
    }

    fn send(&mut self, text: String) {
        if let Link::Ready { conn, .. } = self.link {
            self.out.push_back(Output::Send {
                conn,
                message: Outgoing::Text(text),
            });
        }
    }

    // ---- the connection's life ----

    fn connect(&mut self, now: Instant) {
        self.conn += 1;
        self.attempts += 1;
        let mut deadline = now + self.plan.settings.connect_timeout.0;
        if let Some(since) = self.outage {
            deadline = deadline.min(since + self.plan.settings.reconnect_within.0);
        }
        self.link = Link::Connecting {
            conn: self.conn,
            deadline,
        };
        self.out.push_back(Output::Connect { conn: self.conn });
    }

    /// The connection `conn` is open: the service's `session.created` comes next.
    pub fn handle_opened(&mut self, _now: Instant, _conn: u64) {}

    /// Connection `conn` ended (or could not be opened).
    pub fn handle_lost(&mut self, now: Instant, conn: u64, lost: Lost) {
        if self.ended {
            return;
        }
        if self.renewing.is_some_and(|r| r.conn == conn) {
            self.abandon_renewal(now, &lost.reason);
            return;
        }
        if self.current_conn() != Some(conn) {
            return;
        }
        self.out.push_back(Output::Close { conn });
        self.lose(now, lost);
    }

    fn lose(&mut self, now: Instant, lost: Lost) {
        if lost.fatal {
            self.fail(now, &lost.reason, true);
            return;
        }
        let was_ready = matches!(self.link, Link::Ready { .. });
        self.reset_session();
        if was_ready || self.outage.is_none() {
            self.outage = Some(now);
            self.attempts = 0;
            self.event("backend_lost", json!({"reason": lost.reason}));
            self.out.push_back(Output::Count(Counted::Outage));
            tracing::warn!(reason = %lost.reason, "The AI connection dropped; reconnecting.");
            if self.ever_ready && !self.hanging_up {
                let hold = self.plan.hold.clone();
                if let Some(hold) = hold {
                    self.play_prompt(&hold);
                }
            }
        } else {
            tracing::debug!(reason = %lost.reason, attempt = self.attempts, "AI connection attempt failed.");
        }
        let since = self.outage.unwrap_or(now);
        let give_up = since + self.plan.settings.reconnect_within.0;
        if now >= give_up {
            let reason = format!(
                "no AI session within {} ({})",
                humantime::format_duration(self.plan.settings.reconnect_within.0),
                lost.reason
            );
            self.fail(now, &reason, false);
            return;
        }
        // Backoff: the first retry at once, then 250 ms doubling to 2 s, spread by the call id
        // so calls that lost the service together do not come back in step.
        let base = match self.attempts {
            0 | 1 => 0,
            n => 250u64 << (n - 2).min(3),
        };
        let spread = self
            .call
            .call_id
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % 100;
        let wait = Duration::from_millis(base + base * spread / 400);
        self.link = Link::Waiting {
            at: (now + wait).min(give_up),
        };
    }

    /// Forgets what belonged to the session that is gone: its response, its pending hang-up,
    /// the caller's half-heard turn, a renewal in progress. (Its items stay on the timeline:
    /// their audio still plays; they are no longer the new session's to cut.)
    fn reset_session(&mut self) {
        if matches!(
            self.response,
            Response::Running {
                cancelled: false,
                ..
            } | Response::Requested { cancel: false, .. }
        ) {
            // An answer the drop cut short: the new session answers again.
            self.answer_after_seed = true;
        }
        self.response = Response::Idle;
        self.create_wanted = false;
        self.hangup_call = None;
        self.caller_speaking = false;
        self.clearing = false;
        self.turn_end = None;
        if let Some(r) = self.renewing.take() {
            self.out.push_back(Output::Close { conn: r.conn });
        }
        self.renew_due = false;
        self.renew_at = None;
    }

    fn fail(&mut self, now: Instant, reason: &str, fatal: bool) {
        if matches!(self.link, Link::Failed) {
            return;
        }
        if let Some(conn) = self.current_conn() {
            self.out.push_back(Output::Close { conn });
        }
        self.link = Link::Failed;
        tracing::warn!(%reason, fatal, "The AI is unreachable: playing the fallback message.");
        self.out.push_back(Output::Count(Counted::Fallback));
        self.event(
            "backend_failed",
            json!({"reason": reason, "fatal": fatal, "at_ms": self.ms(now)}),
        );
        if !self.hanging_up {
            let fallback = self.plan.fallback.clone();
            self.play_prompt(&fallback);
            self.hang_up();
        }
    }

    fn hang_up(&mut self) {
        if !self.hanging_up {
            self.hanging_up = true;
            self.out.push_back(Output::Command(AgentCommand::Hangup));
        }
    }

    fn play_prompt(&mut self, prompt: &callgate_kit::audio::PromptAudio) {
        for chunk in prompt.chunks(self.call.output_format) {
            self.queue_audio(chunk);
        }
    }

    fn queue_audio(&mut self, chunk: Bytes) {
        self.out.push_back(Output::Audio(chunk));
    }

    /// A new assistant item of the current session.
    fn spoken_item(&self, id: &str, response_id: String) -> Spoken {
        Spoken {
            id: id.to_owned(),
            response_id,
            conn: self.current_conn().unwrap_or(0),
            clears: self.clears,
            queued: false,
            start_played: None,
            sent: 0,
            wire_bytes: 0,
            text: String::new(),
            audio_done: false,
            started_ms: None,
        }
    }

    fn session_config(&self) -> Value {
        let s = &self.plan.settings;
        let instructions = self.plan.instructions.render(|name| {
            self.call
                .variables()
                .into_iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        });
        let mut tools: Vec<Value> = s
            .builtin_tools
            .iter()
            .filter(|b| !b.needs_open_api() || self.call.protocol == Protocol::CallBridge)
            .map(|b| crate::settings::builtin_declaration(*b))
            .collect();
        tools.extend(s.tools.iter().map(|t| {
            json!({"type": "function", "name": t.name, "description": t.description,
                   "parameters": t.parameters})
        }));
        let transcription = if s.transcription.enabled {
            let mut t = json!({"model": s.transcription.model});
            if let Some(lang) = &s.transcription.language {
                t["language"] = json!(lang);
            }
            t
        } else {
            Value::Null
        };
        let noise = match s.noise_reduction {
            crate::settings::NoiseReduction::Off => Value::Null,
            kind => json!({ "type": kind }),
        };
        json!({
            "type": "realtime",
            "model": s.model,
            "instructions": instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": self.wire.input.json(),
                    "transcription": transcription,
                    "noise_reduction": noise,
                    "turn_detection": s.turn_detection_json(),
                },
                "output": {"format": self.wire.output.json(), "voice": s.voice},
            },
            "tools": tools,
            "tool_choice": s.tool_choice,
        })
    }

    fn on_ready(&mut self, now: Instant, conn: u64) {
        self.link = Link::Ready { conn, since: now };
        self.appended_bytes = 0;
        self.renew_at = Some(now + self.plan.settings.session_max.0);
        let outage_ms = self.outage.take().map_or(0, |since| {
            now.saturating_duration_since(since).as_millis() as u64
        });
        if self.ever_ready {
            self.out.push_back(Output::Count(Counted::Connected));
            self.event(
                "backend_reconnected",
                json!({"outage_ms": outage_ms, "attempts": self.attempts,
                       "seeded_turns": self.history.len()}),
            );
            self.seed(conn);
            if std::mem::take(&mut self.answer_after_seed) && !self.hanging_up {
                self.request_response(false);
            }
        } else {
            self.out.push_back(Output::Count(Counted::Connected));
            self.event(
                "backend_connected",
                json!({"attempts": self.attempts, "setup_ms": outage_ms}),
            );
        }
        self.attempts = 0;
        self.ever_ready = true;
        // Caller audio kept while there was no session.
        while let Some(chunk) = self.buffered.pop_front() {
            self.append(now, chunk);
        }
        self.buffered_bytes = 0;
        if self.plan.settings.greeting && !self.greeted && !self.hanging_up {
            self.greeted = true;
            let prompt = self.plan.settings.greeting_prompt.clone();
            self.send(client::text_item("user", &prompt));
            self.request_response(false);
        }
    }

    /// The conversation so far, as text items on connection `conn` (the service cannot
    /// resume a session).
    fn seed(&mut self, conn: u64) {
        let turns: Vec<(Speaker, String)> = self.history.iter().cloned().collect();
        for (speaker, text) in turns {
            let role = if speaker == Speaker::Caller {
                "user"
            } else {
                "assistant"
            };
            self.out.push_back(Output::Send {
                conn,
                message: Outgoing::Text(client::text_item(role, &text)),
            });
        }
    }

    /// Asks for a response if none runs.
    fn request_response(&mut self, for_tools: bool) {
        if self.response == Response::Idle && matches!(self.link, Link::Ready { .. }) {
            self.last_create_for_tools = for_tools;
            self.send(client::response_create());
            self.response = Response::Requested {
                cancel: false,
                for_tools,
            };
        }
    }

    fn append(&mut self, now: Instant, chunk: Bytes) {
        if let Link::Ready { conn, .. } = self.link {
            self.appended_bytes += chunk.len() as u64;
            self.last_append_ms = self.ms(now);
            self.out.push_back(Output::Send {
                conn,
                message: Outgoing::Append(chunk),
            });
        }
    }

    /// Maps a position in this session's input audio to call time, ms.
    fn input_ms_to_call(&self, audio_ms: u64) -> u64 {
        let appended_ms = self.appended_bytes / self.wire.input.bytes_per_ms();
        self.last_append_ms
            .saturating_sub(appended_ms.saturating_sub(audio_ms))
    }

    /// Nothing is happening on the line: no response, no agent audio, no caller speech, no
    /// tool.
    fn quiet(&self) -> bool {
        self.response == Response::Idle
            && self.spoken.is_empty()
            && !self.caller_speaking
            && self.tools.is_empty()
            && !self.hanging_up
    }

    /// Renewal, make-before-break: once due and the line is quiet, a new session is set up
    /// beside the old one, which serves the call until the new one is ready and the line is
    /// quiet again; then the new one takes over, seeded with the conversation.
    fn maybe_renew(&mut self, now: Instant) {
        let Link::Ready { conn: old, .. } = self.link else {
            return;
        };
        match self.renewing {
            None if self.renew_due && self.quiet() => {
                self.renew_due = false;
                self.conn += 1;
                self.renewing = Some(Renewal {
                    conn: self.conn,
                    deadline: now + self.plan.settings.connect_timeout.0,
                    ready: false,
                });
                self.out.push_back(Output::Connect { conn: self.conn });
            }
            Some(r) if r.ready && self.quiet() => {
                self.renewing = None;
                self.out.push_back(Output::Close { conn: old });
                self.link = Link::Ready {
                    conn: r.conn,
                    since: now,
                };
                self.appended_bytes = 0;
                self.renew_at = Some(now + self.plan.settings.session_max.0);
                self.out.push_back(Output::Count(Counted::Connected));
                self.event(
                    "backend_renewed",
                    json!({"seeded_turns": self.history.len()}),
                );
                self.seed(r.conn);
            }
            _ => {}
        }
    }

    /// The renewal failed: the old session goes on, and the renewal is tried again later.
    fn abandon_renewal(&mut self, now: Instant, reason: &str) {
        if let Some(r) = self.renewing.take() {
            self.out.push_back(Output::Close { conn: r.conn });
            tracing::info!(%reason, "Session renewal failed; the current session goes on.");
            self.event("backend_renewal_failed", json!({"reason": reason}));
            self.renew_at = Some(now + RENEW_RETRY);
        }
    }

    // ---- inputs ----

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if now >= self.max_duration_at && !self.hanging_up {
            self.event(
                "max_duration",
                json!({"max_duration_ms": self.plan.settings.max_duration.0.as_millis() as u64}),
            );
            self.hang_up();
        }
        match self.link {
            Link::Connecting { conn, deadline } if now >= deadline => {
                self.out.push_back(Output::Close { conn });
                let lost = Lost {
                    fatal: false,
                    reason: format!(
                        "no session within {}",
                        humantime::format_duration(self.plan.settings.connect_timeout.0)
                    ),
                };
                self.lose(now, lost);
            }
            Link::Waiting { at } if now >= at => self.connect(now),
            Link::Ready { .. } => {
                if let Some(r) = self.renewing
                    && !r.ready
                    && now >= r.deadline
                {
                    self.abandon_renewal(now, "no new session in time");
                }
                if self.renew_at.is_some_and(|at| now >= at) {
                    self.renew_at = None;
                    self.renew_due = true;
                }
                self.maybe_renew(now);
            }
            _ => {}
        }
    }

    /// Caller audio (phone input format).
    pub fn handle_caller_audio(&mut self, now: Instant, audio: &Bytes) {
        if self.ended || matches!(self.link, Link::Failed) {
            return;
        }
        let chunk = self.to_service.convert(audio);
        if chunk.is_empty() {
            return;
        }
        if matches!(self.link, Link::Ready { .. }) {
            self.append(now, chunk);
            return;
        }
        self.buffered_bytes += chunk.len() as u64;
        self.buffered.push_back(chunk);
        let max = MAX_BUFFERED_MS * self.wire.input.bytes_per_ms();
        while self.buffered_bytes > max {
            match self.buffered.pop_front() {
                Some(old) => self.buffered_bytes -= old.len() as u64,
                None => break,
            }
        }
    }

    /// Something happened on the call.
    pub fn handle_call_event(&mut self, now: Instant, event: AgentEvent) {
        match event {
            AgentEvent::Audio(audio) => self.handle_caller_audio(now, &audio),
            AgentEvent::BargeIn(i) => {
                // The call's own VAD cleared the playout.
                self.cancel_response();
                self.settle(now, i, "callgate", false);
            }
            AgentEvent::Cleared(i) => {
                if std::mem::take(&mut self.clearing) {
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

    fn end(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        let at = self.ms(now);
        // Items still playing when the line dropped: heard up to now, as far as known.
        for item in std::mem::take(&mut self.spoken) {
            if let Some(start) = item.started_ms
                && !item.text.is_empty()
            {
                self.turn(Speaker::Agent, item.text, start, at, true);
            }
        }
        // Tools still running: the record says they never answered.
        let pending: Vec<(String, PendingTool)> = self.tools.drain().collect();
        for (call_id, tool) in pending {
            let ms = now.saturating_duration_since(tool.started).as_secs_f64() * 1000.0;
            self.out
                .push_back(Output::Count(Counted::Tool { ok: false }));
            self.event(
                "tool_call",
                json!({"name": tool.name, "call_id": call_id, "arguments": tool.arguments,
                       "ok": false, "output": "the call ended before the tool answered",
                       "duration_ms": ms}),
            );
        }
        if let Some(conn) = self.current_conn() {
            self.out.push_back(Output::Close { conn });
        }
        if let Some(r) = self.renewing.take() {
            self.out.push_back(Output::Close { conn: r.conn });
        }
        self.link = Link::Failed;
        self.ended = true;
    }

    fn mark(&mut self, now: Instant, id: u64, played_ms: u64, at_ms: u64, state: MarkState) {
        let Some((item_id, kind)) = self.marks.remove(&id) else {
            return;
        };
        match kind {
            MarkKind::Start => {
                if state == MarkState::Played
                    && let Some(item) = self.spoken.iter_mut().find(|s| s.id == item_id)
                {
                    item.started_ms.get_or_insert(at_ms);
                    item.start_played.get_or_insert(played_ms);
                }
            }
            MarkKind::First => {
                if let Some((arrived, backend)) = self.first_audio.take()
                    && state == MarkState::Played
                {
                    let callgate = now.saturating_duration_since(arrived);
                    self.out.push_back(Output::Latency { backend, callgate });
                    self.event(
                        "response_latency",
                        json!({"backend_ms": backend.as_secs_f64() * 1000.0,
                               "callgate_ms": callgate.as_secs_f64() * 1000.0}),
                    );
                }
            }
            MarkKind::End if state == MarkState::Played => {
                if let Some(pos) = self.spoken.iter().position(|s| s.id == item_id) {
                    // Everything before it has played too.
                    let done: Vec<Spoken> = self.spoken.drain(..=pos).collect();
                    for item in done {
                        let start = item.started_ms.unwrap_or(at_ms);
                        if !item.text.is_empty() {
                            self.turn(Speaker::Agent, item.text, start, at_ms, false);
                        }
                    }
                }
                self.maybe_renew(now);
            }
            MarkKind::End => {}
        }
    }

    /// The playout was cleared: settle the items it cut against what the caller heard.
    /// `own`: the core's own clear (items made after it asked are not concerned).
    fn settle(&mut self, now: Instant, i: Interruption, source: &str, own: bool) {
        let bpm = self.wire.output.bytes_per_ms();
        let current = self.current_conn();
        let mut report = Vec::new();
        let (cut, keep): (Vec<Spoken>, Vec<Spoken>) = std::mem::take(&mut self.spoken)
            .into_iter()
            .partition(|item| !own || item.clears < self.clears);
        self.spoken = keep;
        for item in cut {
            let sent_ms = item.sent * 1000 / self.phone_rate;
            let received_ms = item.wire_bytes / bpm;
            // The call's own counts: heard since the call began now, minus the same count when
            // the item's first sample played.
            let heard_ms = match item.start_played {
                Some(start) => i
                    .played_ms
                    .saturating_sub(start)
                    .min(sent_ms)
                    .min(received_ms),
                None => 0,
            };
            let running = matches!(&self.response,
                Response::Running { id, cancelled: false } if *id == item.response_id)
                || !item.audio_done;
            let start_ms = item.started_ms.unwrap_or(i.at_ms);
            if item.queued && heard_ms >= sent_ms.min(received_ms) && !running {
                // It had played to its end: a whole turn.
                if !item.text.is_empty() {
                    self.turn(Speaker::Agent, item.text, start_ms, i.at_ms, false);
                }
                continue;
            }
            report.push(json!({"item_id": item.id, "heard_ms": heard_ms,
                               "received_ms": received_ms}));
            // Only the session that made the item may be told (a new session never had it).
            let told = Some(item.conn) == current;
            if heard_ms == 0 {
                // Nothing of it was heard: it must not stay in the conversation.
                if told {
                    self.send(client::delete(&item.id));
                }
                continue;
            }
            if told {
                self.send(client::truncate(&item.id, heard_ms));
            }
            let text = cut_text(&item.text, heard_ms, received_ms);
            if !text.is_empty() {
                self.turn(Speaker::Agent, text, start_ms, i.at_ms, true);
            }
        }
        let spoken: Vec<&str> = self.spoken.iter().map(|s| s.id.as_str()).collect();
        self.marks
            .retain(|_, (item, kind)| *kind == MarkKind::First || spoken.contains(&item.as_str()));
        if !report.is_empty() || i.dropped_ms > 0 {
            self.out.push_back(Output::Count(Counted::BargeIn));
            self.event(
                "barge_in",
                json!({"source": source, "played_ms": i.played_ms, "dropped_ms": i.dropped_ms,
                       "items": report, "at_ms": i.at_ms}),
            );
        }
        self.maybe_renew(now);
    }

    fn cancel_response(&mut self) {
        match &mut self.response {
            Response::Idle => {}
            // Not named yet: cancelled when it is.
            Response::Requested { cancel, .. } => *cancel = true,
            Response::Running { id, cancelled } => {
                if !*cancelled {
                    *cancelled = true;
                    let id = id.clone();
                    // The service may have cancelled it already (interrupt_response):
                    // `response_cancel_not_active` then comes back, and is expected.
                    self.send(client::response_cancel(&id));
                    self.cancelled.push_back(id);
                    if self.cancelled.len() > 16 {
                        self.cancelled.pop_front();
                    }
                }
            }
        }
    }

    fn agent_busy(&self) -> bool {
        let answering = match &self.response {
            Response::Idle => false,
            Response::Requested { cancel, .. } => !cancel,
            Response::Running { cancelled, .. } => !cancelled,
        };
        answering || !self.spoken.is_empty()
    }

    fn turn(&mut self, speaker: Speaker, text: String, start_ms: u64, end_ms: u64, cut: bool) {
        self.history.push_back((speaker, text.clone()));
        while self.history.len() > MAX_SEED_TURNS
            || self.history.iter().map(|(_, t)| t.len()).sum::<usize>() > MAX_SEED_CHARS
        {
            if self.history.pop_front().is_none() {
                break;
            }
        }
        self.out
            .push_back(Output::Command(AgentCommand::Transcript(Box::new(Turn {
                speaker,
                text,
                start_ms,
                end_ms: end_ms.max(start_ms),
                interrupted: cut,
            }))));
    }

    /// A tool finished.
    pub fn handle_tool_done(&mut self, now: Instant, done: ToolDone) {
        let Some(tool) = self.tools.remove(&done.call_id) else {
            return;
        };
        self.tool_result(now, &done.call_id, tool, done.ok, &done.output);
    }

    fn tool_result(
        &mut self,
        now: Instant,
        call_id: &str,
        tool: PendingTool,
        ok: bool,
        output: &str,
    ) {
        let ms = now.saturating_duration_since(tool.started).as_secs_f64() * 1000.0;
        let shown: String = output.chars().take(2000).collect();
        // A session that is gone cannot take the answer (the new one never made the call).
        let delivered = !self.ended && !self.hanging_up && Some(tool.conn) == self.current_conn();
        self.out.push_back(Output::Count(Counted::Tool { ok }));
        self.event(
            "tool_call",
            json!({"name": tool.name, "call_id": call_id, "arguments": tool.arguments,
                   "ok": ok, "output": shown, "duration_ms": ms, "delivered": delivered}),
        );
        if !delivered {
            return;
        }
        self.send(client::function_output(call_id, output));
        if ok && tool.name == Builtin::AgentTerminate.name() {
            // CallBridge announces and ends the call: the AI must not talk over it.
            self.terminating = true;
            return;
        }
        self.create_wanted = true;
        self.maybe_create();
    }

    fn maybe_create(&mut self) {
        if self.create_wanted
            && self.response == Response::Idle
            && self.tools.is_empty()
            && !self.hanging_up
            && !self.terminating
            && !self.caller_speaking
            && matches!(self.link, Link::Ready { .. })
        {
            self.create_wanted = false;
            self.request_response(true);
        }
    }

    /// An event from connection `conn`, read at `received`.
    pub fn handle_server(
        &mut self,
        now: Instant,
        conn: u64,
        event: ServerEvent,
        received: Instant,
    ) {
        if self.ended {
            return;
        }
        if self.renewing.is_some_and(|r| r.conn == conn) {
            self.renewal_event(now, conn, event);
            return;
        }
        if self.current_conn() != Some(conn) {
            return;
        }
        match event {
            ServerEvent::SessionCreated => {
                if let Link::Connecting { conn, .. } = self.link {
                    let config = self.session_config();
                    self.out.push_back(Output::Send {
                        conn,
                        message: Outgoing::Text(client::session_update(&config)),
                    });
                }
            }
            ServerEvent::SessionUpdated => {
                if let Link::Connecting { conn, .. } = self.link {
                    self.on_ready(now, conn);
                }
            }
            ServerEvent::ResponseCreated { id } => {
                let cancel = matches!(self.response, Response::Requested { cancel: true, .. });
                self.response = Response::Running {
                    id: id.clone(),
                    cancelled: false,
                };
                if cancel {
                    // Cancelled (barge-in) before the service named it: cancel it by name.
                    self.cancel_response();
                }
            }
            ServerEvent::ItemAdded { response_id, item } => {
                if item.kind == "function_call" {
                    if let (Some(name), Some(call_id)) = (item.name, item.call_id) {
                        self.call_items.insert(item.id, (name, call_id));
                    }
                    return;
                }
                if item.kind != "message" || item.role.as_deref() != Some("assistant") {
                    return;
                }
                let response_id = response_id
                    .or_else(|| match &self.response {
                        Response::Running { id, .. } => Some(id.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                if self.is_cancelled(&response_id) || self.hanging_up_done() {
                    return;
                }
                if !self.spoken.iter().any(|s| s.id == item.id) {
                    let spoken = self.spoken_item(&item.id, response_id);
                    self.spoken.push(spoken);
                }
            }
            ServerEvent::AudioDelta {
                response_id,
                item_id,
                audio,
            } => self.audio(&response_id, &item_id, &audio, received),
            ServerEvent::AudioDone { item_id } => {
                let tail = self.from_service.flush();
                if let Some(pos) = self.spoken.iter().position(|s| s.id == item_id && s.queued) {
                    if !tail.is_empty() {
                        self.spoken[pos].sent += tail.len() as u64
                            / u64::from(self.call.output_format.bytes_per_sample());
                        self.queue_audio(tail);
                    }
                    self.spoken[pos].audio_done = true;
                    let id = self.next_mark;
                    self.next_mark += 1;
                    self.marks.insert(id, (item_id, MarkKind::End));
                    self.out.push_back(Output::Command(AgentCommand::Mark(id)));
                }
            }
            ServerEvent::TranscriptDelta { item_id, delta } => {
                if let Some(item) = self.spoken.iter_mut().find(|s| s.id == item_id) {
                    item.text.push_str(&delta);
                }
            }
            ServerEvent::TranscriptDone {
                item_id,
                transcript,
            } => {
                if let Some(item) = self.spoken.iter_mut().find(|s| s.id == item_id) {
                    item.text = transcript;
                }
            }
            ServerEvent::FunctionCall {
                response_id,
                item_id,
                call_id,
                name,
                arguments,
            } => {
                let name = name.or_else(|| {
                    item_id
                        .as_ref()
                        .and_then(|i| self.call_items.get(i))
                        .map(|(n, _)| n.clone())
                });
                self.function_call(
                    now,
                    response_id,
                    call_id,
                    name.unwrap_or_default(),
                    arguments,
                );
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
            } => {
                self.caller_speaking = true;
                let at = self.input_ms_to_call(audio_start_ms);
                self.speech.push_back((item_id, at, None));
                while self.speech.len() > MAX_PENDING_SPEECH {
                    self.speech.pop_front();
                }
                if self.agent_busy() && !self.hanging_up {
                    // Barge-in: stop the audio now; the clear's report settles the items.
                    if self.spoken.iter().any(|s| s.queued) {
                        self.clearing = true;
                        self.clears += 1;
                        self.out.push_back(Output::Clear);
                    }
                    self.cancel_response();
                }
            }
            ServerEvent::SpeechStopped {
                item_id,
                audio_end_ms,
            } => {
                self.caller_speaking = false;
                let at = self.input_ms_to_call(audio_end_ms);
                if let Some(s) = self.speech.iter_mut().find(|s| s.0 == item_id) {
                    s.2 = Some(at);
                }
                self.turn_end = Some(received);
                self.first_audio = None;
                if self.plan.settings.turn_detection.create_response == Some(false) {
                    // The service detects the turn; callgate asks for the answer.
                    self.request_response(false);
                } else {
                    // The service answers on its own, and that answer sees any tool output.
                    self.create_wanted = false;
                }
            }
            ServerEvent::CallerTranscript {
                item_id,
                transcript,
            } => {
                let (start, end) = match self.speech.iter().position(|s| s.0 == item_id) {
                    Some(pos) => {
                        let (_, start, end) = self.speech.remove(pos).unwrap_or_default();
                        (start, end.unwrap_or(start))
                    }
                    None => (self.ms(now), self.ms(now)),
                };
                let text = transcript.trim().to_owned();
                if !text.is_empty() {
                    self.turn(Speaker::Caller, text, start, end, false);
                }
            }
            ServerEvent::Error(e) => self.api_error(now, e),
            ServerEvent::Other(_) => {}
        }
    }

    fn hanging_up_done(&self) -> bool {
        self.hanging_up && self.hangup_call.is_none()
    }

    fn is_cancelled(&self, response_id: &str) -> bool {
        self.cancelled.iter().any(|c| c == response_id)
    }

    fn audio(&mut self, response_id: &str, item_id: &str, audio: &Bytes, received: Instant) {
        if self.is_cancelled(response_id) || self.hanging_up_done() {
            return;
        }
        let pos = match self.spoken.iter().position(|s| s.id == item_id) {
            Some(pos) => pos,
            None => {
                // Audio without its item announced (a lenient server): announce it now.
                let spoken = self.spoken_item(item_id, response_id.to_owned());
                self.spoken.push(spoken);
                self.spoken.len() - 1
            }
        };
        let phone = self.from_service.convert(audio);
        let bps = u64::from(self.call.output_format.bytes_per_sample());
        self.spoken[pos].wire_bytes += audio.len() as u64;
        if phone.is_empty() {
            return;
        }
        if !self.spoken[pos].queued {
            // Its Start mark goes just before its first sample: the mark's `played_ms` is
            // where the item begins on the call's count of what was heard.
            self.spoken[pos].queued = true;
            let id = self.next_mark;
            self.next_mark += 1;
            self.marks.insert(id, (item_id.to_owned(), MarkKind::Start));
            self.out.push_back(Output::Command(AgentCommand::Mark(id)));
            if let Some(end) = self.turn_end.take() {
                // The first audio of an answer: its first frame on its own, marked, so the
                // mark reports when that frame left.
                self.first_audio = Some((received, received.saturating_duration_since(end)));
                let frame = self.call.output_format.frame_bytes_20ms().min(phone.len());
                let first = phone.slice(..frame);
                let rest = phone.slice(frame..);
                self.spoken[pos].sent += first.len() as u64 / bps;
                self.queue_audio(first);
                let id = self.next_mark;
                self.next_mark += 1;
                self.marks.insert(id, (item_id.to_owned(), MarkKind::First));
                self.out.push_back(Output::Command(AgentCommand::Mark(id)));
                if !rest.is_empty() {
                    self.spoken[pos].sent += rest.len() as u64 / bps;
                    self.queue_audio(rest);
                }
                return;
            }
        }
        self.spoken[pos].sent += phone.len() as u64 / bps;
        self.queue_audio(phone);
    }

    /// An event of the session being set up for a renewal.
    fn renewal_event(&mut self, now: Instant, conn: u64, event: ServerEvent) {
        match event {
            ServerEvent::SessionCreated => {
                let config = self.session_config();
                self.out.push_back(Output::Send {
                    conn,
                    message: Outgoing::Text(client::session_update(&config)),
                });
            }
            ServerEvent::SessionUpdated => {
                if let Some(r) = &mut self.renewing {
                    r.ready = true;
                }
                self.maybe_renew(now);
            }
            ServerEvent::Error(e)
                if e.is_fatal() || e.event_id.as_deref() == Some("cg_session") =>
            {
                let reason = format!("the new session was refused ({})", e.code());
                self.abandon_renewal(now, &reason);
            }
            _ => {}
        }
    }

    fn function_call(
        &mut self,
        now: Instant,
        response_id: Option<String>,
        call_id: String,
        name: String,
        arguments: String,
    ) {
        if call_id.is_empty() || self.seen_calls.contains(&call_id) {
            return;
        }
        if response_id.as_ref().is_some_and(|r| self.is_cancelled(r)) {
            // The caller interrupted the answer that asked for it.
            return;
        }
        self.seen_calls.push_back(call_id.clone());
        if self.seen_calls.len() > MAX_SEEN_CALLS {
            self.seen_calls.pop_front();
        }
        let pending = PendingTool {
            name: name.clone(),
            arguments: recorded_arguments(&name, &arguments),
            started: now,
            conn: self.current_conn().unwrap_or(0),
        };
        let args: Value = match serde_json::from_str(&arguments) {
            Ok(v) => v,
            Err(e) => {
                let out = json!({"error": format!("the arguments are not JSON: {e}")}).to_string();
                self.tool_result(now, &call_id, pending, false, &out);
                return;
            }
        };
        let builtin = self
            .plan
            .settings
            .builtin_tools
            .iter()
            .copied()
            .find(|b| b.name() == name);
        match builtin {
            Some(Builtin::HangUp) => {
                // After the goodbye in this response has played: at its `response.done`.
                self.hangup_call = Some(call_id.clone());
                self.out
                    .push_back(Output::Count(Counted::Tool { ok: true }));
                self.event(
                    "tool_call",
                    json!({"name": name, "call_id": call_id, "arguments": arguments,
                           "ok": true, "output": "the call ends after the goodbye",
                           "duration_ms": 0.0}),
                );
            }
            Some(Builtin::SendDtmf) => {
                let digits = args.get("digits").and_then(Value::as_str).unwrap_or("");
                let keys: Option<Vec<Digit>> = digits.chars().map(Digit::from_char).collect();
                let out = match keys {
                    Some(keys) if !keys.is_empty() && keys.iter().all(|k| k.is_sendable()) => {
                        self.send_dtmf(&keys);
                        (true, format!("pressed {digits}"))
                    }
                    _ => (
                        false,
                        json!({"error": "digits must be one or more of 0-9, * and #"}).to_string(),
                    ),
                };
                self.tool_result(now, &call_id, pending, out.0, &out.1);
            }
            Some(Builtin::AgentTerminate) if self.call.protocol == Protocol::CallBridge => {
                self.tools.insert(call_id.clone(), pending);
                self.out.push_back(Output::Tool(ToolCall {
                    call_id,
                    tool: ToolKind::AgentTerminate,
                    arguments: args,
                }));
            }
            Some(Builtin::SendSms) if self.call.protocol == Protocol::CallBridge => {
                self.tools.insert(call_id.clone(), pending);
                self.out.push_back(Output::Tool(ToolCall {
                    call_id,
                    tool: ToolKind::SendSms,
                    arguments: args,
                }));
            }
            _ => match self.plan.tool_index(&name) {
                Some(index) => {
                    if let Err(problem) = self.plan.schemas[index].validate(&args) {
                        let out =
                            json!({"error": format!("invalid arguments: {problem}")}).to_string();
                        self.tool_result(now, &call_id, pending, false, &out);
                        return;
                    }
                    self.tools.insert(call_id.clone(), pending);
                    self.out.push_back(Output::Tool(ToolCall {
                        call_id,
                        tool: ToolKind::Http(index),
                        arguments: args,
                    }));
                }
                None => {
                    let out = json!({"error": format!("there is no tool {name:?}")}).to_string();
                    self.tool_result(now, &call_id, pending, false, &out);
                }
            },
        }
    }

    fn send_dtmf(&mut self, keys: &[Digit]) {
        const TONE_MS: u64 = 100;
        match self.call.protocol {
            Protocol::Inbound => {
                let Some(duration) = DtmfDuration::from_millis(TONE_MS) else {
                    return;
                };
                for &digit in keys {
                    self.out
                        .push_back(Output::Command(AgentCommand::Dtmf { digit, duration }));
                }
            }
            // CallBridge and Twilio have no DTMF message towards the caller: in-band tones,
            // generated here so the timeline knows their length.
            Protocol::CallBridge | Protocol::Twilio => {
                let format = self.call.output_format;
                let rate = format.sample_rate();
                let gap = vec![0i16; (rate as usize) * 60 / 1000];
                for &digit in keys {
                    let mut samples = callgate_audio::dtmf::tone(digit, TONE_MS as u32, rate, 0.25);
                    samples.extend_from_slice(&gap);
                    let chunk = callgate_audio::pcm::encode(format, &samples);
                    self.queue_audio(chunk);
                }
            }
        }
    }

    fn response_done(
        &mut self,
        now: Instant,
        id: String,
        status: &str,
        details: Value,
        calls: Vec<crate::protocol::Item>,
        usage: &Value,
    ) {
        // One response runs at a time: whatever ended, none runs now.
        self.response = Response::Idle;
        self.usage(usage);
        if matches!(status, "failed" | "incomplete") {
            self.event(
                "response_failed",
                json!({"response_id": id, "status": status, "details": details}),
            );
        }
        let cancelled = self.is_cancelled(&id) || status == "cancelled";
        if !cancelled {
            for call in calls {
                if let (Some(call_id), Some(name)) = (call.call_id, call.name) {
                    let args = call.arguments.unwrap_or_default();
                    self.function_call(now, Some(id.clone()), call_id, name, args);
                }
            }
        }
        if let Some(call_id) = self.hangup_call.take() {
            if cancelled {
                // The caller spoke over the goodbye before it was all sent: the call goes on.
                self.event("hang_up_cancelled", json!({"call_id": call_id}));
            } else {
                self.send(client::function_output(&call_id, "{\"ok\":true}"));
                // The goodbye is queued before this: the call hangs up once it has played.
                self.hang_up();
                return;
            }
        }
        self.maybe_create();
        self.maybe_renew(now);
    }

    fn usage(&mut self, usage: &Value) {
        let Some(u) = usage.as_object() else {
            return;
        };
        let n = |v: Option<&Value>| v.and_then(Value::as_f64).unwrap_or(0.0);
        let mut out = Vec::new();
        for (name, value) in [
            ("input_tokens", n(u.get("input_tokens"))),
            ("output_tokens", n(u.get("output_tokens"))),
            (
                "input_audio_tokens",
                n(usage.pointer("/input_token_details/audio_tokens")),
            ),
            (
                "input_text_tokens",
                n(usage.pointer("/input_token_details/text_tokens")),
            ),
            (
                "input_cached_tokens",
                n(usage.pointer("/input_token_details/cached_tokens")),
            ),
            (
                "output_audio_tokens",
                n(usage.pointer("/output_token_details/audio_tokens")),
            ),
            (
                "output_text_tokens",
                n(usage.pointer("/output_token_details/text_tokens")),
            ),
        ] {
            if value > 0.0 {
                out.push((name.to_owned(), value));
            }
        }
        if !out.is_empty() {
            self.out
                .push_back(Output::Command(AgentCommand::Usage(out)));
        }
    }

    fn api_error(&mut self, now: Instant, e: ApiError) {
        let ours = e.event_id.as_deref();
        if ours == Some("cg_create") {
            // Our response.create was refused (the service had started one of its own, which
            // may have taken our place in the bookkeeping). If it was to answer tool outputs,
            // it is asked again once the running response is done.
            if matches!(self.response, Response::Requested { .. }) {
                self.response = Response::Idle;
            }
            self.create_wanted |= self.last_create_for_tools;
        }
        match e.code() {
            // Expected after a barge-in: the service had cancelled (or finished) it already.
            "response_cancel_not_active" => {
                tracing::debug!("response.cancel found nothing running (expected).");
                return;
            }
            "conversation_already_has_active_response" => {
                tracing::debug!("response.create while one runs: asked again after it.");
                return;
            }
            _ => {}
        }
        let refused_setup =
            ours == Some("cg_session") && matches!(self.link, Link::Connecting { .. });
        if e.is_fatal() || refused_setup {
            // The service quotes part of a wrong key in its message: not for the record.
            let reason = if e.code() == "invalid_api_key" {
                "the service refused the API key (invalid_api_key)".to_owned()
            } else if refused_setup {
                format!(
                    "the service refused the session settings: {} ({})",
                    e.message(),
                    e.code()
                )
            } else {
                format!(
                    "the service refused the session: {} ({})",
                    e.message(),
                    e.code()
                )
            };
            if let Some(conn) = self.current_conn() {
                self.out.push_back(Output::Close { conn });
            }
            self.fail(now, &reason, true);
            return;
        }
        if e.code() == "session_expired" {
            if let Some(conn) = self.current_conn() {
                self.out.push_back(Output::Close { conn });
                self.lose(
                    now,
                    Lost {
                        fatal: false,
                        reason: "the session expired".into(),
                    },
                );
            }
            return;
        }
        self.errors += 1;
        tracing::debug!(
            code = e.code(),
            message = e.message(),
            "The AI service reported an error."
        );
        if self.errors <= MAX_ERROR_EVENTS {
            self.event(
                "backend_error",
                json!({"type": e.kind, "code": e.code, "message": e.message,
                       "event_id": e.event_id}),
            );
        }
    }
}

/// The part of an agent turn's text the caller heard, at a word boundary: the share of the
/// text that `heard_ms` is of `total_ms` (the service gives no word timings).
pub fn cut_text(text: &str, heard_ms: u64, total_ms: u64) -> String {
    if total_ms == 0 || heard_ms >= total_ms {
        return text.to_owned();
    }
    let chars: Vec<char> = text.chars().collect();
    let keep = (chars.len() as u64 * heard_ms / total_ms) as usize;
    let mut end = keep.min(chars.len());
    // Back to the end of the last whole word (unless the text has no spaces at all).
    if end < chars.len()
        && !chars[end].is_whitespace()
        && let Some(space) = chars[..end].iter().rposition(|c| c.is_whitespace())
    {
        end = space;
    }
    chars[..end]
        .iter()
        .collect::<String>()
        .trim_end()
        .to_owned()
}

impl Wire {
    fn choose_format(setting: crate::settings::WireAudio, phone: AudioFormat) -> crate::WireFormat {
        use crate::WireFormat as W;
        use crate::settings::WireAudio as S;
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

    /// The formats for a call whose phone leg sends `input` and plays `output`.
    pub fn choose(
        setting: crate::settings::WireAudio,
        input: AudioFormat,
        output: AudioFormat,
    ) -> Self {
        Self {
            input: Self::choose_format(setting, input),
            output: Self::choose_format(setting, output),
        }
    }
}

/// A tool's arguments as the record keeps them: a text message's content is the caller's
/// business, so `send_sms` keeps its length (and title) only.
fn recorded_arguments(name: &str, arguments: &str) -> String {
    if name != Builtin::SendSms.name() {
        return arguments.to_owned();
    }
    let args: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
    let chars = args
        .get("content")
        .and_then(Value::as_str)
        .map(|c| c.chars().count());
    json!({"content_chars": chars, "title": args.get("title")}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{HttpTool, RealtimeSettings};
    use callgate_agent::{Epoch, PhoneInfo};
    use callgate_proto::callbridge::CallConfig;

    #[test]
    fn text_is_cut_at_a_word_boundary_in_proportion() {
        let text = "Our opening hours are nine to five on weekdays.";
        assert_eq!(cut_text(text, 500, 1000), "Our opening hours are");
        assert_eq!(cut_text(text, 1000, 1000), text);
        assert_eq!(cut_text(text, 0, 1000), "");
        assert_eq!(
            cut_text("안녕하세요 고객님 무엇을 도와드릴까요", 600, 1000),
            "안녕하세요 고객님"
        );
    }

    fn settings() -> RealtimeSettings {
        RealtimeSettings {
            api_key_env: "PATH".into(),
            ..RealtimeSettings::default()
        }
    }

    fn call(protocol: Protocol) -> CallInfo {
        CallInfo {
            call_id: "call-1".into(),
            protocol,
            caller: "01012341234".into(),
            callee: "07012345678".into(),
            external_id: "10014473".into(),
            phone: match protocol {
                Protocol::CallBridge => PhoneInfo::CallBridge(CallConfig {
                    site_id: "921004322052".into(),
                    caller: "01012341234".into(),
                    callee: "07012345678".into(),
                    cdr_id: "10014473".into(),
                    call_action_id: "1.758187055878E9".into(),
                    ivr_ip: "192.168.150.103:29034".into(),
                    agent_id: "agent-main".into(),
                    agent_type: "voice".into(),
                }),
                Protocol::Inbound | Protocol::Twilio => PhoneInfo::Inbound {
                    caller_id: "01012341234".into(),
                    did_number: "07012345678".into(),
                    session_id: "10014473".into(),
                },
            },
            route: "ai".into(),
            agent: "realtime".into(),
            input_format: AudioFormat::Pcm8000,
            output_format: AudioFormat::Pcm8000,
        }
    }

    /// A core on a virtual clock, with its outputs collected.
    struct T {
        core: Core,
        t0: Instant,
        now: Instant,
        sent: Vec<Value>,
        audio: u64,
        commands: Vec<AgentCommand>,
        other: Vec<Output>,
    }

    impl T {
        fn new(settings: RealtimeSettings, protocol: Protocol) -> Self {
            let t0 = Instant::now();
            let plan = Arc::new(crate::test_plan(settings));
            let mut t = Self {
                core: Core::new(plan, call(protocol), t0, t0),
                t0,
                now: t0,
                sent: Vec::new(),
                audio: 0,
                commands: Vec::new(),
                other: Vec::new(),
            };
            t.drain();
            t
        }

        fn at(&mut self, ms: u64) {
            self.now = self.t0 + Duration::from_millis(ms);
        }

        fn drain(&mut self) {
            while let Some(o) = self.core.poll_output() {
                match o {
                    Output::Send {
                        message: Outgoing::Text(t),
                        ..
                    } => self.sent.push(serde_json::from_str(&t).unwrap()),
                    Output::Send {
                        message: Outgoing::Append(a),
                        ..
                    } => self.sent.push(json!({"type": "append", "bytes": a.len()})),
                    Output::Audio(a) => self.audio += a.len() as u64 / 2,
                    Output::Command(c) => self.commands.push(c),
                    o => self.other.push(o),
                }
            }
        }

        fn server(&mut self, event: ServerEvent) {
            let conn = self.core.current_conn().unwrap_or(0);
            self.core.handle_server(self.now, conn, event, self.now);
            self.drain();
        }

        fn call_event(&mut self, event: AgentEvent) {
            self.core.handle_call_event(self.now, event);
            self.drain();
        }

        fn ready(&mut self) {
            self.server(ServerEvent::SessionCreated);
            self.server(ServerEvent::SessionUpdated);
        }

        fn lost(&mut self, conn: u64, fatal: bool, reason: &str) {
            let lost = Lost {
                fatal,
                reason: reason.into(),
            };
            self.core.handle_lost(self.now, conn, lost);
            self.drain();
        }

        fn server_on(&mut self, conn: u64, event: ServerEvent) {
            self.core.handle_server(self.now, conn, event, self.now);
            self.drain();
        }

        /// The call reports that `item` began playing when `played_ms` of agent audio had
        /// been heard (its Start mark).
        fn started(&mut self, item: &str, played_ms: u64, at_ms: u64) {
            let id = *self
                .core
                .marks
                .iter()
                .find(|(_, (i, k))| i == item && *k == MarkKind::Start)
                .expect("a start mark")
                .0;
            self.call_event(AgentEvent::Mark {
                id,
                played_ms,
                at_ms,
                state: MarkState::Played,
            });
        }

        fn sent_types(&mut self) -> Vec<String> {
            let types = self
                .sent
                .iter()
                .map(|v| v["type"].as_str().unwrap_or("").to_owned())
                .collect();
            self.sent.clear();
            types
        }

        /// A whole spoken answer of `ms` in one burst (G.711: 8 bytes per ms).
        fn speak(&mut self, response: &str, item: &str, ms: u64, text: &str) {
            self.server(ServerEvent::ResponseCreated {
                id: response.into(),
            });
            self.server(ServerEvent::ItemAdded {
                response_id: Some(response.into()),
                item: crate::protocol::Item {
                    id: item.into(),
                    kind: "message".into(),
                    role: Some("assistant".into()),
                    name: None,
                    call_id: None,
                    arguments: None,
                },
            });
            for _ in 0..ms / 100 {
                self.server(ServerEvent::AudioDelta {
                    response_id: response.into(),
                    item_id: item.into(),
                    audio: Bytes::from(vec![0xFFu8; 800]),
                });
            }
            self.server(ServerEvent::TranscriptDone {
                item_id: item.into(),
                transcript: text.into(),
            });
            self.server(ServerEvent::AudioDone {
                item_id: item.into(),
            });
        }

        fn done(&mut self, response: &str) {
            self.server(ServerEvent::ResponseDone {
                id: response.into(),
                status: "completed".into(),
                status_details: Value::Null,
                calls: Vec::new(),
                usage: json!({"input_tokens": 10, "output_tokens": 20,
                              "output_token_details": {"audio_tokens": 15}}),
            });
        }

        fn cleared(&mut self, played_ms: u64, at_ms: u64) {
            self.call_event(AgentEvent::Cleared(Interruption {
                played_ms,
                dropped_ms: 1,
                at_ms,
                epoch: Epoch(1),
            }));
        }

        fn turns(&self) -> Vec<Turn> {
            self.commands
                .iter()
                .filter_map(|c| match c {
                    AgentCommand::Transcript(t) => Some((**t).clone()),
                    _ => None,
                })
                .collect()
        }

        fn events(&self, name: &str) -> Vec<Value> {
            self.commands
                .iter()
                .filter_map(|c| match c {
                    AgentCommand::Event(e) if e.name == name => Some(e.detail.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn the_session_is_set_up_for_the_phone_format_and_the_ai_greets() {
        let mut t = T::new(settings(), Protocol::CallBridge);
        assert_eq!(t.commands, vec![AgentCommand::Answer]);
        assert_eq!(t.other, vec![Output::Connect { conn: 1 }]);
        t.server(ServerEvent::SessionCreated);
        let update = t.sent.remove(0);
        assert_eq!(update["type"], "session.update");
        let s = &update["session"];
        assert_eq!(s["type"], "realtime");
        assert_eq!(s["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(s["audio"]["output"]["format"]["type"], "audio/pcmu");
        assert_eq!(s["audio"]["output"]["voice"], "marin");
        assert_eq!(s["tools"][0]["name"], "hang_up");
        assert!(update.get("modalities").is_none() && s.get("modalities").is_none());
        // Caller audio before the session is ready is kept, then sent.
        t.core
            .handle_caller_audio(t.now, &Bytes::from(vec![0u8; 320]));
        t.server(ServerEvent::SessionUpdated);
        assert_eq!(
            t.sent_types(),
            ["append", "conversation.item.create", "response.create"]
        );
        assert_eq!(t.events("backend_connected").len(), 1);
    }

    #[test]
    fn barge_in_truncates_each_item_at_exactly_what_was_heard() {
        let mut t = T::new(settings(), Protocol::CallBridge);
        t.ready();
        t.sent.clear();
        // A 3 s answer arrives in one burst at 100 ms.
        t.at(100);
        t.speak(
            "resp_1",
            "item_1",
            3000,
            "Hello, thank you for calling the front desk today.",
        );
        t.started("item_1", 0, 100);
        assert_eq!(t.audio, 3000 * 8, "all of it handed to the playout at once");
        t.done("resp_1");
        // The service hears the caller 1.24 s into the answer (played_ms from the call).
        t.at(1400);
        t.server(ServerEvent::SpeechStarted {
            item_id: "item_u1".into(),
            audio_start_ms: 1300,
        });
        assert!(
            t.other.contains(&Output::Clear),
            "the playout is cleared at once"
        );
        t.cleared(1240, 1400);
        let sent = std::mem::take(&mut t.sent);
        let truncate = sent
            .iter()
            .find(|v| v["type"] == "conversation.item.truncate")
            .expect("a truncate");
        assert_eq!(truncate["item_id"], "item_1");
        assert_eq!(truncate["audio_end_ms"], 1240);
        assert_eq!(truncate["content_index"], 0);
        assert!(
            !sent.iter().any(|v| v["type"] == "response.cancel"),
            "the response was done: nothing to cancel"
        );
        let turns = t.turns();
        assert_eq!(turns.len(), 1);
        assert!(turns[0].interrupted);
        assert_eq!(turns[0].text, "Hello, thank you for");
        // The next answer starts where the caller's hearing stopped: a second barge-in
        // 500 ms into it truncates at 500, though 3 s were sent before.
        t.at(3000);
        t.speak("resp_2", "item_2", 2000, "Sure.");
        t.started("item_2", 1240, 3000);
        t.server(ServerEvent::SpeechStarted {
            item_id: "item_u2".into(),
            audio_start_ms: 3400,
        });
        assert!(
            t.sent.iter().any(|v| v["type"] == "response.cancel"),
            "still running"
        );
        t.cleared(1240 + 500, 3500);
        let truncate = t
            .sent
            .iter()
            .find(|v| v["type"] == "conversation.item.truncate")
            .expect("a truncate");
        assert_eq!(truncate["item_id"], "item_2");
        assert_eq!(truncate["audio_end_ms"], 500);
        // Later audio of the cancelled response is not played.
        let before = t.audio;
        t.server(ServerEvent::AudioDelta {
            response_id: "resp_2".into(),
            item_id: "item_2".into(),
            audio: Bytes::from(vec![0u8; 800]),
        });
        assert_eq!(t.audio, before);
    }

    #[test]
    fn an_item_nothing_of_which_was_heard_is_deleted_and_truncation_never_exceeds_the_item() {
        let mut t = T::new(settings(), Protocol::CallBridge);
        t.ready();
        t.at(100);
        t.speak("resp_1", "item_1", 1000, "One.");
        t.speak("resp_1", "item_2", 1000, "Two.");
        t.started("item_1", 0, 100);
        t.started("item_2", 1000, 1100);
        t.sent.clear();
        t.server(ServerEvent::SpeechStarted {
            item_id: "u".into(),
            audio_start_ms: 0,
        });
        // The call reports more heard than item_1 holds (it moved on to item_2 by 300 ms).
        t.cleared(1300, 1400);
        let by_type = |sent: &[Value], ty: &str| -> Vec<Value> {
            sent.iter().filter(|v| v["type"] == ty).cloned().collect()
        };
        assert!(
            by_type(&t.sent, "conversation.item.truncate")
                .iter()
                .all(|v| v["item_id"] != "item_1"),
            "item_1 was heard whole"
        );
        assert_eq!(
            by_type(&t.sent, "conversation.item.truncate")[0]["audio_end_ms"],
            300
        );
        t.sent.clear();
        // A barge-in before any of the next answer played: delete, not truncate at 0.
        t.speak("resp_2", "item_3", 1000, "Three.");
        t.server(ServerEvent::SpeechStarted {
            item_id: "u2".into(),
            audio_start_ms: 0,
        });
        t.cleared(1300, 1500);
        assert_eq!(by_type(&t.sent, "conversation.item.truncate").len(), 0);
        assert_eq!(
            by_type(&t.sent, "conversation.item.delete")[0]["item_id"],
            "item_3"
        );
    }

    #[test]
    fn a_dropped_connection_is_reseeded_and_a_bad_key_plays_the_fallback() {
        let mut t = T::new(settings(), Protocol::CallBridge);
        t.ready();
        t.at(100);
        t.speak("resp_1", "item_1", 500, "Welcome.");
        t.done("resp_1");
        t.call_event(AgentEvent::Mark {
            id: 2,
            played_ms: 500,
            at_ms: 600,
            state: MarkState::Played,
        });
        t.server(ServerEvent::CallerTranscript {
            item_id: "u1".into(),
            transcript: "What are your hours?".into(),
        });
        t.sent.clear();
        t.at(1000);
        t.lost(1, false, "reset");
        assert_eq!(t.events("backend_lost").len(), 1);
        // The first retry is immediate.
        t.core.handle_timeout(t.now);
        t.drain();
        assert!(t.other.contains(&Output::Connect { conn: 2 }));
        // Audio while reconnecting is kept for the new session.
        t.core
            .handle_caller_audio(t.now, &Bytes::from(vec![0u8; 320]));
        t.at(1300);
        t.ready();
        let types = t.sent_types();
        assert_eq!(
            types,
            [
                "session.update",
                "conversation.item.create",
                "conversation.item.create",
                "append"
            ]
        );
        assert_eq!(t.events("backend_reconnected")[0]["outage_ms"], 300);
        // A bad key: the fallback message, then the hangup; no retry.
        let mut t = T::new(settings(), Protocol::CallBridge);
        t.lost(1, true, "HTTP 401");
        assert_eq!(t.audio, 8000, "one second of fallback");
        assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
        assert_eq!(t.events("backend_failed")[0]["fatal"], true);
        assert_eq!(t.core.poll_timeout(), None, "nothing more to wait for");
    }

    #[test]
    fn reconnecting_gives_up_after_reconnect_within() {
        let mut t = T::new(settings(), Protocol::Inbound);
        t.ready();
        t.lost(1, false, "reset");
        for attempt in 0..100 {
            let Some(at) = t.core.poll_timeout() else {
                break;
            };
            t.now = at;
            t.core.handle_timeout(t.now);
            t.drain();
            if let Some(conn) = t.core.current_conn() {
                t.core.handle_lost(
                    t.now,
                    conn,
                    Lost {
                        fatal: false,
                        reason: format!("refused {attempt}"),
                    },
                );
                t.drain();
            }
            if t.commands.contains(&AgentCommand::Hangup) {
                break;
            }
        }
        let failed = t.events("backend_failed");
        assert_eq!(failed.len(), 1, "{:?}", t.commands);
        assert_eq!(failed[0]["fatal"], false);
        let elapsed = t.now.duration_since(t.t0);
        assert!(elapsed <= Duration::from_secs(10), "{elapsed:?}");
        assert!(elapsed >= Duration::from_secs(9), "{elapsed:?}");
    }

    #[test]
    fn tools_answer_after_the_response_is_done_and_bad_arguments_never_run() {
        let mut s = settings();
        s.tools.push(HttpTool {
            name: "lookup".into(),
            description: "Look up an order".into(),
            parameters: json!({"type": "object", "properties": {"id": {"type": "string"}},
                               "required": ["id"]}),
            url: "http://127.0.0.1:1/".into(),
            method: crate::settings::Method::Post,
            headers: Default::default(),
            headers_env: Default::default(),
            timeout: None,
        });
        let mut t = T::new(s, Protocol::Inbound);
        t.ready();
        t.sent.clear();
        t.server(ServerEvent::ResponseCreated { id: "r1".into() });
        t.server(ServerEvent::FunctionCall {
            response_id: Some("r1".into()),
            item_id: None,
            call_id: "call_bad".into(),
            name: Some("lookup".into()),
            arguments: "{\"order\": 1}".into(),
        });
        let output = t
            .sent
            .iter()
            .find(|v| v["type"] == "conversation.item.create")
            .expect("an output at once");
        assert!(
            output["item"]["output"]
                .as_str()
                .unwrap()
                .contains("missing required property")
        );
        assert!(
            !t.sent.iter().any(|v| v["type"] == "response.create"),
            "not before response.done"
        );
        t.server(ServerEvent::FunctionCall {
            response_id: Some("r1".into()),
            item_id: None,
            call_id: "call_ok".into(),
            name: Some("lookup".into()),
            arguments: "{\"id\": \"A1\"}".into(),
        });
        assert!(matches!(t.other.last(), Some(Output::Tool(c)) if c.call_id == "call_ok"));
        t.done("r1");
        assert!(
            !t.sent.iter().any(|v| v["type"] == "response.create"),
            "a tool is still running"
        );
        t.at(700);
        t.core.handle_tool_done(
            t.now,
            ToolDone {
                call_id: "call_ok".into(),
                ok: true,
                output: "{\"status\":\"shipped\"}".into(),
            },
        );
        t.drain();
        let types = t.sent_types();
        assert_eq!(types.last().map(String::as_str), Some("response.create"));
        let calls = t.events("tool_call");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1]["duration_ms"], 700.0);
        assert!(t.commands.iter().any(|c| matches!(c, AgentCommand::Usage(u)
            if u.contains(&("output_audio_tokens".to_owned(), 15.0)))));
    }

    #[test]
    fn hang_up_waits_for_the_goodbye() {
        let mut t = T::new(settings(), Protocol::Inbound);
        t.ready();
        t.speak("r1", "item_1", 1000, "Goodbye!");
        t.server(ServerEvent::FunctionCall {
            response_id: Some("r1".into()),
            item_id: None,
            call_id: "call_h".into(),
            name: Some("hang_up".into()),
            arguments: "{}".into(),
        });
        assert!(!t.commands.contains(&AgentCommand::Hangup));
        t.done("r1");
        let audio_at = t
            .commands
            .iter()
            .position(|c| *c == AgentCommand::Hangup)
            .expect("hangs up");
        assert!(
            t.commands[..audio_at]
                .iter()
                .any(|c| matches!(c, AgentCommand::Mark(_))),
            "after the goodbye's audio and its end mark"
        );
    }

    #[test]
    fn a_session_is_renewed_after_session_max_at_a_quiet_moment() {
        let mut s = settings();
        s.session_max = crate::settings::Dur(Duration::from_secs(60));
        let mut t = T::new(s, Protocol::Inbound);
        t.ready();
        t.at(50_000);
        t.speak("r1", "item_1", 500, "Still there?");
        t.done("r1");
        t.other.clear();
        // Due, but the answer is still playing: no renewal yet.
        t.at(60_000);
        t.core.handle_timeout(t.now);
        t.drain();
        assert!(!t.other.iter().any(|o| matches!(o, Output::Connect { .. })));
        // It has played: the renewal happens now, seeded like a reconnection.
        t.call_event(AgentEvent::Mark {
            id: 2,
            played_ms: 500,
            at_ms: 60_100,
            state: MarkState::Played,
        });
        // Make before break: the new session is set up while the old one serves.
        assert_eq!(t.other, vec![Output::Connect { conn: 2 }]);
        t.other.clear();
        t.sent.clear();
        t.server_on(2, ServerEvent::SessionCreated);
        assert_eq!(t.sent_types(), ["session.update"]);
        assert_eq!(
            t.core.current_conn(),
            Some(1),
            "the old session still serves"
        );
        t.server_on(2, ServerEvent::SessionUpdated);
        assert_eq!(
            t.other,
            vec![Output::Close { conn: 1 }, Output::Count(Counted::Connected)]
        );
        assert_eq!(t.core.current_conn(), Some(2));
        assert_eq!(t.events("backend_renewed").len(), 1);
        assert_eq!(
            t.sent_types(),
            ["conversation.item.create"],
            "the agent's turn, as text"
        );
        assert!(
            t.events("backend_lost").is_empty(),
            "a renewal is not an outage"
        );
    }

    #[test]
    fn callgates_own_barge_in_cancels_and_truncates_too() {
        let mut t = T::new(settings(), Protocol::Inbound);
        t.ready();
        t.speak("r1", "item_1", 2000, "A long answer that goes on.");
        t.started("item_1", 0, 200);
        t.sent.clear();
        // The call's VAD cleared the playout by itself.
        t.call_event(AgentEvent::BargeIn(Interruption {
            played_ms: 700,
            dropped_ms: 1300,
            at_ms: 900,
            epoch: Epoch(1),
        }));
        let types = t.sent_types();
        assert_eq!(types, ["response.cancel", "conversation.item.truncate"]);
        assert_eq!(t.events("barge_in")[0]["source"], "callgate");
        assert!(
            !t.other.contains(&Output::Clear),
            "the call cleared already"
        );
    }

    #[test]
    fn a_response_cancelled_before_it_was_named_is_cancelled_by_name() {
        let mut t = T::new(
            RealtimeSettings {
                greeting: true,
                ..settings()
            },
            Protocol::Inbound,
        );
        t.ready();
        t.sent.clear();
        // The caller speaks before the greeting's response was even created.
        t.server(ServerEvent::SpeechStarted {
            item_id: "u".into(),
            audio_start_ms: 0,
        });
        assert!(t.sent.is_empty(), "nothing to cancel by name yet");
        t.server(ServerEvent::ResponseCreated { id: "r1".into() });
        let cancel = t.sent.pop().expect("a cancel");
        assert_eq!(cancel["type"], "response.cancel");
        assert_eq!(cancel["response_id"], "r1");
        // Its audio is not played.
        let before = t.audio;
        t.server(ServerEvent::AudioDelta {
            response_id: "r1".into(),
            item_id: "i1".into(),
            audio: Bytes::from(vec![0u8; 800]),
        });
        assert_eq!(t.audio, before);
    }

    #[test]
    fn a_refused_create_for_tool_outputs_is_asked_again_after_the_running_response() {
        let mut s = settings();
        s.builtin_tools.push(Builtin::SendDtmf);
        let mut t = T::new(s, Protocol::Inbound);
        t.ready();
        t.server(ServerEvent::ResponseCreated { id: "r1".into() });
        t.server(ServerEvent::FunctionCall {
            response_id: Some("r1".into()),
            item_id: None,
            call_id: "c1".into(),
            name: Some("send_dtmf".into()),
            arguments: "{\"digits\": \"12#\"}".into(),
        });
        let dtmf = t
            .commands
            .iter()
            .filter(|c| matches!(c, AgentCommand::Dtmf { .. }))
            .count();
        assert_eq!(dtmf, 3, "protocol DTMF on an inbound call");
        t.done("r1");
        assert_eq!(t.sent.last().unwrap()["type"], "response.create");
        t.sent.clear();
        // Our create raced with one the service started (r2): refused.
        t.server(ServerEvent::ResponseCreated { id: "r2".into() });
        t.server(ServerEvent::Error(ApiError {
            kind: Some("invalid_request_error".into()),
            code: Some("conversation_already_has_active_response".into()),
            message: None,
            event_id: Some("cg_create".into()),
        }));
        assert!(t.sent.is_empty(), "not while r2 runs");
        t.done("r2");
        assert_eq!(t.sent_types(), ["response.create"], "asked again, after r2");
    }

    #[test]
    fn a_failed_renewal_keeps_the_old_session() {
        let mut s = settings();
        s.session_max = crate::settings::Dur(Duration::from_secs(60));
        let mut t = T::new(s, Protocol::Inbound);
        t.ready();
        t.at(60_000);
        // The caller is speaking: not quiet, no renewal.
        t.server(ServerEvent::SpeechStarted {
            item_id: "u".into(),
            audio_start_ms: 0,
        });
        t.other.clear();
        t.core.handle_timeout(t.now);
        t.drain();
        assert!(t.other.is_empty(), "{:?}", t.other);
        t.server(ServerEvent::SpeechStopped {
            item_id: "u".into(),
            audio_end_ms: 100,
        });
        assert!(t.other.is_empty(), "an answer is coming: still not quiet");
        t.server(ServerEvent::ResponseCreated { id: "r1".into() });
        t.done("r1");
        assert_eq!(t.other, vec![Output::Connect { conn: 2 }]);
        t.other.clear();
        t.lost(2, true, "refused");
        assert_eq!(t.core.current_conn(), Some(1), "the old session goes on");
        assert!(t.events("backend_failed").is_empty());
        assert_eq!(t.events("backend_renewal_failed").len(), 1);
        assert_eq!(t.core.poll_timeout(), Some(t.now + RENEW_RETRY));
    }

    #[test]
    fn refused_session_settings_play_the_fallback_at_once() {
        let mut t = T::new(settings(), Protocol::Inbound);
        t.server(ServerEvent::SessionCreated);
        t.server(ServerEvent::Error(ApiError {
            kind: Some("invalid_request_error".into()),
            code: Some("invalid_value".into()),
            message: Some("Invalid value: 'nova'.".into()),
            event_id: Some("cg_session".into()),
        }));
        let failed = t.events("backend_failed");
        assert_eq!(failed[0]["fatal"], true);
        assert!(failed[0]["reason"].as_str().unwrap().contains("nova"));
        assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
    }

    #[test]
    fn max_duration_hangs_up_after_the_audio_queued() {
        let mut s = settings();
        s.max_duration = crate::settings::Dur(Duration::from_secs(120));
        let mut t = T::new(s, Protocol::Inbound);
        t.ready();
        assert_eq!(t.core.poll_timeout(), Some(t.t0 + Duration::from_secs(120)));
        t.at(120_000);
        t.core.handle_timeout(t.now);
        t.drain();
        assert_eq!(t.events("max_duration").len(), 1);
        assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
    }

    #[test]
    fn a_tool_answer_after_a_reconnection_is_recorded_not_sent() {
        let mut s = settings();
        s.tools.push(HttpTool {
            name: "slow".into(),
            description: "d".into(),
            parameters: json!({"type": "object"}),
            url: "http://127.0.0.1:1/".into(),
            method: crate::settings::Method::Post,
            headers: Default::default(),
            headers_env: Default::default(),
            timeout: None,
        });
        let mut t = T::new(s, Protocol::Inbound);
        t.ready();
        t.server(ServerEvent::ResponseCreated { id: "r1".into() });
        t.server(ServerEvent::FunctionCall {
            response_id: Some("r1".into()),
            item_id: None,
            call_id: "c1".into(),
            name: Some("slow".into()),
            arguments: "{}".into(),
        });
        t.lost(1, false, "reset");
        t.core.handle_timeout(t.now);
        t.drain();
        t.ready();
        t.sent.clear();
        t.core.handle_tool_done(
            t.now,
            ToolDone {
                call_id: "c1".into(),
                ok: true,
                output: "late".into(),
            },
        );
        t.drain();
        assert!(
            t.sent.is_empty(),
            "the new session never made that call: {:?}",
            t.sent
        );
        assert_eq!(t.events("tool_call")[0]["delivered"], false);
    }
}
