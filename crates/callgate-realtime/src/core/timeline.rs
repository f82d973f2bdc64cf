//! The playback timeline: the assistant's audio items on their way to the caller, what was
//! sent of each, what the caller heard of each (from the call's marks and clear reports), and
//! what is truncated or deleted at a clear. Each item moves through [`Stage`]; the core's own
//! clear through [`Clearing`].

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use callgate_agent::{AgentCommand, Interruption, MarkState, Speaker};
use serde_json::json;

use super::{Core, Counted, Output};
use crate::protocol::{Item, client};

/// How far an item's audio has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Announced by the service; none of its audio queued yet.
    Announced,
    /// Its first audio was queued (and its Start mark placed before it).
    Queued,
    /// The service has sent all of it (`audio.done`): its End mark follows its last sample.
    AllQueued,
}

/// Where an item began playing, from its Start mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Started {
    /// Agent audio heard since the call began when its first sample played (the mark's
    /// `played_ms`): the call's own count, exact whatever else played before it.
    played_ms: u64,
    /// When its first sample played, ms since the call began.
    at_ms: u64,
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
    stage: Stage,
    started: Option<Started>,
    /// Samples (phone output) sent for it.
    sent: u64,
    /// Bytes received from the service (its output format).
    service_bytes: u64,
    /// Its transcript so far.
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkKind {
    /// The item starts playing.
    Start,
    /// The first frame of an answer left: the latency measurement ends.
    First,
    /// The item has played to its end.
    End,
}

/// A mark placed in the call's playout.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    /// The item it belongs to.
    item: String,
    kind: MarkKind,
}

/// The core's own clear (a barge-in the service detected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clearing {
    Idle,
    /// Asked for: the call's next `Cleared` report is its answer and settles the timeline.
    Requested,
}

/// The playback concern's state.
#[derive(Debug)]
pub(crate) struct Timeline {
    /// The items not yet played to their end, oldest first.
    items: Vec<Spoken>,
    /// Clears the core asked for (see [`Spoken::clears`]).
    clears: u64,
    /// The last mark id handed out.
    last_mark: u64,
    marks: HashMap<u64, Mark>,
    clearing: Clearing,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            clears: 0,
            last_mark: 0,
            marks: HashMap::new(),
            clearing: Clearing::Idle,
        }
    }
}

impl Timeline {
    /// Whether no agent audio is on its way.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the next `Cleared` report answers the core's own clear; it is settled then.
    pub(crate) fn take_own_clear(&mut self) -> bool {
        std::mem::replace(&mut self.clearing, Clearing::Idle) == Clearing::Requested
    }

    /// The session is gone: its clear will not be answered as its own.
    pub(crate) fn session_lost(&mut self) {
        self.clearing = Clearing::Idle;
    }

    pub(crate) fn transcript_delta(&mut self, item_id: &str, delta: &str) {
        if let Some(item) = self.items.iter_mut().find(|s| s.id == item_id) {
            item.text.push_str(delta);
        }
    }

    pub(crate) fn transcript_done(&mut self, item_id: &str, transcript: String) {
        if let Some(item) = self.items.iter_mut().find(|s| s.id == item_id) {
            item.text = transcript;
        }
    }

    fn new_mark(&mut self, item: &str, kind: MarkKind) -> u64 {
        self.last_mark += 1;
        let mark = Mark {
            item: item.to_owned(),
            kind,
        };
        self.marks.insert(self.last_mark, mark);
        self.last_mark
    }

    /// The id of `item`'s Start mark (for the tests, which play the call's part).
    #[cfg(test)]
    pub(crate) fn start_mark(&self, item: &str) -> Option<u64> {
        self.marks
            .iter()
            .find(|(_, m)| m.item == item && m.kind == MarkKind::Start)
            .map(|(id, _)| *id)
    }
}

impl Core {
    /// A new assistant item of the current session.
    fn spoken_item(&self, id: &str, response_id: String) -> Spoken {
        Spoken {
            id: id.to_owned(),
            response_id,
            conn: self.current_conn().unwrap_or(0),
            clears: self.timeline.clears,
            stage: Stage::Announced,
            started: None,
            sent: 0,
            service_bytes: 0,
            text: String::new(),
        }
    }

    /// Whether the agent's audio is unwanted now: the cut response's, or anything after the
    /// goodbye once the call hangs up.
    fn unwanted(&self, response_id: &str) -> bool {
        self.response.is_cancelled(response_id) || (self.hanging_up() && !self.tools.goodbye())
    }

    /// `conversation.item.added`: an assistant message goes on the timeline; a function
    /// call's name is remembered.
    pub(super) fn item_added(&mut self, response_id: Option<String>, item: Item) {
        if item.kind == "function_call" {
            self.tools.function_item(item);
            return;
        }
        if item.kind != "message" || item.role.as_deref() != Some("assistant") {
            return;
        }
        let response_id = response_id
            .or_else(|| self.response.running_id().map(str::to_owned))
            .unwrap_or_default();
        if self.unwanted(&response_id) {
            return;
        }
        if !self.timeline.items.iter().any(|s| s.id == item.id) {
            let spoken = self.spoken_item(&item.id, response_id);
            self.timeline.items.push(spoken);
        }
    }

    /// Audio of `item_id`, read at `received`: converted and queued for the call.
    pub(super) fn audio(
        &mut self,
        response_id: &str,
        item_id: &str,
        audio: &Bytes,
        received: Instant,
    ) {
        if self.unwanted(response_id) {
            return;
        }
        let pos = match self.timeline.items.iter().position(|s| s.id == item_id) {
            Some(pos) => pos,
            None => {
                // Audio without its item announced (a lenient server): announce it now.
                let spoken = self.spoken_item(item_id, response_id.to_owned());
                self.timeline.items.push(spoken);
                self.timeline.items.len() - 1
            }
        };
        let phone = self.formats.from_service.convert(audio);
        self.timeline.items[pos].service_bytes += audio.len() as u64;
        if phone.is_empty() {
            return;
        }
        if self.timeline.items[pos].stage == Stage::Announced {
            // Its Start mark goes just before its first sample: the mark's `played_ms` is
            // where the item begins on the call's count of what was heard.
            self.timeline.items[pos].stage = Stage::Queued;
            let mark = self.timeline.new_mark(item_id, MarkKind::Start);
            self.command(AgentCommand::Mark(mark));
            if self.response.first_audio(received) {
                // The first audio of an answer: its first frame on its own, marked, so the
                // mark reports when that frame left.
                let frame = self.call.output_format.frame_bytes_20ms().min(phone.len());
                self.queue_item_audio(pos, phone.slice(..frame));
                let mark = self.timeline.new_mark(item_id, MarkKind::First);
                self.command(AgentCommand::Mark(mark));
                let rest = phone.slice(frame..);
                if !rest.is_empty() {
                    self.queue_item_audio(pos, rest);
                }
                return;
            }
        }
        self.queue_item_audio(pos, phone);
    }

    /// Queues audio of item `pos` (phone output format) for the call.
    fn queue_item_audio(&mut self, pos: usize, audio: Bytes) {
        let bytes_per_sample = u64::from(self.call.output_format.bytes_per_sample());
        self.timeline.items[pos].sent += audio.len() as u64 / bytes_per_sample;
        self.command(AgentCommand::Audio(audio));
    }

    /// `output_audio.done`: the converter's tail, then the item's End mark.
    pub(super) fn audio_done(&mut self, item_id: String) {
        let tail = self.formats.from_service.flush();
        let Some(pos) = self
            .timeline
            .items
            .iter()
            .position(|s| s.id == item_id && s.stage != Stage::Announced)
        else {
            return;
        };
        if !tail.is_empty() {
            self.queue_item_audio(pos, tail);
        }
        self.timeline.items[pos].stage = Stage::AllQueued;
        let mark = self.timeline.new_mark(&item_id, MarkKind::End);
        self.command(AgentCommand::Mark(mark));
    }

    /// The service heard the caller start speaking over the agent: the core clears the
    /// playout (what waits here for the call goes at once) and cancels the response; the
    /// call's report of the clear settles the items.
    pub(super) fn barge_in(&mut self) {
        if !self.agent_busy() || self.hanging_up() {
            return;
        }
        if self
            .timeline
            .items
            .iter()
            .any(|s| s.stage != Stage::Announced)
        {
            self.timeline.clearing = Clearing::Requested;
            self.timeline.clears += 1;
            self.outbox.cleared(self.outbox.epoch());
            self.out.push_back(Output::Clear);
        }
        self.cancel_response();
    }

    /// A mark came back from the call.
    pub(super) fn mark(
        &mut self,
        now: Instant,
        id: u64,
        played_ms: u64,
        at_ms: u64,
        state: MarkState,
    ) {
        let Some(mark) = self.timeline.marks.remove(&id) else {
            return;
        };
        let played = state == MarkState::Played;
        match mark.kind {
            MarkKind::Start => {
                if played
                    && let Some(item) = self.timeline.items.iter_mut().find(|s| s.id == mark.item)
                {
                    item.started.get_or_insert(Started { played_ms, at_ms });
                }
            }
            MarkKind::First => self.first_frame_left(now, played),
            MarkKind::End if played => {
                if let Some(pos) = self.timeline.items.iter().position(|s| s.id == mark.item) {
                    // Everything before it has played too.
                    let done: Vec<Spoken> = self.timeline.items.drain(..=pos).collect();
                    for item in done {
                        let start = item.started.map_or(at_ms, |s| s.at_ms);
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
    pub(super) fn settle(&mut self, now: Instant, i: Interruption, source: &str, own: bool) {
        let clears = self.timeline.clears;
        let (cut, keep): (Vec<Spoken>, Vec<Spoken>) = std::mem::take(&mut self.timeline.items)
            .into_iter()
            .partition(|item| !own || item.clears < clears);
        self.timeline.items = keep;
        let mut report = Vec::new();
        for item in cut {
            if let Some(heard) = self.settle_item(item, &i) {
                report.push(heard);
            }
        }
        let kept: Vec<&str> = self.timeline.items.iter().map(|s| s.id.as_str()).collect();
        self.timeline
            .marks
            .retain(|_, m| m.kind == MarkKind::First || kept.contains(&m.item.as_str()));
        if !report.is_empty() || i.dropped_ms > 0 {
            self.count(Counted::BargeIn);
            self.event(
                "barge_in",
                json!({"source": source, "played_ms": i.played_ms, "dropped_ms": i.dropped_ms,
                       "items": report, "at_ms": i.at_ms}),
            );
        }
        self.maybe_renew(now);
    }

    /// One item a clear cut: a whole turn if it had played to its end; otherwise truncated
    /// (or deleted, if nothing of it was heard) on its session, and reported.
    fn settle_item(&mut self, item: Spoken, i: &Interruption) -> Option<serde_json::Value> {
        let sent_ms = item.sent * 1000 / self.formats.phone_rate;
        let received_ms = item.service_bytes / self.formats.session.output.bytes_per_ms();
        // The call's own counts: heard since the call began now, minus the same count when
        // the item's first sample played.
        let heard_ms = match item.started {
            Some(started) => i
                .played_ms
                .saturating_sub(started.played_ms)
                .min(sent_ms)
                .min(received_ms),
            None => 0,
        };
        let running =
            self.response.is_running_uncut(&item.response_id) || item.stage != Stage::AllQueued;
        let start_ms = item.started.map_or(i.at_ms, |s| s.at_ms);
        if item.stage != Stage::Announced && heard_ms >= sent_ms.min(received_ms) && !running {
            // It had played to its end: a whole turn.
            if !item.text.is_empty() {
                self.turn(Speaker::Agent, item.text, start_ms, i.at_ms, false);
            }
            return None;
        }
        let report = json!({"item_id": item.id, "heard_ms": heard_ms,
                            "received_ms": received_ms});
        // Only the session that made the item may be told (a new session never had it).
        let told = Some(item.conn) == self.current_conn();
        if heard_ms == 0 {
            // Nothing of it was heard: it must not stay in the conversation.
            if told {
                self.send(client::delete(&item.id));
            }
            return Some(report);
        }
        if told {
            self.send(client::truncate(&item.id, heard_ms));
        }
        let text = cut_text(&item.text, heard_ms, received_ms);
        if !text.is_empty() {
            self.turn(Speaker::Agent, text, start_ms, i.at_ms, true);
        }
        Some(report)
    }

    /// The call ended at `at_ms`: items still playing were heard up to then, as far as known.
    pub(super) fn timeline_ended(&mut self, at_ms: u64) {
        for item in std::mem::take(&mut self.timeline.items) {
            if let Some(started) = item.started
                && !item.text.is_empty()
            {
                self.turn(Speaker::Agent, item.text, started.at_ms, at_ms, true);
            }
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
