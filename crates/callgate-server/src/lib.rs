//! The callgate server: answers phone calls arriving over WebSocket and serves the admin API.
//!
//! # Layout
//! - [`Server`]: binds both listeners ([`Server::bind`]) and runs until shutdown
//!   ([`Server::run`]). The binary and the tests call the same two functions.
//! - `call`: the whole call, one owning task per call: admission (the budgets: call slots,
//!   and connections that are not calls yet), accept and upgrade, set-up and routing, the I/O
//!   loop around the sans-IO call core that makes every decision, the call's audio, and its
//!   record (the journal the core writes and the record's drop guard).
//! - [`routes`]: which agent answers which call; the table in force is replaceable at run time.
//! - `live`: the live calls' operator mailboxes, where the admin API reaches a call.
//! - `admin`: the admin port, whole: the admin HTTP API (axum) and all that only it uses: its
//!   accept loop (plain or TLS, each connection served by hyper), its authorization, its
//!   OpenAPI 3.1 document (`GET /api/openapi.json`, generated from the handlers' types), the
//!   operator's web console at `/` and its sign-in (session cookies), the forwarding of
//!   operator requests to the node that holds the call ([`forward`]), and the guard each admin
//!   connection passes through before hyper (request heads checked whole, a lingering close).
//!   [`auth`]: its bearer tokens and roles, and the cluster secret.
//! - `events`: the event hub (fed by the store writer after each commit, and by the node's
//!   phase changes) and `GET /api/stream`, the live event stream.
//! - [`tls`]: native TLS on both ports, certificates reloaded without dropping connections.
//! - [`metrics`]: the Prometheus registry.
//! - [`tasks`]: the only place that spawns tasks; everything is tracked.
//! - [`config`]: the validated configuration.
//! - `drain`: the drain state machine (sans-IO); the accept loop is its driver.
//!
//! # Drain
//! [`Lifecycle::terminate`] (SIGTERM) or `POST /api/admin/drain` puts the node in `draining`:
//! `/readyz` answers 503, new upgrades on the call port get `HTTP/1.1 503` with
//! `Retry-After` before any WebSocket exists, live calls go on. After a terminate the server
//! stops once no connection is left, or at `drain_timeout`; a second terminate, an
//! [`Lifecycle::interrupt`] (SIGINT) or the shutdown future given to [`Server::run`] stops it
//! now. See `drain` for the phases.
//!
//! # Shutdown (same order every time)
//! Stop (drained, drain timeout, or interrupted) → stop accepting calls (the admin API keeps
//! serving and `/healthz` says `stopping`) → cancel every call that is left (inbound calls get
//! `hangup` and a bounded CDR wait, CallBridge calls are closed with 1001, records end as
//! `server_shutdown`) → wait for the call tasks under `shutdown_grace` → close the store writer
//! last → stop the admin API.

mod admin;
pub mod auth;
mod call;
pub mod call_auth;
pub mod config;
mod drain;
mod events;
mod live;
pub mod metrics;
pub mod nodes;
mod pii;
mod retention;
pub mod routes;
pub mod tasks;
pub mod tls;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use callgate_agent::{AgentFactory, Catalog};
use callgate_audio::recording::{Config as RecordConfig, Recordings};
use callgate_store::{Store, StoreHandle, UnixMillis};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{failures, session};

pub use admin::forward;
pub use config::{Config, ConfigError};
pub use drain::{Phase, StopReason, UndrainRefused};
pub use metrics::Metrics;
pub use routes::{RouteHandle, RouteTable};
pub use tasks::Tasks;

/// How long a store operation may take before the caller gives up.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// WebSocket read buffer per connection. tungstenite's 128 KiB default costs ~130 kB and
/// ~1.6x CPU per connection (measured); audio frames are a few hundred bytes.
/// 1 KiB rather than 4: each read attempt (one per turn of the call's select) prepares the
/// buffer's spare room, and at 4 KiB that was a quarter of all instructions per echoed frame
/// (callgrind: 19.4k → 13.9k instructions per frame at 1 KiB); larger messages just take more
/// reads.
pub const WS_READ_BUFFER: usize = 1024;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] callgate_store::Error),
    /// The recording writer could not start.
    #[error("cannot start the recording writer: {0}")]
    Recording(callgate_audio::Error),
    /// The route table cannot work.
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    /// A TLS port's certificate chain or key cannot be loaded.
    #[error("TLS certificate of the {port} port: {source}")]
    Tls {
        /// Which port.
        port: tls::Port,
        /// Why.
        source: tls::Error,
    },
    /// rustls refused the TLS configuration (cannot happen with the ring provider, which
    /// has both protocol versions).
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    /// The HTTP client that forwards operator requests to other nodes could not be built.
    #[error("cannot build the HTTP client towards other nodes: {0}")]
    HttpClient(reqwest::Error),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the error is the operator's configuration (exit code 64) rather than the
    /// environment.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::Routes(_)
                | Self::Tls { .. }
                | Self::Store(callgate_store::Error::Open { .. })
                | Self::Store(callgate_store::Error::StoreUrl { .. })
        )
    }
}

/// What the admin API, the accept loop and the node's background tasks share. Calls get the
/// narrower [`call::CallContext`] (`call`); both hold the same store, metrics, live calls,
/// tasks and cancel token.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) admin_auth: auth::AdminAuthHandle,
    /// Where the node is (serving, draining, stopping), as the accept loop last decided.
    pub(crate) phase: PhaseCell,
    /// Requests to the accept loop (drain, undrain, terminate, interrupt). Bounded
    /// ([`CONTROL_QUEUE`]); senders wait: they are operators and signals, rare and few.
    pub(crate) control: mpsc::Sender<Control>,
    /// What every call uses: the call port's side of the server. The store, the metrics, the
    /// tasks, the shutdown token and the live calls are read through it by the admin side too.
    pub(crate) call: Arc<call::CallContext>,
    /// This node in the roster.
    pub(crate) node: callgate_store::NodeInfo,
    /// The roster's connection for `GET /api/nodes` (the heartbeat thread has its own).
    /// Policy: readers take turns on it, on the blocking pool.
    pub(crate) roster: std::sync::Mutex<callgate_store::Registry>,
    /// The console's signed-in browsers (in memory: a restart signs everyone out).
    pub(crate) sessions: session::Sessions,
    /// Failed authentications by client (the admin middleware's lockout). Policy: taken
    /// briefly, only by requests that need a credential.
    pub(crate) auth_failures: std::sync::Mutex<failures::AuthFailures>,
    /// The event hub: the live event stream (`GET /api/stream`) reads it; the store writer
    /// and the node's phase changes feed it.
    pub(crate) events: Arc<events::Hub>,
    /// Webhook delivery: the outbox connection (also read by `GET /api/webhooks/deliveries`).
    pub(crate) deliveries: Arc<webhooks::Deliveries>,
    /// The client that forwards operator requests to the node holding the call.
    pub(crate) forwarder: forward::Forwarder,
}

/// A bound, not yet running server.
pub struct Server {
    shared: Arc<Shared>,
    calls: TcpListener,
    admin: TcpListener,
    /// The admin port's TLS (`None`: plain `http://`).
    admin_tls: Option<Arc<rustls::ServerConfig>>,
    certificates: tls::Certificates,
    control: mpsc::Receiver<Control>,
    /// The heartbeat thread's roster connection.
    registry: callgate_store::Registry,
}

impl Server {
    /// Validates the configuration and the routes (with the built-in agents), opens the store
    /// (closing records a crash left open as `interrupted`), then binds both listeners.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        Self::bind_with_catalog(config, &Catalog::builtin()).await
    }

    /// Like [`Server::bind`], with agents of the embedder's own in `catalog`.
    pub async fn bind_with_catalog(config: Config, catalog: &Catalog) -> Result<Self, Error> {
        let table = config.route_table(catalog)?;
        Self::bind_with_routes(config, table).await
    }

    /// Like [`Server::bind`], with one agent of the embedder's own answering every call (one
    /// default route; `config.agent` and `config.routes` are not used).
    pub async fn bind_with_agent(
        config: Config,
        agent: Arc<dyn AgentFactory>,
    ) -> Result<Self, Error> {
        Self::bind_with_routes(config, RouteTable::single(routes::DEFAULT_ROUTE, agent)).await
    }

    /// Like [`Server::bind`], with a route table already built.
    pub async fn bind_with_routes(config: Config, table: RouteTable) -> Result<Self, Error> {
        config.validate_limits()?;
        // Certificates first: a bad file stops the server before the store is touched.
        let certificate = |port, files: &Option<tls::Files>| {
            files
                .clone()
                .map(|files| {
                    tls::Certificate::load(port, files)
                        .map(Arc::new)
                        .map_err(|source| Error::Tls { port, source })
                })
                .transpose()
        };
        let call_cert = certificate(tls::Port::Call, &config.tls)?;
        let admin_cert = certificate(tls::Port::Admin, &config.admin_tls)?;
        let setup = |cert: &Arc<tls::Certificate>| {
            cert.server_config()
                .map_err(|e| Error::TlsSetup(e.to_string()))
        };
        let call_tls = call_cert.as_ref().map(setup).transpose()?;
        let admin_tls = admin_cert.as_ref().map(setup).transpose()?;
        // Off the runtime: the PostgreSQL client blocks (it runs a runtime of its own).
        let location = config.store_location();
        let node = config.node_id.clone();
        let store = tokio::task::spawn_blocking(move || {
            let mut store = location.open()?;
            let interrupted = store.end_interrupted(&node, UnixMillis::now())?;
            Ok::<_, callgate_store::Error>((store, interrupted))
        })
        .await
        .map_err(|_| callgate_store::Error::Closed)?;
        let (store, interrupted) = store?;
        if interrupted > 0 {
            warn!(
                interrupted,
                "Closed call records left open by an unclean stop as interrupted."
            );
        }
        let registry = |config: &Config| match &config.store_url {
            Some(url) => Ok(callgate_store::Registry::postgres(url.clone())),
            None => callgate_store::Registry::sqlite(&config.data_dir),
        };
        let (registry, roster) = (registry(&config)?, registry(&config)?);
        let events = Arc::new(events::Hub::new());
        let store = StoreHandle::start_with_events(
            store,
            STORE_TIMEOUT,
            callgate_store::writer::Events {
                tap: Some(events.clone()),
                node: config.node_id.clone(),
                webhooks: config.webhooks.iter().map(|e| e.subscription()).collect(),
            },
        )?;
        let outbox = match &config.store_url {
            Some(url) => callgate_store::outbox::Outbox::postgres(url.clone()),
            None => callgate_store::outbox::Outbox::sqlite(&config.data_dir)?,
        };
        let deliveries = Arc::new(webhooks::Deliveries {
            outbox: Arc::new(std::sync::Mutex::new(outbox)),
            wake: events.wake(),
            node: config.node_id.clone(),
            retry: config.webhook_retry,
        });
        let calls = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.admin_listen,
                source,
            })?;
        let admin_bound = admin.local_addr().map_err(|source| Error::Bind {
            addr: config.admin_listen,
            source,
        })?;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size));
        let mut collectors = config.metrics.clone();
        collectors.push(Arc::new(metrics::StoreCollector(store.stats())));
        let metrics = Arc::new(Metrics::with_collectors(&collectors));
        events.attach_metrics(metrics.clone());
        let media = call::media::MediaConfig {
            lead: config.playout_lead,
            underrun: config.playout_underrun,
            vad: config.vad,
            inband_dtmf: config.inband_dtmf,
            recording: match config.record {
                false => None,
                true => {
                    let writer = Recordings::start(RecordConfig {
                        // Ended calls stay open until the writer has finished them.
                        max_open: config.max_calls.saturating_mul(2),
                        ..RecordConfig::default()
                    })
                    .map_err(Error::Recording)?;
                    Some((config.data_dir.join("recordings"), Arc::new(writer)))
                }
            },
        };
        let call_auth = config.call_auth.clone();
        let admin_auth = config.admin_auth.clone();
        let tasks = Tasks::new();
        let (control_tx, control) = mpsc::channel(CONTROL_QUEUE);
        let certificates = tls::Certificates::new(
            call_cert.into_iter().chain(admin_cert).collect(),
            tasks.clone(),
            metrics.clone(),
        );
        let node = nodes::info(&config, admin_bound, admin_tls.is_some());
        if config.store_url.is_some() && config.cluster_secret.is_none() {
            warn!(
                node = %node.id,
                "The store is PostgreSQL but no cluster secret is set ([cluster] token_env): \
                 operator requests for calls held by other nodes cannot be forwarded (they are \
                 answered 421 call_on_other_node). Set the same secret on every node."
            );
        }
        let forwarder = forward::Forwarder::new().map_err(Error::HttpClient)?;
        let cancel = CancellationToken::new();
        let live = Arc::new(live::LiveCalls::default());
        let call = Arc::new(call::CallContext {
            settings: call::Settings::of(&config),
            store,
            metrics: metrics.clone(),
            routes: RouteHandle::new(table),
            call_auth: call_auth::CallAuthHandle::new(call_auth),
            refusal_log: call_auth::RefusalLog::default(),
            tls: call_tls.map(tokio_rustls::TlsAcceptor::from),
            ws_config,
            tasks,
            cancel,
            live,
            connections: watch::Sender::new(0),
            media,
            budgets: call::admission::Budgets::new(&config, metrics.clone()),
        });
        let shared = Arc::new(Shared {
            forwarder,
            node,
            roster: std::sync::Mutex::new(roster),
            events,
            deliveries,
            config,
            admin_auth: auth::AdminAuthHandle::new(admin_auth, admin_bound),
            phase: PhaseCell::default(),
            control: control_tx,
            call,
            sessions: session::Sessions::default(),
            auth_failures: std::sync::Mutex::default(),
        });
        Ok(Self {
            shared,
            calls,
            admin,
            admin_tls,
            certificates,
            control,
            registry,
        })
    }

    /// Where phone systems connect.
    pub fn call_addr(&self) -> SocketAddr {
        self.calls.local_addr().unwrap_or(self.shared.config.listen)
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.shared.config.admin_listen)
    }

    /// The call-port keys and allowlist in force; replace them to rotate keys (SIGHUP).
    pub fn call_auth(&self) -> call_auth::CallAuthHandle {
        self.shared.call.call_auth.clone()
    }

    /// The admin API's tokens in force; replace them to rotate tokens (SIGHUP).
    pub fn admin_auth(&self) -> auth::AdminAuthHandle {
        self.shared.admin_auth.clone()
    }

    /// The certificates of the TLS ports; reload them to put new files in force for new
    /// connections (SIGHUP). The server also reloads them when the files change.
    pub fn certificates(&self) -> tls::Certificates {
        self.certificates.clone()
    }

    /// The route table in force; replace it to change routing for new calls (SIGHUP).
    pub fn routes(&self) -> RouteHandle {
        self.shared.call.routes.clone()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.call.metrics.clone()
    }

    /// The store writer's commit counter: wait on it for a write to show up in the records
    /// (tests do) instead of polling them.
    pub fn commits(&self) -> callgate_store::writer::Commits {
        self.shared.call.store.commits()
    }

    /// Drain and stop the running server from outside (the binary's signals).
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            control: self.shared.control.clone(),
        }
    }

    /// Serves calls and the admin API until it must stop, then shuts down in order. It stops
    /// when `shutdown` resolves (the remaining calls end now, as `server_shutdown`), or
    /// through its [`Lifecycle`]: after a terminate, once its last call has ended (or at
    /// `drain_timeout`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Self {
            shared,
            calls,
            admin,
            admin_tls,
            certificates,
            control,
            registry,
        } = self;
        if !shared.call.call_auth.current().is_enabled()
            && calls.local_addr().is_ok_and(|a| !a.ip().is_loopback())
        {
            warn!(
                listen = %shared.config.listen,
                "The call port is open to anyone who can reach it: no [call_auth] keys or \
                 allowlist. Fine for development; configure [call_auth] before exposing it."
            );
        }
        if let (Ok(call_addr), Ok(admin_addr)) = (calls.local_addr(), admin.local_addr()) {
            for weakness in call_auth::weaknesses(
                &shared.call.call_auth.current(),
                shared.admin_auth.current().is_enabled(),
                call_addr,
                shared.call.tls.is_some(),
                admin_addr,
                admin_tls.is_some(),
            ) {
                warn!("Weak configuration: {weakness}.");
            }
        }
        info!(
            calls = %calls.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            admin = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            routes = shared.call.routes.current().routes().len(),
            call_tls = shared.call.tls.is_some(),
            admin_tls = admin_tls.is_some(),
            "Server listening."
        );
        let admin_stop = CancellationToken::new();
        let admin_tasks = Tasks::new();
        let admin_handle = admin::serve(&shared, admin, admin_tls, &admin_tasks, &admin_stop);
        if !certificates.is_empty() {
            shared.call.tasks.spawn(tls::watch(
                certificates,
                shared.config.tls_watch_interval,
                shared.call.cancel.clone(),
            ));
        }

        for endpoint in shared.config.webhooks.clone() {
            shared.call.tasks.spawn(shared.deliveries.clone().run(
                endpoint,
                shared.call.metrics.clone(),
                shared.call.cancel.clone(),
            ));
        }
        if let Some(retention) = shared.config.retention {
            shared
                .call
                .tasks
                .spawn(retention::run(shared.clone(), retention));
        }
        let heartbeat = match nodes::Heartbeat::start(shared.clone(), registry) {
            Ok(h) => Some(h),
            Err(error) => {
                error!(%error, "Cannot start the node heartbeat thread; this node stays out of the roster.");
                None
            }
        };
        let reason = accept(&shared, calls, shutdown, control).await;

        shared.set_phase(Phase::Stopping);
        let live_calls = shared.call.live.len();
        // Upgrades answered 503 while draining (a load balancer retried them elsewhere).
        let refused_draining = shared
            .call
            .metrics
            .connections_refused
            .get_or_create(&[("reason", "draining")])
            .get();
        match reason {
            StopReason::Drained => info!(
                reason = reason.as_str(),
                refused_draining, "Drained: no call left; stopping."
            ),
            StopReason::DrainTimeout => warn!(
                reason = reason.as_str(),
                live_calls,
                refused_draining,
                drain_timeout = ?shared.config.drain_timeout,
                "The drain timeout ran out; ending the remaining calls."
            ),
            StopReason::Interrupted => info!(
                reason = reason.as_str(),
                live_calls, "Stopped accepting calls; ending live calls."
            ),
        }
        shared.call.cancel.cancel();
        shared.call.tasks.close();
        let grace = shared.config.shutdown_grace;
        if tokio::time::timeout(grace, shared.call.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = shared.call.tasks.len(),
                ?grace,
                "Shutdown grace period ran out; remaining call records will be closed as interrupted at the next start."
            );
        }
        if let Some((_, recordings)) = &shared.call.media.recording {
            match tokio::time::timeout(grace, recordings.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "Recordings could not all be completed."),
                Err(_) => warn!("Recording writer did not finish in time."),
            }
        }
        shared.call.store.close().await;
        // Its records are written: leave the roster (other nodes stop showing it).
        if let Some(heartbeat) = heartbeat {
            heartbeat.stop().await;
        }
        // Every event is published: the streams end once they have sent them.
        shared.events.close();

        admin_stop.cancel();
        let _ = admin_handle.await;
        // The admin API's roster connection is closed off the runtime (the PostgreSQL
        // client blocks when dropped).
        let roster = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            roster
                .roster
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .disconnect();
            roster
                .deliveries
                .outbox
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .disconnect();
        })
        .await;
        info!("Server stopped.");
        Ok(())
    }
}

/// Capacity of the accept loop's control queue (drain, undrain, terminate, interrupt).
pub(crate) const CONTROL_QUEUE: usize = 16;

/// A request to the accept loop, the drain's driver.
#[derive(Debug)]
pub(crate) enum Control {
    /// SIGTERM: drain and exit; the second one stops now. Answered with the phase after it.
    Terminate(oneshot::Sender<Phase>),
    /// SIGINT: stop now. Answered once taken.
    Interrupt(oneshot::Sender<Phase>),
    /// An operator's drain: take no new calls, stay up. Answered with the phase after it.
    Drain(oneshot::Sender<Phase>),
    /// An operator's undrain. Answered with the phase after it, or why not.
    Undrain(oneshot::Sender<Result<Phase, UndrainRefused>>),
}

/// Drives a running server's drain from outside: the binary maps signals onto it (SIGTERM:
/// [`Lifecycle::terminate`], SIGINT: [`Lifecycle::interrupt`]). Requests to a server that has
/// stopped are ignored.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    control: mpsc::Sender<Control>,
}

impl Lifecycle {
    /// Drain, then stop once the last call has ended (or at `drain_timeout`); when already
    /// exiting, stop now. Returns once the server has taken it, with the phase after it.
    pub async fn terminate(&self) -> Phase {
        self.ask(Control::Terminate).await
    }

    /// Stop now: the remaining calls end as `server_shutdown`.
    pub async fn interrupt(&self) -> Phase {
        self.ask(Control::Interrupt).await
    }

    /// Take no new calls and stay up (as `POST /api/admin/drain`); the phase after it.
    pub async fn drain(&self) -> Phase {
        self.ask(Control::Drain).await
    }

    async fn ask(&self, request: impl FnOnce(oneshot::Sender<Phase>) -> Control) -> Phase {
        let (reply, answer) = oneshot::channel();
        if self.control.send(request(reply)).await.is_err() {
            return Phase::Stopping;
        }
        answer.await.unwrap_or(Phase::Stopping)
    }

    /// Return to service after [`Lifecycle::drain`] (as `POST /api/admin/undrain`).
    pub async fn undrain(&self) -> Result<Phase, UndrainRefused> {
        let (reply, answer) = oneshot::channel();
        if self.control.send(Control::Undrain(reply)).await.is_err() {
            return Err(UndrainRefused::Stopping);
        }
        answer.await.unwrap_or(Err(UndrainRefused::Stopping))
    }
}

/// The phase the accept loop last decided, for the admin API.
#[derive(Debug, Default)]
pub(crate) struct PhaseCell(AtomicU8);

impl PhaseCell {
    /// Sets the phase; returns the one before.
    pub(crate) fn store(&self, phase: Phase) -> Phase {
        let n = match phase {
            Phase::Serving => 0,
            Phase::Draining { exiting: false } => 1,
            Phase::Draining { exiting: true } => 2,
            Phase::Stopping => 3,
        };
        Self::from_u8(self.0.swap(n, Ordering::Relaxed))
    }

    pub(crate) fn load(&self) -> Phase {
        Self::from_u8(self.0.load(Ordering::Relaxed))
    }

    fn from_u8(n: u8) -> Phase {
        match n {
            0 => Phase::Serving,
            1 => Phase::Draining { exiting: false },
            2 => Phase::Draining { exiting: true },
            _ => Phase::Stopping,
        }
    }
}

impl Shared {
    /// Sets the node's phase, announcing a change of state (`node.serving`,
    /// `node.draining`, `node.stopping`) on the event stream.
    pub(crate) fn set_phase(&self, phase: Phase) {
        use callgate_store::notice::Kind;
        let kind = |p: Phase| match p {
            Phase::Serving => Kind::NodeServing,
            Phase::Draining { .. } => Kind::NodeDraining,
            Phase::Stopping => Kind::NodeStopping,
        };
        let before = self.phase.store(phase);
        if kind(before) != kind(phase) {
            let mut data = serde_json::Map::new();
            data.insert("phase".into(), phase.as_str().into());
            self.announce_node(kind(phase), &self.node.id, data);
        }
    }

    /// A node event, through the store writer (published after its next commit, and in the
    /// webhook outbox like the call events): `data` gets `node`.
    pub(crate) fn announce_node(
        &self,
        kind: callgate_store::notice::Kind,
        node: &str,
        mut data: serde_json::Map<String, serde_json::Value>,
    ) {
        data.insert("node".into(), node.into());
        self.call
            .store
            .announce(callgate_store::notice::Notice::new(
                kind,
                UnixMillis::now(),
                data,
            ));
    }
}

/// What woke the accept loop.
enum Input {
    Shutdown,
    Control(Control),
    Timer,
    Connections,
    Accepted(std::io::Result<(tokio::net::TcpStream, SocketAddr)>),
}

/// Accepts connections and drives the drain ([`drain::Drain`]) until the server must stop;
/// returns why. While serving, each connection takes a place in the budget of connections that
/// are not calls yet (`admission`), or is turned away at once; it takes a call slot only once
/// its first message makes it a call (see `call::take`). While draining, each new connection
/// gets `503` with `Retry-After` to its upgrade request (`call::admission`).
async fn accept(
    shared: &Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut control: mpsc::Receiver<Control>,
) -> StopReason {
    tokio::pin!(shutdown);
    let mut drain = drain::Drain::new(shared.config.drain_timeout);
    let mut connections = shared.call.connections.subscribe();
    let mut shutdown_fired = false;
    loop {
        let timer = drain.poll_timeout();
        let input = tokio::select! {
            _ = &mut shutdown, if !shutdown_fired => Input::Shutdown,
            Some(c) = control.recv() => Input::Control(c),
            _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => Input::Timer,
            Ok(()) = connections.changed() => Input::Connections,
            accepted = listener.accept() => Input::Accepted(accepted),
        };
        let now = Instant::now();
        // The count first: every other input is decided with it up to date (a connection
        // accepted in the last turn counts before a terminate is looked at).
        drain.handle_connections(now, *connections.borrow_and_update());
        let before = drain.phase();
        match input {
            Input::Shutdown => {
                shutdown_fired = true;
                drain.handle_interrupt(now);
            }
            Input::Control(Control::Terminate(reply)) => {
                drain.handle_terminate(now);
                shared.set_phase(drain.phase());
                let _ = reply.send(drain.phase());
            }
            Input::Control(Control::Interrupt(reply)) => {
                drain.handle_interrupt(now);
                shared.set_phase(drain.phase());
                let _ = reply.send(drain.phase());
            }
            Input::Control(Control::Drain(reply)) => {
                drain.handle_drain(now);
                shared.set_phase(drain.phase());
                let _ = reply.send(drain.phase());
            }
            Input::Control(Control::Undrain(reply)) => {
                let result = drain.handle_undrain(now).map(|()| drain.phase());
                shared.set_phase(drain.phase());
                let _ = reply.send(result);
            }
            Input::Timer => drain.handle_timeout(now),
            Input::Connections => {}
            Input::Accepted(Ok((stream, peer))) => {
                call::take(&shared.call, drain.phase(), stream, peer);
            }
            Input::Accepted(Err(error)) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(%error, "Accept failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let after = drain.phase();
        shared.set_phase(after);
        if after != before {
            log_phase(shared, after);
        }
        while let Some(output) = drain.poll_output() {
            match output {
                drain::Output::Stop(reason) => return reason,
                drain::Output::Left {
                    connections,
                    draining_for,
                    deadline_in,
                } => info!(
                    live_calls = shared.call.live.len(),
                    connections,
                    draining_for_s = draining_for.as_secs(),
                    ends_calls_in_s = deadline_in.map(|d| d.as_secs()),
                    "Draining: calls left."
                ),
            }
        }
    }
}

/// Logs a change of phase.
fn log_phase(shared: &Shared, phase: Phase) {
    let live_calls = shared.call.live.len();
    match phase {
        Phase::Serving => info!(live_calls, "Back in service: taking calls."),
        Phase::Draining { exiting: false } => info!(
            live_calls,
            "Draining: taking no new calls (an operator's drain; undrain to take calls again)."
        ),
        Phase::Draining { exiting: true } => info!(
            live_calls,
            drain_timeout = ?shared.config.drain_timeout,
            "Draining: taking no new calls; stopping once the live calls have ended (a second \
             SIGTERM or SIGINT ends them now)."
        ),
        Phase::Stopping => {}
    }
}

/// Binds and runs a server until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}
