//! What an agent's metrics collector writes on each scrape: each metric's descriptor (name,
//! help, type) followed by its samples, in the order given.
//!
//! An agent crate keeps its counters in a struct of its own and exposes them through a
//! `prometheus_client` [`Collector`](prometheus_client::collector::Collector) whose `encode`
//! lists them for [`encode`]; the server registers the collector under its `callgate_`
//! prefix (`Config::metrics`).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};

/// One metric as a scrape shows it.
#[derive(Clone, Copy)]
pub struct Described<'a> {
    /// The name without the registry's `callgate_` prefix, nor `_total` (which
    /// `prometheus_client` adds to counters).
    pub name: &'a str,
    /// The `# HELP` text.
    pub help: &'a str,
    /// The metric.
    pub metric: &'a dyn EncodeMetric,
}

impl std::fmt::Debug for Described<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Described")
            .field("name", &self.name)
            .field("help", &self.help)
            .finish_non_exhaustive()
    }
}

/// Writes `metrics` to `encoder`, in order: the body of a collector's `encode`.
pub fn encode(
    mut encoder: DescriptorEncoder<'_>,
    metrics: &[Described<'_>],
) -> Result<(), std::fmt::Error> {
    for m in metrics {
        let e = encoder.encode_descriptor(m.name, m.help, None, m.metric.metric_type())?;
        m.metric.encode(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    use super::*;

    #[derive(Debug)]
    struct Two {
        calls: Counter,
        depth: Gauge,
    }

    impl Collector for Two {
        fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode(
                encoder,
                &[
                    Described {
                        name: "kit_calls",
                        help: "Calls",
                        metric: &self.calls,
                    },
                    Described {
                        name: "kit_depth",
                        help: "Depth",
                        metric: &self.depth,
                    },
                ],
            )
        }
    }

    #[test]
    fn every_metric_is_written_in_order_under_the_registry_prefix() {
        let two = Two {
            calls: Counter::default(),
            depth: Gauge::default(),
        };
        two.calls.inc_by(3);
        two.depth.set(7);
        let mut registry = Registry::with_prefix("callgate");
        registry.register_collector(Box::new(two));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert_eq!(
            text,
            "# HELP callgate_kit_calls Calls\n\
             # TYPE callgate_kit_calls counter\n\
             callgate_kit_calls_total 3\n\
             # HELP callgate_kit_depth Depth\n\
             # TYPE callgate_kit_depth gauge\n\
             callgate_kit_depth 7\n\
             # EOF\n"
        );
    }
}
