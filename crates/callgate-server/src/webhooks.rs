//! Webhooks (`[[webhooks]]`): the events of the live stream (`events`), POSTed to each
//! endpoint as [Standard Webhooks](https://www.standardwebhooks.com/) messages, at least once,
//! in order.
//!
//! # Delivery
//! The store writer adds a row to the outbox for each event an endpoint subscribes to, in
//! the transaction of the write it reports (`callgate_store::outbox`). Each endpoint has one
//! delivery task: it takes the head of the endpoint's queue (its oldest row not given up),
//! waits until it is due, signs it (`webhook-id`: the event id, the same on every attempt;
//! `webhook-timestamp`: now; `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of
//! `id.timestamp.body` under the endpoint's secret) and POSTs it with the endpoint's timeout.
//! A 2xx deletes the row; anything else (another status, a timeout, no connection) schedules
//! the next attempt by [`Retry::next`]: at most a minute apart during the row's first hour,
//! then backing off to once an hour, given up (kept, as `failed`) after `give_up_after`.
//!
//! # Policies
//! - One request in flight per endpoint (it keeps the order), so a receiver that never
//!   answers holds one connection, for at most its timeout, and delays only its own queue.
//! - The delivery tasks touch the database through their own connection, on the blocking
//!   pool, never the store writer's queue or a call task: a dead receiver never slows calls.
//! - New rows wake the tasks (the event hub's publish); a due time or `IDLE_POLL` (5 s) wakes
//!   them otherwise (rows from before a restart, rows the PostgreSQL journal replayed).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use callgate_store::UnixMillis;
use callgate_store::notice::Kind;
use callgate_store::outbox::{Delivery, Outbox, Subscription};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often a delivery task with nothing to do looks at the outbox anyway.
pub(crate) const IDLE_POLL: Duration = Duration::from_secs(5);
/// The most of a receiver's answer read (its body is not used).
const MAX_ANSWER: usize = 4096;

/// One `[[webhooks]]` endpoint.
#[derive(Clone)]
pub struct Endpoint {
    /// Where events are POSTed (`http://` or `https://`).
    pub url: String,
    /// The event types it takes; `None`: all (`*`).
    pub events: Option<Vec<Kind>>,
    /// The signing key: the base64-decoded part of the `whsec_...` secret.
    pub secret: Vec<u8>,
    /// How long one attempt may take (connect, send, answer).
    pub timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"<hidden>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why an endpoint's settings are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The URL is not an absolute `http://` or `https://` URL.
    #[error("url {0:?} is not an http:// or https:// URL")]
    Url(String),
    /// An event name that is none of the event types (nor `*`).
    #[error(
        "events: {0:?} is not an event type (call.started, call.answered, call.dtmf, call.transcript, call.ended, node.serving, node.draining, node.stopping, node.lost, or *)"
    )]
    Event(String),
    /// `events` is empty.
    #[error("events is empty (use [\"*\"] for every event)")]
    NoEvents,
    /// The secret is not `whsec_` and base64.
    #[error("the secret is not whsec_ followed by base64 ({0})")]
    Secret(&'static str),
    /// Two endpoints have the same URL (the outbox keeps one queue per URL).
    #[error("url {0:?} is given twice")]
    Duplicate(String),
}

impl Endpoint {
    /// An endpoint from its settings: `url`, `events` (names, or `*`), and the secret text
    /// (`whsec_` and base64, as Standard Webhooks writes it).
    pub fn parse(
        url: &str,
        events: &[String],
        secret: &str,
        timeout: Duration,
    ) -> Result<Self, EndpointError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| EndpointError::Url(url.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(EndpointError::Url(url.to_owned()));
        }
        if events.is_empty() {
            return Err(EndpointError::NoEvents);
        }
        let kinds = if events.iter().any(|e| e == "*") {
            None
        } else {
            let kinds = events
                .iter()
                .map(|e| Kind::parse(e).ok_or_else(|| EndpointError::Event(e.clone())))
                .collect::<Result<Vec<_>, _>>()?;
            Some(kinds)
        };
        let key = secret
            .trim()
            .strip_prefix("whsec_")
            .ok_or(EndpointError::Secret("no whsec_ prefix"))?;
        let secret = STANDARD
            .decode(key)
            .map_err(|_| EndpointError::Secret("not base64"))?;
        if secret.len() < 16 {
            return Err(EndpointError::Secret("shorter than 16 bytes"));
        }
        Ok(Self {
            url: url.to_owned(),
            events: kinds,
            secret,
            timeout,
        })
    }

    /// What the store writer enqueues for this endpoint.
    pub(crate) fn subscription(&self) -> Subscription {
        Subscription {
            endpoint: self.url.clone(),
            kinds: self.events.clone(),
        }
    }
}

/// Checks a list of endpoints as a whole (one queue per URL).
pub fn check(endpoints: &[Endpoint]) -> Result<(), EndpointError> {
    for (i, e) in endpoints.iter().enumerate() {
        if endpoints[..i].iter().any(|o| o.url == e.url) {
            return Err(EndpointError::Duplicate(e.url.clone()));
        }
    }
    Ok(())
}

/// The `webhook-signature` of a message: `v1,` and the base64 HMAC-SHA256 of
/// `id.timestamp.body` under `secret`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

/// When to try again (sans-IO: times are passed in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// The wait after the first failed attempt; it doubles with each failure, up to a
    /// minute while the row is less than an hour old.
    pub first: Duration,
    /// A row this old is given up (kept as `failed`).
    pub give_up_after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            give_up_after: Duration::from_secs(25 * 3600),
        }
    }
}

/// During a row's first hour, attempts are at most this far apart.
const EARLY_MAX: Duration = Duration::from_secs(60);
/// How long the early phase lasts.
const EARLY: Duration = Duration::from_secs(3600);
/// Later attempts are at most this far apart.
const LATE_MAX: Duration = Duration::from_secs(3600);

impl Retry {
    /// The next attempt of a row enqueued at `created` whose attempt number `attempts`
    /// (counted from one) just failed at `now`; `None`: give up. During the first hour: `first`, doubled with
    /// each failure, at most a minute. Then a tenth of the row's age (backing off), at most an
    /// hour; never past `created + give_up_after` by more than that wait, and one attempt is
    /// always made at or after it.
    pub fn next(&self, created: UnixMillis, attempts: u32, now: UnixMillis) -> Option<UnixMillis> {
        let age = Duration::from_millis(u64::try_from(now.0 - created.0).unwrap_or(0));
        if age >= self.give_up_after {
            return None;
        }
        let wait = if age < EARLY {
            let doubled = self
                .first
                .saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
            doubled.min(EARLY_MAX)
        } else {
            (age / 10).clamp(EARLY_MAX, LATE_MAX)
        };
        let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        // The last wait ends at the give-up time, so one attempt is made at (or after) it.
        let limit = created.0 + i64::try_from(self.give_up_after.as_millis()).unwrap_or(i64::MAX);
        Some(UnixMillis((now.0 + ms).min(limit.max(now.0 + 1))))
    }
}

/// What one attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A 2xx.
    Delivered(u16),
    /// Another status.
    Refused(u16),
    /// No answer within the timeout.
    Timeout,
    /// No connection (refused, reset, DNS...).
    Unreachable,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Delivered(_) => "delivered",
            Self::Refused(_) => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
        }
    }

    fn status(&self) -> String {
        match self {
            Self::Delivered(s) | Self::Refused(s) => s.to_string(),
            Self::Timeout => "timeout".into(),
            Self::Unreachable => "unreachable".into(),
        }
    }
}

/// The HTTP client for webhooks: rustls on ring, no redirects (a 3xx is an answer that is
/// not 2xx, so it is retried, never followed).
pub(crate) fn client() -> Result<reqwest::Client, reqwest::Error> {
    // `Err`: a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// One attempt: signs `row` now and POSTs it.
pub(crate) async fn attempt(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    row: &Delivery,
) -> Outcome {
    let timestamp = UnixMillis::now().0 / 1000;
    let signature = sign(&endpoint.secret, &row.event_id, timestamp, &row.body);
    let request = http
        .post(&endpoint.url)
        .timeout(endpoint.timeout)
        .header("content-type", "application/json")
        .header("webhook-id", &row.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(row.body.clone());
    let answer = match request.send().await {
        Ok(a) => a,
        Err(e) if e.is_timeout() => return Outcome::Timeout,
        Err(_) => return Outcome::Unreachable,
    };
    let status = answer.status().as_u16();
    // Read (a bounded part of) the answer, so the connection can be reused.
    let mut answer = answer;
    let mut read = 0;
    while read < MAX_ANSWER {
        match tokio::time::timeout(endpoint.timeout, answer.chunk()).await {
            Ok(Ok(Some(chunk))) => read += chunk.len(),
            _ => break,
        }
    }
    if (200..300).contains(&status) {
        Outcome::Delivered(status)
    } else {
        Outcome::Refused(status)
    }
}

/// The delivery side: one task per endpoint over a shared outbox connection.
pub(crate) struct Deliveries {
    /// The outbox connection; the tasks take turns on it, on the blocking pool.
    pub(crate) outbox: Arc<Mutex<Outbox>>,
    /// Woken when new events were published (there may be new rows).
    pub(crate) wake: Arc<Notify>,
    pub(crate) node: String,
    pub(crate) retry: Retry,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Runs `f` on the outbox off the runtime.
pub(crate) async fn with_outbox<T: Send + 'static>(
    outbox: &Arc<Mutex<Outbox>>,
    f: impl FnOnce(&mut Outbox) -> Result<T, callgate_store::Error> + Send + 'static,
) -> Result<T, callgate_store::Error> {
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || {
        let mut o = outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut o)
    })
    .await
    .map_err(|_| callgate_store::Error::Closed)?
}

impl Deliveries {
    /// Delivers `endpoint`'s queue until `stop`.
    pub(crate) async fn run(
        self: Arc<Self>,
        endpoint: Endpoint,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let http = match client() {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, url = %endpoint.url, "Cannot build the webhook HTTP client; this endpoint gets nothing.");
                return;
            }
        };
        let mut failing = false;
        loop {
            // Registered before looking, so a publish between the look and the wait wakes us.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let (node, url) = (self.node.clone(), endpoint.url.clone());
            let head = with_outbox(&self.outbox, move |o| o.head(&node, &url)).await;
            // `(wait, wake)`: how long to sleep, and whether new events cut it short (only
            // when the queue was empty: a head waiting for its retry time stays first).
            let (wait, wake) = match head {
                Err(error) => {
                    tracing::warn!(%error, url = %endpoint.url, "Cannot read the webhook outbox; trying again.");
                    (IDLE_POLL, false)
                }
                Ok(None) => (IDLE_POLL, true),
                Ok(Some(row)) => {
                    let now = UnixMillis::now();
                    match row.next_attempt {
                        Some(due) if due > now => (
                            Duration::from_millis(u64::try_from(due.0 - now.0).unwrap_or(0)),
                            false,
                        ),
                        _ => {
                            let outcome = tokio::select! {
                                o = attempt(&http, &endpoint, &row) => o,
                                () = stop.cancelled() => return,
                            };
                            failing = self
                                .settle(&endpoint, &row, outcome, &metrics, failing)
                                .await;
                            (Duration::ZERO, false)
                        }
                    }
                }
            };
            if stop.is_cancelled() {
                return;
            }
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut woken, if wake => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Records an attempt's outcome; returns whether the endpoint is failing now.
    async fn settle(
        &self,
        endpoint: &Endpoint,
        row: &Delivery,
        outcome: Outcome,
        metrics: &Metrics,
        was_failing: bool,
    ) -> bool {
        metrics
            .webhook_attempts
            .get_or_create(&[("result", outcome.label())])
            .inc();
        let seq = row.seq;
        let status = outcome.status();
        let delivered = matches!(outcome, Outcome::Delivered(_));
        let now = UnixMillis::now();
        let result = match outcome {
            Outcome::Delivered(_) => {
                metrics
                    .webhook_delay
                    .observe((now.0 - row.created_at.0).max(0) as f64 / 1000.0);
                if was_failing {
                    tracing::info!(url = %endpoint.url, "Webhook endpoint answers again.");
                }
                with_outbox(&self.outbox, move |o| o.delivered(seq)).await
            }
            _ => {
                let next = self.retry.next(row.created_at, row.attempts + 1, now);
                if next.is_none() {
                    metrics.webhook_failed.inc();
                    tracing::error!(
                        url = %endpoint.url,
                        event_id = %row.event_id,
                        attempts = row.attempts + 1,
                        status,
                        "Gave up a webhook delivery after its retry period."
                    );
                } else if !was_failing {
                    tracing::warn!(
                        url = %endpoint.url,
                        status,
                        "Webhook endpoint failed; retrying (its events wait in the outbox, in order)."
                    );
                }
                let s = status.clone();
                with_outbox(&self.outbox, move |o| o.attempt_failed(seq, &s, next)).await
            }
        };
        if let Err(error) = result {
            tracing::warn!(%error, url = %endpoint.url, "Cannot update the webhook outbox; the attempt is repeated.");
        }
        let node = self.node.clone();
        if let Ok(n) = with_outbox(&self.outbox, move |o| o.pending(&node)).await {
            metrics
                .webhook_pending
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        !delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn parses_endpoints_and_refuses_bad_ones() {
        let e = Endpoint::parse(
            "https://crm.example/hooks",
            &["call.ended".into(), "call.started".into()],
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(e.events, Some(vec![Kind::CallEnded, Kind::CallStarted]));
        assert!(e.subscription().wants(Kind::CallEnded));
        assert!(!e.subscription().wants(Kind::CallDtmf));
        let all = Endpoint::parse(
            "http://127.0.0.1:9/x",
            &["*".into()],
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(all.subscription().wants(Kind::NodeLost));
        let bad = |url: &str, events: &[&str], secret: &str| {
            let events: Vec<String> = events.iter().map(|s| (*s).to_owned()).collect();
            Endpoint::parse(url, &events, secret, Duration::from_secs(5)).unwrap_err()
        };
        let ok_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert!(matches!(
            bad("ftp://x/", &["*"], ok_secret),
            EndpointError::Url(_)
        ));
        assert!(matches!(
            bad("not a url", &["*"], ok_secret),
            EndpointError::Url(_)
        ));
        assert!(matches!(
            bad("http://x/", &["call.nope"], ok_secret),
            EndpointError::Event(_)
        ));
        assert_eq!(bad("http://x/", &[], ok_secret), EndpointError::NoEvents);
        assert!(matches!(
            bad("http://x/", &["*"], "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            EndpointError::Secret(_)
        ));
        assert!(matches!(
            bad("http://x/", &["*"], "whsec_!!!"),
            EndpointError::Secret(_)
        ));
        assert!(matches!(
            bad("http://x/", &["*"], "whsec_AAAA"),
            EndpointError::Secret(_)
        ));
        assert_eq!(
            check(&[all.clone(), all.clone()]),
            Err(EndpointError::Duplicate(all.url.clone()))
        );
    }

    #[test]
    fn retries_within_a_minute_for_an_hour_then_back_off_then_give_up() {
        let r = Retry::default();
        let t0 = UnixMillis(1_000_000_000);
        let at = |s: i64| UnixMillis(t0.0 + s * 1000);
        let wait = |attempts: u32, now: UnixMillis| r.next(t0, attempts, now).map(|n| n.0 - now.0);
        assert_eq!(wait(1, t0), Some(1000));
        assert_eq!(wait(2, at(1)), Some(2000));
        assert_eq!(wait(7, at(100)), Some(60_000));
        assert_eq!(
            wait(30, at(3599)),
            Some(60_000),
            "at most a minute in the first hour"
        );
        // Simulate an hour of failures: no gap over a minute, and every attempt is made.
        let (mut now, mut n, mut gaps) = (t0, 1, Vec::new());
        while now.0 - t0.0 < 3_600_000 {
            let next = r.next(t0, n, now).unwrap();
            gaps.push(next.0 - now.0);
            now = next;
            n += 1;
        }
        assert!(
            gaps.iter().all(|g| *g <= 60_000) && gaps.len() > 55,
            "{gaps:?}"
        );
        // Then backing off, at most an hour apart; and there is an attempt at 25 h.
        assert_eq!(wait(90, at(2 * 3600)), Some(720_000));
        assert_eq!(wait(99, at(20 * 3600)), Some(3_600_000));
        let last = r.next(t0, 120, at(25 * 3600 - 10)).unwrap();
        assert_eq!(last, at(25 * 3600));
        assert_eq!(r.next(t0, 121, at(25 * 3600)), None);
    }
}
