//! An agent's queue of commands for the call, each stamped with the epoch it was made in.
//!
//! The call paces audio (a send waits while the playout is full), so an agent keeps what it
//! has made in an [`Outbox`] and sends the front whenever the call takes it. Audio made before
//! a clear or a barge-in keeps its old epoch, so the call drops it even if it was already in
//! the channel; the outbox drops it too, at once (see [`drops_on_clear`]: exactly what the call
//! drops for an ended epoch: audio, DTMF tones and marks).
//!
//! [`send`] and [`sleep`] are the two futures every driver's `select!` needs.

use std::collections::VecDeque;

use callgate_agent::{AgentCommand, AgentSender, Epoch, Error};

/// Whether a clear drops `command`: audio, DTMF tones and marks (the call drops the same for
/// an ended epoch; a mark's audio is gone, so is the mark).
pub fn drops_on_clear(command: &AgentCommand) -> bool {
    matches!(
        command,
        AgentCommand::Audio(_) | AgentCommand::Mark(_) | AgentCommand::DtmfTone { .. }
    )
}

/// Commands waiting for the call, stamped with their epoch. Unbounded by count on purpose:
/// what goes in is bounded by the agent (prompt audio it holds anyway, one answer's speech);
/// the call's playout is the bound on what goes out.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<(Epoch, AgentCommand)>,
    epoch: Epoch,
}

impl Outbox {
    /// An empty outbox in `epoch` (the call's current one: `AgentIo::epoch`).
    pub fn new(epoch: Epoch) -> Self {
        Self {
            queue: VecDeque::new(),
            epoch,
        }
    }

    /// The epoch new commands are stamped with.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Queues `command` in the current epoch.
    pub fn push(&mut self, command: AgentCommand) {
        self.queue.push_back((self.epoch, command));
    }

    /// Queues every command of `commands`.
    pub fn extend(&mut self, commands: impl IntoIterator<Item = AgentCommand>) {
        let epoch = self.epoch;
        self.queue.extend(commands.into_iter().map(|c| (epoch, c)));
    }

    /// The agent cleared the playout (`AgentIo::clear` returned `epoch`): what a clear drops
    /// goes, and new commands belong to `epoch`.
    pub fn cleared(&mut self, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        self.queue.retain(|(_, c)| !drops_on_clear(c));
    }

    /// The call cleared the playout itself (a barge-in: `epoch` from its event): as
    /// [`Outbox::cleared`].
    pub fn barged_in(&mut self, epoch: Epoch) {
        self.cleared(epoch);
    }

    /// The call reports an epoch it moved to without dropping anything here (a clear's
    /// report): new commands belong to it.
    pub fn advance(&mut self, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
    }

    /// For an agent that does not cut itself on a barge-in (a flow: the call dropped what it
    /// had queued, the flow goes on): what waits here moves into `epoch`, so it still plays.
    pub fn carry_over(&mut self, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        let epoch = self.epoch;
        for (e, _) in &mut self.queue {
            *e = epoch;
        }
    }

    /// The call has ended: only what it still takes ([`AgentCommand::is_kept_after_end`])
    /// stays, in order, for the agent to send before it returns.
    pub fn ended(&mut self) {
        self.queue.retain(|(_, c)| c.is_kept_after_end());
    }

    /// The command to send next, if any.
    pub fn front(&self) -> Option<(Epoch, AgentCommand)> {
        self.queue.front().cloned()
    }

    /// The front was sent.
    pub fn pop(&mut self) {
        self.queue.pop_front();
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many commands wait.
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

/// Sends `command` in its epoch, waiting while the playout is full (the call paces the
/// agent); pending forever on `None` (a disabled `select!` branch).
pub async fn send(
    sender: &AgentSender,
    command: Option<(Epoch, AgentCommand)>,
) -> Result<(), Error> {
    match command {
        Some((epoch, command)) => sender.send_in(epoch, command).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; pending forever on `None`.
pub async fn sleep(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use callgate_proto::{Digit, DtmfDuration};

    #[test]
    fn a_clear_drops_audio_tones_and_marks_and_keeps_the_rest_in_the_new_epoch() {
        let mut out = Outbox::new(Epoch(3));
        out.push(AgentCommand::Audio(Bytes::from_static(b"ab")));
        out.push(AgentCommand::Hangup);
        out.push(AgentCommand::Mark(7));
        out.push(AgentCommand::DtmfTone {
            digit: Digit::D1,
            duration: DtmfDuration::from_millis(100).unwrap(),
        });
        out.cleared(Epoch(4));
        assert_eq!(out.len(), 1);
        assert_eq!(out.front(), Some((Epoch(3), AgentCommand::Hangup)));
        out.push(AgentCommand::Audio(Bytes::from_static(b"cd")));
        out.pop();
        assert_eq!(out.front().map(|(e, _)| e), Some(Epoch(4)));
        // An older epoch reported late never moves the outbox back.
        out.advance(Epoch(2));
        assert_eq!(out.epoch(), Epoch(4));
    }

    #[test]
    fn the_end_keeps_only_what_the_record_takes_in_order() {
        let mut out = Outbox::new(Epoch(1));
        let event = AgentCommand::Event(Box::new(callgate_agent::RecordEvent {
            name: "tool_call".into(),
            detail: serde_json::json!({"ok": false}),
        }));
        let usage = AgentCommand::Usage(vec![("output_tokens".into(), 3.0)]);
        out.push(AgentCommand::Audio(Bytes::from_static(b"ab")));
        out.push(event.clone());
        out.push(AgentCommand::Hangup);
        out.push(AgentCommand::Mark(2));
        out.push(usage.clone());
        out.ended();
        assert_eq!(out.len(), 2);
        assert_eq!(out.front(), Some((Epoch(1), event)));
        out.pop();
        assert_eq!(out.front(), Some((Epoch(1), usage)));
    }

    #[test]
    fn carry_over_moves_what_waits_into_the_new_epoch() {
        let mut out = Outbox::new(Epoch(1));
        out.push(AgentCommand::Audio(Bytes::from_static(b"ab")));
        out.push(AgentCommand::Mark(1));
        out.carry_over(Epoch(2));
        assert_eq!(out.len(), 2);
        assert_eq!(out.front().map(|(e, _)| e), Some(Epoch(2)));
        out.pop();
        assert_eq!(out.front(), Some((Epoch(2), AgentCommand::Mark(1))));
    }
}
