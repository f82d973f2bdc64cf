//! The event hub and `GET /api/stream`, the live event stream (server-sent events).
//!
//! # Where events come from
//! Call events (`call.started`, `call.answered`, `call.dtmf`, `call.transcript`,
//! `call.ended`) are made by the store writer from the operations of each batch, and handed
//! to the hub (its [`Tap`]) after the batch committed: one place, and nothing is announced
//! that the store does not hold. Node events (`node.serving`, `node.draining`,
//! `node.stopping`, `node.lost`), from the accept loop's phase changes and the heartbeat's
//! sweep, take the same path (`StoreHandle::announce`), so webhooks get them too. A call task never touches the hub: it only offers its writes to the
//! store writer, as before.
//!
//! # Policies
//! - [`Hub::publish`] never blocks: it holds the hub's lock to push each event into the
//!   replay ring ([`REPLAY`] events) and into a broadcast channel ([`CLIENT_QUEUE`] events).
//! - Each stream reads the broadcast channel at its own pace. A client more than
//!   [`CLIENT_QUEUE`] events behind (a slow reader, a stalled socket) is dropped: its stream
//!   gets a last `event: dropped` and ends; it may reconnect with `Last-Event-ID` and
//!   resume from the ring. The writer and the calls never wait for a client.
//! - `Last-Event-ID`: the events after that id that the ring still holds are sent first. An
//!   id the ring no longer holds (too old, or from before a restart) starts the stream with
//!   `event: reset` (the client missed events and should re-read `/api/calls`), then every
//!   event the ring holds.
//! - A comment (`: keep-alive`) every [`KEEP_ALIVE`], so proxies keep the connection open.
//! - Streams end when the server stops, after the store's last commit (the last `call.ended`
//!   of a shutdown is delivered).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use callgate_store::notice::{Notice, Tap};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::Shared;
use crate::metrics::Metrics;

/// How many recent events the hub keeps for clients that resume with `Last-Event-ID`.
pub(crate) const REPLAY: usize = 4096;
/// How far (in events) a stream may fall behind before it is dropped.
pub(crate) const CLIENT_QUEUE: usize = 1024;
/// The interval of the keep-alive comment.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The hub: the replay ring and the broadcast to every stream.
pub(crate) struct Hub {
    ring: Mutex<VecDeque<Arc<Notice>>>,
    tx: broadcast::Sender<Arc<Notice>>,
    /// Cancelled when the server stops: streams send what they hold, then end.
    closed: CancellationToken,
    /// Woken after each batch published (webhook deliveries wait on it).
    wake: Arc<Notify>,
    /// Set once the server's metrics exist (the store, which feeds the hub, starts first).
    metrics: OnceLock<Arc<Metrics>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// Where a new stream starts.
#[derive(Debug)]
pub(crate) struct Subscription {
    /// Whether the client's `Last-Event-ID` was not found (it missed events).
    pub(crate) reset: bool,
    /// Events to send before the live ones.
    pub(crate) replay: Vec<Arc<Notice>>,
    /// The live events after `replay`.
    pub(crate) live: broadcast::Receiver<Arc<Notice>>,
}

impl Hub {
    pub(crate) fn new() -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(REPLAY)),
            tx: broadcast::channel(CLIENT_QUEUE).0,
            closed: CancellationToken::new(),
            wake: Arc::new(Notify::new()),
            metrics: OnceLock::new(),
        }
    }

    /// Counts into `metrics` from now on.
    pub(crate) fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn metrics(&self) -> Option<&Metrics> {
        self.metrics.get().map(|m| &**m)
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Notice>>> {
        // A push or pop leaves the ring valid, even if a holder panicked.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces one event to every stream (never blocks).
    pub(crate) fn publish_one(&self, notice: Notice) {
        let notice = Arc::new(notice);
        if let Some(m) = self.metrics() {
            m.events_published
                .get_or_create(&[("type", notice.kind.as_str())])
                .inc();
        }
        let mut ring = self.lock();
        if ring.len() == REPLAY {
            ring.pop_front();
        }
        ring.push_back(notice.clone());
        // No stream: nothing to do (the ring keeps it for the next one).
        let _ = self.tx.send(notice);
    }

    /// Notified after each publish: the webhook deliveries look for new rows.
    pub(crate) fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// A new stream, resuming after `last_event_id` if given.
    pub(crate) fn subscribe(&self, last_event_id: Option<&str>) -> Subscription {
        let ring = self.lock();
        // Under the ring's lock: no event is published between the replay and the live
        // receiver, so none is missed or sent twice.
        let live = self.tx.subscribe();
        let (reset, replay) = match last_event_id {
            None => (false, Vec::new()),
            Some(id) => match ring.iter().position(|n| n.id == id) {
                Some(i) => (false, ring.iter().skip(i + 1).cloned().collect()),
                None => (true, ring.iter().cloned().collect()),
            },
        };
        Subscription {
            reset,
            replay,
            live,
        }
    }

    /// The server stops: streams end once they have sent what they hold.
    pub(crate) fn close(&self) {
        self.closed.cancel();
    }
}

impl Tap for Hub {
    fn publish(&self, notices: &[Notice]) {
        for n in notices {
            self.publish_one(n.clone());
        }
        self.wake.notify_waiters();
    }
}

/// The SSE event of a notice: `event:` its type, `id:` its id, `data:` its webhook body.
fn sse_event(notice: &Notice) -> Event {
    Event::default()
        .event(notice.kind.as_str())
        .id(notice.id.as_str())
        .data(notice.body())
}

/// One client's stream: what it sends before the live events, then the live events.
struct Client {
    pending: VecDeque<Event>,
    live: broadcast::Receiver<Arc<Notice>>,
    hub: Arc<Hub>,
    done: bool,
    _guard: ClientGuard,
}

/// The `data:` of an event of the stream: the very body a webhook carries (Standard Webhooks
/// shape). Written by `Notice::body`; this type describes it for the OpenAPI document, and a
/// test checks that the two agree.
#[derive(Debug, Serialize, ToSchema)]
#[allow(
    dead_code,
    reason = "describes the bytes `Notice::body` writes, for the document only"
)]
pub(crate) struct EventMessage {
    /// The event's fields: for a call `call_id`, `external_id` and the event's own (see
    /// docs/events.md); for a node `node` and its own.
    data: serde_json::Map<String, serde_json::Value>,
    /// When it happened (RFC 3339, UTC, milliseconds).
    #[schema(format = DateTime)]
    timestamp: String,
    /// The event's type, also the SSE `event:`.
    #[schema(schema_with = kind_schema)]
    r#type: String,
}

/// The schema of [`EventMessage::type`]: one of the event types.
fn kind_schema() -> utoipa::openapi::schema::Object {
    use callgate_store::notice::Kind;
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(Kind::ALL.iter().map(|k| k.as_str())))
        .build()
}

/// The `data:` of `event: reset`: the client's `Last-Event-ID` is no longer held (it missed
/// events; re-read `/api/calls`), and every event held follows.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StreamReset<'a> {
    /// The id the client sent.
    last_event_id: Option<&'a str>,
}

/// The `data:` of `event: dropped`, the last event of a client too far behind.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StreamDropped {
    /// How many events a client may fall behind.
    limit: usize,
    /// How many events it missed.
    missed: u64,
    /// `too_slow`.
    #[schema(value_type = String, example = "too_slow")]
    reason: &'static str,
}

/// The schemas of the stream's `data:` payloads, for the document's components (an SSE body
/// is text: no operation refers to them on its own).
pub(crate) fn schemas() -> Vec<(
    String,
    utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
)> {
    use utoipa::PartialSchema as _;
    vec![
        (EventMessage::name().into_owned(), EventMessage::schema()),
        (StreamReset::name().into_owned(), StreamReset::schema()),
        (StreamDropped::name().into_owned(), StreamDropped::schema()),
    ]
}

/// `GET /api/stream`: the live event stream (see the module docs for its policies).
#[utoipa::path(
    get,
    path = "/api/stream",
    tag = "events",
    params(
        ("Last-Event-ID" = Option<String>, Header,
            description = "Resume after this event (the `id:` of the last event received)"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = String,
            description = "Server-sent events until the server stops. Each event: `event:` its \
                type (`call.started`, `call.answered`, `call.dtmf`, `call.transcript`, \
                `call.ended`, `node.serving`, `node.draining`, `node.stopping`, `node.lost`), \
                `id:` its id (for `Last-Event-ID`), `data:` an `EventMessage` (JSON). Also \
                `event: reset` (data: `StreamReset`) when the `Last-Event-ID` is no longer \
                held, `event: dropped` (data: `StreamDropped`) before the stream of a client \
                too far behind ends, and a `: keep-alive` comment every 15 s."),
    )
)]
pub(crate) async fn stream(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let hub = shared.events.clone();
    let sub = hub.subscribe(last);
    let mut pending = VecDeque::with_capacity(sub.replay.len() + 1);
    if sub.reset {
        pending.push_back(
            Event::default()
                .event("reset")
                .json_data(StreamReset {
                    last_event_id: last,
                })
                .unwrap_or_else(|_| Event::default().event("reset")),
        );
    }
    pending.extend(sub.replay.iter().map(|n| sse_event(n)));
    let client = Client {
        pending,
        live: sub.live,
        _guard: ClientGuard::new(hub.metrics.get().cloned()),
        hub,
        done: false,
    };
    let events = futures_util::stream::unfold(client, |mut c| async move {
        if let Some(event) = c.pending.pop_front() {
            return Some((Ok(event), c));
        }
        if c.done {
            return None;
        }
        let event = next_live(&mut c).await?;
        Some((Ok(event), c))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}

/// The next live event; a client too far behind gets `event: dropped` and its stream ends.
/// `None` once the server stops and the client has everything published before.
async fn next_live(c: &mut Client) -> Option<Event> {
    use broadcast::error::{RecvError, TryRecvError};
    let received = tokio::select! {
        r = c.live.recv() => r,
        () = c.hub.closed.cancelled() => match c.live.try_recv() {
            Ok(n) => Ok(n),
            Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(_) => Err(RecvError::Closed),
        },
    };
    match received {
        Ok(n) => Some(sse_event(&n)),
        Err(RecvError::Lagged(missed)) => {
            if let Some(m) = c.hub.metrics() {
                m.stream_dropped.inc();
            }
            tracing::debug!(
                missed,
                limit = CLIENT_QUEUE,
                "Dropping an event stream client that fell too far behind."
            );
            c.done = true;
            let data = StreamDropped {
                limit: CLIENT_QUEUE,
                missed,
                reason: "too_slow",
            };
            Some(
                Event::default()
                    .event("dropped")
                    .json_data(data)
                    .unwrap_or_else(|_| Event::default().event("dropped")),
            )
        }
        Err(RecvError::Closed) => None,
    }
}

/// Counts a connected stream for the metrics, until its stream is dropped.
struct ClientGuard(Option<Arc<Metrics>>);

impl ClientGuard {
    fn new(metrics: Option<Arc<Metrics>>) -> Self {
        if let Some(m) = &metrics {
            m.stream_clients.inc();
        }
        Self(metrics)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.stream_clients.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use callgate_store::UnixMillis;
    use callgate_store::notice::Kind;
    use serde_json::Map;

    use super::*;

    fn hub() -> Hub {
        Hub::new()
    }

    fn notice(i: usize) -> Notice {
        let mut data = Map::new();
        data.insert("i".into(), i.into());
        Notice::new(Kind::CallDtmf, UnixMillis(0), data)
    }

    #[test]
    fn the_documented_event_message_is_what_notices_write() {
        use utoipa::PartialSchema as _;
        let schema = serde_json::to_value(EventMessage::schema()).unwrap();
        let documented: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut data = Map::new();
        data.insert("call_id".into(), "x".into());
        for kind in Kind::ALL {
            let body: serde_json::Value =
                serde_json::from_str(&Notice::new(kind, UnixMillis(0), data.clone()).body())
                    .unwrap();
            let written: Vec<&str> = body
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(written, documented, "{}", kind.as_str());
            let kinds = schema["properties"]["type"]["enum"].as_array().unwrap();
            assert!(
                kinds.contains(&body["type"]),
                "{} is documented",
                kind.as_str()
            );
            assert!(body["data"].is_object() && body["timestamp"].is_string());
        }
        let required = schema["required"].as_array().unwrap();
        assert_eq!(
            required.len(),
            documented.len(),
            "every field is always there"
        );
    }

    #[test]
    fn resumes_after_the_last_event_id() {
        let hub = hub();
        let ids: Vec<String> = (0..5)
            .map(|i| {
                let n = notice(i);
                let id = n.id.clone();
                hub.publish_one(n);
                id
            })
            .collect();
        let sub = hub.subscribe(Some(&ids[2]));
        assert!(!sub.reset);
        let got: Vec<&str> = sub.replay.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(got, [ids[3].as_str(), ids[4].as_str()]);
        let fresh = hub.subscribe(None);
        assert!(fresh.replay.is_empty() && !fresh.reset);
    }

    #[test]
    fn an_id_the_ring_no_longer_holds_is_a_reset_with_the_whole_ring() {
        let hub = hub();
        let first = notice(0);
        let first_id = first.id.clone();
        hub.publish_one(first);
        for i in 1..=REPLAY {
            hub.publish_one(notice(i));
        }
        let sub = hub.subscribe(Some(&first_id));
        assert!(sub.reset);
        assert_eq!(sub.replay.len(), REPLAY);
        assert_eq!(sub.replay[0].data["i"], 1);
    }

    #[tokio::test]
    async fn a_client_too_far_behind_is_dropped_and_publishing_never_waits() {
        let hub = Arc::new(hub());
        let mut sub = hub.subscribe(None);
        for i in 0..CLIENT_QUEUE + 10 {
            hub.publish_one(notice(i));
        }
        assert!(matches!(
            sub.live.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }
}
