//! A live call's record: counters and events kept in memory, written at the end and
//! periodically, never per frame. A drop guard ends the record on every exit path.

use std::sync::Arc;
use std::time::Instant;

use callgate_proto::{EndReason, Protocol};
use callgate_store::{CallId, Counters, Ended, NewEvent, StoreHandle, UnixMillis};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The record accumulator of one call. Owned by the call task.
pub(crate) struct Record {
    id: CallId,
    protocol: Protocol,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    /// Tells the drop guard whether the server is shutting down.
    cancel: CancellationToken,
    started: Instant,
    counters: Counters,
    /// What the metrics have been told of `counters` so far.
    reported: Counters,
    dtmf: String,
    /// Events not yet handed to the store writer.
    events: Vec<NewEvent>,
    ended: bool,
}

impl Record {
    pub(crate) fn new(
        id: CallId,
        protocol: Protocol,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
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
            started: Instant::now(),
            counters: Counters::default(),
            reported: Counters::default(),
            dtmf: String::new(),
            events: Vec::new(),
            ended: false,
        }
    }

    pub(crate) fn audio_in(&mut self, bytes: usize) {
        self.counters.bytes_in += bytes as u64;
        self.counters.frames_in += 1;
    }

    pub(crate) fn audio_out(&mut self, bytes: usize) {
        self.counters.bytes_out += bytes as u64;
        self.counters.frames_out += 1;
    }

    pub(crate) fn dtmf(&mut self, digit: char) {
        self.dtmf.push(digit);
    }

    pub(crate) fn answered(&self) {
        self.store.mark_answered(self.id.clone(), UnixMillis::now());
    }

    /// Adds an entry to the event log.
    pub(crate) fn event(&mut self, kind: &str, detail: serde_json::Value) {
        self.events.push(NewEvent {
            at: UnixMillis::now(),
            kind: kind.to_owned(),
            detail: detail.to_string(),
        });
    }

    /// Hands pending events to the writer without waiting; keeps them if it is backed up.
    pub(crate) fn offer_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.events);
        if let Err(events) = self.store.try_append_events(self.id.clone(), events) {
            self.events = events;
        }
    }

    /// The periodic write: counters to the store and the metrics.
    pub(crate) fn progress(&mut self) {
        self.report_metrics();
        self.offer_events();
        self.store
            .update_progress(self.id.clone(), self.counters, self.dtmf.clone());
    }

    /// Ends the record (once) and waits for the commit.
    pub(crate) async fn end(&mut self, reason: EndReason) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.report_metrics();
        self.metrics
            .calls_ended
            .get_or_create(&[
                ("protocol", self.protocol.as_str()),
                ("end_reason", reason.as_str()),
            ])
            .inc();
        self.metrics
            .call_duration
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics.calls_live.dec();
        self.event("ended", serde_json::json!({ "reason": reason.as_str() }));
        self.flush_events().await;
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

    /// Writes pending events and waits for the commit.
    pub(crate) async fn flush_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.events);
        if let Err(error) = self.store.append_events(self.id.clone(), events).await {
            self.metrics.store_errors.inc();
            tracing::error!(%error, "Could not write call events.");
        }
    }

    fn ended_value(&self, reason: EndReason) -> Ended {
        Ended {
            at: UnixMillis::now(),
            reason: reason.as_str().to_owned(),
            hangup_by: reason.hangup_by().as_str().to_owned(),
            counters: self.counters,
            dtmf: self.dtmf.clone(),
        }
    }

    fn report_metrics(&mut self) {
        let (c, r) = (self.counters, self.reported);
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
    /// the task being dropped at runtime shutdown. It cannot await, so it queues the end
    /// without waiting; if even that fails, the next start closes the record as `interrupted`.
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
        let events = std::mem::take(&mut self.events);
        if !events.is_empty() {
            let _ = self.store.try_append_events(self.id.clone(), events);
        }
        if !self
            .store
            .end_now(self.id.clone(), self.ended_value(reason))
        {
            tracing::error!("Could not queue the end of the call record.");
        }
    }
}
