//! This node in the roster: a thread of its own heartbeats every [`HEARTBEAT_EVERY`] and,
//! with PostgreSQL, sweeps the nodes whose heartbeat lapsed for `node_timeout` (closing their
//! open records as `interrupted` with a `node_lost` event). The rules are in
//! `callgate_store::nodes`.
//!
//! The roster's client blocks, so it runs on a thread, never on a call task: a database that
//! is down or slow delays only heartbeats, which fail, are logged and are tried again at the
//! next tick. On a clean exit the node removes its own row.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use callgate_store::{Beat, NodeInfo, NodeState, Registry, UnixMillis};
use tracing::{error, info, warn};

use crate::{Phase, Shared};

/// How often a node heartbeats (and sweeps).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// This node's identity, for the roster.
pub(crate) fn info(
    shared_config: &crate::Config,
    admin_bound: std::net::SocketAddr,
    tls: bool,
) -> NodeInfo {
    let admin_url = shared_config.advertise_admin.clone().unwrap_or_else(|| {
        let scheme = if tls { "https" } else { "http" };
        // An unspecified address (0.0.0.0) is not where anyone reaches us: the node's name
        // (by default its host name) is the best guess; set advertise_admin otherwise.
        if admin_bound.ip().is_unspecified() {
            format!(
                "{scheme}://{}:{}",
                shared_config.node_id,
                admin_bound.port()
            )
        } else {
            format!("{scheme}://{admin_bound}")
        }
    });
    NodeInfo {
        id: shared_config.node_id.clone(),
        admin_url,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        incarnation: uuid::Uuid::now_v7().to_string(),
    }
}

/// The state the roster shows for a phase.
fn state(phase: Phase) -> NodeState {
    match phase {
        Phase::Serving => NodeState::Serving,
        Phase::Draining { .. } | Phase::Stopping => NodeState::Draining,
    }
}

/// The running heartbeat thread.
pub(crate) struct Heartbeat {
    stop: SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Heartbeat {
    /// Starts heartbeating (the first beat at once).
    pub(crate) fn start(shared: Arc<Shared>, registry: Registry) -> std::io::Result<Self> {
        // Policy: one slot; the only message is "stop", sent once.
        let (stop, stopped) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("callgate-nodes".into())
            .spawn(move || run(&shared, registry, &stopped))?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread, which removes this node from the roster; waits for it.
    pub(crate) async fn stop(self) {
        let _ = self.stop.try_send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

fn run(shared: &Shared, mut registry: Registry, stopped: &Receiver<()>) {
    let me = &shared.node;
    let mut failing = false;
    loop {
        let now = UnixMillis::now();
        let beat = registry.beat(
            me,
            state(shared.phase.load()),
            shared.call.live.len() as u64,
            now,
        );
        match beat {
            Ok(beat) => {
                if failing {
                    info!(node = %me.id, "The node heartbeat is written again.");
                    failing = false;
                }
                match beat {
                    Beat::Refreshed => {}
                    Beat::Registered => {
                        info!(node = %me.id, admin_url = %me.admin_url, "Node registered.")
                    }
                    Beat::Rejoined => warn!(
                        node = %me.id,
                        "This node had been declared dead (its heartbeats failed for node_timeout): \
                         registered again. Its records open at the time were closed as interrupted \
                         by another node and stay closed."
                    ),
                }
                match registry.sweep(&me.id, shared.config.node_timeout, now) {
                    Ok(lost) => {
                        for l in lost {
                            warn!(
                                node = %l.node,
                                closed = l.closed,
                                closed_by = %me.id,
                                "A node's heartbeat lapsed: declared it dead and closed its open records as interrupted."
                            );
                            let mut data = serde_json::Map::new();
                            data.insert("closed".into(), l.closed.into());
                            data.insert("closed_by".into(), me.id.as_str().into());
                            shared.announce_node(
                                callgate_store::notice::Kind::NodeLost,
                                &l.node,
                                data,
                            );
                        }
                    }
                    Err(error) => {
                        warn!(%error, "Could not sweep the node roster; trying again at the next heartbeat.")
                    }
                }
            }
            Err(error) => {
                if !failing {
                    error!(%error, node = %me.id, "Could not write the node heartbeat; trying again every 2 s. Calls are not affected.");
                }
                failing = true;
            }
        }
        match stopped.recv_timeout(HEARTBEAT_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    match registry.leave(me) {
        Ok(()) => info!(node = %me.id, "Node removed from the roster."),
        Err(error) => {
            warn!(%error, node = %me.id, "Could not remove this node from the roster; it shows as dead after node_timeout.")
        }
    }
}
