//! CallBridge's OPEN API: where it is ([`CallBridgeApi`], the server's `[callbridge]`), the
//! key read once ([`OpenApi`]), and the `agent-terminate` request every agent sends the same
//! way ([`terminate_body`]).

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

impl CallBridgeApi {
    /// Checks the settings for an agent that will call the API (`what` names the feature in
    /// the error): an http(s) base URL and the key's variable set. Warns when the key would
    /// cross the network in clear text.
    pub fn check(&self, what: &str) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| format!("[callbridge] base_url {:?}: {e}", self.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "[callbridge] base_url {:?} is not http(s)",
                self.base_url
            ));
        }
        crate::plaintext::warn_if_exposed("[callbridge] base_url", &self.base_url);
        std::env::var(&self.api_key_env).map(|_| ()).map_err(|_| {
            format!(
                "{what} needs CallBridge's API key in ${} ([callbridge] api_key_env)",
                self.api_key_env
            )
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
pub fn missing(what: &str) -> String {
    format!(
        "{what} needs CallBridge's OPEN API: [callbridge] base_url and api_key_env (set) in \
         the server's configuration"
    )
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

    /// POSTs `body` (see [`terminate_body`]) to `agent-terminate`: status and body, or why
    /// not.
    pub async fn terminate(
        &self,
        http: &reqwest::Client,
        body: &Value,
        timeout: Duration,
    ) -> Result<(u16, Bytes), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
