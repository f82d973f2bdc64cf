//! `GET /api/openapi.json`: the OpenAPI 3.1 document of the admin API.
//!
//! The document is not written here: `utoipa` builds it from the handlers' own
//! `#[utoipa::path]` attributes and the `ToSchema`/`IntoParams` types they take and answer
//! with, collected by the admin API's table of endpoints as the router is built. This module
//! only adds what no handler knows: the title, the security schemes and which of them each
//! operation takes, decided by the same functions the authorization layer runs
//! ([`is_open`], [`role_needed`]). The document is serialised once, when the router is built,
//! and served as those bytes.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, SecurityRequirement};

use crate::admin::authorize::{is_open, role_needed};
use crate::admin::error::{ApiError, ErrorBody};
use crate::admin::session::COOKIE;

/// The name of the bearer token scheme in the document.
pub(crate) const BEARER: &str = "bearer";
/// The name of the console's session cookie scheme in the document.
pub(crate) const SESSION: &str = "session";

/// The serialised document, shared by every request.
#[derive(Debug, Clone)]
pub(crate) struct Document(Arc<Result<Bytes, serde_json::Error>>);

impl Document {
    /// The finished document of the routes `api` describes, serialised.
    pub(crate) fn new(api: OpenApi) -> Self {
        let bytes = serde_json::to_vec(&finish(api)).map(Bytes::from);
        Self(Arc::new(bytes))
    }
}

/// The admin API described: OpenAPI 3.1, generated from the handlers' own types (this very
/// document included).
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "node",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        (status = 500, description = "`internal`: the document could not be serialised",
            body = ErrorBody),
    )
)]
pub(crate) async fn document(Extension(document): Extension<Document>) -> Response {
    match &*document.0 {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes.clone()).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the OpenAPI document could not be serialised: {e}"),
        )
        .into_response(),
    }
}

/// Adds the title, the security schemes and each operation's requirements.
pub(crate) fn finish(mut api: OpenApi) -> OpenApi {
    api.info = InfoBuilder::new()
        .title("callgate admin API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The admin API of a callgate node: health, metrics, call records, their events, \
             transcripts and recordings, operator actions on live calls, the live event \
             stream, webhook deliveries, the node roster and the console's sign-in. Every \
             error is JSON, `{\"code\", \"error\"}` (see the `ErrorBody` schema for the codes). \
             With admin tokens configured, reading needs a token of role `read` and anything \
             else `operator` (the role names are the scopes below); with none configured, \
             the (loopback) API needs no credentials.",
        ))
        .build();
    let components = api.components.get_or_insert_with(Default::default);
    components.schemas.extend(crate::events::schemas());
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An admin token (`[[admin.tokens]]`): `Authorization: Bearer <token>`",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        SESSION,
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
            COOKIE,
            "The console's session, from `POST /api/session` (HttpOnly, SameSite=Strict); a \
             change made with it needs an `Origin` naming this host",
        ))),
    );
    for (path, item) in api.paths.paths.iter_mut() {
        let operations = [
            (Method::GET, &mut item.get),
            (Method::PUT, &mut item.put),
            (Method::POST, &mut item.post),
            (Method::DELETE, &mut item.delete),
            (Method::OPTIONS, &mut item.options),
            (Method::HEAD, &mut item.head),
            (Method::PATCH, &mut item.patch),
            (Method::TRACE, &mut item.trace),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else {
                continue;
            };
            operation.security = Some(security(path, &method));
        }
    }
    api
}

/// What `method` on `path` takes: nothing on the open paths; else a token or a session of the
/// role the authorization layer asks, or nothing at all when no tokens are configured (`{}`).
fn security(path: &str, method: &Method) -> Vec<SecurityRequirement> {
    if is_open(path) {
        return vec![SecurityRequirement::default()];
    }
    let role = [role_needed(method).as_str()];
    vec![
        SecurityRequirement::new(BEARER, role),
        SecurityRequirement::new(SESSION, role),
        SecurityRequirement::default(),
    ]
}
