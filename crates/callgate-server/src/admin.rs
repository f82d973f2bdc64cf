//! The admin HTTP API (axum): health, metrics, call records, and operator actions on live calls.
//! Every error is JSON: `{"error": "<message>", "code": "<stable_code>"}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use callgate_proto::{Command, Digit, DtmfDuration, EndReason, Error as ProtoError};
use callgate_store::{CallFilter, CallId, CallRecord};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::Shared;
use crate::live::{Operator, Refused, Reply, Request as CallRequest};

/// Default number of records `GET /api/calls` returns.
pub(crate) const DEFAULT_LIMIT: u32 = 50;
/// The most records one `GET /api/calls` returns.
pub(crate) const MAX_LIMIT: u32 = 1000;
/// The longest an admin request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest WAV `POST /api/calls/{id}/play` takes (about 17 minutes of 16 kHz mono).
pub(crate) const MAX_PLAY_BYTES: usize = 32 * 1024 * 1024;
/// DTMF tone length when the request gives none.
pub(crate) const DEFAULT_DTMF_MS: u64 = 200;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/calls", get(list_calls))
        .route("/api/calls/{id}", get(call))
        .route("/api/calls/{id}/events", get(events))
        .route("/api/calls/{id}/transcript", get(transcript))
        .route("/api/calls/{id}/hangup", post(hangup))
        .route("/api/calls/{id}/dtmf", post(dtmf))
        .route(
            "/api/calls/{id}/play",
            post(play).layer(DefaultBodyLimit::max(MAX_PLAY_BYTES)),
        )
        .route("/api/calls/{id}/clear", post(clear))
        .route("/api/calls/{id}/recording", get(recording))
        .route("/api/calls/{id}/messages/{file}", get(message))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(request_timeout))
        .with_state(shared)
}

/// An API error: status, stable code and a message naming the problem.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn store(error: callgate_store::Error) -> Self {
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

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let draining = shared.draining.load(Ordering::Relaxed);
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "live_calls": shared.live.len(),
    });
    (status, Json(body)).into_response()
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

async fn list_calls(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<CallList>, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    const KEYS: [&str; 6] = [
        "limit",
        "route",
        "agent",
        "protocol",
        "end_reason",
        "before",
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
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_limit",
                    format!("limit must be a whole number from 1 to {MAX_LIMIT}, got {text:?}"),
                ));
            }
        },
    };
    let filter = CallFilter {
        limit,
        route: query.get("route").cloned(),
        agent: query.get("agent").cloned(),
        protocol: query.get("protocol").cloned(),
        end_reason: query.get("end_reason").cloned(),
        before: query
            .get("before")
            .map(|id| CallId::from_string(id.clone())),
    };
    let calls = shared
        .store
        .list_calls(filter)
        .await
        .map_err(ApiError::store)?;
    let next = (calls.len() == limit as usize)
        .then(|| calls.last().map(|c| c.id.to_string()))
        .flatten();
    // Serialised directly (not through serde_json::Value) so the CDR stays byte-exact.
    Ok(Json(CallList { calls, next }))
}

#[derive(Serialize)]
struct CallList {
    calls: Vec<CallRecord>,
    /// The cursor of the next page (`?before=`), when this page is full.
    next: Option<String>,
}

fn no_call(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "call_not_found",
        format!("no call with id {id:?}"),
    )
}

/// The record of call `id`, or a 404.
async fn find(shared: &Shared, id: &str) -> Result<CallRecord, ApiError> {
    shared
        .store
        .call(CallId::from_string(id.to_owned()))
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(id))
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<CallRecord>, ApiError> {
    let record = find(&shared, &id).await?;
    Ok(Json(record))
}

async fn events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let events = shared
        .store
        .events(CallId::from_string(id.clone()))
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(&id))?;
    Ok(Json(json!({ "id": id, "events": events })))
}

async fn transcript(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let call_id = CallId::from_string(id.clone());
    let entries = shared
        .store
        .transcript(call_id.clone())
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| no_call(&id))?;
    let record = find(&shared, &id).await?;
    Ok(Json(
        json!({ "id": id, "entries": entries, "usage": record.usage }),
    ))
}

/// Sends a request to a live call's task and waits for its answer.
async fn act(shared: &Shared, id: &str, request: CallRequest) -> Result<Reply, ApiError> {
    let call_id = CallId::from_string(id.to_owned());
    let Some(tx) = shared.live.get(&call_id) else {
        let exists = shared
            .store
            .call(call_id)
            .await
            .map_err(ApiError::store)?
            .is_some();
        return Err(if exists {
            ApiError::new(
                StatusCode::CONFLICT,
                "call_not_live",
                format!("call {id:?} has ended"),
            )
        } else {
            no_call(id)
        });
    };
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
    Path(id): Path<String>,
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
    Path(id): Path<String>,
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
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let audio = hound::WavReader::new(std::io::Cursor::new(body))
        .map_err(callgate_audio::Error::from)
        .and_then(callgate_audio::wav::read_mono_from)
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad_wav",
                format!("body is not a PCM WAV file: {e}"),
            )
        })?;
    if audio.samples.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_wav",
            "the WAV file has no audio",
        ));
    }
    let request = CallRequest::Play {
        samples: audio.samples,
        rate: audio.rate,
    };
    match act(&shared, &id, request).await? {
        Reply::Queued { ms } => Ok(Json(json!({ "id": id, "queued_ms": ms }))),
        other => Err(unexpected(other)),
    }
}

async fn clear(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
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
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = find(&shared, &id).await?;
    let not_recorded = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_recording",
            format!("call {id:?} has no recording"),
        )
    };
    if !record.recording {
        return Err(not_recorded());
    }
    let path = crate::media::recording_path(&shared.config.data_dir.join("recordings"), &id);
    let data = tokio::fs::read(&path).await.map_err(|_| not_recorded())?;
    Ok(([(header::CONTENT_TYPE, "audio/wav")], data).into_response())
}

/// A message a flow's `record` step left: `DATA_DIR/messages/{id}/{file}` (`file` is a step's
/// name and `.wav`, as listed in the call's `flow_step` events).
async fn message(
    State(shared): State<Arc<Shared>>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let no_message = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_message",
            format!("call {id:?} has no message {file:?}"),
        )
    };
    let valid = file.strip_suffix(".wav").is_some_and(|stem| {
        !stem.is_empty()
            && stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !valid {
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
