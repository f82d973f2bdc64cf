//! Tools run off the call task: HTTP tools declared in the route, and CallBridge's
//! agent-terminate. Each answers with a [`ToolDone`] whose `output` the model reads: the
//! answer's body on success, `{"error": ...}` naming the problem otherwise.

use std::time::Duration;

use callgate_agent::CallInfo;
use callgate_flow::template::UrlTemplate;
use serde_json::{Value, json};

use crate::core::ToolDone;
use crate::settings::HttpTool;

/// The most of an answer handed to the model, bytes (a longer one is cut, and says so).
pub(crate) const MAX_OUTPUT: usize = 16 * 1024;
/// How long a tool may take when its route does not say.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP client for tools and speech (rustls on ring, installed as the process's provider
/// if none is). It follows no redirect: a 3xx is the tool's answer (an error), so a server
/// cannot send the call's data or a secret header somewhere else.
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    // `Err`: a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Calls an HTTP tool with validated `arguments`; `url` is its URL template, rendered with
/// the call's variables (a value that would change the URL's path fails the call, with no
/// request).
pub(crate) async fn run_http(
    http: &reqwest::Client,
    tool: &HttpTool,
    url: &UrlTemplate,
    headers: &[(String, String)],
    call: &CallInfo,
    call_id: String,
    arguments: &Value,
) -> ToolDone {
    let timeout = tool.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
    let method = tool.method.http();
    let vars = call.variables();
    let url = match url.render(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)) {
        Ok(url) => url,
        Err(e) => {
            return ToolDone {
                call_id,
                ok: false,
                output: json!({"error": format!("{}: {e}", tool.name)}).to_string(),
            };
        }
    };
    let mut request = http
        .request(method, &url)
        .timeout(timeout)
        .header("x-callgate-call-id", &call.call_id);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    request = if tool.method.uses_query() {
        let query: Vec<(String, String)> = arguments
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        request.query(&query)
    } else {
        request.json(arguments)
    };
    finish(call_id, request, timeout, &tool.name).await
}

/// Asks CallBridge's OPEN API to end the call, with `message` announced first.
pub(crate) async fn agent_terminate(
    http: &reqwest::Client,
    api: Option<&(String, String)>,
    call: &CallInfo,
    call_id: String,
    arguments: &Value,
) -> ToolDone {
    let Some((url, key)) = api else {
        return ToolDone {
            call_id,
            ok: false,
            output: json!({"error": "CallBridge's OPEN API is not configured"}).to_string(),
        };
    };
    let var = |name: &str| {
        call.variables()
            .into_iter()
            .find(|(k, _)| *k == name)
            .map_or(String::new(), |(_, v)| v.to_owned())
    };
    let body = json!({
        "ivrIp": var("ivrIp"),
        "id": var("agentId"),
        "cdrId": var("cdrId"),
        "callerNo": var("caller"),
        "calleeNo": var("callee"),
        "actionId": var("callActionId"),
        "ment": arguments.get("message").and_then(Value::as_str).unwrap_or(""),
    });
    let request = http
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .timeout(DEFAULT_TIMEOUT);
    finish(call_id, request, DEFAULT_TIMEOUT, "agent_terminate").await
}

async fn finish(
    call_id: String,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    name: &str,
) -> ToolDone {
    let fail = |call_id: String, error: String| ToolDone {
        call_id,
        ok: false,
        output: json!({ "error": error }).to_string(),
    };
    let late = || {
        format!(
            "{name} did not answer within {}",
            humantime::format_duration(timeout)
        )
    };
    let mut answer = match request.send().await {
        Ok(a) => a,
        Err(e) if e.is_timeout() => return fail(call_id, late()),
        Err(e) => return fail(call_id, format!("{name} could not be reached: {e}")),
    };
    let status = answer.status();
    let mut body = Vec::new();
    let mut cut = false;
    loop {
        match answer.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_OUTPUT.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    cut = true;
                    break;
                }
            }
            Ok(None) => break,
            Err(e) if e.is_timeout() => return fail(call_id, late()),
            Err(e) => return fail(call_id, format!("{name}: reading the answer failed: {e}")),
        }
    }
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if cut {
        text.push_str(" [cut: the answer was longer]");
    }
    if status.is_success() {
        ToolDone {
            call_id,
            ok: true,
            output: if text.is_empty() {
                json!({"ok": true}).to_string()
            } else {
                text
            },
        }
    } else {
        let shown: String = text.chars().take(1000).collect();
        ToolDone {
            call_id,
            ok: false,
            output: json!({"error": format!("{name} answered HTTP {}", status.as_u16()),
                           "body": shown})
            .to_string(),
        }
    }
}
