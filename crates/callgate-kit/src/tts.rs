//! Text-to-speech: a [`Provider`] trait, `espeak-ng` run as a subprocess, an OpenAI-compatible
//! `POST {base_url}/audio/speech` provider (`base_url` with its version path, as the OpenAI SDKs
//! take it), and a [`Cache`] of rendered audio in the data
//! dir keyed by provider, voice, text and format.
//!
//! espeak-ng is GPL-3: it is run as a program (`espeak-ng -v VOICE -w FILE TEXT`), never
//! linked. The OpenAI-compatible provider asks for `response_format = "pcm"` by default (raw
//! 24 kHz 16-bit little-endian mono, no header to mistrust); `wav` is read with hound.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use callgate_audio::wav::MonoAudio;
use serde::Deserialize;

use crate::Dur;

/// A synthesis that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TtsError {
    /// The espeak-ng program could not be run (not installed?).
    #[error("cannot run espeak-ng ({0}); install it (Debian: apt-get install espeak-ng)")]
    NotInstalled(#[source] std::io::Error),
    /// `espeak-ng --version` ran and failed.
    #[error(
        "cannot run espeak-ng (espeak-ng --version: {0}); install it (Debian: apt-get install \
         espeak-ng)"
    )]
    Broken(std::process::ExitStatus),
    /// espeak-ng ran but failed: the voice and what it wrote to stderr.
    #[error("speech synthesis failed: espeak-ng -v {voice}: {stderr}")]
    Failed {
        /// The voice asked for.
        voice: String,
        /// What espeak-ng said.
        stderr: String,
    },
    /// The request to the provider failed (unreachable, reset...).
    #[error("speech synthesis failed: POST {url}: {source}")]
    Request {
        /// Where it went.
        url: String,
        /// What the client said.
        source: reqwest::Error,
    },
    /// The synthesis task stopped before it answered.
    #[error("speech synthesis failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The provider did not answer in time.
    #[error("speech synthesis timed out after {0:?}")]
    Timeout(Duration),
    /// The provider answered with an HTTP error.
    #[error("speech provider answered HTTP {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// The provider's audio is not audio (too large, empty, an odd number of PCM bytes).
    #[error("speech provider sent unreadable audio: {0}")]
    BadAudio(&'static str),
    /// The provider's WAV file could not be read.
    #[error("speech provider sent unreadable audio: {0}")]
    Wav(#[source] callgate_audio::Error),
    /// The provider's settings cannot work: the setting and the problem, in words.
    #[error("{0}")]
    Config(String),
}

/// Why speech could not be rendered while routes load ([`render_at_load`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenderError {
    /// The synthesis failed.
    #[error(transparent)]
    Speech(#[from] TtsError),
    /// The rendering thread could not start its runtime.
    #[error(transparent)]
    Runtime(std::io::Error),
    /// The rendering thread panicked.
    #[error("speech rendering panicked")]
    Panicked,
    /// The audio could not be converted to the call rates.
    #[error(transparent)]
    Audio(#[from] callgate_audio::Error),
    /// The HTTP client for the provider could not be made (its TLS roots): [`render`].
    #[error(transparent)]
    Client(#[from] crate::http::ClientError),
    /// The settings' provider cannot be used (espeak-ng missing, a bad `base_url`...):
    /// [`render`].
    #[error(transparent)]
    Provider(TtsError),
}

/// A boxed synthesis (the one place a `dyn Provider` needs a boxed future).
pub type Synthesis<'a> = Pin<Box<dyn Future<Output = Result<MonoAudio, TtsError>> + Send + 'a>>;

/// Something that turns text into audio.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Identifies the provider and its output format in cache keys (`espeak-ng/wav`,
    /// `openai:https://api.openai.com:tts-1/pcm`).
    fn key(&self) -> String;
    /// Speaks `text` with `voice`.
    fn synthesize<'a>(&'a self, text: &'a str, voice: &'a str) -> Synthesis<'a>;
}

/// Which provider: `[tts]` in the server's config file, in a flow file, and `provider` on a
/// step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderName {
    /// espeak-ng, run as a subprocess.
    #[default]
    EspeakNg,
    /// An OpenAI-compatible `/v1/audio/speech` API.
    Openai,
}

/// TTS settings (`[tts]`): the server's, overridden key by key by a flow's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtsSettings {
    /// `espeak-ng` (default) or `openai`.
    #[serde(default)]
    pub provider: Option<ProviderName>,
    /// The voice (espeak-ng: `en-us`, `ko`...; OpenAI: `alloy`...).
    #[serde(default)]
    pub voice: Option<String>,
    /// OpenAI-compatible: the API's base URL with its version path, as the OpenAI SDKs take it
    /// (default `https://api.openai.com/v1`). One without a version path (the old form,
    /// `https://api.openai.com`) still works, as `{base_url}/v1`, with a warning.
    #[serde(default)]
    pub base_url: Option<String>,
    /// OpenAI-compatible: the model (default `gpt-4o-mini-tts`).
    #[serde(default)]
    pub model: Option<String>,
    /// OpenAI-compatible: the environment variable holding the API key (default
    /// `OPENAI_API_KEY`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// OpenAI-compatible: `pcm` (default) or `wav`.
    #[serde(default)]
    pub response_format: Option<String>,
    /// How long one synthesis may take (default 10s).
    #[serde(default)]
    pub timeout: Option<Dur>,
}

impl TtsSettings {
    /// These settings, each one not given taken from `base`.
    pub fn over(&self, base: &Self) -> Self {
        Self {
            provider: self.provider.or(base.provider),
            voice: self.voice.clone().or_else(|| base.voice.clone()),
            base_url: self.base_url.clone().or_else(|| base.base_url.clone()),
            model: self.model.clone().or_else(|| base.model.clone()),
            api_key_env: self
                .api_key_env
                .clone()
                .or_else(|| base.api_key_env.clone()),
            response_format: self
                .response_format
                .clone()
                .or_else(|| base.response_format.clone()),
            timeout: self.timeout.or(base.timeout),
        }
    }

    /// The voice, or the provider's default.
    pub fn voice(&self) -> String {
        self.voice.clone().unwrap_or_else(|| {
            match self.provider.unwrap_or_default() {
                ProviderName::EspeakNg => "en-us",
                ProviderName::Openai => "alloy",
            }
            .to_owned()
        })
    }

    /// Builds the provider these settings describe (checks what can be checked at load:
    /// espeak-ng installed, the key's variable set, the format known).
    pub fn provider(&self, http: &reqwest::Client) -> Result<Arc<dyn Provider>, TtsError> {
        let timeout = self.timeout.map_or(Duration::from_secs(10), |d| d.0);
        match self.provider.unwrap_or_default() {
            ProviderName::EspeakNg => {
                Espeak::check()?;
                Ok(Arc::new(Espeak { timeout }))
            }
            ProviderName::Openai => {
                let env = self
                    .api_key_env
                    .clone()
                    .unwrap_or_else(|| "OPENAI_API_KEY".into());
                let key = std::env::var(&env).map_err(|_| {
                    TtsError::Config(format!(
                        "the OpenAI-compatible provider needs an API key in ${env} (api_key_env)"
                    ))
                })?;
                let format = self.response_format.clone().unwrap_or_else(|| "pcm".into());
                if !matches!(format.as_str(), "pcm" | "wav") {
                    return Err(TtsError::Config(format!(
                        "response_format {format:?}: callgate reads pcm or wav"
                    )));
                }
                let given = self
                    .base_url
                    .clone()
                    .unwrap_or_else(|| "https://api.openai.com/v1".into());
                let (base_url, old_form) = versioned(&given);
                if old_form {
                    tracing::warn!(
                        base_url = %given,
                        used = %base_url,
                        "[tts] base_url has no version path: write it as the OpenAI SDKs \
                         take it (https://api.openai.com/v1); /v1 is added for now."
                    );
                }
                crate::plaintext::warn_if_exposed("[tts] base_url", &base_url);
                Ok(Arc::new(OpenAi {
                    http: http.clone(),
                    base_url,
                    model: self
                        .model
                        .clone()
                        .unwrap_or_else(|| "gpt-4o-mini-tts".into()),
                    key,
                    format,
                    timeout,
                }))
            }
        }
    }
}

/// espeak-ng as a subprocess.
#[derive(Debug, Clone)]
pub struct Espeak {
    timeout: Duration,
}

impl Espeak {
    /// Whether `espeak-ng` can be run.
    pub fn check() -> Result<(), TtsError> {
        match std::process::Command::new("espeak-ng")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(TtsError::Broken(s)),
            Err(e) => Err(TtsError::NotInstalled(e)),
        }
    }

    /// Runs espeak-ng to a temporary WAV file and reads it (blocking).
    fn run(text: &str, voice: &str) -> Result<MonoAudio, TtsError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file =
            std::env::temp_dir().join(format!("callgate-espeak-{}-{n}.wav", std::process::id()));
        // `--` ends the options: a text starting with `-` is still text.
        let output = std::process::Command::new("espeak-ng")
            .args(["-v", voice, "-w"])
            .arg(&file)
            .arg("--")
            .arg(text)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(TtsError::NotInstalled)?;
        let result = if output.status.success() {
            callgate_audio::wav::read_mono(&file).map_err(TtsError::Wav)
        } else {
            Err(TtsError::Failed {
                voice: voice.to_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        };
        let _ = std::fs::remove_file(&file);
        result
    }
}

impl Provider for Espeak {
    fn key(&self) -> String {
        "espeak-ng/wav".into()
    }

    fn synthesize<'a>(&'a self, text: &'a str, voice: &'a str) -> Synthesis<'a> {
        let (text, voice) = (text.to_owned(), voice.to_owned());
        let timeout = self.timeout;
        Box::pin(async move {
            // A subprocess and a file: off the async workers.
            let work = tokio::task::spawn_blocking(move || Espeak::run(&text, &voice));
            match tokio::time::timeout(timeout, work).await {
                Ok(Ok(result)) => result,
                Ok(Err(e)) => Err(TtsError::Task(e)),
                Err(_) => Err(TtsError::Timeout(timeout)),
            }
        })
    }
}

/// `base_url` as the API's root with its version path, and whether it was the old form (no
/// version path: `/v1` added).
pub fn versioned(base_url: &str) -> (String, bool) {
    let trimmed = base_url.trim_end_matches('/');
    let last = trimmed.rsplit('/').next().unwrap_or("");
    let has_version = trimmed.matches('/').count() > 2
        && last.len() >= 2
        && last.starts_with('v')
        && last[1..].starts_with(|c: char| c.is_ascii_digit());
    if has_version {
        (trimmed.to_owned(), false)
    } else {
        (format!("{trimmed}/v1"), true)
    }
}

/// An OpenAI-compatible `POST {base_url}/audio/speech`.
#[derive(Debug, Clone)]
pub struct OpenAi {
    http: reqwest::Client,
    base_url: String,
    model: String,
    key: String,
    format: String,
    timeout: Duration,
}

/// The most audio one answer may carry (about 10 minutes of 24 kHz PCM).
const MAX_SPEECH_BYTES: usize = 32 * 1024 * 1024;

impl OpenAi {
    async fn request(&self, text: &str, voice: &str) -> Result<MonoAudio, TtsError> {
        let url = format!("{}/audio/speech", self.base_url);
        let body = serde_json::json!({
            "model": self.model,
            "voice": voice,
            "input": text,
            "response_format": self.format,
        });
        let answer = self
            .http
            .post(&url)
            .bearer_auth(&self.key)
            .json(&body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.failed(&url, e))?;
        let status = answer.status();
        if answer
            .content_length()
            .is_some_and(|n| n > MAX_SPEECH_BYTES as u64)
        {
            return Err(TtsError::BadAudio("the answer is too large"));
        }
        let bytes = answer.bytes().await.map_err(|e| self.failed(&url, e))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(TtsError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        if bytes.len() > MAX_SPEECH_BYTES {
            return Err(TtsError::BadAudio("the answer is too large"));
        }
        decode(&self.format, &bytes)
    }

    /// A request to `url` that brought no answer: a timeout, or why not.
    fn failed(&self, url: &str, source: reqwest::Error) -> TtsError {
        if source.is_timeout() {
            TtsError::Timeout(self.timeout)
        } else {
            TtsError::Request {
                url: url.to_owned(),
                source,
            }
        }
    }
}

/// Reads a provider's answer: `pcm` is 24 kHz 16-bit little-endian mono (OpenAI's documented
/// raw format); `wav` any PCM WAV.
fn decode(format: &str, bytes: &[u8]) -> Result<MonoAudio, TtsError> {
    let audio = if format == "pcm" {
        if !bytes.len().is_multiple_of(2) {
            return Err(TtsError::BadAudio("odd number of PCM bytes"));
        }
        let mut samples = Vec::with_capacity(bytes.len() / 2);
        callgate_audio::pcm::le_bytes_to_samples(bytes, &mut samples);
        MonoAudio {
            rate: 24000,
            samples,
        }
    } else {
        let reader = hound::WavReader::new(std::io::Cursor::new(bytes))
            .map_err(|e| TtsError::Wav(e.into()))?;
        callgate_audio::wav::read_mono_from(reader).map_err(TtsError::Wav)?
    };
    if audio.samples.is_empty() {
        return Err(TtsError::BadAudio("no audio"));
    }
    Ok(audio)
}

impl Provider for OpenAi {
    fn key(&self) -> String {
        format!("openai:{}:{}/{}", self.base_url, self.model, self.format)
    }

    fn synthesize<'a>(&'a self, text: &'a str, voice: &'a str) -> Synthesis<'a> {
        Box::pin(self.request(text, voice))
    }
}

/// Rendered speech on disk: `DATA_DIR/tts-cache/HASH.wav`, with `HASH.key` holding the whole
/// key (provider, voice, format, text), compared on every read so a hash collision is a miss.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// A cache in `data_dir/tts-cache`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tts-cache"),
        }
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        // FNV-1a, 64 bits: stable across builds (std's hasher is not promised to be).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let stem = format!("{h:016x}");
        (
            self.dir.join(format!("{stem}.wav")),
            self.dir.join(format!("{stem}.key")),
        )
    }

    /// The cache key of a synthesis.
    pub fn key(provider: &dyn Provider, voice: &str, text: &str) -> String {
        format!("{}\n{voice}\n{text}", provider.key())
    }

    /// The cached audio for `key` (blocking file I/O).
    pub fn get(&self, key: &str) -> Option<MonoAudio> {
        let (wav, keyfile) = self.paths(key);
        if std::fs::read_to_string(keyfile).ok()? != key {
            return None;
        }
        callgate_audio::wav::read_mono(&wav).ok()
    }

    /// Stores audio under `key` (blocking file I/O); written to a temporary name and renamed,
    /// so a reader never sees half a file. A failure only costs a later re-render.
    pub fn put(&self, key: &str, audio: &MonoAudio) {
        let (wav, keyfile) = self.paths(key);
        let tmp = wav.with_extension(format!("tmp{}", std::process::id()));
        // Private (0700/0600 whatever the umask): a prompt's text may be personal.
        let stored = crate::files::private_dirs(&self.dir, &self.dir).is_ok()
            && crate::files::write_wav(&tmp, audio.rate, &audio.samples).is_ok()
            && crate::files::private_file(&keyfile)
                .is_ok_and(|mut f| std::io::Write::write_all(&mut f, key.as_bytes()).is_ok())
            && std::fs::rename(&tmp, &wav).is_ok();
        if !stored {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(dir = %self.dir.display(), "Cannot store rendered speech in the cache.");
        }
    }
}

/// Speaks `text`, from the cache when it was rendered before (blocking file I/O is moved off
/// the async workers).
pub async fn speak(
    cache: &Cache,
    provider: &dyn Provider,
    voice: &str,
    text: &str,
) -> Result<MonoAudio, TtsError> {
    let key = Cache::key(provider, voice, text);
    let lookup = {
        let (cache, key) = (cache.clone(), key.clone());
        tokio::task::spawn_blocking(move || cache.get(&key))
    };
    if let Ok(Some(audio)) = lookup.await {
        return Ok(audio);
    }
    let audio = provider.synthesize(text, voice).await?;
    let (store, stored) = (cache.clone(), audio.clone());
    let _ = tokio::task::spawn_blocking(move || store.put(&key, &stored)).await;
    Ok(audio)
}

/// Speaks `text` while routes load (through the cache), outside or inside a runtime: on a
/// thread of its own with a small runtime. The prompt is converted to every call rate now, so
/// a call only slices it.
pub fn render_at_load(
    cache: &Cache,
    provider: &dyn Provider,
    voice: &str,
    text: &str,
) -> Result<crate::audio::PromptAudio, RenderError> {
    let audio = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(RenderError::Runtime)?;
            Ok(rt.block_on(speak(cache, provider, voice, text))?)
        })
        .join()
        .unwrap_or(Err(RenderError::Panicked))
    })?;
    let prompt = crate::audio::PromptAudio::new(text, &audio)?;
    for format in [
        callgate_audio::AudioFormat::Pcm8000,
        callgate_audio::AudioFormat::Pcm16000,
        callgate_audio::AudioFormat::Pcm24000,
        callgate_audio::AudioFormat::Pcm48000,
    ] {
        prompt.chunks(format);
    }
    Ok(prompt)
}

/// Speaks `text` while routes load with the provider and voice of `settings`, through the
/// speech cache in `data_dir`: the HTTP client, the provider and [`render_at_load`] in one call,
/// for an agent whose messages are rendered once per route.
pub fn render(
    settings: &TtsSettings,
    data_dir: &Path,
    text: &str,
) -> Result<crate::audio::PromptAudio, RenderError> {
    let http = crate::http::client()?;
    let provider = settings.provider(&http).map_err(RenderError::Provider)?;
    render_at_load(
        &Cache::new(data_dir),
        provider.as_ref(),
        &settings.voice(),
        text,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_keep_their_version_path_and_the_old_form_gets_v1() {
        assert_eq!(
            versioned("https://api.openai.com/v1"),
            ("https://api.openai.com/v1".into(), false)
        );
        assert_eq!(
            versioned("http://localhost:11434/v1/"),
            ("http://localhost:11434/v1".into(), false)
        );
        assert_eq!(
            versioned("https://example.com/api/v2beta"),
            ("https://example.com/api/v2beta".into(), false)
        );
        assert_eq!(
            versioned("https://api.openai.com"),
            ("https://api.openai.com/v1".into(), true)
        );
        assert_eq!(
            versioned("http://127.0.0.1:8080/voice"),
            ("http://127.0.0.1:8080/voice/v1".into(), true)
        );
    }

    #[test]
    fn pcm_answers_are_24k_and_nonsense_is_refused() {
        let audio = decode("pcm", &[1, 0, 2, 0]).unwrap();
        assert_eq!(
            (audio.rate, audio.samples.as_slice()),
            (24000, &[1i16, 2][..])
        );
        assert!(matches!(decode("pcm", &[1]), Err(TtsError::BadAudio(_))));
        assert!(matches!(decode("wav", b"nonsense"), Err(TtsError::Wav(_))));
        assert!(matches!(decode("pcm", &[]), Err(TtsError::BadAudio(_))));
    }

    #[test]
    fn settings_merge_key_by_key() {
        let global = TtsSettings {
            voice: Some("en-us".into()),
            model: Some("m".into()),
            ..TtsSettings::default()
        };
        let flow = TtsSettings {
            voice: Some("ko".into()),
            ..TtsSettings::default()
        };
        let merged = flow.over(&global);
        assert_eq!(merged.voice(), "ko");
        assert_eq!(merged.model.as_deref(), Some("m"));
        assert_eq!(TtsSettings::default().voice(), "en-us");
    }

    /// OpenAI-compatible settings whose API is a loopback port nobody listens on (it is
    /// never reached when the cache answers).
    fn openai(api_key_env: &str, voice: &str) -> TtsSettings {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        TtsSettings {
            provider: Some(ProviderName::Openai),
            voice: Some(voice.into()),
            base_url: Some(format!("http://{closed}/v1")),
            api_key_env: Some(api_key_env.into()),
            ..TtsSettings::default()
        }
    }

    #[test]
    fn render_speaks_with_the_settings_voice_through_the_data_dirs_cache() {
        // The key is in a variable every test run has.
        let dir = std::env::temp_dir().join(format!("callgate-kit-render-{}", std::process::id()));
        let settings = openai("PATH", "nova");
        let http = crate::http::client().unwrap();
        let provider = settings.provider(&http).unwrap();
        let audio = MonoAudio {
            rate: 8000,
            samples: vec![300; 800],
        };
        // Cached under the settings' voice: found, so the closed port is never asked.
        Cache::new(&dir).put(&Cache::key(provider.as_ref(), "nova", "hello"), &audio);
        let prompt = render(&settings, &dir, "hello").expect("rendered from the cache");
        assert_eq!((prompt.label.as_str(), prompt.ms), ("hello", 100));
        // Another voice (the same provider) is another key: a miss, and the API cannot be
        // reached.
        let other = TtsSettings {
            voice: Some("alloy".into()),
            ..settings.clone()
        };
        let error = render(&other, &dir, "hello").unwrap_err();
        assert!(
            matches!(&error, RenderError::Speech(TtsError::Request { .. })),
            "{error:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn render_says_why_the_provider_cannot_be_used_and_keeps_the_cause() {
        let dir = std::env::temp_dir();
        let error = render(
            &openai("CALLGATE_KIT_TEST_NO_SUCH_VARIABLE", "alloy"),
            &dir,
            "hello",
        )
        .unwrap_err();
        assert!(
            matches!(&error, RenderError::Provider(TtsError::Config(_))),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "the OpenAI-compatible provider needs an API key in \
             $CALLGATE_KIT_TEST_NO_SUCH_VARIABLE (api_key_env)"
        );
    }
}
