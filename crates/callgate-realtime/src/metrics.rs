//! The `realtime` agent's metrics, shared by every call of every route and exposed on the
//! server's `/metrics` (register [`RealtimeMetrics`] with the server as a collector).

use std::sync::Arc;

use callgate_kit::metrics::{Described, encode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::core::Counted;

/// Upper bounds of the latency buckets, seconds.
const LATENCY: [f64; 18] = [
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0,
];

/// A label set with one `result` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, `failed`...
    pub result: &'static str,
}

/// The metrics.
#[derive(Debug)]
pub struct RealtimeMetrics {
    /// End of the caller's speech (the service's `speech_stopped`) to the first audio of the
    /// answer arriving.
    pub backend_latency: Histogram,
    /// That audio arriving to its first frame leaving for the phone.
    pub callgate_latency: Histogram,
    /// Sessions set up, by result (`ok`, `failed`).
    pub connects: Family<Outcome, Counter>,
    /// Connections lost mid-call.
    pub outages: Counter,
    /// Calls that played the fallback message.
    pub fallbacks: Counter,
    /// Tool calls, by result.
    pub tool_calls: Family<Outcome, Counter>,
    /// Barge-ins that cut the AI's audio.
    pub barge_ins: Counter,
}

impl Default for RealtimeMetrics {
    fn default() -> Self {
        Self {
            backend_latency: Histogram::new(LATENCY),
            callgate_latency: Histogram::new(LATENCY),
            connects: Family::default(),
            outages: Counter::default(),
            fallbacks: Counter::default(),
            tool_calls: Family::default(),
            barge_ins: Counter::default(),
        }
    }
}

impl RealtimeMetrics {
    /// Fresh metrics, to share.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts what a call's core reported.
    pub fn count(&self, counted: Counted) {
        let outcome = |ok: bool| Outcome {
            result: if ok { "ok" } else { "failed" },
        };
        match counted {
            Counted::Connected => {
                self.connects.get_or_create(&outcome(true)).inc();
            }
            Counted::Outage => {
                self.outages.inc();
            }
            Counted::Fallback => {
                self.fallbacks.inc();
                self.connects.get_or_create(&outcome(false)).inc();
            }
            Counted::BargeIn => {
                self.barge_ins.inc();
            }
            Counted::Tool { ok } => {
                self.tool_calls.get_or_create(&outcome(ok)).inc();
            }
        }
    }
}

/// Encodes the metrics on each scrape (names get the registry's `callgate_` prefix).
#[derive(Debug, Clone)]
pub struct RealtimeCollector(pub Arc<RealtimeMetrics>);

impl Collector for RealtimeCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        encode(
            encoder,
            &[
                Described {
                    name: "realtime_backend_latency_seconds",
                    help: "End of the caller's speech to the AI's first audio arriving",
                    metric: &m.backend_latency,
                },
                Described {
                    name: "realtime_callgate_latency_seconds",
                    help: "The AI's first audio arriving to its first frame leaving for the phone",
                    metric: &m.callgate_latency,
                },
                Described {
                    name: "realtime_connects",
                    help: "AI sessions set up, by result",
                    metric: &m.connects,
                },
                Described {
                    name: "realtime_outages",
                    help: "AI connections lost mid-call",
                    metric: &m.outages,
                },
                Described {
                    name: "realtime_fallbacks",
                    help: "Calls that played the fallback message because the AI was unreachable",
                    metric: &m.fallbacks,
                },
                Described {
                    name: "realtime_tool_calls",
                    help: "Tool calls by result",
                    metric: &m.tool_calls,
                },
                Described {
                    name: "realtime_barge_ins",
                    help: "Times the caller's speech cut the AI's audio",
                    metric: &m.barge_ins,
                },
            ],
        )
    }
}
