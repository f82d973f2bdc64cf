//! Agents: what handles a call. An agent sees events and sends commands; it never sees a socket.
//!
//! # Layout
//! - [`AgentEvent`], [`AgentCommand`], [`CallInfo`]: what flows between a call and its agent;
//!   [`wire`] connects them ([`AgentIo`] for the agent, [`CallSide`] for the call).
//! - [`queue`]: the bounded event queue toward the agent (audio drops oldest, control never
//!   waits).
//! - [`Agent`], [`AgentFactory`]: how an agent is written and started; [`catalog`]: agents by
//!   name, each building its factory from typed, validated settings.
//! - [`Spawner`]: call-scoped tasks for an agent's slow or CPU-heavy work.
//! - [`echo`], [`tone`]: the built-in diagnostic agents.
//!
//! # Lifetime
//! An agent's future is owned and polled by its call's task (no task of its own: an echoed
//! frame costs no cross-task wake-up). It talks to the call only through [`AgentIo`], and it
//! ends when its event queue closes (the call ended and dropped its sender), so an agent never
//! outlives its call. Tasks it starts with [`AgentIo::spawner`] are cancelled when the call
//! ends. A panic in an agent is caught by the call and ends the call as `agent_failed`.
//!
//! # What the call guarantees (see `docs/agents.md`)
//! - **Positions are totals.** `played_ms` in [`AgentEvent::BargeIn`], [`AgentEvent::Cleared`]
//!   and [`AgentEvent::Mark`] is the total of agent audio the caller has heard since the call
//!   began (gaps in the playout do not count), so the difference between two reports is
//!   exactly the audio heard in between.
//! - **Nothing from before a clear plays after it.** Every clear (the agent's, a barge-in, an
//!   operator's) starts a new [`Epoch`]; audio sent in an older epoch is dropped by the call,
//!   including audio still in the agent's own pipeline when it sends it with
//!   [`AgentSender::send_in`].
//! - **Hangup cannot be lost.** Once the agent asks to hang up (or returns), the call ends as
//!   soon as the audio already queued has played or been cleared; nothing undoes it.
//! - **Refusals are told.** A command the call cannot carry out comes back as
//!   [`AgentEvent::Refused`].

pub mod catalog;
mod commands;
pub mod echo;
pub mod queue;
mod settings;
mod spawner;
#[cfg(test)]
mod testing;
pub mod tone;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use callgate_proto::callbridge::CallConfig;
use callgate_proto::{AudioFormat, Digit, DtmfDuration, EndReason, Protocol};
use tokio::sync::Notify;

pub use catalog::{Catalog, SettingsError};
pub use commands::COMMAND_QUEUE;
pub use queue::{EventReceiver, EventSender};
pub use spawner::Spawner;

/// What an agent learns about its call when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInfo {
    /// callgate's call ID.
    pub call_id: String,
    /// The phone protocol.
    pub protocol: Protocol,
    /// Calling number.
    pub caller: String,
    /// Called number.
    pub callee: String,
    /// The phone system's ID of the call (CallBridge `cdrId`, inbound `sessionId`).
    pub external_id: String,
    /// Everything the phone system sent about the call, as sent.
    pub phone: PhoneInfo,
    /// The name of the route that chose this agent.
    pub route: String,
    /// The agent's name (as in the route's `agent`).
    pub agent: String,
    /// Format of the audio the agent receives (what the phone side sends).
    pub input_format: AudioFormat,
    /// Format of the audio the agent must send (what the phone side plays).
    pub output_format: AudioFormat,
}

/// What the phone system sent when the call started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhoneInfo {
    /// A CallBridge call: its `call_config`, every field as sent.
    CallBridge(CallConfig),
    /// An inbound-API call: its `incoming_call` fields.
    Inbound {
        /// `callerId`.
        caller_id: String,
        /// `didNumber`.
        did_number: String,
        /// `sessionId`.
        session_id: String,
    },
    /// A Twilio Media Streams call: its `start` message's ids and `customParameters`.
    Twilio {
        /// `callSid`.
        call_sid: String,
        /// `streamSid`.
        stream_sid: String,
        /// `accountSid`.
        account_sid: String,
        /// `customParameters`, every value a string, as sent.
        custom_parameters: std::collections::BTreeMap<String, String>,
    },
}

impl CallInfo {
    /// The call's variables by name, for templates: `call_id`, `protocol`, `caller`, `callee`,
    /// `external_id`, `route`, `agent`, and what the phone system sent under its own field
    /// names (CallBridge: `siteId`, `cdrId`, `callActionId`, `ivrIp`, `agentId`, `agentType`;
    /// inbound: `callerId`, `didNumber`, `sessionId`; Twilio: `callSid`, `streamSid`,
    /// `accountSid`, its custom parameters being in [`PhoneInfo::Twilio`]).
    pub fn variables(&self) -> Vec<(&'static str, &str)> {
        let mut vars = vec![
            ("call_id", self.call_id.as_str()),
            ("protocol", self.protocol.as_str()),
            ("caller", self.caller.as_str()),
            ("callee", self.callee.as_str()),
            ("external_id", self.external_id.as_str()),
            ("route", self.route.as_str()),
            ("agent", self.agent.as_str()),
        ];
        match &self.phone {
            PhoneInfo::CallBridge(c) => vars.extend([
                ("siteId", c.site_id.as_str()),
                ("cdrId", c.cdr_id.as_str()),
                ("callActionId", c.call_action_id.as_str()),
                ("ivrIp", c.ivr_ip.as_str()),
                ("agentId", c.agent_id.as_str()),
                ("agentType", c.agent_type.as_str()),
            ]),
            PhoneInfo::Inbound {
                caller_id,
                did_number,
                session_id,
            } => vars.extend([
                ("callerId", caller_id.as_str()),
                ("didNumber", did_number.as_str()),
                ("sessionId", session_id.as_str()),
            ]),
            PhoneInfo::Twilio {
                call_sid,
                stream_sid,
                account_sid,
                ..
            } => vars.extend([
                ("callSid", call_sid.as_str()),
                ("streamSid", stream_sid.as_str()),
                ("accountSid", account_sid.as_str()),
            ]),
        }
        vars
    }
}

/// A generation of the agent's audio. Every clear (the agent's own, a barge-in, an operator's)
/// starts a new one; audio stamped with an older epoch is dropped instead of played.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

/// How a stretch of the agent's audio was cut short (barge-in or clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interruption {
    /// Agent audio the caller has heard since the call began, ms (a total on the call's
    /// playout timeline: subtract an earlier mark's `played_ms` to get what was heard since).
    pub played_ms: u64,
    /// Audio dropped unplayed, ms.
    pub dropped_ms: u64,
    /// When it happened, ms since the call began (wall clock of the call).
    pub at_ms: u64,
    /// The epoch that starts now: audio sent in earlier epochs will not play.
    pub epoch: Epoch,
}

/// What became of the audio before a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkState {
    /// Everything sent before the mark was played.
    Played,
    /// A clear (or barge-in) dropped some of it: the caller did not hear all of it.
    Cleared,
}

/// A command the call could not carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// [`AgentCommand::Answer`].
    Answer,
    /// [`AgentCommand::Audio`] (reported once per run of refused audio, not per frame).
    Audio,
    /// [`AgentCommand::Dtmf`].
    Dtmf,
    /// [`AgentCommand::DtmfTone`].
    DtmfTone,
    /// [`AgentCommand::Hangup`].
    Hangup,
}

/// Something that happened on the call.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Caller audio in [`CallInfo::input_format`].
    Audio(Bytes),
    /// The agent's event queue was full, so this many caller audio frames were dropped
    /// (oldest first) before the events that follow.
    AudioLost {
        /// Frames dropped.
        frames: u64,
    },
    /// The caller pressed a key (protocol DTMF, or an in-band tone when detection is on).
    Dtmf(Digit),
    /// The caller started speaking (voice activity detection on), this many ms into the
    /// caller's audio.
    SpeechStarted {
        /// Position in the caller's audio, ms.
        at_ms: u64,
    },
    /// The caller stopped speaking.
    SpeechStopped {
        /// Position in the caller's audio, ms.
        at_ms: u64,
    },
    /// The caller spoke while the agent's audio was playing: the playout was cleared (barge-in
    /// is on) and a new epoch began.
    BargeIn(Interruption),
    /// The playout was cleared at the agent's request ([`AgentIo::clear`]) or an operator's.
    Cleared(Interruption),
    /// Everything the agent sent before [`AgentCommand::Mark`] with this id has been played,
    /// or dropped by a clear.
    Mark {
        /// The mark's id.
        id: u64,
        /// Agent audio the caller has heard since the call began, ms.
        played_ms: u64,
        /// When, ms since the call began.
        at_ms: u64,
        /// Whether all of it was played.
        state: MarkState,
    },
    /// A command could not be carried out.
    Refused {
        /// Which command.
        command: CommandKind,
        /// Why, in words.
        reason: String,
    },
    /// The call ended; nothing more will arrive and commands are ignored.
    Ended(EndReason),
}

/// Who spoke a transcript entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The caller.
    Caller,
    /// The agent.
    Agent,
}

impl Speaker {
    /// The stable code stored in the record (`caller`, `agent`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Agent => "agent",
        }
    }
}

/// One turn of the conversation, for the call's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Who spoke.
    pub speaker: Speaker,
    /// What was said (for a cut-off agent turn: what the caller heard, as far as known).
    pub text: String,
    /// When it started, ms since the call began.
    pub start_ms: u64,
    /// When it ended, ms since the call began.
    pub end_ms: u64,
    /// Whether it was cut short (barge-in, clear).
    pub interrupted: bool,
}

/// An entry of the agent's own for the call's event log.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordEvent {
    /// A short, stable name (`tool_call`, `backend_reconnected`...).
    pub name: String,
    /// Anything JSON.
    pub detail: serde_json::Value,
}

impl RecordEvent {
    /// The entry [`AgentCommand::Event`] writes: `{"name", "detail"}`.
    pub fn entry(self) -> serde_json::Value {
        serde_json::json!({ "name": self.name, "detail": self.detail })
    }

    /// The entry [`AgentCommand::FlatEvent`] writes: the detail's fields with `name` beside
    /// them (`name` wins over a field of the same name); a detail that is not an object is
    /// written as [`RecordEvent::entry`] writes it.
    pub fn flat_entry(self) -> serde_json::Value {
        match self.detail {
            serde_json::Value::Object(mut fields) => {
                fields.insert("name".into(), serde_json::Value::String(self.name));
                serde_json::Value::Object(fields)
            }
            detail => Self {
                name: self.name,
                detail,
            }
            .entry(),
        }
    }
}

/// What an agent asks of its call.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCommand {
    /// Answer the call.
    Answer,
    /// Play audio to the caller, in [`CallInfo::output_format`].
    Audio(Bytes),
    /// Ask the phone system to play a DTMF tone (inbound protocol only; `0-9 * #`).
    Dtmf {
        /// The key.
        digit: Digit,
        /// The tone's length.
        duration: DtmfDuration,
    },
    /// Play a DTMF tone in-band, as audio through the playout (works on every protocol).
    DtmfTone {
        /// The key.
        digit: Digit,
        /// The tone's length.
        duration: DtmfDuration,
    },
    /// Report [`AgentEvent::Mark`] once everything sent before this has been played.
    Mark(u64),
    /// End the call once the audio already queued has played (at most the playout lead) or
    /// been cleared. Cannot be undone.
    Hangup,
    /// Add a turn to the call's transcript (boxed: it is rare, and every command in the
    /// channel is as large as the largest variant).
    Transcript(Box<Turn>),
    /// Add an entry of the agent's own to the call's event log (stored as kind `agent`, as
    /// `{"name", "detail"}`: [`RecordEvent::entry`]).
    Event(Box<RecordEvent>),
    /// Like [`AgentCommand::Event`], written flat: the detail's fields beside `name`, so that
    /// readers find them at one level (`{"name": "flow_step", "step": "menu", ...}`:
    /// [`RecordEvent::flat_entry`]).
    FlatEvent(Box<RecordEvent>),
    /// Add to the call's usage counters (summed per name: `input_tokens`, `audio_seconds`...).
    Usage(Vec<(String, f64)>),
}

impl AgentCommand {
    /// Whether a call that has ended still takes this command: what goes into its record
    /// (transcript turns, events, usage). An ended call drops everything else. The call core
    /// keeps exactly these, and an agent with commands queued at the end sends only these
    /// (`callgate_kit::outbox::Outbox::ended`).
    pub fn is_kept_after_end(&self) -> bool {
        matches!(
            self,
            Self::Transcript(_) | Self::Event(_) | Self::FlatEvent(_) | Self::Usage(_)
        )
    }
}

/// An agent failure.
///
/// Errors are equal when they are the same variant with the same fields; two
/// [`Error::Failed`] compare by message, since their causes are of any type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call is gone: its command channel is closed.
    #[error("the call has ended")]
    CallGone,
    /// The agent gave up because of its cause (build it with [`Error::failed`]). The message
    /// is `agent failed: ` and the cause's message; the cause stays the error's source.
    #[error("agent failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No agent has this name.
    #[error("unknown agent {name:?} (available: {available})")]
    UnknownAgent {
        /// The name asked for.
        name: String,
        /// The names that exist, comma-separated.
        available: String,
    },
    /// The agent's settings are wrong.
    #[error("agent {agent:?}: {error}")]
    Settings {
        /// The agent's name.
        agent: String,
        /// What is wrong, naming the field.
        #[source]
        error: SettingsError,
    },
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::CallGone, Self::CallGone) => true,
            (Self::Failed(a), Self::Failed(b)) => a.to_string() == b.to_string(),
            (
                Self::UnknownAgent { name, available },
                Self::UnknownAgent {
                    name: other_name,
                    available: other_available,
                },
            ) => name == other_name && available == other_available,
            (
                Self::Settings { agent, error },
                Self::Settings {
                    agent: other_agent,
                    error: other_error,
                },
            ) => agent == other_agent && error == other_error,
            _ => false,
        }
    }
}

impl Eq for Error {}

impl Error {
    /// The agent gave up because of `cause`: a typed error (kept as the source) or, where no
    /// type exists, words (`Error::failed("backend unreachable")`).
    pub fn failed(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Failed(cause.into())
    }
}

/// An agent's side of its call.
#[derive(Debug)]
pub struct AgentIo {
    /// The call.
    pub call: CallInfo,
    events: EventReceiver,
    sender: AgentSender,
    spawner: Spawner,
    started: tokio::time::Instant,
}

impl AgentIo {
    /// The next event; `None` once the call is over and everything was read.
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        self.events.recv().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<AgentEvent> {
        self.events.try_recv()
    }

    /// Sends a command in the current epoch, waiting for room in the channel (audio waits
    /// while the playout is full: that is the agent's backpressure). Like an `async fn`, it
    /// does nothing until polled, reads the epoch when first polled, and a send dropped
    /// before it completes sends nothing.
    pub fn send(
        &self,
        command: AgentCommand,
    ) -> impl Future<Output = Result<(), Error>> + Send + '_ {
        self.sender.send(command)
    }

    /// A cloneable handle for sending commands while another part of the agent waits in
    /// [`AgentIo::recv`].
    pub fn sender(&self) -> AgentSender {
        self.sender.clone()
    }

    /// Drops every audio the caller has not heard yet, at once: what is queued in the playout
    /// and what is still in the command channel, and starts a new epoch (returned).
    /// [`AgentEvent::Cleared`] reports how much was played and dropped. Does not wait.
    pub fn clear(&self) -> Epoch {
        self.sender.clear()
    }

    /// The current epoch (see [`Epoch`]).
    pub fn epoch(&self) -> Epoch {
        self.sender.epoch()
    }

    /// Starts work off the call task (a backend connection, synthesis, decoding): tracked by
    /// the server and cancelled when the call ends.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }

    /// When the call began: the zero of every `at_ms` in events. On tokio's clock (a paused
    /// test runtime moves it), as [`AgentIo::now`] is.
    pub fn started_at(&self) -> std::time::Instant {
        self.started.into_std()
    }

    /// Now, on the clock of [`AgentIo::started_at`]: what a driver hands its sans-IO core.
    pub fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    /// Milliseconds since the call began, on the same clock as `at_ms` in events.
    pub fn now_ms(&self) -> u64 {
        tokio::time::Instant::now()
            .saturating_duration_since(self.started)
            .as_millis() as u64
    }
}

/// Sends commands to the call, like [`AgentIo::send`] and [`AgentIo::clear`].
#[derive(Debug, Clone)]
pub struct AgentSender {
    /// The command queue's sending end; the epochs and clear requests are beside it, in the
    /// same [`Link`].
    commands: commands::Sender,
}

impl AgentSender {
    /// See [`AgentIo::send`].
    pub fn send(
        &self,
        command: AgentCommand,
    ) -> impl Future<Output = Result<(), Error>> + Send + '_ {
        let command = Stamped {
            epoch: Epoch::default(),
            command,
        };
        self.commands.send(command, Some(&self.control().epoch))
    }

    /// Sends a command stamped with `epoch`: audio produced for an epoch that a clear or a
    /// barge-in has since ended is dropped by the call instead of played, wherever it was in
    /// the agent's pipeline. Take the epoch when the audio's production starts.
    pub fn send_in(
        &self,
        epoch: Epoch,
        command: AgentCommand,
    ) -> impl Future<Output = Result<(), Error>> + Send + '_ {
        self.commands.send(Stamped { epoch, command }, None)
    }

    /// See [`AgentIo::clear`].
    pub fn clear(&self) -> Epoch {
        self.control().request_clear()
    }

    /// See [`AgentIo::epoch`].
    pub fn epoch(&self) -> Epoch {
        Epoch(self.control().epoch.load(Ordering::Acquire))
    }

    fn control(&self) -> &Control {
        &self.commands.link().control
    }
}

/// A command with the epoch it was sent in.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    /// The epoch the command belongs to.
    pub epoch: Epoch,
    /// The command.
    pub command: AgentCommand,
}

/// What a call and its agent share, in one allocation: the event queue, the command queue and
/// the epochs. An echoed frame touches all three (an event pushed and taken, a command pushed
/// and taken, the epoch read to stamp it and to check for a clear); apart, each was a cache
/// line or two of its own to miss with every frame.
pub(crate) struct Link {
    pub(crate) events: queue::Shared,
    pub(crate) commands: commands::Shared,
    control: Control,
}

impl Link {
    /// A link whose event queue holds at most `event_capacity` events.
    pub(crate) fn new(event_capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            events: queue::Shared::new(event_capacity),
            commands: commands::Shared::new(),
            control: Control::default(),
        })
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

/// Clears and epochs, shared by the agent and its call outside the (possibly full) command
/// channel. `epoch` counts every clear; `requests` counts the agent's own, `handled` those
/// the call has acted on.
#[derive(Debug, Default)]
struct Control {
    epoch: AtomicU64,
    requests: AtomicU64,
    handled: AtomicU64,
    notify: Notify,
}

impl Control {
    fn request_clear(&self) -> Epoch {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
        Epoch(epoch)
    }
}

/// The call's handle on epochs and the agent's clear requests (cheap to clone).
#[derive(Debug, Clone)]
pub struct AgentControl {
    link: Arc<Link>,
}

impl AgentControl {
    /// Resolves when the agent may have asked for a clear. The call keeps one pinned across
    /// turns (one waiter registration, not one per turn), then checks
    /// [`AgentControl::take_clear_request`].
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.control().notify.notified()
    }

    /// Whether the agent asked for a clear the call has not acted on (and marks it acted on).
    pub fn take_clear_request(&self) -> bool {
        let requests = self.control().requests.load(Ordering::Acquire);
        // Plain loads first: this runs for every agent command, and a clear is rare.
        if self.control().handled.load(Ordering::Acquire) >= requests {
            return false;
        }
        self.control().handled.swap(requests, Ordering::AcqRel) < requests
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.control().epoch.load(Ordering::Acquire))
    }

    /// Starts a new epoch because the call cleared the playout on its own (barge-in, operator
    /// clear): audio the agent sent before it will be dropped.
    pub fn advance_epoch(&self) -> Epoch {
        Epoch(self.control().epoch.fetch_add(1, Ordering::AcqRel) + 1)
    }

    fn control(&self) -> &Control {
        &self.link.control
    }
}

/// The call's end of an agent's commands.
#[derive(Debug)]
pub struct Commands {
    rx: commands::Receiver,
}

impl Commands {
    /// The next command; `None` when the agent dropped its [`AgentIo`] and every sender.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Option<Stamped> {
        self.rx.recv().await
    }

    /// The next command if one is waiting.
    pub fn try_recv(&mut self) -> Option<Stamped> {
        self.rx.try_recv()
    }

    /// Polls for the next command, like [`Commands::recv`] without a future to keep: one lock,
    /// and the waker is kept until a push (or the last sender's drop) wakes it.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Stamped>> {
        self.rx.poll_recv(cx)
    }

    /// Says that the call's task is running and polls for commands again before it sleeps
    /// (as the call task does every turn): commands pushed until then (by the agent it polls
    /// itself) need not wake it, which would only poll the whole call again for nothing.
    pub fn busy(&mut self) {
        self.rx.busy();
    }
}

/// The call's ends of the wiring to its agent.
#[derive(Debug)]
pub struct CallSide {
    /// Events to the agent.
    pub events: EventSender,
    /// Commands from the agent.
    pub commands: Commands,
    /// Epochs and the agent's clear requests.
    pub control: AgentControl,
}

/// Wires an agent to a call: the agent's [`AgentIo`] and the call's [`CallSide`].
/// `started` is when the call began (the zero of every `at_ms`).
pub fn wire(
    call: CallInfo,
    event_capacity: usize,
    spawner: Spawner,
    started: tokio::time::Instant,
) -> (AgentIo, CallSide) {
    let link = Link::new(event_capacity);
    let (events_tx, events_rx) = queue::ends(&link);
    let (commands_tx, commands_rx) = commands::ends(&link);
    (
        AgentIo {
            call,
            events: events_rx,
            sender: AgentSender {
                commands: commands_tx,
            },
            spawner,
            started,
        },
        CallSide {
            events: events_tx,
            commands: Commands { rx: commands_rx },
            control: AgentControl { link },
        },
    )
}

/// Code that handles a call.
pub trait Agent: Send + 'static {
    /// Runs for the whole call. Returning (with `Ok`) before the call ended hangs up once the
    /// audio already queued has played.
    fn run(self, io: AgentIo) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A running agent, boxed once here so calls can hold any agent.
pub type AgentRun = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Makes one agent per call, with settings validated once when it was built (see
/// [`catalog`]).
pub trait AgentFactory: Send + Sync + 'static {
    /// The agent's name (as routes name it).
    fn name(&self) -> &str;
    /// The audio format the agent works in; the call converts at its edges. `None`: the
    /// call's own formats, untouched (what the echo agent needs).
    fn audio_format(&self) -> Option<AudioFormat> {
        None
    }
    /// Starts an agent for a call.
    fn start(&self, io: AgentIo) -> AgentRun;
}

/// Box an agent's run for [`AgentFactory::start`].
pub fn boxed(agent: impl Agent, io: AgentIo) -> AgentRun {
    Box::pin(agent.run(io))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn info() -> CallInfo {
        CallInfo {
            call_id: "c".into(),
            protocol: Protocol::Inbound,
            caller: "1".into(),
            callee: "2".into(),
            external_id: "e".into(),
            phone: PhoneInfo::Inbound {
                caller_id: "1".into(),
                did_number: "2".into(),
                session_id: "e".into(),
            },
            route: "default".into(),
            agent: "test".into(),
            input_format: AudioFormat::Pcm8000,
            output_format: AudioFormat::Pcm8000,
        }
    }

    #[test]
    fn an_event_is_nested_and_a_flat_event_has_its_fields_beside_the_name() {
        let event = |detail| RecordEvent {
            name: "flow_step".into(),
            detail,
        };
        let fields = serde_json::json!({"step": "menu", "phase": "end", "digits": "2"});
        assert_eq!(
            event(fields.clone()).entry(),
            serde_json::json!({"name": "flow_step", "detail": fields})
        );
        assert_eq!(
            event(fields).flat_entry(),
            serde_json::json!({"name": "flow_step", "step": "menu", "phase": "end", "digits": "2"})
        );
        // The entry's name is the event's, whatever the fields say.
        assert_eq!(
            event(serde_json::json!({"name": "x", "n": 1})).flat_entry(),
            serde_json::json!({"name": "flow_step", "n": 1})
        );
        // A detail that is not an object has no fields to put beside the name.
        assert_eq!(
            event(serde_json::json!(7)).flat_entry(),
            serde_json::json!({"name": "flow_step", "detail": 7})
        );
    }

    #[tokio::test]
    async fn a_clear_starts_a_new_epoch_and_is_requested_once() {
        let (io, mut side) = wire(info(), 8, Spawner::detached(), tokio::time::Instant::now());
        let a = AgentCommand::Audio(Bytes::from_static(b"a"));
        io.send(a.clone()).await.unwrap();
        let old = io.epoch();
        let new = io.clear();
        assert!(new > old);
        io.send(a.clone()).await.unwrap();
        side.control.notified().await;
        assert!(side.control.take_clear_request());
        assert!(!side.control.take_clear_request());
        assert_eq!(side.commands.try_recv().map(|s| s.epoch), Some(old));
        assert_eq!(side.commands.try_recv().map(|s| s.epoch), Some(new));
    }

    #[test]
    fn a_send_is_stamped_with_the_epoch_current_when_it_first_runs() {
        let (io, mut side) = wire(info(), 8, Spawner::detached(), tokio::time::Instant::now());
        let created_in = io.epoch();
        let mut send = std::pin::pin!(io.send(AgentCommand::Answer));
        // Created, not polled: nothing is sent, and a clear before it runs counts.
        assert_eq!(side.commands.try_recv(), None);
        let now = io.clear();
        assert!(now > created_in);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(send.as_mut().poll(&mut cx).is_ready());
        assert_eq!(side.commands.try_recv().map(|s| s.epoch), Some(now));
        // A send given its epoch keeps it.
        let sender = io.sender();
        let mut send = std::pin::pin!(sender.send_in(created_in, AgentCommand::Answer));
        assert!(send.as_mut().poll(&mut cx).is_ready());
        assert_eq!(side.commands.try_recv().map(|s| s.epoch), Some(created_in));
    }

    #[tokio::test]
    async fn the_calls_own_epoch_is_not_an_agent_request() {
        let (io, side) = wire(info(), 8, Spawner::detached(), tokio::time::Instant::now());
        let before = io.epoch();
        let after = side.control.advance_epoch();
        assert!(after > before);
        assert_eq!(io.epoch(), after);
        assert!(
            !side.control.take_clear_request(),
            "no clear was requested by the agent"
        );
    }

    #[tokio::test]
    async fn audio_from_the_agents_pipeline_keeps_its_epoch() {
        let (io, mut side) = wire(info(), 8, Spawner::detached(), tokio::time::Instant::now());
        let started_in = io.epoch();
        side.control.advance_epoch();
        io.sender()
            .send_in(started_in, AgentCommand::Audio(Bytes::from_static(b"late")))
            .await
            .unwrap();
        let s = side.commands.try_recv().unwrap();
        assert!(s.epoch < side.control.epoch(), "stale: the call drops it");
    }

    #[test]
    fn commands_stay_as_small_as_audio() {
        // The command channel preallocates blocks of commands: a large variant would cost
        // every call memory (box rare, large payloads instead).
        assert!(std::mem::size_of::<AgentCommand>() <= 40);
        assert!(std::mem::size_of::<Stamped>() <= 48);
    }

    #[test]
    fn a_failure_keeps_its_cause_as_the_source() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "backend down");
        let error = Error::failed(cause);
        assert_eq!(error.to_string(), "agent failed: backend down");
        let source = std::error::Error::source(&error).expect("the cause is the source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the source keeps its type");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        // Words where no type exists read the same, and compare by them.
        let error = Error::failed("backend unreachable");
        assert_eq!(error.to_string(), "agent failed: backend unreachable");
        assert_eq!(error, Error::failed("backend unreachable"));
        assert_ne!(error, Error::failed("backend down"));
        assert_ne!(error, Error::CallGone);
    }

    #[test]
    fn variables_name_what_the_phone_sent() {
        let info = info();
        let vars = info.variables();
        assert!(vars.contains(&("didNumber", "2")));
        assert!(vars.contains(&("route", "default")));
    }
}
