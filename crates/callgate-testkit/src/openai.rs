//! A local double of OpenAI's HTTP APIs as documented, for the `pipeline` agent's tests:
//! `POST /v1/audio/transcriptions` (multipart form: `file`, `model`, `language`; answers
//! `{"text": ...}`), `POST /v1/chat/completions` with `stream: true` (server-sent events of
//! `chat.completion.chunk` objects, tool calls streamed by index, a usage chunk when
//! `stream_options.include_usage`, then `data: [DONE]`), and `POST /v1/audio/speech`
//! (`response_format = "pcm"`: raw 24 kHz 16-bit mono, streamed in parts). Every request needs
//! `Authorization: Bearer KEY`. Answers are scripted per test; requests are kept for
//! assertions, and a test waits for them on a notification, never on time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Reply<T> {
    /// Answer this.
    Ok(T),
    /// Answer this HTTP status with an OpenAI error body.
    Status(u16),
}

/// A tool call the scripted model makes.
#[derive(Debug, Clone)]
pub struct ScriptedCall {
    /// Its id.
    pub id: String,
    /// The function.
    pub name: String,
    /// The arguments (JSON text).
    pub arguments: String,
}

/// A scripted chat answer: content in these pieces, then tool calls.
#[derive(Debug, Clone, Default)]
pub struct ChatScript {
    /// Content deltas, in order.
    pub content: Vec<String>,
    /// Tool calls (each streamed in two fragments).
    pub tool_calls: Vec<ScriptedCall>,
}

impl ChatScript {
    /// An answer that says `pieces`.
    pub fn says(pieces: &[&str]) -> Self {
        Self {
            content: pieces.iter().map(|p| (*p).to_owned()).collect(),
            tool_calls: Vec::new(),
        }
    }
}

/// A transcription request as the double read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SttRequest {
    /// The `model` field.
    pub model: String,
    /// The `language` field, if sent.
    pub language: Option<String>,
    /// The WAV file's sample rate and samples.
    pub rate: u32,
    /// Samples in the file.
    pub samples: usize,
}

#[derive(Debug, Default)]
struct Inner {
    transcripts: VecDeque<Reply<String>>,
    answers: VecDeque<Reply<ChatScript>>,
    speech: VecDeque<Reply<()>>,
    /// Speech answers held open after their audio, in order (see `hold_speech`).
    holds: VecDeque<bool>,
    /// What unscripted transcriptions and chat requests answer (benchmarks), and whether
    /// requests are kept.
    always: Option<(String, ChatScript)>,
    stt: Vec<SttRequest>,
    chat: Vec<Value>,
    speak: Vec<Value>,
}

#[derive(Debug)]
struct Shared {
    key: String,
    inner: Mutex<Inner>,
    changed: Notify,
    /// Ends a held speech answer.
    release: Notify,
}

/// The double: where it listens and what it was asked.
#[derive(Debug, Clone)]
pub struct OpenAiDouble {
    base_url: String,
    shared: Arc<Shared>,
}

/// Milliseconds of speech per character the speech API answers.
pub const SPEECH_MS_PER_CHAR: usize = 10;

impl OpenAiDouble {
    /// Starts the double on 127.0.0.1; requests must carry `key`.
    pub async fn start(key: &str) -> Self {
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            release: Notify::new(),
        });
        let app = Router::new()
            .route("/v1/audio/transcriptions", post(transcriptions))
            .route("/v1/chat/completions", post(completions))
            .route("/v1/audio/speech", post(speech))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let addr = listener.local_addr().expect("its address");
        callgate_server::Tasks::new().spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            shared,
        }
    }

    /// The base URL, version path included (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.shared.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Scripts the next transcription.
    pub fn transcript(&self, reply: Reply<String>) {
        self.with(|i| i.transcripts.push_back(reply));
    }

    /// Scripts the next chat answer.
    pub fn answer(&self, reply: Reply<ChatScript>) {
        self.with(|i| i.answers.push_back(reply));
    }

    /// Scripts the next speech answer (unscripted ones succeed).
    pub fn speech(&self, reply: Reply<()>) {
        self.with(|i| i.speech.push_back(reply));
    }

    /// The next speech answers: `true` sends its audio, then keeps the answer open (as a
    /// server synthesizing in real time would) until [`OpenAiDouble::release_speech`].
    pub fn hold_speech(&self, holds: &[bool]) {
        self.with(|i| i.holds.extend(holds.iter().copied()));
    }

    /// Ends the held speech answer (the first one waiting, or the next one held).
    pub fn release_speech(&self) {
        self.shared.release.notify_one();
    }

    /// From now on, every unscripted transcription answers `transcript` and every unscripted
    /// chat request `answer`, and requests are no longer kept (a benchmark's long run).
    pub fn always(&self, transcript: &str, answer: ChatScript) {
        self.with(|i| i.always = Some((transcript.to_owned(), answer)));
    }

    /// The transcription requests so far.
    pub fn stt_requests(&self) -> Vec<SttRequest> {
        self.with(|i| i.stt.clone())
    }

    /// The chat requests' bodies so far.
    pub fn chat_requests(&self) -> Vec<Value> {
        self.with(|i| i.chat.clone())
    }

    /// The speech requests' bodies so far.
    pub fn speech_requests(&self) -> Vec<Value> {
        self.with(|i| i.speak.clone())
    }

    /// Waits until `check` holds over what was asked (woken by each request).
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                if check(self) {
                    return;
                }
                changed.await;
            }
        };
        // A bound so a broken agent fails the test instead of hanging it.
        if tokio::time::timeout(std::time::Duration::from_secs(30), wait)
            .await
            .is_err()
        {
            panic!("the OpenAI double never saw {what}");
        }
    }
}

fn authorised(shared: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", shared.key))
}

fn error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(json!({"error": {"message": message, "type": "server_error",
                                    "param": null, "code": null}})),
    )
        .into_response()
}

/// The parts of a multipart/form-data body: (name, bytes).
fn parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Some(boundary) = content_type.split("boundary=").nth(1) else {
        return Vec::new();
    };
    let delimiter = format!("--{boundary}");
    let d = delimiter.as_bytes();
    let mut out = Vec::new();
    let mut starts = Vec::new();
    let mut i = 0;
    while i + d.len() <= body.len() {
        if &body[i..i + d.len()] == d {
            starts.push(i);
            i += d.len();
        } else {
            i += 1;
        }
    }
    for w in starts.windows(2) {
        let part = &body[w[0] + d.len()..w[1]];
        let Some(split) = part.windows(4).position(|x| x == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..split]);
        let Some(name) = head
            .split("name=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let mut data = part[split + 4..].to_vec();
        if data.ends_with(b"\r\n") {
            data.truncate(data.len() - 2);
        }
        out.push((name.to_owned(), data));
    }
    out
}

async fn transcriptions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorised(&shared, &headers) {
        return error(401, "Incorrect API key provided");
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = parts(content_type, &body);
    let field = |name: &str| {
        parts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let Some((_, file)) = parts.iter().find(|(n, _)| n == "file") else {
        return error(400, "file is required");
    };
    let Ok(wav) = hound_read(file) else {
        return error(400, "the file is not a WAV file");
    };
    let reply = {
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.always.is_none() {
            inner.stt.push(SttRequest {
                model: field("model").unwrap_or_default(),
                language: field("language"),
                rate: wav.0,
                samples: wav.1,
            });
        }
        inner
            .transcripts
            .pop_front()
            .or_else(|| inner.always.as_ref().map(|(t, _)| Reply::Ok(t.clone())))
    };
    shared.changed.notify_waiters();
    match reply {
        Some(Reply::Ok(text)) => axum::Json(json!({ "text": text })).into_response(),
        Some(Reply::Status(code)) => error(code, "scripted failure"),
        None => axum::Json(json!({ "text": "" })).into_response(),
    }
}

/// A WAV file's rate and sample count.
fn hound_read(file: &[u8]) -> Result<(u32, usize), String> {
    let reader = hound::WavReader::new(std::io::Cursor::new(file)).map_err(|e| e.to_string())?;
    let wav = callgate_audio::wav::read_mono_from(reader).map_err(|e| e.to_string())?;
    Ok((wav.rate, wav.samples.len()))
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !authorised(&shared, &headers) {
        return error(401, "Incorrect API key provided");
    }
    let usage = body["stream_options"]["include_usage"] == json!(true);
    let reply = {
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.always.is_none() {
            inner.chat.push(body);
        }
        inner
            .answers
            .pop_front()
            .or_else(|| inner.always.as_ref().map(|(_, a)| Reply::Ok(a.clone())))
    };
    shared.changed.notify_waiters();
    let script = match reply {
        Some(Reply::Ok(script)) => script,
        Some(Reply::Status(code)) => return error(code, "scripted failure"),
        None => ChatScript::says(&["Okay."]),
    };
    let chunk = |delta: Value, finish: Option<&str>| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-double", "object": "chat.completion.chunk",
                   "created": 1, "model": "double",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    for piece in &script.content {
        events.push(chunk(json!({ "content": piece }), None));
    }
    for (i, call) in script.tool_calls.iter().enumerate() {
        events.push(chunk(
            json!({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                   "function": {"name": call.name, "arguments": ""}}]}),
            None,
        ));
        events.push(chunk(
            json!({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}),
            None,
        ));
    }
    let finish = if script.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    events.push(chunk(json!({}), Some(finish)));
    if usage {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-double", "object": "chat.completion.chunk", "created": 1,
                   "model": "double", "choices": [],
                   "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}})
        ));
    }
    events.push("data: [DONE]\n\n".to_owned());
    let stream = futures_util::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, std::io::Error>(Bytes::from(e))),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(500, "response"))
}

async fn speech(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !authorised(&shared, &headers) {
        return error(401, "Incorrect API key provided");
    }
    let chars = body["input"].as_str().map_or(0, |t| t.chars().count());
    let pcm = body["response_format"] == json!("pcm");
    let reply = {
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.always.is_none() {
            inner.speak.push(body);
        }
        (
            inner.speech.pop_front(),
            inner.holds.pop_front().unwrap_or(false),
        )
    };
    let (reply, hold) = reply;
    shared.changed.notify_waiters();
    if let Some(Reply::Status(code)) = reply {
        return error(code, "scripted failure");
    }
    if !pcm {
        return error(400, "the double answers response_format pcm only");
    }
    let audio = crate::audio::speechlike_pcm16(
        u32::try_from(chars * SPEECH_MS_PER_CHAR).unwrap_or(u32::MAX),
        24000,
        7,
    );
    // Streamed in parts of an odd length: the reader must not assume whole samples.
    let parts: Vec<Result<Bytes, std::io::Error>> = audio
        .chunks(4801)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let held = futures_util::stream::once(async move {
        if hold {
            shared.release.notified().await;
        }
        Ok::<_, std::io::Error>(Bytes::new())
    });
    use futures_util::StreamExt;
    Response::builder()
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(
            futures_util::stream::iter(parts).chain(held),
        ))
        .unwrap_or_else(|_| error(500, "response"))
}
