//! The admin HTTP API (axum): health, metrics, call records, and operator actions on live calls.
//! Every error is JSON: `{"error": "<message>", "code": "<stable_code>"}`.
//!
//! Every request is bounded before a handler runs: its body ([`MAX_BODY_BYTES`], or
//! [`MAX_PLAY_BYTES`] for `POST /play`; a larger `Content-Length` is a 413 at once, a longer
//! chunked body a 413 when it is read) and its call id ([`ValidId`]: a malformed one is a 400
//! before any lookup).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use callgate_audio::{AudioFormat, Resampler, pcm};
use callgate_proto::{Command, Digit, DtmfDuration, EndReason, Error as ProtoError};
use callgate_store::{CallFilter, CallId, CallRecord, Page, TextMatch, UnixMillis};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::auth::{Refusal, Role};
use crate::live::{Mailbox, Operator, Refused, Reply, Request as CallRequest};
use crate::session::Denied;
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

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let small = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/admin/drain", post(drain))
        .route("/api/admin/undrain", post(undrain))
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(nodes))
        .route("/api/stream", get(crate::events::stream))
        .route("/api/webhooks/deliveries", get(crate::webhooks::deliveries))
        .route("/api/calls", get(list_calls))
        .route("/api/calls/{id}", get(call).delete(delete_call))
        .route("/api/calls/{id}/events", get(events))
        .route("/api/calls/{id}/transcript", get(transcript))
        .route("/api/calls/{id}/hangup", post(hangup))
        .route("/api/calls/{id}/dtmf", post(dtmf))
        .route("/api/calls/{id}/clear", post(clear))
        .route("/api/calls/{id}/recording", get(recording))
        .route("/api/calls/{id}/messages/{file}", get(message))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(MAX_BODY_BYTES, body_limit));
    let play = Router::new()
        .route("/api/calls/{id}/play", post(play))
        .layer(DefaultBodyLimit::max(MAX_PLAY_BYTES))
        .layer(middleware::from_fn_with_state(MAX_PLAY_BYTES, body_limit));
    small
        .merge(play)
        .merge(crate::console::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            crate::forward::layer,
        ))
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(middleware::from_fn(request_timeout))
        .layer(middleware::map_response(json_errors))
        .with_state(shared)
}

/// Bearer tokens or the console's session cookie (when tokens are configured): reading needs
/// `read`, acting on calls (and drain, undrain) `operator`; `/healthz` and `/readyz` stay open
/// for load balancers, the console's page and sign-in for browsers. Browser requests from
/// other sites are refused whatever the configuration ([`crate::session`]). A request
/// forwarded by another node is `operator` with the cluster secret, refused without it.
///
/// A client whose credentials were refused [`crate::failures::MAX_FAILURES`] times within a
/// minute gets `429 too_many_failures` for any request that needs one until that minute ends
/// ([`crate::failures`]); every `401` answered here (a token, a console sign-in, a cluster
/// secret) counts.
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::failures::Peer>>()
        .map(|peer| crate::failures::client(peer.0.0.ip()));
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
    if let Some(client) = guarded
        && response.status() == StatusCode::UNAUTHORIZED
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
    request.headers().contains_key(crate::forward::TOKEN_HEADER)
        || (path == "/api/session" && request.method() == axum::http::Method::POST)
        || (shared.admin_auth.current().is_enabled()
            && !matches!(path, "/healthz" | "/readyz")
            && !crate::console::is_open(path))
}

/// [`authorize`]'s checks, then the handler.
async fn check_and_run(shared: Arc<Shared>, mut request: Request, next: Next) -> Response {
    if request.headers().contains_key(crate::forward::TOKEN_HEADER) {
        return crate::forward::accept(&shared, request, next).await;
    }
    let auth = shared.admin_auth.current();
    let path = request.uri().path();
    let open = matches!(path, "/healthz" | "/readyz") || crate::console::is_open(path);
    let needed = match *request.method() {
        axum::http::Method::GET | axum::http::Method::HEAD => Role::Read,
        _ => Role::Operator,
    };
    let checked = if open {
        Ok(None)
    } else if !auth.is_enabled() {
        crate::session::check_origin(request.headers(), false).map(|()| None)
    } else {
        crate::session::authenticate(
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
                    .insert(crate::forward::Caller(identity.name));
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
struct ValidId(CallId);

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

/// The most of a non-JSON error body (axum's own rejections) kept in the JSON error.
const MAX_ERROR_TEXT: usize = 1024;

/// Every error is JSON, axum's own rejections included (a body over the limit, a path that is
/// not UTF-8, a bad query string): their text becomes the message, the status the code.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // `Connection: close` (a refused body) survives the rewrite.
    let connection = response.headers().get(header::CONNECTION).cloned();
    let body = axum::body::to_bytes(response.into_body(), MAX_ERROR_TEXT)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let mut response = ApiError::new(status, code, message).into_response();
    if let Some(value) = connection {
        response.headers_mut().insert(header::CONNECTION, value);
    }
    response
}

/// An API error: status, stable code and a message naming the problem.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn store(error: callgate_store::Error) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            error.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message, "code": self.code }));
        (self.status, body).into_response()
    }
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

/// Liveness: 200 while the process serves or drains (`status` `ok` or `draining`), 503
/// `stopping` once it is ending its calls to exit.
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let phase = shared.phase.load();
    let (status, word) = match phase {
        Phase::Serving => (StatusCode::OK, "ok"),
        Phase::Draining { .. } => (StatusCode::OK, "draining"),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
    };
    let body = json!({ "status": word, "live_calls": shared.live.len() });
    (status, Json(body)).into_response()
}

/// Readiness, for load balancers: 200 while the node takes calls, 503 while it drains or
/// stops. `{"status": "serving"|"draining"|"stopping", "exiting": bool, "live_calls": N}`.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let phase = shared.phase.load();
    let status = if phase.takes_calls() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(phase_body(&shared, phase))).into_response()
}

/// What `/readyz`, drain and undrain show.
fn phase_body(shared: &Shared, phase: Phase) -> Value {
    json!({
        "status": phase.as_str(),
        "exiting": matches!(phase, Phase::Draining { exiting: true } | Phase::Stopping),
        "live_calls": shared.live.len(),
    })
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
async fn drain(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(phase_body(&shared, phase)))
}

/// `POST /api/admin/undrain`: take calls again after a drain. Refused (409 `exiting`) once the
/// process was told to exit (SIGTERM).
async fn undrain(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let (reply, answer) = oneshot::channel();
    shared
        .control
        .send(Control::Undrain(reply))
        .await
        .map_err(|_| stopping())?;
    match answer.await.map_err(|_| stopping())? {
        Ok(phase) => {
            tracing::info!("Undrain requested through the admin API.");
            Ok(Json(phase_body(&shared, phase)))
        }
        Err(refused @ UndrainRefused::Exiting) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "exiting",
            refused.to_string(),
        )),
        Err(UndrainRefused::Stopping) => Err(stopping()),
    }
}

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

/// `GET /api/nodes`: the cluster's roster, `{"nodes":[{"id","admin_url","version",
/// "started_at","heartbeat_at","state","live_calls"}]}` by ID (with SQLite, this node only).
async fn nodes(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
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
    Ok(Json(json!({ "nodes": nodes })).into_response())
}

async fn list_calls(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    const KEYS: [&str; 12] = [
        "limit",
        "route",
        "agent",
        "protocol",
        "end_reason",
        "before",
        "live",
        "node",
        "since",
        "until",
        "caller",
        "callee",
    ];
    if let Some(key) = query.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!(
                "unknown query parameter {key:?} (known: {})",
                KEYS.join(", ")
            ),
        ));
    }
    let limit = limit(&query, DEFAULT_LIMIT, MAX_LIMIT)?;
    let filter = CallFilter {
        limit,
        route: query.get("route").cloned(),
        agent: query.get("agent").cloned(),
        protocol: query.get("protocol").cloned(),
        end_reason: query.get("end_reason").cloned(),
        before: match query.get("before") {
            None => None,
            Some(text) => Some(CallId::parse(text).ok_or_else(|| bad_call_id("before", text))?),
        },
        live: match query.get("live").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(bad_filter("live", other, "true or false")),
        },
        node: match query.get("node") {
            None => None,
            Some(node) => {
                crate::config::check_node_id(node)
                    .map_err(|problem| bad_filter("node", node, &problem.to_string()))?;
                Some(node.clone())
            }
        },
        since: time_filter(&query, "since")?,
        until: time_filter(&query, "until")?,
        caller: text_filter(&query, "caller")?,
        callee: text_filter(&query, "callee")?,
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
fn time_filter(query: &HashMap<String, String>, key: &str) -> Result<Option<UnixMillis>, ApiError> {
    query
        .get(key)
        .map(|text| {
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
fn text_filter(query: &HashMap<String, String>, key: &str) -> Result<Option<TextMatch>, ApiError> {
    query
        .get(key)
        .map(|text| {
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
    let mut body = String::from(r#"{"calls":["#);
    let mut last: Option<&CallRecord> = None;
    let mut cut = false;
    for (i, call) in calls.iter().enumerate() {
        let json = serde_json::to_string(call).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        if i > 0 && body.len() + json.len() > MAX_LIST_BYTES {
            cut = true;
            break;
        }
        if i > 0 {
            body.push(',');
        }
        body.push_str(&json);
        last = Some(call);
    }
    let full = calls.len() == limit as usize;
    let next = match last {
        Some(call) if cut || full => {
            serde_json::to_string(call.id.as_str()).unwrap_or_else(|_| "null".to_owned())
        }
        _ => "null".to_owned(),
    };
    body.push_str(r#"],"next":"#);
    body.push_str(&next);
    body.push('}');
    Ok(body)
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

async fn call(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<CallRecord>, ApiError> {
    let record = find(&shared, &id).await?;
    Ok(Json(record))
}

/// Deletes an ended call: its record, events, transcript and recording.
async fn delete_call(
    State(shared): State<Arc<Shared>>,
    ValidId(call_id): ValidId,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "id": id, "status": "deleted" })))
}

/// The most entries one page of an event log or transcript holds.
pub(crate) const MAX_PAGE: u32 = 1000;

/// `?after=SEQ&limit=N` of an event log or transcript (anything else is a 400).
fn page(query: Result<Query<HashMap<String, String>>, QueryRejection>) -> Result<Page, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    if let Some(key) = query
        .keys()
        .find(|k| !["after", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("unknown query parameter {key:?} (known: after, limit)"),
        ));
    }
    let after = match query.get("after") {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_after",
                format!("after must be a sequence number, got {text:?}"),
            )
        })?,
    };
    let limit = limit(&query, MAX_PAGE, MAX_PAGE)?;
    Ok(Page { after, limit })
}

/// `?limit=N`: `default` when absent, else a whole number from 1 to `max` (else a 400).
pub(crate) fn limit(
    query: &HashMap<String, String>,
    default: u32,
    max: u32,
) -> Result<u32, ApiError> {
    let Some(text) = query.get("limit") else {
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
async fn json_off_workers(
    shared: &Shared,
    build: impl FnOnce() -> Value + Send + 'static,
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

async fn events(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = page(query)?;
    let events = shared
        .store
        .events(id.clone(), page)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(&id))?;
    let next = next_after(page, events.last().map(|e| e.seq), events.len());
    json_off_workers(
        &shared,
        move || json!({ "id": id, "events": events, "next": next }),
    )
    .await
}

async fn transcript(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
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
    json_off_workers(
        &shared,
        move || json!({ "id": id, "entries": entries, "usage": record.usage, "next": next }),
    )
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

async fn hangup(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<Value>, ApiError> {
    act(
        &shared,
        &id,
        CallRequest::Command(Command::Hangup(EndReason::OperatorHangup)),
    )
    .await?;
    Ok(Json(json!({ "id": id, "status": "hangup_sent" })))
}

async fn dtmf(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let bad =
        |code, message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("body is not JSON: {e}"),
        )
    })?;
    let digit_text = match body.get("digit") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("invalid_digit", "digit must be a string".into())),
        None => return Err(bad("missing_field", "missing digit".into())),
    };
    let digit = Digit::parse_sendable(&digit_text).ok_or_else(|| {
        bad(
            "invalid_digit",
            format!("invalid DTMF digit {digit_text:?} (allowed: 0-9 * #)"),
        )
    })?;
    let duration = match body.get("duration") {
        None | Some(Value::Null) => DtmfDuration::from_millis(DEFAULT_DTMF_MS),
        Some(v) => v.as_u64().and_then(DtmfDuration::from_millis),
    }
    .ok_or_else(|| {
        bad(
            "invalid_duration",
            format!(
                "invalid DTMF duration {} (must be a whole number of ms, 1..=1000)",
                body.get("duration").unwrap_or(&Value::Null)
            ),
        )
    })?;
    act(
        &shared,
        &id,
        CallRequest::Command(Command::Dtmf { digit, duration }),
    )
    .await?;
    Ok(Json(json!({
        "id": id,
        "digit": digit.to_string(),
        "duration": duration.as_millis(),
        "status": "dtmf_sent",
    })))
}

async fn play(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
        Reply::Queued { ms } => Ok(Json(json!({ "id": id, "queued_ms": ms }))),
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

async fn clear(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<Value>, ApiError> {
    match act(&shared, &id, CallRequest::Clear).await? {
        Reply::Cleared {
            dropped_ms,
            played_ms,
        } => Ok(Json(json!({
            "id": id,
            "dropped_ms": dropped_ms,
            "played_ms": played_ms,
        }))),
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
    Ok(crate::console::ranged(&headers, data.into(), "audio/wav"))
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
