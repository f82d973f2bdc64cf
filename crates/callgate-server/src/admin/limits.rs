//! The bounds every admin request meets before its handler runs: its body's size and its
//! time.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::admin::error::ApiError;

/// The longest an admin request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest WAV `POST /api/calls/{id}/play` takes (about 17 minutes of 16 kHz mono).
pub(crate) const MAX_PLAY_BYTES: usize = 32 * 1024 * 1024;
/// The largest request body of every other endpoint (a DTMF request is a few dozen bytes).
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// A request whose `Content-Length` is over the endpoint's `limit` gets a 413 before anything
/// reads its body (a chunked body is cut at the limit by `DefaultBodyLimit` when read). The
/// 413 closes the connection (`Connection: close`): the rest of the body is never read as a
/// request, and the connection lingers while the client sends it (`http_guard`).
pub(crate) async fn body_limit(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
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

/// A request that takes longer than [`REQUEST_TIMEOUT`] is answered 503 `timeout`.
pub(crate) async fn request_timeout(request: Request, next: Next) -> Response {
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
