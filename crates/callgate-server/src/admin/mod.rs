//! The admin HTTP API (axum): health, metrics, call records, and operator actions on live calls.
//! Every error is JSON: `{"error": "<message>", "code": "<stable_code>"}`.
//!
//! Every request is bounded before a handler runs: its body ([`MAX_BODY_BYTES`], or
//! [`MAX_PLAY_BYTES`] for `POST /play`; a larger `Content-Length` is a 413 at once, a longer
//! chunked body a 413 when it is read) and its call id ([`ValidId`]: a malformed one is a 400
//! before any lookup).
//!
//! # Described by its own types
//! [`endpoints`] is the one table of the API: each handler carries its `#[utoipa::path]`
//! (method, path, parameters, bodies, answers) and is registered through `utoipa_axum`'s
//! `routes!`, which adds it to the router and to the OpenAPI document together, so no route
//! is served without being described ([`openapi`] serves the document). Request bodies,
//! query strings and JSON answers are typed structs deriving `ToSchema`/`IntoParams`; the
//! fields of each answer are in alphabetical order, so its bytes are those of the `json!`
//! maps they replaced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use callgate_audio::{AudioFormat, Resampler, pcm};
use callgate_proto::{Command, Digit, DtmfDuration, EndReason, Error as ProtoError};
use callgate_store::{
    CallFilter, CallId, CallRecord, EventRecord, NodeRecord, Page, TextMatch, TranscriptEntry,
    UnixMillis,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod console;
pub(crate) mod error;
pub(crate) mod failures;
pub mod forward;
pub(crate) mod http_guard;
mod openapi;
pub(crate) mod session;
mod webhooks;

use self::error::json_errors;
pub(crate) use self::error::{ApiError, ErrorBody};
use self::session::Denied;
use crate::auth::{Refusal, Role};
use crate::live::{Mailbox, Operator, Refused, Reply, Request as CallRequest};
use crate::{Control, Phase, Shared, UndrainRefused};

/// Default number of records `GET /api/calls` returns.
pub(crate) const DEFAULT_LIMIT: u32 = 50;
/// The most records one `GET /api/calls` returns.
pub(crate) const MAX_LIMIT: u32 = 1000;
/// The longest an admin request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest WAV `POST /api/calls/{id}/play` takes (about 17 minutes of 16 kHz mono).
pub(crate) const MAX_PLAY_BYTES: usize = 32 * 1024 * 1024;
/// The largest request body of every other endpoint (a DTMF request is a few dozen bytes).
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// DTMF tone length when the request gives none.
pub(crate) const DEFAULT_DTMF_MS: u64 = 200;

/// Every endpoint the admin port serves, each with its description: the one table the router
/// and the OpenAPI document are both built from. A handler joins it only through `routes!`,
/// which needs its `#[utoipa::path]`; handlers sharing a path go in one `routes!`.
pub(crate) fn endpoints() -> OpenApiRouter<Arc<Shared>> {
    let small = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(drain))
        .routes(routes!(undrain))
        .routes(routes!(metrics))
        .routes(routes!(nodes))
        .routes(routes!(crate::events::stream))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(openapi::document))
        .routes(routes!(list_calls))
        .routes(routes!(call, delete_call))
        .routes(routes!(events))
        .routes(routes!(transcript))
        .routes(routes!(hangup))
        .routes(routes!(dtmf))
        .routes(routes!(clear))
        .routes(routes!(recording))
        .routes(routes!(message))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(MAX_BODY_BYTES, body_limit));
    let play = OpenApiRouter::new()
        .routes(routes!(play))
        .layer(DefaultBodyLimit::max(MAX_PLAY_BYTES))
        .layer(middleware::from_fn_with_state(MAX_PLAY_BYTES, body_limit));
    small.merge(play).merge(console::routes())
}

/// The routes the admin port serves (with their fallbacks) and the document describing them;
/// [`router`] only adds layers, which serve no route of their own.
fn served() -> (Router<Arc<Shared>>, utoipa::openapi::OpenApi) {
    let (api, document) = endpoints().split_for_parts();
    let api = api
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    (api, document)
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let (api, document) = served();
    api.layer(Extension(openapi::Document::new(document)))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            forward::layer,
        ))
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(middleware::from_fn(request_timeout))
        .layer(middleware::map_response(json_errors))
        .with_state(shared)
}

/// Bearer tokens or the console's session cookie (when tokens are configured): reading needs
/// `read`, acting on calls (and drain, undrain) `operator`; `/healthz` and `/readyz` stay open
/// for load balancers, the console's page and sign-in for browsers. Browser requests from
/// other sites are refused whatever the configuration ([`session`]). A request
/// forwarded by another node is `operator` with the cluster secret, refused without it.
///
/// A client whose credentials were refused [`failures::MAX_FAILURES`] times within a
/// minute gets `429 too_many_failures` for any request that needs one until that minute ends
/// ([`failures`]); every `401` answered here (a token, a console sign-in, a cluster
/// secret) counts.
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<failures::Peer>>()
        .map(|peer| failures::client(peer.0.0.ip()));
    let guarded = client.filter(|_| needs_credential(&shared, &request));
    let now = tokio::time::Instant::now();
    if let Some(client) = guarded {
        let checked = shared
            .auth_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .check(client, now);
        if let Err(retry_after) = checked {
            shared
                .metrics
                .admin_refused
                .get_or_create(&[("reason", "too_many_failures")])
                .inc();
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                format!(
                    "too many refused credentials from this address: try again in {} s",
                    retry_after.as_secs().max(1)
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after.as_secs().max(1)),
            );
            return response;
        }
    }
    let response = check_and_run(shared.clone(), request, next).await;
    let refused = response.status() == StatusCode::UNAUTHORIZED;
    if let Some(client) = guarded
        && refused
    {
        tracing::debug!(%client, "Admin credentials refused.");
        shared
            .auth_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed(client, now);
    }
    response
}

/// Whether `request` presents (or must present) a credential: a cluster secret, a console
/// sign-in, or anything but the open paths while tokens are configured.
fn needs_credential(shared: &Shared, request: &Request) -> bool {
    let path = request.uri().path();
    request.headers().contains_key(forward::TOKEN_HEADER)
        || (path == "/api/session" && request.method() == axum::http::Method::POST)
        || (shared.admin_auth.current().is_enabled()
            && !matches!(path, "/healthz" | "/readyz")
            && !console::is_open(path))
}

/// [`authorize`]'s checks, then the handler.
async fn check_and_run(shared: Arc<Shared>, mut request: Request, next: Next) -> Response {
    if request.headers().contains_key(forward::TOKEN_HEADER) {
        return forward::accept(&shared, request, next).await;
    }
    let auth = shared.admin_auth.current();
    let open = is_open(request.uri().path());
    let needed = role_needed(request.method());
    let checked = if open {
        Ok(None)
    } else if !auth.is_enabled() {
        session::check_origin(request.headers(), false).map(|()| None)
    } else {
        session::authenticate(
            &shared.sessions,
            &auth,
            request.headers(),
            request.method(),
            needed,
            tokio::time::Instant::now(),
        )
        .map(Some)
    };
    let denied = match checked {
        Ok(identity) => {
            if let Some(identity) = identity {
                tracing::debug!(token = identity.name, method = %request.method(), "Admin request.");
                // Who asked, for the owner's log when the request is forwarded.
                request
                    .extensions_mut()
                    .insert(forward::Caller(identity.name));
            }
            return next.run(request).await;
        }
        Err(denied) => denied,
    };
    let (status, code, message, reason) = match denied {
        Denied::Auth(Refusal::Unauthenticated) => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer` token (or console session) is needed",
            "unauthenticated",
        ),
        Denied::Auth(Refusal::Forbidden) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token's role may not do this (acting on calls needs `operator`)",
            "forbidden",
        ),
        Denied::CrossSite => (
            StatusCode::FORBIDDEN,
            "cross_site",
            "a browser request from another site (or a change by session cookie with no \
             Origin) is refused",
            "cross_site",
        ),
    };
    shared
        .metrics
        .admin_refused
        .get_or_create(&[("reason", reason)])
        .inc();
    let mut response = ApiError::new(status, code, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Whether `path` is served without credentials: the probes for load balancers, the console's
/// page, assets and sign-in. (Also what the OpenAPI document says of each path.)
pub(crate) fn is_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz") || console::is_open(path)
}

/// The role a request needs when tokens are configured: reading `read`, anything else
/// `operator`.
pub(crate) fn role_needed(method: &axum::http::Method) -> Role {
    match *method {
        axum::http::Method::GET | axum::http::Method::HEAD => Role::Read,
        _ => Role::Operator,
    }
}

/// A request whose `Content-Length` is over the endpoint's `limit` gets a 413 before anything
/// reads its body (a chunked body is cut at the limit by `DefaultBodyLimit` when read). The
/// 413 closes the connection (`Connection: close`): the rest of the body is never read as a
/// request, and the connection lingers while the client sends it (`http_guard`).
async fn body_limit(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut response = match length {
        Some(n) if n > limit as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body ({n} bytes) is over this endpoint's limit of {limit} bytes"),
        )
        .into_response(),
        _ => next.run(request).await,
    };
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A call id from the path (`{id}`), checked before anything looks it up: a UUIDv7, as the
/// store makes them. Anything else is a 400 `bad_call_id`.
#[derive(IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
struct ValidId(
    /// The call's id (a UUIDv7, as `GET /api/calls` lists them).
    CallId,
);

/// The most of a malformed id shown back in the error.
const MAX_ID_SHOWN: usize = 64;

impl<S: Send + Sync> FromRequestParts<S> for ValidId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
        let text = params
            .iter()
            .find(|(name, _)| name == "id")
            .map_or("", |(_, value)| value.as_str());
        CallId::parse(text)
            .map(Self)
            .ok_or_else(|| bad_call_id("call id", text))
    }
}

/// The 400 for text that is not a call id.
fn bad_call_id(what: &str, text: &str) -> ApiError {
    let shown: String = text.chars().take(MAX_ID_SHOWN).collect();
    let cut = if shown.len() < text.len() { "..." } else { "" };
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_call_id",
        format!(
            "{what} {shown:?}{cut} is not a call id (a UUIDv7 such as \
             0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192)"
        ),
    )
}

async fn request_timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("request took longer than {REQUEST_TIMEOUT:?}"),
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

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
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let phase = shared.phase.load();
    let (status, word) = match phase {
        Phase::Serving => (StatusCode::OK, HealthStatus::Ok),
        Phase::Draining { .. } => (StatusCode::OK, HealthStatus::Draining),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, HealthStatus::Stopping),
    };
    let body = Health {
        live_calls: shared.live.len(),
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
            live_calls: shared.live.len(),
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
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
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
async fn drain(State(shared): State<Arc<Shared>>) -> Result<Json<PhaseBody>, ApiError> {
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
async fn undrain(State(shared): State<Arc<Shared>>) -> Result<Json<PhaseBody>, ApiError> {
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
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
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
async fn nodes(State(shared): State<Arc<Shared>>) -> Result<Json<NodeList>, ApiError> {
    let timeout = shared.config.node_timeout;
    let read = shared.clone();
    let nodes = shared
        .tasks
        .spawn_blocking(move || {
            let mut roster = read
                .roster
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            roster.nodes(timeout, UnixMillis::now())
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(ApiError::store)?;
    Ok(Json(NodeList { nodes }))
}

/// The query string of `GET /api/calls`. Each value is kept as its text and parsed by the
/// handler, so that a bad one is refused with its own code and names what it takes; the
/// document shows the type each one takes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CallsQuery {
    /// How many records, 1 to 1000 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Only calls taken by this route.
    route: Option<String>,
    /// Only calls handled by this agent.
    agent: Option<String>,
    /// Only calls of this protocol (`callbridge`, `inbound`).
    protocol: Option<String>,
    /// Only calls that ended for this reason (`operator_hangup`...).
    end_reason: Option<String>,
    /// The page after this call: the `next` of the previous page.
    #[param(value_type = Option<CallId>)]
    before: Option<String>,
    /// `true`: only calls not ended yet.
    #[param(value_type = Option<bool>)]
    live: Option<String>,
    /// Only calls held by this node (its `node_id`).
    node: Option<String>,
    /// Only calls started at or after this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<String>,
    /// Only calls started before this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    until: Option<String>,
    /// Only calls from this number, or from numbers starting with the text before a trailing
    /// `*`.
    caller: Option<String>,
    /// Only calls to this number, or to numbers starting with the text before a trailing `*`.
    callee: Option<String>,
    /// Any other key, refused by name ([`refuse_unknown`]).
    #[serde(flatten)]
    #[param(ignore)]
    unknown: BTreeMap<String, String>,
}

/// The answer of `GET /api/calls`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CallList {
    /// The records, newest first, as the store holds them (CDRs byte for byte).
    #[schema(value_type = Vec<CallRecord>)]
    calls: Vec<Box<RawValue>>,
    /// The `before` of the next page; null on the last page.
    next: Option<CallId>,
}

/// A query string refused by axum (a key given twice...): 400 `bad_query`.
pub(crate) fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", rejection.body_text())
}

/// A 400 `bad_query` naming the first key of `unknown` (the keys a query struct `Q` does not
/// have) and the keys `Q` takes, as its document lists them: a typo is refused, never
/// ignored.
pub(crate) fn refuse_unknown<Q: IntoParams>(
    unknown: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let Some(key) = unknown.keys().next() else {
        return Ok(());
    };
    let known: Vec<String> = Q::into_params(|| None)
        .into_iter()
        .map(|p| p.name)
        .collect();
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_query",
        format!(
            "unknown query parameter {key:?} (known: {})",
            known.join(", ")
        ),
    ))
}

/// The call records, newest first, filtered and paged.
#[utoipa::path(
    get,
    path = "/api/calls",
    tag = "calls",
    params(CallsQuery),
    responses(
        (status = 200, description = "One page of records", body = CallList),
        (status = 400, description = "`bad_query`, `bad_limit` or `bad_call_id` (`before`)",
            body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn list_calls(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<CallsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    refuse_unknown::<CallsQuery>(&query.unknown)?;
    let limit = limit(query.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let filter = CallFilter {
        limit,
        route: query.route,
        agent: query.agent,
        protocol: query.protocol,
        end_reason: query.end_reason,
        before: match query.before {
            None => None,
            Some(text) => Some(CallId::parse(&text).ok_or_else(|| bad_call_id("before", &text))?),
        },
        live: match query.live.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(bad_filter("live", other, "true or false")),
        },
        node: match query.node {
            None => None,
            Some(node) => {
                crate::config::check_node_id(&node)
                    .map_err(|problem| bad_filter("node", &node, &problem.to_string()))?;
                Some(node)
            }
        },
        since: time_filter(query.since.as_deref(), "since")?,
        until: time_filter(query.until.as_deref(), "until")?,
        caller: text_filter(query.caller.as_deref(), "caller")?,
        callee: text_filter(query.callee.as_deref(), "callee")?,
        // Records hold up to a few MiB each: read no more than the reply can hold.
        max_bytes: Some(MAX_LIST_BYTES as u64),
    };
    let calls = shared
        .store
        .list_calls(filter)
        .await
        .map_err(ApiError::store)?;
    // Serialised on the blocking pool (records hold up to a few MiB of the phone's text each),
    // straight from the records so CDRs stay byte-exact, and cut at MAX_LIST_BYTES.
    let body = shared
        .tasks
        .spawn_blocking(move || list_body(calls, limit))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A 400 `bad_query` naming the filter, its value and what it takes.
fn bad_filter(key: &str, value: &str, takes: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_query",
        format!("invalid {key} {value:?}: {takes}"),
    )
}

/// `since=` / `until=`: an RFC 3339 time.
fn time_filter(text: Option<&str>, key: &str) -> Result<Option<UnixMillis>, ApiError> {
    text.map(|text| {
        UnixMillis::parse_rfc3339(text).ok_or_else(|| {
            bad_filter(
                key,
                text,
                "an RFC 3339 time, like 2026-11-21T10:49:53Z or 2026-11-21T19:49:53+09:00",
            )
        })
    })
    .transpose()
}

/// `caller=` / `callee=`: the number, or a prefix with a trailing `*`.
fn text_filter(text: Option<&str>, key: &str) -> Result<Option<TextMatch>, ApiError> {
    text.map(|text| {
        if text.chars().any(char::is_control) {
            return Err(bad_filter(key, text, "no control characters"));
        }
        TextMatch::parse(text).ok_or_else(|| {
            bad_filter(
                key,
                text,
                "a number, or a prefix followed by one trailing `*`",
            )
        })
    })
    .transpose()
}

/// The most bytes one `GET /api/calls` reply holds (at least one record, whatever its size);
/// the rest is on the next page.
pub(crate) const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;

/// `{"calls":[...],"next":ID|null}`: `next` is set when the page is full or was cut at
/// [`MAX_LIST_BYTES`].
fn list_body(calls: Vec<CallRecord>, limit: u32) -> Result<String, ApiError> {
    let internal = |e: serde_json::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    let full = calls.len() == limit as usize;
    // The reply's length so far: `{"calls":[`, the records and their commas.
    let mut size = r#"{"calls":["#.len();
    let mut kept = Vec::with_capacity(calls.len());
    let mut last = None;
    let mut cut = false;
    for call in calls {
        let json = serde_json::value::to_raw_value(&call).map_err(internal)?;
        if !kept.is_empty() && size + json.get().len() > MAX_LIST_BYTES {
            cut = true;
            break;
        }
        size += json.get().len() + usize::from(!kept.is_empty());
        kept.push(json);
        last = Some(call.id);
    }
    let list = CallList {
        calls: kept,
        next: last.filter(|_| cut || full),
    };
    serde_json::to_string(&list).map_err(internal)
}

fn no_call(id: &CallId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "call_not_found",
        format!("no call with id {:?}", id.as_str()),
    )
}

/// The record of call `id`, or a 404.
async fn find(shared: &Shared, id: &CallId) -> Result<CallRecord, ApiError> {
    shared
        .store
        .call(id.clone())
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(id))
}

/// One call's record.
#[utoipa::path(
    get,
    path = "/api/calls/{id}",
    tag = "calls",
    params(ValidId),
    responses(
        (status = 200, description = "The record", body = CallRecord),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn call(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<CallRecord>, ApiError> {
    let record = find(&shared, &id).await?;
    Ok(Json(record))
}

/// The answer of an operator action: the call and what was done.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Done {
    /// The call.
    id: CallId,
    /// What was done.
    status: DoneStatus,
}

/// What an operator action did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DoneStatus {
    /// The record, events, transcript and files are gone.
    Deleted,
    /// The call was told to hang up.
    HangupSent,
}

/// Deletes an ended call: its record, events, transcript and recording.
#[utoipa::path(
    delete,
    path = "/api/calls/{id}",
    tag = "calls",
    params(ValidId),
    responses(
        (status = 200, description = "Deleted", body = Done,
            example = json!({"id": "0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192", "status": "deleted"})),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_live`: hang it up first", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn delete_call(
    State(shared): State<Arc<Shared>>,
    ValidId(call_id): ValidId,
) -> Result<Json<Done>, ApiError> {
    let id = call_id.as_str();
    if shared.live.get(&call_id).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "call_live",
            format!(
                "call {id:?} is live (or still finishing): hang it up first, or retry in a moment"
            ),
        ));
    }
    let deleted = shared
        .store
        .delete_call(call_id.clone())
        .await
        .map_err(ApiError::store)?;
    if !deleted {
        return Err(no_call(&call_id));
    }
    crate::retention::delete_files(&shared.config.data_dir, &call_id).await;
    tracing::info!(call_id = %id, "Call record deleted by an operator.");
    Ok(Json(Done {
        id: call_id,
        status: DoneStatus::Deleted,
    }))
}

/// The most entries one page of an event log or transcript holds.
pub(crate) const MAX_PAGE: u32 = 1000;

/// The query string of an event log or transcript page (kept as text: see [`CallsQuery`]).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// The page after this sequence number: the `next` of the previous page (default 0).
    #[param(value_type = Option<u64>)]
    after: Option<String>,
    /// How many entries, 1 to 1000 (default 1000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Any other key, refused by name ([`refuse_unknown`]).
    #[serde(flatten)]
    #[param(ignore)]
    unknown: BTreeMap<String, String>,
}

/// `?after=SEQ&limit=N` of an event log or transcript (anything else is a 400).
fn page(query: Result<Query<PageQuery>, QueryRejection>) -> Result<Page, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    refuse_unknown::<PageQuery>(&query.unknown)?;
    let after = match query.after {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_after",
                format!("after must be a sequence number, got {text:?}"),
            )
        })?,
    };
    let limit = limit(query.limit.as_deref(), MAX_PAGE, MAX_PAGE)?;
    Ok(Page { after, limit })
}

/// `?limit=N`: `default` when absent, else a whole number from 1 to `max` (else a 400).
pub(crate) fn limit(text: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match text.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit must be a whole number from 1 to {max}, got {text:?}"),
        )),
    }
}

/// The cursor of the page after `seqs` (`?after=`), when this page is full.
fn next_after(page: Page, last: Option<u64>, len: usize) -> Option<u64> {
    (len == page.limit as usize).then_some(last).flatten()
}

/// A JSON reply built on the blocking pool: a page holds up to a few MiB of the phone's text
/// (1,000 entries of up to 4 KiB), tens of milliseconds of an async worker in a debug build.
async fn json_off_workers<T: Serialize>(
    shared: &Shared,
    build: impl FnOnce() -> T + Send + 'static,
) -> Result<Response, ApiError> {
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let body = shared
        .tasks
        .spawn_blocking(move || serde_json::to_vec(&build()))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// One page of a call's event log.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventsPage {
    /// The events, oldest first.
    events: Vec<EventRecord>,
    /// The call.
    id: CallId,
    /// The `after` of the next page; null on the last page.
    next: Option<u64>,
}

/// A call's event log (`call.started`, DTMF, flow steps, the end...), one page at a time.
#[utoipa::path(
    get,
    path = "/api/calls/{id}/events",
    tag = "calls",
    params(ValidId, PageQuery),
    responses(
        (status = 200, description = "One page of the event log", body = EventsPage),
        (status = 400, description = "`bad_call_id`, `bad_query`, `bad_after` or `bad_limit`",
            body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn events(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = page(query)?;
    let events = shared
        .store
        .events(id.clone(), page)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(&id))?;
    let next = next_after(page, events.last().map(|e| e.seq), events.len());
    json_off_workers(&shared, move || EventsPage { events, id, next }).await
}

/// One page of a call's transcript.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TranscriptPage {
    /// The turns, in order.
    entries: Vec<TranscriptEntry>,
    /// The call.
    id: CallId,
    /// The `after` of the next page; null on the last page.
    next: Option<u64>,
    /// The agent's usage (tokens, audio seconds...) as stored, or null.
    #[schema(value_type = Option<Object>)]
    usage: Option<Box<RawValue>>,
}

/// A call's transcript: each finished turn of the caller and the agent, on the call's clock.
#[utoipa::path(
    get,
    path = "/api/calls/{id}/transcript",
    tag = "calls",
    params(ValidId, PageQuery),
    responses(
        (status = 200, description = "One page of the transcript", body = TranscriptPage),
        (status = 400, description = "`bad_call_id`, `bad_query`, `bad_after` or `bad_limit`",
            body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn transcript(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = page(query)?;
    let entries = shared
        .store
        .transcript(id.clone(), page)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(&id))?;
    let next = next_after(page, entries.last().map(|e| e.seq), entries.len());
    let record = find(&shared, &id).await?;
    json_off_workers(&shared, move || TranscriptPage {
        entries,
        id,
        next,
        usage: record.usage,
    })
    .await
}

/// The operator mailbox of live call `id`: 404 for an unknown call, 409 for one that ended.
async fn live_mailbox(shared: &Shared, id: &CallId) -> Result<Arc<Mailbox>, ApiError> {
    if let Some(mailbox) = shared.live.get(id) {
        return Ok(mailbox);
    }
    let exists = shared
        .store
        .call(id.clone())
        .await
        .map_err(ApiError::store)?
        .is_some();
    Err(if exists {
        ApiError::new(
            StatusCode::CONFLICT,
            "call_not_live",
            format!("call {:?} has ended", id.as_str()),
        )
    } else {
        no_call(id)
    })
}

/// Sends a request to a live call's task and waits for its answer.
async fn act(shared: &Shared, call_id: &CallId, request: CallRequest) -> Result<Reply, ApiError> {
    let tx = live_mailbox(shared, call_id).await?;
    let id = call_id.as_str();
    let gone = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "call_not_live",
            format!("call {id:?} has ended"),
        )
    };
    let (reply, verdict) = oneshot::channel();
    tx.post(Operator { request, reply })
        .map_err(|refused| match refused {
            Refused::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "call_busy",
                format!("call {id:?} has too many operator requests waiting"),
            ),
            Refused::Closed => gone(),
        })?;
    match verdict.await.map_err(|_| gone())? {
        Ok(reply) => Ok(reply),
        Err(e @ ProtoError::Unsupported { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "unsupported",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "call_not_live",
            e.to_string(),
        )),
    }
}

/// Hangs up a live call (its end reason: `operator_hangup`).
#[utoipa::path(
    post,
    path = "/api/calls/{id}/hangup",
    tag = "actions",
    params(ValidId),
    responses(
        (status = 200, description = "The call was told to hang up", body = Done,
            example = json!({"id": "0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192", "status": "hangup_sent"})),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live`", body = ErrorBody),
        (status = 421, description = "`call_on_other_node`", body = ErrorBody),
        (status = 502, description = "`node_unreachable` or `cluster_token_refused`", body = ErrorBody),
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
async fn hangup(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<Done>, ApiError> {
    act(
        &shared,
        &id,
        CallRequest::Command(Command::Hangup(EndReason::OperatorHangup)),
    )
    .await?;
    Ok(Json(Done {
        id,
        status: DoneStatus::HangupSent,
    }))
}

/// The body of `POST /api/calls/{id}/dtmf`. Other fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct DtmfRequest {
    /// The digit to send: one of 0-9, `*`, `#`.
    #[schema(required = true, value_type = String, pattern = "^[0-9*#]$", example = "5")]
    digit: Option<String>,
    /// The tone's length, ms, 1 to 1000 (default 200).
    #[schema(minimum = 1, maximum = 1000, default = 200)]
    duration: Option<u64>,
}

/// The answer of `POST /api/calls/{id}/dtmf`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DtmfSent {
    /// The digit sent.
    digit: String,
    /// Its length, ms.
    duration: u16,
    /// The call.
    id: CallId,
    /// `dtmf_sent`.
    status: DtmfStatus,
}

/// What `POST /api/calls/{id}/dtmf` did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DtmfStatus {
    /// The call was told to send the digit.
    DtmfSent,
}

/// Sends a DTMF digit to the phone of a live inbound call.
#[utoipa::path(
    post,
    path = "/api/calls/{id}/dtmf",
    tag = "actions",
    params(ValidId),
    request_body = DtmfRequest,
    responses(
        (status = 200, description = "The call was told to send the digit", body = DtmfSent),
        (status = 400, description = "`bad_call_id` or `bad_json`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live` or `unsupported` (CallBridge has no DTMF)",
            body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 421, description = "`call_on_other_node`", body = ErrorBody),
        (status = 422, description = "`missing_field`, `invalid_digit` or `invalid_duration`",
            body = ErrorBody),
        (status = 502, description = "`node_unreachable` or `cluster_token_refused`", body = ErrorBody),
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
async fn dtmf(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    body: Bytes,
) -> Result<Json<DtmfSent>, ApiError> {
    let bad =
        |code, message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("body is not JSON: {e}"),
        )
    })?;
    let bad_duration = || {
        bad(
            "invalid_duration",
            format!(
                "invalid DTMF duration {} (must be a whole number of ms, 1..=1000)",
                body.get("duration").unwrap_or(&Value::Null)
            ),
        )
    };
    let missing = || bad("missing_field", "missing digit".into());
    if !body.is_object() {
        return Err(missing());
    }
    let request: DtmfRequest =
        serde_path_to_error::deserialize(&body).map_err(|e| match e.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) if key == "digit" => {
                bad("invalid_digit", "digit must be a string".into())
            }
            Some(serde_path_to_error::Segment::Map { key }) if key == "duration" => bad_duration(),
            _ => missing(),
        })?;
    let digit_text = request.digit.ok_or_else(missing)?;
    let digit = Digit::parse_sendable(&digit_text).ok_or_else(|| {
        bad(
            "invalid_digit",
            format!("invalid DTMF digit {digit_text:?} (allowed: 0-9 * #)"),
        )
    })?;
    let duration = DtmfDuration::from_millis(request.duration.unwrap_or(DEFAULT_DTMF_MS))
        .ok_or_else(bad_duration)?;
    act(
        &shared,
        &id,
        CallRequest::Command(Command::Dtmf { digit, duration }),
    )
    .await?;
    Ok(Json(DtmfSent {
        digit: digit.to_string(),
        duration: duration.as_millis(),
        id,
        status: DtmfStatus::DtmfSent,
    }))
}

/// The answer of `POST /api/calls/{id}/play`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Played {
    /// The call.
    id: CallId,
    /// How much audio was queued, ms (it plays after what is queued already).
    queued_ms: u64,
}

/// Plays a WAV file (PCM, mono or stereo, 8 to 192 kHz, up to 600 s) to the phone of a live
/// call, after the operator audio already queued.
#[utoipa::path(
    post,
    path = "/api/calls/{id}/play",
    tag = "actions",
    params(ValidId),
    request_body(content = inline(Wav), content_type = "audio/wav",
        description = "A PCM WAV file (up to 32 MiB)"),
    responses(
        (status = 200, description = "Queued", body = Played),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live` or `queue_full`", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 415, description = "`bad_wav`", body = ErrorBody),
        (status = 421, description = "`call_on_other_node`", body = ErrorBody),
        (status = 422, description = "`bad_rate`, `too_long` or `empty_wav`", body = ErrorBody),
        (status = 502, description = "`node_unreachable` or `cluster_token_refused`", body = ErrorBody),
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
async fn play(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    body: Bytes,
) -> Result<Json<Played>, ApiError> {
    // The call first: no work for a call that is not there.
    let format = live_mailbox(&shared, &id).await?.format();
    // Decoding and resampling are CPU work proportional to the body: off the async workers
    // and off the call task.
    let audio = shared
        .tasks
        .spawn_blocking(move || operator_audio(&body, format))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    match act(&shared, &id, CallRequest::Play { audio }).await? {
        Reply::Queued { ms } => Ok(Json(Played { id, queued_ms: ms })),
        // A live call: `call_not_live` would send the operator away.
        Reply::QueueFull => Err(ApiError::new(
            StatusCode::CONFLICT,
            "queue_full",
            format!(
                "call {id:?} already holds {} minutes of operator audio; play more once some \
                 of it has played",
                crate::media::MAX_OPERATOR_MS / 60_000
            ),
        )),
        other => Err(unexpected(other)),
    }
}

/// The bytes of a WAV file, as the body of `play` and the answer of `recording` and
/// `messages`: a type for the document only (those bodies are read and written as bytes).
pub(crate) enum Wav {}

impl utoipa::PartialSchema for Wav {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .content_media_type("audio/wav")
            .description(Some("A WAV file (RIFF, PCM)"))
            .into()
    }
}

impl ToSchema for Wav {}

/// Sample rates a played WAV may have (a 1 Hz file would be resampled 8000-fold).
const PLAY_RATES: std::ops::RangeInclusive<u32> = 8000..=192_000;
/// The longest WAV one request plays.
const MAX_PLAY_SECONDS: u64 = 600;

/// A WAV body as audio in the phone's format, or why not.
fn operator_audio(body: &[u8], format: AudioFormat) -> Result<bytes::Bytes, ApiError> {
    let bad_wav = |e: callgate_audio::Error| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_wav",
            format!("body is not a PCM WAV file: {e}"),
        )
    };
    let reader = hound::WavReader::new(std::io::Cursor::new(body))
        .map_err(|e| bad_wav(callgate_audio::Error::from(e)))?;
    let rate = reader.spec().sample_rate;
    if !PLAY_RATES.contains(&rate) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_rate",
            format!(
                "the WAV's sample rate {rate} Hz is outside {}..={} Hz",
                PLAY_RATES.start(),
                PLAY_RATES.end()
            ),
        ));
    }
    let frames = reader.duration();
    if u64::from(frames) > u64::from(rate) * MAX_PLAY_SECONDS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_long",
            format!("the WAV lasts longer than {MAX_PLAY_SECONDS} s"),
        ));
    }
    let audio = callgate_audio::wav::read_mono_limited(reader, u64::from(rate) * MAX_PLAY_SECONDS)
        .map_err(bad_wav)?;
    if audio.samples.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_wav",
            "the WAV file has no audio",
        ));
    }
    let internal = |e: callgate_audio::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    let mut resampler = Resampler::new(audio.rate, format.sample_rate()).map_err(internal)?;
    let mut out = Vec::new();
    resampler.process(&audio.samples, &mut out);
    resampler.flush(&mut out);
    Ok(pcm::encode(format, &out))
}

/// The answer of `POST /api/calls/{id}/clear`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Cleared {
    /// Audio dropped from the queue, ms.
    dropped_ms: u64,
    /// The call.
    id: CallId,
    /// Audio of the operator's that had played, ms.
    played_ms: u64,
}

/// Drops the operator audio queued for a live call (what is playing stops).
#[utoipa::path(
    post,
    path = "/api/calls/{id}/clear",
    tag = "actions",
    params(ValidId),
    responses(
        (status = 200, description = "Cleared", body = Cleared),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live`", body = ErrorBody),
        (status = 421, description = "`call_on_other_node`", body = ErrorBody),
        (status = 502, description = "`node_unreachable` or `cluster_token_refused`", body = ErrorBody),
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
async fn clear(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<Cleared>, ApiError> {
    match act(&shared, &id, CallRequest::Clear).await? {
        Reply::Cleared {
            dropped_ms,
            played_ms,
        } => Ok(Json(Cleared {
            dropped_ms,
            id,
            played_ms,
        })),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: Reply) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected answer from the call: {reply:?}"),
    )
}

/// The call's stereo recording (caller left, agent right), a WAV file; answers `Range`
/// requests (206, 416) so players can seek.
#[utoipa::path(
    get,
    path = "/api/calls/{id}/recording",
    tag = "calls",
    params(
        ValidId,
        ("Range" = Option<String>, Header, description = "One byte range, `bytes=first-last`, `bytes=first-` or `bytes=-suffix`"),
    ),
    responses(
        (status = 200, description = "The whole WAV file", body = inline(Wav), content_type = "audio/wav"),
        (status = 206, description = "The range asked for", body = inline(Wav), content_type = "audio/wav",
            headers(("Content-Range" = String, description = "`bytes first-last/length`"))),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found` or `no_recording`", body = ErrorBody),
        (status = 416, description = "The range starts past the end",
            headers(("Content-Range" = String, description = "`bytes */length`"))),
        (status = 421, description = "`call_on_other_node`", body = ErrorBody),
        (status = 502, description = "`node_unreachable` or `cluster_token_refused`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn recording(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let record = find(&shared, &id).await?;
    let not_recorded = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_recording",
            format!("call {:?} has no recording", id.as_str()),
        )
    };
    if !record.recording {
        return Err(not_recorded());
    }
    let path =
        crate::media::recording_path(&shared.config.data_dir.join("recordings"), id.as_str());
    let data = tokio::fs::read(&path).await.map_err(|_| not_recorded())?;
    Ok(console::ranged(&headers, data.into(), "audio/wav"))
}

/// Whether `file` can name a flow's message: a step's name (A-Z a-z 0-9 - _) and `.wav`.
pub(crate) fn message_name(file: &str) -> bool {
    file.strip_suffix(".wav").is_some_and(|stem| {
        !stem.is_empty()
            && stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// A message a flow's `record` step left: `DATA_DIR/messages/{id}/{file}` (`file` is a step's
/// name and `.wav`, as listed in the call's `flow_step` events).
#[utoipa::path(
    get,
    path = "/api/calls/{id}/messages/{file}",
    tag = "calls",
    params(
        ValidId,
        ("file" = String, Path, description = "The `record` step's name and `.wav`",
            pattern = "^[A-Za-z0-9_-]+\\.wav$", example = "voicemail.wav"),
    ),
    responses(
        (status = 200, description = "The message, a WAV file", body = inline(Wav), content_type = "audio/wav"),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found` or `no_message`", body = ErrorBody),
        (status = 421, description = "`call_on_other_node`", body = ErrorBody),
        (status = 502, description = "`node_unreachable` or `cluster_token_refused`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
async fn message(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    Path((_, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let no_message = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_message",
            format!("call {:?} has no message {file:?}", id.as_str()),
        )
    };
    if !message_name(&file) {
        return Err(no_message());
    }
    // The call must exist: its id then names a directory the server wrote (no path tricks).
    let record = find(&shared, &id).await?;
    let path = shared
        .config
        .data_dir
        .join("messages")
        .join(record.id.to_string())
        .join(&file);
    let data = tokio::fs::read(&path).await.map_err(|_| no_message())?;
    Ok(([(header::CONTENT_TYPE, "audio/wav")], data).into_response())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::error::ERROR_CODES;
    use super::*;

    /// The paths the router serves, read from the router itself: axum's `Debug` of a router
    /// is the only way it lists them (its route table, path by path). Empty if that output
    /// ever changes shape, which fails the test below rather than passing it.
    fn served_paths(router: &Router<Arc<Shared>>) -> BTreeSet<String> {
        let text = format!("{router:?}");
        let routes = text
            .split_once("path_router:")
            .and_then(|(_, rest)| rest.split_once("fallback_router:"))
            .map_or("", |(routes, _)| routes);
        routes
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with('/'))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_path_the_router_serves_is_in_the_document() {
        let (router, document) = served();
        let served = served_paths(&router);
        let described: BTreeSet<String> = document.paths.paths.keys().cloned().collect();
        assert!(served.contains("/api/calls/{id}/play"), "{served:?}");
        assert!(served.contains("/api/openapi.json"), "{served:?}");
        assert!(served.contains("/"), "{served:?}");
        assert_eq!(served, described);
    }

    #[test]
    fn a_route_added_beside_the_table_is_caught() {
        let (router, document) = served();
        let router = router.route("/api/undocumented", axum::routing::get(|| async {}));
        let described: BTreeSet<String> = document.paths.paths.keys().cloned().collect();
        assert_ne!(served_paths(&router), described);
    }

    /// Every quoted code right after a status constant (`, ` or `=> `) in the admin API's
    /// source: how `ApiError::new`, the refusals and the forwarding errors name them.
    fn codes_in(source: &str) -> Vec<String> {
        let mut codes = Vec::new();
        for (i, _) in source.match_indices("StatusCode::") {
            let rest = &source[i..];
            let Some(end) = rest.find([',', '=']) else {
                continue;
            };
            let after = rest[end..].trim_start_matches([',', '=', '>']).trim_start();
            if let Some(code) = after
                .strip_prefix('"')
                .and_then(|quoted| quoted.split('"').next())
            {
                codes.push(code.to_owned());
            }
        }
        codes
    }

    #[test]
    fn every_error_code_the_source_uses_is_listed() {
        let sources = [
            include_str!("mod.rs"),
            include_str!("error.rs"),
            include_str!("console.rs"),
            include_str!("forward.rs"),
            include_str!("webhooks.rs"),
            include_str!("../events.rs"),
            include_str!("openapi.rs"),
        ];
        // The connection guard's refusals are written as `code: "..."`.
        let guard: BTreeSet<String> = include_str!("http_guard.rs")
            .match_indices("code: \"")
            .filter_map(|(i, _)| include_str!("http_guard.rs")[i + 7..].split('"').next())
            .map(str::to_owned)
            .collect();
        assert!(guard.contains("uri_too_long"), "{guard:?}");
        let listed: BTreeSet<&str> = ERROR_CODES.iter().map(|(code, _)| *code).collect();
        assert_eq!(listed.len(), ERROR_CODES.len(), "no code twice");
        let mut used: BTreeSet<String> = sources.iter().flat_map(|s| codes_in(s)).collect();
        used.extend(guard);
        assert!(used.contains("call_not_found") && used.contains("node_unreachable"));
        for code in &used {
            assert!(
                listed.contains(code.as_str()),
                "{code} is not in ERROR_CODES"
            );
        }
    }

    #[test]
    fn error_bodies_keep_their_bytes() {
        let body = ErrorBody::new("call_not_found", "no call".into());
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"call_not_found","error":"no call"}"#
        );
        let body = ErrorBody {
            node: Some("b".into()),
            state: Some(None),
            ..ErrorBody::new("node_unreachable", "gone".into())
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"node_unreachable","error":"gone","node":"b","state":null}"#
        );
    }

    #[test]
    fn the_document_lists_the_error_codes_and_security() {
        let (_, document) = served();
        let document = openapi::finish(document);
        let json = serde_json::to_value(&document).unwrap();
        let code = &json["components"]["schemas"]["ErrorBody"]["properties"]["code"];
        let listed: Vec<&str> = code["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(listed.len(), ERROR_CODES.len());
        assert!(listed.contains(&"call_not_live"));
        let hangup = &json["paths"]["/api/calls/{id}/hangup"]["post"]["security"];
        assert_eq!(
            *hangup,
            serde_json::json!([{"bearer": ["operator"]}, {"session": ["operator"]}, {}])
        );
        let calls = &json["paths"]["/api/calls"]["get"]["security"];
        assert_eq!(
            *calls,
            serde_json::json!([{"bearer": ["read"]}, {"session": ["read"]}, {}])
        );
        let health = &json["paths"]["/healthz"]["get"]["security"];
        assert_eq!(*health, serde_json::json!([{}]));
        assert_eq!(json["openapi"], "3.1.0");
    }
}
