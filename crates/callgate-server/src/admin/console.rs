//! The operator's web console, served by the admin port: the page at `/`, its assets under
//! `/assets/{version}/`, and the sign-in endpoints (`/api/session`, see
//! [`crate::admin::session`]).
//!
//! The assets are plain files in `crates/callgate-server/console/` embedded in the binary (no
//! JavaScript toolchain at build time). `{version}` is a digest of all of them, so an asset
//! URL never changes meaning: assets are served `immutable` for a year, the page itself
//! `no-cache` with an `ETag` (a browser revalidates it and gets a 304 until the binary
//! changes). Every console response carries a strict Content-Security-Policy: scripts,
//! styles, media and connections from this origin only, no inline code, no `eval`, no frames.

use std::sync::{Arc, LazyLock};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::Shared;
use crate::admin::error::{ApiError, ErrorBody};
use crate::admin::session::{self, Denied};
use crate::auth::{Refusal, Secret};

/// The page's template; `{{version}}` becomes [`Built::version`].
const INDEX: &str = include_str!("../../console/index.html");

/// The assets: name, content type, bytes.
const ASSETS: [(&str, &str, &[u8]); 4] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/app.js"),
    ),
    (
        "i18n.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/i18n.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/app.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../console/icon.svg"),
    ),
];

/// The Content-Security-Policy of every console response.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; media-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The page with its asset URLs filled in, and the version they carry.
struct Built {
    version: String,
    index: String,
    etag: HeaderValue,
}

static BUILT: LazyLock<Built> = LazyLock::new(|| {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(INDEX.as_bytes());
    for (name, _, bytes) in ASSETS {
        context.update(name.as_bytes());
        context.update(bytes);
    }
    let version: String = context
        .finish()
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let etag = HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"console\""));
    Built {
        index: INDEX.replace("{{version}}", &version),
        version,
        etag,
    }
});

/// The console's routes (merged into the admin router, under its authorization layer, which
/// lets them through: see [`is_open`]).
pub(crate) fn routes() -> OpenApiRouter<Arc<Shared>> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(asset))
        .routes(routes!(whoami, sign_in, sign_out))
}

/// Whether `path` is served without credentials: the page and its assets (they hold no
/// data), and the session endpoints (they check credentials themselves).
pub(crate) fn is_open(path: &str) -> bool {
    path == "/" || path == "/api/session" || path.starts_with("/assets/")
}

/// The total size of the console's files, bytes.
#[cfg(test)]
fn size() -> usize {
    INDEX.len() + ASSETS.iter().map(|(_, _, b)| b.len()).sum::<usize>()
}

/// The console's page (HTML; its scripts and styles are under `/assets/`).
#[utoipa::path(
    get,
    path = "/",
    tag = "console",
    responses(
        (status = 200, description = "The page", body = String, content_type = "text/html; charset=utf-8",
            headers(("ETag" = String), ("Content-Security-Policy" = String))),
        (status = 304, description = "Not modified (`If-None-Match`)"),
    )
)]
async fn index(headers: HeaderMap) -> Response {
    let built = &*BUILT;
    cached(
        &headers,
        &built.etag,
        "no-cache",
        "text/html; charset=utf-8",
        Bytes::from_static(built.index.as_bytes()),
    )
}

/// One of the console's files (`app.js`, `i18n.js`, `app.css`, `icon.svg`) under the version the
/// page names; cached for a year.
#[utoipa::path(
    get,
    path = "/assets/{version}/{file}",
    tag = "console",
    params(
        ("version" = String, Path, description = "The digest of the console's files, as the page names it"),
        ("file" = String, Path, description = "The file's name", example = "app.js"),
    ),
    responses(
        (status = 200, description = "The file (JavaScript, CSS or SVG)", body = String,
            content_type = "text/javascript; charset=utf-8"),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 404, description = "`not_found`: no such file, or another version", body = ErrorBody),
    )
)]
async fn asset(Path((version, file)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let built = &*BUILT;
    let found = ASSETS.iter().find(|(name, _, _)| *name == file);
    match found {
        Some((_, content_type, bytes)) if version == built.version => cached(
            &headers,
            &built.etag,
            "public, max-age=31536000, immutable",
            content_type,
            Bytes::from_static(bytes),
        ),
        _ => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such console asset")
            .into_response(),
    }
}

/// A console file with its caching and security headers; a 304 when the browser has it.
fn cached(
    request: &HeaderMap,
    etag: &HeaderValue,
    cache_control: &'static str,
    content_type: &'static str,
    body: Bytes,
) -> Response {
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag.to_str().unwrap_or_default() || tag.trim() == "*");
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// The refusal of a sign-in endpoint, counted like the API's own.
fn refused(shared: &Shared, denied: Denied) -> Response {
    let (status, code, message, reason) = match denied {
        Denied::CrossSite => (
            StatusCode::FORBIDDEN,
            "cross_site",
            "a request from another site (or with no Origin) may not use the console session",
            "cross_site",
        ),
        Denied::Auth(Refusal::Forbidden) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token's role may not do this",
            "forbidden",
        ),
        Denied::Auth(Refusal::Unauthenticated) => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "not signed in: sign in with an admin token",
            "unauthenticated",
        ),
    };
    shared
        .call
        .metrics
        .admin_refused
        .get_or_create(&[("reason", reason)])
        .inc();
    no_store(ApiError::new(status, code, message).into_response())
}

/// Session answers are never cached.
fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Who a browser is, as the session endpoints answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionInfo {
    /// Whether tokens are configured (with none, everyone on the admin port is an operator).
    auth: bool,
    /// How long the new session lasts, seconds (sign-in only).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
    /// The admin token's name; null with no tokens configured.
    name: Option<String>,
    /// `read` or `operator`.
    #[schema(value_type = String, example = "operator")]
    role: &'static str,
}

/// The body of `POST /api/session`.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct SignIn {
    /// An admin token (its secret).
    token: String,
}

/// The answer of `DELETE /api/session`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SignedOut {
    /// Whether a session was open (and is now ended).
    ended: bool,
    /// `signed_out`.
    status: SignedOutStatus,
}

/// What `DELETE /api/session` did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SignedOutStatus {
    /// The session cookie is removed.
    SignedOut,
}

/// With no tokens configured, everyone on the (loopback) admin port is an operator.
fn open_session() -> Response {
    no_store(
        axum::Json(SessionInfo {
            auth: false,
            expires_in: None,
            name: None,
            role: crate::auth::Role::Operator.as_str(),
        })
        .into_response(),
    )
}

/// `GET /api/session`: who this browser is (`{"role","name","auth":true}`), 401 when it is
/// not signed in.
#[utoipa::path(
    get,
    path = "/api/session",
    tag = "console",
    responses(
        (status = 200, description = "Signed in (or no tokens configured)", body = SessionInfo),
        (status = 401, description = "`unauthorized`: not signed in", body = ErrorBody),
        (status = 403, description = "`cross_site` or `forbidden`", body = ErrorBody),
    )
)]
async fn whoami(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let auth = shared.admin_auth.current();
    if !auth.is_enabled() {
        return open_session();
    }
    let now = Instant::now();
    match session::authenticate(
        &shared.sessions,
        &auth,
        &headers,
        &axum::http::Method::GET,
        crate::auth::Role::Read,
        now,
    ) {
        Ok(identity) => no_store(
            axum::Json(SessionInfo {
                auth: true,
                expires_in: None,
                name: Some(identity.name),
                role: identity.role.as_str(),
            })
            .into_response(),
        ),
        Err(denied) => refused(&shared, denied),
    }
}

/// `POST /api/session {"token": "..."}`: a session cookie for a configured admin token.
#[utoipa::path(
    post,
    path = "/api/session",
    tag = "console",
    request_body = SignIn,
    responses(
        (status = 200, description = "Signed in: the answer sets the session cookie", body = SessionInfo,
            headers(("Set-Cookie" = String, description = "`callgate_session=...; HttpOnly; SameSite=Strict; Path=/`"))),
        (status = 400, description = "`bad_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no such token", body = ErrorBody),
        (status = 403, description = "`cross_site`: no `Origin` naming this host", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
    )
)]
async fn sign_in(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = session::check_origin(&headers, true) {
        return refused(&shared, denied);
    }
    let auth = shared.admin_auth.current();
    // An object with a string `token` (not an array, which serde would also take).
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .filter(serde_json::Value::is_object)
        .and_then(|v| serde_json::from_value::<SignIn>(v).ok())
        .map(|s| s.token);
    let Some(token) = token else {
        return no_store(
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "the body must be JSON: {\"token\": \"...\"}",
            )
            .into_response(),
        );
    };
    if !auth.is_enabled() {
        return open_session();
    }
    let presented = Secret::digest_of(token.trim().as_bytes());
    let Some(found) = auth.token(&presented) else {
        tracing::debug!("Console sign-in with an unknown token.");
        return refused(&shared, Denied::Auth(Refusal::Unauthenticated));
    };
    let id = match shared.sessions.open(presented, Instant::now()) {
        Ok(id) => id,
        Err(_) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the system's random source failed",
            )
            .into_response();
        }
    };
    tracing::info!(
        token = found.name,
        role = found.role.as_str(),
        "Console sign-in."
    );
    let cookie = session::set_cookie(&id, shared.config.admin_tls.is_some());
    let mut response = no_store(
        axum::Json(SessionInfo {
            auth: true,
            expires_in: Some(session::SESSION_TTL.as_secs()),
            name: Some(found.name.clone()),
            role: found.role.as_str(),
        })
        .into_response(),
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `DELETE /api/session`: signs out (the session ends, the cookie is removed).
#[utoipa::path(
    delete,
    path = "/api/session",
    tag = "console",
    responses(
        (status = 200, description = "Signed out: the answer removes the cookie", body = SignedOut,
            headers(("Set-Cookie" = String))),
        (status = 403, description = "`cross_site`: no `Origin` naming this host", body = ErrorBody),
    )
)]
async fn sign_out(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(denied) = session::check_origin(&headers, true) {
        return refused(&shared, denied);
    }
    let ended = session::cookie(&headers).is_some_and(|id| shared.sessions.close(id));
    if ended {
        tracing::info!("Console sign-out.");
    }
    let mut response = no_store(
        axum::Json(SignedOut {
            ended,
            status: SignedOutStatus::SignedOut,
        })
        .into_response(),
    );
    if let Ok(value) =
        HeaderValue::from_str(&session::clear_cookie(shared.config.admin_tls.is_some()))
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// A file's bytes answering a `Range: bytes=...` request (one range; anything else gets the
/// whole file): what lets the page's `<audio>` seek in a recording.
pub(crate) fn ranged(request: &HeaderMap, data: Bytes, content_type: &'static str) -> Response {
    let len = data.len() as u64;
    let range = request
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| byte_range(v, len));
    let mut response = match range {
        None | Some(Range::Ignored) => {
            ([(header::CONTENT_TYPE, content_type)], data).into_response()
        }
        Some(Range::Unsatisfiable) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        Some(Range::Bytes { first, last }) => {
            // `first <= last < len`, checked by `byte_range`.
            let part = data.slice(first as usize..=last as usize);
            let mut r = (
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_TYPE, content_type)],
                part,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
    };
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// Bytes `first..=last`.
    Bytes { first: u64, last: u64 },
    /// A range past the end (416).
    Unsatisfiable,
    /// Not one byte range we serve (several ranges, another unit, bad syntax): the whole file.
    Ignored,
}

fn byte_range(value: &str, len: u64) -> Range {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Ignored;
    };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Range::Ignored;
    };
    let number = |t: &str| t.trim().parse::<u64>().ok();
    match (start.trim().is_empty(), number(start), number(end)) {
        // `bytes=-N`: the last N bytes.
        (true, _, Some(suffix)) => {
            if suffix == 0 || len == 0 {
                Range::Unsatisfiable
            } else {
                Range::Bytes {
                    first: len.saturating_sub(suffix),
                    last: len - 1,
                }
            }
        }
        (false, Some(first), end) if end.is_some() || end_is_open(end, spec) => {
            if first >= len {
                return Range::Unsatisfiable;
            }
            let last = end.map_or(len - 1, |e| e.min(len - 1));
            if last < first {
                return Range::Ignored;
            }
            Range::Bytes { first, last }
        }
        _ => Range::Ignored,
    }
}

/// Whether the range's end is absent (`bytes=N-`), rather than malformed.
fn end_is_open(end: Option<u64>, spec: &str) -> bool {
    end.is_none() && spec.trim().ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_are_parsed_strictly() {
        let r = |v| byte_range(v, 100);
        assert_eq!(r("bytes=0-9"), Range::Bytes { first: 0, last: 9 });
        assert_eq!(
            r("bytes=90-"),
            Range::Bytes {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            r("bytes=90-500"),
            Range::Bytes {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            r("bytes=-10"),
            Range::Bytes {
                first: 90,
                last: 99
            }
        );
        assert_eq!(r("bytes=-500"), Range::Bytes { first: 0, last: 99 });
        assert_eq!(r("bytes=100-"), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Range::Unsatisfiable);
        assert_eq!(r("bytes=5-1"), Range::Ignored);
        assert_eq!(r("bytes=0-1,5-6"), Range::Ignored);
        assert_eq!(r("items=0-1"), Range::Ignored);
        assert_eq!(r("bytes=x-1"), Range::Ignored);
        assert_eq!(r("bytes=1-x"), Range::Ignored);
        assert_eq!(byte_range("bytes=0-", 0), Range::Unsatisfiable);
    }

    #[test]
    fn the_console_stays_small() {
        assert!(size() < 300 * 1024, "{} bytes", size());
        assert!(
            size() > 10 * 1024,
            "the console's files are embedded: {} bytes",
            size()
        );
    }

    #[test]
    fn the_page_names_versioned_assets_only() {
        let built = &*BUILT;
        assert!(!built.index.contains("{{"), "every placeholder is filled");
        for name in ["app.js", "i18n.js", "app.css"] {
            let url = format!("/assets/{}/{name}", built.version);
            assert!(built.index.contains(&url), "{url} in the page");
        }
        assert!(!built.index.contains("<script>"), "no inline script");
        assert!(!built.index.contains("style="), "no inline style");
    }

    #[test]
    fn the_policy_allows_nothing_foreign() {
        assert!(!CSP.contains('*'));
        assert!(!CSP.contains("unsafe"));
        assert!(!CSP.contains("http"));
        assert!(!CSP.contains("data:"));
        assert!(CSP.contains("default-src 'none'"));
    }
}
