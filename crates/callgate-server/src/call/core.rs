//! The call core: every decision of a live call, sans-IO.
//!
//! [`CallCore`] owns the protocol [`Session`], the call's [`Media`] (playout clock, VAD, DTMF
//! detection, recording) and the [`Journal`]. It is a plain state machine, in the shape of
//! quinn-proto's `Connection`: inputs are `handle_*(now, ..)` calls; outputs come out of
//! [`CallCore::poll_output`] (frames to send, the close, the record writes that need awaiting,
//! and what the agent is to be told) and [`CallCore::poll_timeout`] (the next deadline). It
//! holds no channel, no atomic and no runtime type, and never reads the clock: time is an
//! argument, so its tests are plain `#[test]`s that drive a whole call on a test clock.
//!
//! The driver (`call::driver::Call`) owns the sockets and the agent's channels and moves
//! bytes, events and time; it decides nothing:
//! - [`Effect::AgentAudio`] and [`Effect::AgentEvent`] go into the agent's event queue. Audio
//!   the full queue drops is reported back with [`CallCore::handle_agent_audio_dropped`]; a
//!   queue full of unread control events with [`CallCore::handle_agent_stuck`] (the core ends
//!   the call).
//! - Epochs are shared with the agent, which starts one when it clears ([`AgentIo::clear`]).
//!   The driver hands the agent's clear requests in with the agent's epoch
//!   ([`CallCore::handle_agent_clear`]), before the next agent command; for a clear of the
//!   core's own (barge-in, an operator's), [`Effect::AdvanceEpoch`] asks it to advance the
//!   shared epoch and hand the new one back ([`CallCore::handle_epoch`]) before the next
//!   effect.
//!
//! Drive invariant (as in callgate-proto): after every `handle_*`, drain `poll_output` before
//! awaiting anything.
//!
//! The clock ban: clippy reads one `clippy.toml` per crate and has one switch for all of its
//! `disallowed-methods`, so a module cannot carry a ban of its own, and a crate-wide ban of the
//! clock would hit every test of this crate that times something. The ban is therefore a test
//! over this module's source (`the_core_reads_no_clock_and_holds_no_runtime_types`), with the
//! same list a `clippy.toml` would carry.
//!
//! [`AgentIo::clear`]: callgate_agent::AgentIo::clear
//!
//! # Phases
//! `Live` → `HangingUp(reason)` (the agent hung up with audio queued: it plays, then the call
//! ends) → `Ended(reason)`. A phase only moves forward: nothing (barge-in, more agent audio)
//! can take a pending hangup back. During `HangingUp` the caller's speech does not clear the
//! goodbye; an explicit clear (the agent's or an operator's) drops it and ends the call at once.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use callgate_agent::{
    AgentCommand, AgentEvent, CommandKind, Epoch, Interruption, MarkState, Stamped,
};
use callgate_audio::playout::{Cleared, MarkEnd, PlayoutEvent};
use callgate_audio::vad::VadEvent;
use callgate_proto::{
    CallEvent, Close, Command, Digit, Disconnect, EndReason, Error as ProtoError, Frame, Output,
    Protocol, Session,
};
use serde_json::json;

use super::media::{Media, MediaEvent};
use super::record::{EventKind, Journal, MAX_TEXT};
use crate::live::{Reply, Request};
use crate::metrics::LocalHistogram;

/// What the I/O loop must do for the core.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Write this frame to the phone (under `write_timeout`).
    Send(Frame),
    /// Write the record's pending entries and wait for the commit, then send this close
    /// (always the last effect).
    Close(Close),
    /// The call was answered (record the time).
    Answered,
    /// The call ended: end the record and wait for the commit.
    Ended(EndReason),
    /// The phone system's CDR, verbatim: store it and wait for the commit.
    Cdr(String),
    /// Queue caller audio for the agent (its queue drops the oldest audio when full: report
    /// that with [`CallCore::handle_agent_audio_dropped`]).
    AgentAudio(Bytes),
    /// Queue a control event for the agent. If its queue is full of control events it has not
    /// read, close the queue and report it with [`CallCore::handle_agent_stuck`].
    AgentEvent(AgentEvent),
    /// The core cleared the playout on its own (barge-in, an operator's clear): advance the
    /// epoch shared with the agent and hand the new one to [`CallCore::handle_epoch`] before
    /// the next effect.
    AdvanceEpoch,
    /// Close the agent's event queue: the agent ends once it has read what is queued.
    CloseAgent,
}

/// How the agent's future ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentExit {
    /// It returned `Ok`: a hangup once its audio has played.
    Returned,
    /// It returned an error or panicked (the message says which).
    Failed(String),
}

/// What a call is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live,
    /// Ending once the queued audio has played (or been cleared).
    HangingUp(EndReason),
    Ended(EndReason),
}

/// Per-call counts for the server's metrics, merged by the I/O loop on its progress tick.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) jitter: LocalHistogram,
    pub(crate) barge_ins: u64,
    pub(crate) agent_audio_dropped: u64,
    pub(crate) dtmf_protocol: u64,
    pub(crate) dtmf_inband: u64,
    /// Protocol error kinds, as they happened (rare).
    pub(crate) protocol_errors: Vec<&'static str>,
    /// Refused agent commands, by command (rare).
    pub(crate) refused: Vec<&'static str>,
    /// Record entries (events, transcript turns) not stored: the call reached its cap.
    pub(crate) record_dropped: u64,
    /// Playout stalls (the call task woke over 100 ms late) and the audio they dropped, ms.
    pub(crate) stalls: u64,
    pub(crate) stall_dropped_ms: u64,
}

/// Who cleared the playout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clearer {
    /// The caller, by speaking over the agent (barge-in).
    Caller,
    /// The agent (`AgentIo::clear`).
    Agent,
    /// An operator (`POST /api/calls/{id}/clear`).
    Operator,
}

/// How often a call whose phone buffers what it is sent (Twilio) is asked to confirm what
/// played, in frames of continuous audio: every second (and at the end of each utterance).
const CONFIRM_EVERY_FRAMES: u32 = 50;

/// What the caller heard, on a protocol whose phone side buffers the audio it is sent and
/// confirms what played with marks (Twilio). There "sent" is not "heard": audio counts as
/// heard when the mark placed after it comes back, and audio a clear cut off between its
/// sending and its confirmation was never heard (Twilio dropped it). Positions are on the
/// heard timeline: the playout's sent total less what clears cut off (`lost_ms`).
#[derive(Debug, Default)]
struct Confirmations {
    /// Frames sent since the last mark was placed.
    since_mark: u32,
    /// Marks placed and not returned yet: (number, position when placed).
    placed: VecDeque<(u64, u64)>,
    /// Audio confirmed heard, ms.
    heard_ms: u64,
    /// Sent audio that clears cut off before its confirmation, ms.
    lost_ms: u64,
    /// The agent's marks whose audio was sent, waiting for its confirmation: (id, position).
    held: VecDeque<(u64, u64)>,
    /// Hanging up with the goodbye sent and not confirmed: the call ends when it is, or at
    /// this deadline.
    goodbye_deadline: Option<Instant>,
}

/// How long a hang-up waits for the phone to confirm that the goodbye played (Twilio plays
/// what it buffered; closing the socket before would cut it off).
const GOODBYE_CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Settings of the core that are not the session's or the media's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoreConfig {
    /// Clear the agent's audio when the caller starts speaking over it.
    pub(crate) barge_in: bool,
}

/// The decisions of one live call.
pub(crate) struct CallCore {
    session: Session,
    media: Box<Media>,
    phase: Phase,
    answered: bool,
    /// Whether the agent's event queue is open (closed when the call ends, which ends the
    /// agent, or when the agent stopped reading it).
    agent_open: bool,
    /// The newest epoch the core knows: agent commands from an older one are stale.
    epoch: Epoch,
    /// Clears of the core's own waiting for their new epoch ([`Effect::AdvanceEpoch`]), in
    /// order: who cleared, and what the agent is told once the epoch is known.
    epoch_waits: VecDeque<(Clearer, Interruption)>,
    journal: Journal,
    stats: Stats,
    config: CoreConfig,
    effects: VecDeque<Effect>,
    media_events: Vec<MediaEvent>,
    /// Agent audio was refused since the last time it was accepted (reported once per run).
    audio_refused: bool,
    /// What the phone confirmed playing, when it buffers what it is sent (Twilio).
    confirms: Option<Box<Confirmations>>,
}

impl std::fmt::Debug for CallCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCore")
            .field("phase", &self.phase)
            .field("answered", &self.answered)
            .finish_non_exhaustive()
    }
}

impl CallCore {
    pub(crate) fn new(
        session: Session,
        media: Box<Media>,
        journal: Journal,
        config: CoreConfig,
    ) -> Self {
        let confirms =
            (session.protocol() == Protocol::Twilio).then(|| Box::new(Confirmations::default()));
        Self {
            confirms,
            session,
            media,
            phase: Phase::Live,
            answered: false,
            agent_open: true,
            epoch: Epoch::default(),
            epoch_waits: VecDeque::new(),
            journal,
            stats: Stats::default(),
            config,
            effects: VecDeque::new(),
            media_events: Vec::new(),
            audio_refused: false,
        }
    }

    // ---- inputs ----

    /// A text message from the phone.
    pub(crate) fn handle_text(&mut self, now: Instant, text: &str) {
        self.session.handle_text(now, text);
        self.process(now);
    }

    /// A binary message (audio) from the phone.
    pub(crate) fn handle_binary(&mut self, now: Instant, data: Bytes) {
        self.session.handle_binary(now, data);
        self.process(now);
    }

    /// The phone's side of the connection ended (or a write to it failed).
    pub(crate) fn handle_peer_close(&mut self, now: Instant, how: Disconnect) {
        self.session.handle_peer_close(now, how);
        self.process(now);
    }

    /// The phone broke the protocol below the session (a message too big, bad UTF-8).
    pub(crate) fn handle_violation(&mut self, now: Instant, error: ProtoError) {
        self.session.handle_violation(now, error);
        self.process(now);
    }

    /// A deadline passed (session timer, playout slot).
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        self.process(now);
    }

    /// The server is shutting down.
    pub(crate) fn handle_shutdown(&mut self, now: Instant) {
        self.session.handle_shutdown(now);
        self.process(now);
    }

    /// A command from the agent, with the epoch it was sent in.
    pub(crate) fn handle_agent_command(&mut self, now: Instant, stamped: Stamped) {
        if matches!(self.phase, Phase::Ended(_)) {
            // The call is over; what the agent still writes to the record is kept (its last
            // transcript turn and usage usually come after the end): exactly the commands
            // `is_kept_after_end` names, which agents rely on.
            if !stamped.command.is_kept_after_end() {
                return;
            }
            match stamped.command {
                AgentCommand::Transcript(turn) => self.journal.turn(now, *turn),
                AgentCommand::Usage(amounts) => self.journal.usage(amounts),
                AgentCommand::Event(e) => self.journal.event(now, EventKind::Agent, e.entry()),
                AgentCommand::FlatEvent(e) => {
                    self.journal.event(now, EventKind::Agent, e.flat_entry());
                }
                _ => {}
            }
            return;
        }
        // (A clear the agent asked for before sending this was handed in before it.)
        let stale = stamped.epoch < self.epoch;
        match stamped.command {
            AgentCommand::Answer => {
                if let Err(error) = self.session.handle_command(now, Command::Answer) {
                    self.refuse(now, CommandKind::Answer, &error);
                }
            }
            AgentCommand::Audio(data) => {
                if self.audio_allowed(now, stale, CommandKind::Audio) {
                    self.media.agent_audio(now, data);
                }
            }
            AgentCommand::DtmfTone { digit, duration } => {
                if self.audio_allowed(now, stale, CommandKind::DtmfTone) {
                    self.media.agent_tone(now, digit, duration);
                }
            }
            AgentCommand::Mark(id) if stale => {
                // Its audio was dropped before it could be queued.
                let played_ms = self.played_ms();
                self.notify(AgentEvent::Mark {
                    id,
                    played_ms,
                    at_ms: self.journal.ms(now),
                    state: MarkState::Cleared,
                });
            }
            AgentCommand::Mark(id) => self.media.mark(id),
            AgentCommand::Dtmf { digit, duration } => {
                if let Err(error) = self
                    .session
                    .handle_command(now, Command::Dtmf { digit, duration })
                {
                    self.refuse(now, CommandKind::Dtmf, &error);
                }
            }
            AgentCommand::Hangup => self.hang_up(now, EndReason::AgentHangup),
            AgentCommand::Transcript(turn) => self.journal.turn(now, *turn),
            AgentCommand::Event(e) => self.journal.event(now, EventKind::Agent, e.entry()),
            AgentCommand::FlatEvent(e) => {
                self.journal.event(now, EventKind::Agent, e.flat_entry());
            }
            AgentCommand::Usage(amounts) => self.journal.usage(amounts),
        }
        self.process(now);
    }

    /// The agent asked for a clear; `epoch` is its epoch now (the one its clear started, or a
    /// later one). The driver hands this in before the agent's next command.
    pub(crate) fn handle_agent_clear(&mut self, now: Instant, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        self.clear(now, Clearer::Agent);
        self.process(now);
    }

    /// The epoch shared with the agent was advanced for the oldest clear of the core's own
    /// ([`Effect::AdvanceEpoch`]): it is `epoch`. The agent is told of the clear next.
    pub(crate) fn handle_epoch(&mut self, now: Instant, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        if let Some((by, mut interruption)) = self.epoch_waits.pop_front() {
            interruption.epoch = epoch;
            let event = match by {
                Clearer::Caller => AgentEvent::BargeIn(interruption),
                Clearer::Agent | Clearer::Operator => AgentEvent::Cleared(interruption),
            };
            // Ahead of what the clear queued after it (the cleared marks), as it happened.
            if self.agent_open {
                self.effects.push_front(Effect::AgentEvent(event));
            }
        }
        self.process(now);
    }

    /// The agent's queue dropped its oldest audio to take more (the agent is behind).
    pub(crate) fn handle_agent_audio_dropped(&mut self) {
        self.stats.agent_audio_dropped += 1;
    }

    /// The agent's queue is full of control events it has not read: the agent is stuck, and
    /// the call ends as `agent_failed`. The driver has closed the queue.
    pub(crate) fn handle_agent_stuck(&mut self, now: Instant) {
        if !self.agent_open {
            return;
        }
        self.agent_open = false;
        tracing::warn!("Agent stopped taking events; ending the call.");
        self.journal.event(
            now,
            EventKind::AgentFailed,
            json!({ "message": "agent stopped taking events" }),
        );
        self.end_now(now, EndReason::AgentFailed);
        self.process(now);
    }

    /// The agent's future finished.
    pub(crate) fn handle_agent_exit(&mut self, now: Instant, exit: AgentExit) {
        match exit {
            // A normal end is a hangup: what the agent queued last (a goodbye) still plays.
            AgentExit::Returned => self.hang_up(now, EndReason::AgentHangup),
            AgentExit::Failed(message) => {
                self.journal
                    .event(now, EventKind::AgentFailed, json!({ "message": message }));
                self.end_now(now, EndReason::AgentFailed);
            }
        }
        self.process(now);
    }

    /// An operator's request.
    pub(crate) fn handle_operator(
        &mut self,
        now: Instant,
        request: Request,
    ) -> Result<Reply, ProtoError> {
        let reply = self.operator(now, request);
        self.process(now);
        reply
    }

    // ---- outputs ----

    /// The next effect for the I/O loop.
    pub(crate) fn poll_output(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// The next deadline: the session's or the playout's.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [
            self.session.poll_timeout(),
            self.media.poll_timeout(),
            // Only while the hang-up waits: once the call ends, nothing is due.
            match self.phase {
                Phase::HangingUp(_) => self.confirms.as_ref().and_then(|c| c.goodbye_deadline),
                Phase::Live | Phase::Ended(_) => None,
            },
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the connection is finished (the close was sent or the peer is gone).
    pub(crate) fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    /// Whether the call has ended (the connection may still wait for a CDR).
    pub(crate) fn has_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended(_))
    }

    /// Whether the agent's commands may be taken now: the playout has room (the agent's
    /// backpressure). Once the call has ended, commands are taken and ignored.
    pub(crate) fn takes_agent_commands(&self) -> bool {
        self.has_ended() || self.media.has_room()
    }

    /// The journal, for the I/O loop to write out.
    pub(crate) fn journal(&mut self) -> &mut Journal {
        &mut self.journal
    }

    /// The counts for the metrics since the last call of this.
    pub(crate) fn take_stats(&mut self) -> Stats {
        self.stats.record_dropped += self.journal.take_dropped();
        let (stalls, dropped_ms) = self.media.take_stalls();
        self.stats.stalls += stalls;
        self.stats.stall_dropped_ms += dropped_ms;
        std::mem::take(&mut self.stats)
    }

    /// Playout underruns since the last call of this.
    pub(crate) fn take_underruns(&mut self) -> u64 {
        self.media.take_underruns()
    }

    /// Recording batches dropped since the last call of this.
    pub(crate) fn take_recording_dropped(&mut self) -> u64 {
        self.media.take_recording_dropped()
    }

    /// The finished recording, once the call has ended (resolves when it is on disk).
    pub(crate) fn take_recording(&mut self) -> Option<callgate_audio::recording::Finished> {
        self.media.take_finished()
    }

    /// Audio queued for the caller, ms.
    pub(crate) fn queued_ms(&self) -> u64 {
        self.media.queued_ms()
    }

    /// Makes the recording valid on disk as it stands (periodic).
    pub(crate) fn sync_recording(&mut self) {
        self.media.sync();
    }

    /// Closes what the call holds that outlives nothing: the recording. The driver closes the
    /// agent's queue (nothing more is told to the agent).
    pub(crate) fn finish(&mut self) {
        self.media.finish();
        self.agent_open = false;
    }

    // ---- decisions ----

    /// Drains the session and the playout until neither has anything more.
    fn process(&mut self, now: Instant) {
        // The playout is looked at first, then again only after a session event (caller audio
        // can barge in and clear it, an end finishes it). What it hands the session comes back
        // as sends only, and looking again at the same `now` with nothing changed finds
        // nothing: a poll saved for every frame played.
        let mut playout_due = true;
        loop {
            while let Some(output) = self.session.poll_output() {
                match output {
                    Output::Send(frame) => self.effects.push_back(Effect::Send(frame)),
                    Output::Close(close) => self.effects.push_back(Effect::Close(close)),
                    Output::Event(event) => {
                        playout_due = true;
                        self.call_event(now, event);
                    }
                }
            }
            // Frames the playout hands the session come out as session outputs: drain again.
            let mut again = std::mem::take(&mut playout_due) && self.run_playout(now);
            if let Phase::HangingUp(reason) = self.phase
                && !self.media.is_playing()
                && self.goodbye_confirmed(now)
            {
                self.end_now(now, reason);
                again = true;
            }
            if !again {
                return;
            }
        }
    }

    fn call_event(&mut self, now: Instant, event: CallEvent) {
        match event {
            CallEvent::Audio(data) => self.caller_audio(now, &data),
            CallEvent::Answered => {
                self.answered = true;
                self.effects.push_back(Effect::Answered);
            }
            CallEvent::Dtmf(digit) => self.dtmf(now, digit, "protocol"),
            CallEvent::Ended(reason) => {
                self.phase = Phase::Ended(reason);
                // Nothing more is heard or played: the recording is complete now.
                self.media.finish();
                self.journal
                    .event(now, EventKind::Ended, json!({ "reason": reason.as_str() }));
                self.notify(AgentEvent::Ended(reason));
                // Closing the queue ends the agent once it has read everything.
                self.close_agent();
                self.effects.push_back(Effect::Ended(reason));
            }
            CallEvent::Cdr(report) => {
                if let Some(problem) = &report.problem {
                    self.journal.event(
                        now,
                        EventKind::CdrInvalid,
                        json!({ "message": problem.to_string() }),
                    );
                }
                self.journal.event(now, EventKind::CdrReceived, json!({}));
                let depth = json_depth(&report.raw);
                let raw = if depth > MAX_JSON_DEPTH {
                    // Kept, but as a JSON string: served nested, it would break the readers of
                    // every list that holds it (common JSON parsers stop at 128 levels).
                    self.journal.event(
                        now,
                        EventKind::CdrInvalid,
                        json!({ "message": format!(
                            "nested {depth} levels deep (more than {MAX_JSON_DEPTH}): stored as text"
                        ) }),
                    );
                    serde_json::Value::String(report.raw).to_string()
                } else {
                    report.raw
                };
                self.effects.push_back(Effect::Cdr(raw));
            }
            CallEvent::CdrMissing => self.journal.event(now, EventKind::CdrMissing, json!({})),
            CallEvent::Unknown(text) => {
                let detail = if text.len() > MAX_TEXT {
                    let mut end = MAX_TEXT;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    json!({ "text": &text[..end], "truncated": true, "bytes": text.len() })
                } else {
                    json!({ "text": text })
                };
                self.journal.event(now, EventKind::UnknownMessage, detail);
            }
            CallEvent::MarkPlayed(n) => self.mark_played(now, n),
            CallEvent::Violation(error) => {
                self.stats.protocol_errors.push(error.kind());
                self.journal.event(
                    now,
                    EventKind::ProtocolError,
                    json!({ "kind": error.kind(), "message": error.to_string() }),
                );
            }
        }
    }

    fn caller_audio(&mut self, now: Instant, data: &Bytes) {
        self.journal.counters.bytes_in += data.len() as u64;
        self.journal.counters.frames_in += 1;
        let mut events = std::mem::take(&mut self.media_events);
        let for_agent = self.media.caller_audio(data, &mut events);
        if self.agent_open {
            self.effects.push_back(Effect::AgentAudio(for_agent));
        }
        for event in events.drain(..) {
            self.media_event(now, event);
        }
        self.media_events = events;
    }

    /// What the caller's audio revealed (speech, in-band keys), as the VAD or the DTMF
    /// detector would report it from caller audio: how tests speak without speech audio.
    #[cfg(test)]
    pub(crate) fn handle_media_event(&mut self, now: Instant, event: MediaEvent) {
        self.media_event(now, event);
        self.process(now);
    }

    fn media_event(&mut self, now: Instant, event: MediaEvent) {
        match event {
            MediaEvent::Speech(VadEvent::SpeechStarted { at_ms }) => {
                self.journal
                    .event(now, EventKind::SpeechStarted, json!({ "at_ms": at_ms }));
                self.notify(AgentEvent::SpeechStarted { at_ms });
                if self.config.barge_in && self.phase == Phase::Live && self.media.is_playing() {
                    self.barge_in(now);
                }
            }
            MediaEvent::Speech(VadEvent::SpeechStopped { at_ms }) => {
                self.journal
                    .event(now, EventKind::SpeechStopped, json!({ "at_ms": at_ms }));
                self.notify(AgentEvent::SpeechStopped { at_ms });
            }
            MediaEvent::InbandDtmf(digit) => self.dtmf(now, digit, "inband"),
        }
    }

    /// The caller spoke over the agent: clear at once, start a new epoch, tell the agent.
    fn barge_in(&mut self, now: Instant) {
        self.stats.barge_ins += 1;
        self.clear(now, Clearer::Caller);
    }

    /// Drops everything the caller has not heard, in a new epoch (the agent's own request
    /// already started one; for the core's own, the driver advances it: see
    /// [`Effect::AdvanceEpoch`]), records who did it, and tells the agent.
    fn clear(&mut self, now: Instant, by: Clearer) -> Cleared {
        let mut cleared = self.media.clear();
        if self.confirms.is_some() {
            cleared.dropped_ms += self.clear_unconfirmed(now);
        }
        let played_ms = self.played_ms();
        let kind = match by {
            Clearer::Caller => EventKind::BargeIn,
            Clearer::Agent => EventKind::AgentClear,
            Clearer::Operator => EventKind::OperatorClear,
        };
        self.journal.event(
            now,
            kind,
            json!({ "played_ms": played_ms, "dropped_ms": cleared.dropped_ms }),
        );
        let interruption = Interruption {
            played_ms,
            dropped_ms: cleared.dropped_ms,
            at_ms: self.journal.ms(now),
            epoch: self.epoch,
        };
        match by {
            Clearer::Agent => self.notify(AgentEvent::Cleared(interruption)),
            Clearer::Caller | Clearer::Operator => {
                self.epoch_waits.push_back((by, interruption));
                self.effects.push_back(Effect::AdvanceEpoch);
            }
        }
        cleared
    }

    fn dtmf(&mut self, now: Instant, digit: Digit, source: &'static str) {
        if source == "inband" {
            self.stats.dtmf_inband += 1;
        } else {
            self.stats.dtmf_protocol += 1;
        }
        self.journal.dtmf(digit.as_char());
        self.journal.event(
            now,
            EventKind::Dtmf,
            json!({ "digit": digit.to_string(), "source": source }),
        );
        self.notify(AgentEvent::Dtmf(digit));
    }

    /// Whether agent audio may be queued now; says why not to the agent (once per run).
    fn audio_allowed(&mut self, now: Instant, stale: bool, kind: CommandKind) -> bool {
        let refusal = match self.phase {
            // From an epoch a clear ended: dropped, as the agent was told by the clear.
            _ if stale => return false,
            Phase::HangingUp(_) => "the agent hung up; only the audio queued before plays",
            Phase::Ended(_) => return false,
            Phase::Live if !self.answered => "the call is not answered yet",
            Phase::Live => {
                self.audio_refused = false;
                return true;
            }
        };
        if !std::mem::replace(&mut self.audio_refused, true) {
            let error = ProtoError::InvalidState {
                operation: "audio",
                state: refusal,
            };
            self.refuse(now, kind, &error);
        }
        false
    }

    fn refuse(&mut self, now: Instant, command: CommandKind, error: &ProtoError) {
        let name = command_name(command);
        self.stats.refused.push(name);
        let reason = error.to_string();
        tracing::debug!(command = name, %reason, "Agent command refused.");
        self.journal.event(
            now,
            EventKind::AgentCommandRefused,
            json!({ "command": name, "message": reason }),
        );
        self.notify(AgentEvent::Refused { command, reason });
    }

    /// Ends the call once the queued audio has played: at once if none is queued.
    fn hang_up(&mut self, now: Instant, reason: EndReason) {
        if self.phase != Phase::Live {
            return;
        }
        if self.answered && self.media.is_playing() {
            self.journal.event(
                now,
                EventKind::HangupPending,
                json!({ "queued_ms": self.media.queued_ms() }),
            );
            self.phase = Phase::HangingUp(reason);
        } else {
            self.end_now(now, reason);
        }
    }

    /// Ends the call now (the session emits `Ended`, which moves the phase).
    fn end_now(&mut self, now: Instant, reason: EndReason) {
        if matches!(self.phase, Phase::Ended(_)) {
            return;
        }
        // Refused only when the session is already over; its own end then stands.
        let _ = self.session.handle_command(now, Command::Hangup(reason));
    }

    /// Sends what the playout clock says is due, and reports marks. Returns whether it
    /// handed the session a frame.
    fn run_playout(&mut self, now: Instant) -> bool {
        let mut sent = false;
        while let Some(event) = self.media.poll(now) {
            match event {
                PlayoutEvent::Frame {
                    data,
                    late,
                    silence,
                } => {
                    if !silence {
                        self.stats.jitter.observe(late.as_secs_f64());
                    }
                    let bytes = data.len() as u64;
                    // Refused only when the call is over: the frame is dropped.
                    if self
                        .session
                        .handle_command(now, Command::Audio(data))
                        .is_ok()
                    {
                        sent = true;
                        self.journal.counters.bytes_out += bytes;
                        self.journal.counters.frames_out += 1;
                        if let Some(c) = &mut self.confirms {
                            c.since_mark += 1;
                            if c.since_mark >= CONFIRM_EVERY_FRAMES {
                                self.place_mark(now);
                            }
                        }
                    }
                }
                PlayoutEvent::Mark { id, end } => {
                    if end == MarkEnd::Played && self.hold_mark(now, id) {
                        continue;
                    }
                    let played_ms = self.played_ms();
                    let state = match end {
                        MarkEnd::Played => MarkState::Played,
                        MarkEnd::Cleared => MarkState::Cleared,
                    };
                    let at_ms = self.journal.ms(now);
                    self.notify(AgentEvent::Mark {
                        id,
                        played_ms,
                        at_ms,
                        state,
                    });
                }
            }
        }
        // The end of an utterance: ask the phone to confirm it all played.
        if sent
            && !self.media.is_playing()
            && self.confirms.as_ref().is_some_and(|c| c.since_mark > 0)
        {
            self.place_mark(now);
        }
        sent
    }

    /// Whether a hang-up may close now: everything sent was confirmed played (Twilio), or the
    /// wait for it is over; other protocols play what they are sent at once.
    fn goodbye_confirmed(&mut self, now: Instant) -> bool {
        let Some(c) = &mut self.confirms else {
            return true;
        };
        if c.placed.is_empty() && c.since_mark == 0 {
            c.goodbye_deadline = None;
            return true;
        }
        let deadline = *c.goodbye_deadline.get_or_insert(now + GOODBYE_CONFIRM_WAIT);
        if now >= deadline {
            c.goodbye_deadline = None;
            return true;
        }
        false
    }

    /// Audio the caller heard since the call started, ms: what was sent, or on a protocol that
    /// confirms what played (Twilio), what was confirmed.
    fn played_ms(&self) -> u64 {
        match &self.confirms {
            Some(c) => c.heard_ms,
            None => self.media.played_ms(),
        }
    }

    /// Where the audio sent so far ends on the heard timeline (Twilio).
    fn sent_position(&self) -> u64 {
        let lost = self.confirms.as_ref().map_or(0, |c| c.lost_ms);
        self.media.played_ms().saturating_sub(lost)
    }

    /// Asks the phone to confirm the audio sent so far (Twilio: a mark).
    fn place_mark(&mut self, now: Instant) {
        let position = self.sent_position();
        if let Some(n) = self.session.handle_mark(now)
            && let Some(c) = &mut self.confirms
        {
            c.placed.push_back((n, position));
            c.since_mark = 0;
        }
    }

    /// An agent's mark whose audio was all sent: on a protocol that confirms what played, it is
    /// held until that audio is confirmed (true). Otherwise sent is heard: report it now.
    fn hold_mark(&mut self, now: Instant, id: u64) -> bool {
        let Some(c) = &self.confirms else {
            return false;
        };
        let position = self.sent_position();
        if c.since_mark == 0 && c.placed.is_empty() {
            // Everything before it is confirmed already.
            return false;
        }
        if c.since_mark > 0 {
            self.place_mark(now);
        }
        match &mut self.confirms {
            // The session is over if no mark could be placed: report it as the others.
            Some(c) if !c.placed.is_empty() => {
                c.held.push_back((id, position));
                true
            }
            _ => false,
        }
    }

    /// Twilio returned a mark as played: what was sent before it was heard.
    fn mark_played(&mut self, now: Instant, n: u64) {
        let Some(c) = &mut self.confirms else {
            return;
        };
        while let Some(&(placed, position)) = c.placed.front()
            && placed <= n
        {
            c.placed.pop_front();
            c.heard_ms = c.heard_ms.max(position);
        }
        let heard = c.heard_ms;
        let mut released = Vec::new();
        while let Some(&(id, position)) = c.held.front()
            && position <= heard
        {
            c.held.pop_front();
            released.push((id, position));
        }
        let at_ms = self.journal.ms(now);
        for (id, played_ms) in released {
            self.notify(AgentEvent::Mark {
                id,
                played_ms,
                at_ms,
                state: MarkState::Played,
            });
        }
    }

    /// A clear on a protocol that confirms what played: the phone is told to drop what it
    /// holds, audio sent and not confirmed counts as never heard, and the agent's marks
    /// waiting for it are cleared. Returns the unconfirmed ms.
    fn clear_unconfirmed(&mut self, now: Instant) -> u64 {
        self.session.handle_clear(now);
        let position = self.sent_position();
        let Some(c) = &mut self.confirms else {
            return 0;
        };
        let unconfirmed = position.saturating_sub(c.heard_ms);
        c.lost_ms += unconfirmed;
        c.since_mark = 0;
        c.placed.clear();
        let held: Vec<(u64, u64)> = c.held.drain(..).collect();
        let played_ms = c.heard_ms;
        let at_ms = self.journal.ms(now);
        for (id, _) in held {
            self.notify(AgentEvent::Mark {
                id,
                played_ms,
                at_ms,
                state: MarkState::Cleared,
            });
        }
        unconfirmed
    }

    fn operator(&mut self, now: Instant, request: Request) -> Result<Reply, ProtoError> {
        match request {
            Request::Command(Command::Hangup(reason)) => {
                if self.has_ended() {
                    return Err(ProtoError::InvalidState {
                        operation: "hangup",
                        state: "over",
                    });
                }
                self.end_now(now, reason);
                Ok(Reply::Done)
            }
            Request::Command(c) => self.session.handle_command(now, c).map(|()| Reply::Done),
            Request::Play { .. } | Request::Clear if self.has_ended() => {
                Err(ProtoError::InvalidState {
                    operation: "playing audio",
                    state: "over",
                })
            }
            Request::Play { audio } => match self.media.operator_play(audio) {
                Some(ms) => {
                    self.journal
                        .event(now, EventKind::OperatorPlay, json!({ "ms": ms }));
                    Ok(Reply::Queued { ms })
                }
                None => Ok(Reply::QueueFull),
            },
            Request::Clear => {
                let utterance_ms = self.media.utterance_played_ms();
                let cleared = self.clear(now, Clearer::Operator);
                Ok(Reply::Cleared {
                    dropped_ms: cleared.dropped_ms,
                    played_ms: utterance_ms,
                })
            }
        }
    }

    /// Tells the agent something (a control event: never dropped; a queue full of unread ones
    /// comes back as [`CallCore::handle_agent_stuck`]).
    fn notify(&mut self, event: AgentEvent) {
        if self.agent_open {
            self.effects.push_back(Effect::AgentEvent(event));
        }
    }

    /// Closes the agent's event queue.
    fn close_agent(&mut self) {
        if std::mem::replace(&mut self.agent_open, false) {
            self.effects.push_back(Effect::CloseAgent);
        }
    }
}

/// The deepest nesting of JSON from the wire that is stored as JSON.
pub(crate) const MAX_JSON_DEPTH: usize = 32;

/// How deep `text`'s arrays and objects nest (brackets inside strings do not count).
fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn command_name(command: CommandKind) -> &'static str {
    match command {
        CommandKind::Answer => "answer",
        CommandKind::Audio => "audio",
        CommandKind::Dtmf => "dtmf",
        CommandKind::DtmfTone => "dtmf_tone",
        CommandKind::Hangup => "hangup",
    }
}

#[cfg(test)]
mod tests {
    //! The call's decisions on a test clock: every test passes the time in, so a whole call
    //! (seconds of playout) runs in microseconds and exactly the same way every time. The
    //! harness is the driver: it feeds the core, carries out its effects, and holds the
    //! agent's side (the real event queue, the commands the agent sent, the shared epoch).
    //! Plain `#[test]`s: nothing here needs a runtime.

    use std::time::Duration;

    use callgate_agent::queue::{self, EventReceiver, EventSender, Pushed, SendError};
    use callgate_agent::{Epoch, RecordEvent, Speaker, Turn};
    use callgate_audio::playout::Underrun;
    use callgate_proto::detect;
    use callgate_proto::{AudioFormat, DtmfDuration, inbound};
    use callgate_store::UnixMillis;

    use super::*;
    use crate::call::media::{LineFormats, MediaConfig};
    use crate::call::record::MAX_EVENTS;

    const INBOUND: &str = r#"{"event":"incoming_call","callerId":"01011112222","didNumber":"0212345678","sessionId":"s-1"}"#;
    const CALLBRIDGE: &str = r#"{"call_config":{"siteId":"s","caller":"010","callee":"070","cdrId":"1","callActionId":"1.5E9","ivrIp":"10.0.0.1:5","agentId":"a","agentType":"voice"},"audio_format":{"phone_output_audio_format":"PCM_8000","phone_input_audio_format":"PCM_8000"}}"#;
    /// 20 ms of PCM_8000.
    const FRAME: usize = 320;

    struct Call {
        core: CallCore,
        /// The agent's end of its event queue, and the call's (until the core closes it).
        events: EventReceiver,
        to_agent: Option<EventSender>,
        /// Commands the agent sent that the call has not taken yet.
        commands: VecDeque<Stamped>,
        /// The epoch shared by the agent and the call.
        epoch: Epoch,
        t0: Instant,
        /// Audio frames sent to the phone: (ms, first byte).
        audio: Vec<(u64, u8)>,
        texts: Vec<String>,
        closed: Option<Close>,
        ended: Option<EndReason>,
    }

    impl Call {
        fn new(start: &str, barge_in: bool) -> Self {
            // The test clock's origin: every later time is t0 plus a number of ms.
            let t0 = Instant::now();
            let mut handshake = detect::Handshake::new(None);
            let start = start
                .lines()
                .find_map(|line| handshake.handle_text(line).unwrap())
                .unwrap();
            let session = Session::new(t0, start, inbound::Config::default());
            let media = Media::new(
                &MediaConfig {
                    lead: Duration::from_secs(2),
                    underrun: Underrun::Nothing,
                    vad: None,
                    inband_dtmf: false,
                    recording: None,
                },
                "call",
                LineFormats {
                    caller_audio: AudioFormat::Pcm8000,
                    agent_audio: AudioFormat::Pcm8000,
                },
                None,
                t0,
            )
            .unwrap();
            let (to_agent, events) = queue::channel(50);
            let core = CallCore::new(
                session,
                Box::new(media),
                Journal::new(t0, UnixMillis(0)),
                CoreConfig { barge_in },
            );
            Self {
                core,
                events,
                to_agent: Some(to_agent),
                commands: VecDeque::new(),
                epoch: Epoch::default(),
                t0,
                audio: Vec::new(),
                texts: Vec::new(),
                closed: None,
                ended: None,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// The agent sends `command` at `ms` (in the current epoch); the call takes what the
        /// agent queued.
        fn agent(&mut self, ms: u64, command: AgentCommand) {
            self.send_in(self.epoch, command);
            self.take_commands(ms);
        }

        /// The agent sends `command` stamped with `epoch` (the call takes it later).
        fn send_in(&mut self, epoch: Epoch, command: AgentCommand) {
            self.commands.push_back(Stamped { epoch, command });
        }

        /// The agent clears at `ms` (`AgentIo::clear`): a new epoch, handed to the call.
        fn clear(&mut self, ms: u64) -> Epoch {
            self.epoch = Epoch(self.epoch.0 + 1);
            self.core.handle_agent_clear(self.at(ms), self.epoch);
            self.collect(ms);
            self.epoch
        }

        fn take_commands(&mut self, ms: u64) {
            while self.core.takes_agent_commands() {
                let Some(c) = self.commands.pop_front() else {
                    break;
                };
                self.core.handle_agent_command(self.at(ms), c);
            }
            self.collect(ms);
        }

        /// `n` ms of agent audio whose bytes are all `tag`.
        fn say(&mut self, ms: u64, n: usize, tag: u8) {
            let bytes = Bytes::from(vec![tag; n * FRAME / 20]);
            self.agent(ms, AgentCommand::Audio(bytes));
        }

        /// Runs the clock to `ms`, firing every deadline on the way.
        fn run_to(&mut self, ms: u64) {
            let end = self.at(ms);
            while let Some(d) = self.core.poll_timeout()
                && d <= end
            {
                self.core.handle_timeout(d);
                let at = d.saturating_duration_since(self.t0).as_millis() as u64;
                self.collect(at);
                self.take_commands(at);
            }
            self.collect(ms);
        }

        /// Carries out the core's effects at `ms`, as the driver does.
        fn collect(&mut self, ms: u64) {
            while let Some(effect) = self.core.poll_output() {
                match effect {
                    Effect::Send(Frame::Binary(data)) => self.audio.push((ms, data[0])),
                    Effect::Send(Frame::Text(text)) => self.texts.push(text),
                    Effect::Close(close) => self.closed = Some(close),
                    Effect::Ended(reason) => self.ended = Some(reason),
                    Effect::Answered | Effect::Cdr(_) => {}
                    Effect::AgentAudio(data) => {
                        if let Some(tx) = &self.to_agent
                            && tx.push_audio(data) == Pushed::DroppedOldest
                        {
                            self.core.handle_agent_audio_dropped();
                        }
                    }
                    Effect::AgentEvent(event) => {
                        if let Some(tx) = &self.to_agent
                            && tx.try_send_control(event) == Err(SendError::Full)
                        {
                            self.to_agent = None;
                            self.core.handle_agent_stuck(self.at(ms));
                        }
                    }
                    Effect::AdvanceEpoch => {
                        self.epoch = Epoch(self.epoch.0 + 1);
                        self.core.handle_epoch(self.at(ms), self.epoch);
                    }
                    Effect::CloseAgent => self.to_agent = None,
                }
            }
        }

        /// What the agent has been told since it last looked.
        fn events(&mut self) -> Vec<AgentEvent> {
            std::iter::from_fn(|| self.events.try_recv()).collect()
        }

        fn speech(&mut self, ms: u64) {
            self.core.handle_media_event(
                self.at(ms),
                MediaEvent::Speech(VadEvent::SpeechStarted { at_ms: ms }),
            );
            self.collect(ms);
        }

        fn frames_tagged(&self, tag: u8) -> usize {
            self.audio.iter().filter(|(_, t)| *t == tag).count()
        }
    }

    fn answered(barge_in: bool) -> Call {
        let mut call = Call::new(INBOUND, barge_in);
        call.agent(0, AgentCommand::Answer);
        assert_eq!(call.texts, [r#"{"event":"answer"}"#]);
        call
    }

    const TWILIO: &str = concat!(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
        "\n",
        r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1","start":{"streamSid":"MZ1","accountSid":"AC1","callSid":"CA1","tracks":["inbound"],"customParameters":{},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#
    );

    fn twilio_mark(n: u64) -> String {
        format!(
            r#"{{"event":"mark","sequenceNumber":"9","streamSid":"MZ1","mark":{{"name":"cg-{n}"}}}}"#
        )
    }

    impl Call {
        fn twilio_events(&self, event: &str) -> Vec<String> {
            self.texts
                .iter()
                .filter(|t| t.contains(&format!(r#""event":"{event}""#)))
                .cloned()
                .collect()
        }

        fn marks(&mut self) -> Vec<(u64, u64, MarkState)> {
            self.events()
                .into_iter()
                .filter_map(|e| match e {
                    AgentEvent::Mark {
                        id,
                        played_ms,
                        state,
                        ..
                    } => Some((id, played_ms, state)),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn twilio_counts_audio_as_heard_when_its_mark_returns() {
        let mut call = Call::new(TWILIO, true);
        call.agent(0, AgentCommand::Answer);
        assert!(call.texts.is_empty(), "Twilio expects no answer");
        call.say(0, 100, 1);
        call.agent(0, AgentCommand::Mark(7));
        call.run_to(200);
        assert_eq!(call.twilio_events("media").len(), 5);
        // The end of the utterance (and the agent's mark) is a mark on the wire.
        assert_eq!(call.twilio_events("mark").len(), 1);
        assert!(call.twilio_events("mark")[0].contains(r#""name":"cg-1""#));
        assert_eq!(
            call.marks(),
            [],
            "sent is not heard: the agent's mark waits"
        );
        call.core.handle_text(call.at(210), &twilio_mark(1));
        call.collect(210);
        assert_eq!(call.marks(), [(7, 100, MarkState::Played)]);
        // Two seconds of audio: a mark every second of continuous audio, then the end.
        call.run_to(300);
        call.say(300, 1000, 2);
        call.run_to(700);
        call.say(700, 1000, 2);
        call.run_to(2400);
        let marks = call.twilio_events("mark");
        // One after the first utterance, then one per second; the second one ends the
        // utterance too.
        assert_eq!(marks.len(), 1 + 2, "{marks:?}");
        // Twilio confirms the first second only; the caller barges in.
        call.core.handle_text(call.at(1400), &twilio_mark(2));
        call.collect(1400);
        call.say(2400, 1000, 3);
        call.run_to(2600);
        call.speech(2600);
        assert_eq!(call.twilio_events("clear").len(), 1);
        let barge = call
            .events()
            .into_iter()
            .find_map(|e| match e {
                AgentEvent::BargeIn(i) => Some(i),
                _ => None,
            })
            .expect("barge-in");
        // Heard: 100 ms, then the confirmed second; the rest sent was cut off by the clear.
        assert_eq!(barge.played_ms, 1100);
        // Sent: 120 frames (2400 ms), of which 1300 ms were never confirmed; the playout
        // still held 660 ms. Both count as dropped: sent is not heard on Twilio.
        assert_eq!(call.twilio_events("media").len(), 120);
        assert_eq!(barge.dropped_ms, (2400 - 1100) + 660, "{barge:?}");
        // Marks Twilio returns after the clear were dropped, not played: not reported.
        call.core.handle_text(call.at(2610), &twilio_mark(3));
        call.collect(2610);
        assert_eq!(call.marks(), []);
    }

    #[test]
    fn twilio_hangup_waits_for_the_goodbye_to_be_confirmed() {
        let mut call = Call::new(TWILIO, false);
        call.agent(0, AgentCommand::Answer);
        call.say(0, 200, 1);
        call.agent(0, AgentCommand::Hangup);
        call.run_to(300);
        assert_eq!(call.twilio_events("media").len(), 10);
        assert_eq!(call.ended, None, "the goodbye is sent, not yet heard");
        call.core.handle_text(call.at(320), &twilio_mark(1));
        call.collect(320);
        assert_eq!(call.ended, Some(EndReason::AgentHangup));
        assert_eq!(call.closed.as_ref().map(|c| c.code.0), Some(1000));
        // Without the mark, the wait is bounded.
        let mut call = Call::new(TWILIO, false);
        call.agent(0, AgentCommand::Answer);
        call.say(0, 200, 1);
        call.agent(0, AgentCommand::Hangup);
        call.run_to(2000);
        assert_eq!(call.ended, None);
        call.run_to(2300);
        assert_eq!(call.ended, Some(EndReason::AgentHangup));
    }

    #[test]
    fn hangup_with_audio_queued_ends_when_the_audio_has_played() {
        let mut call = answered(false);
        call.say(0, 500, 1);
        call.agent(0, AgentCommand::Hangup);
        call.run_to(400);
        assert_eq!(call.ended, None, "the goodbye is still playing");
        call.run_to(600);
        assert_eq!(call.ended, Some(EndReason::AgentHangup));
        assert_eq!(call.frames_tagged(1), 25, "all 500 ms were sent");
        assert!(call.texts.contains(&r#"{"event":"hangup"}"#.to_owned()));
        // The last frame left at its slot (one frame of slack), not before.
        assert!(call.audio.last().unwrap().0 >= 460);
    }

    #[test]
    fn barge_in_during_a_goodbye_does_not_cancel_the_hangup() {
        let mut call = answered(true);
        call.say(0, 1000, 1);
        call.agent(0, AgentCommand::Hangup);
        call.run_to(300);
        call.speech(300);
        call.run_to(1100);
        assert_eq!(call.ended, Some(EndReason::AgentHangup));
        assert_eq!(call.frames_tagged(1), 50, "the goodbye played to its end");
        assert!(
            !call
                .events()
                .iter()
                .any(|e| matches!(e, AgentEvent::BargeIn(_)))
        );
    }

    #[test]
    fn a_clear_during_a_goodbye_ends_the_call_at_once() {
        let mut call = answered(true);
        call.say(0, 1000, 1);
        call.agent(0, AgentCommand::Hangup);
        call.run_to(300);
        call.clear(300);
        assert_eq!(call.ended, Some(EndReason::AgentHangup));
        // What played until the clear (two at 0 ms, one of them the frame of slack, then one
        // per 20 ms up to 300 ms), and nothing after it.
        let sent = call.frames_tagged(1);
        assert_eq!(sent, 17, "frames sent before the clear");
        call.run_to(1100);
        assert_eq!(call.frames_tagged(1), sent, "nothing plays after the clear");
    }

    #[test]
    fn an_agent_that_returns_hangs_up_after_its_last_words() {
        let mut call = answered(false);
        call.say(0, 200, 1);
        call.core.handle_agent_exit(call.at(0), AgentExit::Returned);
        call.collect(0);
        assert_eq!(call.ended, None);
        call.run_to(300);
        assert_eq!(call.ended, Some(EndReason::AgentHangup));
        assert_eq!(call.frames_tagged(1), 10);
    }

    #[test]
    fn barge_in_clears_within_a_frame_and_reports_totals() {
        let mut call = answered(true);
        call.say(0, 300, 1);
        // A gap: the caller hears nothing for 700 ms (the clock runs through it: an owner
        // that slept through the gap's deadline would be stalled). Positions count audio, not
        // time.
        call.run_to(1000);
        call.agent(1000, AgentCommand::Mark(1));
        call.say(1000, 1000, 2);
        call.run_to(1200);
        call.speech(1200);
        let sent_at_barge_in = call.audio.len();
        call.run_to(1500);
        assert_eq!(
            call.audio.len(),
            sent_at_barge_in,
            "nothing plays after the barge-in"
        );
        let events = call.events();
        let mark = events.iter().find_map(|e| match e {
            AgentEvent::Mark {
                id: 1,
                played_ms,
                state,
                ..
            } => Some((*played_ms, *state)),
            _ => None,
        });
        assert_eq!(mark, Some((300, MarkState::Played)));
        let barge = events.iter().find_map(|e| match e {
            AgentEvent::BargeIn(i) => Some(*i),
            _ => None,
        });
        let barge = barge.expect("barge-in reported");
        // 300 ms before the gap, then 1000..1200 ms plus the frame of slack and the one due
        // at 1200: 240 ms sent. Neither protocol can take sent audio back, so sent is heard.
        assert_eq!(barge.played_ms, 300 + 240);
        assert_eq!(barge.dropped_ms, 1000 - 240);
        assert_eq!(barge.at_ms, 1200);
        // What the caller heard of the second utterance: totals subtract exactly.
        assert_eq!(barge.played_ms - mark.unwrap().0, 240);
        assert_eq!(call.frames_tagged(2) * 20, 240);
        assert_eq!(barge.epoch, call.epoch);
        assert_eq!(
            barge.epoch,
            Epoch(1),
            "the barge-in started the first new epoch"
        );
    }

    #[test]
    fn marks_across_clears_say_whether_their_audio_played() {
        let mut call = answered(false);
        call.say(0, 200, 1);
        call.agent(0, AgentCommand::Mark(1));
        call.say(0, 200, 2);
        call.agent(0, AgentCommand::Mark(2));
        call.run_to(100);
        let epoch = call.clear(100);
        call.say(100, 100, 3);
        call.agent(100, AgentCommand::Mark(3));
        call.run_to(400);
        let events = call.events();
        let marks: Vec<(u64, u64, MarkState)> = events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Mark {
                    id,
                    played_ms,
                    state,
                    ..
                } => Some((*id, *played_ms, *state)),
                _ => None,
            })
            .collect();
        assert_eq!(
            marks,
            [
                (1, 140, MarkState::Cleared),
                (2, 140, MarkState::Cleared),
                (3, 240, MarkState::Played)
            ]
        );
        let cleared = events.iter().find_map(|e| match e {
            AgentEvent::Cleared(i) => Some(*i),
            _ => None,
        });
        assert_eq!(
            cleared,
            Some(Interruption {
                played_ms: 140,
                dropped_ms: 260,
                at_ms: 100,
                epoch
            })
        );
    }

    #[test]
    fn nothing_from_before_a_clear_plays_after_it() {
        let mut call = answered(true);
        let old: Epoch = call.epoch;
        call.say(0, 400, 1);
        call.run_to(100);
        call.speech(100);
        // The agent's pipeline still delivers audio it produced for the old response.
        call.send_in(old, AgentCommand::Audio(Bytes::from(vec![1u8; FRAME * 10])));
        call.send_in(old, AgentCommand::Mark(9));
        call.take_commands(100);
        // New audio in the new epoch plays.
        call.say(100, 100, 2);
        call.run_to(600);
        assert_eq!(
            call.frames_tagged(1),
            7,
            "140 ms sent by the barge-in, none after"
        );
        assert_eq!(call.frames_tagged(2), 5);
        assert!(call.events().iter().any(|e| matches!(
            e,
            AgentEvent::Mark {
                id: 9,
                state: MarkState::Cleared,
                ..
            }
        )));
    }

    #[test]
    fn operator_audio_plays_ahead_of_what_the_agent_sends_next() {
        let mut call = answered(false);
        call.say(0, 100, 1);
        // 100 ms of operator audio, in the phone's format.
        let audio = Bytes::from(vec![2u8; FRAME * 5]);
        let reply = call
            .core
            .handle_operator(call.at(0), Request::Play { audio });
        assert_eq!(reply, Ok(Reply::Queued { ms: 100 }));
        call.say(0, 100, 3);
        call.run_to(400);
        let order: Vec<u8> = call.audio.iter().map(|(_, t)| *t).collect();
        let mut dedup = order.clone();
        dedup.dedup();
        assert_eq!(
            dedup,
            [1, 2, 3],
            "agent, operator, then the agent's next audio: {order:?}"
        );
        assert_eq!(order.len(), 15);
    }

    #[test]
    fn operator_audio_past_ten_minutes_is_refused_as_a_full_queue() {
        let mut call = answered(false);
        let minute = Bytes::from(vec![2u8; FRAME * 50 * 60]);
        for _ in 0..10 {
            let reply = call.core.handle_operator(
                call.at(0),
                Request::Play {
                    audio: minute.clone(),
                },
            );
            assert_eq!(reply, Ok(Reply::Queued { ms: 60_000 }));
        }
        // The call is live: the refusal says the queue is full, not that the call is over.
        let reply = call
            .core
            .handle_operator(call.at(0), Request::Play { audio: minute });
        assert_eq!(reply, Ok(Reply::QueueFull));
        assert!(!call.core.has_ended());
    }

    #[test]
    fn an_agent_failing_mid_utterance_ends_the_call_at_once() {
        let mut call = answered(false);
        call.say(0, 1000, 1);
        call.run_to(200);
        call.core
            .handle_agent_exit(call.at(200), AgentExit::Failed("backend gone".into()));
        call.collect(200);
        assert_eq!(call.ended, Some(EndReason::AgentFailed));
        // Inbound: `hangup` at once, then the connection waits for the CDR.
        assert_eq!(
            call.texts.last().map(String::as_str),
            Some(r#"{"event":"hangup"}"#)
        );
        assert_eq!(
            call.frames_tagged(1),
            12,
            "200 ms plus one frame of slack, then nothing"
        );
        call.run_to(1000);
        assert_eq!(call.frames_tagged(1), 12);
    }

    #[test]
    fn refused_commands_are_told_to_the_agent_once_per_run() {
        let mut call = Call::new(CALLBRIDGE, false);
        call.say(0, 100, 1);
        call.say(0, 100, 1);
        call.agent(
            0,
            AgentCommand::Dtmf {
                digit: Digit::D1,
                duration: DtmfDuration::from_millis(100).unwrap(),
            },
        );
        let refused: Vec<CommandKind> = call
            .events()
            .into_iter()
            .filter_map(|e| match e {
                AgentEvent::Refused { command, .. } => Some(command),
                _ => None,
            })
            .collect();
        assert_eq!(refused, [CommandKind::Audio, CommandKind::Dtmf]);
        call.agent(0, AgentCommand::Answer);
        call.say(0, 100, 1);
        call.run_to(200);
        assert_eq!(call.frames_tagged(1), 5);
        let kinds: Vec<&str> = call
            .core
            .journal()
            .pending_events()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, ["agent_command_refused", "agent_command_refused"]);
    }

    #[test]
    fn the_agent_writes_the_record() {
        let mut call = answered(false);
        let turn = Turn {
            speaker: Speaker::Agent,
            text: "Hello".into(),
            start_ms: 0,
            end_ms: 800,
            interrupted: false,
        };
        call.agent(0, AgentCommand::Transcript(Box::new(turn)));
        call.agent(
            0,
            AgentCommand::Event(Box::new(RecordEvent {
                name: "tool_call".into(),
                detail: json!({"tool": "lookup"}),
            })),
        );
        call.agent(0, AgentCommand::Usage(vec![("input_tokens".into(), 12.0)]));
        call.agent(0, AgentCommand::Usage(vec![("input_tokens".into(), 30.0)]));
        let journal = call.core.journal();
        assert_eq!(journal.pending_transcript()[0].text, "Hello");
        assert_eq!(
            journal.usage_json().as_deref(),
            Some(r#"{"input_tokens":42.0}"#)
        );
        let (kind, detail) = journal.pending_events().next().unwrap();
        assert_eq!(kind, "agent");
        assert_eq!(
            detail,
            json!({"name": "tool_call", "detail": {"tool": "lookup"}})
        );
    }

    #[test]
    fn what_one_call_stores_is_capped_and_the_cap_is_recorded() {
        let mut call = answered(false);
        let long = format!(r#"{{"event":"x","pad":"{}"}}"#, "y".repeat(10_000));
        call.core.handle_text(call.at(0), &long);
        for k in 0..MAX_EVENTS + 50 {
            call.core
                .handle_text(call.at(1), &format!(r#"{{"event":"x{k}"}}"#));
        }
        call.core.handle_peer_close(call.at(2), Disconnect::Dropped);
        call.collect(2);
        let journal = call.core.journal();
        let events: Vec<(&str, serde_json::Value)> = journal.pending_events().collect();
        let (kind, first) = &events[0];
        assert_eq!(*kind, "unknown_message");
        assert_eq!(first["truncated"], true);
        assert_eq!(first["bytes"], long.len());
        assert_eq!(first["text"].as_str().unwrap().len(), MAX_TEXT);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds.len() as u64,
            MAX_EVENTS + 2,
            "the cap, its note and the end"
        );
        assert_eq!(kinds[kinds.len() - 2], "record_capped");
        assert_eq!(
            kinds[kinds.len() - 1],
            "ended",
            "how the call ended is always kept"
        );
        let stats = call.core.take_stats();
        assert_eq!(stats.record_dropped, 51);
    }

    #[test]
    fn json_depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth(r#"{"a":[1,{"b":"[[[{"}]}"#), 3);
        assert_eq!(json_depth(r#""\"{""#), 0);
        assert_eq!(
            json_depth(&format!("{}{}", "[".repeat(100), "]".repeat(100))),
            100
        );
    }

    #[test]
    fn an_agent_that_stops_reading_its_events_is_failed() {
        let mut call = answered(false);
        // 50 queued events, all control (DTMF): the 51st finds no room.
        for k in 0..51 {
            call.core
                .handle_text(call.at(k), r#"{"event":"dtmf","digit":"5"}"#);
            call.collect(k);
        }
        assert_eq!(call.ended, Some(EndReason::AgentFailed));
    }
    #[test]
    fn a_barge_in_during_an_agent_clear_drops_what_the_agent_sent_before_hearing_of_it() {
        let mut call = answered(true);
        call.say(0, 400, 1);
        call.run_to(100);
        // The agent clears (epoch 1) and sends a new answer; before the call hears of the
        // clear, the caller speaks over the old answer.
        call.epoch = Epoch(1);
        let new_answer = call.epoch;
        call.speech(100);
        assert_eq!(
            call.epoch,
            Epoch(2),
            "the barge-in's epoch comes after the agent's"
        );
        call.send_in(
            new_answer,
            AgentCommand::Audio(Bytes::from(vec![2u8; FRAME * 5])),
        );
        // The driver hands the agent's clear in before its next command.
        call.core.handle_agent_clear(call.at(100), call.epoch);
        call.take_commands(100);
        call.run_to(400);
        assert_eq!(
            call.frames_tagged(2),
            0,
            "sent before the agent heard of the barge-in"
        );
        let epochs: Vec<(bool, Epoch)> = call
            .events()
            .into_iter()
            .filter_map(|e| match e {
                AgentEvent::BargeIn(i) => Some((true, i.epoch)),
                AgentEvent::Cleared(i) => Some((false, i.epoch)),
                _ => None,
            })
            .collect();
        assert_eq!(epochs, [(true, Epoch(2)), (false, Epoch(2))]);
    }

    #[test]
    fn the_core_reads_no_clock_and_holds_no_runtime_types() {
        // What a clippy.toml would ban in this module (the module docs say why it is a test).
        let source = include_str!("core.rs");
        let code = &source[..source
            .find("#[cfg(test)]\nmod tests")
            .expect("the tests module")];
        for banned in [
            "Instant::now",
            "SystemTime::now",
            "UnixMillis::now",
            "tokio",
            "Atomic",
            "Mutex",
            "mpsc",
            "Notify",
            "EventSender",
            "AgentControl",
        ] {
            assert!(
                !code.contains(banned),
                "call/core.rs uses `{banned}`: the core takes time as an argument and holds no \
                 channel, atomic or runtime type"
            );
        }
    }
}
