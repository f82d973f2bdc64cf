//! Abuse (issue 10): each test mounts one attack over real sockets on loopback while a canary
//! call keeps echoing in real time, and is the proof of one fix (see `support` for what every
//! attack is checked for). Every test prints its figures (`figure: ...`, and one `report:`
//! line) before asserting, so a failing or older build still shows them.
//!
//! `cargo test` runs the short version. `bench/abuse.sh` runs the same tests at the issue's
//! sizes (`CALLGATE_ABUSE=full`, release build) and writes `bench/ABUSE.md`.
//!
//! Attackers connect from other loopback addresses (`127.0.0.2`, ...: all of 127/8 is local
//! on Linux) so that budgets per source address can be told apart from the real callers on
//! `127.0.0.1`.

mod admin_errors;
mod admin_reads;
mod admission;
mod baseline;
mod close;
mod crash;
mod deep_json;
mod flood;
mod growth;
mod play;
mod raw;
mod slow_reader;
mod stall;
mod support;
