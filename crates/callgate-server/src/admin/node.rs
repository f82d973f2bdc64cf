//! The node: liveness and readiness for load balancers, drain and undrain, the metrics, and
//! the cluster's roster.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use callgate_store::{NodeRecord, UnixMillis};
use serde::Serialize;
use tokio::sync::oneshot;
use utoipa::ToSchema;

use crate::admin::error::{ApiError, ErrorBody};
use crate::{Control, Phase, Shared, UndrainRefused};

/// The answer of `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// Calls on the line now.
    live_calls: usize,
    /// `ok` or `draining` (200), `stopping` (503).
    status: HealthStatus,
}

/// The word of `GET /healthz`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HealthStatus {
    /// Serving calls.
    Ok,
    /// Taking no new calls; live calls go on.
    Draining,
    /// Ending its calls to exit.
    Stopping,
}

/// Liveness: 200 while the process serves or drains (`status` `ok` or `draining`), 503
/// `stopping` once it is ending its calls to exit.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "Serving or draining", body = Health),
        (status = 503, description = "Stopping: ending its calls to exit", body = Health),
    )
)]
pub(crate) async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let phase = shared.phase.load();
    let (status, word) = match phase {
        Phase::Serving => (StatusCode::OK, HealthStatus::Ok),
        Phase::Draining { .. } => (StatusCode::OK, HealthStatus::Draining),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, HealthStatus::Stopping),
    };
    let body = Health {
        live_calls: shared.call.live.len(),
        status: word,
    };
    (status, Json(body)).into_response()
}

/// Where the node is: what `/readyz`, drain and undrain show.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PhaseBody {
    /// Whether the process ends once its live calls have (a terminate), rather than staying
    /// up drained until an undrain.
    exiting: bool,
    /// Calls on the line now.
    live_calls: usize,
    /// `serving`, `draining` or `stopping`.
    status: PhaseName,
}

/// The name of a [`Phase`].
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PhaseName {
    /// Taking calls.
    Serving,
    /// Taking no new calls; live calls go on.
    Draining,
    /// Ending the remaining calls and stopping.
    Stopping,
}

impl PhaseBody {
    fn new(shared: &Shared, phase: Phase) -> Self {
        Self {
            exiting: matches!(phase, Phase::Draining { exiting: true } | Phase::Stopping),
            live_calls: shared.call.live.len(),
            status: match phase {
                Phase::Serving => PhaseName::Serving,
                Phase::Draining { .. } => PhaseName::Draining,
                Phase::Stopping => PhaseName::Stopping,
            },
        }
    }
}

/// Readiness, for load balancers: 200 while the node takes calls, 503 while it drains or
/// stops.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Taking calls", body = PhaseBody),
        (status = 503, description = "Draining or stopping: send calls elsewhere", body = PhaseBody),
    )
)]
pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let phase = shared.phase.load();
    let status = if phase.takes_calls() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(PhaseBody::new(&shared, phase))).into_response()
}

/// The server is stopping: it takes no drain requests any more.
fn stopping() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "stopping",
        UndrainRefused::Stopping.to_string(),
    )
}

/// `POST /api/admin/drain`: take no new calls (`/readyz` 503, upgrades 503) and stay up; live
/// calls go on. Idempotent.
#[utoipa::path(
    post,
    path = "/api/admin/drain",
    tag = "node",
    responses(
        (status = 200, description = "Draining (or already)", body = PhaseBody),
        (status = 409, description = "`stopping`: the server is stopping", body = ErrorBody),
    )
)]
pub(crate) async fn drain(State(shared): State<Arc<Shared>>) -> Result<Json<PhaseBody>, ApiError> {
    let (reply, answer) = oneshot::channel();
    shared
        .control
        .send(Control::Drain(reply))
        .await
        .map_err(|_| stopping())?;
    let phase = answer.await.map_err(|_| stopping())?;
    if phase == Phase::Stopping {
        return Err(stopping());
    }
    tracing::info!("Drain requested through the admin API.");
    Ok(Json(PhaseBody::new(&shared, phase)))
}

/// `POST /api/admin/undrain`: take calls again after a drain. Refused (409 `exiting`) once the
/// process was told to exit (SIGTERM).
#[utoipa::path(
    post,
    path = "/api/admin/undrain",
    tag = "node",
    responses(
        (status = 200, description = "Serving again", body = PhaseBody),
        (status = 409, description = "`exiting` (told to exit) or `stopping`", body = ErrorBody),
    )
)]
pub(crate) async fn undrain(
    State(shared): State<Arc<Shared>>,
) -> Result<Json<PhaseBody>, ApiError> {
    let (reply, answer) = oneshot::channel();
    shared
        .control
        .send(Control::Undrain(reply))
        .await
        .map_err(|_| stopping())?;
    match answer.await.map_err(|_| stopping())? {
        Ok(phase) => {
            tracing::info!("Undrain requested through the admin API.");
            Ok(Json(PhaseBody::new(&shared, phase)))
        }
        Err(refused @ UndrainRefused::Exiting) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "exiting",
            refused.to_string(),
        )),
        Err(UndrainRefused::Stopping) => Err(stopping()),
    }
}

/// The Prometheus metrics, in the OpenMetrics text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "node",
    responses(
        (status = 200, description = "The metrics (OpenMetrics text)", body = String,
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    )
)]
pub(crate) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.call.metrics.render(),
    )
        .into_response()
}

/// The answer of `GET /api/nodes`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NodeList {
    /// The roster, by id.
    nodes: Vec<NodeRecord>,
}

/// `GET /api/nodes`: the cluster's roster, `{"nodes":[{"id","admin_url","version",
/// "started_at","heartbeat_at","state","live_calls"}]}` by ID (with SQLite, this node only).
#[utoipa::path(
    get,
    path = "/api/nodes",
    tag = "node",
    responses(
        (status = 200, description = "The nodes (with SQLite, this node only)", body = NodeList),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn nodes(State(shared): State<Arc<Shared>>) -> Result<Json<NodeList>, ApiError> {
    let nodes = read_roster(&shared)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(ApiError::store)?;
    Ok(Json(NodeList { nodes }))
}

/// The roster as the store has it now (nodes silent for `node_timeout` marked so), read on the
/// blocking pool: the roster's connection is shared, readers take turns on it.
pub(super) async fn read_roster(
    shared: &Arc<Shared>,
) -> Result<Result<Vec<callgate_store::NodeRecord>, callgate_store::Error>, tokio::task::JoinError>
{
    let timeout = shared.config.node_timeout;
    let read = shared.clone();
    shared
        .call
        .tasks
        .spawn_blocking(move || {
            let mut roster = read
                .roster
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            roster.nodes(timeout, UnixMillis::now())
        })
        .await
}
