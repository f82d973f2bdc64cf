//! The phone side of callgate's two protocols, over real sockets, as tools.
//!
//! Everything here drives the sans-IO phone sides of callgate-proto ([`callgate_proto::
//! callbridge::Phone`], [`callgate_proto::inbound::Phone`]); there is no second implementation
//! of the wire protocols.
//!
//! # Layout
//! - [`conn`]: WebSocket connections with small buffers, and the phone-side driver shared by
//!   both tools.
//! - [`sim`]: one call as a person would place it (WAV or tone, DTMF, hangup, recording,
//!   timeline and summary, misbehaving modes).
//! - [`load`]: many concurrent calls with every frame stamped, so round-trip time, loss,
//!   corruption and reordering are measured exactly.
//! - [`stamp`]: the stamped frame format.
//! - [`procfs`]: CPU and memory of this process and of a server process, from `/proc`.

pub mod conn;
pub mod load;
pub mod procfs;
pub mod sim;
pub mod stamp;

/// A phone-side failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL or the connection failed.
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The server refused the WebSocket upgrade with this HTTP status (a draining node: 503).
    #[error("{url} refused the call: HTTP {status}")]
    Refused {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The WebSocket failed mid-call.
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// An audio file or conversion failed.
    #[error(transparent)]
    Audio(#[from] callgate_audio::Error),
    /// Writing the recording failed.
    #[error("recording: {0}")]
    Recording(String),
    /// The options cannot work.
    #[error("{0}")]
    Options(String),
}
