//! Which connections the server takes, and which of them may become calls.
//!
//! A connection is *pending* from TCP accept until its first message makes it a call (or it
//! is refused). Pending connections have their own, cheaper budget: `max_pending` in all and
//! `max_pending_per_ip` per source (an IPv4 address, or an IPv6 /64, which one host usually
//! has to itself). They never hold a call's slot: the slot (`max_calls`) is taken only once the
//! first message has been parsed, so idle, half-open or slow sockets cannot lock callers out,
//! and a caller gets a slot whenever fewer than `max_calls` calls are live.
//!
//! A connection over its source's budget is turned away at accept ([`turn_away`]): no task, no
//! buffer, no WebSocket. When the whole budget is full, the oldest pending connection is
//! evicted (dropped) to make room: a flood from many sources then has to open connections
//! faster than `max_pending` per handshake round trip of a real caller to keep one out, and
//! the newest connection is the likeliest to be a caller about to finish its handshake. An
//! evicted connection counts until its task has let it go, so the budget can run over by the
//! evictions in flight, never beyond twice `max_pending` (then new connections are turned
//! away).
//!
//! While the node drains, a new connection still takes a place in the pending budget, but only
//! to be answered `HTTP/1.1 503` with `Retry-After` (and the JSON body of the call port's
//! refusals, code `draining`) to its upgrade request ([`refuse_draining`]): a load balancer
//! can then retry the call on another node, and no WebSocket ever exists.
//!
//! The budget's state sits behind a lock taken twice per connection (at accept and when it
//! stops being pending), never on a call's per-frame path.

use std::collections::{HashMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::handshake::server::{Request as Upgrade, Response};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::debug;

use super::{CallContext, refusal};
use crate::Metrics;
use crate::config::Config;

/// The server's budgets: call slots and pending connections.
#[derive(Debug)]
pub(crate) struct Budgets {
    calls: Arc<Semaphore>,
    pending: Mutex<PendingState>,
    max_pending: usize,
    max_per_source: usize,
    metrics: Arc<Metrics>,
}

/// The pending budget's state.
#[derive(Debug, Default)]
struct PendingState {
    /// Pending connections per source (evicted ones until they have gone).
    per_source: HashMap<Source, usize>,
    /// Pending connections in all (evicted ones until they have gone).
    total: usize,
    /// Each pending connection's eviction token, oldest first. A token is cancelled when its
    /// connection is evicted or stops being pending; such entries are skipped, and swept out
    /// when they pile up.
    queue: VecDeque<CancellationToken>,
}

/// Why a connection was turned away at accept (a `callgate_connections_refused_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Twice `max_pending` connections are pending (evicted ones included) already.
    PendingLimit,
    /// `max_pending_per_ip` connections from this source are pending already.
    PendingPerIp,
}

impl Refusal {
    /// The metric label, and the code of the refusal's JSON body.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PendingLimit => "pending_limit",
            Self::PendingPerIp => "pending_per_ip",
        }
    }

    /// What the refusal's JSON body says.
    fn message(self) -> &'static str {
        match self {
            Self::PendingLimit => "too many connections are waiting to become calls; try again",
            Self::PendingPerIp => {
                "too many connections from this address are waiting to become calls; try again"
            }
        }
    }

    /// The whole answer (head and JSON body) of a connection turned away: 503 with
    /// `Retry-After`. Built once per reason, so a flood of them costs no allocation.
    fn answer(self) -> &'static [u8] {
        static PENDING_LIMIT: LazyLock<Vec<u8>> =
            LazyLock::new(|| Refusal::PendingLimit.answer_bytes());
        static PENDING_PER_IP: LazyLock<Vec<u8>> =
            LazyLock::new(|| Refusal::PendingPerIp.answer_bytes());
        match self {
            Self::PendingLimit => PENDING_LIMIT.as_slice(),
            Self::PendingPerIp => PENDING_PER_IP.as_slice(),
        }
    }

    fn answer_bytes(self) -> Vec<u8> {
        refusal::service_unavailable(self.as_str(), self.message())
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
    budgets: Arc<Budgets>,
    source: Source,
    /// When the connection was accepted: the handshake deadline counts from here.
    pub(crate) accepted: Instant,
    evicted: CancellationToken,
}

impl Pending {
    /// Resolves when the connection is evicted to make room for a newer one: its task must
    /// then drop it.
    pub(crate) fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Marks its queue entry as gone.
        self.evicted.cancel();
        let mut state = self.budgets.lock();
        state.total -= 1;
        if let Some(n) = state.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                state.per_source.remove(&self.source);
            }
        }
        drop(state);
        self.budgets.metrics.connections_pending.dec();
    }
}

impl Budgets {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            calls: Arc::new(Semaphore::new(config.max_calls)),
            pending: Mutex::new(PendingState::default()),
            max_pending: config.max_pending,
            max_per_source: config.max_pending_per_ip,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        // The state stays consistent even if a holder panicked: nothing in it can panic.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place in the pending budget for a connection just accepted from `ip`,
    /// evicting the oldest pending connection if the budget is full.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, Refusal> {
        let accepted = Instant::now();
        let source = Source::of(ip);
        let mut state = self.lock();
        let n = state.per_source.get(&source).copied().unwrap_or(0);
        if n >= self.max_per_source {
            return Err(Refusal::PendingPerIp);
        }
        if state.total >= self.max_pending.saturating_mul(2) {
            return Err(Refusal::PendingLimit);
        }
        let mut evicted = false;
        if state.total >= self.max_pending {
            while let Some(oldest) = state.queue.pop_front() {
                if !oldest.is_cancelled() {
                    oldest.cancel();
                    evicted = true;
                    break;
                }
            }
            if !evicted {
                return Err(Refusal::PendingLimit);
            }
        }
        if state.queue.len() > self.max_pending.saturating_mul(2) {
            state.queue.retain(|t| !t.is_cancelled());
        }
        let token = CancellationToken::new();
        state.queue.push_back(token.clone());
        state.total += 1;
        state.per_source.insert(source, n + 1);
        drop(state);
        self.metrics.connections_pending.inc();
        if evicted {
            self.metrics
                .connections_refused
                .get_or_create(&[("reason", "pending_evicted")])
                .inc();
        }
        Ok(Pending {
            budgets: self.clone(),
            source,
            accepted,
            evicted: token,
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
/// closing sends a FIN rather than a reset), `HTTP/1.1 503` with `Retry-After: 1` and the
/// refusal's JSON body is written if the socket takes it at once and `answer` (not on a TLS
/// port: the client could not read it), and the socket is closed. A client whose upgrade
/// request arrives after that sees the connection closed, or reset.
pub(crate) fn turn_away(stream: TcpStream, why: Refusal, answer: bool) {
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
    if answer {
        let _ = (&*socket).write(why.answer());
    }
}

/// A connection accepted while the node drains: its TLS handshake (on a TLS port) and its
/// upgrade request are read under the handshake deadline, and the request is answered
/// `HTTP/1.1 503 Service Unavailable` with `Retry-After` and `Connection: close`, before any
/// WebSocket exists. It holds its place in the pending budget meanwhile; at shutdown it is
/// dropped.
pub(crate) async fn refuse_draining(
    ctx: Arc<CallContext>,
    stream: TcpStream,
    peer: SocketAddr,
    pending: Pending,
) {
    let deadline = pending.accepted + ctx.settings.handshake_timeout;
    let refuse = async {
        let stream =
            crate::tls::call_handshake(ctx.tls.as_ref(), &ctx.metrics, stream, deadline).await?;
        #[allow(
            clippy::result_large_err,
            reason = "the callback's signature is tungstenite's"
        )]
        let callback = |_: &Upgrade, _: Response| Err(refusal::draining());
        let upgrade =
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ctx.ws_config));
        // The upgrade always fails: that is the refusal. Only how is worth a debug line.
        if let Ok(Err(error)) = timeout_at(deadline, upgrade).await {
            debug!(%peer, %error, "Refused an upgrade: draining.");
        }
        Some(())
    };
    tokio::select! {
        _ = ctx.cancel.cancelled() => {}
        _ = pending.evicted() => {}
        _ = refuse => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(max_pending: usize, per_ip: usize) -> Arc<Budgets> {
        let config = Config {
            max_calls: 1,
            max_pending,
            max_pending_per_ip: per_ip,
            ..Config::default()
        };
        Budgets::new(&config, Arc::new(Metrics::new()))
    }

    fn evicted(p: &Pending) -> bool {
        p.evicted.is_cancelled()
    }

    #[test]
    fn a_source_over_its_budget_is_turned_away() {
        let a = budgets(10, 2);
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let p1 = a.admit(one).unwrap();
        let _p2 = a.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(a.admit(one).unwrap_err(), Refusal::PendingPerIp);
        assert!(a.admit("10.0.0.2".parse().unwrap()).is_ok());
        drop(p1);
        assert!(a.admit(one).is_ok());
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_and_never_runs_over_twice() {
        let a = budgets(2, 10);
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let p1 = a.admit(ip(1)).unwrap();
        let p2 = a.admit(ip(2)).unwrap();
        let p3 = a.admit(ip(3)).unwrap();
        assert!(evicted(&p1) && !evicted(&p2) && !evicted(&p3));
        // p1 still counts until its task drops it.
        let p4 = a.admit(ip(4)).unwrap();
        assert!(evicted(&p2) && !evicted(&p3) && !evicted(&p4));
        assert_eq!(a.admit(ip(5)).unwrap_err(), Refusal::PendingLimit);
        drop((p1, p2));
        assert_eq!(a.metrics.connections_pending.get(), 2);
        // A connection that became a call frees its place without being evicted.
        drop(p3);
        let p5 = a.admit(ip(5)).unwrap();
        assert!(!evicted(&p4) && !evicted(&p5));
        let _p6 = a.admit(ip(6)).unwrap();
        assert!(evicted(&p4) && !evicted(&p5));
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let a = budgets(10, 1);
        let _p = a.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("2001:db8::ffff:2".parse().unwrap()).unwrap_err(),
            Refusal::PendingPerIp
        );
        assert!(a.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_connection_turned_away_reads_a_json_503_with_retry_after() {
        for why in [Refusal::PendingLimit, Refusal::PendingPerIp] {
            let answer = std::str::from_utf8(why.answer()).unwrap();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nRetry-After: 1\r\n"), "{head}");
            assert!(
                head.contains("\r\nContent-Type: application/json\r\n"),
                "{head}"
            );
            let length = format!("\r\nContent-Length: {}\r\n", body.len());
            assert!(head.contains(&length), "{head}");
            let body: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["code"], why.as_str());
            assert_eq!(body["error"], why.message());
            let listed = refusal::REFUSAL_CODES
                .iter()
                .find(|(c, ..)| *c == why.as_str());
            assert_eq!(listed.map(|(_, status, _)| *status), Some(503));
        }
    }

    #[test]
    fn pending_connections_hold_no_call_slot() {
        let a = budgets(10, 10);
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
