//! The `bridge` agent's metrics, shared by every call of every route and exposed on the
//! server's `/metrics` (the binary registers [`BridgeCollector`] over [`BridgeMetrics::process`]).
//!
//! Each call counts in its core ([`crate::core::Stats`]) and the driver merges what it counted
//! every second and at the end: nothing on the per-frame path touches these shared counters.
//! Every label comes from a fixed set of static strings.

use std::sync::{Arc, OnceLock};

use callgate_kit::metrics::{Described, encode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::core::Stats;

/// Upper bounds of the connect latency buckets, seconds (`connect_timeout` defaults to 3 s).
const LATENCY: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// A label set with one `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Reason {
    /// Why the bot could not be reached: `url`, `connect`, `tls`, `upgrade`, `timeout`,
    /// `closed`.
    pub reason: &'static str,
}

/// A label set with one `by` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct By {
    /// Who: `bot`, `bot_error`, `lost`, `callgate` (disconnects); `bot`, `callgate`,
    /// `operator` (clears).
    pub by: &'static str,
}

/// A label set with one `kind` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Kind {
    /// The invalid message's kind (`not_json`, `binary`, `unknown_event`, `bad_media`,
    /// `bad_mark`).
    pub kind: &'static str,
}

/// A label set with one `state` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct State {
    /// `played` or `cleared`.
    pub state: &'static str,
}

/// A label set with one `direction` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Direction {
    /// `to_bot` or `from_bot`.
    pub direction: &'static str,
}

/// The metrics.
#[derive(Debug)]
pub struct BridgeMetrics {
    /// From the call's start to the bot's socket open (TCP, TLS, upgrade), seconds.
    pub connect_latency: Histogram,
    /// Bot connections opened.
    pub connects: Counter,
    /// Bot connections that could not be opened, by reason.
    pub connect_failures: Family<Reason, Counter>,
    /// Bot connections that ended, by who ended them.
    pub disconnects: Family<By, Counter>,
    /// Calls that played the fallback (or hung up for want of one).
    pub fallbacks: Counter,
    /// Invalid messages from bots, by kind.
    pub invalid_messages: Family<Kind, Counter>,
    /// Bot marks echoed back, by state.
    pub marks: Family<State, Counter>,
    /// Clears of the bot's audio, by who asked.
    pub clears: Family<By, Counter>,
    /// WebSocket text bytes each way.
    pub bytes: Family<Direction, Counter>,
}

impl Default for BridgeMetrics {
    fn default() -> Self {
        Self {
            connect_latency: Histogram::new(LATENCY),
            connects: Counter::default(),
            connect_failures: Family::default(),
            disconnects: Family::default(),
            fallbacks: Counter::default(),
            invalid_messages: Family::default(),
            marks: Family::default(),
            clears: Family::default(),
            bytes: Family::default(),
        }
    }
}

impl BridgeMetrics {
    /// Fresh metrics, to share (tests make their own).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The process's metrics: what [`crate::register`] counts into (the binary exposes them).
    pub fn process() -> Arc<Self> {
        static METRICS: OnceLock<Arc<BridgeMetrics>> = OnceLock::new();
        METRICS.get_or_init(Self::new).clone()
    }

    /// Adds what one call counted since its last merge.
    pub fn merge(&self, stats: &Stats) {
        if let Some(latency) = stats.connected {
            self.connects.inc();
            self.connect_latency.observe(latency.as_secs_f64());
        }
        if let Some(reason) = stats.connect_failure {
            self.connect_failures
                .get_or_create(&Reason { reason })
                .inc();
        }
        if let Some(by) = stats.disconnect {
            self.disconnects.get_or_create(&By { by }).inc();
        }
        if stats.fallback {
            self.fallbacks.inc();
        }
        for &(kind, n) in &stats.invalid {
            self.invalid_messages
                .get_or_create(&Kind { kind })
                .inc_by(n);
        }
        for (state, n) in [
            ("played", stats.marks_played),
            ("cleared", stats.marks_cleared),
        ] {
            if n > 0 {
                self.marks.get_or_create(&State { state }).inc_by(n);
            }
        }
        for &(by, n) in &stats.clears {
            self.clears.get_or_create(&By { by }).inc_by(n);
        }
        for (direction, n) in [
            ("to_bot", stats.bytes_to_bot),
            ("from_bot", stats.bytes_from_bot),
        ] {
            if n > 0 {
                self.bytes.get_or_create(&Direction { direction }).inc_by(n);
            }
        }
    }
}

/// Encodes the metrics on each scrape (names get the registry's `callgate_` prefix).
#[derive(Debug, Clone)]
pub struct BridgeCollector(pub Arc<BridgeMetrics>);

impl Collector for BridgeCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        encode(
            encoder,
            &[
                Described {
                    name: "bridge_connect_latency_seconds",
                    help: "From the call's start to the bot's WebSocket open",
                    metric: &m.connect_latency,
                },
                Described {
                    name: "bridge_connects",
                    help: "Bot connections opened",
                    metric: &m.connects,
                },
                Described {
                    name: "bridge_connect_failures",
                    help: "Bot connections that could not be opened, by reason",
                    metric: &m.connect_failures,
                },
                Described {
                    name: "bridge_disconnects",
                    help: "Bot connections ended, by who ended them",
                    metric: &m.disconnects,
                },
                Described {
                    name: "bridge_fallbacks",
                    help: "Bridged calls that played the fallback because the bot was unreachable or dropped",
                    metric: &m.fallbacks,
                },
                Described {
                    name: "bridge_invalid_messages",
                    help: "Invalid messages from bots, by kind",
                    metric: &m.invalid_messages,
                },
                Described {
                    name: "bridge_marks",
                    help: "Bot marks echoed back, by state",
                    metric: &m.marks,
                },
                Described {
                    name: "bridge_clears",
                    help: "Clears of the bot's audio, by who asked",
                    metric: &m.clears,
                },
                Described {
                    name: "bridge_bytes",
                    help: "WebSocket text bytes between callgate and bots, by direction",
                    metric: &m.bytes,
                },
            ],
        )
    }
}
