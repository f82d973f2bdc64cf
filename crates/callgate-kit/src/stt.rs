//! Speech to text, for every agent that listens (the `pipeline` agent, a flow's `gather`).
//!
//! One settings shape, [`SttSettings`] (`[stt]` in the server's config, `[routes.settings.stt]`
//! of a pipeline route, `stt` on a gather step), built once per route into an [`Stt`]; each
//! thing the caller says is an [`Utterance`]: audio pushed as it arrives, the text at
//! [`Utterance::finish`].
//!
//! - `provider = "openai"`: `POST {base_url}/audio/transcriptions` as OpenAI documents it
//!   (multipart form: `model`, `language`, `response_format = "json"` and the audio as a WAV
//!   file; answered `{"text": ...}`), which OpenAI, faster-whisper servers, vLLM and many
//!   others serve. The utterance is buffered (at most [`MAX_UTTERANCE`]) and sent whole.
//! - `provider = "vosk"` (cargo feature `vosk`): in-process, streaming recognition with a vosk
//!   model directory (`model`). The model is loaded once per directory and shared by every
//!   route and call; each utterance's audio is recognised as it arrives on a small pool of
//!   worker threads, never on the call's task (see the `vosk` module for the policy).

use std::io::Cursor;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::Dur;

/// The most audio one utterance keeps (the rest is dropped): a turn or an answer to a menu
/// is seconds long; this bounds the memory a caller who never stops can take.
pub const MAX_UTTERANCE: Duration = Duration::from_secs(120);

/// The default OpenAI-compatible API (version path included, as the OpenAI SDKs take it).
pub const OPENAI: &str = "https://api.openai.com/v1";

/// `[stt]`: which speech-to-text provider and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SttSettings {
    /// `openai` (an OpenAI-compatible HTTP API) or `vosk` (in-process; needs the `vosk`
    /// build feature).
    pub provider: String,
    /// The API, version path included (openai).
    pub base_url: String,
    /// openai: the model (`gpt-4o-mini-transcribe`, `whisper-1`, a faster-whisper model...);
    /// vosk: the model's directory.
    pub model: String,
    /// The language (ISO-639-1, `ko`), or none: detected (openai).
    pub language: Option<String>,
    /// The environment variable holding the API key (none: no `Authorization`).
    pub api_key_env: Option<String>,
    /// How long one transcription may take (after the utterance's end).
    pub timeout: Dur,
}

impl Default for SttSettings {
    fn default() -> Self {
        Self {
            provider: "openai".into(),
            base_url: OPENAI.into(),
            model: "gpt-4o-mini-transcribe".into(),
            language: None,
            api_key_env: None,
            timeout: Dur(Duration::from_secs(10)),
        }
    }
}

impl SttSettings {
    /// Checks the settings without loading anything: the field that is wrong, and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.timeout.0.is_zero() {
            return Err(("timeout", "must be more than zero".into()));
        }
        match self.provider.as_str() {
            "openai" => {
                let url = reqwest::Url::parse(&self.base_url)
                    .map_err(|e| ("base_url", format!("{:?}: {e}", self.base_url)))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(("base_url", "must be http(s)".into()));
                }
                if self.model.trim().is_empty() {
                    return Err(("model", "must name the model".into()));
                }
                if let Some(var) = &self.api_key_env
                    && std::env::var(var).is_err()
                {
                    return Err(("api_key_env", format!("${var} is not set")));
                }
                Ok(())
            }
            "vosk" => {
                if !cfg!(feature = "vosk") {
                    return Err((
                        "provider",
                        "\"vosk\": this callgate was built without vosk (build it with \
                         `--features vosk`, libvosk.so from scripts/fetch-vosk)"
                            .into(),
                    ));
                }
                let dir = std::path::Path::new(&self.model);
                if !dir.join("am").join("final.mdl").is_file() {
                    return Err((
                        "model",
                        format!(
                            "{:?} is not a vosk model directory (no am/final.mdl; \
                             scripts/fetch-vosk fetches the Korean one)",
                            self.model
                        ),
                    ));
                }
                Ok(())
            }
            other => Err(("provider", format!("{other:?}: openai or vosk"))),
        }
    }
}

/// A transcription that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SttError {
    /// The settings cannot work (found when the provider is built): the setting and the
    /// problem, in words.
    #[error("{0}")]
    Config(String),
    /// The provider could not be reached (refused, reset, DNS).
    #[error("cannot reach the provider: {0}")]
    Unreachable(#[source] reqwest::Error),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The provider answered with an HTTP error.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// The answer broke off while it was read.
    #[error("bad answer: {0}")]
    Read(#[source] reqwest::Error),
    /// The answer is not JSON.
    #[error("bad answer: {0}")]
    Json(#[source] serde_json::Error),
    /// The answer is JSON, but not what the API documents (or longer than the bound).
    #[error("bad answer: {0}")]
    BadAnswer(&'static str),
    /// The recogniser fell too far behind the call's audio and dropped the utterance.
    #[error("the recogniser is overloaded")]
    Overloaded,
    /// The utterance could not be written as a WAV file for the API.
    #[error("cannot write the audio as WAV: {0}")]
    Wav(#[source] hound::Error),
    /// The in-process recogniser failed (what it said).
    #[error("recogniser: {0}")]
    Engine(String),
}

impl SttError {
    /// Whether asking again may help (timeouts, refused connections, 5xx, 429).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A speech-to-text provider, built once (a route, a flow) and shared by its calls.
#[derive(Debug, Clone)]
pub struct Stt {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    OpenAi(std::sync::Arc<OpenAi>),
    #[cfg(feature = "vosk")]
    Vosk(recognizer::Shared),
}

impl Stt {
    /// Builds the provider `settings` name (a vosk model is loaded here, once per directory:
    /// call it where loading may take seconds, e.g. when routes load).
    pub fn build(settings: &SttSettings, http: &reqwest::Client) -> Result<Self, SttError> {
        settings
            .check()
            .map_err(|(field, why)| SttError::Config(format!("stt.{field}: {why}")))?;
        let inner = match settings.provider.as_str() {
            #[cfg(feature = "vosk")]
            "vosk" => Inner::Vosk(recognizer::Shared::load(std::path::Path::new(
                &settings.model,
            ))?),
            _ => Inner::OpenAi(std::sync::Arc::new(OpenAi::new(settings, http.clone()))),
        };
        Ok(Self { inner })
    }

    /// The provider's name (`openai`, `vosk`).
    pub fn name(&self) -> &'static str {
        match &self.inner {
            Inner::OpenAi(_) => "openai",
            #[cfg(feature = "vosk")]
            Inner::Vosk(_) => "vosk",
        }
    }

    /// Starts an utterance of 16-bit mono audio at `rate` Hz.
    pub fn start(&self, rate: u32) -> Result<Utterance, SttError> {
        let inner = match &self.inner {
            Inner::OpenAi(api) => Pending::Buffered {
                api: api.clone(),
                samples: Vec::new(),
            },
            #[cfg(feature = "vosk")]
            Inner::Vosk(shared) => Pending::Vosk(shared.stream(rate)?),
        };
        Ok(Utterance {
            inner,
            rate,
            pushed: 0,
        })
    }

    /// Transcribes audio that is all there already (a turn the pipeline cut).
    pub async fn transcribe(&self, samples: &[i16], rate: u32) -> Result<String, SttError> {
        let mut utterance = self.start(rate)?;
        utterance.push(samples);
        utterance.finish().await
    }
}

/// One thing the caller says: audio in as it comes, text out at the end.
#[derive(Debug)]
pub struct Utterance {
    inner: Pending,
    rate: u32,
    pushed: u64,
}

#[derive(Debug)]
enum Pending {
    Buffered {
        api: std::sync::Arc<OpenAi>,
        samples: Vec<i16>,
    },
    #[cfg(feature = "vosk")]
    Vosk(recognizer::Stream),
}

impl Utterance {
    /// Adds audio; past [`MAX_UTTERANCE`] it is dropped.
    pub fn push(&mut self, samples: &[i16]) {
        let max = MAX_UTTERANCE.as_secs() * u64::from(self.rate);
        let room = usize::try_from(max.saturating_sub(self.pushed)).unwrap_or(usize::MAX);
        let samples = &samples[..samples.len().min(room)];
        if samples.is_empty() {
            return;
        }
        self.pushed += samples.len() as u64;
        match &mut self.inner {
            Pending::Buffered { samples: all, .. } => all.extend_from_slice(samples),
            #[cfg(feature = "vosk")]
            Pending::Vosk(stream) => stream.push(samples),
        }
    }

    /// How much audio was pushed (kept), in milliseconds.
    pub fn audio_ms(&self) -> u64 {
        self.pushed * 1000 / u64::from(self.rate.max(1))
    }

    /// The text of the utterance (empty when nothing was recognised).
    pub async fn finish(self) -> Result<String, SttError> {
        match self.inner {
            Pending::Buffered { api, samples } => api.transcribe(&samples, self.rate).await,
            #[cfg(feature = "vosk")]
            Pending::Vosk(stream) => stream.finish().await,
        }
    }
}

/// An OpenAI-compatible `POST {base_url}/audio/transcriptions`.
#[derive(Debug)]
struct OpenAi {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
    model: String,
    language: Option<String>,
    timeout: Duration,
}

impl OpenAi {
    fn new(s: &SttSettings, http: reqwest::Client) -> Self {
        let base_url = s.base_url.trim_end_matches('/');
        let key = s.api_key_env.as_ref().and_then(|v| std::env::var(v).ok());
        if key.is_some() {
            crate::plaintext::warn_if_exposed("stt base_url", base_url);
        }
        Self {
            http,
            url: format!("{base_url}/audio/transcriptions"),
            key,
            model: s.model.clone(),
            language: s.language.clone(),
            timeout: s.timeout.0,
        }
    }

    async fn transcribe(&self, samples: &[i16], rate: u32) -> Result<String, SttError> {
        let file = wav(samples, rate).map_err(SttError::Wav)?;
        let mut fields = vec![("model", self.model.as_str()), ("response_format", "json")];
        if let Some(language) = &self.language {
            fields.push(("language", language));
        }
        let (content_type, body) = multipart(&fields, &file);
        let mut request = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                SttError::Timeout(self.timeout)
            } else if e.is_connect() || e.is_request() {
                SttError::Unreachable(e)
            } else {
                SttError::Read(e)
            }
        };
        let answer = request.send().await.map_err(failed)?;
        let status = answer.status();
        if !status.is_success() {
            let body = crate::http::read_bounded(answer, 1000)
                .await
                .map(|b| String::from_utf8_lossy(&b.body).into_owned())
                .unwrap_or_default();
            return Err(SttError::Status {
                status: status.as_u16(),
                body,
            });
        }
        let read = crate::http::read_bounded(answer, crate::http::MAX_ANSWER)
            .await
            .map_err(failed)?;
        if read.cut {
            return Err(SttError::BadAnswer("the answer is too long"));
        }
        let value: Value = serde_json::from_slice(&read.body).map_err(SttError::Json)?;
        value
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(SttError::BadAnswer("no \"text\" in the answer"))
    }
}

/// 16-bit mono PCM as a WAV file.
fn wav(samples: &[i16], rate: u32) -> Result<Vec<u8>, hound::Error> {
    let mut out = Cursor::new(Vec::with_capacity(44 + samples.len() * 2));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(&mut out, spec)?;
    for &s in samples {
        w.write_sample(s)?;
    }
    w.finalize()?;
    Ok(out.into_inner())
}

/// A multipart/form-data body: text fields and one file, with a boundary the file does not
/// contain.
fn multipart(fields: &[(&str, &str)], file: &[u8]) -> (String, Vec<u8>) {
    let mut n = 0u32;
    let boundary = loop {
        let b = format!("callgate-{n:08x}-7d1f3a5c9e");
        if !file.windows(b.len()).any(|w| w == b.as_bytes()) {
            break b;
        }
        n += 1;
    };
    let mut body = Vec::with_capacity(file.len() + 512);
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
             filename=\"turn.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Lower-cases `text` and keeps only its letters and digits (any script: Hangul syllables
/// are letters), so that "요금 문의요!" and "요금문의요" compare equal; what a phrase
/// match in a transcript needs (STT output differs in spacing and punctuation).
pub fn normalize(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(feature = "vosk")]
mod recognizer;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_multipart_body_has_the_fields_and_the_file_and_a_boundary_not_in_it() {
        let file = b"RIFF....callgate-00000000-7d1f3a5c9e....";
        let (content_type, body) = multipart(&[("model", "m"), ("language", "ko")], file);
        assert!(
            content_type.ends_with("callgate-00000001-7d1f3a5c9e"),
            "{content_type}"
        );
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("name=\"model\"\r\n\r\nm\r\n"));
        assert!(text.contains("name=\"language\"\r\n\r\nko\r\n"));
        assert!(text.contains("filename=\"turn.wav\""));
        assert!(text.ends_with("--callgate-00000001-7d1f3a5c9e--\r\n"));
    }

    #[test]
    fn a_turn_becomes_a_wav_file() {
        let data = wav(&[1, -1, 300], 8000).unwrap();
        let r = hound::WavReader::new(Cursor::new(data)).unwrap();
        assert_eq!((r.spec().sample_rate, r.len()), (8000, 3));
    }

    #[test]
    fn normalising_drops_case_spaces_and_punctuation_in_any_script() {
        assert_eq!(normalize("요금 문의요!"), "요금문의요");
        assert_eq!(normalize(" Billing, please. "), "billingplease");
        assert_eq!(normalize("상담원 연결?"), normalize("상담원연결"));
    }

    #[test]
    fn settings_errors_name_the_field() {
        let bad = |s: SttSettings| s.check().unwrap_err().0;
        assert_eq!(
            bad(SttSettings {
                provider: "whisper".into(),
                ..Default::default()
            }),
            "provider"
        );
        assert_eq!(
            bad(SttSettings {
                base_url: "ftp://x".into(),
                ..Default::default()
            }),
            "base_url"
        );
        assert_eq!(
            bad(SttSettings {
                timeout: Dur(Duration::ZERO),
                ..Default::default()
            }),
            "timeout"
        );
        let vosk = SttSettings {
            provider: "vosk".into(),
            model: "/nonexistent/model".into(),
            ..Default::default()
        };
        // Without the feature the provider is refused; with it, the directory is checked.
        let expected = if cfg!(feature = "vosk") {
            "model"
        } else {
            "provider"
        };
        assert_eq!(bad(vosk), expected);
        assert!(SttSettings::default().check().is_ok());
    }

    #[test]
    fn an_utterance_keeps_at_most_the_bound() {
        let http = crate::http::client().unwrap();
        let stt = Stt::build(&SttSettings::default(), &http).unwrap();
        let mut u = stt.start(8000).unwrap();
        let second = vec![0i16; 8000];
        for _ in 0..MAX_UTTERANCE.as_secs() + 5 {
            u.push(&second);
        }
        assert_eq!(u.audio_ms(), MAX_UTTERANCE.as_millis() as u64);
    }

    #[tokio::test]
    async fn an_unreachable_provider_keeps_the_client_error_as_the_source() {
        // A port nothing listens on any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let http = crate::http::client().unwrap();
        let settings = SttSettings {
            base_url: format!("http://{addr}/v1"),
            ..Default::default()
        };
        let stt = Stt::build(&settings, &http).unwrap();
        let error = stt.transcribe(&[0; 160], 8000).await.unwrap_err();
        assert!(matches!(error, SttError::Unreachable(_)), "{error:?}");
        assert!(error.retryable());
        let source = std::error::Error::source(&error).expect("the client's error");
        assert!(
            source.downcast_ref::<reqwest::Error>().is_some(),
            "{source:?}"
        );
    }

    #[test]
    fn only_server_trouble_is_retryable() {
        assert!(SttError::Timeout(Duration::from_secs(1)).retryable());
        assert!(
            SttError::Status {
                status: 503,
                body: String::new()
            }
            .retryable()
        );
        assert!(
            !SttError::Status {
                status: 400,
                body: String::new()
            }
            .retryable()
        );
        assert!(!SttError::BadAnswer("no \"text\" in the answer").retryable());
    }
}
