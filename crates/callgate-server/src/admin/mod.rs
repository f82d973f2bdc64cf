//! The admin HTTP API (axum): health, metrics, call records, and operator actions on live calls.
//! Every error is JSON: `{"error": "<message>", "code": "<stable_code>"}`.
//!
//! Every request is bounded before a handler runs: its body ([`limits::MAX_BODY_BYTES`], or
//! [`limits::MAX_PLAY_BYTES`] for `POST /play`; a larger `Content-Length` is a 413 at once, a
//! longer chunked body a 413 when it is read) and its call id ([`params::ValidId`]: a malformed
//! one is a 400 before any lookup).
//!
//! # Described by its own types
//! [`endpoints`] is the one table of the API: each handler carries its `#[utoipa::path]`
//! (method, path, parameters, bodies, answers) and is registered through `utoipa_axum`'s
//! `routes!`, which adds it to the router and to the OpenAPI document together, so no route
//! is served without being described ([`openapi`] serves the document). Request bodies,
//! query strings and JSON answers are typed structs deriving `ToSchema`/`IntoParams`; the
//! fields of each answer are in alphabetical order, so its bytes are those of the `json!`
//! maps they replaced.
//!
//! # Map
//! This module is the table, the layers and the port's wiring; none of the modules below
//! imports it, and their
//! imports of each other run one way (no circle).
//! - The handlers, one module a resource: [`node`] (`/healthz`, `/readyz`, drain, undrain,
//!   `/metrics`, `/api/nodes`), [`calls`] (the records and their files), [`actions`]
//!   (hang up, DTMF, play, clear), [`webhooks`] (deliveries), [`console`] (the web console
//!   and its sign-in), [`openapi`] (the document); `GET /api/stream` is `crate::events`'.
//! - In front of them: [`authorize`] (tokens, session cookies, the cluster secret), with
//!   [`session`] (console sessions) and [`failures`] (the lockout of clients that keep
//!   failing); [`forward`] (an operator request for a call another node holds goes to that
//!   node); [`limits`] (body size, request time).
//! - What they share: [`params`] (call ids, `limit`, pages, query strings), [`error`] (the
//!   JSON error and every code).
//! - The port: [`serve`] (called by the server's `run`) picks plain or TLS and hands the
//!   router to [`port`], the accept loop that serves each connection with hyper.
//! - Below hyper: [`http_guard`], which every admin connection passes through (request heads
//!   checked whole, a lingering close).

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension};
use axum::http::StatusCode;
use axum::middleware;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod actions;
mod authorize;
mod calls;
mod console;
pub(crate) mod error;
pub(crate) mod failures;
pub mod forward;
mod http_guard;
mod limits;
mod node;
mod openapi;
mod params;
mod port;
pub(crate) mod session;
mod webhooks;

use crate::Shared;
use crate::admin::error::{ApiError, json_errors};
use crate::admin::limits::{MAX_BODY_BYTES, MAX_PLAY_BYTES};
use crate::tasks::Tasks;

/// Every endpoint the admin port serves, each with its description: the one table the router
/// and the OpenAPI document are both built from. A handler joins it only through `routes!`,
/// which needs its `#[utoipa::path]`; handlers sharing a path go in one `routes!`.
pub(crate) fn endpoints() -> OpenApiRouter<Arc<Shared>> {
    let small = OpenApiRouter::new()
        .routes(routes!(node::healthz))
        .routes(routes!(node::readyz))
        .routes(routes!(node::drain))
        .routes(routes!(node::undrain))
        .routes(routes!(node::metrics))
        .routes(routes!(node::nodes))
        .routes(routes!(crate::events::stream))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(openapi::document))
        .routes(routes!(calls::list_calls))
        .routes(routes!(calls::call, calls::delete_call))
        .routes(routes!(calls::events))
        .routes(routes!(calls::transcript))
        .routes(routes!(actions::hangup))
        .routes(routes!(actions::dtmf))
        .routes(routes!(actions::clear))
        .routes(routes!(calls::recording))
        .routes(routes!(calls::message))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            MAX_BODY_BYTES,
            limits::body_limit,
        ));
    let play = OpenApiRouter::new()
        .routes(routes!(actions::play))
        .layer(DefaultBodyLimit::max(MAX_PLAY_BYTES))
        .layer(middleware::from_fn_with_state(
            MAX_PLAY_BYTES,
            limits::body_limit,
        ));
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

/// Serves the admin API on the admin port's `listener` until `stop`: plain `http://`, or
/// `https://` when `tls` is given (handshakes run by [`crate::tls::AdminListener`], bounded
/// by the configuration's handshake timeout). Connections are spawned on `tasks`; the
/// handle ends once every connection has finished what it was answering ([`port::serve`]).
pub(crate) fn serve(
    shared: &Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    tasks: &Tasks,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let router = router(shared.clone());
    match tls {
        None => port::serve(tasks, listener, router, stop),
        Some(config) => {
            let listener = crate::tls::AdminListener::new(
                listener,
                config,
                shared.config.handshake_timeout,
                shared.call.metrics.clone(),
            );
            port::serve(tasks, listener, router, stop)
        }
    }
}

/// The admin API: [`served`] behind its layers (outermost last): JSON errors, the request
/// timeout, authorization, forwarding to the node that holds the call, the OpenAPI document.
fn router(shared: Arc<Shared>) -> Router {
    let (api, document) = served();
    api.layer(Extension(openapi::Document::new(document)))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            forward::layer,
        ))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            authorize::authorize,
        ))
        .layer(middleware::from_fn(limits::request_timeout))
        .layer(middleware::map_response(json_errors))
        .with_state(shared)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::error::{ERROR_CODES, ErrorBody};
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

    /// The operations the forwarding layer sends to the node that holds the call are exactly
    /// those whose document lists its answers (421, 502: [`forward::Forwarding`]).
    #[test]
    fn the_forwarded_operations_document_the_forwarding_answers() {
        let (_, document) = served();
        let mut forwarded = Vec::new();
        for (path, item) in &document.paths.paths {
            let concrete = path
                .replace("{id}", "0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192")
                .replace("{file}", "voicemail.wav")
                .replace("{version}", "0");
            let operations = [
                (axum::http::Method::GET, &item.get),
                (axum::http::Method::POST, &item.post),
                (axum::http::Method::PUT, &item.put),
                (axum::http::Method::DELETE, &item.delete),
                (axum::http::Method::PATCH, &item.patch),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else {
                    continue;
                };
                let answers = &operation.responses.responses;
                let documented = answers.contains_key("421") && answers.contains_key("502");
                let forwards = forward::Target::parse(&method, &concrete).is_some();
                assert_eq!(forwards, documented, "{method} {path}");
                if forwards {
                    forwarded.push(format!("{method} {path}"));
                }
            }
        }
        assert_eq!(forwarded.len(), 6, "{forwarded:?}");
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
            include_str!("actions.rs"),
            include_str!("authorize.rs"),
            include_str!("calls.rs"),
            include_str!("console.rs"),
            include_str!("error.rs"),
            include_str!("forward.rs"),
            include_str!("limits.rs"),
            include_str!("node.rs"),
            include_str!("openapi.rs"),
            include_str!("params.rs"),
            include_str!("session.rs"),
            include_str!("webhooks.rs"),
            include_str!("../events.rs"),
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
