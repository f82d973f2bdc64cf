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
//! - [`core`]: the sans-IO core of one call, one module per concern (the session's link,
//!   the response, the playback timeline, tools, turns) and one timer table: events and time
//!   in, outputs out. It never reads the clock (this crate's `clippy.toml` bans it).
//! - `link`: one WebSocket connection to the service, on a task of its own (JSON and base64
//!   off the call task).
//! - `agent`: the driver: the call's events, the connection, tools and time into the core;
//!   its outputs carried out. It reads the clock and decides nothing.
//! - [`metrics`]: response latency (the service's share and callgate's own), connections,
//!   outages, tool calls.
//!
//! Tools (built-in and HTTP, their schemas), templates, speech, HTTP bounds, the outbox and
//! CallBridge's OPEN API come from the shared kit, `callgate-kit`.

mod agent;
pub mod core;
mod link;
pub mod metrics;
pub mod protocol;
pub mod settings;

pub use callgate_kit::schema;

use std::sync::Arc;

use callgate_agent::catalog::{self, SettingsError};
use callgate_agent::{AgentFactory, Catalog};
use callgate_audio::AudioFormat;
use callgate_kit::AgentEnv;
use callgate_kit::audio::PromptAudio;
use callgate_kit::template::{Template, UrlTemplate};
use serde_json::{Value, json};

pub use metrics::RealtimeMetrics;
pub use settings::RealtimeSettings;

use crate::schema::Schema;

/// The agent's name in routes.
pub const NAME: &str = "realtime";

/// An audio format on the Realtime connection (the service's side of the call; the phone's
/// side has the call's own formats, `CallInfo::input_format` and `output_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceFormat {
    /// `audio/pcm` at 24 kHz.
    Pcm24k,
    /// `audio/pcmu` (G.711 µ-law, 8 kHz).
    Pcmu,
    /// `audio/pcma` (G.711 A-law, 8 kHz).
    Pcma,
}

impl ServiceFormat {
    /// The same audio as a phone format (`AudioFormat`), for the converters between the sides.
    pub fn phone_format(self) -> AudioFormat {
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

/// The service formats of one call's Realtime session, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionFormats {
    /// What callgate appends (the caller's audio).
    pub input: ServiceFormat,
    /// What the service speaks.
    pub output: ServiceFormat,
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

/// What can go wrong when a route's realtime settings are compiled (each becomes a
/// [`SettingsError`] naming the setting).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A template does not parse.
    #[error(transparent)]
    Template(#[from] callgate_kit::template::ParseError),
}

/// Checks a template's syntax.
pub(crate) fn template(text: &str) -> Result<Template, Error> {
    Ok(Template::parse(text)?)
}

/// Registers the `realtime` agent in `catalog`. `env` gives the data dir (the speech cache),
/// the server's `[tts]` (for the fallback and hold messages) and CallBridge's OPEN API (for
/// `agent_terminate`); `metrics` collects every call's figures.
pub fn register(catalog: &mut Catalog, env: AgentEnv, metrics: Arc<RealtimeMetrics>) {
    catalog.register(NAME, move |settings| {
        let settings = catalog::parse::<RealtimeSettings>(settings)?;
        let factory = agent::RealtimeFactory::build(settings, &env, metrics.clone())?;
        Ok(Arc::new(factory) as Arc<dyn AgentFactory>)
    });
}

/// Builds a route's plan: the templates and schemas compiled, the messages rendered.
fn plan(settings: RealtimeSettings, env: &AgentEnv) -> Result<Plan, SettingsError> {
    let instructions =
        template(&settings.instructions).map_err(|e| SettingsError::caused("instructions", e))?;
    let compiled = callgate_kit::tools::Compiled::new(&settings.tools)?;
    let (schemas, tool_urls) = (compiled.schemas, compiled.urls);
    let tts = callgate_kit::TtsSettings {
        voice: settings.tts_voice.clone().or_else(|| env.tts.voice.clone()),
        ..env.tts.clone()
    };
    let render = |text: &str| callgate_kit::tts::render(&tts, &env.data_dir, text).map(Arc::new);
    let fallback = render(&settings.fallback_message)
        .map_err(|e| SettingsError::caused("fallback_message", e))?;
    let hold = if settings.hold_message.trim().is_empty() {
        None
    } else {
        Some(render(&settings.hold_message).map_err(|e| SettingsError::caused("hold_message", e))?)
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
