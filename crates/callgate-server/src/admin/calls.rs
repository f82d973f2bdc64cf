//! The call records: the list (filtered, paged), one record, its event log, transcript,
//! recording and flow messages, and deleting an ended call.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use callgate_store::{
    CallFilter, CallId, CallRecord, EventRecord, TextMatch, TranscriptEntry, UnixMillis,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::Shared;
use crate::admin::console::ranged;
use crate::admin::error::{ApiError, ErrorBody};
use crate::admin::forward::Forwarding;
use crate::admin::params::{
    PageQuery, ValidId, bad_call_id, bad_query, limit, message_name, next_after, page,
    refuse_unknown,
};
use crate::config::check_node_id;

/// Default number of records `GET /api/calls` returns.
pub(crate) const DEFAULT_LIMIT: u32 = 50;
/// The most records one `GET /api/calls` returns.
pub(crate) const MAX_LIMIT: u32 = 1000;

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
pub(crate) async fn list_calls(
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
                check_node_id(&node)
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
        .call
        .store
        .list_calls(filter)
        .await
        .map_err(ApiError::store)?;
    // Serialised on the blocking pool (records hold up to a few MiB of the phone's text each),
    // straight from the records so CDRs stay byte-exact, and cut at MAX_LIST_BYTES.
    let body = shared
        .call
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

pub(crate) fn no_call(id: &CallId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "call_not_found",
        format!("no call with id {:?}", id.as_str()),
    )
}

/// The record of call `id`, or a 404.
async fn find(shared: &Shared, id: &CallId) -> Result<CallRecord, ApiError> {
    shared
        .call
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
pub(crate) async fn call(
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
    pub(crate) id: CallId,
    /// What was done.
    pub(crate) status: DoneStatus,
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
pub(crate) async fn delete_call(
    State(shared): State<Arc<Shared>>,
    ValidId(call_id): ValidId,
) -> Result<Json<Done>, ApiError> {
    let id = call_id.as_str();
    if shared.call.live.get(&call_id).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "call_live",
            format!(
                "call {id:?} is live (or still finishing): hang it up first, or retry in a moment"
            ),
        ));
    }
    let deleted = shared
        .call
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

/// A JSON reply built on the blocking pool: a page holds up to a few MiB of the phone's text
/// (1,000 entries of up to 4 KiB), tens of milliseconds of an async worker in a debug build.
async fn json_off_workers<T: Serialize>(
    shared: &Shared,
    build: impl FnOnce() -> T + Send + 'static,
) -> Result<Response, ApiError> {
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let body = shared
        .call
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
pub(crate) async fn events(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = page(query)?;
    let events = shared
        .call
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
pub(crate) async fn transcript(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = page(query)?;
    let entries = shared
        .call
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
        Forwarding,
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn recording(
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
        crate::call::media::recording_path(&shared.config.data_dir.join("recordings"), id.as_str());
    let data = tokio::fs::read(&path).await.map_err(|_| not_recorded())?;
    Ok(ranged(&headers, data.into(), "audio/wav"))
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
        Forwarding,
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn message(
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
