//! The admin API's errors: every answer that is not a success is JSON, `{"code", "error"}`
//! (plus the owner node for a call another node holds), with a stable code from
//! [`ERROR_CODES`], axum's own rejections included ([`json_errors`]).

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use callgate_store::NodeState;
use serde::Serialize;
use utoipa::ToSchema;

/// The most of a non-JSON error body (axum's own rejections) kept in the JSON error.
const MAX_ERROR_TEXT: usize = 1024;

/// Every error is JSON, axum's own rejections included (a body over the limit, a path that is
/// not UTF-8, a bad query string): their text becomes the message, the status the code.
pub(crate) async fn json_errors(response: Response) -> Response {
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
        let body = ErrorBody::new(self.code, self.message);
        (self.status, Json(body)).into_response()
    }
}

/// Every error's body: `{"code", "error"}`, and, for a request about a call another node
/// holds, that node (`node`, `admin_url`, `state`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// The admin URL of the node that holds the call (forwarding errors only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) admin_url: Option<String>,
    /// A stable code, for programs (see the document's list).
    #[schema(schema_with = code_schema)]
    pub(crate) code: &'static str,
    /// What went wrong, for people: names the field or value at fault.
    pub(crate) error: String,
    /// The node that holds the call, or whose cluster secret was refused (forwarding errors
    /// only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<String>,
    /// That node's state in the roster (`dead`), or null when it is not in the roster
    /// (`node_unreachable` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<NodeState>)]
    pub(crate) state: Option<Option<NodeState>>,
}

impl ErrorBody {
    /// A body with no forwarding fields.
    pub(crate) fn new(code: &'static str, error: String) -> Self {
        Self {
            admin_url: None,
            code,
            error,
            node: None,
            state: None,
        }
    }
}

/// Every stable error code the admin API answers with, and what it means.
pub(crate) const ERROR_CODES: [(&str, &str); 40] = [
    (
        "bad_request",
        "a request axum refused before its handler (bad path encoding...)",
    ),
    (
        "bad_query",
        "an unknown query parameter, or a filter's value it does not take",
    ),
    (
        "bad_limit",
        "`limit` is not a whole number within the endpoint's range",
    ),
    ("bad_after", "`after` is not a sequence number"),
    (
        "bad_call_id",
        "a call id (path, `before`) that is not a UUIDv7",
    ),
    (
        "bad_json",
        "the body is not JSON (or not the JSON the endpoint takes)",
    ),
    (
        "missing_field",
        "a required field of the JSON body is missing",
    ),
    ("invalid_digit", "a DTMF digit other than 0-9 * #"),
    ("invalid_duration", "a DTMF duration outside 1..=1000 ms"),
    ("bad_wav", "the body of `play` is not a PCM WAV file"),
    (
        "bad_rate",
        "the WAV's sample rate is outside 8000..=192000 Hz",
    ),
    ("too_long", "the WAV lasts longer than 600 s"),
    ("empty_wav", "the WAV holds no audio"),
    ("unauthorized", "no valid bearer token or console session"),
    (
        "forbidden",
        "the token's role may not do this (acting needs `operator`)",
    ),
    (
        "cross_site",
        "a browser request from another site, or a cookie change with no Origin",
    ),
    (
        "cluster_token_refused",
        "a forwarded request with the wrong cluster secret",
    ),
    ("not_found", "no such endpoint (or console asset)"),
    (
        "method_not_allowed",
        "the endpoint does not take this method",
    ),
    ("too_large", "the body is over the endpoint's limit"),
    (
        "uri_too_long",
        "the request target is over 8 KiB (refused before the request is parsed)",
    ),
    (
        "headers_too_large",
        "the request head is over 64 KiB or 100 fields (refused before it is parsed)",
    ),
    (
        "too_many_failures",
        "this address had 20 credentials refused within a minute: wait for `Retry-After`",
    ),
    (
        "unsupported_media_type",
        "axum refused the body's content type",
    ),
    ("unprocessable", "axum refused the body's content"),
    ("call_not_found", "no call with this id"),
    ("no_recording", "the call has no recording"),
    ("no_message", "the call has no such flow message"),
    ("call_not_live", "the call has ended"),
    (
        "call_live",
        "the call is still live (delete it once it has ended)",
    ),
    (
        "unsupported",
        "the call's protocol cannot do this (DTMF on CallBridge)",
    ),
    (
        "queue_full",
        "the call already holds as much operator audio as it may",
    ),
    ("stopping", "the server is stopping"),
    (
        "exiting",
        "the process was told to exit: it cannot be undrained",
    ),
    (
        "call_busy",
        "the call has too many operator requests waiting",
    ),
    (
        "call_on_other_node",
        "another node holds the call and this one cannot forward",
    ),
    (
        "node_unreachable",
        "the node that holds the call did not answer",
    ),
    ("store_unavailable", "the call store failed"),
    (
        "timeout",
        "the request took longer than the admin API's timeout",
    ),
    ("internal", "a fault of the server"),
];

/// The schema of [`ErrorBody::code`]: a string, one of [`ERROR_CODES`].
fn code_schema() -> utoipa::openapi::schema::Object {
    use std::fmt::Write as _;
    let mut description = String::from("A stable code:");
    for (code, meaning) in ERROR_CODES {
        let _ = write!(description, "\n- `{code}`: {meaning}");
    }
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ERROR_CODES.iter().map(|(code, _)| *code)))
        .description(Some(description))
        .build()
}
