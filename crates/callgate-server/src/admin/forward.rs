//! Operator actions on a call another node holds, forwarded to that node.
//!
//! A call's task, its recording and its flow messages live on the node that took the call
//! (its record's `node`). With a shared store any node reads every record, but only the owner
//! can hang up, send DTMF, play, clear, or serve the files. So an operator request for a call
//! held elsewhere (`POST .../hangup|dtmf|play|clear`, `GET .../recording`,
//! `GET .../messages/{file}`) is sent on to the owner's admin API (its `admin_url` in the
//! roster) and the owner's answer is relayed: status, the headers that describe the body, and
//! the body itself, streamed as it comes (a recording is never held whole in memory).
//!
//! # Trust
//! The forwarding node authenticates with the cluster secret (`[cluster] token_env`,
//! [`crate::auth::ClusterSecret`]), in a header of its own ([`TOKEN_HEADER`]); the client's
//! own `Authorization` is never passed on.
//! The receiving node accepts that header only with exactly its own secret (compared by
//! SHA-256 digest without an early exit, as admin tokens are), and then treats the request
//! as `operator`. A request that carries the header is never forwarded again (loop guard):
//! if the receiver does not hold the call either, it answers for itself.
//!
//! # Failures
//! An owner that is `dead` in the roster, gone from it, unreachable, or silent past
//! [`ANSWER_TIMEOUT`] is a `502 node_unreachable` naming the node. An owner that refuses the
//! secret is a `502 cluster_token_refused` (the client's token was fine; the nodes disagree).
//! A node without a secret answers `421 call_on_other_node`, naming the owner and its URL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use callgate_store::{CallId, NodeState};
use tracing::{info, warn};
use utoipa::ToSchema;
use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder, ResponsesBuilder};

use crate::Shared;
use crate::admin::error::ErrorBody;
use crate::admin::limits::{MAX_BODY_BYTES, MAX_PLAY_BYTES};
use crate::admin::params::message_name;

/// The request header that carries the cluster secret from one node to another.
pub const TOKEN_HEADER: &str = "x-callgate-cluster-token";
/// The request header naming the node that forwarded a request (for the receiver's log).
pub const FORWARDED_BY: &str = "x-callgate-forwarded-by";
/// The request header naming the admin token the client used at the forwarding node (its
/// name, never its secret), for the receiver's log.
pub const FORWARDED_FOR: &str = "x-callgate-forwarded-for";
/// The response header naming the node that answered a forwarded request.
pub const NODE_HEADER: &str = "x-callgate-node";
/// How long connecting to the owner may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the owner may take to answer (status and headers; the body may stream longer).
/// Below the admin API's own request timeout, so that a silent owner is a 502 naming it.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);
/// The longest the owner's body may pause between two reads while it streams.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP client towards other nodes (the secret it presents is the configuration's).
#[derive(Debug)]
pub(crate) struct Forwarder {
    http: reqwest::Client,
}

impl Forwarder {
    /// A client that follows no redirect (an owner's answer is relayed as it is).
    pub(crate) fn new() -> Result<Self, reqwest::Error> {
        // `Err`: a provider is installed already, which is all that is needed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()?;
        Ok(Self { http })
    }
}

/// Set on a request that came from another node with the right secret.
#[derive(Debug, Clone)]
pub(crate) struct Forwarded;

/// What the forwarding may answer instead of the handler, in the OpenAPI document of every
/// operation it forwards: `responses(..., Forwarding, ...)` beside the handler's own.
pub(crate) enum Forwarding {}

impl utoipa::IntoResponses for Forwarding {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        let error = |description: &str| {
            ResponseBuilder::new().description(description).content(
                "application/json",
                Content::new(Some(Ref::from_schema_name(ErrorBody::name()))),
            )
        };
        ResponsesBuilder::new()
            .response("421", error("`call_on_other_node`"))
            .response(
                "502",
                error("`node_unreachable` or `cluster_token_refused`"),
            )
            .build()
            .into()
    }
}

/// The admin token a request was authenticated with (its name), for the audit log.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) String);

/// An operator request that may be forwarded: its call and what it does.
#[derive(Debug)]
pub(crate) struct Target {
    id: CallId,
    /// The action acts on the live call (hangup, dtmf, play, clear); otherwise it reads a
    /// file (recording, message).
    live: bool,
    /// The file read, for `recording` (None) or `messages/{file}` (Some).
    message: Option<String>,
}

impl Target {
    /// `/api/calls/{id}/{action}[/{file}]` with the action's method, else `None`.
    pub(crate) fn parse(method: &Method, path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/api/calls/")?;
        let mut parts = rest.split('/');
        let id = CallId::parse(parts.next()?)?;
        let action = parts.next()?;
        let file = parts.next();
        if parts.next().is_some() {
            return None;
        }
        let reading = *method == Method::GET || *method == Method::HEAD;
        let (live, message) = match (action, file) {
            ("hangup" | "dtmf" | "play" | "clear", None) if *method == Method::POST => (true, None),
            ("recording", None) if reading => (false, None),
            ("messages", Some(file)) if reading => (false, Some(file.to_owned())),
            _ => return None,
        };
        Some(Self { id, live, message })
    }
}

/// What a forwarding error says of the node that holds the call.
#[derive(Debug, Default)]
struct Extra<'a> {
    node: Option<&'a str>,
    admin_url: Option<&'a str>,
    /// `Some(None)`: the node is not in the roster (shown as `"state": null`).
    state: Option<Option<NodeState>>,
}

/// A JSON error with the admin API's shape plus the `extra` fields.
fn error(status: StatusCode, code: &'static str, message: String, extra: Extra<'_>) -> Response {
    let body = ErrorBody {
        admin_url: extra.admin_url.map(str::to_owned),
        node: extra.node.map(str::to_owned),
        state: extra.state,
        ..ErrorBody::new(code, message)
    };
    (status, axum::Json(body)).into_response()
}

/// Called by the admin API's authorization for a request that carries [`TOKEN_HEADER`]:
/// with exactly this node's secret it goes on as `operator`, marked [`Forwarded`]; anything
/// else is a 401 (also when this node has no secret).
pub(crate) async fn accept(shared: &Shared, mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(TOKEN_HEADER)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let by = header_text(request.headers(), FORWARDED_BY);
    let ok = shared
        .config
        .cluster_secret
        .as_ref()
        .is_some_and(|s| s.matches(&presented));
    if !ok {
        shared
            .call
            .metrics
            .admin_refused
            .get_or_create(&[("reason", "cluster_token")])
            .inc();
        warn!(
            forwarded_by = %by,
            method = %request.method(),
            path = %request.uri().path(),
            "Refused a forwarded admin request: wrong cluster secret (or none configured here)."
        );
        return error(
            StatusCode::UNAUTHORIZED,
            "cluster_token_refused",
            format!(
                "the `{TOKEN_HEADER}` header does not hold this node's cluster secret \
                 ([cluster] token_env)"
            ),
            Extra {
                node: Some(&shared.node.id),
                ..Extra::default()
            },
        );
    }
    info!(
        forwarded_by = %by,
        forwarded_for = %header_text(request.headers(), FORWARDED_FOR),
        method = %request.method(),
        path = %request.uri().path(),
        "Operator request forwarded by another node."
    );
    request.extensions_mut().insert(Forwarded);
    next.run(request).await
}

/// A header's text for a log line (`-` when absent or not text).
fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "-".to_owned(), |s| s.chars().take(128).collect())
}

/// Middleware on the admin API (inside authorization): an operator request for a call held
/// by another node goes to that node; everything else goes on here.
pub(crate) async fn layer(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(target) = Target::parse(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    // Loop guard: a forwarded request is answered here, whatever this node holds.
    if request.extensions().get::<Forwarded>().is_some()
        || shared.call.live.get(&target.id).is_some()
    {
        return next.run(request).await;
    }
    // Unknown call, store trouble: the handler answers (404, 503) as it always does.
    let Ok(Some(record)) = shared.call.store.call(target.id.clone()).await else {
        return next.run(request).await;
    };
    let owner = match record.node {
        Some(node) if node != shared.node.id => node,
        _ => return next.run(request).await,
    };
    // An ended call: the handler's 409 `call_not_live` says so without asking the owner.
    if target.live && record.ended_at.is_some() {
        return next.run(request).await;
    }
    if !target.live && local_file(&shared, &target, record.recording).await {
        // A data directory shared between the nodes: the file is here too.
        return next.run(request).await;
    }
    forward(&shared, &target, &owner, request).await
}

/// Whether the file a request reads exists on this node (a shared file system).
async fn local_file(shared: &Shared, target: &Target, recorded: bool) -> bool {
    let path = match &target.message {
        None if !recorded => return true, // the handler's 404 `no_recording`
        None => crate::call::media::recording_path(
            &shared.config.data_dir.join("recordings"),
            target.id.as_str(),
        ),
        Some(file) => shared
            .config
            .data_dir
            .join("messages")
            .join(target.id.as_str())
            .join(file),
    };
    // A name that cannot be a message is the handler's 404, never forwarded.
    let odd = target.message.as_deref().is_some_and(|f| !message_name(f));
    odd || tokio::fs::try_exists(&path).await.unwrap_or(false)
}

/// The admin URL of `owner` from the roster, or the error to answer.
async fn owner_url(shared: &Arc<Shared>, owner: &str) -> Result<String, Response> {
    let nodes = match super::node::read_roster(shared).await {
        Ok(Ok(nodes)) => nodes,
        Ok(Err(e)) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("cannot read the node roster to reach node {owner:?}: {e}"),
                Extra {
                    node: Some(owner),
                    ..Extra::default()
                },
            ));
        }
        Err(e) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
                Extra::default(),
            ));
        }
    };
    match nodes.into_iter().find(|n| n.id == owner) {
        None => Err(error(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!("the call is held by node {owner:?}, which is not in the node roster"),
            Extra {
                node: Some(owner),
                state: Some(None),
                ..Extra::default()
            },
        )),
        Some(n) if n.state == NodeState::Dead => Err(error(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!(
                "the call is held by node {owner:?}, which is dead (no heartbeat for \
                 node_timeout)"
            ),
            Extra {
                node: Some(owner),
                admin_url: Some(&n.admin_url),
                state: Some(Some(NodeState::Dead)),
            },
        )),
        Some(n) => Ok(n.admin_url),
    }
}

/// Sends `request` to `owner` and relays its answer.
async fn forward(shared: &Arc<Shared>, target: &Target, owner: &str, request: Request) -> Response {
    let (result, response) = send(shared, target, owner, request).await;
    shared
        .call
        .metrics
        .admin_forwarded
        .get_or_create(&[("result", result)])
        .inc();
    response
}

/// Sends `request` to `owner`: the answer, and how it went for
/// `callgate_admin_forwarded_total{result}` (`relayed`: the owner's answer, whatever its
/// status; `unreachable`; `token_refused`; `no_secret`; `too_large`: a body over the
/// endpoint's limit).
async fn send(
    shared: &Arc<Shared>,
    target: &Target,
    owner: &str,
    request: Request,
) -> (&'static str, Response) {
    let admin_url = match owner_url(shared, owner).await {
        Ok(url) => url,
        Err(response) => return ("unreachable", response),
    };
    let Some(secret) = &shared.config.cluster_secret else {
        return (
            "no_secret",
            error(
                StatusCode::MISDIRECTED_REQUEST,
                "call_on_other_node",
                format!(
                    "call {:?} is held by node {owner:?} ({admin_url}); this node has no cluster \
                 secret ([cluster] token_env) to forward the request: set one on every node, \
                 or send the request to that node",
                    target.id.as_str()
                ),
                Extra {
                    node: Some(owner),
                    admin_url: Some(&admin_url),
                    ..Extra::default()
                },
            ),
        );
    };
    let caller = request
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "-".to_owned(), |c| c.0.clone());
    let (parts, body) = request.into_parts();
    let limit = if target.live && parts.uri.path().ends_with("/play") {
        MAX_PLAY_BYTES
    } else {
        MAX_BODY_BYTES
    };
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        let response = error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over this endpoint's limit of {limit} bytes"),
            Extra::default(),
        );
        return ("too_large", response);
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", admin_url.trim_end_matches('/'));
    let mut outgoing = shared
        .forwarder
        .http
        .request(parts.method.clone(), &url)
        .header(TOKEN_HEADER, secret.text())
        .header(FORWARDED_BY, shared.node.id.as_str())
        .header(FORWARDED_FOR, caller.as_str())
        .body(body);
    // The body's type, and a recording's byte range (the console's player seeks with it).
    for name in [header::CONTENT_TYPE, header::RANGE] {
        if let Some(value) = parts.headers.get(&name) {
            outgoing = outgoing.header(name, value.clone());
        }
    }
    info!(
        call_id = %target.id.as_str(),
        node = %owner,
        admin_url = %admin_url,
        method = %parts.method,
        path = %parts.uri.path(),
        token = %caller,
        "Operator request forwarded to the node that holds the call."
    );
    let unreachable = |why: String| {
        warn!(node = %owner, admin_url = %admin_url, error = %why, "Could not forward an operator request: the call's node did not answer.");
        error(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!(
                "the call is held by node {owner:?} ({admin_url}), which did not answer: {why}"
            ),
            Extra {
                node: Some(owner),
                admin_url: Some(&admin_url),
                ..Extra::default()
            },
        )
    };
    let answer = match tokio::time::timeout(ANSWER_TIMEOUT, outgoing.send()).await {
        Err(_) => {
            return (
                "unreachable",
                unreachable(format!("no answer within {ANSWER_TIMEOUT:?}")),
            );
        }
        Ok(Err(e)) => return ("unreachable", unreachable(describe(&e))),
        Ok(Ok(answer)) => answer,
    };
    let status = answer.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        warn!(node = %owner, %status, "The call's node refused this node's cluster secret.");
        let refused = error(
            StatusCode::BAD_GATEWAY,
            "cluster_token_refused",
            format!(
                "node {owner:?} refused this node's cluster secret: every node needs the same \
                 [cluster] secret"
            ),
            Extra {
                node: Some(owner),
                admin_url: Some(&admin_url),
                ..Extra::default()
            },
        );
        return ("token_refused", refused);
    }
    ("relayed", relay(answer, owner))
}

/// An error's text with its causes (reqwest's own text hides the interesting part).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The headers of the owner's answer that are relayed.
const RELAYED: [header::HeaderName; 7] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
    header::CONTENT_DISPOSITION,
    header::RETRY_AFTER,
    header::CACHE_CONTROL,
];

/// The owner's answer as this node's: status, [`RELAYED`] headers, the body streamed.
fn relay(answer: reqwest::Response, owner: &str) -> Response {
    let status = answer.status();
    let mut headers = HeaderMap::new();
    for name in RELAYED {
        if let Some(v) = answer.headers().get(&name) {
            headers.insert(name, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(owner) {
        headers.insert(NODE_HEADER, v);
    }
    // Chunk by chunk as the owner sends them; an error ends the body (the client sees a cut
    // response, never a wrong one).
    let chunks = futures_util::stream::unfold(Some(answer), |answer| async move {
        let mut answer = answer?;
        match answer.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(answer))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    let mut response = Response::new(Body::from_stream(chunks));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
