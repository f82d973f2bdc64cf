//! A local double of CallBridge's OPEN API for agents' tests: `POST /api/calls/agent-terminate`
//! and `POST /api/messages/send-direct`, both behind `Authorization: Bearer KEY`.
//!
//! `send-direct` checks the body as the API documents it (`agentId` a number, `cdrId` a
//! string, `messageType` `SMS` or `LMS`, a `title` on LMS only and of at most 40 characters,
//! `content` of at most 2,000) and answers `{"code": "OK", "timestamp", "message", "data":
//! {"siteId", "cdrId", "agentId", "messageType", "phoneNumber" (masked), "result",
//! "requestedAt"}}`, or `400` with `{"code": "INVALID_REQUEST", "message"}`. Answers can be
//! scripted per request (an HTTP error, no answer at all, an unreadable answer). Requests are
//! kept for assertions; a test waits for them on a notification, never on time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// A scripted answer of the double.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// As documented: `code` `OK` and the data (the default).
    Ok,
    /// This HTTP status with `{"code": "ERROR", "message"}`.
    Status(u16),
    /// No answer at all (the request waits until the client gives up).
    Never,
    /// `200` with a body that is not the documented JSON.
    Garbage,
}

/// A request the double received.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `terminate` or `sms`.
    pub endpoint: &'static str,
    /// The `Authorization` header.
    pub authorization: String,
    /// The JSON body.
    pub body: Value,
}

#[derive(Debug, Default)]
struct Inner {
    answers: VecDeque<Answer>,
    requests: Vec<Request>,
}

#[derive(Debug)]
struct Shared {
    key: String,
    inner: Mutex<Inner>,
    changed: Notify,
}

/// The double: where it listens and what it was asked.
#[derive(Debug, Clone)]
pub struct OpenApiDouble {
    base_url: String,
    shared: Arc<Shared>,
}

impl OpenApiDouble {
    /// Starts the double on 127.0.0.1; requests must carry `key`.
    pub async fn start(key: &str) -> Self {
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
        });
        let app = Router::new()
            .route("/api/calls/agent-terminate", post(terminate))
            .route("/api/messages/send-direct", post(send_direct))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let addr = listener.local_addr().expect("its address");
        callgate_server::Tasks::new().spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://{addr}/api"),
            shared,
        }
    }

    /// The API's base URL (`http://127.0.0.1:PORT/api`), as `[callbridge] base_url` takes it.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.shared.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Scripts the answer to the next request (unscripted ones are [`Answer::Ok`]).
    pub fn answer(&self, answer: Answer) {
        self.with(|i| i.answers.push_back(answer));
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.with(|i| i.requests.clone())
    }

    /// The `send-direct` requests' bodies so far.
    pub fn messages(&self) -> Vec<Value> {
        self.with(|i| {
            i.requests
                .iter()
                .filter(|r| r.endpoint == "sms")
                .map(|r| r.body.clone())
                .collect()
        })
    }

    /// Waits until `check` holds over what was asked (woken by each request).
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                if check(self) {
                    return;
                }
                changed.await;
            }
        };
        // A bound so a broken agent fails the test instead of hanging it.
        if tokio::time::timeout(std::time::Duration::from_secs(30), wait)
            .await
            .is_err()
        {
            panic!("the OPEN API double never saw {what}");
        }
    }

    fn take(&self, endpoint: &'static str, headers: &HeaderMap, body: Value) -> Option<Answer> {
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let answer = self.with(|i| {
            i.requests.push(Request {
                endpoint,
                authorization: authorization.clone(),
                body,
            });
            i.answers.pop_front()
        });
        self.shared.changed.notify_waiters();
        if authorization != format!("Bearer {}", self.shared.key) {
            return Some(Answer::Status(401));
        }
        answer
    }
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"code": code, "timestamp": "2026-12-07T00:00:00Z",
                          "message": message})),
    )
        .into_response()
}

/// A scripted answer other than [`Answer::Ok`], if any.
async fn scripted(answer: Option<Answer>) -> Option<Response> {
    match answer? {
        Answer::Ok => None,
        Answer::Status(401) => Some(error(401, "UNAUTHORIZED", "invalid API key")),
        Answer::Status(code) => Some(error(code, "ERROR", "scripted failure")),
        Answer::Never => std::future::pending().await,
        Answer::Garbage => Some((StatusCode::OK, "<html>maintenance</html>").into_response()),
    }
}

async fn terminate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let double = OpenApiDouble {
        base_url: String::new(),
        shared,
    };
    let answer = double.take("terminate", &headers, body);
    if let Some(response) = scripted(answer).await {
        return response;
    }
    axum::Json(json!({"code": "OK", "timestamp": "2026-12-07T00:00:00Z", "message": "ok"}))
        .into_response()
}

/// Why a `send-direct` body is not what the API documents.
fn invalid(body: &Value) -> Option<String> {
    let Some(agent) = body.get("agentId") else {
        return Some("agentId is required".into());
    };
    if !agent.is_u64() {
        return Some("agentId must be a number".into());
    }
    if !body.get("cdrId").is_some_and(Value::is_string) {
        return Some("cdrId must be a string".into());
    }
    let kind = body.get("messageType").and_then(Value::as_str);
    if !matches!(kind, Some("SMS" | "LMS")) {
        return Some("messageType must be SMS or LMS".into());
    }
    match body.get("title") {
        None => {}
        Some(_) if kind == Some("SMS") => return Some("title is for LMS only".into()),
        Some(Value::String(t)) if t.chars().count() <= 40 => {}
        Some(_) => return Some("title: at most 40 characters".into()),
    }
    match body.get("content") {
        Some(Value::String(c)) if !c.is_empty() && c.chars().count() <= 2000 => None,
        _ => Some("content: 1 to 2000 characters".into()),
    }
}

async fn send_direct(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let double = OpenApiDouble {
        base_url: String::new(),
        shared,
    };
    let answer = double.take("sms", &headers, body.clone());
    if let Some(response) = scripted(answer).await {
        return response;
    }
    if let Some(problem) = invalid(&body) {
        return error(400, "INVALID_REQUEST", &problem);
    }
    axum::Json(json!({
        "code": "OK",
        "timestamp": "2026-12-07T00:00:00Z",
        "message": "the message was requested",
        "data": {
            "siteId": 1,
            "cdrId": body["cdrId"],
            "agentId": body["agentId"],
            "messageType": body["messageType"],
            "phoneNumber": "010****1234",
            "result": "REQUESTED",
            "requestedAt": "2026-12-07T00:00:00Z",
        }
    }))
    .into_response()
}
