//! The admin port's accept loop: each connection through the guard ([`http_guard`]), served
//! as HTTP/1.1 by hyper with the peer's address for the handlers, and finished gracefully
//! at the stop.

use tokio_util::sync::CancellationToken;

use crate::admin::{failures, http_guard};
use crate::tasks::Tasks;

/// Serves `router` on `listener` (plain or TLS) until `stop`, then lets each connection
/// finish what it is answering. Each connection passes through [`http_guard::Guarded`] and is
/// served as HTTP/1.1 with half-closes allowed: when the guard ends a connection's stream
/// after a bad request, the requests before it are still answered, then the refusal.
pub(super) fn serve<L>(
    tasks: &Tasks,
    mut listener: L,
    router: axum::Router,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
    L::Io: std::fmt::Debug,
{
    let stop = stop.clone();
    let connections = tasks.clone();
    tasks.spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.half_close(true)
            .timer(hyper_util::rt::TokioTimer::new());
        loop {
            let (io, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let io = hyper_util::rt::TokioIo::new(http_guard::Guarded::new(io));
            // The peer's address reaches the handlers (the lockout of clients that fail to
            // authenticate counts by it).
            let peer = axum::extract::ConnectInfo(failures::Peer(peer));
            let service = hyper_util::service::TowerToHyperService::new(
                router.clone().layer(axum::Extension(peer)),
            );
            let connection = graceful.watch(http.serve_connection(io, service));
            connections.spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "Admin connection ended with an error.");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
    })
}
