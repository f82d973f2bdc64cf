//! The whole call: one owning task per call, from the accepted TCP connection to the last
//! record write. The WebSocket, the call core, the record and the agent's future all belong to
//! that task.
//!
//! # Layout, in the order a call goes through it
//! - [`admission`]: the budgets: pending connections (in all and per source) and call slots;
//!   a call slot is taken only once the first message makes a connection a call. Also the
//!   draining node's `503` and the turned-away connection.
//! - [`accept`]: a new connection taken ([`take`]) or turned away; TLS handshake, upgrade
//!   (the call port's keys and allowlist), first message, call slot, under one deadline.
//! - [`setup`]: routing, the record's first insert, the agent's view of the call, its audio;
//!   a call no route takes is refused and recorded here.
//! - [`driver`]: the I/O loop of a live call (`Call`), which feeds the core and carries out
//!   its effects; [`liveness`]: how far behind the phone reads.
//! - [`core`]: the sans-IO call core that makes every decision of a live call.
//! - [`media`]: the call's audio (conversion, playout clock, VAD, in-band DTMF, recording).
//! - [`record`]: what the core records as the call goes (`Journal`) and the record in the
//!   store (`Record`, a drop guard: every exit path ends it).
//! - [`close`]: the close frame and the linger after it.
//!
//! Audio has one vocabulary here: *caller audio* is what the phone sends us (the caller's
//! voice; the protocols' `phone_output`), *agent audio* is what we send the phone to play
//! (their `phone_input`).

pub(crate) mod accept;
pub(crate) mod admission;
mod close;
pub(crate) mod core;
mod driver;
mod liveness;
pub(crate) mod media;
pub(crate) mod record;
mod setup;

pub(crate) use accept::take;

use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;

use crate::tls::CallStream;

/// A call's WebSocket.
type Ws = WebSocketStream<CallStream>;

/// The call's clock (tokio's, so `tokio::time::pause` drives a whole call), as the std
/// `Instant` the sans-IO parts take.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}
