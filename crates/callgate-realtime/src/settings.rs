//! A `realtime` route's `[routes.settings]`: parsed into [`RealtimeSettings`] and validated once,
//! when the routes are loaded (errors name the field: `tools[1].parameters.properties.n`).

use std::time::Duration;

use callgate_agent::catalog::{Settings, SettingsError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use callgate_kit::tools::{Builtin, HttpTool, Method};

/// The Realtime endpoint used when `url` is not given.
pub const DEFAULT_URL: &str = "wss://api.openai.com/v1/realtime";
/// The model used when `model` is not given.
pub const DEFAULT_MODEL: &str = "gpt-realtime";

pub use callgate_kit::Dur;

/// The `audio` setting: which [`ServiceFormat`](crate::ServiceFormat) a call's session uses
/// (`auto`: chosen per call from the phone's formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioSetting {
    /// G.711 when the phone leg is at 8 kHz (µ-law, or A-law when the phone sends A-law),
    /// 24 kHz PCM otherwise.
    #[default]
    Auto,
    /// Always 24 kHz 16-bit PCM (`audio/pcm`), converted at the call's edges.
    Pcm,
    /// Always G.711 µ-law (`audio/pcmu`).
    Pcmu,
    /// Always G.711 A-law (`audio/pcma`).
    Pcma,
}

/// Which voice activity detection the service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnType {
    /// Silence-based (`server_vad`).
    #[default]
    ServerVad,
    /// Model-based end of turn (`semantic_vad`).
    SemanticVad,
    /// None: no turns are detected.
    None,
}

/// How eagerly semantic VAD ends a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Eagerness {
    /// Waits longest (up to 8 s).
    Low,
    /// The middle (up to 4 s).
    Medium,
    /// Ends turns soonest (up to 2 s).
    High,
    /// The service's choice (medium).
    Auto,
}

/// Noise reduction on the caller's audio, on the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseReduction {
    /// None.
    #[default]
    Off,
    /// A close-talking microphone (a handset).
    NearField,
    /// A distant microphone (a speakerphone).
    FarField,
}

/// Whether the model may, must or must not call tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// Never.
    None,
    /// Every response calls a tool.
    Required,
}

/// Voice activity detection on the service (`audio.input.turn_detection`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnDetection {
    /// `server_vad` (default), `semantic_vad`, or `none` (no VAD: nothing answers the caller).
    #[serde(rename = "type", default)]
    pub kind: TurnType,
    /// server_vad: 0..1, higher needs louder speech (default 0.5).
    pub threshold: Option<f64>,
    /// server_vad: audio kept before detected speech, ms (default 300).
    pub prefix_padding_ms: Option<u32>,
    /// server_vad: silence that ends the caller's turn, ms (default 500; set, because the
    /// service's own default has varied).
    pub silence_duration_ms: Option<u32>,
    /// server_vad: ask again after this long without speech, ms.
    pub idle_timeout_ms: Option<u32>,
    /// semantic_vad: `low`, `medium`, `high` or `auto`.
    pub eagerness: Option<Eagerness>,
    /// Answer automatically when the caller stops (default true).
    pub create_response: Option<bool>,
    /// Cancel the running answer when the caller starts speaking (default true).
    pub interrupt_response: Option<bool>,
}

impl Default for TurnDetection {
    fn default() -> Self {
        Self {
            kind: TurnType::ServerVad,
            threshold: None,
            prefix_padding_ms: None,
            silence_duration_ms: None,
            idle_timeout_ms: None,
            eagerness: None,
            create_response: None,
            interrupt_response: None,
        }
    }
}

/// Transcription of the caller's speech (`audio.input.transcription`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Transcription {
    /// On (default) or off.
    pub enabled: bool,
    /// The transcription model (default `gpt-4o-mini-transcribe`).
    pub model: String,
    /// The caller's language, ISO-639-1 (`ko`, `en`); helps accuracy.
    pub language: Option<String>,
}

impl Default for Transcription {
    fn default() -> Self {
        Self {
            enabled: true,
            model: "gpt-4o-mini-transcribe".into(),
            language: None,
        }
    }
}

/// A built-in tool's declaration in `session.update` (the Realtime API's flat form).
pub fn builtin_declaration(tool: Builtin) -> Value {
    json!({"type": "function", "name": tool.name(), "description": tool.description(),
           "parameters": tool.parameters()})
}

/// A `realtime` route's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeSettings {
    /// The Realtime endpoint (`ws://` or `wss://`); `?model=` is appended.
    pub url: String,
    /// The model.
    pub model: String,
    /// The environment variable holding the API key (must be set when the routes load).
    pub api_key_env: String,
    /// A PEM file of extra certificate authorities to trust for `wss://` (a private endpoint).
    pub ca_file: Option<std::path::PathBuf>,
    /// The system prompt; `{{caller}}`, `{{callee}}`, `{{cdrId}}`... are the call's variables.
    pub instructions: String,
    /// The voice (`marin`, `cedar`, `alloy`...).
    pub voice: String,
    /// `true`: the AI speaks first; `false`: it waits for the caller.
    pub greeting: bool,
    /// What the AI is told to do when it speaks first.
    pub greeting_prompt: String,
    /// The service format: the audio format on the Realtime connection.
    pub audio: AudioSetting,
    /// `near_field`, `far_field` or `off` (default `off`).
    pub noise_reduction: NoiseReduction,
    /// The service's voice activity detection.
    pub turn_detection: TurnDetection,
    /// Transcription of the caller.
    pub transcription: Transcription,
    /// Built-in tools offered to the model (default: `hang_up`).
    pub builtin_tools: Vec<Builtin>,
    /// HTTP tools.
    pub tools: Vec<HttpTool>,
    /// `auto` (default), `none` or `required`.
    pub tool_choice: ToolChoice,
    /// The longest a call may last; then it hangs up after the audio queued (default 30m).
    pub max_duration: Dur,
    /// Spoken (text-to-speech, rendered at load) when the AI cannot be reached, before hanging
    /// up.
    pub fallback_message: String,
    /// Spoken once when the AI connection drops mid-call, while callgate reconnects (empty:
    /// silence).
    pub hold_message: String,
    /// The text-to-speech voice for the two messages (default: the server's `[tts]` voice).
    pub tts_voice: Option<String>,
    /// How long a dropped AI connection may take to come back before the fallback message.
    pub reconnect_within: Dur,
    /// How long one connection attempt (handshake and session set-up) may take.
    pub connect_timeout: Dur,
    /// Sessions are renewed (between turns) after this long: the service ends them at 60m.
    pub session_max: Dur,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            model: DEFAULT_MODEL.into(),
            api_key_env: "OPENAI_API_KEY".into(),
            ca_file: None,
            instructions: "You are a helpful, concise phone assistant. Speak in short sentences."
                .into(),
            voice: "marin".into(),
            greeting: true,
            greeting_prompt: "The call has just been answered. Greet the caller briefly.".into(),
            audio: AudioSetting::Auto,
            noise_reduction: NoiseReduction::Off,
            turn_detection: TurnDetection::default(),
            transcription: Transcription::default(),
            builtin_tools: vec![Builtin::HangUp],
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            max_duration: Dur(Duration::from_secs(30 * 60)),
            fallback_message: "Sorry, our assistant is not available right now. Please call \
                               again later. Goodbye."
                .into(),
            hold_message: String::new(),
            tts_voice: None,
            reconnect_within: Dur(Duration::from_secs(10)),
            connect_timeout: Dur(Duration::from_secs(5)),
            session_max: Dur(Duration::from_secs(55 * 60)),
        }
    }
}

impl Settings for RealtimeSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| SettingsError::new("url", format!("{:?}: {e}", self.url)))?;
        if !matches!(url.scheme(), "ws" | "wss") {
            return Err(SettingsError::new("url", "must be ws:// or wss://"));
        }
        if self.model.is_empty() {
            return Err(SettingsError::new("model", "must not be empty"));
        }
        if std::env::var(&self.api_key_env).map_or(true, |k| k.is_empty()) {
            return Err(SettingsError::new(
                "api_key_env",
                format!("${} is not set: it must hold the API key", self.api_key_env),
            ));
        }
        crate::template(&self.instructions)
            .map_err(|e| SettingsError::caused("instructions", e))?;
        let td = &self.turn_detection;
        if td.threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return Err(SettingsError::new(
                "turn_detection.threshold",
                "must be between 0 and 1",
            ));
        }
        let semantic_only = td.eagerness.is_some();
        let server_only = td.threshold.is_some()
            || td.prefix_padding_ms.is_some()
            || td.silence_duration_ms.is_some()
            || td.idle_timeout_ms.is_some();
        if td.kind == TurnType::ServerVad && semantic_only {
            return Err(SettingsError::new(
                "turn_detection.eagerness",
                "is for semantic_vad",
            ));
        }
        if td.kind == TurnType::SemanticVad && server_only {
            return Err(SettingsError::new(
                "turn_detection",
                "threshold, prefix_padding_ms, silence_duration_ms and idle_timeout_ms are for \
                 server_vad",
            ));
        }
        callgate_kit::tools::check(&self.builtin_tools, &self.tools)?;
        for (field, d) in [
            ("max_duration", self.max_duration),
            ("reconnect_within", self.reconnect_within),
            ("connect_timeout", self.connect_timeout),
            ("session_max", self.session_max),
        ] {
            if d.0.is_zero() {
                return Err(SettingsError::new(field, "must be more than zero"));
            }
        }
        if self.session_max.0 > Duration::from_secs(60 * 60) {
            return Err(SettingsError::new(
                "session_max",
                "the service ends sessions at 60m: renew before",
            ));
        }
        if self.fallback_message.trim().is_empty() {
            return Err(SettingsError::new(
                "fallback_message",
                "must say something: it is what the caller hears when the AI is unreachable",
            ));
        }
        Ok(())
    }
}

impl RealtimeSettings {
    /// The WebSocket URL with `model` in its query.
    pub fn connect_url(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}model={}", self.url, self.model)
    }

    /// `audio.input.turn_detection` as the service takes it.
    pub fn turn_detection_json(&self) -> Value {
        let td = &self.turn_detection;
        if td.kind == TurnType::None {
            return Value::Null;
        }
        let mut o = serde_json::Map::new();
        o.insert("type".into(), json!(td.kind));
        if td.kind == TurnType::ServerVad {
            o.insert("threshold".into(), json!(td.threshold.unwrap_or(0.5)));
            o.insert(
                "prefix_padding_ms".into(),
                json!(td.prefix_padding_ms.unwrap_or(300)),
            );
            o.insert(
                "silence_duration_ms".into(),
                json!(td.silence_duration_ms.unwrap_or(500)),
            );
            if let Some(ms) = td.idle_timeout_ms {
                o.insert("idle_timeout_ms".into(), json!(ms));
            }
        } else if let Some(e) = &td.eagerness {
            o.insert("eagerness".into(), json!(e));
        }
        o.insert(
            "create_response".into(),
            json!(td.create_response.unwrap_or(true)),
        );
        o.insert(
            "interrupt_response".into(),
            json!(self.interrupt_response()),
        );
        Value::Object(o)
    }

    /// Whether the service cancels a running answer itself when the caller speaks.
    pub fn interrupt_response(&self) -> bool {
        self.turn_detection.interrupt_response.unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use callgate_agent::catalog::parse;

    #[test]
    fn defaults_need_the_key_and_errors_name_the_field() {
        let settings = json!({"api_key_env": "CALLGATE_TEST_SURELY_UNSET"});
        let e = parse::<RealtimeSettings>(&settings).unwrap_err();
        assert_eq!(e.field, "api_key_env");
        let e =
            parse::<RealtimeSettings>(&json!({"api_key_env": "PATH", "voise": "x"})).unwrap_err();
        assert!(e.problem.contains("voise"), "{e}");
        let e = parse::<RealtimeSettings>(&json!({
            "api_key_env": "PATH",
            "tools": [{"name": "lookup", "description": "d", "url": "http://x/",
                       "parameters": {"type": "object",
                                      "properties": {"n": {"type": "integr"}}}}]
        }))
        .unwrap_err();
        assert_eq!(e.field, "tools[0].parameters.properties.n.type");
        let e = parse::<RealtimeSettings>(&json!({
            "api_key_env": "PATH", "tools": [{"name": "hang_up", "description": "d",
                                              "url": "http://x/"}]
        }))
        .unwrap_err();
        assert_eq!(e.field, "tools[0].name");
        let e = parse::<RealtimeSettings>(&json!({
            "api_key_env": "PATH", "tools": [{"name": "t", "description": "d",
                                              "url": "https://{{siteId}}.example.com/x"}]
        }))
        .unwrap_err();
        assert_eq!(e.field, "tools[0].url");
        assert!(e.problem.contains("user, host or port"), "{e}");
        let e = parse::<RealtimeSettings>(&json!({"api_key_env": "PATH", "url": "http://x"}))
            .unwrap_err();
        assert_eq!(e.field, "url");
        let e = parse::<RealtimeSettings>(&json!({"api_key_env": "PATH",
            "turn_detection": {"type": "semantic_vad", "threshold": 0.3}}))
        .unwrap_err();
        assert_eq!(e.field, "turn_detection");
    }

    #[test]
    fn the_url_gets_the_model_and_vad_is_explicit() {
        let s: RealtimeSettings = parse(&json!({"api_key_env": "PATH"})).unwrap();
        assert_eq!(
            s.connect_url(),
            "wss://api.openai.com/v1/realtime?model=gpt-realtime"
        );
        let td = s.turn_detection_json();
        assert_eq!(td["type"], "server_vad");
        assert_eq!(td["silence_duration_ms"], 500);
        assert_eq!(td["interrupt_response"], true);
        let s: RealtimeSettings =
            parse(&json!({"api_key_env": "PATH", "turn_detection": {"type": "none"}})).unwrap();
        assert!(s.turn_detection_json().is_null());
    }
}
