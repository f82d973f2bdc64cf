//! Failed authentications per client: a client that keeps presenting wrong credentials (admin
//! tokens, console sign-ins, cluster secrets) is refused for a while before any credential it
//! sends is even looked at.
//!
//! Policy: [`MAX_FAILURES`] answers of `401` to one client within [`WINDOW`] of its first
//! failure, and every request from it that needs a credential gets `429 too_many_failures`
//! (with `Retry-After`) until that window ends; then it starts afresh. A client is an IPv4
//! address, or an IPv6 /64 (one host's whole allocation). The table is bounded
//! ([`MAX_CLIENTS`]): when it is full, expired windows go first, then the one that began
//! earliest. Plain data with time passed in; the admin middleware holds it behind a mutex
//! taken only by requests that need a credential.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Failures a client may have within [`WINDOW`].
pub(crate) const MAX_FAILURES: u32 = 20;
/// How long a client's failures count, from its first one.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Clients tracked at most (about 40 bytes each).
pub(crate) const MAX_CLIENTS: usize = 4096;

/// The admin connection's peer address, for handlers (`ConnectInfo<Peer>`), on both the plain
/// and the TLS listener (`port::serve` adds it to each connection's requests).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) std::net::SocketAddr);

/// The key a peer address is counted under: IPv4 as is (an IPv4-mapped IPv6 address too), an
/// IPv6 address by its /64.
pub(crate) fn client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Failures by client.
#[derive(Debug, Default)]
pub(crate) struct AuthFailures {
    clients: HashMap<IpAddr, Window>,
}

impl AuthFailures {
    /// `Err(retry_after)` while `client` has used up its failures.
    pub(crate) fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.clients.get(&client) {
            Some(w) if w.failures >= MAX_FAILURES => {
                let ends = w.started + WINDOW;
                if now < ends { Err(ends - now) } else { Ok(()) }
            }
            _ => Ok(()),
        }
    }

    /// `client` failed to authenticate at `now`.
    pub(crate) fn failed(&mut self, client: IpAddr, now: Instant) {
        if let Some(w) = self.clients.get_mut(&client) {
            if now.duration_since(w.started) < WINDOW {
                w.failures = w.failures.saturating_add(1);
            } else {
                *w = Window {
                    started: now,
                    failures: 1,
                };
            }
            return;
        }
        if self.clients.len() >= MAX_CLIENTS {
            self.clients
                .retain(|_, w| now.duration_since(w.started) < WINDOW);
        }
        if self.clients.len() >= MAX_CLIENTS {
            let earliest = self
                .clients
                .iter()
                .min_by_key(|(_, w)| w.started)
                .map(|(ip, _)| *ip);
            if let Some(ip) = earliest {
                self.clients.remove(&ip);
            }
        }
        self.clients.insert(
            client,
            Window {
                started: now,
                failures: 1,
            },
        );
    }

    /// Clients tracked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn a_client_is_refused_after_its_failures_until_the_window_ends() {
        let t0 = Instant::now();
        let mut f = AuthFailures::default();
        for i in 0..MAX_FAILURES {
            assert_eq!(f.check(v4(1), t0), Ok(()), "failure {i} is still allowed");
            f.failed(v4(1), t0 + Duration::from_secs(u64::from(i)));
        }
        let later = t0 + Duration::from_secs(30);
        assert_eq!(f.check(v4(1), later), Err(Duration::from_secs(30)));
        assert_eq!(
            f.check(v4(2), later),
            Ok(()),
            "other clients are not touched"
        );
        assert_eq!(f.check(v4(1), t0 + WINDOW), Ok(()), "the window ended");
        // A failure after the window starts a new one.
        f.failed(v4(1), t0 + WINDOW);
        assert_eq!(f.check(v4(1), t0 + WINDOW), Ok(()));
    }

    #[test]
    fn failures_spread_over_more_than_the_window_never_lock_out() {
        let t0 = Instant::now();
        let mut f = AuthFailures::default();
        for i in 0..(MAX_FAILURES * 3) {
            let at = t0 + Duration::from_secs(u64::from(i) * 4);
            f.failed(v4(1), at);
            assert_eq!(f.check(v4(1), at), Ok(()), "failure {i}");
        }
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client(IpAddr::V6(a)), client(IpAddr::V6(b)));
        assert_ne!(client(IpAddr::V6(a)), client(IpAddr::V6(other)));
        let mapped: Ipv6Addr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client(IpAddr::V6(mapped)), v4(7));
    }

    #[test]
    fn the_table_is_bounded_and_keeps_the_newest_windows() {
        let t0 = Instant::now();
        let mut f = AuthFailures::default();
        let ip = |i: usize| IpAddr::V6(Ipv6Addr::from((i as u128) << 64));
        for i in 0..MAX_CLIENTS {
            f.failed(ip(i), t0 + Duration::from_millis(i as u64));
        }
        // The locked-out client is the newest: it survives a flood of new addresses.
        let newest = ip(MAX_CLIENTS - 1);
        let at = t0 + Duration::from_secs(10);
        for _ in 1..MAX_FAILURES {
            f.failed(newest, at);
        }
        for i in 0..100 {
            f.failed(ip(MAX_CLIENTS + i), at);
        }
        assert_eq!(f.len(), MAX_CLIENTS);
        assert!(f.check(newest, at).is_err(), "still refused");
        assert_eq!(f.check(ip(0), at), Ok(()), "the earliest were let go");
    }
}
