//! The `realtime` agent: a phone call bridged to a speech-to-speech model over the OpenAI
//! Realtime API (the GA WebSocket protocol), or any server that speaks it.
//!
//! A route runs it with `agent = "realtime"` and its `[routes.settings]`
//! ([`settings::RealtimeSettings`], documented in `docs/realtime.md`). Everything that can be
//! checked is checked when the routes load: the key's variable, the URL, the tools' schemas,
//! and the fallback and hold messages are rendered to audio then, so a call that cannot reach
//! the AI still hears a clear message.
//!
//! # Layout
//! - [`settings`]: the route's settings and their validation.
//! - [`protocol`]: the Realtime events callgate reads and sends.
//! - [`core`]: the sans-IO core of one call (session, timeline, barge-in and truncation,
//!   tools, the record, outages): events and time in, outputs out.
//! - `link`: one WebSocket connection to the service, on a task of its own (JSON and base64
//!   off the call task).
//! - `tools`: HTTP tools and CallBridge's agent-terminate, run off the call task.
//! - `agent`: the driver: the call's events, the connection, tools and time into the core;
//!   its outputs carried out.
//! - [`schema`]: the JSON Schema subset tools' arguments are checked against.
//! - [`metrics`]: response latency (the service's share and callgate's own), connections,
//!   outages, tool calls.

mod agent;
pub mod core;
mod link;
pub mod metrics;
pub mod protocol;
pub mod schema;
pub mod settings;
mod tools;

use std::sync::Arc;

use callgate_agent::catalog::{self, SettingsError};
use callgate_agent::{AgentFactory, Catalog};
use callgate_audio::AudioFormat;
use callgate_flow::FlowEnv;
use callgate_flow::audio::PromptAudio;
use callgate_flow::template::{Template, UrlTemplate};
use serde_json::{Value, json};

pub use metrics::RealtimeMetrics;
pub use settings::RealtimeSettings;

use crate::schema::Schema;

/// The agent's name in routes.
pub const NAME: &str = "realtime";

/// An audio format of the Realtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// `audio/pcm` at 24 kHz.
    Pcm24k,
    /// `audio/pcmu` (G.711 µ-law, 8 kHz).
    Pcmu,
    /// `audio/pcma` (G.711 A-law, 8 kHz).
    Pcma,
}

impl WireFormat {
    /// The same audio as a call format.
    pub fn format(self) -> AudioFormat {
        match self {
            Self::Pcm24k => AudioFormat::Pcm24000,
            Self::Pcmu => AudioFormat::Ulaw8000,
            Self::Pcma => AudioFormat::Alaw8000,
        }
    }

    /// As `session.update` names it.
    pub fn json(self) -> Value {
        match self {
            Self::Pcm24k => json!({"type": "audio/pcm", "rate": 24000}),
            Self::Pcmu => json!({"type": "audio/pcmu"}),
            Self::Pcma => json!({"type": "audio/pcma"}),
        }
    }

    /// Bytes per millisecond.
    pub fn bytes_per_ms(self) -> u64 {
        match self {
            Self::Pcm24k => 48,
            Self::Pcmu | Self::Pcma => 8,
        }
    }
}

/// The formats of one call's Realtime session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// What callgate appends (the caller).
    pub input: WireFormat,
    /// What the service speaks.
    pub output: WireFormat,
}

/// What every call of a route shares: its settings, compiled.
#[derive(Debug)]
pub struct Plan {
    /// The settings.
    pub settings: RealtimeSettings,
    instructions: Template,
    schemas: Vec<Schema>,
    /// Each HTTP tool's `url`, compiled: the call's values are data in its path and query.
    tool_urls: Vec<UrlTemplate>,
    fallback: Arc<PromptAudio>,
    hold: Option<Arc<PromptAudio>>,
}

impl Plan {
    fn tool_index(&self, name: &str) -> Option<usize> {
        self.settings.tools.iter().position(|t| t.name == name)
    }
}

/// Checks a template's syntax.
pub(crate) fn template(text: &str) -> Result<Template, String> {
    Template::parse(text)
}

/// Registers the `realtime` agent in `catalog`. `env` gives the data dir (the speech cache),
/// the server's `[tts]` (for the fallback and hold messages) and CallBridge's OPEN API (for
/// `agent_terminate`); `metrics` collects every call's figures.
pub fn register(catalog: &mut Catalog, env: FlowEnv, metrics: Arc<RealtimeMetrics>) {
    catalog.register(NAME, move |settings| {
        let settings = catalog::parse::<RealtimeSettings>(settings)?;
        let factory = agent::RealtimeFactory::build(settings, &env, metrics.clone())?;
        Ok(Arc::new(factory) as Arc<dyn AgentFactory>)
    });
}

/// Builds a route's plan: the templates and schemas compiled, the messages rendered.
fn plan(settings: RealtimeSettings, env: &FlowEnv) -> Result<Plan, SettingsError> {
    let instructions =
        template(&settings.instructions).map_err(|e| SettingsError::new("instructions", e))?;
    let schemas = settings
        .tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Schema::compile(&t.parameters)
                .map_err(|(path, e)| SettingsError::new(format!("tools[{i}].parameters{path}"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tool_urls = settings
        .tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            UrlTemplate::parse(&t.url).map_err(|e| SettingsError::new(format!("tools[{i}].url"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tts = callgate_flow::TtsSettings {
        voice: settings.tts_voice.clone().or_else(|| env.tts.voice.clone()),
        ..env.tts.clone()
    };
    let fallback = render(&tts, env, &settings.fallback_message)
        .map_err(|e| SettingsError::new("fallback_message", e))?;
    let hold = if settings.hold_message.trim().is_empty() {
        None
    } else {
        Some(
            render(&tts, env, &settings.hold_message)
                .map_err(|e| SettingsError::new("hold_message", e))?,
        )
    };
    Ok(Plan {
        settings,
        instructions,
        schemas,
        tool_urls,
        fallback,
        hold,
    })
}

/// Speaks `text` now (through the speech cache) and prepares it for every call format.
fn render(
    tts: &callgate_flow::TtsSettings,
    env: &FlowEnv,
    text: &str,
) -> Result<Arc<PromptAudio>, String> {
    let http = tools::http_client().map_err(|e| e.to_string())?;
    let provider = tts.provider(&http).map_err(|e| e.to_string())?;
    let cache = callgate_flow::tts::Cache::new(&env.data_dir);
    let voice = tts.voice();
    // At load, inside or outside a runtime: a thread of its own with a small runtime.
    let audio = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(callgate_flow::tts::speak(
                &cache,
                provider.as_ref(),
                &voice,
                text,
            ))
            .map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("speech rendering panicked".into()))
    })?;
    let prompt = PromptAudio::new(text, &audio).map_err(|e| e.to_string())?;
    // Converted to every call rate now: a call only slices it.
    for format in [
        AudioFormat::Pcm8000,
        AudioFormat::Pcm16000,
        AudioFormat::Pcm24000,
        AudioFormat::Pcm48000,
    ] {
        prompt.chunks(format);
    }
    Ok(Arc::new(prompt))
}

/// A plan without speech synthesis, for the core's tests: the fallback is one second of a
/// constant.
#[cfg(test)]
pub(crate) fn test_plan(settings: RealtimeSettings) -> Plan {
    let audio = callgate_audio::wav::MonoAudio {
        rate: 8000,
        samples: vec![1000; 8000],
    };
    let schemas = settings
        .tools
        .iter()
        .map(|t| Schema::compile(&t.parameters).expect("a valid schema"))
        .collect();
    let tool_urls = settings
        .tools
        .iter()
        .map(|t| UrlTemplate::parse(&t.url).expect("a valid URL template"))
        .collect();
    Plan {
        instructions: template(&settings.instructions).expect("a valid template"),
        schemas,
        tool_urls,
        fallback: Arc::new(PromptAudio::new("fallback", &audio).expect("audio")),
        hold: None,
        settings,
    }
}
