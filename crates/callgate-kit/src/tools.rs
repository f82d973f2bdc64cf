//! Tools an AI agent offers its model: built-in ones callgate carries out itself
//! ([`Builtin`]) and HTTP tools declared in the route ([`HttpTool`]), checked once at load
//! ([`check`]) and run off the call task ([`run_http`], [`agent_terminate`], [`send_sms`]). Each answers with
//! a [`ToolDone`] whose `output` the model reads: the answer's body on success (at most
//! [`crate::http::MAX_ANSWER`] bytes, cut with a note), `{"error": ...}` naming the problem
//! otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use callgate_agent::CallInfo;
use callgate_agent::catalog::SettingsError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Dur;
use crate::callbridge::OpenApi;
use crate::http::MAX_ANSWER;
use crate::schema::Schema;
use crate::template::UrlTemplate;

/// How long a tool may take when its route does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A tool's result, for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolDone {
    /// The model's id for this call of the tool.
    pub call_id: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// What the model is told (a result, or `{"error": ...}`).
    pub output: String,
}

/// A tool callgate carries out itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// End the call after the goodbye has played.
    HangUp,
    /// Send DTMF keys (protocol DTMF on inbound calls, an in-band tone on CallBridge).
    SendDtmf,
    /// End a CallBridge call through CallBridge's OPEN API (with an announcement).
    AgentTerminate,
    /// Send the caller a text message through CallBridge's OPEN API (CallBridge calls only).
    SendSms,
}

impl Builtin {
    /// The tool's name as the model sees it.
    pub fn name(self) -> &'static str {
        match self {
            Self::HangUp => "hang_up",
            Self::SendDtmf => "send_dtmf",
            Self::AgentTerminate => "agent_terminate",
            Self::SendSms => "send_sms",
        }
    }

    /// What the tool does, for the model.
    pub fn description(self) -> &'static str {
        match self {
            Self::HangUp => {
                "End the phone call. Say goodbye first: the call ends once your goodbye has \
                 played."
            }
            Self::SendDtmf => {
                "Press telephone keys on the line (for example to navigate another phone menu)."
            }
            Self::AgentTerminate => {
                "End the call through the call center, which can announce a closing message \
                 before the line drops."
            }
            Self::SendSms => {
                "Send the caller a text message (SMS) to the phone they are calling from, for \
                 example a link, an account number or a summary."
            }
        }
    }

    /// The arguments' JSON schema.
    pub fn parameters(self) -> Value {
        match self {
            Self::HangUp => json!({"type": "object", "properties": {"reason": {"type": "string",
                "description": "Why the call ends, in a few words."}}}),
            Self::SendDtmf => json!({"type": "object", "properties": {"digits": {"type": "string",
                "description": "The keys to press: 0-9, * and #."}},
                "required": ["digits"]}),
            Self::AgentTerminate => json!({"type": "object", "properties": {"message": {
                "type": "string",
                "description": "What the call center announces before hanging up."}}}),
            Self::SendSms => json!({"type": "object", "properties": {
                "content": {"type": "string", "maxLength": crate::callbridge::MAX_CONTENT,
                    "description": "The message text."},
                "title": {"type": "string", "maxLength": crate::callbridge::MAX_TITLE,
                    "description": "A short title (optional; makes it a long message)."}},
                "required": ["content"]}),
        }
    }

    /// Whether the tool calls CallBridge's OPEN API (offered on CallBridge calls only; the
    /// server's `[callbridge]` must be set).
    pub fn needs_open_api(self) -> bool {
        matches!(self, Self::AgentTerminate | Self::SendSms)
    }
}

/// An HTTP tool's method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// Arguments as query parameters.
    Get,
    /// Arguments as the JSON body.
    #[default]
    Post,
    /// Arguments as the JSON body.
    Put,
    /// Arguments as the JSON body.
    Patch,
    /// Arguments as query parameters.
    Delete,
}

impl Method {
    /// As reqwest takes it.
    pub fn http(self) -> reqwest::Method {
        match self {
            Self::Get => reqwest::Method::GET,
            Self::Post => reqwest::Method::POST,
            Self::Put => reqwest::Method::PUT,
            Self::Patch => reqwest::Method::PATCH,
            Self::Delete => reqwest::Method::DELETE,
        }
    }

    /// Whether the arguments go in the query (GET, DELETE) rather than the body.
    pub fn uses_query(self) -> bool {
        matches!(self, Self::Get | Self::Delete)
    }
}

/// An HTTP tool declared in the route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTool {
    /// The function name the model calls (`[a-zA-Z0-9_-]`, at most 64 characters).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// The arguments' JSON schema (an object schema).
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
    /// Where the request goes (`http` or `https`): a URL template over the call's variables
    /// (`https://crm.example.com/customers/{{caller}}`), values percent-encoded as data; no
    /// variable in the scheme, host or port.
    pub url: String,
    /// `POST` (default; arguments as the JSON body), `PUT`, `PATCH`, `GET` or `DELETE`
    /// (arguments as query parameters).
    #[serde(default)]
    pub method: Method,
    /// Headers sent as given.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers whose value is read from an environment variable at load (secrets).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// How long the request may take (default 10s).
    #[serde(default)]
    pub timeout: Option<Dur>,
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

/// Checks a route's tools: names unique (built-in ones included) and well formed, URL
/// templates and object schemas valid, secret headers' variables set. Errors name the field
/// (`tools[1].parameters.properties.n`).
pub fn check(builtin: &[Builtin], tools: &[HttpTool]) -> Result<(), SettingsError> {
    let mut names: Vec<&str> = builtin.iter().map(|b| b.name()).collect();
    for (i, tool) in tools.iter().enumerate() {
        let field = |f: &str| format!("tools[{i}].{f}");
        if tool.name.is_empty()
            || tool.name.len() > 64
            || !tool
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(SettingsError::new(
                field("name"),
                "1-64 characters of a-z, A-Z, 0-9, _ and -",
            ));
        }
        if names.contains(&tool.name.as_str()) {
            return Err(SettingsError::new(
                field("name"),
                format!("{:?} is already a tool", tool.name),
            ));
        }
        names.push(&tool.name);
        UrlTemplate::parse(&tool.url).map_err(|e| SettingsError::caused(field("url"), e))?;
        let schema = Schema::compile(&tool.parameters)
            .map_err(|(path, e)| SettingsError::new(field(&format!("parameters{path}")), e))?;
        if !schema.is_object() {
            return Err(SettingsError::new(
                field("parameters"),
                "must be an object schema (type = \"object\")",
            ));
        }
        for (header, var) in &tool.headers_env {
            if std::env::var(var).is_err() {
                return Err(SettingsError::new(
                    field(&format!("headers_env.{header}")),
                    format!("${var} is not set"),
                ));
            }
        }
    }
    Ok(())
}

/// A route's HTTP tools compiled: schemas, URL templates, and headers with their secrets
/// read at load.
#[derive(Debug)]
pub struct Compiled {
    /// Each tool's schema.
    pub schemas: Vec<Schema>,
    /// Each tool's URL template.
    pub urls: Vec<UrlTemplate>,
    /// Each tool's headers.
    pub headers: Vec<Vec<(String, String)>>,
}

impl Compiled {
    /// Compiles `tools` (checked by [`check`] already; errors name the field all the same).
    pub fn new(tools: &[HttpTool]) -> Result<Self, SettingsError> {
        let schemas = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Schema::compile(&t.parameters).map_err(|(path, e)| {
                    SettingsError::new(format!("tools[{i}].parameters{path}"), e)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let urls = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                UrlTemplate::parse(&t.url)
                    .map_err(|e| SettingsError::caused(format!("tools[{i}].url"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let headers = tools
            .iter()
            .map(|t| {
                let mut h: Vec<(String, String)> = t
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                h.extend(
                    t.headers_env
                        .iter()
                        .map(|(k, var)| (k.clone(), std::env::var(var).unwrap_or_default())),
                );
                h
            })
            .collect();
        Ok(Self {
            schemas,
            urls,
            headers,
        })
    }
}

/// Calls an HTTP tool with validated `arguments`; `url` is its URL template, rendered with
/// the call's variables (a value that would change the URL's path fails the call, with no
/// request).
pub async fn run_http(
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

/// Asks CallBridge's OPEN API to end the call, with the argument `message` announced first.
pub async fn agent_terminate(
    http: &reqwest::Client,
    api: Option<&OpenApi>,
    call: &CallInfo,
    call_id: String,
    arguments: &Value,
) -> ToolDone {
    let Some(api) = api else {
        return ToolDone {
            call_id,
            ok: false,
            output: json!({"error": "CallBridge's OPEN API is not configured"}).to_string(),
        };
    };
    let vars = call.variables();
    let body = crate::callbridge::terminate_body(
        |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v),
        arguments
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or(""),
    );
    let request = http
        .post(api.terminate_url())
        .bearer_auth(api.key())
        .json(&body)
        .timeout(DEFAULT_TIMEOUT);
    finish(call_id, request, DEFAULT_TIMEOUT, "agent_terminate").await
}

/// Sends the caller a text message through CallBridge's OPEN API: arguments `content` and
/// `title` (optional). The model reads the answer's `data` (the masked number, the result) or
/// the error; the content is never logged.
pub async fn send_sms(
    http: &reqwest::Client,
    api: Option<&OpenApi>,
    call: &CallInfo,
    call_id: String,
    arguments: &Value,
) -> ToolDone {
    let fail = |call_id: String, error: String| ToolDone {
        call_id,
        ok: false,
        output: json!({ "error": error }).to_string(),
    };
    let Some(api) = api else {
        return fail(call_id, "CallBridge's OPEN API is not configured".into());
    };
    let Some(content) = arguments.get("content").and_then(Value::as_str) else {
        return fail(call_id, "content (a string) is required".into());
    };
    let title = arguments.get("title").and_then(Value::as_str);
    let vars = call.variables();
    let body = crate::callbridge::Sms::new(content, title).and_then(|sms| {
        crate::callbridge::sms_body(
            |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v),
            &sms,
        )
    });
    let body = match body {
        Ok(body) => body,
        Err(e) => return fail(call_id, e.to_string()),
    };
    match api.send_sms(http, &body, DEFAULT_TIMEOUT).await {
        Ok(data) => ToolDone {
            call_id,
            ok: true,
            output: json!({ "sent": true, "data": data }).to_string(),
        },
        Err(e) => fail(call_id, e.to_string()),
    }
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
    let answer = match request.send().await {
        Ok(a) => a,
        Err(e) if e.is_timeout() => return fail(call_id, late()),
        Err(e) => return fail(call_id, format!("{name} could not be reached: {e}")),
    };
    let status = answer.status();
    let read = match crate::http::read_bounded(answer, MAX_ANSWER).await {
        Ok(read) => read,
        Err(e) if e.is_timeout() => return fail(call_id, late()),
        Err(e) => return fail(call_id, format!("{name}: reading the answer failed: {e}")),
    };
    let mut text = String::from_utf8_lossy(&read.body).into_owned();
    if read.cut {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::ParseError;

    #[test]
    fn a_bad_url_template_stays_the_settings_errors_source() {
        let tool: HttpTool = serde_json::from_value(json!({
            "name": "lookup", "description": "d", "url": "https://{{siteId}}.example.com/x"
        }))
        .unwrap();
        let tools = [tool];
        for error in [
            check(&[], &tools).unwrap_err(),
            Compiled::new(&tools).unwrap_err(),
        ] {
            assert_eq!(error.field, "tools[0].url");
            let cause = std::error::Error::source(&error)
                .and_then(|s| s.downcast_ref::<ParseError>())
                .expect("the template's error is the source");
            assert!(matches!(cause, ParseError::Place { .. }), "{cause:?}");
            assert_eq!(error.problem, cause.to_string());
        }
    }
}
