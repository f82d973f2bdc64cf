//! The callgate server: answers phone calls arriving over WebSocket and serves the admin API.
//!
//! # Layout
//! - [`Server`]: binds both listeners ([`Server::bind`]) and runs until shutdown
//!   ([`Server::run`]). The binary and the tests call the same two functions.
//! - `admission`: the budgets: call slots, and connections that are not calls yet (in all and
//!   per source); a call slot is taken only once the first message makes a connection a call.
//! - `call`: one owning task per call: the I/O loop around `call::core`, the sans-IO call core
//!   (session, media, agent wiring, record journal) that makes every decision.
//! - [`routes`]: which agent answers which call; the table in force is replaceable at run time.
//! - `record`: the call record accumulator and its drop guard.
//! - `admin`: the admin HTTP API (axum); [`auth`]: its bearer tokens and roles.
//! - [`tls`]: native TLS on both ports, certificates reloaded without dropping connections.
//! - [`metrics`]: the Prometheus registry.
//! - [`tasks`]: the only place that spawns tasks; everything is tracked.
//! - [`config`]: the validated configuration.
//!
//! # Shutdown (same order every time)
//! The shutdown future resolves → stop accepting calls (the admin API keeps serving and
//! `/healthz` says `draining`) → cancel every call (inbound calls get `hangup` and a bounded
//! CDR wait, CallBridge calls are closed with 1001, records end as `server_shutdown`) → wait
//! for the call tasks under `shutdown_grace` → close the store writer last → stop the admin API.

mod admin;
mod admission;
pub mod auth;
mod call;
pub mod call_auth;
pub mod config;
mod live;
mod media;
pub mod metrics;
mod pii;
mod record;
mod retention;
pub mod routes;
pub mod tasks;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callgate_agent::{AgentFactory, Catalog};
use callgate_audio::record::{Config as RecordConfig, Recordings};
use callgate_store::{Store, StoreHandle, UnixMillis};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, ConfigError};
pub use metrics::Metrics;
pub use routes::{RouteHandle, RouteTable};
pub use tasks::Tasks;

/// How long a store operation may take before the caller gives up.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// WebSocket read buffer per connection. tungstenite's 128 KiB default costs ~130 kB and
/// ~1.6x CPU per connection (`../shared/DEPENDENCIES.md`); audio frames are a few hundred bytes.
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

/// What every call task and admin handler shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) store: StoreHandle,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) routes: RouteHandle,
    pub(crate) call_auth: call_auth::CallAuthHandle,
    pub(crate) admin_auth: auth::AdminAuthHandle,
    /// The call port's TLS (`None`: plain `ws://`).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) refusal_log: call_auth::RefusalLog,
    pub(crate) tasks: Tasks,
    pub(crate) cancel: CancellationToken,
    pub(crate) live: live::LiveCalls,
    pub(crate) draining: AtomicBool,
    pub(crate) ws_config: WebSocketConfig,
    pub(crate) media: media::MediaConfig,
    pub(crate) admission: Arc<admission::Admission>,
}

/// A bound, not yet running server.
pub struct Server {
    shared: Arc<Shared>,
    calls: TcpListener,
    admin: TcpListener,
    /// The admin port's TLS (`None`: plain `http://`).
    admin_tls: Option<Arc<rustls::ServerConfig>>,
    certificates: tls::Certificates,
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
        let store = tokio::task::spawn_blocking(move || {
            let mut store = location.open()?;
            let interrupted = store.end_interrupted(UnixMillis::now())?;
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
        let store = StoreHandle::start(store, STORE_TIMEOUT)?;
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
        let media = media::MediaConfig {
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
        let mut collectors = config.metrics.clone();
        collectors.push(Arc::new(metrics::StoreCollector(store.stats())));
        let metrics = Arc::new(Metrics::with_collectors(&collectors));
        let call_auth = config.call_auth.clone();
        let admin_auth = config.admin_auth.clone();
        let tasks = Tasks::new();
        let certificates = tls::Certificates::new(
            call_cert.into_iter().chain(admin_cert).collect(),
            tasks.clone(),
            metrics.clone(),
        );
        let shared = Arc::new(Shared {
            media,
            admission: admission::Admission::new(&config, metrics.clone()),
            config,
            store,
            metrics,
            routes: RouteHandle::new(table),
            call_auth: call_auth::CallAuthHandle::new(call_auth),
            admin_auth: auth::AdminAuthHandle::new(admin_auth, admin_bound),
            tls: call_tls.map(tokio_rustls::TlsAcceptor::from),
            refusal_log: call_auth::RefusalLog::default(),
            tasks,
            cancel: CancellationToken::new(),
            live: live::LiveCalls::default(),
            draining: AtomicBool::new(false),
            ws_config,
        });
        Ok(Self {
            shared,
            calls,
            admin,
            admin_tls,
            certificates,
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
        self.shared.call_auth.clone()
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
        self.shared.routes.clone()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serves calls and the admin API until `shutdown` resolves, then shuts down in order.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Self {
            shared,
            calls,
            admin,
            admin_tls,
            certificates,
        } = self;
        if !shared.call_auth.current().is_enabled()
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
                &shared.call_auth.current(),
                shared.admin_auth.current().is_enabled(),
                call_addr,
                shared.tls.is_some(),
                admin_addr,
                admin_tls.is_some(),
            ) {
                warn!("Weak configuration: {weakness}.");
            }
        }
        info!(
            calls = %calls.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            admin = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            routes = shared.routes.current().routes().len(),
            call_tls = shared.tls.is_some(),
            admin_tls = admin_tls.is_some(),
            "Server listening."
        );
        let admin_stop = CancellationToken::new();
        let admin_tasks = Tasks::new();
        let router = admin::router(shared.clone());
        let admin_handle = match admin_tls {
            None => serve_admin(&admin_tasks, admin, router, &admin_stop),
            Some(config) => {
                let listener = tls::AdminListener::new(
                    admin,
                    config,
                    shared.config.handshake_timeout,
                    shared.metrics.clone(),
                );
                serve_admin(&admin_tasks, listener, router, &admin_stop)
            }
        };
        if !certificates.is_empty() {
            shared.tasks.spawn(tls::watch(
                certificates,
                shared.config.tls_watch_interval,
                shared.cancel.clone(),
            ));
        }

        if let Some(retention) = shared.config.retention {
            shared
                .tasks
                .spawn(retention::run(shared.clone(), retention));
        }
        accept(&shared, calls, shutdown).await;

        shared.draining.store(true, Ordering::Relaxed);
        info!(
            live_calls = shared.live.len(),
            "Stopped accepting calls; ending live calls."
        );
        shared.cancel.cancel();
        shared.tasks.close();
        let grace = shared.config.shutdown_grace;
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = shared.tasks.len(),
                ?grace,
                "Shutdown grace period ran out; remaining call records will be closed as interrupted at the next start."
            );
        }
        if let Some((_, recordings)) = &shared.media.recording {
            match tokio::time::timeout(grace, recordings.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "Recordings could not all be completed."),
                Err(_) => warn!("Recording writer did not finish in time."),
            }
        }
        shared.store.close().await;
        admin_stop.cancel();
        let _ = admin_handle.await;
        info!("Server stopped.");
        Ok(())
    }
}

/// Serves the admin API on `listener` (plain or TLS) until `stop`.
fn serve_admin<L>(
    tasks: &Tasks,
    listener: L,
    router: axum::Router,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let server =
        axum::serve(listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
    tasks.spawn(async move {
        if let Err(error) = server.await {
            warn!(%error, "Admin API stopped with an error.");
        }
    })
}

/// Accepts connections until `shutdown` resolves. Each takes a place in the budget of
/// connections that are not calls yet (`admission`), or is turned away at once; it takes a
/// call slot only once its first message makes it a call (see `call::serve`).
async fn accept(shared: &Arc<Shared>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(%error, "Accept failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match shared.admission.admit(peer.ip()) {
            Ok(pending) => {
                shared
                    .tasks
                    .spawn(call::serve(shared.clone(), stream, peer, pending));
            }
            Err(refusal) => {
                shared
                    .metrics
                    .connections_refused
                    .get_or_create(&[("reason", refusal.as_str())])
                    .inc();
                // A TLS client could not read a plain 503: it just sees the connection close.
                admission::turn_away(stream, shared.tls.is_none());
            }
        }
    }
}

/// Binds and runs a server until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}
