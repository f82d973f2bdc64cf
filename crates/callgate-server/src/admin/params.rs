//! What the admin API reads from a request's path and query string, checked before a handler
//! acts: call ids, flow message names, `limit`, pages (`after`), and query strings with no key
//! it does not know.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::StatusCode;
use axum::http::request::Parts;
use callgate_store::{CallId, Page};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::admin::error::ApiError;

/// A call id from the path (`{id}`), checked before anything looks it up: a UUIDv7, as the
/// store makes them. Anything else is a 400 `bad_call_id`.
#[derive(IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
pub(crate) struct ValidId(
    /// The call's id (a UUIDv7, as `GET /api/calls` lists them).
    pub(crate) CallId,
);

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
pub(crate) fn bad_call_id(what: &str, text: &str) -> ApiError {
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

/// A query string refused by axum (a key given twice...): 400 `bad_query`.
pub(crate) fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", rejection.body_text())
}

/// A 400 `bad_query` naming the first key of `unknown` (the keys a query struct `Q` does not
/// have) and the keys `Q` takes, as its document lists them: a typo is refused, never
/// ignored.
pub(crate) fn refuse_unknown<Q: IntoParams>(
    unknown: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let Some(key) = unknown.keys().next() else {
        return Ok(());
    };
    let known: Vec<String> = Q::into_params(|| None)
        .into_iter()
        .map(|p| p.name)
        .collect();
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_query",
        format!(
            "unknown query parameter {key:?} (known: {})",
            known.join(", ")
        ),
    ))
}

/// The most entries one page of an event log or transcript holds.
pub(crate) const MAX_PAGE: u32 = 1000;

/// The query string of an event log or transcript page (kept as text, as `GET /api/calls`'s).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// The page after this sequence number: the `next` of the previous page (default 0).
    #[param(value_type = Option<u64>)]
    after: Option<String>,
    /// How many entries, 1 to 1000 (default 1000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Any other key, refused by name ([`refuse_unknown`]).
    #[serde(flatten)]
    #[param(ignore)]
    unknown: BTreeMap<String, String>,
}

/// `?after=SEQ&limit=N` of an event log or transcript (anything else is a 400).
pub(crate) fn page(query: Result<Query<PageQuery>, QueryRejection>) -> Result<Page, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    refuse_unknown::<PageQuery>(&query.unknown)?;
    let after = match query.after {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_after",
                format!("after must be a sequence number, got {text:?}"),
            )
        })?,
    };
    let limit = limit(query.limit.as_deref(), MAX_PAGE, MAX_PAGE)?;
    Ok(Page { after, limit })
}

/// `?limit=N`: `default` when absent, else a whole number from 1 to `max` (else a 400).
pub(crate) fn limit(text: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    let Some(text) = text else {
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
pub(crate) fn next_after(page: Page, last: Option<u64>, len: usize) -> Option<u64> {
    (len == page.limit as usize).then_some(last).flatten()
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
