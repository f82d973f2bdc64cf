//! Agents: what handles a call. An agent sees events and sends commands; it never sees a socket.
//!
//! # Layout
//! - [`AgentEvent`], [`AgentCommand`], [`CallInfo`]: what flows between a call and its agent.
//! - [`queue`]: the bounded event queue toward the agent (audio drops oldest, control waits).
//! - [`Agent`], [`AgentFactory`], [`AgentIo`]: how an agent is written and started.
//! - [`echo`]: the echo/diagnostic agent.
//!
//! # Lifetime
//! An agent runs in its own task, started by the call. It ends when its event queue closes
//! (the call ended and the call dropped its sender), so an agent never outlives its call.

pub mod echo;
pub mod queue;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use callgate_proto::{AudioFormat, Digit, DtmfDuration, EndReason, Protocol};
use tokio::sync::mpsc;

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
    /// The caller pressed a key.
    Dtmf(Digit),
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
    /// Play a DTMF tone (inbound calls only; `0-9 * #`).
    Dtmf {
        /// The key.
        digit: Digit,
        /// The tone's length.
        duration: DtmfDuration,
    },
    /// End the call.
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
    commands: mpsc::Sender<AgentCommand>,
}

impl AgentIo {
    /// Wires an agent to a call: `events` from the call, `commands` to it.
    pub fn new(
        call: CallInfo,
        events: EventReceiver,
        commands: mpsc::Sender<AgentCommand>,
    ) -> Self {
        Self {
            call,
            events,
            commands,
        }
    }

    /// The next event; `None` once the call is over and everything was read.
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        self.events.recv().await
    }

    /// Sends a command, waiting for room in the channel.
    pub async fn send(&self, command: AgentCommand) -> Result<(), Error> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::CallGone)
    }
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
    /// Starts an agent for a call.
    fn start(&self, io: AgentIo) -> AgentRun;
}

/// Box an agent's run for [`AgentFactory::start`].
pub fn boxed(agent: impl Agent, io: AgentIo) -> AgentRun {
    Box::pin(agent.run(io))
}

/// The names of the built-in agents.
pub const BUILT_IN: &[&str] = &["echo"];

/// The built-in agent with this name.
pub fn by_name(name: &str) -> Result<Arc<dyn AgentFactory>, Error> {
    match name {
        "echo" => Ok(Arc::new(echo::EchoFactory)),
        _ => Err(Error::UnknownAgent {
            name: name.to_owned(),
            available: BUILT_IN.join(", "),
        }),
    }
}
