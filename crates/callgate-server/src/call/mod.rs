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
//! - [`refusal`]: the call port's HTTP refusals (401, 403, 503), JSON like the admin API's
//!   errors, and their codes.
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
mod refusal;
mod setup;

pub(crate) use accept::take;

use std::sync::Arc;
use std::time::Duration;

use callgate_proto::{AudioFormat, Error as ProtoError};
use callgate_store::StoreHandle;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::call_auth::{CallAuthHandle, RefusalLog};
use crate::config::Config;
use crate::live::LiveCalls;
use crate::metrics::Metrics;
use crate::routes::RouteHandle;
use crate::tasks::Tasks;
use crate::tls::CallStream;

/// What a call uses of the server, and nothing more: built once when the server binds, shared
/// by every connection on the call port. The admin API's state (sessions, the roster, the
/// forwarder, webhook deliveries, authentication failures) is none of a call's business; the
/// parts both sides use (store, metrics, live calls, tasks, the cancel token) are shared
/// handles.
pub(crate) struct CallContext {
    /// The configuration values a call reads.
    pub(crate) settings: Settings,
    /// The call records.
    pub(crate) store: StoreHandle,
    /// The metrics registry (a call merges its own counts into it on its progress tick).
    pub(crate) metrics: Arc<Metrics>,
    /// The route table in force, read once per call start.
    pub(crate) routes: RouteHandle,
    /// The call port's keys and allowlist in force.
    pub(crate) call_auth: CallAuthHandle,
    /// Refused upgrades, logged at a bounded rate.
    pub(crate) refusal_log: RefusalLog,
    /// The call port's TLS (`None`: plain `ws://`).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// The WebSocket limits and buffers of every call.
    pub(crate) ws_config: WebSocketConfig,
    /// Where call tasks and the agents' tasks are spawned; shutdown waits for them.
    pub(crate) tasks: Tasks,
    /// Cancelled at shutdown: every call ends as `server_shutdown`.
    pub(crate) cancel: CancellationToken,
    /// The live calls' operator mailboxes (the admin API reaches a call through them).
    pub(crate) live: Arc<LiveCalls>,
    /// Connections served (pending upgrades and calls), counted from accept until their task
    /// ends: what a drain waits for.
    pub(crate) connections: watch::Sender<usize>,
    /// What every call's audio is set up with.
    pub(crate) media: media::MediaConfig,
    /// The budgets: pending connections and call slots.
    pub(crate) budgets: Arc<admission::Budgets>,
}

/// The configuration values a call reads (plain data, copied from the [`Config`]).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// From accept to the first message: TLS handshake, upgrade and start message.
    pub(crate) handshake_timeout: Duration,
    /// The most a write to the phone may wait; a phone that leaves a ping unanswered this long
    /// has stopped reading.
    pub(crate) write_timeout: Duration,
    /// How often a live call writes its progress (record, metrics, recording).
    pub(crate) progress_interval: Duration,
    /// How long an ended inbound call waits for its CDR.
    pub(crate) cdr_timeout: Duration,
    /// The most calls live at once.
    pub(crate) max_calls: usize,
    /// The audio format of inbound-API calls (both directions).
    pub(crate) inbound_audio_format: AudioFormat,
    /// Whether the caller speaking over the agent clears the agent's audio.
    pub(crate) barge_in: bool,
    /// Whether logs show phone numbers in full.
    pub(crate) log_pii: bool,
    /// This node's id, on every record it makes.
    pub(crate) node_id: String,
}

impl Settings {
    /// The values a call reads of `config`.
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            handshake_timeout: config.handshake_timeout,
            write_timeout: config.write_timeout,
            progress_interval: config.progress_interval,
            cdr_timeout: config.cdr_timeout,
            max_calls: config.max_calls,
            inbound_audio_format: config.inbound_audio_format,
            barge_in: config.barge_in,
            log_pii: config.log_pii,
            node_id: config.node_id.clone(),
        }
    }
}

/// A call's WebSocket.
type Ws = WebSocketStream<CallStream>;

/// A read error that is the peer's protocol fault (we answer it with a close code), as opposed
/// to the connection simply going away.
fn fatal_read_error(error: &WsError) -> Option<ProtoError> {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { max_size, .. }) => {
            Some(ProtoError::MessageTooBig { max: *max_size })
        }
        WsError::Utf8(_) => Some(ProtoError::InvalidJson {
            detail: "text message is not valid UTF-8".into(),
        }),
        _ => None,
    }
}

/// The call's clock (tokio's, so `tokio::time::pause` drives a whole call), as the std
/// `Instant` the sans-IO parts take.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}
