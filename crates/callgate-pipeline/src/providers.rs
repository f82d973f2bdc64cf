//! The providers, as OpenAI documents them (and OpenAI-compatible servers serve them): speech
//! to text through the kit's [`callgate_kit::stt`] (an OpenAI-compatible
//! `POST {base_url}/audio/transcriptions`, or vosk in process),
//! `POST {base_url}/chat/completions` (`stream: true`, server-sent events) and
//! `POST {base_url}/audio/speech` (`response_format = "pcm"`: 24 kHz 16-bit mono, streamed);
//! and espeak-ng. Each runs on a task of the call's `Spawner`; what it produces goes back to
//! the driver as [`Msg`]s.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callgate_audio::{AudioFormat, Converter};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::chat::{Accumulator, Answer, Delta};
use crate::core::{Failure, ReqId};
use crate::sse::Decoder;

/// The longest server-sent event of a chat stream, bytes.
pub(crate) const MAX_EVENT: usize = 1 << 20;

/// What a provider's task reports to the call's driver.
#[derive(Debug)]
pub(crate) enum Msg {
    Transcript(ReqId, Result<String, Failure>),
    LlmDelta(ReqId, String),
    LlmDone(ReqId, Result<Answer, Failure>),
    TtsAudio(ReqId, Bytes),
    TtsDone(ReqId, Result<(), Failure>),
    Tool(callgate_kit::tools::ToolDone),
}

/// One HTTP API: where, its key, how long a request may take.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub(crate) base_url: String,
    pub(crate) key: Option<String>,
    pub(crate) timeout: Duration,
}

impl Api {
    pub(crate) fn new(base_url: &str, key_env: Option<&String>, timeout: Duration) -> Self {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let key = key_env.and_then(|v| std::env::var(v).ok());
        if key.is_some() {
            callgate_kit::plaintext::warn_if_exposed("pipeline base_url", &base_url);
        }
        Self {
            base_url,
            key,
            timeout,
        }
    }

    fn post(&self, http: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        let request = http
            .post(format!("{}{path}", self.base_url))
            .timeout(self.timeout);
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

fn failed(what: &str, e: &reqwest::Error) -> Failure {
    Failure {
        reason: if e.is_timeout() {
            format!("{what}: no answer in time")
        } else {
            format!("{what}: {e}")
        },
        retryable: e.is_timeout() || e.is_connect() || e.is_request(),
    }
}

/// A non-2xx answer: 5xx and 429 may pass, 4xx will not.
async fn status(what: &str, answer: reqwest::Response) -> Result<reqwest::Response, Failure> {
    let code = answer.status();
    if code.is_success() {
        return Ok(answer);
    }
    let body = callgate_kit::http::read_bounded(answer, 1000)
        .await
        .map(|b| String::from_utf8_lossy(&b.body).into_owned())
        .unwrap_or_default();
    Err(Failure {
        reason: format!("{what}: HTTP {}: {body}", code.as_u16()),
        retryable: code.is_server_error() || code.as_u16() == 429,
    })
}

/// Transcribes one turn with the route's provider (the kit's [`callgate_kit::stt::Stt`]).
pub(crate) async fn transcribe(
    stt: &callgate_kit::stt::Stt,
    samples: &[i16],
    rate: u32,
) -> Result<String, Failure> {
    stt.transcribe(samples, rate).await.map_err(|e| Failure {
        reason: format!("stt: {e}"),
        retryable: e.retryable(),
    })
}

/// The chat completions request body.
pub(crate) fn chat_body(
    llm: &crate::settings::LlmSettings,
    messages: &[Value],
    tools: &[Value],
) -> Value {
    let mut body = json!({
        "model": llm.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !tools.is_empty() {
        body["tools"] = json!(tools);
    }
    if let Some(t) = llm.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(n) = llm.max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

/// Streams one answer: deltas to `tx` as they come, the whole answer returned.
pub(crate) async fn complete(
    http: &reqwest::Client,
    api: &Api,
    body: &Value,
    req: ReqId,
    tx: &mpsc::Sender<Msg>,
) -> Result<Answer, Failure> {
    let answer = api
        .post(http, "/chat/completions")
        .json(body)
        .send()
        .await
        .map_err(|e| failed("llm", &e))?;
    let mut answer = status("llm", answer).await?;
    let mut decoder = Decoder::new(MAX_EVENT);
    let mut acc = Accumulator::new();
    let bad = |why: String| Failure {
        reason: format!("llm: {why}"),
        retryable: false,
    };
    while let Some(chunk) = answer.chunk().await.map_err(|e| failed("llm", &e))? {
        decoder.push(&chunk).map_err(|e| bad(e.to_string()))?;
        while let Some(event) = decoder.poll_event() {
            if acc.is_done() {
                break;
            }
            match acc.handle_data(&event.data) {
                Ok(Some(Delta::Content(text))) => {
                    if tx.send(Msg::LlmDelta(req, text)).await.is_err() {
                        return Err(bad("the call is gone".into()));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Failure {
                        reason: format!("llm: {e}"),
                        // An error the server reports mid-stream: asking again may help
                        // only if nothing was said (the core knows).
                        retryable: matches!(e, crate::chat::ChatError::Server(_)),
                    });
                }
            }
        }
    }
    if !acc.is_done() {
        return Err(Failure {
            reason: "llm: the stream ended without [DONE]".into(),
            retryable: true,
        });
    }
    acc.finish().map_err(|e| bad(e.to_string()))
}

/// Speaks one sentence through an OpenAI-compatible API, audio to `tx` as it arrives.
pub(crate) async fn speak_openai(
    http: &reqwest::Client,
    api: &Api,
    settings: &crate::settings::TtsSettings,
    text: &str,
    output: AudioFormat,
    req: ReqId,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), Failure> {
    let body = json!({"model": settings.model, "voice": settings.voice, "input": text,
                      "response_format": "pcm"});
    let answer = api
        .post(http, "/audio/speech")
        .json(&body)
        .send()
        .await
        .map_err(|e| failed("tts", &e))?;
    let mut answer = status("tts", answer).await?;
    let mut convert = Converter::new(AudioFormat::Pcm24000, output).map_err(|e| Failure {
        reason: format!("tts: {e}"),
        retryable: false,
    })?;
    let mut odd: Option<u8> = None;
    while let Some(chunk) = answer.chunk().await.map_err(|e| failed("tts", &e))? {
        let mut data = Vec::with_capacity(chunk.len() + 1);
        data.extend(odd.take());
        data.extend_from_slice(&chunk);
        if data.len() % 2 == 1 {
            odd = data.pop();
        }
        if data.is_empty() {
            continue;
        }
        let audio = convert.convert(&Bytes::from(data));
        if !audio.is_empty() && tx.send(Msg::TtsAudio(req, audio)).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Speaks one sentence with a kit provider (espeak-ng, or the server's `[tts]`): the whole
/// sentence, then its audio. The provider runs its engine as the kit does (espeak-ng as a
/// subprocess off the async workers, with its timeout); the resampling to the call's rate runs
/// on the call's `spawner` (tracked by the server, like every task of the call).
pub(crate) async fn speak_with(
    spawner: &callgate_agent::Spawner,
    provider: &Arc<dyn callgate_kit::tts::Provider>,
    voice: &str,
    text: &str,
    output: AudioFormat,
    req: ReqId,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), Failure> {
    let audio = provider
        .synthesize(text, voice)
        .await
        .map_err(|e| Failure {
            reason: format!("tts: {e}"),
            retryable: false,
        })?;
    let prompt = callgate_kit::audio::PromptAudio::new(text, &audio).map_err(|e| Failure {
        reason: format!("tts: {e}"),
        retryable: false,
    })?;
    let chunks = spawner
        .spawn_blocking(move || prompt.chunks(output))
        .await
        .map_err(|e| Failure {
            reason: format!("tts: {e}"),
            retryable: false,
        })?;
    for chunk in chunks {
        if tx.send(Msg::TtsAudio(req, chunk)).await.is_err() {
            break;
        }
    }
    Ok(())
}
