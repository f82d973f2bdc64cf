//! Prometheus metrics, in a registry passed around explicitly (tests read it directly).
//!
//! Names follow `callgate_<noun>_<unit>[_total]`; labels are bounded sets of static strings
//! (protocol, end reason, direction, error kind), never IDs or numbers. Audio counters are
//! added from each call's in-memory counters when it flushes, never per frame.

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Calls live now.
    pub calls_live: Gauge,
    /// Calls started, by protocol.
    pub calls_started: Family<Labels1, Counter>,
    /// Calls ended, by protocol and end reason.
    pub calls_ended: Family<Labels2, Counter>,
    /// Connections refused before a call started, by reason (`call_limit`,
    /// `websocket_handshake`, `tls_handshake`, `pending_limit`, `pending_per_ip`,
    /// `pending_evicted`, and the `[call_auth]` refusals).
    pub connections_refused: Family<Labels1, Counter>,
    /// Connections accepted that are not calls yet (upgrading, waiting for the first message,
    /// or being refused).
    pub connections_pending: Gauge,
    /// Calls dropped because the phone stopped reading, by how it was seen (`write`: one write
    /// took `write_timeout`; `ping`: a ping stayed unanswered for `write_timeout`).
    pub send_timeouts: Family<Labels1, Counter>,
    /// Protocol errors, by kind.
    pub protocol_errors: Family<Labels1, Counter>,
    /// Audio bytes, by direction (`in` from the phone, `out` to it).
    pub audio_bytes: Family<Labels1, Counter>,
    /// Audio messages, by direction.
    pub audio_frames: Family<Labels1, Counter>,
    /// Caller audio frames dropped because the agent fell behind.
    pub agent_audio_dropped: Counter,
    /// Call durations (start to end), in seconds.
    pub call_duration: Histogram,
    /// Store operations that failed or timed out.
    pub store_errors: Counter,
    /// Pacing jitter: how late each frame left relative to its playout deadline, seconds.
    /// Observed per call into a [`LocalHistogram`] and merged on the progress tick (no lock
    /// shared by all calls on the per-frame path).
    pub playout_jitter: MergedHistogram,
    /// Playout deadlines that found nothing queued.
    pub playout_underruns: Counter,
    /// Playout stalls: a call task woke more than 100 ms late (its late audio was dropped).
    pub playout_stalls: Counter,
    /// Audio dropped by playout stalls, seconds.
    pub playout_stall_dropped: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Audio queued for the caller, seconds, sampled per call every progress interval.
    pub playout_queue_depth: Histogram,
    /// Times the caller's speech cleared the agent's audio.
    pub barge_ins: Counter,
    /// DTMF keys received, by source (`protocol`, `inband`).
    pub dtmf: Family<Labels1, Counter>,
    /// Calls refused because no route matched them.
    pub calls_unrouted: Counter,
    /// Call records deleted because they were older than the retention.
    pub calls_expired: Counter,
    /// Admin requests refused, by reason (`unauthenticated`, `forbidden`).
    pub admin_refused: Family<Labels1, Counter>,
    /// Event-log entries and transcript turns not stored because their call reached its cap.
    pub record_entries_dropped: Counter,
    /// Recording audio batches dropped because the recording writer was behind (gaps of
    /// silence in recordings).
    pub recording_batches_dropped: Counter,
    /// Agent commands the call could not carry out, by command.
    pub agent_commands_refused: Family<Labels1, Counter>,
    /// Certificate reloads (SIGHUP or a change of the files), by port (`call`, `admin`) and
    /// result (`ok`; `error`: the certificate in force was kept).
    pub tls_reloads: Family<Labels2, Counter>,
    /// TLS handshakes that failed or did not finish in time, by port (`call`, `admin`).
    pub tls_handshakes_failed: Family<Labels1, Counter>,
    /// Events announced to the live stream and webhooks, by type (`call.started`...).
    pub events_published: Family<Labels1, Counter>,
    /// Clients reading `GET /api/stream` now.
    pub stream_clients: Gauge,
    /// Stream clients dropped because they fell too far behind.
    pub stream_dropped: Counter,
    /// Webhook delivery attempts, by result (`delivered`, `refused`: an answer other than
    /// 2xx, `timeout`, `unreachable`).
    pub webhook_attempts: Family<Labels1, Counter>,
    /// Webhook deliveries waiting in the outbox (pending or retrying), as last counted.
    pub webhook_pending: Gauge,
    /// Webhook deliveries given up after the retry period (kept as failed in the outbox).
    pub webhook_failed: Counter,
    /// Time from an event to its successful delivery, seconds.
    pub webhook_delay: Histogram,
    /// Operator requests for another node's call, by result (`relayed`: the owner answered,
    /// whatever its status; `unreachable`; `token_refused`; `no_secret`; `too_large`).
    pub admin_forwarded: Family<Labels1, Counter>,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        Self::with_collectors(&[])
    }

    /// A fresh registry with every metric registered, and `extra` collectors (an agent's own
    /// metrics) encoded on each scrape, under the same `callgate_` prefix.
    pub fn with_collectors(extra: &[Arc<dyn Collector>]) -> Self {
        let mut registry = Registry::with_prefix("callgate");
        for collector in extra {
            registry.register_collector(Box::new(SharedCollector(collector.clone())));
        }
        let m = Self {
            calls_live: Gauge::default(),
            calls_started: Family::default(),
            calls_ended: Family::default(),
            connections_refused: Family::default(),
            connections_pending: Gauge::default(),
            send_timeouts: Family::default(),
            protocol_errors: Family::default(),
            audio_bytes: Family::default(),
            audio_frames: Family::default(),
            agent_audio_dropped: Counter::default(),
            call_duration: Histogram::new([
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
            store_errors: Counter::default(),
            playout_jitter: MergedHistogram::default(),
            playout_underruns: Counter::default(),
            playout_stalls: Counter::default(),
            playout_stall_dropped: Counter::default(),
            playout_queue_depth: Histogram::new([0.02, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]),
            barge_ins: Counter::default(),
            dtmf: Family::default(),
            calls_unrouted: Counter::default(),
            admin_refused: Family::default(),
            calls_expired: Counter::default(),
            record_entries_dropped: Counter::default(),
            recording_batches_dropped: Counter::default(),
            agent_commands_refused: Family::default(),
            tls_reloads: Family::default(),
            tls_handshakes_failed: Family::default(),
            events_published: Family::default(),
            stream_clients: Gauge::default(),
            stream_dropped: Counter::default(),
            webhook_attempts: Family::default(),
            webhook_pending: Gauge::default(),
            webhook_failed: Counter::default(),
            webhook_delay: Histogram::new([0.05, 0.25, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0]),
            admin_forwarded: Family::default(),
            registry: Registry::default(),
        };
        registry.register("calls_live", "Calls live now", m.calls_live.clone());
        registry.register("calls_started", "Calls started", m.calls_started.clone());
        registry.register("calls_ended", "Calls ended", m.calls_ended.clone());
        registry.register(
            "connections_refused",
            "Connections refused before a call started",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_pending",
            "Connections accepted that are not calls yet",
            m.connections_pending.clone(),
        );
        registry.register(
            "send_timeouts",
            "Calls dropped because the phone stopped reading",
            m.send_timeouts.clone(),
        );
        registry.register(
            "protocol_errors",
            "Protocol errors by kind",
            m.protocol_errors.clone(),
        );
        registry.register("audio_bytes", "Audio bytes", m.audio_bytes.clone());
        registry.register("audio_frames", "Audio messages", m.audio_frames.clone());
        registry.register(
            "agent_audio_dropped_frames",
            "Caller audio frames dropped because the agent fell behind",
            m.agent_audio_dropped.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Call duration from start to end",
            m.call_duration.clone(),
        );
        registry.register(
            "store_errors",
            "Store operations that failed or timed out",
            m.store_errors.clone(),
        );
        registry.register(
            "playout_jitter_seconds",
            "How late each frame left relative to its playout deadline",
            m.playout_jitter.clone(),
        );
        registry.register(
            "playout_underruns",
            "Playout deadlines that found nothing queued",
            m.playout_underruns.clone(),
        );
        registry.register(
            "playout_stalls",
            "Times a call task woke more than 100 ms late and dropped its late audio",
            m.playout_stalls.clone(),
        );
        registry.register(
            "playout_stall_dropped_seconds",
            "Audio dropped by playout stalls",
            m.playout_stall_dropped.clone(),
        );
        registry.register(
            "playout_queue_depth_seconds",
            "Audio queued for the caller, sampled per call",
            m.playout_queue_depth.clone(),
        );
        registry.register(
            "barge_ins",
            "Times the caller's speech cleared the agent's audio",
            m.barge_ins.clone(),
        );
        registry.register("dtmf", "DTMF keys received", m.dtmf.clone());
        registry.register(
            "calls_unrouted",
            "Calls refused because no route matched them",
            m.calls_unrouted.clone(),
        );
        registry.register(
            "calls_expired",
            "Call records deleted because they were older than the retention",
            m.calls_expired.clone(),
        );
        registry.register(
            "admin_requests_refused",
            "Admin requests refused for a missing or insufficient token",
            m.admin_refused.clone(),
        );
        registry.register(
            "record_entries_dropped",
            "Event-log entries and transcript turns not stored because their call reached its cap",
            m.record_entries_dropped.clone(),
        );
        registry.register(
            "recording_batches_dropped",
            "Recording audio batches dropped because the recording writer was behind",
            m.recording_batches_dropped.clone(),
        );
        registry.register(
            "agent_commands_refused",
            "Agent commands the call could not carry out",
            m.agent_commands_refused.clone(),
        );
        registry.register(
            "tls_reloads",
            "TLS certificate reloads by port and result",
            m.tls_reloads.clone(),
        );
        registry.register(
            "tls_handshakes_failed",
            "TLS handshakes that failed or timed out, by port",
            m.tls_handshakes_failed.clone(),
        );
        registry.register(
            "events_published",
            "Events announced to the live stream and webhooks, by type",
            m.events_published.clone(),
        );
        registry.register(
            "event_stream_clients",
            "Clients reading the live event stream",
            m.stream_clients.clone(),
        );
        registry.register(
            "event_stream_dropped",
            "Live event stream clients dropped for falling too far behind",
            m.stream_dropped.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts, by result",
            m.webhook_attempts.clone(),
        );
        registry.register(
            "webhook_pending",
            "Webhook deliveries waiting in the outbox",
            m.webhook_pending.clone(),
        );
        registry.register(
            "webhook_failed",
            "Webhook deliveries given up after the retry period",
            m.webhook_failed.clone(),
        );
        registry.register(
            "webhook_delay_seconds",
            "Time from an event to its delivery",
            m.webhook_delay.clone(),
        );
        registry.register(
            "admin_forwarded",
            "Operator requests for another node's call, by result",
            m.admin_forwarded.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A collector shared with its owner (who keeps updating it).
#[derive(Debug)]
struct SharedCollector(Arc<dyn Collector>);

impl Collector for SharedCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// Upper bounds of the pacing-jitter buckets, seconds (a last, unbounded bucket follows).
pub const JITTER_BUCKETS: [f64; 8] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1];

/// A histogram one call fills without any lock, merged into [`MergedHistogram`] now and then.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalHistogram {
    counts: [u64; JITTER_BUCKETS.len() + 1],
    sum: f64,
}

impl LocalHistogram {
    /// Counts one observation.
    pub fn observe(&mut self, v: f64) {
        let i = JITTER_BUCKETS
            .iter()
            .position(|&upper| v <= upper)
            .unwrap_or(JITTER_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    /// Whether nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }
}

/// The server-wide histogram [`LocalHistogram`]s are merged into.
#[derive(Debug, Clone, Default)]
pub struct MergedHistogram {
    inner: Arc<Mutex<LocalHistogram>>,
}

impl MergedHistogram {
    fn lock(&self) -> MutexGuard<'_, LocalHistogram> {
        // Adding counts cannot leave the histogram invalid, even if a holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a call's observations and empties them.
    pub fn merge(&self, local: &mut LocalHistogram) {
        if local.is_empty() {
            return;
        }
        let mut all = self.lock();
        for (total, n) in all.counts.iter_mut().zip(local.counts) {
            *total += n;
        }
        all.sum += local.sum;
        *local = LocalHistogram::default();
    }

    /// Observations so far, sum and count.
    pub fn sum_count(&self) -> (f64, u64) {
        let all = self.lock();
        (all.sum, all.counts.iter().sum())
    }
}

impl TypedMetric for MergedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for MergedHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let all = self.lock().clone();
        let buckets: Vec<(f64, u64)> = JITTER_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(all.counts)
            .collect();
        let count = all.counts.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(all.sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The store's own counters (`callgate_store_*`), read on each scrape: the PostgreSQL store's
/// journal backlog, how long each batch took to commit or journal, and batches lost.
#[derive(Debug, Clone)]
pub struct StoreCollector(pub Arc<callgate_store::Stats>);

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let gauge = |encoder: &mut DescriptorEncoder<'_>, name, help, v: u64| {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)
        };
        let counter = |encoder: &mut DescriptorEncoder<'_>, name, help, v: u64| {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)
        };
        gauge(
            &mut encoder,
            "store_backlog",
            "Batches in the local store journal, waiting for PostgreSQL",
            s.backlog_batches.load(Relaxed),
        )?;
        gauge(
            &mut encoder,
            "store_backlog_bytes",
            "Bytes in the local store journal (bounded at 256 MiB)",
            s.backlog_bytes.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "store_journaled_batches",
            "Batches written to the local journal because PostgreSQL could not take them",
            s.journaled_batches.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "store_write_failures",
            "Store batches that failed and were not kept",
            s.write_failures.load(Relaxed),
        )?;
        let (sum, count, buckets) = s.write_latency.snapshot();
        encoder
            .encode_descriptor(
                "store_write_latency_seconds",
                "Time to commit (or journal) one batch of store writes",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}
