//! Call flows: the declarative IVR agent `flow`, its file format, and text-to-speech.
//!
//! A route runs a flow with `agent = "flow"` and `settings = { file = "menu.toml" }`; the
//! binary registers the agent in its [`Catalog`] with [`register`], giving it the data dir
//! and the server's `[tts]` settings. The file is read, validated and its fixed prompts
//! rendered once, when the routes are built: a call never meets a bad flow and never waits
//! for fixed speech. `docs/flows.md` documents every step.
//!
//! # Layout
//! - [`spec`]: the TOML file format, parsed and validated into a [`Flow`] (errors name the
//!   file, the step and the field).
//! - [`template`]: `{{variable}}` text.
//! - [`engine`]: the sans-IO step engine (time passed in; actions out).
//! - `agent`: the driver of one call: events and time in, the engine's actions carried out
//!   (slow work through the call's `Spawner`).
//! - [`tts`]: the speech [`tts::Provider`] trait, espeak-ng, an OpenAI-compatible API, and
//!   the cache in the data dir.
//! - [`audio`]: prompt audio, converted at load to every call rate.
//! - [`messages`]: what `record` steps may store (per call, in total), files created
//!   private.
//! - [`metrics`]: recordings stored and refused, for the server's `/metrics`.
//! - [`plaintext`]: the warning for an API key that would cross the network in clear text.
//!
//! This is a crate of its own (not part of `callgate-agent`) because it needs an HTTP client
//! (reqwest with rustls on ring) that the other agents do not.

mod agent;
pub mod demo;
pub mod engine;
pub mod messages;
pub mod metrics;
pub mod spec;

pub use callgate_kit::{audio, plaintext, stt, template, tts};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use callgate_agent::catalog::{self, Settings, SettingsError};
use callgate_agent::{AgentFactory, Catalog};

pub use agent::FlowFactory;
pub use metrics::FlowMetrics;
pub use spec::{Flow, FlowError};
pub use stt::SttSettings;
pub use tts::TtsSettings;

use crate::audio::PromptAudio;
use crate::tts::{Provider, ProviderName};

/// The agent's name in routes.
pub const NAME: &str = "flow";

/// What the flow agent needs from the server: the kit's [`AgentEnv`] (data dir, `[tts]`,
/// `[callbridge]`), shared by every agent.
pub type FlowEnv = AgentEnv;

pub use callgate_kit::{AgentEnv, CallBridgeApi};

/// A `flow` route's `[routes.settings]`: `file` or `demo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowSettings {
    /// The flow file (TOML).
    pub file: Option<PathBuf>,
    /// A flow built into callgate: `menu`, `menu-ko` or `seed-demo`.
    pub demo: Option<String>,
}

impl Settings for FlowSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        match (&self.file, &self.demo) {
            (Some(_), Some(_)) => Err(SettingsError::new("demo", "give file or demo, not both")),
            (None, None) => Err(SettingsError::new("file", "missing: the flow file to run")),
            (None, Some(d)) if !demo::FLOWS.contains(&d.as_str()) => Err(SettingsError::new(
                "demo",
                format!("{d:?} is not a built-in flow ({})", demo::FLOWS.join(", ")),
            )),
            _ => Ok(()),
        }
    }
}

impl FlowSettings {
    /// The path of the flow to load (built-in ones under [`demo::ROOT`]).
    pub fn path(&self) -> PathBuf {
        match (&self.file, &self.demo) {
            (Some(file), _) => file.clone(),
            (None, Some(d)) => Path::new(demo::ROOT).join(format!("{d}.toml")),
            (None, None) => PathBuf::new(),
        }
    }
}

/// Registers the `flow` agent in `catalog`; a flow's warnings (unreachable steps) are logged.
pub fn register(catalog: &mut Catalog, env: FlowEnv) {
    register_with(catalog, env, |warning| {
        tracing::warn!(%warning, "Flow loaded with a warning.");
    });
}

/// Like [`register`], handing each flow's warnings to `on_warning` (the binary prints them:
/// they come before logging is set up). Recordings are counted in
/// [`FlowMetrics::process`].
pub fn register_with(
    catalog: &mut Catalog,
    env: FlowEnv,
    on_warning: impl Fn(&str) + Send + Sync + 'static,
) {
    register_with_metrics(catalog, env, FlowMetrics::process(), on_warning);
}

/// Like [`register_with`], counting recordings in `metrics` (expose them with
/// [`metrics::FlowCollector`]).
pub fn register_with_metrics(
    catalog: &mut Catalog,
    env: FlowEnv,
    metrics: Arc<FlowMetrics>,
    on_warning: impl Fn(&str) + Send + Sync + 'static,
) {
    catalog.register(NAME, move |settings| {
        let settings = catalog::parse::<FlowSettings>(settings)?;
        let field = if settings.file.is_some() {
            "file"
        } else {
            "demo"
        };
        let factory = load_with(&settings.path(), &env, metrics.clone())
            .map_err(|e| SettingsError::caused(field, e))?;
        for warning in &factory.flow().warnings {
            on_warning(warning);
        }
        Ok(Arc::new(factory) as Arc<dyn AgentFactory>)
    });
}

/// What goes wrong in the flow crate: a flow that cannot be loaded, what the loader could not
/// give it, and the work done for a call off its task (the engine writes its text into the
/// step's result). The kit's errors are kept as they are, source and all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The flow file is wrong.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Http(#[from] callgate_kit::http::ClientError),
    /// A file could not be read.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// A path under [`demo::ROOT`] that names no built-in file.
    #[error("no such built-in file")]
    NoBuiltIn,
    /// A speech provider could not be built, or its synthesis failed.
    #[error(transparent)]
    Tts(#[from] tts::TtsError),
    /// Fixed speech could not be rendered at load.
    #[error(transparent)]
    Render(#[from] tts::RenderError),
    /// Speech could not be made into audio at the call's rate.
    #[error(transparent)]
    Audio(#[from] callgate_audio::Error),
    /// A step speaks with a provider the flow did not set up.
    #[error("provider {0:?} is not configured")]
    NoProvider(ProviderName),
    /// `[callbridge]` cannot work for a step that needs CallBridge's OPEN API.
    #[error(transparent)]
    CallBridge(#[from] callgate_kit::callbridge::SettingsError),
    /// A step needs CallBridge's OPEN API and the call has none (no key).
    #[error("CallBridge's OPEN API is not configured")]
    NoOpenApi,
    /// A text message was not sent.
    #[error(transparent)]
    Sms(#[from] callgate_kit::callbridge::SmsError),
    /// Speech to text could not start, or failed.
    #[error(transparent)]
    Stt(#[from] stt::SttError),
    /// A transcript was asked of a step that does not listen.
    #[error("the step does not listen")]
    NotListening,
    /// A transcript was asked with no utterance open.
    #[error("no utterance was open")]
    NoUtterance,
    /// A webhook or `agent-terminate` request failed (no connection, a timeout, an answer
    /// too large).
    #[error(transparent)]
    Request(#[from] callgate_kit::http::Error),
    /// A recording could not be written.
    #[error(transparent)]
    Storage(#[from] callgate_kit::files::Error),
    /// A recording is larger than the room reserved for it.
    #[error("{}: {bytes} bytes is more than the {reserved} reserved", path.display())]
    OverReservation {
        /// The recording's file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The room reserved.
        reserved: u64,
    },
    /// A recording came with no room reserved for it.
    #[error("no room was reserved for the recording")]
    NotReserved,
    /// The task doing the work stopped (it panicked, or the call's tasks were cancelled).
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Reads, validates and prepares the flow at `path` (its fixed speech rendered, through the
/// cache). Its warnings (unreachable steps) are in `flow().warnings`. Recordings are counted
/// in [`FlowMetrics::process`].
pub fn load(path: &Path, env: &FlowEnv) -> Result<FlowFactory, Error> {
    load_with(path, env, FlowMetrics::process())
}

/// Like [`load`], counting recordings in `metrics`.
pub fn load_with(
    path: &Path,
    env: &FlowEnv,
    metrics: Arc<FlowMetrics>,
) -> Result<FlowFactory, Error> {
    let http = http_client()?;
    let loader = EnvLoader {
        http: http.clone(),
        cache: tts::Cache::new(&env.data_dir),
        providers: Mutex::new(HashMap::new()),
        callbridge: env.callbridge.clone(),
        stt: env.stt.clone(),
    };
    let flow = Flow::load(path, &env.tts, &loader)?;
    let providers = loader
        .providers
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Ok(FlowFactory {
        flow: Arc::new(flow),
        runtime: Arc::new(agent::Runtime {
            messages: messages::Store::shared(&env.data_dir, metrics.clone()),
            metrics,
            data_dir: env.data_dir.clone(),
            http,
            providers,
            callbridge: env.callbridge.as_ref().and_then(CallBridgeApi::open),
        }),
    })
}

/// The kit's HTTP client (no redirects: a 3xx is a webhook's error).
fn http_client() -> Result<reqwest::Client, Error> {
    Ok(callgate_kit::http::client()?)
}

/// Loads flows: builds providers once and renders fixed speech at load.
struct EnvLoader {
    http: reqwest::Client,
    cache: tts::Cache,
    providers: Mutex<HashMap<ProviderName, Arc<dyn Provider>>>,
    callbridge: Option<CallBridgeApi>,
    /// The server's `[stt]`.
    stt: Option<SttSettings>,
}

impl EnvLoader {
    fn provider(&self, tts: &TtsSettings, name: ProviderName) -> Result<Arc<dyn Provider>, Error> {
        let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = providers.get(&name) {
            return Ok(p.clone());
        }
        let settings = TtsSettings {
            provider: Some(name),
            ..tts.clone()
        };
        let provider = settings.provider(&self.http)?;
        providers.insert(name, provider.clone());
        Ok(provider)
    }
}

impl spec::Loader for EnvLoader {
    fn read(&self, path: &Path) -> Result<Vec<u8>, Error> {
        if let Ok(rest) = path.strip_prefix(demo::ROOT) {
            let name = rest.to_string_lossy().replace('\\', "/");
            return demo::file(&name)
                .map(<[u8]>::to_vec)
                .ok_or(Error::NoBuiltIn);
        }
        std::fs::read(path).map_err(Error::Read)
    }

    fn speak(
        &self,
        tts: &TtsSettings,
        provider: ProviderName,
        voice: &str,
        text: &str,
    ) -> Result<PromptAudio, Error> {
        let provider = self.provider(tts, provider)?;
        Ok(tts::render_at_load(
            &self.cache,
            provider.as_ref(),
            voice,
            text,
        )?)
    }

    fn check_provider(&self, tts: &TtsSettings, provider: ProviderName) -> Result<(), Error> {
        self.provider(tts, provider).map(|_| ())
    }

    fn check_callbridge_api(&self, what: &str) -> Result<(), Error> {
        let Some(api) = &self.callbridge else {
            return Err(Error::CallBridge(callgate_kit::callbridge::missing(what)));
        };
        Ok(api.check(what)?)
    }

    fn stt(&self, step: Option<&SttSettings>) -> Result<Option<stt::Stt>, Error> {
        match step.or(self.stt.as_ref()) {
            Some(settings) => Ok(Some(stt::Stt::build(settings, &self.http)?)),
            None => Ok(None),
        }
    }
}
