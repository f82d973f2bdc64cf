//! A live call's record. [`Journal`] is what the call core writes (counters, DTMF, the event
//! log, the transcript, usage): plain data, no I/O. [`Record`] is what the call task does with
//! it: hand it to the store writer (periodically and at the end, never per frame), and end the
//! record on every exit path (a drop guard covers panics).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use callgate_agent::Turn;
use callgate_proto::{EndReason, Protocol};
use callgate_store::{
    CallId, Counters, Ended, NewEvent, NewTranscriptEntry, StoreHandle, UnixMillis,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The kinds of entries in a call's event log (stored as their snake_case code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// A key from the caller (`digit`, `source`).
    Dtmf,
    /// A text message the protocol does not define (`text`).
    UnknownMessage,
    /// The peer broke the protocol (`kind`, `message`).
    ProtocolError,
    /// The caller started speaking (`at_ms`).
    SpeechStarted,
    /// The caller stopped speaking (`at_ms`).
    SpeechStopped,
    /// The caller spoke over the agent and cleared it (`played_ms`, `dropped_ms`).
    BargeIn,
    /// The agent cleared its audio (`played_ms`, `dropped_ms`).
    AgentClear,
    /// An operator cleared the audio (`played_ms`, `dropped_ms`).
    OperatorClear,
    /// An operator queued audio (`ms`).
    OperatorPlay,
    /// A command of the agent's could not be carried out (`command`, `message`).
    AgentCommandRefused,
    /// The agent failed (`message`).
    AgentFailed,
    /// An entry of the agent's own (`name`, `detail`).
    Agent,
    /// The agent asked to hang up with audio still playing (`queued_ms`).
    HangupPending,
    /// The call ended (`reason`).
    Ended,
    /// The CDR arrived.
    CdrReceived,
    /// The CDR does not match the documented shape (`message`).
    CdrInvalid,
    /// No CDR arrived in time.
    CdrMissing,
    /// The call reached its cap on stored events or transcript: later ones are counted, not
    /// stored (`max_events`, `max_bytes`, what was capped).
    RecordCapped,
}

impl EventKind {
    /// The stable code stored in the event log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Dtmf => "dtmf",
            Self::UnknownMessage => "unknown_message",
            Self::ProtocolError => "protocol_error",
            Self::SpeechStarted => "speech_started",
            Self::SpeechStopped => "speech_stopped",
            Self::BargeIn => "barge_in",
            Self::AgentClear => "agent_clear",
            Self::OperatorClear => "operator_clear",
            Self::OperatorPlay => "operator_play",
            Self::AgentCommandRefused => "agent_command_refused",
            Self::AgentFailed => "agent_failed",
            Self::Agent => "agent",
            Self::HangupPending => "hangup_pending",
            Self::Ended => "ended",
            Self::CdrReceived => "cdr_received",
            Self::CdrInvalid => "cdr_invalid",
            Self::CdrMissing => "cdr_missing",
            Self::RecordCapped => "record_capped",
        }
    }

    /// Whether the cap on stored events leaves this kind alone: how a call ended and what
    /// the phone system reported about it are always kept.
    fn always_kept(self) -> bool {
        matches!(
            self,
            Self::Ended
                | Self::CdrReceived
                | Self::CdrInvalid
                | Self::CdrMissing
                | Self::RecordCapped
        )
    }
}

/// The most event-log entries one call stores (beyond them: counted, not stored).
pub(crate) const MAX_EVENTS: u64 = 10_000;
/// The most bytes of event details and transcript text one call stores.
pub(crate) const MAX_RECORD_BYTES: u64 = 4 * 1024 * 1024;
/// The most transcript turns one call stores.
pub(crate) const MAX_TURNS: u64 = 10_000;
/// The most keys one call's `dtmf` string keeps.
pub(crate) const MAX_DTMF: usize = 1_000;
/// The most of one text from the wire (an unknown message) kept in an event.
pub(crate) const MAX_TEXT: usize = 4096;

/// What the call core records as the call goes, in memory.
#[derive(Debug)]
pub(crate) struct Journal {
    /// Wall-clock time at `started` (event timestamps are derived from the call's clock).
    started_wall: UnixMillis,
    started: Instant,
    pub(crate) counters: Counters,
    pub(crate) dtmf: String,
    events: Vec<NewEvent>,
    transcript: Vec<NewTranscriptEntry>,
    usage: BTreeMap<String, f64>,
    /// What this call has stored (or queued) so far, against the caps.
    stored: Stored,
}

/// Counts against the per-call caps.
#[derive(Debug, Default)]
struct Stored {
    events: u64,
    turns: u64,
    bytes: u64,
    /// Entries not stored because a cap was reached.
    dropped: u64,
    /// `record_capped` has been written.
    capped: bool,
}

impl Journal {
    /// A journal for a call that started at `started` (call clock) / `started_wall`.
    pub(crate) fn new(started: Instant, started_wall: UnixMillis) -> Self {
        Self {
            started_wall,
            started,
            counters: Counters::default(),
            dtmf: String::new(),
            events: Vec::new(),
            transcript: Vec::new(),
            usage: BTreeMap::new(),
            stored: Stored::default(),
        }
    }

    /// Milliseconds since the call began, at `now`.
    pub(crate) fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Adds an entry to the event log, unless the call reached its cap (then it is counted).
    pub(crate) fn event(&mut self, now: Instant, kind: EventKind, detail: serde_json::Value) {
        let detail = detail.to_string();
        let size = detail.len() as u64;
        if !kind.always_kept()
            && (self.stored.events >= MAX_EVENTS || self.stored.bytes + size > MAX_RECORD_BYTES)
        {
            self.capped(now, "events");
            return;
        }
        self.stored.events += 1;
        self.stored.bytes += size;
        let at = UnixMillis(self.started_wall.0 + self.ms(now) as i64);
        self.events.push(NewEvent {
            at,
            kind: kind.as_str().to_owned(),
            detail,
        });
    }

    /// Notes an entry not stored; the first time, says so in the event log.
    fn capped(&mut self, now: Instant, what: &str) {
        self.stored.dropped += 1;
        if !std::mem::replace(&mut self.stored.capped, true) {
            self.event(
                now,
                EventKind::RecordCapped,
                serde_json::json!({
                    "what": what,
                    "max_events": MAX_EVENTS,
                    "max_turns": MAX_TURNS,
                    "max_bytes": MAX_RECORD_BYTES,
                }),
            );
        }
    }

    /// Entries not stored because a cap was reached (taken: for the metrics).
    pub(crate) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.stored.dropped)
    }

    /// A key for the record's `dtmf` (beyond [`MAX_DTMF`] keys, only the event log, itself
    /// capped, keeps them).
    pub(crate) fn dtmf(&mut self, digit: char) {
        if self.dtmf.len() < MAX_DTMF {
            self.dtmf.push(digit);
        }
    }

    /// Adds a turn to the transcript, unless the call reached its cap.
    pub(crate) fn turn(&mut self, now: Instant, turn: Turn) {
        let size = turn.text.len() as u64;
        if self.stored.turns >= MAX_TURNS || self.stored.bytes + size > MAX_RECORD_BYTES {
            self.capped(now, "transcript");
            return;
        }
        self.stored.turns += 1;
        self.stored.bytes += size;
        self.transcript.push(NewTranscriptEntry {
            speaker: turn.speaker.as_str().to_owned(),
            text: turn.text,
            start_ms: turn.start_ms,
            end_ms: turn.end_ms,
            interrupted: turn.interrupted,
        });
    }

    /// Adds to the usage counters (at most 64 names; a name is at most 64 bytes).
    pub(crate) fn usage(&mut self, amounts: Vec<(String, f64)>) {
        for (name, amount) in amounts {
            let known = self.usage.contains_key(&name);
            if amount.is_finite() && name.len() <= 64 && (known || self.usage.len() < 64) {
                *self.usage.entry(name).or_insert(0.0) += amount;
            }
        }
    }

    /// The usage counters as a JSON object, if there are any.
    pub(crate) fn usage_json(&self) -> Option<String> {
        // (The caps above keep this small.)
        (!self.usage.is_empty()).then(|| serde_json::json!(self.usage).to_string())
    }

    /// The event log entries not yet handed over.
    #[cfg(test)]
    pub(crate) fn pending_events(&self) -> impl Iterator<Item = (&str, serde_json::Value)> {
        self.events.iter().map(|e| {
            (
                e.kind.as_str(),
                serde_json::from_str(&e.detail).unwrap_or_default(),
            )
        })
    }

    /// The transcript entries not yet handed over.
    #[cfg(test)]
    pub(crate) fn pending_transcript(&self) -> &[NewTranscriptEntry] {
        &self.transcript
    }
}

/// The record of one call in the store. Owned by the call task.
pub(crate) struct Record {
    id: CallId,
    protocol: Protocol,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    /// Tells the drop guard whether the server is shutting down.
    cancel: CancellationToken,
    started: Instant,
    /// What the metrics have been told of the counters so far.
    reported: Counters,
    /// The journal as last seen, for the drop guard (it cannot reach the journal).
    last: Ended,
    ended: bool,
}

impl Record {
    pub(crate) fn new(
        id: CallId,
        protocol: Protocol,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        started: Instant,
    ) -> Self {
        metrics.calls_live.inc();
        metrics
            .calls_started
            .get_or_create(&[("protocol", protocol.as_str())])
            .inc();
        Self {
            id,
            protocol,
            store,
            metrics,
            cancel,
            started,
            reported: Counters::default(),
            last: Ended {
                at: UnixMillis::now(),
                reason: String::new(),
                hangup_by: String::new(),
                counters: Counters::default(),
                dtmf: String::new(),
                usage: None,
            },
            ended: false,
        }
    }

    pub(crate) fn answered(&self, at: UnixMillis) {
        self.store.mark_answered(self.id.clone(), at);
    }

    /// Hands pending events and transcript to the writer without waiting; keeps them in the
    /// journal if it is backed up (they are never dropped).
    pub(crate) fn offer(&mut self, journal: &mut Journal) {
        if !journal.events.is_empty() {
            let events = std::mem::take(&mut journal.events);
            if let Err(events) = self.store.try_append_events(self.id.clone(), events) {
                journal.events = events;
            }
        }
        if !journal.transcript.is_empty() {
            let entries = std::mem::take(&mut journal.transcript);
            if let Err(entries) = self.store.try_append_transcript(self.id.clone(), entries) {
                journal.transcript = entries;
            }
        }
    }

    /// The periodic write: counters to the store and the metrics.
    pub(crate) fn progress(&mut self, journal: &mut Journal) {
        self.report_metrics(journal.counters);
        self.offer(journal);
        self.remember(journal);
        self.store.update_progress(
            self.id.clone(),
            journal.counters,
            journal.dtmf.clone(),
            journal.usage_json(),
        );
    }

    /// Ends the record (once) with everything in the journal, and waits for the commit.
    pub(crate) async fn end(&mut self, at: Instant, reason: EndReason, journal: &mut Journal) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.report_metrics(journal.counters);
        self.metrics
            .calls_ended
            .get_or_create(&[
                ("protocol", self.protocol.as_str()),
                ("end_reason", reason.as_str()),
            ])
            .inc();
        self.metrics.call_duration.observe(
            at.saturating_duration_since(self.started)
                .max(Duration::ZERO)
                .as_secs_f64(),
        );
        self.metrics.calls_live.dec();
        self.remember(journal);
        self.flush(journal).await;
        let ended = self.ended_value(reason);
        if let Err(error) = self.store.end_call(self.id.clone(), ended).await {
            self.metrics.store_errors.inc();
            tracing::error!(%error, "Could not end the call record; it will be closed as interrupted at the next start.");
        }
    }

    /// Stores the CDR verbatim.
    pub(crate) async fn cdr(&mut self, raw: String) {
        if let Err(error) = self.store.set_cdr(self.id.clone(), raw).await {
            self.metrics.store_errors.inc();
            tracing::error!(%error, "Could not store the CDR.");
        }
    }

    /// Writes pending events and transcript and waits for the commit; once the record has
    /// ended, also the usage if the agent added to it since (an agent hears of the end after
    /// the record ends, so its last figures come later: they are not lost).
    pub(crate) async fn flush(&mut self, journal: &mut Journal) {
        if !journal.events.is_empty() {
            let events = std::mem::take(&mut journal.events);
            if let Err(error) = self.store.append_events(self.id.clone(), events).await {
                self.metrics.store_errors.inc();
                tracing::error!(%error, "Could not write call events.");
            }
        }
        if !journal.transcript.is_empty() {
            let entries = std::mem::take(&mut journal.transcript);
            if let Err(error) = self.store.append_transcript(self.id.clone(), entries).await {
                self.metrics.store_errors.inc();
                tracing::error!(%error, "Could not write the call's transcript.");
            }
        }
        if self.ended
            && let Some(usage) = journal.usage_json()
            && self.last.usage.as_ref() != Some(&usage)
        {
            if let Err(error) = self.store.set_usage(self.id.clone(), usage.clone()).await {
                self.metrics.store_errors.inc();
                tracing::error!(%error, "Could not write the call's final usage.");
            }
            self.last.usage = Some(usage);
        }
    }

    fn remember(&mut self, journal: &Journal) {
        self.last.counters = journal.counters;
        if self.last.dtmf != journal.dtmf {
            self.last.dtmf.clone_from(&journal.dtmf);
        }
        self.last.usage = journal.usage_json();
    }

    fn ended_value(&self, reason: EndReason) -> Ended {
        Ended {
            at: UnixMillis::now(),
            reason: reason.as_str().to_owned(),
            hangup_by: reason.hangup_by().as_str().to_owned(),
            counters: self.last.counters,
            dtmf: self.last.dtmf.clone(),
            usage: self.last.usage.clone(),
        }
    }

    fn report_metrics(&mut self, c: Counters) {
        let r = self.reported;
        let m = &self.metrics;
        m.audio_bytes
            .get_or_create(&[("direction", "in")])
            .inc_by(c.bytes_in - r.bytes_in);
        m.audio_bytes
            .get_or_create(&[("direction", "out")])
            .inc_by(c.bytes_out - r.bytes_out);
        m.audio_frames
            .get_or_create(&[("direction", "in")])
            .inc_by(c.frames_in - r.frames_in);
        m.audio_frames
            .get_or_create(&[("direction", "out")])
            .inc_by(c.frames_out - r.frames_out);
        self.reported = c;
    }
}

impl Drop for Record {
    /// The guard for paths that never reached [`Record::end`]: a panic in the call task, or
    /// the task being dropped at runtime shutdown. It cannot await, so it queues the end with
    /// the journal as last seen (the store never loses a queued end).
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let reason = if self.cancel.is_cancelled() {
            EndReason::ServerShutdown
        } else {
            EndReason::InternalError
        };
        self.metrics.calls_live.dec();
        self.store
            .end_now(self.id.clone(), self.ended_value(reason));
    }
}
