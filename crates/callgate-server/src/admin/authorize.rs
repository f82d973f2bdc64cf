//! Who may do what on the admin port: the middleware in front of every handler.
//!
//! Bearer tokens ([`crate::auth`]) or the console's session cookie ([`crate::admin::session`]);
//! a request forwarded by another node with the cluster secret ([`crate::admin::forward`]); the
//! lockout of clients whose credentials keep being refused ([`crate::admin::failures`]). The
//! OpenAPI document says what each operation takes with the same [`is_open`] and
//! [`role_needed`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::Shared;
use crate::admin::error::ApiError;
use crate::admin::session::Denied;
use crate::admin::{console, failures, forward, session};
use crate::auth::{Refusal, Role};

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
pub(crate) async fn authorize(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
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
                .call
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
        .call
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
