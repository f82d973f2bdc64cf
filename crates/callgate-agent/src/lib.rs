//! Agents: what handles a call. An agent sees events and sends commands; it never sees a socket.
//!
//! # Layout
//! - [`AgentEvent`], [`AgentCommand`], [`CallInfo`]: what flows between a call and its agent;
//!   [`wire`] connects them ([`AgentIo`] for the agent, [`EventSender`] and [`Commands`] for
//!   the call).
//! - [`queue`]: the bounded event queue toward the agent (audio drops oldest, control waits).
//! - [`Agent`], [`AgentFactory`], [`AgentIo`]: how an agent is written and started.
//! - [`echo`]: the echo/diagnostic agent.
//!
//! # Lifetime
//! An agent's future is owned and polled by its call's task (no task of its own: an echoed
//! frame costs no cross-task wake-up). It talks to the call only through [`AgentIo`], and it
//! ends when its event queue closes (the call ended and dropped its sender), so an agent never
//! outlives its call. A panic in an agent is caught by the call and ends the call as
//! `agent_failed`.

pub mod echo;
pub mod queue;
pub mod tone;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use callgate_proto::{AudioFormat, Digit, DtmfDuration, EndReason, Protocol};
use tokio::sync::{Notify, mpsc};

pub use queue::{EventReceiver, EventSender};

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
    /// The phone system's ID of the call.
    pub external_id: String,
    /// Format of the audio the agent receives (what the phone side sends).
    pub input_format: AudioFormat,
    /// Format of the audio the agent must send (what the phone side plays).
    pub output_format: AudioFormat,
}

/// Something that happened on the call.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Caller audio in [`CallInfo::input_format`].
    Audio(Bytes),
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
    /// is on). `played_ms` of the interrupted utterance were heard, `dropped_ms` never will be.
    BargeIn {
        /// Audio of the utterance the caller heard, ms.
        played_ms: u64,
        /// Audio dropped unplayed, ms.
        dropped_ms: u64,
    },
    /// The playout was cleared at the agent's request ([`AgentIo::clear`]).
    Cleared {
        /// Audio of the utterance the caller heard, ms.
        played_ms: u64,
        /// Audio dropped unplayed, ms.
        dropped_ms: u64,
    },
    /// Everything the agent sent before [`AgentCommand::Mark`] with this id has been played
    /// (or dropped by a clear).
    Mark {
        /// The mark's id.
        id: u64,
        /// Audio played since the call started, ms.
        played_ms: u64,
    },
    /// The call ended; nothing more will arrive and commands are ignored.
    Ended(EndReason),
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
    /// End the call once the audio already queued has been played (at most the playout lead).
    Hangup,
}

/// An agent failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call is gone: its command channel is closed.
    #[error("the call has ended")]
    CallGone,
    /// The agent gave up, for the stated reason.
    #[error("agent failed: {0}")]
    Failed(String),
    /// No agent has this name.
    #[error("unknown agent {name:?} (available: {available})")]
    UnknownAgent {
        /// The name asked for.
        name: String,
        /// The names that exist, comma-separated.
        available: String,
    },
}

/// Capacity of the agent's command channel. Policy: the agent awaits a free slot
/// (backpressure); the call task drains it on every turn, so a slot frees within one turn.
pub const COMMAND_QUEUE: usize = 64;

/// An agent's side of its call.
#[derive(Debug)]
pub struct AgentIo {
    /// The call.
    pub call: CallInfo,
    events: EventReceiver,
    sender: AgentSender,
}

impl AgentIo {
    /// The next event; `None` once the call is over and everything was read.
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        self.events.recv().await
    }

    /// Sends a command, waiting for room in the channel (audio waits while the playout is
    /// full: that is the agent's backpressure).
    pub async fn send(&self, command: AgentCommand) -> Result<(), Error> {
        self.sender.send(command).await
    }

    /// A cloneable handle for sending commands while another part of the agent waits in
    /// [`AgentIo::recv`].
    pub fn sender(&self) -> AgentSender {
        self.sender.clone()
    }

    /// Drops every audio the caller has not heard yet, at once: what is queued in the playout
    /// and what is still in the command channel. [`AgentEvent::Cleared`] reports how much was
    /// played and dropped. Does not wait for room.
    pub fn clear(&self) {
        self.sender.clear();
    }
}

/// Sends commands to the call, like [`AgentIo::send`] and [`AgentIo::clear`].
#[derive(Debug, Clone)]
pub struct AgentSender {
    commands: mpsc::Sender<Stamped>,
    clear: Arc<ClearSignal>,
}

impl AgentSender {
    /// See [`AgentIo::send`].
    pub async fn send(&self, command: AgentCommand) -> Result<(), Error> {
        let epoch = self.clear.epoch.load(Ordering::Acquire);
        self.commands
            .send(Stamped { epoch, command })
            .await
            .map_err(|_| Error::CallGone)
    }

    /// See [`AgentIo::clear`].
    pub fn clear(&self) {
        self.clear.request();
    }
}

/// A command with the clear epoch it was sent in: audio from before a clear is dropped.
#[derive(Debug)]
struct Stamped {
    epoch: u64,
    command: AgentCommand,
}

/// Clears, outside the (possibly full) command channel. `epoch` counts every clear (audio
/// sent before the current epoch is stale); `requests` counts the agent's own.
#[derive(Debug, Default)]
struct ClearSignal {
    epoch: AtomicU64,
    requests: AtomicU64,
    notify: Notify,
}

impl ClearSignal {
    fn request(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// The call's end of an agent's commands.
#[derive(Debug)]
pub struct Commands {
    rx: mpsc::Receiver<Stamped>,
    clear: Arc<ClearSignal>,
}

/// The call's watch on the agent's clear requests.
#[derive(Debug)]
pub struct ClearWatch {
    clear: Arc<ClearSignal>,
    /// Requests acted on (a `Cell`: `take` runs while a `notified` future borrows the watch).
    seen: std::cell::Cell<u64>,
}

impl ClearWatch {
    /// Resolves when the agent may have asked for a clear. The call keeps one pinned across
    /// turns (one waiter registration, not one per turn) and then checks [`ClearWatch::take`].
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.clear.notify.notified()
    }

    /// Whether the agent asked for a clear the call has not acted on (and marks it acted on).
    pub fn take(&self) -> bool {
        let requests = self.clear.requests.load(Ordering::Acquire);
        let new = requests > self.seen.get();
        self.seen.set(requests);
        new
    }
}

impl Commands {
    /// The next command; audio sent before the latest clear is skipped. `None` when the agent
    /// dropped its [`AgentIo`]. Cancel-safe.
    pub async fn recv(&mut self) -> Option<AgentCommand> {
        loop {
            let s = self.rx.recv().await?;
            if !self.stale(&s) {
                return Some(s.command);
            }
        }
    }

    /// The next command if one is waiting.
    pub fn try_recv(&mut self) -> Option<AgentCommand> {
        loop {
            let s = self.rx.try_recv().ok()?;
            if !self.stale(&s) {
                return Some(s.command);
            }
        }
    }

    /// Marks every audio command already sent as stale (the call cleared the playout on its
    /// own: barge-in, operator clear), so it is skipped instead of played.
    pub fn discard_queued_audio(&mut self) {
        self.clear.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn stale(&self, s: &Stamped) -> bool {
        matches!(
            s.command,
            AgentCommand::Audio(_) | AgentCommand::DtmfTone { .. }
        ) && s.epoch < self.clear.epoch.load(Ordering::Acquire)
    }
}

/// The call's ends of the wiring to its agent.
#[derive(Debug)]
pub struct CallSide {
    /// Events to the agent.
    pub events: EventSender,
    /// Commands from the agent.
    pub commands: Commands,
    /// The agent's clear requests.
    pub clears: ClearWatch,
}

/// Wires an agent to a call: the agent's [`AgentIo`] and the call's [`CallSide`].
pub fn wire(call: CallInfo, event_capacity: usize) -> (AgentIo, CallSide) {
    let (events_tx, events_rx) = queue::channel(event_capacity);
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let clear = Arc::new(ClearSignal::default());
    (
        AgentIo {
            call,
            events: events_rx,
            sender: AgentSender {
                commands: commands_tx,
                clear: clear.clone(),
            },
        },
        CallSide {
            events: events_tx,
            commands: Commands {
                rx: commands_rx,
                clear: clear.clone(),
            },
            clears: ClearWatch {
                clear,
                seen: std::cell::Cell::new(0),
            },
        },
    )
}

/// Code that handles a call.
pub trait Agent: Send + 'static {
    /// Runs for the whole call. Returning (with `Ok`) before the call ended hangs up.
    fn run(self, io: AgentIo) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A running agent, boxed once here so calls can hold any agent.
pub type AgentRun = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Makes one agent per call.
pub trait AgentFactory: Send + Sync + 'static {
    /// The agent's name (`--agent NAME`).
    fn name(&self) -> &'static str;
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

/// The names of the built-in agents.
pub const BUILT_IN: &[&str] = &["echo", "tone"];

/// The built-in agent with this name.
pub fn by_name(name: &str) -> Result<Arc<dyn AgentFactory>, Error> {
    match name {
        "echo" => Ok(Arc::new(echo::EchoFactory)),
        "tone" => Ok(Arc::new(tone::ToneFactory)),
        _ => Err(Error::UnknownAgent {
            name: name.to_owned(),
            available: BUILT_IN.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> CallInfo {
        CallInfo {
            call_id: "c".into(),
            protocol: Protocol::Inbound,
            caller: "1".into(),
            callee: "2".into(),
            external_id: "e".into(),
            input_format: AudioFormat::Pcm8000,
            output_format: AudioFormat::Pcm8000,
        }
    }

    #[tokio::test]
    async fn clear_drops_audio_sent_before_it_and_keeps_the_rest() {
        let (io, mut side) = wire(info(), 8);
        let a = AgentCommand::Audio(Bytes::from_static(b"a"));
        let b = AgentCommand::Audio(Bytes::from_static(b"b"));
        io.send(a).await.unwrap();
        io.send(AgentCommand::Mark(1)).await.unwrap();
        io.clear();
        io.send(b.clone()).await.unwrap();
        side.clears.notified().await;
        assert!(side.clears.take());
        assert!(!side.clears.take());
        assert_eq!(side.commands.try_recv(), Some(AgentCommand::Mark(1)));
        assert_eq!(side.commands.try_recv(), Some(b));
        assert_eq!(side.commands.try_recv(), None);
    }

    #[tokio::test]
    async fn the_calls_own_discard_is_not_an_agent_request() {
        let (io, mut side) = wire(info(), 8);
        io.send(AgentCommand::Audio(Bytes::from_static(b"old")))
            .await
            .unwrap();
        side.commands.discard_queued_audio();
        assert_eq!(side.commands.try_recv(), None);
        assert!(!side.clears.take(), "no clear was requested by the agent");
    }
}
