//! The `flow` agent's metrics: what `record` steps stored and refused. Shared by every flow
//! of the process and exposed on the server's `/metrics` through [`FlowCollector`] (register
//! it in the server's `Config::metrics`).

use std::sync::{Arc, OnceLock};

use callgate_kit::metrics::{Described, encode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Why a `record` step stored nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Refusal {
    /// `full` (`data_dir/messages` is at the flow's `max_total_bytes`) or `call_limit` (the
    /// call has used its `max_call_bytes`).
    pub reason: &'static str,
}

/// The metrics.
#[derive(Debug, Default)]
pub struct FlowMetrics {
    /// `record` steps that stored nothing, by reason.
    pub messages_refused: Family<Refusal, Counter>,
    /// Recordings written.
    pub messages_saved: Counter,
    /// Bytes of the recordings written.
    pub messages_saved_bytes: Counter,
    /// Bytes in `data_dir/messages` as callgate counts them (scanned at load and when full,
    /// plus what it wrote since).
    pub messages_stored_bytes: Gauge,
}

impl FlowMetrics {
    /// Fresh metrics, to share.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The process's metrics: what [`crate::register`] and [`crate::register_with`] count
    /// into (the binary exposes them).
    pub fn process() -> Arc<Self> {
        static METRICS: OnceLock<Arc<FlowMetrics>> = OnceLock::new();
        METRICS.get_or_init(Self::new).clone()
    }

    /// Counts a refused `record` step.
    pub fn refused(&self, reason: &'static str) {
        self.messages_refused
            .get_or_create(&Refusal { reason })
            .inc();
    }
}

/// Encodes the metrics on each scrape (names get the registry's `callgate_` prefix).
#[derive(Debug, Clone)]
pub struct FlowCollector(pub Arc<FlowMetrics>);

impl Collector for FlowCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        encode(
            encoder,
            &[
                Described {
                    name: "flow_messages_refused",
                    help: "Record steps that stored nothing, by reason (full, call_limit)",
                    metric: &m.messages_refused,
                },
                Described {
                    name: "flow_messages_saved",
                    help: "Recordings written by record steps",
                    metric: &m.messages_saved,
                },
                Described {
                    name: "flow_messages_saved_bytes",
                    help: "Bytes of the recordings written by record steps",
                    metric: &m.messages_saved_bytes,
                },
                Described {
                    name: "flow_messages_stored_bytes",
                    help: "Bytes in data_dir/messages as callgate counts them",
                    metric: &m.messages_stored_bytes,
                },
            ],
        )
    }
}
