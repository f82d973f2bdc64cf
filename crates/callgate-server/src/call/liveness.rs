//! How far behind the phone reads: pings, and the verdict that a phone has stopped reading.
//! Sans-IO: the driver passes the time in and sends the pings.

use std::time::Duration;

use tokio::time::Instant;

/// Pings go out every `write_timeout / PINGS_PER_WRITE_TIMEOUT` (see [`Liveness`]).
const PINGS_PER_WRITE_TIMEOUT: u32 = 4;

/// Measures how far behind the phone reads, at any audio format and whatever the socket
/// buffers hold: a ping goes out every `write_timeout / 4`, and a phone answers it only once it
/// has read everything sent before it. A phone that has answered a ping before and leaves one
/// unanswered for `write_timeout` is that far behind: it has stopped reading, and the call
/// ends as `send_timeout` (at most 1.25 × `write_timeout` after it stopped). The first ping
/// goes out one interval into the call, after the answer. A phone that has
/// never answered a ping (a non-conforming one) is bounded by the send buffer and the write
/// timeout alone; its unanswered pings are given up, one every `write_timeout`.
#[derive(Debug)]
pub(super) struct Liveness {
    interval: Duration,
    pub(super) limit: Duration,
    next_ping: Instant,
    /// The ping not answered yet: its number and when it went out.
    outstanding: Option<(u64, Instant)>,
    sent: u64,
    /// Whether the phone has answered a ping.
    answers: bool,
}

/// What the liveness check asks of the I/O loop.
#[derive(Debug, PartialEq)]
pub(super) enum Check {
    Nothing,
    /// Send a ping with this payload.
    Ping([u8; 8]),
    /// The phone has stopped reading.
    Stalled,
}

impl Liveness {
    pub(super) fn new(now: Instant, write_timeout: Duration) -> Self {
        let interval = (write_timeout / PINGS_PER_WRITE_TIMEOUT).max(Duration::from_millis(50));
        Self {
            interval,
            limit: write_timeout,
            // Not at once: the answer goes first.
            next_ping: now + interval,
            outstanding: None,
            sent: 0,
            answers: false,
        }
    }

    /// When [`Liveness::check`] has something to do.
    pub(super) fn deadline(&self) -> Instant {
        self.outstanding
            .map_or(self.next_ping, |(_, sent)| sent + self.limit)
    }

    pub(super) fn check(&mut self, now: Instant) -> Check {
        if let Some((_, sent)) = self.outstanding {
            if now < sent + self.limit {
                return Check::Nothing;
            }
            if self.answers {
                return Check::Stalled;
            }
            self.outstanding = None;
        }
        if now < self.next_ping {
            return Check::Nothing;
        }
        self.sent += 1;
        self.outstanding = Some((self.sent, now));
        self.next_ping = now + self.interval;
        Check::Ping(self.sent.to_be_bytes())
    }

    /// A pong arrived (a phone may also send unsolicited ones: only an answer counts).
    pub(super) fn pong(&mut self, payload: &[u8]) {
        let Ok(n) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else {
            return;
        };
        if n == 0 || n > self.sent {
            return;
        }
        self.answers = true;
        if self.outstanding.is_some_and(|(m, _)| m == n) {
            self.outstanding = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_that_answers_pings_is_stalled_once_one_goes_unanswered_for_the_limit() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(2000));
        assert_eq!(l.deadline(), t0 + ms(500));
        assert_eq!(l.check(t0), Check::Nothing);
        assert_eq!(l.check(t0 + ms(500)), Check::Ping(1u64.to_be_bytes()));
        assert_eq!(l.deadline(), t0 + ms(2500));
        assert_eq!(l.check(t0 + ms(600)), Check::Nothing);
        l.pong(&1u64.to_be_bytes());
        assert_eq!(l.deadline(), t0 + ms(1000));
        assert_eq!(l.check(t0 + ms(1000)), Check::Ping(2u64.to_be_bytes()));
        // Unsolicited or foreign pongs do not count as an answer.
        l.pong(b"hello");
        l.pong(&7u64.to_be_bytes());
        assert_eq!(l.check(t0 + ms(2999)), Check::Nothing);
        assert_eq!(l.check(t0 + ms(3000)), Check::Stalled);
    }

    #[test]
    fn a_phone_that_never_answers_pings_is_not_judged_by_them() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(2000));
        assert_eq!(l.check(t0 + ms(500)), Check::Ping(1u64.to_be_bytes()));
        assert_eq!(l.check(t0 + ms(2500)), Check::Ping(2u64.to_be_bytes()));
        assert_eq!(l.check(t0 + ms(4500)), Check::Ping(3u64.to_be_bytes()));
        // A late answer to an old ping proves the phone answers: the current one now counts.
        l.pong(&2u64.to_be_bytes());
        assert_eq!(l.check(t0 + ms(6500)), Check::Stalled);
    }
}
