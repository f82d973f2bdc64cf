//! Which connections the server takes, and which of them may become calls.
//!
//! A connection is *pending* from TCP accept until its first message makes it a call (or it
//! is refused). Pending connections have their own, cheaper budget: `max_pending` in all and
//! `max_pending_per_ip` per source (an IPv4 address, or an IPv6 /64, which one host usually
//! has to itself). They never hold a call's slot: the slot (`max_calls`) is taken only once the
//! first message has been parsed, so idle, half-open or slow sockets cannot lock callers out,
//! and a caller gets a slot whenever fewer than `max_calls` calls are live.
//!
//! A connection over the pending budget is turned away at accept ([`turn_away`]): no task, no
//! buffer, no WebSocket.
//!
//! The per-source counts sit behind a lock taken twice per connection (at accept and when it
//! stops being pending), never on a call's per-frame path.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::Metrics;
use crate::config::Config;

/// What a connection over the pending budget is sent if its socket takes it at once.
const TURNED_AWAY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Length: 0\r\nConnection: close\r\n\r\n";

/// The server's budgets: call slots and pending connections.
#[derive(Debug)]
pub(crate) struct Admission {
    calls: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    per_source: Mutex<HashMap<Source, usize>>,
    max_per_source: usize,
    metrics: Arc<Metrics>,
}

/// Why a connection was turned away at accept (a `callgate_connections_refused_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_pending` connections are pending already.
    PendingLimit,
    /// `max_pending_per_ip` connections from this source are pending already.
    PendingPerIp,
}

impl Refusal {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PendingLimit => "pending_limit",
            Self::PendingPerIp => "pending_per_ip",
        }
    }
}

/// Where connections come from, for the per-source budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// A connection's place in the pending budget, from accept until it becomes a call or ends.
#[derive(Debug)]
pub(crate) struct Pending {
    admission: Arc<Admission>,
    source: Source,
    /// When the connection was accepted: the handshake deadline counts from here.
    pub(crate) accepted: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
        drop(counts);
        self.admission.metrics.connections_pending.dec();
    }
}

impl Admission {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            calls: Arc::new(Semaphore::new(config.max_calls)),
            pending: Arc::new(Semaphore::new(config.max_pending)),
            per_source: Mutex::new(HashMap::new()),
            max_per_source: config.max_pending_per_ip,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, usize>> {
        // Counts stay consistent even if a holder panicked: each update is one statement.
        self.per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place in the pending budget for a connection just accepted from `ip`.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, Refusal> {
        let accepted = Instant::now();
        let source = Source::of(ip);
        let mut counts = self.lock();
        let n = counts.get(&source).copied().unwrap_or(0);
        if n >= self.max_per_source {
            return Err(Refusal::PendingPerIp);
        }
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::PendingLimit)?;
        counts.insert(source, n + 1);
        drop(counts);
        self.metrics.connections_pending.inc();
        Ok(Pending {
            admission: self.clone(),
            source,
            accepted,
            _permit: permit,
        })
    }

    /// Whether every call slot is taken (a new connection is refused without waiting for its
    /// first message).
    pub(crate) fn calls_full(&self) -> bool {
        self.calls.available_permits() == 0
    }

    /// A call slot, if one is free; the call holds it until it ends.
    pub(crate) fn call_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.calls.clone().try_acquire_owned().ok()
    }
}

/// What a connection over the pending budget gets, at accept, without a task or a buffer of
/// its own: whatever it has already sent is read and discarded (a few KiB at most, so that
/// closing sends a FIN rather than a reset), `HTTP/1.1 503` with `Retry-After: 1` is written if
/// the socket takes it at once, and the socket is closed. A client whose upgrade request
/// arrives after that sees the connection closed, or reset.
pub(crate) fn turn_away(stream: TcpStream) {
    // Straight to the (non-blocking) socket: tokio's `try_read`/`try_write` answer WouldBlock
    // until the runtime has polled a new socket's readiness, which it has not yet here.
    let socket = socket2::SockRef::from(&stream);
    let mut scratch = [0u8; 2048];
    for _ in 0..4 {
        match (&*socket).read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = (&*socket).write(TURNED_AWAY);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_pending: usize, per_ip: usize) -> Arc<Admission> {
        let config = Config {
            max_calls: 1,
            max_pending,
            max_pending_per_ip: per_ip,
            ..Config::default()
        };
        Admission::new(&config, Arc::new(Metrics::new()))
    }

    #[test]
    fn pending_budgets_total_and_per_source() {
        let a = admission(3, 2);
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let p1 = a.admit(one).unwrap();
        let _p2 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).unwrap_err(), Refusal::PendingPerIp);
        let _p3 = a.admit(two).unwrap();
        assert_eq!(
            a.admit("10.0.0.3".parse().unwrap()).unwrap_err(),
            Refusal::PendingLimit
        );
        drop(p1);
        let _p4 = a.admit(one).unwrap();
        assert_eq!(a.metrics.connections_pending.get(), 3);
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let a = admission(10, 1);
        let _p = a.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("2001:db8::ffff:2".parse().unwrap()).unwrap_err(),
            Refusal::PendingPerIp
        );
        assert!(a.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn pending_connections_hold_no_call_slot() {
        let a = admission(10, 10);
        let _pending: Vec<_> = (0..5)
            .map(|_| a.admit("10.0.0.1".parse().unwrap()).unwrap())
            .collect();
        assert!(!a.calls_full());
        let slot = a.call_slot().unwrap();
        assert!(a.calls_full());
        assert!(a.call_slot().is_none());
        drop(slot);
        assert!(a.call_slot().is_some());
    }
}
