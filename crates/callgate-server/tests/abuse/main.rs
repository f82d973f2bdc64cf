//! Abuse at the connection level (issue 10): each test mounts one attack over real sockets on
//! loopback while a canary call keeps echoing, and is the proof of one fix. Every test prints
//! its figure (`figure: ...`) before asserting, so a run against the old code shows the
//! "before".
//!
//! Attackers connect from other loopback addresses (`127.0.0.2`, ...: all of 127/8 is local
//! on Linux) so that budgets per source address can be told apart from the real callers on
//! `127.0.0.1`.

mod admission;
mod close;
mod slow_reader;
mod support;
