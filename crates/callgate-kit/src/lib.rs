//! The shared agent kit: what every agent that talks to services needs, written once.
//!
//! `flow`, `realtime` and `pipeline` each depend on this crate and on no other agent crate:
//! copies of the same plumbing drift (STYLE §14), so each piece lives here.
//!
//! # Layout
//! - [`template`]: `{{variable}}` text over the call's variables, and URL templates where
//!   values are data (percent-encoded; no variable in scheme, host or port).
//! - [`audio`]: prompt audio, read once and sliced per call rate.
//! - [`tts`]: the speech [`tts::Provider`] trait, espeak-ng, an OpenAI-compatible API, the
//!   cache in the data dir, [`tts::render_at_load`] (speech rendered when routes load) and
//!   [`tts::render`] (the same from a `[tts]` table: client, provider, cache in one call).
//! - [`stt`]: speech to text ([`stt::Stt`]): an OpenAI-compatible API, or vosk in process
//!   (cargo feature `vosk`), audio pushed as it arrives ([`stt::Utterance`]).
//! - [`http`]: the one HTTP client policy (rustls on ring, no redirects) and the one bound on
//!   an answer's body ([`http::MAX_ANSWER`]).
//! - [`tls`]: the TLS of an agent's own `wss://` connections (the platform's roots, or a
//!   route's `ca_file`).
//! - [`callbridge`]: CallBridge's OPEN API (`agent-terminate`, `messages/send-direct`).
//! - [`outbox`]: an agent's queue of commands for the call, stamped with their epoch, and what
//!   a clear drops.
//! - [`tools`] and [`schema`]: built-in tools, HTTP tools declared in a route, and the check of
//!   a model's arguments against a tool's JSON schema.
//! - [`plaintext`]: the warning for an API key that would cross the network in clear text.
//! - [`files`]: private files and directories (0700/0600 whatever the umask).
//! - [`metrics`]: what an agent's metrics collector writes on each scrape.
//!
//! # Errors
//! Each module that can fail says why with its own type, since what can go wrong differs:
//! [`template::ParseError`], [`schema::Invalid`], [`http::Error`], [`http::ClientError`],
//! [`callbridge::SettingsError`], [`files::Error`], [`stt::SttError`], [`tts::TtsError`],
//! [`tts::RenderError`], [`tls::TlsError`] (and the older [`callbridge::SmsError`], compared whole in its tests,
//! which keeps the client's words when the API cannot be reached). Their messages are what users read in a configuration error
//! or a call's event log. The agent crates keep them as the sources of their own errors
//! (`#[from]`), so the chain is never cut to text; a route's settings error keeps one as its
//! source too (`callgate_agent::catalog::SettingsError::caused`). Only
//! [`template::ParseError`] still converts into a `String`, for the flow file's checker,
//! whose errors are still words.

pub mod audio;
pub mod callbridge;
pub mod files;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod plaintext;
pub mod schema;
pub mod stt;
pub mod template;
pub mod tls;
pub mod tools;
pub mod tts;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use callbridge::CallBridgeApi;
pub use stt::SttSettings;
pub use tts::TtsSettings;

/// What agents need from the server: where to keep recordings and rendered speech, the
/// server's text-to-speech settings (`[tts]`) and CallBridge's OPEN API (`[callbridge]`).
#[derive(Debug, Clone, Default)]
pub struct AgentEnv {
    /// The server's data dir: `messages/` (recordings) and `tts-cache/` go there.
    pub data_dir: PathBuf,
    /// The server's `[tts]` settings; an agent's own settings override them key by key.
    pub tts: TtsSettings,
    /// CallBridge's OPEN API (`[callbridge]`), for `agent_terminate` and `send_sms`.
    pub callbridge: Option<CallBridgeApi>,
    /// The server's `[stt]` settings: speech to text for flows that listen (none: a gather
    /// step that listens names its own).
    pub stt: Option<SttSettings>,
}

/// A duration written as text (`"5s"`, `"250ms"`, `"1m 30s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}
