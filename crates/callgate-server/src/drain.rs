//! Drain: a node stops taking calls and lets the live ones end by themselves.
//!
//! [`Drain`] is the sans-IO state machine: it is told about signals, operator requests, the
//! number of connections the server still serves and the time, and it says what to do: stop
//! the server (and why), or report how many calls are left. The accept loop in `lib.rs` is its
//! driver: it moves signals, counts and time in, and carries out the outputs.
//!
//! # Phases
//! ```text
//!            drain (operator)                terminate (SIGTERM)
//! Serving ───────────────────► Draining ───────────────────────► Draining, exiting
//!    ▲        undrain             │  ▲                              │ no connection left:      Drained
//!    └────────────────────────────┘  │                              │ drain_timeout ran out:   DrainTimeout
//!    └─ terminate ───────────────────┼──────────────────────────────┘ terminate / interrupt:   Interrupted
//!                                    │                                 ▼
//! interrupt (SIGINT), from any phase ──────────────────────────────► Stopping
//! ```
//! - An operator's drain (`POST /api/admin/drain`) keeps the process up: the node takes no new
//!   calls until `undrain`; nothing ends the live calls.
//! - A terminate (SIGTERM) drains and exits: once no connection is left, or at `drain_timeout`
//!   after the terminate, whichever comes first. A second terminate, or an interrupt, stops
//!   now. Undrain is refused once the process is exiting: it was asked to go.
//! - Connections count from accept: a connection that was accepted before the drain and is
//!   still upgrading becomes a call, and the node waits for it too.
//! - While draining, how many calls are left is reported every [`REPORT_EVERY`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How often a draining node reports how many calls are left.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Where the node is, as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking calls.
    Serving,
    /// Taking no new calls; live calls go on. `exiting`: the process ends when they have
    /// (a terminate); otherwise it stays up until undrained (an operator's drain).
    Draining {
        /// Whether the process ends once the live calls have.
        exiting: bool,
    },
    /// Ending the remaining calls and stopping.
    Stopping,
}

impl Phase {
    /// The name the admin API shows: `serving`, `draining` or `stopping`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining { .. } => "draining",
            Self::Stopping => "stopping",
        }
    }

    /// Whether new calls are taken.
    pub fn takes_calls(self) -> bool {
        self == Self::Serving
    }
}

/// Why the server stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Drained after a terminate: no call was left.
    Drained,
    /// `drain_timeout` ran out with calls still live: they end as `server_shutdown`.
    DrainTimeout,
    /// A second terminate, an interrupt, or the embedder's shutdown future: the remaining
    /// calls end now, as `server_shutdown`.
    Interrupted,
}

impl StopReason {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::DrainTimeout => "drain_timeout",
            Self::Interrupted => "interrupted",
        }
    }
}

/// Why an undrain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UndrainRefused {
    /// The process was told to exit (SIGTERM): it finishes its calls and goes.
    #[error("the node is exiting (it received SIGTERM): it finishes its calls and stops")]
    Exiting,
    /// The server is stopping already.
    #[error("the node is stopping")]
    Stopping,
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Stop the server: end whatever calls are left (as `server_shutdown`) and exit.
    Stop(StopReason),
    /// Report progress: `connections` still served after `draining_for`; `deadline_in` until
    /// `drain_timeout` ends them (`None`: an operator's drain, no deadline).
    Left {
        connections: usize,
        draining_for: Duration,
        deadline_in: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    Draining {
        since: Instant,
        /// When the remaining calls are ended (a terminate); `None`: an operator's drain.
        deadline: Option<Instant>,
        next_report: Instant,
    },
    Stopping,
}

/// The drain state machine (sans-IO: time passed in).
#[derive(Debug)]
pub(crate) struct Drain {
    state: State,
    drain_timeout: Duration,
    /// Connections the server still serves (pending upgrades and calls).
    connections: usize,
    output: VecDeque<Output>,
}

impl Drain {
    pub(crate) fn new(drain_timeout: Duration) -> Self {
        Self {
            state: State::Serving,
            drain_timeout,
            connections: 0,
            output: VecDeque::new(),
        }
    }

    /// Where the node is.
    pub(crate) fn phase(&self) -> Phase {
        match self.state {
            State::Serving => Phase::Serving,
            State::Draining { deadline, .. } => Phase::Draining {
                exiting: deadline.is_some(),
            },
            State::Stopping => Phase::Stopping,
        }
    }

    /// The connections the server serves now.
    pub(crate) fn handle_connections(&mut self, now: Instant, connections: usize) {
        self.connections = connections;
        self.check_drained(now);
    }

    /// An operator asks the node to take no new calls (and to stay up).
    pub(crate) fn handle_drain(&mut self, now: Instant) {
        if self.state == State::Serving {
            self.state = State::Draining {
                since: now,
                deadline: None,
                next_report: now + REPORT_EVERY,
            };
        }
    }

    /// An operator returns the node to service.
    pub(crate) fn handle_undrain(&mut self, _now: Instant) -> Result<(), UndrainRefused> {
        match self.state {
            State::Serving => Ok(()),
            State::Draining { deadline: None, .. } => {
                self.state = State::Serving;
                Ok(())
            }
            State::Draining { .. } => Err(UndrainRefused::Exiting),
            State::Stopping => Err(UndrainRefused::Stopping),
        }
    }

    /// SIGTERM: drain, then exit; the second one stops now.
    pub(crate) fn handle_terminate(&mut self, now: Instant) {
        match self.state {
            State::Serving => {
                self.state = State::Draining {
                    since: now,
                    deadline: Some(now + self.drain_timeout),
                    next_report: now + REPORT_EVERY,
                };
            }
            State::Draining {
                since,
                deadline: None,
                next_report,
            } => {
                self.state = State::Draining {
                    since,
                    deadline: Some(now + self.drain_timeout),
                    next_report,
                };
            }
            State::Draining { .. } => self.stop(StopReason::Interrupted),
            State::Stopping => {}
        }
        self.check_drained(now);
        // A zero drain_timeout: stop at once, as before drains existed.
        self.handle_timeout(now);
    }

    /// SIGINT, or the embedder's shutdown: stop now.
    pub(crate) fn handle_interrupt(&mut self, _now: Instant) {
        self.stop(StopReason::Interrupted);
    }

    /// Time passed: report, or end the drain at its deadline.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let State::Draining {
            since,
            deadline,
            next_report,
        } = self.state
        else {
            return;
        };
        if deadline.is_some_and(|d| now >= d) {
            self.stop(StopReason::DrainTimeout);
            return;
        }
        if now >= next_report {
            self.output.push_back(Output::Left {
                connections: self.connections,
                draining_for: now - since,
                deadline_in: deadline.map(|d| d - now),
            });
            // The next report is on the grid from the start, however late this one was.
            let mut next = next_report;
            while next <= now {
                next += REPORT_EVERY;
            }
            self.state = State::Draining {
                since,
                deadline,
                next_report: next,
            };
        }
    }

    /// The next moment [`Drain::handle_timeout`] has something to do.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Draining {
                deadline,
                next_report,
                ..
            } => Some(deadline.map_or(next_report, |d| d.min(next_report))),
            _ => None,
        }
    }

    /// The next thing to do.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.output.pop_front()
    }

    fn check_drained(&mut self, _now: Instant) {
        if let State::Draining {
            deadline: Some(_), ..
        } = self.state
            && self.connections == 0
        {
            self.stop(StopReason::Drained);
        }
    }

    fn stop(&mut self, reason: StopReason) {
        if self.state != State::Stopping {
            self.state = State::Stopping;
            self.output.push_back(Output::Stop(reason));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn outputs(d: &mut Drain) -> Vec<Output> {
        std::iter::from_fn(|| d.poll_output()).collect()
    }

    #[test]
    fn terminate_drains_until_the_last_connection_then_stops_as_drained() {
        let t0 = Instant::now();
        let mut d = Drain::new(HOUR);
        d.handle_connections(t0, 2);
        d.handle_terminate(t0);
        assert_eq!(d.phase(), Phase::Draining { exiting: true });
        assert!(!d.phase().takes_calls());
        assert_eq!(outputs(&mut d), []);
        d.handle_connections(t0 + Duration::from_secs(1), 1);
        assert_eq!(outputs(&mut d), []);
        d.handle_connections(t0 + Duration::from_secs(2), 0);
        assert_eq!(outputs(&mut d), [Output::Stop(StopReason::Drained)]);
        assert_eq!(d.phase(), Phase::Stopping);
        // Nothing more happens once stopping.
        d.handle_terminate(t0 + Duration::from_secs(3));
        d.handle_interrupt(t0 + Duration::from_secs(3));
        assert_eq!(outputs(&mut d), []);
    }

    #[test]
    fn terminate_with_no_connection_stops_at_once() {
        let t0 = Instant::now();
        let mut d = Drain::new(HOUR);
        d.handle_terminate(t0);
        assert_eq!(outputs(&mut d), [Output::Stop(StopReason::Drained)]);
    }

    #[test]
    fn the_drain_timeout_ends_what_is_left() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::from_secs(25));
        d.handle_connections(t0, 3);
        d.handle_terminate(t0);
        // Reports at 10 s and 20 s, then the deadline at 25 s.
        assert_eq!(d.poll_timeout(), Some(t0 + REPORT_EVERY));
        d.handle_timeout(t0 + REPORT_EVERY);
        assert_eq!(
            outputs(&mut d),
            [Output::Left {
                connections: 3,
                draining_for: REPORT_EVERY,
                deadline_in: Some(Duration::from_secs(15)),
            }]
        );
        d.handle_connections(t0 + Duration::from_secs(12), 1);
        d.handle_timeout(t0 + Duration::from_secs(20));
        assert!(matches!(
            outputs(&mut d)[..],
            [Output::Left { connections: 1, .. }]
        ));
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(25)));
        d.handle_timeout(t0 + Duration::from_secs(24));
        assert_eq!(outputs(&mut d), []);
        d.handle_timeout(t0 + Duration::from_secs(25));
        assert_eq!(outputs(&mut d), [Output::Stop(StopReason::DrainTimeout)]);
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn a_zero_drain_timeout_stops_at_the_terminate() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::ZERO);
        d.handle_connections(t0, 4);
        d.handle_terminate(t0);
        assert_eq!(outputs(&mut d), [Output::Stop(StopReason::DrainTimeout)]);
    }

    #[test]
    fn a_second_terminate_or_an_interrupt_stops_now() {
        let t0 = Instant::now();
        let mut d = Drain::new(HOUR);
        d.handle_connections(t0, 1);
        d.handle_terminate(t0);
        assert_eq!(outputs(&mut d), []);
        d.handle_terminate(t0 + Duration::from_secs(1));
        assert_eq!(outputs(&mut d), [Output::Stop(StopReason::Interrupted)]);

        let mut d = Drain::new(HOUR);
        d.handle_connections(t0, 1);
        d.handle_interrupt(t0);
        assert_eq!(outputs(&mut d), [Output::Stop(StopReason::Interrupted)]);
    }

    #[test]
    fn an_operator_drain_stays_up_until_undrained() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::from_secs(5));
        d.handle_connections(t0, 1);
        d.handle_drain(t0);
        assert_eq!(d.phase(), Phase::Draining { exiting: false });
        // No deadline: only reports, and the last call ending does not stop the node.
        assert_eq!(d.poll_timeout(), Some(t0 + REPORT_EVERY));
        d.handle_timeout(t0 + REPORT_EVERY);
        assert!(matches!(
            outputs(&mut d)[..],
            [Output::Left {
                deadline_in: None,
                ..
            }]
        ));
        d.handle_connections(t0 + Duration::from_secs(11), 0);
        assert_eq!(outputs(&mut d), []);
        assert_eq!(d.handle_undrain(t0 + Duration::from_secs(12)), Ok(()));
        assert_eq!(d.phase(), Phase::Serving);
        assert_eq!(d.poll_timeout(), None);
        // Undrain of a serving node is a no-op; a drain twice keeps its start.
        assert_eq!(d.handle_undrain(t0), Ok(()));
    }

    #[test]
    fn a_terminate_during_an_operator_drain_exits_and_refuses_undrain() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::from_secs(30));
        d.handle_connections(t0, 2);
        d.handle_drain(t0);
        d.handle_terminate(t0 + Duration::from_secs(100));
        assert_eq!(d.phase(), Phase::Draining { exiting: true });
        assert_eq!(
            d.handle_undrain(t0 + Duration::from_secs(101)),
            Err(UndrainRefused::Exiting)
        );
        // The deadline counts from the terminate, not from the drain.
        d.handle_timeout(t0 + Duration::from_secs(129));
        assert!(
            !outputs(&mut d).contains(&Output::Stop(StopReason::DrainTimeout)),
            "stopped before drain_timeout after the terminate"
        );
        d.handle_timeout(t0 + Duration::from_secs(130));
        assert_eq!(
            outputs(&mut d).last(),
            Some(&Output::Stop(StopReason::DrainTimeout))
        );
        assert_eq!(
            d.handle_undrain(t0 + Duration::from_secs(131)),
            Err(UndrainRefused::Stopping)
        );
    }

    #[test]
    fn late_reports_return_to_their_grid() {
        let t0 = Instant::now();
        let mut d = Drain::new(HOUR);
        d.handle_connections(t0, 1);
        d.handle_drain(t0);
        d.handle_timeout(t0 + Duration::from_secs(35));
        assert_eq!(outputs(&mut d).len(), 1, "one report for a late wake-up");
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(40)));
    }
}
