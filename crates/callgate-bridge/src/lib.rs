//! The `bridge` agent: a call relayed to the user's own voice bot, callgate playing Twilio
//! Media Streams towards it, so a bot written for Twilio (Pipecat's `TwilioFrameSerializer`, a
//! FastAPI or Node service) answers CallBridge, inbound-API and Twilio calls unchanged except
//! for the URL it is reached on.
//!
//! A route runs it with `agent = "bridge"` and its `[routes.settings]`
//! ([`settings::BridgeSettings`], documented in `docs/bridge.md`). Everything that can be
//! checked is checked when the routes load: the URL template, the headers and their
//! variables, the CA file, the auth token's variable, the custom parameters' templates, and the
//! fallback is rendered to audio then.
//!
//! # Layout
//! - [`settings`]: the route's settings and their validation.
//! - [`url`]: the bot URL template (`ws://`/`wss://`) and `X-Twilio-Signature`.
//! - [`core`]: the sans-IO core of one call: the messages to the bot (counters, timestamps),
//!   the bot's audio queue, marks and clears, the end and the fallback, the record.
//! - `link`: the bot's WebSocket, polled by the driver on the call's own task (no second task,
//!   no channel hop per frame).
//! - [`metrics`]: the shared metrics (connects, failures, disconnects, marks, clears, bytes),
//!   merged from each call's counts every second and at its end.
//! - `agent`: the driver: the call's events, the link's events and time into the core; its
//!   outputs carried out.
//!
//! # Invariants
//! - The bot's marks come back in order, each only once the call's playout has played the
//!   audio before it to the caller, or at once when a clear (the bot's, a barge-in, an
//!   operator's) drops it.
//! - The bot's socket is read while its audio waits (up to 120 s of it), so a `clear` acts at
//!   once.
//! - The bot closing (1000/1001) ends the call after its queued audio; a bot that cannot be
//!   reached or drops gets the route's fallback; the record's `bridge` events say which.

mod agent;
pub mod core;
mod link;
pub mod metrics;
pub mod settings;
pub mod url;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use callgate_agent::catalog::{self, SettingsError};
use callgate_agent::{AgentFactory, CallInfo, Catalog, PhoneInfo};
use callgate_audio::AudioFormat;
use callgate_kit::AgentEnv;
use callgate_kit::audio::PromptAudio;
use callgate_kit::template::Template;

pub use metrics::{BridgeCollector, BridgeMetrics};
pub use settings::BridgeSettings;

use crate::settings::FallbackKind;
use crate::url::BotUrl;

/// The agent's name in routes.
pub const NAME: &str = "bridge";

/// What every call of a route shares: its settings, compiled and loaded.
#[derive(Debug)]
pub struct Plan {
    /// The settings.
    pub settings: BridgeSettings,
    url: BotUrl,
    /// The static headers and those from the environment, read at load.
    headers: Vec<(String, String)>,
    /// The Twilio auth token, read at load.
    auth_token: Option<String>,
    custom_parameters: Option<Vec<(String, Template)>>,
    /// The fallback, μ-law 8 kHz pieces (empty: hang up).
    fallback: Vec<Bytes>,
    tls: Arc<rustls::ClientConfig>,
}

/// Registers the `bridge` agent in `catalog`, counting into the process's metrics
/// ([`BridgeMetrics::process`]). `env` gives the data dir (the speech cache) and the server's
/// `[tts]` (for the fallback message).
pub fn register(catalog: &mut Catalog, env: AgentEnv) {
    register_with(catalog, env, BridgeMetrics::process());
}

/// [`register`], counting into `metrics` (expose them with a [`BridgeCollector`]).
pub fn register_with(catalog: &mut Catalog, env: AgentEnv, metrics: Arc<BridgeMetrics>) {
    catalog.register(NAME, move |settings| {
        let settings = catalog::parse::<BridgeSettings>(settings)?;
        let plan = plan(settings, &env)?;
        Ok(Arc::new(agent::BridgeFactory::new(plan, metrics.clone())) as Arc<dyn AgentFactory>)
    });
}

/// Builds a route's plan: templates compiled, secrets read, the fallback rendered.
pub fn plan(settings: BridgeSettings, env: &AgentEnv) -> Result<Plan, SettingsError> {
    let url = BotUrl::parse(&settings.url).map_err(|e| SettingsError::caused("url", e))?;
    let mut headers: Vec<(String, String)> = settings
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (name, var) in &settings.headers_env {
        let value = std::env::var(var).map_err(|_| {
            SettingsError::new(format!("headers_env.{name}"), format!("${var} is not set"))
        })?;
        if value
            .bytes()
            .any(|b| b != b'\t' && !(b' '..=b'~').contains(&b))
        {
            return Err(SettingsError::new(
                format!("headers_env.{name}"),
                format!("${var} is not a valid header value"),
            ));
        }
        headers.push((name.clone(), value));
    }
    let auth_token = match &settings.twilio_auth_token_env {
        Some(var) => Some(
            std::env::var(var)
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    SettingsError::new("twilio_auth_token_env", format!("${var} is not set"))
                })?,
        ),
        None => None,
    };
    let custom_parameters = match &settings.custom_parameters {
        Some(params) => Some(
            params
                .iter()
                .map(|(name, text)| {
                    Template::parse(text)
                        .map(|t| (name.clone(), t))
                        .map_err(|e| SettingsError::caused(format!("custom_parameters.{name}"), e))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let tls = callgate_kit::tls::client_config(settings.ca_file.as_deref())
        .map_err(|e| SettingsError::caused("ca_file", e))?;
    let fallback = match settings.fallback {
        FallbackKind::Hangup => Vec::new(),
        FallbackKind::Message => {
            let tts = callgate_kit::TtsSettings {
                voice: settings.tts_voice.clone().or_else(|| env.tts.voice.clone()),
                ..env.tts.clone()
            };
            callgate_kit::tts::render(&tts, &env.data_dir, &settings.fallback_message)
                .map_err(|e| SettingsError::caused("fallback_message", e))?
                .chunks(AudioFormat::Ulaw8000)
        }
        FallbackKind::Wav => {
            let path = settings
                .fallback_wav
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            let audio = callgate_audio::wav::read_mono(path).map_err(|e| {
                SettingsError::new("fallback_wav", format!("{}: {e}", path.display()))
            })?;
            PromptAudio::new(path.display().to_string(), &audio)
                .map_err(|e| SettingsError::caused("fallback_wav", e))?
                .chunks(AudioFormat::Ulaw8000)
        }
    };
    if !settings.headers_env.is_empty() || auth_token.is_some() {
        // Secrets in the upgrade request: say so if they would cross a network in clear.
        callgate_kit::plaintext::warn_if_exposed("bridge url", &settings.url);
    }
    Ok(Plan {
        settings,
        url,
        headers,
        auth_token,
        custom_parameters,
        fallback,
        tls,
    })
}

impl Plan {
    /// The bot's URL for a call, and the upgrade's headers (the signature included).
    pub fn request_for(
        &self,
        call: &CallInfo,
    ) -> Result<(String, Vec<(String, String)>), crate::url::UrlError> {
        let vars = call.variables();
        let url = self
            .url
            .render(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))?;
        let mut headers = self.headers.clone();
        if let Some(token) = &self.auth_token {
            headers.push((
                "X-Twilio-Signature".into(),
                url::twilio_signature(token, &url),
            ));
        }
        Ok((url, headers))
    }

    /// `start.customParameters` for a call: the route's templates rendered, or the default
    /// set (what the phone system sent, under its own names, with `from_number`, `to_number`,
    /// `callgate_call_id`, `callgate_route` and `callgate_protocol`).
    pub fn custom_parameters(&self, call: &CallInfo) -> BTreeMap<String, String> {
        if let Some(templates) = &self.custom_parameters {
            let vars = call.variables();
            let twilio = match &call.phone {
                PhoneInfo::Twilio {
                    custom_parameters, ..
                } => Some(custom_parameters),
                _ => None,
            };
            return templates
                .iter()
                .map(|(name, t)| {
                    let value = t.render(|v| {
                        vars.iter()
                            .find(|(n, _)| *n == v)
                            .map(|(_, x)| *x)
                            .or_else(|| twilio.and_then(|p| p.get(v)).map(String::as_str))
                    });
                    (name.clone(), value)
                })
                .collect();
        }
        let mut params = BTreeMap::new();
        match &call.phone {
            PhoneInfo::CallBridge(config) => {
                if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(config) {
                    for (name, value) in fields {
                        if let serde_json::Value::String(s) = value {
                            params.insert(name, s);
                        }
                    }
                }
            }
            PhoneInfo::Inbound {
                caller_id,
                did_number,
                session_id,
            } => {
                params.insert("callerId".into(), caller_id.clone());
                params.insert("didNumber".into(), did_number.clone());
                params.insert("sessionId".into(), session_id.clone());
            }
            PhoneInfo::Twilio {
                custom_parameters, ..
            } => params.extend(custom_parameters.clone()),
        }
        params.insert("from_number".into(), call.caller.clone());
        params.insert("to_number".into(), call.callee.clone());
        params.insert("callgate_call_id".into(), call.call_id.clone());
        params.insert("callgate_route".into(), call.route.clone());
        params.insert("callgate_protocol".into(), call.protocol.as_str().into());
        params
    }
}

/// A new `streamSid`: `MZ` and 32 random lowercase hex digits.
pub fn new_stream_sid() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    // The system's generator does not fail on the platforms callgate runs on; a failure
    // leaves zeros, which still makes a well-formed id.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    let mut sid = String::with_capacity(34);
    sid.push_str("MZ");
    for b in bytes {
        sid.push_str(&format!("{b:02x}"));
    }
    sid
}
