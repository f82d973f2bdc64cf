//! CallBridge's OPEN API: where it is ([`CallBridgeApi`], the server's `[callbridge]`), the
//! key read once ([`OpenApi`]), and the requests every agent sends the same way:
//! `agent-terminate` ([`terminate_body`]) and a text message to the caller,
//! `messages/send-direct` ([`Sms`], [`sms_body`], [`OpenApi::send_sms`]).
//!
//! # Text messages
//! `POST {base_url}/messages/send-direct` with the key as a Bearer token and
//! `{"agentId", "cdrId", "messageType", "title"?, "content"}`. `agentId` is a number there
//! while the call's `call_config` carries it as a string: a value that is not a number is
//! refused before any request. The type is chosen here: `LMS` when a title is given or the
//! content is longer than a short message holds ([`SMS_BYTES`] bytes as Korean carriers count
//! them: 2 for a Hangul or any other non-ASCII character, 1 for ASCII), `SMS` otherwise. The
//! title (LMS only) is at most [`MAX_TITLE`] characters, the content at most [`MAX_CONTENT`].
//! The answer is `{"code": "OK", "timestamp", "message", "data": {...}}`: `data` (the masked
//! phone number, the result) is what callers get back. The content is never logged.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

/// CallBridge's OPEN API: where it is and the environment variable holding its key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallBridgeApi {
    /// The API's base URL (`https://callbridge.example.com/api`): `agent_terminate` POSTs to
    /// `{base_url}/calls/agent-terminate`.
    pub base_url: String,
    /// The environment variable holding the API key (sent as `Authorization: Bearer KEY`).
    pub api_key_env: String,
}

/// Why `[callbridge]` cannot work for an agent that calls the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// `base_url` is not a URL.
    #[error("[callbridge] base_url {url:?}: {problem}")]
    BaseUrl {
        /// The setting.
        url: String,
        /// What the URL parser said.
        problem: String,
    },
    /// `base_url` is a URL, but not http(s).
    #[error("[callbridge] base_url {url:?} is not http(s)")]
    NotHttp {
        /// The setting.
        url: String,
    },
    /// The variable `api_key_env` names is not set.
    #[error("{what} needs CallBridge's API key in ${var} ([callbridge] api_key_env)")]
    NoKey {
        /// The feature that needs it (a step, a tool).
        what: String,
        /// The variable.
        var: String,
    },
    /// There is no `[callbridge]` at all.
    #[error(
        "{what} needs CallBridge's OPEN API: [callbridge] base_url and api_key_env (set) in \
         the server's configuration"
    )]
    Missing {
        /// The feature that needs it (a step, a tool).
        what: String,
    },
}

impl CallBridgeApi {
    /// Checks the settings for an agent that will call the API (`what` names the feature in
    /// the error): an http(s) base URL and the key's variable set. Warns when the key would
    /// cross the network in clear text.
    pub fn check(&self, what: &str) -> Result<(), SettingsError> {
        let url = reqwest::Url::parse(&self.base_url).map_err(|e| SettingsError::BaseUrl {
            url: self.base_url.clone(),
            problem: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SettingsError::NotHttp {
                url: self.base_url.clone(),
            });
        }
        crate::plaintext::warn_if_exposed("[callbridge] base_url", &self.base_url);
        std::env::var(&self.api_key_env)
            .map(|_| ())
            .map_err(|_| SettingsError::NoKey {
                what: what.to_owned(),
                var: self.api_key_env.clone(),
            })
    }

    /// The API with its key read now; `None` when the key's variable is not set.
    pub fn open(&self) -> Option<OpenApi> {
        let key = std::env::var(&self.api_key_env).ok()?;
        crate::plaintext::warn_if_exposed("[callbridge] base_url", &self.base_url);
        Some(OpenApi {
            base_url: self.base_url.trim_end_matches('/').to_owned(),
            key,
        })
    }
}

/// The error for an agent that needs the API when `[callbridge]` is missing.
pub fn missing(what: &str) -> SettingsError {
    SettingsError::Missing {
        what: what.to_owned(),
    }
}

/// CallBridge's OPEN API with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenApi {
    base_url: String,
    key: String,
}

impl std::fmt::Debug for OpenApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenApi")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl OpenApi {
    /// The API key (never logged: `Debug` leaves it out).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `{base_url}/calls/agent-terminate`.
    pub fn terminate_url(&self) -> String {
        format!("{}/calls/agent-terminate", self.base_url)
    }

    /// `{base_url}/messages/send-direct`.
    pub fn send_direct_url(&self) -> String {
        format!("{}/messages/send-direct", self.base_url)
    }

    /// Sends a text message (`body` from [`sms_body`]) through `messages/send-direct`: the
    /// answer's `data`, or why not.
    pub async fn send_sms(
        &self,
        http: &reqwest::Client,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, SmsError> {
        let request = http
            .post(self.send_direct_url())
            .bearer_auth(&self.key)
            .json(body)
            .timeout(timeout);
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                SmsError::Timeout(timeout)
            } else {
                // Without the URL's details beyond the error's own words.
                SmsError::Unreachable(e.to_string())
            }
        };
        let answer = request.send().await.map_err(failed)?;
        let status = answer.status().as_u16();
        let read = crate::http::read_bounded(answer, crate::http::MAX_ANSWER)
            .await
            .map_err(failed)?;
        if read.cut {
            return Err(SmsError::BadAnswer(format!(
                "larger than {} bytes",
                crate::http::MAX_ANSWER
            )));
        }
        parse_sms_answer(status, &read.body)
    }

    /// POSTs `body` (see [`terminate_body`]) to `agent-terminate`: status and body, or why
    /// not.
    pub async fn terminate(
        &self,
        http: &reqwest::Client,
        body: &Value,
        timeout: Duration,
    ) -> Result<(u16, Bytes), crate::http::Error> {
        crate::http::post_json(http, &self.terminate_url(), Some(&self.key), body, timeout).await
    }
}

/// The body of `agent-terminate` for a call whose variables `var` looks up; `ment` is what
/// CallBridge announces before it drops the line.
pub fn terminate_body<'a>(var: impl Fn(&str) -> Option<&'a str>, ment: &str) -> Value {
    let v = |name: &str| var(name).unwrap_or("").to_owned();
    json!({
        "ivrIp": v("ivrIp"),
        "id": v("agentId"),
        "cdrId": v("cdrId"),
        "callerNo": v("caller"),
        "calleeNo": v("callee"),
        "actionId": v("callActionId"),
        "ment": ment,
    })
}

/// The longest title of a long message (LMS), characters.
pub const MAX_TITLE: usize = 40;
/// The longest content of a message, characters.
pub const MAX_CONTENT: usize = 2000;
/// What a short message (SMS) holds, bytes as Korean carriers count them (EUC-KR: 2 for a
/// Hangul or other non-ASCII character, 1 for ASCII); longer content goes as LMS.
pub const SMS_BYTES: usize = 90;

/// Why a text message was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SmsError {
    /// The content is empty.
    #[error("the content is empty")]
    EmptyContent,
    /// The content is longer than [`MAX_CONTENT`] characters.
    #[error("the content is {0} characters; at most {MAX_CONTENT}")]
    ContentTooLong(usize),
    /// The title is longer than [`MAX_TITLE`] characters.
    #[error("the title is {0} characters; at most {MAX_TITLE}")]
    TitleTooLong(usize),
    /// The call's `agentId` is not a number (CallBridge's API takes a number).
    #[error("the call's agentId {0:?} is not a number")]
    AgentId(String),
    /// The call has no `cdrId` (not a CallBridge call).
    #[error("the call has no cdrId: text messages work on CallBridge calls only")]
    NoCdrId,
    /// The API could not be reached.
    #[error("CallBridge's OPEN API could not be reached: {0}")]
    Unreachable(String),
    /// The API did not answer in time.
    #[error("CallBridge's OPEN API did not answer within {0:?}")]
    Timeout(Duration),
    /// The API answered with an error (an HTTP error status, or a `code` other than `OK`).
    #[error("CallBridge refused the message (HTTP {status}, code {code:?}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The answer's `code`, if it had one.
        code: Option<String>,
        /// The answer's `message` (or the start of its body).
        message: String,
    },
    /// The answer is not what the API documents.
    #[error("CallBridge's answer is not readable: {0}")]
    BadAnswer(String),
}

/// The type of a text message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// A short message (no title).
    Sms,
    /// A long message, with an optional title.
    Lms,
}

impl MessageType {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sms => "SMS",
            Self::Lms => "LMS",
        }
    }
}

/// A text message to the caller, checked: content not empty and at most [`MAX_CONTENT`]
/// characters, a title of at most [`MAX_TITLE`].
#[derive(Clone, PartialEq, Eq)]
pub struct Sms {
    content: String,
    title: Option<String>,
}

impl std::fmt::Debug for Sms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The content is the caller's business: its length only.
        f.debug_struct("Sms")
            .field("content_chars", &self.content.chars().count())
            .field("title", &self.title)
            .finish()
    }
}

impl Sms {
    /// A message of `content` (trimmed), with `title` (trimmed; empty means none).
    pub fn new(content: &str, title: Option<&str>) -> Result<Self, SmsError> {
        let content = content.trim();
        if content.is_empty() {
            return Err(SmsError::EmptyContent);
        }
        let chars = content.chars().count();
        if chars > MAX_CONTENT {
            return Err(SmsError::ContentTooLong(chars));
        }
        let title = title.map(str::trim).filter(|t| !t.is_empty());
        if let Some(t) = title {
            let chars = t.chars().count();
            if chars > MAX_TITLE {
                return Err(SmsError::TitleTooLong(chars));
            }
        }
        Ok(Self {
            content: content.to_owned(),
            title: title.map(str::to_owned),
        })
    }

    /// `LMS` with a title or content over [`SMS_BYTES`], `SMS` otherwise.
    pub fn message_type(&self) -> MessageType {
        let bytes: usize = self
            .content
            .chars()
            .map(|c| if c.is_ascii() { 1 } else { 2 })
            .sum();
        if self.title.is_some() || bytes > SMS_BYTES {
            MessageType::Lms
        } else {
            MessageType::Sms
        }
    }

    /// The content's length, characters (for records: the content itself never is).
    pub fn content_chars(&self) -> usize {
        self.content.chars().count()
    }
}

/// The body of `messages/send-direct` for the call whose variables `var` looks up.
pub fn sms_body<'a>(var: impl Fn(&str) -> Option<&'a str>, sms: &Sms) -> Result<Value, SmsError> {
    let agent = var("agentId").unwrap_or("").trim();
    let agent_id: u64 = agent
        .parse()
        .map_err(|_| SmsError::AgentId(agent.to_owned()))?;
    let cdr_id = var("cdrId")
        .filter(|c| !c.is_empty())
        .ok_or(SmsError::NoCdrId)?;
    let kind = sms.message_type();
    let mut body = json!({
        "agentId": agent_id,
        "cdrId": cdr_id,
        "messageType": kind.as_str(),
        "content": sms.content,
    });
    if let (MessageType::Lms, Some(title)) = (kind, &sms.title) {
        body["title"] = json!(title);
    }
    Ok(body)
}

/// Reads `messages/send-direct`'s answer: its `data` when `code` is `OK` on a 2xx.
pub fn parse_sms_answer(status: u16, body: &[u8]) -> Result<Value, SmsError> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let code = field("code");
    let message = field("message")
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
    if !(200..300).contains(&status) {
        return Err(SmsError::Refused {
            status,
            code,
            message,
        });
    }
    let Some(answer) = parsed else {
        return Err(SmsError::BadAnswer("not JSON".into()));
    };
    match code.as_deref() {
        Some("OK") => {}
        Some(_) => {
            return Err(SmsError::Refused {
                status,
                code,
                message,
            });
        }
        None => return Err(SmsError::BadAnswer("no \"code\"".into())),
    }
    match answer.get("data") {
        Some(data) if data.is_object() => Ok(data.clone()),
        _ => Err(SmsError::BadAnswer("no \"data\" object".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(list: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |n| list.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn a_short_message_is_sms_and_a_title_or_long_content_makes_it_lms() {
        let call = [("agentId", "17"), ("cdrId", "c-9")];
        let short = Sms::new(" 요금은 3만원입니다 ", None).unwrap();
        assert_eq!(short.message_type(), MessageType::Sms);
        assert_eq!(
            sms_body(vars(&call), &short).unwrap(),
            json!({"agentId": 17, "cdrId": "c-9", "messageType": "SMS",
                   "content": "요금은 3만원입니다"})
        );
        // 45 Hangul are 90 bytes: still SMS; one more is LMS.
        assert_eq!(
            Sms::new(&"가".repeat(45), None).unwrap().message_type(),
            MessageType::Sms
        );
        assert_eq!(
            Sms::new(&"가".repeat(46), None).unwrap().message_type(),
            MessageType::Lms
        );
        assert_eq!(
            Sms::new(&"a".repeat(91), None).unwrap().message_type(),
            MessageType::Lms
        );
        let titled = Sms::new("세부 내역", Some("요금 안내")).unwrap();
        assert_eq!(
            sms_body(vars(&call), &titled).unwrap(),
            json!({"agentId": 17, "cdrId": "c-9", "messageType": "LMS",
                   "title": "요금 안내", "content": "세부 내역"})
        );
        assert!(!format!("{titled:?}").contains("세부"), "{titled:?}");
    }

    #[test]
    fn bad_messages_and_calls_are_refused_before_any_request() {
        assert_eq!(Sms::new("  ", None), Err(SmsError::EmptyContent));
        assert_eq!(
            Sms::new(&"가".repeat(MAX_CONTENT + 1), None),
            Err(SmsError::ContentTooLong(MAX_CONTENT + 1))
        );
        assert!(Sms::new(&"가".repeat(MAX_CONTENT), None).is_ok());
        assert_eq!(
            Sms::new("x", Some(&"제".repeat(41))),
            Err(SmsError::TitleTooLong(41))
        );
        let sms = Sms::new("x", None).unwrap();
        assert_eq!(
            sms_body(vars(&[("agentId", "agent-main"), ("cdrId", "c")]), &sms),
            Err(SmsError::AgentId("agent-main".into()))
        );
        assert_eq!(
            sms_body(vars(&[("agentId", "3")]), &sms),
            Err(SmsError::NoCdrId)
        );
    }

    #[test]
    fn the_answer_is_its_data_when_ok_and_a_typed_error_otherwise() {
        let ok = br#"{"code":"OK","timestamp":"2026-12-07T10:00:00Z","message":"sent",
            "data":{"siteId":1,"cdrId":"c","agentId":17,"messageType":"SMS",
                    "phoneNumber":"010****1234","result":"SUCCESS","requestedAt":"x"}}"#;
        let data = parse_sms_answer(200, ok).unwrap();
        assert_eq!(data["phoneNumber"], "010****1234");
        assert_eq!(
            parse_sms_answer(400, br#"{"code":"INVALID","message":"content too long"}"#),
            Err(SmsError::Refused {
                status: 400,
                code: Some("INVALID".into()),
                message: "content too long".into()
            })
        );
        assert!(matches!(
            parse_sms_answer(503, b"down"),
            Err(SmsError::Refused {
                status: 503,
                code: None,
                ..
            })
        ));
        assert!(matches!(
            parse_sms_answer(200, br#"{"code":"FAIL","message":"no"}"#),
            Err(SmsError::Refused { status: 200, .. })
        ));
        assert!(matches!(
            parse_sms_answer(200, b"<html>"),
            Err(SmsError::BadAnswer(_))
        ));
        assert!(matches!(
            parse_sms_answer(200, br#"{"code":"OK"}"#),
            Err(SmsError::BadAnswer(_))
        ));
    }

    #[tokio::test]
    async fn an_api_that_does_not_answer_in_time_is_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and never answers.
        let app = axum::Router::new().fallback(std::future::pending::<&'static str>);
        let api = OpenApi {
            base_url: format!("http://{addr}/api"),
            key: "k".into(),
        };
        let http = crate::http::client().unwrap();
        let body = json!({});
        let timeout = Duration::from_millis(200);
        let result = tokio::select! {
            served = axum::serve(listener, app) => panic!("the server stopped: {served:?}"),
            r = api.send_sms(&http, &body, timeout) => r,
        };
        assert_eq!(result, Err(SmsError::Timeout(timeout)));
    }

    #[test]
    fn the_terminate_body_names_the_call_and_leaves_unknown_values_empty() {
        let vars = [("agentId", "7"), ("cdrId", "c-1"), ("caller", "0101")];
        let body = terminate_body(
            |n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
            "bye",
        );
        assert_eq!(
            body,
            json!({"ivrIp": "", "id": "7", "cdrId": "c-1", "callerNo": "0101",
                   "calleeNo": "", "actionId": "", "ment": "bye"})
        );
    }

    #[test]
    fn the_url_has_one_slash_and_the_key_is_not_in_debug() {
        let api = OpenApi {
            base_url: "http://127.0.0.1:9/api".into(),
            key: "secret".into(),
        };
        assert_eq!(
            api.terminate_url(),
            "http://127.0.0.1:9/api/calls/agent-terminate"
        );
        assert!(!format!("{api:?}").contains("secret"));
    }
}
