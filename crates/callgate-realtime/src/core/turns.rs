//! Turns: the caller's speech as the service detects it ([`Caller`]), placed on the call's
//! clock; the transcript of both speakers for the record; and the history that seeds a new
//! session after a drop or a renewal.

use std::collections::VecDeque;
use std::time::Instant;

use callgate_agent::{AgentCommand, Speaker, Turn};

use super::{Core, MAX_SEED_CHARS, MAX_SEED_TURNS};

/// Speech timings kept for caller turns whose transcript has not come yet.
const MAX_PENDING_SPEECH: usize = 64;

/// Whether the caller is speaking, as the service's turn detection says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Caller {
    #[default]
    Silent,
    Speaking,
}

/// A caller turn whose transcript has not come yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Speech {
    /// The user item the service made of it.
    item_id: String,
    /// When it began, ms of call time.
    start_ms: u64,
    /// When it ended, ms of call time, once the service says.
    end_ms: Option<u64>,
}

/// A turn of the conversation, kept to seed a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeedTurn {
    pub(crate) speaker: Speaker,
    /// What was said (of an agent turn: what the caller heard).
    pub(crate) text: String,
}

/// The turns concern's state.
#[derive(Debug, Default)]
pub(crate) struct Turns {
    speech: VecDeque<Speech>,
    caller: Caller,
    /// The most recent turns (at most [`MAX_SEED_TURNS`] and [`MAX_SEED_CHARS`]).
    history: VecDeque<SeedTurn>,
}

impl Turns {
    pub(crate) fn caller_speaking(&self) -> bool {
        self.caller == Caller::Speaking
    }

    pub(crate) fn history(&self) -> impl Iterator<Item = &SeedTurn> {
        self.history.iter()
    }

    pub(crate) fn history_len(&self) -> usize {
        self.history.len()
    }

    /// The session is gone: the caller's half-heard turn with it.
    pub(crate) fn session_lost(&mut self) {
        self.caller = Caller::Silent;
    }

    fn remember(&mut self, speaker: Speaker, text: String) {
        self.history.push_back(SeedTurn { speaker, text });
        while self.history.len() > MAX_SEED_TURNS
            || self.history.iter().map(|t| t.text.len()).sum::<usize>() > MAX_SEED_CHARS
        {
            if self.history.pop_front().is_none() {
                break;
            }
        }
    }
}

impl Core {
    /// A turn for the transcript (and the history).
    pub(super) fn turn(
        &mut self,
        speaker: Speaker,
        text: String,
        start_ms: u64,
        end_ms: u64,
        cut: bool,
    ) {
        self.turns.remember(speaker, text.clone());
        self.command(AgentCommand::Transcript(Box::new(Turn {
            speaker,
            text,
            start_ms,
            end_ms: end_ms.max(start_ms),
            interrupted: cut,
        })));
    }

    /// `input_audio_buffer.speech_started`: the caller speaks; over the agent, a barge-in.
    pub(super) fn speech_started(&mut self, item_id: String, audio_start_ms: u64) {
        self.turns.caller = Caller::Speaking;
        let bytes_per_ms = self.formats.session.input.bytes_per_ms();
        let start_ms = self.session.input.to_call_ms(audio_start_ms, bytes_per_ms);
        self.turns.speech.push_back(Speech {
            item_id,
            start_ms,
            end_ms: None,
        });
        while self.turns.speech.len() > MAX_PENDING_SPEECH {
            self.turns.speech.pop_front();
        }
        self.barge_in();
    }

    /// `input_audio_buffer.speech_stopped`, read at `received`: the caller's turn ended.
    pub(super) fn speech_stopped(&mut self, item_id: String, audio_end_ms: u64, received: Instant) {
        self.turns.caller = Caller::Silent;
        let bytes_per_ms = self.formats.session.input.bytes_per_ms();
        let end_ms = self.session.input.to_call_ms(audio_end_ms, bytes_per_ms);
        if let Some(s) = self.turns.speech.iter_mut().find(|s| s.item_id == item_id) {
            s.end_ms = Some(end_ms);
        }
        self.response.turn_ended(received);
        if self.plan.settings.turn_detection.create_response == Some(false) {
            // The service detects the turn; callgate asks for the answer.
            self.request_response(false);
        } else {
            // The service answers on its own, and that answer sees any tool output.
            self.response.tool_answer_not_needed();
        }
    }

    /// The caller's words for user item `item_id`.
    pub(super) fn caller_transcript(&mut self, now: Instant, item_id: &str, transcript: &str) {
        let (start, end) = match self.turns.speech.iter().position(|s| s.item_id == item_id) {
            Some(pos) => match self.turns.speech.remove(pos) {
                Some(s) => (s.start_ms, s.end_ms.unwrap_or(s.start_ms)),
                None => (0, 0),
            },
            None => (self.ms(now), self.ms(now)),
        };
        let text = transcript.trim().to_owned();
        if !text.is_empty() {
            self.turn(Speaker::Caller, text, start, end, false);
        }
    }
}
