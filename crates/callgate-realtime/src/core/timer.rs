//! The core's one timer table: each kind of deadline has one slot, and the next deadline the
//! driver waits for is the earliest set slot ([`Timers::next`]).
//!
//! Which slots may be set follows the states: [`Timer::Setup`] while a connection is being set
//! up, [`Timer::Retry`] while waiting to reconnect, [`Timer::Renew`] and
//! [`Timer::RenewalSetup`] while a session serves the call and it has not hung up,
//! [`Timer::MaxDuration`] until the call hangs up; none once it has ended. The code that
//! changes a state sets or stops its slot.

use std::time::Instant;

/// A kind of deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The connection being set up is given up (`connect_timeout`, no later than
    /// `reconnect_within` after the outage began).
    Setup,
    /// The next connection attempt (backoff after a failed one).
    Retry,
    /// The session is due for renewal (`session_max` after it began, or a retry).
    Renew,
    /// The renewal's new session is given up (`connect_timeout`).
    RenewalSetup,
    /// The call hangs up (`max_duration`).
    MaxDuration,
}

impl Timer {
    const COUNT: usize = 5;

    fn slot(self) -> usize {
        match self {
            Self::Setup => 0,
            Self::Retry => 1,
            Self::Renew => 2,
            Self::RenewalSetup => 3,
            Self::MaxDuration => 4,
        }
    }
}

/// One deadline per [`Timer`] kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Timers {
    at: [Option<Instant>; Timer::COUNT],
}

impl Timers {
    /// Sets `timer` to fire at `at` (replacing what it was set to).
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.at[timer.slot()] = Some(at);
    }

    /// Stops `timer`.
    pub(crate) fn stop(&mut self, timer: Timer) {
        self.at[timer.slot()] = None;
    }

    /// Stops every timer.
    pub(crate) fn stop_all(&mut self) {
        self.at = [None; Timer::COUNT];
    }

    /// Whether `timer` is set and due at `now`; a due timer is stopped (it fires once).
    pub(crate) fn fire(&mut self, timer: Timer, now: Instant) -> bool {
        match self.at[timer.slot()] {
            Some(at) if now >= at => {
                self.at[timer.slot()] = None;
                true
            }
            _ => false,
        }
    }

    /// The earliest deadline set.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_next_deadline_is_the_earliest_set_and_a_timer_fires_once() {
        let t0 = crate::core::tests::origin();
        let mut timers = Timers::default();
        assert_eq!(timers.next(), None);
        timers.set(Timer::MaxDuration, t0 + Duration::from_secs(60));
        timers.set(Timer::Retry, t0 + Duration::from_secs(2));
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(2)));
        assert!(!timers.fire(Timer::Retry, t0 + Duration::from_secs(1)));
        assert!(timers.fire(Timer::Retry, t0 + Duration::from_secs(2)));
        assert!(
            !timers.fire(Timer::Retry, t0 + Duration::from_secs(3)),
            "once"
        );
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(60)));
        timers.stop(Timer::MaxDuration);
        assert_eq!(timers.next(), None);
    }
}
