//! The three providers over HTTP, as OpenAI documents them (and OpenAI-compatible servers
//! serve them): `POST {base_url}/audio/transcriptions` (multipart, a WAV file),
//! `POST {base_url}/chat/completions` (`stream: true`, server-sent events) and
//! `POST {base_url}/audio/speech` (`response_format = "pcm"`: 24 kHz 16-bit mono, streamed);
//! and espeak-ng. Each runs on a task of the call's `Spawner`; what it produces goes back to
//! the driver as [`Msg`]s.

use std::io::Cursor;
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

/// 16-bit mono PCM as a WAV file.
fn wav(samples: &[i16], rate: u32) -> Result<Vec<u8>, String> {
    let mut out = Cursor::new(Vec::with_capacity(44 + samples.len() * 2));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(&mut out, spec).map_err(|e| e.to_string())?;
    for &s in samples {
        w.write_sample(s).map_err(|e| e.to_string())?;
    }
    w.finalize().map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// A multipart/form-data body: text fields and one file.
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

/// Transcribes one turn: `{"text": "..."}` back.
pub(crate) async fn transcribe(
    http: &reqwest::Client,
    api: &Api,
    model: &str,
    language: Option<&str>,
    samples: &[i16],
    rate: u32,
) -> Result<String, Failure> {
    let file = wav(samples, rate).map_err(|reason| Failure {
        reason,
        retryable: false,
    })?;
    let mut fields = vec![("model", model), ("response_format", "json")];
    if let Some(language) = language {
        fields.push(("language", language));
    }
    let (content_type, body) = multipart(&fields, &file);
    let answer = api
        .post(http, "/audio/transcriptions")
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body)
        .send()
        .await
        .map_err(|e| failed("stt", &e))?;
    let answer = status("stt", answer).await?;
    let read = callgate_kit::http::read_bounded(answer, callgate_kit::http::MAX_ANSWER)
        .await
        .map_err(|e| failed("stt", &e))?;
    let bad = |why: String| Failure {
        reason: format!("stt: {why}"),
        retryable: false,
    };
    if read.cut {
        return Err(bad("the answer is too long".into()));
    }
    let value: Value = serde_json::from_slice(&read.body).map_err(|e| bad(e.to_string()))?;
    value
        .get("text")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad("no \"text\" in the answer".into()))
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
}
