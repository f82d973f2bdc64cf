//! The call port's HTTP refusals: the answers to an upgrade request that may not become a
//! call, before any WebSocket exists. Each has the admin API's error body, `{"code", "error"}`
//! (a stable code from [`REFUSAL_CODES`], which is also the refusal's
//! `callgate_connections_refused_total` reason, and a message for people), with
//! `Content-Type: application/json`, a `Content-Length` and `Connection: close`.

use serde::Serialize;
use tokio_tungstenite::tungstenite::handshake::server::ErrorResponse;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};

use crate::call_auth::Refusal as AuthRefusal;

/// Every code the call port refuses an upgrade with: the code, its HTTP status, and what it
/// means.
pub(crate) const REFUSAL_CODES: [(&str, u16, &str); 8] = [
    (
        "missing_key",
        401,
        "no API key (`Authorization: Bearer`, `x-api-key` or `apiKey=`) and keys are required",
    ),
    (
        "bad_key",
        401,
        "the API key is not one of the configured keys",
    ),
    (
        "missing_twilio_signature",
        401,
        "no `X-Twilio-Signature` (and no valid key) on `/twilio`",
    ),
    (
        "bad_twilio_signature",
        401,
        "`X-Twilio-Signature` does not sign the URL with the configured auth token",
    ),
    (
        "address_not_allowed",
        403,
        "the client's address is not on the `[call_auth]` allowlist",
    ),
    (
        "draining",
        503,
        "the node is draining: it takes no new calls (`Retry-After: 1`)",
    ),
    (
        "pending_limit",
        503,
        "too many connections are waiting to become calls (`Retry-After: 1`)",
    ),
    (
        "pending_per_ip",
        503,
        "too many connections from this address are waiting to become calls (`Retry-After: 1`)",
    ),
];

/// `Retry-After` of the call port's 503s, seconds. Short: a caller behind a load balancer is
/// retried on another node at once; one dialling this node directly learns it is busy.
pub(crate) const RETRY_AFTER: &str = "1";

/// What a draining node's 503 says.
const DRAINING: &str = "draining: this node takes no new calls; try another node";

/// The body of every refusal.
#[derive(Debug, Serialize)]
struct Body<'a> {
    code: &'a str,
    error: &'a str,
}

/// The JSON body of a refusal.
fn body(code: &str, error: &str) -> String {
    // A struct of two strings always serialises.
    serde_json::to_string(&Body { code, error }).unwrap_or_default()
}

/// The status of a listed code.
fn status(code: &str) -> StatusCode {
    REFUSAL_CODES
        .iter()
        .find(|(c, ..)| *c == code)
        .and_then(|(_, status, _)| StatusCode::from_u16(*status).ok())
        .unwrap_or(StatusCode::FORBIDDEN)
}

/// A refusal answered through tungstenite's upgrade (which writes the body after the head
/// but no length of its own).
fn response(code: &str, error: &str) -> ErrorResponse {
    let body = body(code, error);
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status(code);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    *response.body_mut() = Some(body);
    response
}

/// The answer to an upgrade the call port's keys or allowlist refuse: 401 (with
/// `WWW-Authenticate: Bearer`) or 403.
pub(crate) fn unauthorized(refusal: AuthRefusal) -> ErrorResponse {
    let mut response = response(refusal.as_str(), refusal.reason());
    if response.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// The answer to an upgrade while the node drains: 503 with `Retry-After`.
pub(crate) fn draining() -> ErrorResponse {
    let mut response = response("draining", DRAINING);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
    response
}

/// The whole answer (head and JSON body) to a connection turned away at accept, written
/// straight to its socket: 503 with `Retry-After`.
pub(crate) fn service_unavailable(code: &str, error: &str) -> Vec<u8> {
    let body = body(code, error);
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {RETRY_AFTER}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTH_REFUSALS: [AuthRefusal; 5] = [
        AuthRefusal::MissingKey,
        AuthRefusal::BadKey,
        AuthRefusal::NotAllowed,
        AuthRefusal::MissingSignature,
        AuthRefusal::BadSignature,
    ];

    fn listed(code: &str) -> u16 {
        REFUSAL_CODES
            .iter()
            .find(|(c, _, _)| *c == code)
            .map_or_else(|| panic!("{code} is not in REFUSAL_CODES"), |(_, s, _)| *s)
    }

    fn json(response: &ErrorResponse) -> serde_json::Value {
        let body = response.body().as_deref().expect("a body");
        assert_eq!(
            response.headers()[header::CONTENT_LENGTH],
            body.len().to_string().as_str()
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        serde_json::from_str(body).expect("JSON")
    }

    #[test]
    fn every_refusal_is_json_with_a_listed_code_and_its_status() {
        let mut used = Vec::new();
        for refusal in AUTH_REFUSALS {
            let response = unauthorized(refusal);
            let body = json(&response);
            let code = body["code"].as_str().expect("a code");
            assert_eq!(response.status().as_u16(), listed(code), "{code}");
            assert_eq!(response.status().as_u16(), refusal.status(), "{code}");
            assert_eq!(body["error"], refusal.reason());
            assert_eq!(
                response.headers().contains_key(header::WWW_AUTHENTICATE),
                response.status() == StatusCode::UNAUTHORIZED
            );
            used.push(code.to_owned());
        }
        let response = draining();
        let body = json(&response);
        assert_eq!(body["code"], "draining");
        assert_eq!(response.status().as_u16(), listed("draining"));
        assert_eq!(response.headers()[header::RETRY_AFTER], RETRY_AFTER);
        used.push("draining".to_owned());
        // The turned-away answers: their test is `admission`'s.
        used.extend(["pending_limit".to_owned(), "pending_per_ip".to_owned()]);
        // Every listed code is used, once.
        used.sort();
        let mut codes: Vec<String> = REFUSAL_CODES
            .iter()
            .map(|(c, _, _)| (*c).to_owned())
            .collect();
        codes.sort();
        assert_eq!(used, codes);
    }
}
