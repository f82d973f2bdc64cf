//! The echo agent: answers at once and sends every caller audio byte back, unchanged and in
//! order, until the call ends. For diagnostics (round-trip latency, audio path checks).

use crate::{Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed};

/// Echoes caller audio.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Agent for Echo {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        if io.send(AgentCommand::Answer).await.is_err() {
            return Ok(());
        }
        while let Some(event) = io.recv().await {
            let data = match event {
                AgentEvent::Audio(data) => data,
                AgentEvent::Ended(_) => break,
                // Keys, speech and playout reports change nothing for an echo.
                _ => continue,
            };
            if io.send(AgentCommand::Audio(data)).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Makes [`Echo`] agents.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoFactory;

impl AgentFactory for EchoFactory {
    fn name(&self) -> &str {
        "echo"
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(Echo, io)
    }
}
