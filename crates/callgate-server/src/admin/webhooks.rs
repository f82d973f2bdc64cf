//! `GET /api/webhooks/deliveries`: this node's webhook deliveries that wait or were given up
//! (read role). The deliveries themselves are [`crate::webhooks`]'.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use callgate_store::outbox::Delivery;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::Shared;
use crate::admin::error::{ApiError, ErrorBody};
use crate::admin::params::{bad_query, limit, refuse_unknown};
use crate::webhooks::with_outbox;

/// The most rows `GET /api/webhooks/deliveries` returns.
const MAX_DELIVERIES: u32 = 1000;

/// The query string of `GET /api/webhooks/deliveries` (kept as text: a bad value is refused
/// with its own code).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeliveriesQuery {
    /// How many rows, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Any other key, refused by name.
    #[serde(flatten)]
    #[param(ignore)]
    unknown: BTreeMap<String, String>,
}

/// The answer of `GET /api/webhooks/deliveries`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryList {
    /// The rows, oldest first.
    deliveries: Vec<Delivery>,
    /// How many of this node's deliveries are pending (not given up).
    pending: u64,
}

/// `GET /api/webhooks/deliveries?limit=N`: this node's webhook deliveries waiting (pending)
/// or given up (failed), oldest first, and how many are pending.
#[utoipa::path(
    get,
    path = "/api/webhooks/deliveries",
    tag = "events",
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "Pending and failed deliveries", body = DeliveryList),
        (status = 400, description = "`bad_query` or `bad_limit`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn deliveries(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    refuse_unknown::<DeliveriesQuery>(&query.unknown)?;
    let limit = limit(query.limit.as_deref(), 100, MAX_DELIVERIES)?;
    let node = shared.node.id.clone();
    let (rows, pending) = with_outbox(&shared.deliveries.outbox, move |o| {
        Ok((o.list(&node, limit)?, o.pending(&node)?))
    })
    .await
    .map_err(ApiError::store)?;
    shared
        .call
        .metrics
        .webhook_pending
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
    Ok(Json(DeliveryList {
        deliveries: rows,
        pending,
    }))
}
