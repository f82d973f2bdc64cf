//! Counters the store keeps for the server's metrics: plain atomics, read on each scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the write-latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// What the store reports (`callgate_store_*` metrics).
#[derive(Debug)]
pub struct Stats {
    /// Batches in the local journal, waiting for the database (PostgreSQL store).
    pub backlog_batches: AtomicU64,
    /// Bytes in the local journal.
    pub backlog_bytes: AtomicU64,
    /// Batches written to the journal because the database could not take them.
    pub journaled_batches: AtomicU64,
    /// Batches that failed and were not kept (their awaited writes got an error).
    pub write_failures: AtomicU64,
    /// How long each batch took to commit (or to journal).
    pub write_latency: LatencyHistogram,
    /// The backlog in batches, for those who wait for it to change ([`Stats::backlog`]).
    backlog: tokio::sync::watch::Sender<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            backlog_batches: AtomicU64::new(0),
            backlog_bytes: AtomicU64::new(0),
            journaled_batches: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            write_latency: LatencyHistogram::default(),
            backlog: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Stats {
    /// Follows the journal's backlog (batches): e.g. to wait until the database has taken
    /// everything after an outage.
    pub fn backlog(&self) -> tokio::sync::watch::Receiver<u64> {
        self.backlog.subscribe()
    }

    /// Sets the backlog (the PostgreSQL store, after each batch and replay).
    pub(crate) fn set_backlog(&self, batches: u64, bytes: u64) {
        self.backlog_batches.store(batches, Ordering::Relaxed);
        self.backlog_bytes.store(bytes, Ordering::Relaxed);
        self.backlog
            .send_if_modified(|b| std::mem::replace(b, batches) != batches);
    }
}

/// A histogram of durations with fixed buckets ([`LATENCY_BUCKETS`]).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket, not cumulative; the last counts what exceeds every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The sum (seconds), the count, and the cumulative count at each bound (the last,
    /// `f64::MAX`, is +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (bound, n) in LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(&self.buckets)
        {
            total += n.load(Ordering::Relaxed);
            cumulative.push((bound, total));
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, total, cumulative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_buckets() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0305).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[4], (0.025, 1));
        assert_eq!(buckets[5], (0.05, 2));
        assert_eq!(buckets[11], (10.0, 2));
        assert_eq!(buckets[12], (f64::MAX, 3));
    }
}
