//! A `pipeline` route's `[routes.settings]`, parsed and checked once when the routes load
//! (errors name the field). Keys shared with `realtime` mean the same: `instructions`,
//! `builtin_tools`, `tools`, `max_duration`, `fallback_message`. Every `base_url` is written
//! as the OpenAI SDKs take it, version path included (`https://api.openai.com/v1`).

use std::time::Duration;

use callgate_agent::catalog::{Settings, SettingsError};
use callgate_kit::Dur;
use callgate_kit::tools::{Builtin, HttpTool};
use serde::Deserialize;

/// The default OpenAI-compatible API.
pub const OPENAI: &str = "https://api.openai.com/v1";

/// `[routes.settings.stt]`: speech to text, the kit's shape (`openai` or `vosk`).
pub use callgate_kit::stt::SttSettings;

/// `[routes.settings.llm]`: an OpenAI-compatible chat completions API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmSettings {
    /// The API, version path included.
    pub base_url: String,
    /// The model.
    pub model: String,
    /// The environment variable holding the API key (none: no `Authorization`).
    pub api_key_env: Option<String>,
    /// Sampling temperature (none: the server's default).
    pub temperature: Option<f64>,
    /// The most tokens of one answer (none: the server's default).
    pub max_tokens: Option<u32>,
    /// How long the answer may take to start and to finish.
    pub timeout: Dur,
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self {
            base_url: OPENAI.into(),
            model: "gpt-4o-mini".into(),
            api_key_env: None,
            temperature: None,
            max_tokens: None,
            timeout: Dur(Duration::from_secs(20)),
        }
    }
}

/// `[routes.settings.tts]`: text to speech.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsSettings {
    /// `openai` (`POST {base_url}/audio/speech`, `response_format = "pcm"`, played as it
    /// arrives) or `espeak` (espeak-ng, local).
    pub provider: String,
    /// The API, version path included (openai).
    pub base_url: String,
    /// The model (openai).
    pub model: String,
    /// The voice (`alloy`...; espeak: `ko`, `en-us`...).
    pub voice: String,
    /// The environment variable holding the API key (none: no `Authorization`).
    pub api_key_env: Option<String>,
    /// How long one sentence's speech may take.
    pub timeout: Dur,
}

impl Default for TtsSettings {
    fn default() -> Self {
        Self {
            provider: "openai".into(),
            base_url: OPENAI.into(),
            model: "gpt-4o-mini-tts".into(),
            voice: "alloy".into(),
            api_key_env: None,
            timeout: Dur(Duration::from_secs(10)),
        }
    }
}

/// `[routes.settings.turn]`: turn detection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnSettings {
    /// Silence that ends the caller's turn.
    pub end_of_speech: Dur,
    /// Speech this long over the agent pauses it.
    pub min_barge_in: Dur,
    /// Short words that never interrupt.
    pub backchannels: Vec<String>,
}

impl Default for TurnSettings {
    fn default() -> Self {
        Self {
            end_of_speech: Dur(Duration::from_millis(600)),
            min_barge_in: Dur(Duration::from_millis(300)),
            backchannels: ["네", "예", "음", "yeah", "uh-huh", "mm-hmm"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A `pipeline` route's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSettings {
    /// The system prompt (a template over the call's variables).
    pub instructions: String,
    /// Spoken at the answer (a template; empty: the agent waits for the caller).
    pub greeting: String,
    /// Built-in tools offered to the model (`hang_up`, `send_dtmf`, `agent_terminate`;
    /// `agent_terminate` on CallBridge calls only, and it needs the server's `[callbridge]`).
    pub builtin_tools: Vec<Builtin>,
    /// HTTP tools.
    pub tools: Vec<HttpTool>,
    /// The longest a call may last.
    pub max_duration: Dur,
    /// Spoken (espeak-ng or the server's `[tts]`, rendered at load) when a provider fails,
    /// before hanging up.
    pub fallback_message: String,
    /// Speech to text.
    pub stt: SttSettings,
    /// The LLM.
    pub llm: LlmSettings,
    /// Text to speech (none: the server's `[tts]`, each sentence rendered whole).
    pub tts: Option<TtsSettings>,
    /// Turn detection.
    pub turn: TurnSettings,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            instructions: "You are a helpful, concise phone assistant. Answer in one or two \
                           short sentences."
                .into(),
            greeting: String::new(),
            builtin_tools: vec![Builtin::HangUp],
            tools: Vec::new(),
            max_duration: Dur(Duration::from_secs(30 * 60)),
            fallback_message: "Sorry, the assistant is not available. Goodbye.".into(),
            stt: SttSettings::default(),
            llm: LlmSettings::default(),
            tts: None,
            turn: TurnSettings::default(),
        }
    }
}

fn check_url(field: &str, url: &str) -> Result<(), SettingsError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| SettingsError::caused(field, e))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SettingsError::new(field, "must be http(s)"));
    }
    Ok(())
}

fn check_key(field: &str, env: Option<&String>) -> Result<(), SettingsError> {
    match env {
        Some(var) if std::env::var(var).is_err() => {
            Err(SettingsError::new(field, format!("${var} is not set")))
        }
        _ => Ok(()),
    }
}

impl Settings for PipelineSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        callgate_kit::template::Template::parse(&self.instructions)
            .map_err(|e| SettingsError::caused("instructions", e))?;
        callgate_kit::template::Template::parse(&self.greeting)
            .map_err(|e| SettingsError::caused("greeting", e))?;
        callgate_kit::tools::check(&self.builtin_tools, &self.tools)?;
        if self.max_duration.0.is_zero() {
            return Err(SettingsError::new("max_duration", "must be more than zero"));
        }
        if self.fallback_message.trim().is_empty() {
            return Err(SettingsError::new(
                "fallback_message",
                "must say something: it is what the caller hears when a provider fails",
            ));
        }
        self.stt
            .check()
            .map_err(|(field, why)| SettingsError::new(format!("stt.{field}"), why))?;
        check_url("llm.base_url", &self.llm.base_url)?;
        check_key("llm.api_key_env", self.llm.api_key_env.as_ref())?;
        if let Some(tts) = &self.tts {
            match tts.provider.as_str() {
                "openai" => {
                    check_url("tts.base_url", &tts.base_url)?;
                    check_key("tts.api_key_env", tts.api_key_env.as_ref())?;
                }
                "espeak" => {}
                other => {
                    return Err(SettingsError::new(
                        "tts.provider",
                        format!("{other:?}: openai or espeak"),
                    ));
                }
            }
            if tts.timeout.0.is_zero() {
                return Err(SettingsError::new("tts.timeout", "must be more than zero"));
            }
        }
        for (field, d) in [
            ("llm.timeout", self.llm.timeout),
            ("turn.end_of_speech", self.turn.end_of_speech),
        ] {
            if d.0.is_zero() {
                return Err(SettingsError::new(field, "must be more than zero"));
            }
        }
        Ok(())
    }
}
