//! A local double of the OpenAI Realtime API (GA protocol, WebSocket), for the `realtime` agent's
//! tests and latency benchmark.
//!
//! The hosted API cannot be reached from tests, so [`Double`] listens on `127.0.0.1` and answers
//! Realtime WebSocket connections the way the service is documented to: the handshake rules (key, no `OpenAI-Beta`
//! header), `session.created` first, `session.update` validated field by field (GA shape only),
//! the conversation kept server-side (items, truncation, deletion, function-call outputs), one
//! response at a time, cancellation, and every documented error with its code, message and the
//! client's `event_id`. A test against it fails when the agent gets the protocol wrong.
//!
//! What the *model* says is scripted by the test through [`Session`]: a whole spoken answer
//! ([`Session::speak`]), one streamed in parts ([`Session::begin_speaking`],
//! [`Session::speak_more`], [`Session::finish_response`]), a function call
//! ([`Session::call_function`]), and the server VAD's turn events ([`Session::speech_started`],
//! [`Session::speech_stopped`], [`Session::caller_transcript`]). With [`DoubleConfig::auto`] the
//! double scripts itself instead (answers at once, a VAD that fires every N ms of caller audio):
//! that is the benchmark mode of `examples/realtime-double.rs`.
//!
//! # Layout
//! - Public API first: [`Double`], [`DoubleConfig`], [`Session`] and the plain data types.
//! - `connection`: the handshake (auth, beta header) and the per-connection driver, the only
//!   code doing socket I/O. One task per connection.
//! - `Core`: the sans-IO protocol state of one session. Client events go in through
//!   `Core::handle_text`; scripted events through the `Core` methods [`Session`] calls. Both
//!   append serialised server events to one outbound queue, so the order on the wire is the
//!   order in which the state changed.
//! - Validation (`check_*`), the session merge, ids, usage, then `mod tests`.
//!
//! # Example
//! ```no_run
//! # async fn demo() {
//! use callgate_testkit::realtime::{Double, DoubleConfig};
//! let mut double = Double::start(DoubleConfig::default()).await;
//! // … point the agent at format!("{}?model=gpt-realtime", double.url()) with key "test-key" …
//! let mut s = double.session().await;
//! s.expect("session.update").await;               // answered with session.updated already
//! s.expect("conversation.item.create").await;     // the greeting prompt
//! let hello = s.answer_create(&s.output_format().tone(800, 1), "Hello!").await;
//! let user = s.speech_started(1200).await;        // barge-in
//! let truncate = s.expect("conversation.item.truncate").await;
//! assert_eq!(truncate["item_id"], hello.item_id.as_str());
//! s.speech_stopped(2000).await;                   // commit; create_response starts a response
//! s.caller_transcript(&user, "What are your hours?").await;
//! s.speak(&s.output_format().tone(1500, 2), "We open at nine.").await;
//! assert!(s.errors().is_empty(), "the agent broke the protocol: {:?}", s.errors());
//! # }
//! ```
//!
//! # Choices where the notes are silent
//! - The key is checked before the `OpenAI-Beta` header. A missing key is refused like a wrong
//!   one (per [`BadKey`]); its 401 body has code null, as the REST API's does.
//! - `session.update`: a missing `session.type` is reported before unknown parameters (a
//!   beta-shaped update has both); `type:"transcription"` is refused; `model` is ignored (the URL
//!   decides); a connection without `?model=` gets `gpt-realtime`.
//! - Texts not in the notes: an unknown item is `invalid_value` "Item with item_id not found:
//!   {id}" (the captured text, code unsure); a `function_call_output` for an unknown call is code
//!   null "No tool call found for function call output with call_id {id}." (the Responses API's
//!   wording); bad base64, invalid JSON, binary frames, `output_audio_buffer.clear` (WebRTC/SIP
//!   only) and a duplicate item id get errors worded here. Range and type errors use the API's
//!   usual codes (`invalid_type`, `decimal_above_max_value`…).
//! - Truncation: `audio_end_ms` 0 gets "Only model output audio messages can be truncated" as the
//!   notes say; `audio_end_ms` equal to the length is accepted; the length is the bytes sent for
//!   the item ÷ bytes per ms of its response's output format, rounded down; after a truncation
//!   the item's length is `audio_end_ms` and its transcript leaves the item's JSON. A still
//!   streaming item may be truncated (later audio extends it).
//! - A VAD turn with `create_response` on starts a response at `speech_stopped` (as the service
//!   does), so an agent that also sends `response.create` gets
//!   `conversation_already_has_active_response`; no response is started while one still runs.
//! - A cancelled response's open item ends with its `.done` events and status `incomplete`.
//! - [`Session::speech_started`] needs turn detection and [`Session::caller_transcript`] needs
//!   transcription in the session: the service sends neither otherwise, so the test panics.
//! - Usage is estimated: text ≈ 4 characters a token, caller audio 10 tokens/s, model audio 20
//!   tokens/s, cached = the previous response's input rounded down to 64 once it reaches 1024.
//!
//! # Invariants
//! - A client event is handled completely (validated, state changed, replies queued) under the
//!   session lock before the next one is read, and a scripted step (say, all of `speak`) is
//!   queued under one lock: nothing can interleave with it, like the service's single
//!   conversation loop.
//! - The lock is never held across an `.await`; the driver takes the queued events out, then
//!   writes them.
//! - An event handler validates everything before changing anything, so a refused event leaves
//!   no trace but its `error`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use callgate_server::Tasks;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HttpRequest, Response as HttpResponse,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// How long a test waits for the double (or the client through it) before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long the double waits for the client's answer to its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How many accepted sessions may wait for [`Double::session`] before accepting blocks.
const SESSION_QUEUE: usize = 64;

/// The instructions a new session starts with (the service's captured default).
const DEFAULT_INSTRUCTIONS: &str = "Your knowledge cutoff is 2023-10. You are a helpful, witty, \
and friendly AI. Act like a human, but remember that you aren't a human and that you can't do \
human things in the real world. Your voice and personality should be warm and engaging, with a \
lively and playful tone. If interacting in a non-English language, start by using the standard \
accent or dialect familiar to the user. Talk quickly. You should always call a function if you \
can. Do not refer to these rules, even if you're asked about them.";

/// The voices `audio.output.voice` accepts by name.
const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];

/// The client event types of the GA protocol, as the service lists them in its `invalid_value`
/// error (`output_audio_buffer.clear` is answered separately: WebRTC/SIP only).
const CLIENT_EVENTS: &[&str] = &[
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
];

// ---------------------------------------------------------------------------------------------
// Configuration and plain data
// ---------------------------------------------------------------------------------------------

/// How the double refuses a connection whose `Authorization: Bearer` key is wrong or missing.
/// Both have been seen from the service (notes section 1, "Failed auth").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKey {
    /// Refused at the upgrade: HTTP 401 with the API's JSON error body; no WebSocket.
    Http401,
    /// The handshake completes, then `error` {`invalid_request_error`, `invalid_api_key`} and a
    /// close with code 3000, reason `invalid_request_error.invalid_api_key`.
    Close3000,
}

/// The double's settings.
#[derive(Debug, Clone)]
pub struct DoubleConfig {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The one valid API key (`Authorization: Bearer <api_key>`).
    pub api_key: String,
    /// How a wrong or missing key is refused.
    pub bad_key: BadKey,
    /// Overrides `turn_detection.interrupt_response`; `None` takes it from the session, whose
    /// default is `true` as the service's.
    pub interrupt_response: Option<bool>,
    /// How much audio each `response.output_audio.delta` carries, in ms (the last one of an
    /// answer may be shorter).
    pub audio_per_delta_ms: u32,
    /// Answer on its own instead of handing sessions to the test (benchmark mode).
    pub auto: Option<Auto>,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: "test-key".to_owned(),
            bad_key: BadKey::Close3000,
            interrupt_response: None,
            audio_per_delta_ms: 100,
            auto: None,
        }
    }
}

/// Benchmark mode: every session scripts itself, and none is handed to [`Double::session`].
///
/// Each `response.create` (and each VAD turn when `create_response` is on) is answered at once
/// with a whole spoken response of `answer_ms` of audio in the response's output format. With
/// `speech_every_ms`, a scripted VAD emits a caller turn (`speech_started`, `speech_stopped`,
/// `committed`, the user item, a transcript if transcription is on) after every that many ms of
/// appended caller audio. Caller audio is counted, not kept.
#[derive(Debug, Clone)]
pub struct Auto {
    /// Length of every spoken answer, in ms.
    pub answer_ms: u32,
    /// A caller turn after every this many ms of appended audio; `None`: no scripted VAD.
    pub speech_every_ms: Option<u32>,
    /// The transcript of every answer.
    pub transcript: String,
}

impl Default for Auto {
    fn default() -> Self {
        Self {
            answer_ms: 1000,
            speech_every_ms: Some(3000),
            transcript: "Sure, I can help you with that.".to_owned(),
        }
    }
}

/// An audio format of the GA protocol (`audio.input.format` / `audio.output.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `{"type":"audio/pcm","rate":24000}`: 16-bit little-endian mono PCM at 24 kHz.
    Pcm24k,
    /// `{"type":"audio/pcmu"}`: G.711 µ-law at 8 kHz.
    Pcmu,
    /// `{"type":"audio/pcma"}`: G.711 A-law at 8 kHz.
    Pcma,
}

impl Format {
    /// Bytes per millisecond: 48 for 24 kHz PCM16, 8 for G.711.
    pub fn bytes_per_ms(self) -> usize {
        match self {
            Self::Pcm24k => 48,
            Self::Pcmu | Self::Pcma => 8,
        }
    }

    /// Whole milliseconds in `bytes` of this format (rounded down, as lengths are compared).
    pub fn ms(self, bytes: usize) -> u64 {
        (bytes / self.bytes_per_ms()) as u64
    }

    /// The format as the protocol writes it.
    pub fn json(self) -> Value {
        match self {
            Self::Pcm24k => json!({"type": "audio/pcm", "rate": 24000}),
            Self::Pcmu => json!({"type": "audio/pcmu"}),
            Self::Pcma => json!({"type": "audio/pcma"}),
        }
    }

    /// Parses a format object of the GA protocol (`rate` may be left out for PCM).
    pub fn from_json(value: &Value) -> Option<Self> {
        match value.get("type")?.as_str()? {
            "audio/pcm" => match value.get("rate") {
                None => Some(Self::Pcm24k),
                Some(rate) if rate.as_u64() == Some(24_000) => Some(Self::Pcm24k),
                Some(_) => None,
            },
            "audio/pcmu" => Some(Self::Pcmu),
            "audio/pcma" => Some(Self::Pcma),
            _ => None,
        }
    }

    /// `ms` of speech-like audio in this format (a chirp with dither; `seed` varies it).
    pub fn tone(self, ms: u32, seed: u32) -> Vec<u8> {
        let rate = match self {
            Self::Pcm24k => 24_000,
            Self::Pcmu | Self::Pcma => 8_000,
        };
        let pcm = crate::audio::speechlike_pcm16(ms, rate, seed);
        let samples = pcm
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]));
        match self {
            Self::Pcm24k => pcm,
            Self::Pcmu => samples.map(callgate_audio::g711::ulaw_encode).collect(),
            Self::Pcma => samples.map(callgate_audio::g711::alaw_encode).collect(),
        }
    }

    /// `ms` of silence in this format.
    pub fn silence(self, ms: u32) -> Vec<u8> {
        let n = self.bytes_per_ms() * ms as usize;
        match self {
            Self::Pcm24k => vec![0; n],
            Self::Pcmu => vec![callgate_audio::g711::ulaw_encode(0); n],
            Self::Pcma => vec![callgate_audio::g711::alaw_encode(0); n],
        }
    }
}

/// The HTTP upgrade request of a connection, as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request path, e.g. `/v1/realtime`.
    pub path: String,
    /// The query parameters, percent-decoded, in order.
    pub query_pairs: Vec<(String, String)>,
    /// Every header, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first query parameter with this name (e.g. `model`).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query_pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first header with this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `model` query parameter.
    pub fn model(&self) -> Option<&str> {
        self.query("model")
    }

    /// The `OpenAI-Beta` header, which the GA service refuses.
    pub fn beta_header(&self) -> Option<&str> {
        self.header("openai-beta")
    }

    fn from_http(request: &HttpRequest) -> Self {
        let uri = request.uri();
        let query_pairs = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        let headers = request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        Self {
            path: uri.path().to_owned(),
            query_pairs,
            headers,
        }
    }
}

/// How a session's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The client sent a close frame (1005 when it carried no code).
    Client {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The double closed ([`Session::close`]) and the client answered the close frame.
    Double {
        /// The close code the double sent.
        code: u16,
        /// The reason the double sent.
        reason: String,
    },
    /// The connection ended without a close handshake (reset, EOF, error, no answer).
    Abrupt,
}

/// The role of a message item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The caller (`"user"`).
    User,
    /// The model (`"assistant"`).
    Assistant,
    /// A system message (`"system"`).
    System,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::System => "system",
        }
    }
}

/// What an item is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    /// A message (`type:"message"`).
    Message {
        /// Who said it.
        role: Role,
    },
    /// A function call the model made, or the client re-seeded (`type:"function_call"`).
    FunctionCall {
        /// The call id (`call_…`).
        call_id: String,
        /// The function's name.
        name: String,
        /// The arguments, a JSON string.
        arguments: String,
    },
    /// A function's result, from the client (`type:"function_call_output"`).
    FunctionCallOutput {
        /// The call it answers.
        call_id: String,
        /// The output string.
        output: String,
    },
}

/// One item of the server-side conversation, as the double sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The item id (`item_…`, or the client's own).
    pub id: String,
    /// What it is.
    pub kind: ItemKind,
    /// `completed`, `incomplete` (cut by a cancel) or `in_progress`.
    pub status: String,
    /// Its text: a text message's text, the transcript of model audio (kept here even after a
    /// truncation removed it from the service's context), or the caller transcript.
    pub text: String,
    /// Audio the item carried, in ms: sent by the double (model items, in the response's
    /// output format) or committed from the caller's buffer (user items, input format).
    pub audio_ms: u64,
    /// The `audio_end_ms` of the last accepted `conversation.item.truncate`.
    pub truncated_ms: Option<u64>,
    /// Deleted by `conversation.item.delete`.
    pub deleted: bool,
    /// Created by the client (`conversation.item.create`), not by the double.
    pub from_client: bool,
}

/// A spoken answer the double sent (or began).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spoken {
    /// The response (`resp_…`).
    pub response_id: String,
    /// The assistant message item carrying the audio (`item_…`).
    pub item_id: String,
}

/// A function-call response the double sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Called {
    /// The response (`resp_…`).
    pub response_id: String,
    /// The spoken item before the call, when there was one.
    pub audio_item_id: Option<String>,
    /// The `function_call` item.
    pub item_id: String,
    /// The call id the client must answer with a `function_call_output`.
    pub call_id: String,
}

// ---------------------------------------------------------------------------------------------
// Double
// ---------------------------------------------------------------------------------------------

/// A Realtime API double listening on a local port. Dropping it stops accepting; sessions
/// already accepted live on until their [`Session`] is dropped.
pub struct Double {
    addr: SocketAddr,
    sessions: mpsc::Receiver<Session>,
    connections: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Double {
    /// Binds and starts accepting. Panics when the address cannot be bound.
    pub async fn start(config: DoubleConfig) -> Self {
        let listener = TcpListener::bind(config.listen)
            .await
            .unwrap_or_else(|e| panic!("realtime double: bind {}: {e}", config.listen));
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (tx, sessions) = mpsc::channel(SESSION_QUEUE);
        let connections = Arc::new(AtomicUsize::new(0));
        let tasks = Tasks::new();
        let accept = tasks.spawn(connection::accept_loop(
            listener,
            Arc::new(config),
            tx,
            connections.clone(),
            tasks.clone(),
        ));
        Self {
            addr,
            sessions,
            connections,
            accept,
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT/v1/realtime`, the URL an agent connects to (add `?model=…`).
    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    /// The next accepted, authenticated session (refused connections are not handed out).
    /// Panics after [`WAIT`], or in [`DoubleConfig::auto`] mode (no sessions are handed out).
    pub async fn session(&mut self) -> Session {
        match tokio::time::timeout(WAIT, self.sessions.recv()).await {
            Ok(Some(session)) => session,
            Ok(None) => panic!("realtime double: the accept loop has stopped"),
            Err(_) => panic!(
                "realtime double: no authenticated Realtime connection within {WAIT:?} \
                 ({} handshakes seen, refused ones included)",
                self.connections()
            ),
        }
    }

    /// WebSocket handshakes seen so far, refused ones included.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------

/// One accepted Realtime session, driven by the test.
///
/// Client events are answered by the double as they arrive (validation, `session.updated`,
/// `conversation.item.*`, `error`s, `response.created` for a `response.create`…); the test reads
/// them with [`Session::next`] / [`Session::expect`] after they were handled, and scripts what
/// the model says. Dropping a `Session` ends its connection without a close frame.
pub struct Session {
    request: Request,
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
    abort: Option<oneshot::Sender<()>>,
}

impl Session {
    /// The upgrade request: path, query (`model`), headers (`Authorization`, `OpenAI-Beta`).
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The next client event other than `input_audio_buffer.append` (appends are accumulated,
    /// see [`Session::appended`]); it has already been answered. Panics after [`WAIT`] or when
    /// the connection closed first.
    pub async fn next(&mut self) -> Value {
        self.wait("the next client event", |core| core.inbox.pop_front())
            .await
    }

    /// The next non-append client event, asserting its `type`.
    pub async fn expect(&mut self, type_: &str) -> Value {
        let what = format!("a client event of type {type_:?}");
        let event = self.wait(&what, |core| core.inbox.pop_front()).await;
        assert_eq!(
            event.get("type").and_then(Value::as_str),
            Some(type_),
            "realtime double: expected a client {type_:?}, got {event}"
        );
        event
    }

    /// The next non-append client event if one arrives within `within` (to check that the client
    /// stays quiet); `None` also when the connection closed.
    pub async fn next_within(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let mut core = self.shared.lock();
                if let Some(event) = core.inbox.pop_front() {
                    return Some(event);
                }
                if core.closed.is_some() {
                    return None;
                }
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// All caller audio received so far, base64-decoded: bytes in the session's input format.
    pub fn appended(&self) -> Vec<u8> {
        self.shared.lock().appended.clone()
    }

    /// How many bytes of caller audio arrived so far.
    pub fn appended_len(&self) -> usize {
        self.shared.lock().appended.len()
    }

    /// Waits until at least `bytes` of caller audio arrived.
    pub async fn wait_appended(&mut self, bytes: usize) {
        let what = format!("{bytes} bytes of appended caller audio");
        self.wait(&what, |core| (core.appended.len() >= bytes).then_some(()))
            .await
    }

    /// The input format of the effective session (`audio.input.format`).
    pub fn input_format(&self) -> Format {
        self.shared.lock().input_format()
    }

    /// The output format of the effective session (`audio.output.format`).
    pub fn output_format(&self) -> Format {
        self.shared.lock().output_format()
    }

    /// The effective session configuration, as the last `session.updated` (or
    /// `session.created`) showed it.
    pub fn config(&self) -> Value {
        self.shared.lock().session.clone()
    }

    /// Every `error` event the double sent on this session, in order (the whole event).
    pub fn errors(&self) -> Vec<Value> {
        self.shared.lock().errors.clone()
    }

    /// The `response` object of every `response.done` sent so far, in order.
    pub fn responses(&self) -> Vec<Value> {
        self.shared.lock().done.clone()
    }

    /// The id of the response in progress, if one is.
    pub fn active_response(&self) -> Option<String> {
        self.shared.lock().response.as_ref().map(|r| r.id.clone())
    }

    /// The conversation, in order, deleted items included (marked).
    pub fn items(&self) -> Vec<Item> {
        let core = self.shared.lock();
        core.items
            .iter()
            .filter(|e| !e.outside)
            .map(|e| e.item.clone())
            .collect()
    }

    /// One item of the conversation.
    pub fn item(&self, id: &str) -> Option<Item> {
        self.items().into_iter().find(|i| i.id == id)
    }

    /// A whole spoken response in one burst, in the documented order: `response.output_item.added`,
    /// `conversation.item.added`, `response.content_part.added`, interleaved
    /// `response.output_audio.delta` / `response.output_audio_transcript.delta` (audio split per
    /// [`DoubleConfig::audio_per_delta_ms`]), `response.output_audio.done`,
    /// `response.output_audio_transcript.done`, `response.content_part.done`,
    /// `response.output_item.done`, `conversation.item.done`, `response.done` (completed, with
    /// usage). `response.created` and `rate_limits.updated` were sent when the response began.
    ///
    /// `audio` is in the response's output format (see [`Format::tone`]). A response must be in
    /// progress (the client's `response.create`, a VAD turn with `create_response`, or
    /// [`Session::begin_response`]); otherwise this panics, as the service would not speak. In a
    /// text-only response (`output_modalities:["text"]`) the transcript goes out as
    /// `response.output_text.*` and the audio is dropped, as the service would.
    pub async fn speak(&mut self, audio: &[u8], transcript: &str) -> Spoken {
        self.script("speak", |core| core.speak(audio, transcript))
            .await
    }

    /// Waits for the client's `response.create`, then [`Session::speak`]s into its response.
    pub async fn answer_create(&mut self, audio: &[u8], transcript: &str) -> Spoken {
        self.expect("response.create").await;
        self.speak(audio, transcript).await
    }

    /// From now on answers every response at once with this whole spoken answer (`None` stops):
    /// each `response.create` and each VAD turn with `create_response`. A response already in
    /// progress without output is answered now.
    pub async fn auto_answer(&mut self, answer: Option<(Vec<u8>, String)>) {
        self.script("auto_answer", |core| {
            core.auto_answer = answer.map(|(clip, transcript)| (clip.into(), transcript));
            core.answer_if_auto();
            Ok(())
        })
        .await
    }

    /// Starts a response as the service does on its own (say, an idle timeout):
    /// `response.created` + `rate_limits.updated`. Panics if one is in progress.
    pub async fn begin_response(&mut self) -> String {
        self.script("begin_response", |core| {
            if let Some(active) = &core.response {
                return Err(format!("response {} is still in progress", active.id));
            }
            Ok(core.begin_response(None))
        })
        .await
    }

    /// Starts a spoken item in the response in progress and leaves it open:
    /// `response.output_item.added`, `conversation.item.added`, `response.content_part.added`.
    /// Continue with [`Session::speak_more`], end with [`Session::finish_response`] or
    /// [`Session::call_function`]; a barge-in may cancel it meanwhile.
    pub async fn begin_speaking(&mut self) -> Spoken {
        self.script("begin_speaking", |core| {
            core.require_response("begin_speaking")?;
            if core.response.as_ref().is_some_and(|r| r.open.is_some()) {
                return Err("an item is already being spoken".to_owned());
            }
            let spoken = core.open_message();
            core.streaming = Some(spoken.response_id.clone());
            Ok(spoken)
        })
        .await
    }

    /// More of the open spoken item: audio deltas interleaved with this transcript piece.
    /// Returns `false` (and sends nothing) when that response has ended meanwhile (cancelled by
    /// the client or by a turn). Panics when nothing was begun.
    pub async fn speak_more(&mut self, audio: &[u8], transcript: &str) -> bool {
        self.script("speak_more", |core| core.speak_more(audio, transcript))
            .await
    }

    /// Ends the response in progress as `completed` (closing an open item first) and returns
    /// the `response` object of its `response.done`; `None` when no response is in progress (it
    /// was cancelled meanwhile).
    pub async fn finish_response(&mut self) -> Option<Value> {
        self.script("finish_response", |core| {
            if core.response.is_none() {
                return Ok(None);
            }
            Ok(Some(core.finish_response("completed", None)))
        })
        .await
    }

    /// A response that calls a function: an optional spoken part first (or the item still open
    /// from [`Session::begin_speaking`], ended here), then `response.output_item.added`
    /// {`function_call`}, `conversation.item.added`, `response.function_call_arguments.delta`s,
    /// `.done` {`call_id`, `name`, `arguments`}, `response.output_item.done`,
    /// `conversation.item.done`, and `response.done` whose `output` holds the call. An empty
    /// `call_id` gets a generated `call_…` id. A response must be in progress (see
    /// [`Session::speak`]).
    pub async fn call_function(
        &mut self,
        name: &str,
        call_id: &str,
        arguments: &str,
        with_audio: Option<(&[u8], &str)>,
    ) -> Called {
        self.script("call_function", |core| {
            core.call_function(name, call_id, arguments, with_audio)
        })
        .await
    }

    /// The server VAD hears the caller start: `input_audio_buffer.speech_started {item_id,
    /// audio_start_ms}`, and, if a response is in progress and `interrupt_response` is on, its
    /// cancellation as the service does it (the open item's `.done` events with status
    /// `incomplete`, then `response.done` {status `cancelled`, reason `turn_detected`}). Returns
    /// the id the caller's item will have. Panics when the session has no turn detection.
    pub async fn speech_started(&mut self, audio_start_ms: u64) -> String {
        self.script("speech_started", |core| core.speech_started(audio_start_ms))
            .await
    }

    /// The server VAD hears the caller stop: `input_audio_buffer.speech_stopped`,
    /// `input_audio_buffer.committed`, `conversation.item.added`/`.done` for the caller's item
    /// (the buffer's audio), then, with `create_response` on and no response in progress, a new
    /// response (`response.created`, `rate_limits.updated`) for the test to fill.
    pub async fn speech_stopped(&mut self, audio_end_ms: u64) {
        self.script("speech_stopped", |core| core.speech_stopped(audio_end_ms))
            .await
    }

    /// `conversation.item.input_audio_transcription.completed` for a caller item. Panics when
    /// the session has no `audio.input.transcription` (the service would send none).
    pub async fn caller_transcript(&mut self, item_id: &str, text: &str) {
        self.script("caller_transcript", |core| {
            core.caller_transcript(item_id, text)
        })
        .await
    }

    /// Sends any event as is (beta names, errors, unknown events…); an `event_id` is added when
    /// it has none. The double's state does not change.
    pub async fn send(&mut self, event: Value) {
        self.script("send", |core| {
            core.emit(event);
            Ok(())
        })
        .await
    }

    /// Closes with this code and reason, and waits for the client's answer.
    pub async fn close(mut self, code: u16, reason: &str) -> Closed {
        {
            let mut core = self.shared.lock();
            core.out.push_back(Out::Close(code, reason.to_owned()));
            core.queued += 1;
        }
        self.shared.wake.notify_one();
        self.closed().await
    }

    /// Ends the connection with a TCP reset: no close frame.
    pub fn drop_abruptly(mut self) {
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
    }

    /// Waits until the connection ended, and how.
    pub async fn closed(&mut self) -> Closed {
        self.wait("the connection to close", |core| core.closed.clone())
            .await
    }

    /// Runs `step` under the session lock (a scripted step is atomic with respect to client
    /// events), then waits until what it queued is written.
    async fn script<T>(
        &mut self,
        what: &str,
        step: impl FnOnce(&mut Core) -> Result<T, String>,
    ) -> T {
        let (result, seq) = {
            let mut core = self.shared.lock();
            let result = step(&mut core);
            (result, core.queued)
        };
        self.shared.wake.notify_one();
        let value = result.unwrap_or_else(|e| panic!("realtime double: {what}: {e}"));
        let flushed = format!("{what}: the events written to the socket");
        self.wait(&flushed, |core| {
            (core.written >= seq || core.closed.is_some()).then_some(())
        })
        .await;
        value
    }

    /// Waits until `check` returns something, re-checking after every change; panics after
    /// [`WAIT`], or when the connection closed and `check` still has nothing.
    async fn wait<T>(&mut self, what: &str, mut check: impl FnMut(&mut Core) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let closed = {
                let mut core = self.shared.lock();
                if let Some(value) = check(&mut core) {
                    return value;
                }
                core.closed.clone()
            };
            if let Some(closed) = closed {
                panic!("realtime double: waiting for {what}, but the connection ended: {closed:?}");
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("realtime double: waiting for {what}: the double is gone"),
                Err(_) => panic!("realtime double: waited {WAIT:?} for {what}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state between the driver and the test
// ---------------------------------------------------------------------------------------------

/// What the connection's driver and its [`Session`] share.
struct Shared {
    core: Mutex<Core>,
    /// Bumped after every change the test may wait for (a client event handled, a write, the
    /// end of the connection).
    changed: watch::Sender<u64>,
    /// Wakes the driver when a scripted step queued events.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panicking test thread may poison the lock; the state is still consistent because
        // every step validates before it mutates.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// One queued server frame.
enum Out {
    /// A serialised server event.
    Event(String),
    /// A close frame.
    Close(u16, String),
}

// ---------------------------------------------------------------------------------------------
// Connection: handshake and driver (the only socket I/O)
// ---------------------------------------------------------------------------------------------

mod connection {
    use super::*;

    /// Accepts connections until the [`Double`] is dropped; one task per connection.
    pub(super) async fn accept_loop(
        listener: TcpListener,
        config: Arc<DoubleConfig>,
        sessions: mpsc::Sender<Session>,
        connections: Arc<AtomicUsize>,
        tasks: Tasks,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(connection(
                        stream,
                        config.clone(),
                        sessions.clone(),
                        connections.clone(),
                    ));
                }
                // Out of descriptors and the like: do not spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Why an authenticated-looking handshake is refused after the upgrade.
    enum Refusal {
        Key(Value),
        Beta,
    }

    async fn connection(
        stream: TcpStream,
        config: Arc<DoubleConfig>,
        sessions: mpsc::Sender<Session>,
        connections: Arc<AtomicUsize>,
    ) {
        let mut seen = None;
        let mut refusal = None;
        #[allow(
            clippy::result_large_err,
            reason = "the signature of tungstenite's handshake Callback"
        )]
        let callback = |request: &HttpRequest, response: HttpResponse| {
            let request = Request::from_http(request);
            connections.fetch_add(1, Ordering::SeqCst);
            let auth = check_key(&request, &config.api_key);
            seen = Some(request);
            match (auth, config.bad_key) {
                (Ok(()), _) => Ok(response),
                (Err(body), BadKey::Http401) => Err(http_401(&body)),
                (Err(body), BadKey::Close3000) => {
                    refusal = Some(Refusal::Key(body));
                    Ok(response)
                }
            }
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        let Some(request) = seen else { return };
        // The key is checked first, as authentication precedes reading the request's shape.
        if refusal.is_none() && request.beta_header().is_some() {
            refusal = Some(Refusal::Beta);
        }
        match refusal {
            Some(Refusal::Key(body)) => {
                let error = body["error"].clone();
                refuse(
                    &mut ws,
                    error,
                    3000,
                    "invalid_request_error.invalid_api_key",
                )
                .await;
                return;
            }
            Some(Refusal::Beta) => {
                let error = json!({
                    "type": "invalid_request_error",
                    "code": "beta_api_shape_disabled",
                    "message": "The Realtime Beta API is no longer supported. Please use \
                                /v1/realtime for the GA API.",
                    "param": null,
                    "event_id": null,
                });
                refuse(
                    &mut ws,
                    error,
                    4000,
                    "invalid_request_error.beta_api_shape_disabled",
                )
                .await;
                return;
            }
            None => {}
        }

        let core = Core::new(&config, &request);
        let (changed, changed_rx) = watch::channel(0);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            changed,
            wake: Notify::new(),
        });
        if config.auto.is_some() {
            drive(ws, shared, None).await;
            return;
        }
        let (abort_tx, abort_rx) = oneshot::channel();
        let session = Session {
            request,
            shared: shared.clone(),
            changed: changed_rx,
            abort: Some(abort_tx),
        };
        if sessions.send(session).await.is_err() {
            return;
        }
        drive(ws, shared, Some(abort_rx)).await;
    }

    /// `Ok` for `Authorization: Bearer <key>`; otherwise the API's JSON error body.
    fn check_key(request: &Request, key: &str) -> Result<(), Value> {
        let given = request.header("authorization").and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        match given {
            Some(token) if token == key => Ok(()),
            Some(token) => Err(json!({"error": {
                "message": format!(
                    "Incorrect API key provided: {}. You can find your API key at \
                     https://platform.openai.com/account/api-keys.",
                    mask_key(token)
                ),
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }})),
            None => Err(json!({"error": {
                "message": "You didn't provide an API key. You need to provide your API key in \
                            an Authorization header using Bearer auth (i.e. Authorization: \
                            Bearer YOUR_KEY). You can obtain an API key from \
                            https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }})),
        }
    }

    fn http_401(body: &Value) -> ErrorResponse {
        // The REST API answers a missing key with code null; only a wrong key has a code.
        let mut body = body.clone();
        if body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("You didn't"))
        {
            body["error"]["code"] = Value::Null;
        }
        let mut response = ErrorResponse::new(Some(body.to_string()));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        response
    }

    /// `error`, then a close frame; waits briefly for the client's answer.
    async fn refuse(ws: &mut WebSocketStream<TcpStream>, error: Value, code: u16, reason: &str) {
        let mut ids = Ids::new();
        let mut error = error;
        if error.get("event_id").is_none() {
            error["event_id"] = Value::Null;
        }
        let event = json!({"type": "error", "event_id": ids.event(), "error": error});
        let _ = ws.send(Message::Text(event.to_string().into())).await;
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.to_owned().into(),
        };
        let _ = ws.send(Message::Close(Some(frame))).await;
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }

    /// The driver: writes what the session queued, hands client events to the core, and
    /// records how the connection ended.
    async fn drive(
        mut ws: WebSocketStream<TcpStream>,
        shared: Arc<Shared>,
        abort: Option<oneshot::Receiver<()>>,
    ) {
        let mut abort = abort;
        // The close frame the double sent, while it waits for the client's answer.
        let mut closing: Option<(u16, String)> = None;
        let close_deadline = tokio::time::sleep(Duration::from_secs(365 * 86_400));
        tokio::pin!(close_deadline);
        let mut batch = Vec::new();
        let end = loop {
            let seq = {
                let mut core = shared.lock();
                batch.extend(core.out.drain(..));
                core.queued
            };
            if !batch.is_empty() {
                let mut failed = false;
                for out in batch.drain(..) {
                    let message = match out {
                        Out::Event(text) => Message::Text(text.into()),
                        Out::Close(code, reason) => {
                            close_deadline
                                .as_mut()
                                .reset(tokio::time::Instant::now() + CLOSE_WAIT);
                            let frame = CloseFrame {
                                code: code.into(),
                                reason: reason.clone().into(),
                            };
                            closing = Some((code, reason));
                            Message::Close(Some(frame))
                        }
                    };
                    if closing.is_some() && !matches!(message, Message::Close(_)) {
                        continue; // nothing goes out after the close frame
                    }
                    let fed = tokio::time::timeout(WAIT, ws.feed(message)).await;
                    if !matches!(fed, Ok(Ok(()))) {
                        failed = true;
                        break;
                    }
                }
                let flushed =
                    !failed && matches!(tokio::time::timeout(WAIT, ws.flush()).await, Ok(Ok(())));
                if !flushed {
                    break Closed::Abrupt;
                }
                shared.lock().written = seq;
                shared.bump();
            }
            tokio::select! {
                biased;
                aborted = async {
                    match abort.as_mut() {
                        Some(rx) => rx.await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if aborted {
                        // SO_LINGER 0: closing the socket sends a reset.
                        let _ = ws.get_ref().set_zero_linger();
                    }
                    break Closed::Abrupt;
                }
                () = shared.wake.notified(), if closing.is_none() => {}
                () = &mut close_deadline, if closing.is_some() => break Closed::Abrupt,
                message = ws.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        if closing.is_none() {
                            shared.lock().handle_text(text.as_str());
                            shared.bump();
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        if closing.is_none() {
                            shared.lock().handle_binary();
                            shared.bump();
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        if let Some((code, reason)) = closing.take() {
                            break Closed::Double { code, reason };
                        }
                        // tungstenite queued the answer; send it.
                        let _ = tokio::time::timeout(CLOSE_WAIT, ws.flush()).await;
                        let (code, reason) = frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        break Closed::Client { code, reason };
                    }
                    Some(Ok(Message::Ping(_))) => {
                        let _ = tokio::time::timeout(WAIT, ws.flush()).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break Closed::Abrupt,
                },
            }
        };
        drop(ws);
        shared.lock().closed = Some(end);
        shared.bump();
    }
}

// ---------------------------------------------------------------------------------------------
// Core: the protocol state of one session (sans-IO)
// ---------------------------------------------------------------------------------------------

/// An `error` to send: type is always `invalid_request_error`.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    code: Option<&'static str>,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn new(code: Option<&'static str>, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            code,
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    fn missing(param: &str) -> Self {
        Self::new(
            Some("missing_required_parameter"),
            format!("Missing required parameter: '{param}'."),
            Some(param),
        )
    }

    fn unknown(param: &str) -> Self {
        Self::new(
            Some("unknown_parameter"),
            format!("Unknown parameter: '{param}'."),
            Some(param),
        )
    }

    fn invalid_type(param: &str, expected: &str, got: &Value) -> Self {
        Self::new(
            Some("invalid_type"),
            format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                type_name(got)
            ),
            Some(param),
        )
    }

    fn invalid_value(param: &str, got: &Value, supported: &[&str]) -> Self {
        Self::new(
            Some("invalid_value"),
            format!(
                "Invalid value: {}. Supported values are: {}.",
                shown(got),
                list(supported)
            ),
            Some(param),
        )
    }

    fn item_not_found(param: &str, id: &str) -> Self {
        Self::new(
            Some("invalid_value"),
            format!("Item with item_id not found: {id}"),
            Some(param),
        )
    }
}

/// One conversation item with what the double needs besides its public view.
struct Entry {
    item: Item,
    content: Content,
    /// The format the item's audio is in.
    format: Format,
    /// Audio bytes the item has now (cut by a truncation).
    audio_bytes: usize,
    /// Audio bytes the double sent for it (model items).
    sent_bytes: usize,
    /// The audio itself (model items, test mode only), for `conversation.item.retrieve`.
    audio: Vec<u8>,
    /// `previous_item_id` as announced in `conversation.item.added`.
    previous: Value,
    /// Out-of-band (`conversation:"none"`): not part of the conversation.
    outside: bool,
}

/// How an item's content is written.
enum Content {
    /// As the client sent it (`content` of a message; `Null` for function items).
    Client(Value),
    /// A model message with one `output_audio` part (its transcript is `item.text`).
    OutputAudio,
    /// A model message with one `output_text` part.
    OutputText,
    /// A caller turn committed from the audio buffer (`input_audio`, transcript when known).
    InputAudio,
}

/// The response in progress.
struct Active {
    id: String,
    format: Format,
    text_only: bool,
    in_conversation: bool,
    /// The `response` object fields that do not change (voice, modalities, metadata…).
    shape: Value,
    /// Finished output items, as `response.done` lists them.
    output: Vec<Value>,
    /// The id of the item being produced (by id: a client's insert may shift indices).
    open: Option<String>,
    /// Context tokens when it began: (text, audio).
    input_tokens: (u64, u64),
    /// Output so far: text characters, audio ms.
    out_chars: usize,
    out_audio_ms: u64,
}

/// The scripted VAD of benchmark mode.
struct AutoState {
    config: Auto,
    /// Caller audio since the last turn, in µs.
    since_turn_us: u64,
}

/// The protocol state of one session.
struct Core {
    ids: Ids,
    session: Value,
    conversation_id: String,
    interrupt_override: Option<bool>,
    per_delta_ms: u32,
    /// Test mode: keep what a test may inspect (caller and model audio, client events, errors,
    /// responses). Benchmark mode only counts.
    record: bool,
    auto: Option<AutoState>,
    /// Test mode: answer every response at once with this (see [`Session::auto_answer`]).
    auto_answer: Option<(Arc<[u8]>, String)>,
    /// Benchmark mode: the answer clip per output format, made once.
    clips: Vec<(Format, Arc<[u8]>)>,
    /// The response [`Session::begin_speaking`] opened an item in.
    streaming: Option<String>,

    items: Vec<Entry>,
    response: Option<Active>,
    /// `response` objects of every `response.done`.
    done: Vec<Value>,
    /// Model audio has been produced (the voice is locked).
    audio_seen: bool,
    /// Input tokens of the last response, for the cached-token estimate.
    last_input_tokens: u64,

    /// Caller audio: all of it (test mode), the uncommitted buffer (bytes), all of it (µs).
    appended: Vec<u8>,
    buffer_bytes: usize,
    buffer_us: u64,
    input_us: u64,
    scratch: Vec<u8>,
    /// The caller item announced by `speech_started`, until `speech_stopped`.
    speech: Option<String>,

    /// Serialised server frames not written yet; `queued` counts all ever queued.
    out: VecDeque<Out>,
    queued: u64,
    /// How many queued frames the driver has written.
    written: u64,
    /// Client events (not appends) for the test.
    inbox: VecDeque<Value>,
    /// Every `error` event sent.
    errors: Vec<Value>,
    closed: Option<Closed>,
}

/// The fast path for `input_audio_buffer.append`: no `Value` tree per 20 ms frame.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Append<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    audio: Cow<'a, str>,
}

impl Core {
    fn new(config: &DoubleConfig, request: &Request) -> Self {
        let mut ids = Ids::new();
        let model = request.model().unwrap_or("gpt-realtime").to_owned();
        let expires_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let session = default_session(&ids.make("sess_", 21), &model, expires_at);
        let conversation_id = ids.make("conv_", 21);
        let mut core = Self {
            ids,
            session,
            conversation_id,
            interrupt_override: config.interrupt_response,
            per_delta_ms: config.audio_per_delta_ms.max(1),
            record: config.auto.is_none(),
            auto: config.auto.clone().map(|config| AutoState {
                config,
                since_turn_us: 0,
            }),
            auto_answer: None,
            clips: Vec::new(),
            streaming: None,
            items: Vec::new(),
            response: None,
            done: Vec::new(),
            audio_seen: false,
            last_input_tokens: 0,
            appended: Vec::new(),
            buffer_bytes: 0,
            buffer_us: 0,
            input_us: 0,
            scratch: Vec::new(),
            speech: None,
            out: VecDeque::new(),
            queued: 0,
            written: 0,
            inbox: VecDeque::new(),
            errors: Vec::new(),
            closed: None,
        };
        let created = json!({"type": "session.created", "session": core.session.clone()});
        core.emit(created);
        core
    }

    // --- output ---------------------------------------------------------------------------

    /// Queues a server event, adding its `event_id` when it has none.
    fn emit(&mut self, mut event: Value) {
        if let Some(obj) = event.as_object_mut()
            && !obj.contains_key("event_id")
        {
            obj.insert("event_id".to_owned(), Value::String(self.ids.event()));
        }
        self.out.push_back(Out::Event(event.to_string()));
        self.queued += 1;
    }

    fn error(&mut self, error: ApiError, client_event_id: Option<&str>) {
        let event = json!({
            "type": "error",
            "event_id": self.ids.event(),
            "error": {
                "type": "invalid_request_error",
                "code": error.code,
                "message": error.message,
                "param": error.param,
                "event_id": client_event_id,
            },
        });
        if self.record {
            self.errors.push(event.clone());
        }
        self.emit(event);
    }

    // --- configuration views ----------------------------------------------------------------

    fn input_format(&self) -> Format {
        Format::from_json(&self.session["audio"]["input"]["format"]).unwrap_or(Format::Pcm24k)
    }

    fn output_format(&self) -> Format {
        Format::from_json(&self.session["audio"]["output"]["format"]).unwrap_or(Format::Pcm24k)
    }

    fn turn_detection(&self) -> &Value {
        &self.session["audio"]["input"]["turn_detection"]
    }

    fn interrupt_response(&self) -> bool {
        self.interrupt_override.unwrap_or_else(|| {
            self.turn_detection()["interrupt_response"]
                .as_bool()
                .unwrap_or(true)
        })
    }

    fn create_response(&self) -> bool {
        let td = self.turn_detection();
        !td.is_null() && td["create_response"].as_bool().unwrap_or(true)
    }

    fn transcription_on(&self) -> bool {
        !self.session["audio"]["input"]["transcription"].is_null()
    }

    // --- client events ----------------------------------------------------------------------

    /// Handles one text frame from the client.
    fn handle_text(&mut self, text: &str) {
        if let Ok(append) = serde_json::from_str::<Append<'_>>(text)
            && append.kind == "input_audio_buffer.append"
        {
            let event_id = append.event_id.as_deref();
            if let Err(e) = self.append(&append.audio) {
                self.error(e, event_id);
            }
            return;
        }
        let event: Value = match serde_json::from_str(text) {
            Ok(event) => event,
            Err(e) => {
                if self.record {
                    self.inbox.push_back(Value::String(text.to_owned()));
                }
                let error = ApiError::new(
                    None,
                    format!("We could not parse the JSON body of your event: {e}."),
                    None,
                );
                self.error(error, None);
                return;
            }
        };
        let event_id = event
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let is_append =
            event.get("type").and_then(Value::as_str) == Some("input_audio_buffer.append");
        let result = self.dispatch(&event);
        if self.record && !is_append {
            self.inbox.push_back(event);
        }
        if let Err(e) = result {
            self.error(e, event_id.as_deref());
        }
    }

    fn handle_binary(&mut self) {
        let error = ApiError::new(
            None,
            "Binary messages are not supported; send every event as a JSON text message.",
            None,
        );
        self.error(error, None);
    }

    fn dispatch(&mut self, event: &Value) -> Result<(), ApiError> {
        let Some(obj) = event.as_object() else {
            return Err(ApiError::invalid_type("event", "an object", event));
        };
        let kind = match obj.get("type") {
            None => return Err(ApiError::missing("type")),
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => return Err(ApiError::invalid_type("type", "a string", other)),
        };
        if let Some(id) = obj.get("event_id")
            && !id.is_string()
        {
            return Err(ApiError::invalid_type("event_id", "a string", id));
        }
        let fields: &[&str] = match kind {
            "session.update" => &["session"],
            "input_audio_buffer.append" => &["audio"],
            "input_audio_buffer.commit" | "input_audio_buffer.clear" => &[],
            "conversation.item.create" => &["item", "previous_item_id"],
            "conversation.item.retrieve" | "conversation.item.delete" => &["item_id"],
            "conversation.item.truncate" => &["item_id", "content_index", "audio_end_ms"],
            "response.create" => &["response"],
            "response.cancel" => &["response_id"],
            "output_audio_buffer.clear" => {
                return Err(ApiError::new(
                    None,
                    "output_audio_buffer.clear is only supported for WebRTC and SIP \
                     connections; a WebSocket client manages its own playback.",
                    Some("type"),
                ));
            }
            _ => {
                return Err(ApiError::invalid_value(
                    "type",
                    &Value::String(kind.to_owned()),
                    CLIENT_EVENTS,
                ));
            }
        };
        for key in obj.keys() {
            if key != "type" && key != "event_id" && !fields.contains(&key.as_str()) {
                return Err(ApiError::unknown(key));
            }
        }
        match kind {
            "session.update" => self.session_update(obj),
            "input_audio_buffer.append" => match obj.get("audio") {
                None => Err(ApiError::missing("audio")),
                Some(Value::String(audio)) => self.append(audio),
                Some(other) => Err(ApiError::invalid_type("audio", "a string", other)),
            },
            "input_audio_buffer.commit" => self.commit(),
            "input_audio_buffer.clear" => {
                self.buffer_bytes = 0;
                self.buffer_us = 0;
                self.emit(json!({"type": "input_audio_buffer.cleared"}));
                Ok(())
            }
            "conversation.item.create" => self.item_create(obj),
            "conversation.item.retrieve" => self.item_retrieve(obj),
            "conversation.item.delete" => self.item_delete(obj),
            "conversation.item.truncate" => self.item_truncate(obj),
            "response.create" => self.response_create(obj),
            _ => self.response_cancel(obj),
        }
    }

    fn session_update(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let update = obj
            .get("session")
            .ok_or_else(|| ApiError::missing("session"))?;
        let update = object(update, "session")?;
        check_session(update)?;
        if self.audio_seen
            && let Some(voice) = update
                .get("audio")
                .and_then(|a| a.get("output"))
                .and_then(|o| o.get("voice"))
            && *voice != self.session["audio"]["output"]["voice"]
        {
            return Err(ApiError::new(
                Some("cannot_update_voice"),
                "Cannot update a conversation's voice if assistant audio is present.",
                Some("session.audio.output.voice"),
            ));
        }
        self.session = merge_session(&self.session, update);
        let updated = json!({"type": "session.updated", "session": self.session.clone()});
        self.emit(updated);
        Ok(())
    }

    fn append(&mut self, audio: &str) -> Result<(), ApiError> {
        let buffer = if self.record {
            &mut self.appended
        } else {
            self.scratch.clear();
            &mut self.scratch
        };
        let start = buffer.len();
        if BASE64_STANDARD.decode_vec(audio, buffer).is_err() {
            buffer.truncate(start);
            return Err(ApiError::new(
                Some("invalid_value"),
                "Invalid 'audio': expected base64-encoded audio bytes.",
                Some("audio"),
            ));
        }
        let bytes = buffer.len() - start;
        let us = (bytes as u64 * 1000) / self.input_format().bytes_per_ms() as u64;
        self.buffer_bytes += bytes;
        self.buffer_us += us;
        self.input_us += us;
        let turn = self.auto.as_mut().and_then(|auto| {
            let every = u64::from(auto.config.speech_every_ms?) * 1000;
            auto.since_turn_us += us;
            (auto.since_turn_us >= every).then(|| {
                auto.since_turn_us = 0;
                every / 1000
            })
        });
        if let Some(every_ms) = turn {
            self.auto_turn(every_ms);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ApiError> {
        if self.buffer_us < 100_000 {
            return Err(ApiError::new(
                Some("input_audio_buffer_commit_empty"),
                format!(
                    "Error committing input audio buffer: buffer too small. Expected at least \
                     100ms of audio, but buffer only has {:.2}ms of audio.",
                    self.buffer_us as f64 / 1000.0
                ),
                None,
            ));
        }
        let id = self.ids.make("item_", 21);
        self.commit_caller(id);
        Ok(())
    }

    fn item_create(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let item = obj.get("item").ok_or_else(|| ApiError::missing("item"))?;
        let item = object(item, "item")?;
        let position = match obj.get("previous_item_id") {
            None | Some(Value::Null) => self.items.len(),
            Some(Value::String(p)) if p == "root" => 0,
            Some(Value::String(p)) => self
                .find(p)
                .map(|i| i + 1)
                .ok_or_else(|| ApiError::item_not_found("previous_item_id", p))?,
            Some(other) => {
                return Err(ApiError::invalid_type(
                    "previous_item_id",
                    "a string",
                    other,
                ));
            }
        };
        let (kind, content, text, audio_ms) = check_item(item, self.input_format())?;
        if let ItemKind::FunctionCallOutput { call_id, .. } = &kind && !self.items.iter().any(|e| {
            !e.deleted_or_outside()
                && matches!(&e.item.kind, ItemKind::FunctionCall { call_id: c, .. } if c == call_id)
        }) {
            return Err(ApiError::new(
                None,
                format!("No tool call found for function call output with call_id {call_id}."),
                Some("item.call_id"),
            ));
        }
        let id = match item.get("id") {
            Some(Value::String(id)) => {
                if self.items.iter().any(|e| e.item.id == *id) {
                    return Err(ApiError::new(
                        Some("invalid_value"),
                        format!("Item with id '{id}' already exists."),
                        Some("item.id"),
                    ));
                }
                id.clone()
            }
            Some(other) => return Err(ApiError::invalid_type("item.id", "a string", other)),
            None => self.ids.make("item_", 21),
        };
        let previous = self.previous_of(position);
        let entry = Entry {
            item: Item {
                id,
                kind,
                status: "completed".to_owned(),
                text,
                audio_ms,
                truncated_ms: None,
                deleted: false,
                from_client: true,
            },
            content: Content::Client(content),
            format: self.input_format(),
            audio_bytes: 0,
            sent_bytes: 0,
            audio: Vec::new(),
            previous: previous.clone(),
            outside: false,
        };
        let json = entry.json(false);
        self.items.insert(position, entry);
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": json}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": json}),
        );
        Ok(())
    }

    fn item_id(obj: &Map<String, Value>) -> Result<&str, ApiError> {
        let id = obj
            .get("item_id")
            .ok_or_else(|| ApiError::missing("item_id"))?;
        id.as_str()
            .ok_or_else(|| ApiError::invalid_type("item_id", "a string", id))
    }

    fn item_retrieve(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let id = Self::item_id(obj)?;
        let index = self
            .find(id)
            .ok_or_else(|| ApiError::item_not_found("item_id", id))?;
        let item = self.items[index].json(true);
        self.emit(json!({"type": "conversation.item.retrieved", "item": item}));
        Ok(())
    }

    fn item_delete(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let id = Self::item_id(obj)?;
        let index = self
            .find(id)
            .ok_or_else(|| ApiError::item_not_found("item_id", id))?;
        self.items[index].item.deleted = true;
        let id = id.to_owned();
        self.emit(json!({"type": "conversation.item.deleted", "item_id": id}));
        Ok(())
    }

    fn item_truncate(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let id = Self::item_id(obj)?;
        let content_index = obj
            .get("content_index")
            .ok_or_else(|| ApiError::missing("content_index"))?;
        let content_index = integer(content_index, "content_index", 0, i64::MAX)?;
        let end = obj
            .get("audio_end_ms")
            .ok_or_else(|| ApiError::missing("audio_end_ms"))?;
        let end = integer(end, "audio_end_ms", 0, i64::MAX)? as u64;
        let index = self
            .find(id)
            .ok_or_else(|| ApiError::item_not_found("item_id", id))?;
        let entry = &self.items[index];
        if !matches!(entry.content, Content::OutputAudio) || end == 0 {
            return Err(ApiError::new(
                None,
                "Only model output audio messages can be truncated",
                None,
            ));
        }
        if content_index != 0 {
            return Err(ApiError::new(
                Some("invalid_value"),
                format!(
                    "Invalid 'content_index': the item has no audio content part {content_index}."
                ),
                Some("content_index"),
            ));
        }
        let length = entry.format.ms(entry.audio_bytes);
        if end > length {
            return Err(ApiError::new(
                None,
                format!("Audio content of {length}ms is already shorter than {end}ms"),
                None,
            ));
        }
        let entry = &mut self.items[index];
        entry.audio_bytes = end as usize * entry.format.bytes_per_ms();
        entry.audio.truncate(entry.audio_bytes);
        entry.item.truncated_ms = Some(end);
        let id = id.to_owned();
        self.emit(json!({
            "type": "conversation.item.truncated",
            "item_id": id,
            "content_index": 0,
            "audio_end_ms": end,
        }));
        Ok(())
    }

    fn response_create(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let overrides = match obj.get("response") {
            None | Some(Value::Null) => None,
            Some(r) => {
                let r = object(r, "response")?;
                check_response(r)?;
                Some(r)
            }
        };
        if let Some(active) = &self.response {
            return Err(ApiError::new(
                Some("conversation_already_has_active_response"),
                format!(
                    "Conversation already has an active response in progress: {}. Wait until \
                     the response is finished before creating a new one.",
                    active.id
                ),
                None,
            ));
        }
        self.begin_response(overrides);
        self.answer_if_auto();
        Ok(())
    }

    fn response_cancel(&mut self, obj: &Map<String, Value>) -> Result<(), ApiError> {
        let asked = match obj.get("response_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.as_str()),
            Some(other) => return Err(ApiError::invalid_type("response_id", "a string", other)),
        };
        let running = self.response.as_ref().map(|r| r.id.as_str());
        match (running, asked) {
            (Some(id), Some(asked)) if id != asked => {}
            (Some(_), _) => {
                self.finish_response("cancelled", Some("client_cancelled"));
                return Ok(());
            }
            (None, _) => {}
        }
        Err(ApiError::new(
            Some("response_cancel_not_active"),
            "Cancellation failed: no active response found",
            None,
        ))
    }

    // --- conversation helpers ---------------------------------------------------------------

    /// Index of any entry with this id, deleted and out-of-band ones included.
    fn index_of(&self, id: &str) -> Option<usize> {
        self.items.iter().position(|e| e.item.id == id)
    }

    /// Index of a live conversation item.
    fn find(&self, id: &str) -> Option<usize> {
        self.items
            .iter()
            .position(|e| e.item.id == id && !e.deleted_or_outside())
    }

    /// The `previous_item_id` of an item inserted at `position`.
    fn previous_of(&self, position: usize) -> Value {
        self.items[..position]
            .iter()
            .rev()
            .find(|e| !e.deleted_or_outside())
            .map_or(Value::Null, |e| Value::String(e.item.id.clone()))
    }

    /// Commits the caller's buffer as a user item: `committed`, `conversation.item.added`/`.done`.
    fn commit_caller(&mut self, id: String) {
        let previous = self.previous_of(self.items.len());
        let format = self.input_format();
        let entry = Entry {
            item: Item {
                id: id.clone(),
                kind: ItemKind::Message { role: Role::User },
                status: "completed".to_owned(),
                text: String::new(),
                audio_ms: self.buffer_us / 1000,
                truncated_ms: None,
                deleted: false,
                from_client: false,
            },
            content: Content::InputAudio,
            format,
            audio_bytes: self.buffer_bytes,
            sent_bytes: 0,
            audio: Vec::new(),
            previous: previous.clone(),
            outside: false,
        };
        self.buffer_bytes = 0;
        self.buffer_us = 0;
        let json = entry.json(false);
        self.items.push(entry);
        self.emit(json!({"type": "input_audio_buffer.committed", "item_id": id, "previous_item_id": previous}));
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": json}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": json}),
        );
    }

    // --- scripted model behaviour -----------------------------------------------------------

    fn require_response(&self, what: &str) -> Result<(), String> {
        if self.response.is_none() {
            return Err(format!(
                "{what} needs a response in progress, and there is none: the client sent no \
                 response.create (or it was refused), no VAD turn with create_response started \
                 one, or it was cancelled. Use begin_response() to start one as the service \
                 would on its own."
            ));
        }
        Ok(())
    }

    /// `response.created` + `rate_limits.updated`; returns the response id.
    fn begin_response(&mut self, overrides: Option<&Map<String, Value>>) -> String {
        let get = |key: &str| overrides.and_then(|o| o.get(key));
        let id = self.ids.make("resp_", 21);
        let format = get("audio")
            .and_then(|a| a.get("output"))
            .and_then(|o| o.get("format"))
            .and_then(Format::from_json)
            .unwrap_or_else(|| self.output_format());
        let voice = get("audio")
            .and_then(|a| a.get("output"))
            .and_then(|o| o.get("voice"))
            .unwrap_or(&self.session["audio"]["output"]["voice"])
            .clone();
        let modalities = get("output_modalities")
            .unwrap_or(&self.session["output_modalities"])
            .clone();
        let text_only = modalities
            .as_array()
            .is_some_and(|m| m.len() == 1 && m[0] == "text");
        let in_conversation = get("conversation").and_then(Value::as_str) != Some("none");
        let shape = json!({
            "object": "realtime.response",
            "id": id,
            "conversation_id": if in_conversation { Value::String(self.conversation_id.clone()) } else { Value::Null },
            "output_modalities": modalities,
            "max_output_tokens": get("max_output_tokens").unwrap_or(&self.session["max_output_tokens"]).clone(),
            "audio": {"output": {"format": format.json(), "voice": voice}},
            "metadata": get("metadata").cloned().unwrap_or(Value::Null),
        });
        let input_tokens = self.context_tokens();
        let mut created = shape.clone();
        created["status"] = json!("in_progress");
        created["status_details"] = Value::Null;
        created["output"] = json!([]);
        created["usage"] = Value::Null;
        self.response = Some(Active {
            id: id.clone(),
            format,
            text_only,
            in_conversation,
            shape,
            output: Vec::new(),
            open: None,
            input_tokens,
            out_chars: 0,
            out_audio_ms: 0,
        });
        self.emit(json!({"type": "response.created", "response": created}));
        let reserved = input_tokens.0 + input_tokens.1 + 4096;
        let remaining = 15_000_000u64.saturating_sub(reserved);
        self.emit(json!({
            "type": "rate_limits.updated",
            "rate_limits": [
                {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
                {"name": "tokens", "limit": 15_000_000, "remaining": remaining, "reset_seconds": 0.016},
            ],
        }));
        id
    }

    /// Answers the response in progress at once, if auto-answer is on and it has no output.
    fn answer_if_auto(&mut self) {
        let format = match &self.response {
            Some(r) if r.open.is_none() && r.output.is_empty() => r.format,
            _ => return,
        };
        let (clip, transcript) = if let Some(auto) = &self.auto {
            let (ms, transcript) = (auto.config.answer_ms, auto.config.transcript.clone());
            let clip = match self.clips.iter().find(|(f, _)| *f == format) {
                Some((_, clip)) => clip.clone(),
                None => {
                    let clip: Arc<[u8]> = format.tone(ms, 7).into();
                    self.clips.push((format, clip.clone()));
                    clip
                }
            };
            (clip, transcript)
        } else if let Some((clip, transcript)) = &self.auto_answer {
            (clip.clone(), transcript.clone())
        } else {
            return;
        };
        let _ = self.speak(&clip, &transcript);
    }

    fn speak(&mut self, audio: &[u8], transcript: &str) -> Result<Spoken, String> {
        self.require_response("speak")?;
        if self.response.as_ref().is_some_and(|r| r.open.is_some()) {
            return Err(
                "an item is already being spoken (use speak_more / finish_response)".to_owned(),
            );
        }
        let spoken = self.open_message();
        self.stream(audio, transcript);
        self.finish_response("completed", None);
        Ok(spoken)
    }

    fn speak_more(&mut self, audio: &[u8], transcript: &str) -> Result<bool, String> {
        let Some(streaming) = &self.streaming else {
            return Err("nothing is being spoken: call begin_speaking first".to_owned());
        };
        match &self.response {
            Some(active) if active.id == *streaming && active.open.is_some() => {
                self.stream(audio, transcript);
                Ok(true)
            }
            // Cancelled (or finished) meanwhile.
            _ => Ok(false),
        }
    }

    fn call_function(
        &mut self,
        name: &str,
        call_id: &str,
        arguments: &str,
        with_audio: Option<(&[u8], &str)>,
    ) -> Result<Called, String> {
        self.require_response("call_function")?;
        let mut audio_item_id = None;
        if let Some(open) = self.response.as_ref().and_then(|r| r.open.clone()) {
            audio_item_id = Some(open);
            self.close_open("completed");
        }
        if let Some((audio, transcript)) = with_audio {
            audio_item_id = Some(self.open_message().item_id);
            self.stream(audio, transcript);
            self.close_open("completed");
        }
        let call_id = if call_id.is_empty() {
            self.ids.make("call_", 16)
        } else {
            call_id.to_owned()
        };
        let Some(active) = &self.response else {
            return Err("the response vanished".to_owned());
        };
        let response_id = active.id.clone();
        let in_conversation = active.in_conversation;
        let output_index = active.output.len();
        let item_id = self.ids.make("item_", 21);
        let previous = self.previous_of(self.items.len());
        let mut item = json!({
            "id": item_id, "object": "realtime.item", "type": "function_call",
            "status": "in_progress", "name": name, "call_id": call_id, "arguments": "",
        });
        self.emit(json!({"type": "response.output_item.added", "response_id": response_id, "output_index": output_index, "item": item}));
        if in_conversation {
            self.emit(json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}));
        }
        for piece in split_chars(arguments, 24) {
            self.emit(json!({
                "type": "response.function_call_arguments.delta", "response_id": response_id,
                "item_id": item_id, "output_index": output_index, "call_id": call_id, "delta": piece,
            }));
        }
        self.emit(json!({
            "type": "response.function_call_arguments.done", "response_id": response_id,
            "item_id": item_id, "output_index": output_index, "call_id": call_id, "name": name,
            "arguments": arguments,
        }));
        item["status"] = json!("completed");
        item["arguments"] = json!(arguments);
        self.emit(json!({"type": "response.output_item.done", "response_id": response_id, "output_index": output_index, "item": item}));
        if in_conversation {
            self.emit(json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}));
        }
        self.items.push(Entry {
            item: Item {
                id: item_id.clone(),
                kind: ItemKind::FunctionCall {
                    call_id: call_id.clone(),
                    name: name.to_owned(),
                    arguments: arguments.to_owned(),
                },
                status: "completed".to_owned(),
                text: String::new(),
                audio_ms: 0,
                truncated_ms: None,
                deleted: false,
                from_client: false,
            },
            content: Content::Client(Value::Null),
            format: self.output_format(),
            audio_bytes: 0,
            sent_bytes: 0,
            audio: Vec::new(),
            previous,
            outside: !in_conversation,
        });
        if let Some(active) = &mut self.response {
            active.output.push(item);
            active.out_chars += arguments.len();
        }
        self.finish_response("completed", None);
        Ok(Called {
            response_id,
            audio_item_id,
            item_id,
            call_id,
        })
    }

    /// Opens an assistant message in the response in progress (which must exist).
    fn open_message(&mut self) -> Spoken {
        let Some(active) = &self.response else {
            unreachable!("callers check that a response is in progress");
        };
        let response_id = active.id.clone();
        let output_index = active.output.len();
        let (format, text_only, in_conversation) =
            (active.format, active.text_only, active.in_conversation);
        let item_id = self.ids.make("item_", 21);
        let previous = self.previous_of(self.items.len());
        let item = json!({
            "id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
            "role": "assistant", "content": [],
        });
        self.emit(json!({"type": "response.output_item.added", "response_id": response_id, "output_index": output_index, "item": item}));
        if in_conversation {
            self.emit(json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}));
        }
        let part = if text_only {
            json!({"type": "text", "text": ""})
        } else {
            json!({"type": "audio", "transcript": ""})
        };
        self.emit(json!({
            "type": "response.content_part.added", "response_id": response_id, "item_id": item_id,
            "output_index": output_index, "content_index": 0, "part": part,
        }));
        self.items.push(Entry {
            item: Item {
                id: item_id.clone(),
                kind: ItemKind::Message {
                    role: Role::Assistant,
                },
                status: "in_progress".to_owned(),
                text: String::new(),
                audio_ms: 0,
                truncated_ms: None,
                deleted: false,
                from_client: false,
            },
            content: if text_only {
                Content::OutputText
            } else {
                Content::OutputAudio
            },
            format,
            audio_bytes: 0,
            sent_bytes: 0,
            audio: Vec::new(),
            previous,
            outside: !in_conversation,
        });
        if let Some(active) = &mut self.response {
            active.open = Some(item_id.clone());
        }
        Spoken {
            response_id,
            item_id,
        }
    }

    /// Audio and transcript deltas for the open item, interleaved.
    fn stream(&mut self, audio: &[u8], transcript: &str) {
        let Some(active) = &self.response else { return };
        let Some(open) = active.open.as_deref().and_then(|id| self.index_of(id)) else {
            return;
        };
        let response_id = active.id.clone();
        let output_index = active.output.len();
        let text_only = active.text_only;
        let item_id = self.items[open].item.id.clone();
        let ids = |kind: &str| {
            json!({
                "type": kind, "response_id": response_id, "item_id": item_id,
                "output_index": output_index, "content_index": 0,
            })
        };
        if text_only {
            for piece in split_words(transcript, 1 + transcript.len() / 16) {
                let mut delta = ids("response.output_text.delta");
                delta["delta"] = json!(piece);
                self.emit(delta);
            }
        } else {
            let format = self.items[open].format;
            let chunk = format.bytes_per_ms() * self.per_delta_ms as usize;
            let chunks: Vec<&[u8]> = audio.chunks(chunk.max(1)).collect();
            let pieces = split_words(transcript, chunks.len().max(1));
            let mut pieces = pieces.into_iter();
            for c in &chunks {
                let mut delta = ids("response.output_audio.delta");
                delta["delta"] = Value::String(BASE64_STANDARD.encode(c));
                self.emit(delta);
                if let Some(piece) = pieces.next() {
                    let mut delta = ids("response.output_audio_transcript.delta");
                    delta["delta"] = json!(piece);
                    self.emit(delta);
                }
            }
            for piece in pieces {
                let mut delta = ids("response.output_audio_transcript.delta");
                delta["delta"] = json!(piece);
                self.emit(delta);
            }
            if !audio.is_empty() {
                self.audio_seen = true;
            }
        }
        let keep = self.record;
        let entry = &mut self.items[open];
        entry.item.text.push_str(transcript);
        if !text_only {
            entry.audio_bytes += audio.len();
            entry.sent_bytes += audio.len();
            entry.item.audio_ms = entry.format.ms(entry.sent_bytes);
            if keep {
                entry.audio.extend_from_slice(audio);
            }
        }
        let audio_ms = if text_only {
            0
        } else {
            self.items[open].format.ms(audio.len())
        };
        if let Some(active) = &mut self.response {
            active.out_chars += transcript.len();
            active.out_audio_ms += audio_ms;
        }
    }

    /// Ends the open item: the `.done` events, with this status.
    fn close_open(&mut self, status: &str) {
        let Some(active) = &mut self.response else {
            return;
        };
        let Some(open) = active.open.take() else {
            return;
        };
        let response_id = active.id.clone();
        let output_index = active.output.len();
        let text_only = active.text_only;
        let in_conversation = active.in_conversation;
        let Some(index) = self.index_of(&open) else {
            return;
        };
        let entry = &mut self.items[index];
        entry.item.status = status.to_owned();
        let item_id = entry.item.id.clone();
        let text = entry.item.text.clone();
        let previous = entry.previous.clone();
        let item = entry.json(false);
        let ids = |kind: &str| {
            json!({
                "type": kind, "response_id": response_id, "item_id": item_id,
                "output_index": output_index, "content_index": 0,
            })
        };
        if text_only {
            let mut done = ids("response.output_text.done");
            done["text"] = json!(text);
            self.emit(done);
            let mut part = ids("response.content_part.done");
            part["part"] = json!({"type": "text", "text": text});
            self.emit(part);
        } else {
            self.emit(ids("response.output_audio.done"));
            let mut done = ids("response.output_audio_transcript.done");
            done["transcript"] = json!(text);
            self.emit(done);
            let mut part = ids("response.content_part.done");
            part["part"] = json!({"type": "audio", "transcript": text});
            self.emit(part);
        }
        self.emit(json!({"type": "response.output_item.done", "response_id": response_id, "output_index": output_index, "item": item}));
        if in_conversation {
            self.emit(json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}));
        }
        if let Some(active) = &mut self.response {
            active.output.push(item);
        }
    }

    /// Ends the response in progress: closes its open item (`incomplete` when cancelled), then
    /// `response.done`. Returns the `response` object.
    fn finish_response(&mut self, status: &str, reason: Option<&str>) -> Value {
        self.close_open(if status == "completed" {
            "completed"
        } else {
            "incomplete"
        });
        let Some(active) = self.response.take() else {
            return Value::Null;
        };
        let (in_text, in_audio) = active.input_tokens;
        let input = in_text + in_audio;
        let cached = if self.last_input_tokens >= 1024 {
            self.last_input_tokens.min(input) / 64 * 64
        } else {
            0
        };
        let cached_text = cached.min(in_text);
        let out_text = tokens(active.out_chars);
        let out_audio = if active.text_only {
            0
        } else {
            active.out_audio_ms / 50
        };
        let usage = json!({
            "total_tokens": input + out_text + out_audio,
            "input_tokens": input,
            "output_tokens": out_text + out_audio,
            "input_token_details": {
                "text_tokens": in_text,
                "audio_tokens": in_audio,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached - cached_text,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
        });
        self.last_input_tokens = input;
        let mut response = active.shape;
        response["status"] = json!(status);
        response["status_details"] = match reason {
            Some(reason) => json!({"type": status, "reason": reason}),
            None => Value::Null,
        };
        response["output"] = Value::Array(active.output);
        response["usage"] = usage;
        if self.record {
            self.done.push(response.clone());
        }
        self.emit(json!({"type": "response.done", "response": response}));
        response
    }

    fn speech_started(&mut self, audio_start_ms: u64) -> Result<String, String> {
        if self.turn_detection().is_null() {
            return Err(
                "the session has turn_detection null (no VAD): the service sends no \
                        speech events"
                    .to_owned(),
            );
        }
        if let Some(id) = &self.speech {
            return Err(format!(
                "speech already started (item {id}); call speech_stopped"
            ));
        }
        let id = self.ids.make("item_", 21);
        self.speech = Some(id.clone());
        self.emit(json!({
            "type": "input_audio_buffer.speech_started",
            "audio_start_ms": audio_start_ms,
            "item_id": id,
        }));
        if self.response.is_some() && self.interrupt_response() {
            self.finish_response("cancelled", Some("turn_detected"));
        }
        Ok(id)
    }

    fn speech_stopped(&mut self, audio_end_ms: u64) -> Result<(), String> {
        let Some(id) = self.speech.take() else {
            return Err("no speech_started before speech_stopped".to_owned());
        };
        self.emit(json!({
            "type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": audio_end_ms,
            "item_id": id,
        }));
        self.commit_caller(id);
        if self.create_response() && self.response.is_none() {
            self.begin_response(None);
            self.answer_if_auto();
        }
        Ok(())
    }

    fn caller_transcript(&mut self, item_id: &str, text: &str) -> Result<(), String> {
        if !self.transcription_on() {
            return Err(
                "the session has no audio.input.transcription: the service sends no \
                        caller transcripts"
                    .to_owned(),
            );
        }
        let index = self
            .find(item_id)
            .filter(|&i| matches!(self.items[i].content, Content::InputAudio))
            .ok_or_else(|| format!("no caller audio item {item_id}"))?;
        let audio_ms = self.items[index].item.audio_ms;
        self.items[index].item.text = text.to_owned();
        let (audio_tokens, text_tokens) = (audio_ms / 100, tokens(text.len()));
        self.emit(json!({
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id,
            "content_index": 0,
            "transcript": text,
            "usage": {
                "type": "tokens",
                "total_tokens": audio_tokens + text_tokens,
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": text_tokens,
            },
        }));
        Ok(())
    }

    /// Benchmark mode: a whole caller turn after `every_ms` of audio.
    fn auto_turn(&mut self, every_ms: u64) {
        if self.turn_detection().is_null() {
            return;
        }
        let end = self.input_us / 1000;
        let Ok(id) = self.speech_started(end.saturating_sub(every_ms)) else {
            return;
        };
        let _ = self.speech_stopped(end);
        if self.transcription_on() {
            let _ = self.caller_transcript(&id, "Hello, I have a question.");
        }
    }

    /// Tokens of the conversation as context: (text, audio).
    fn context_tokens(&self) -> (u64, u64) {
        let instructions = self.session["instructions"].as_str().map_or(0, str::len);
        let tools = self.session["tools"].as_array().map_or(0, |t| {
            if t.is_empty() {
                0
            } else {
                self.session["tools"].to_string().len()
            }
        });
        let mut text = 4 + tokens(instructions) + tokens(tools);
        let mut audio = 0;
        for e in self.items.iter().filter(|e| !e.deleted_or_outside()) {
            text += 4;
            match (&e.content, &e.item.kind) {
                (Content::InputAudio, _) => audio += e.item.audio_ms / 100,
                (Content::OutputAudio, _) => audio += e.format.ms(e.audio_bytes) / 50,
                (_, ItemKind::FunctionCall { arguments, .. }) => text += tokens(arguments.len()),
                (_, ItemKind::FunctionCallOutput { output, .. }) => text += tokens(output.len()),
                _ => text += tokens(e.item.text.len()) + e.item.audio_ms / 100,
            }
        }
        (text, audio)
    }
}

impl Entry {
    fn deleted_or_outside(&self) -> bool {
        self.item.deleted || self.outside
    }

    /// The item as the protocol writes it (with the audio itself for `retrieve`).
    fn json(&self, with_audio: bool) -> Value {
        let item = &self.item;
        match &item.kind {
            ItemKind::Message { role } => {
                let content = match &self.content {
                    Content::Client(content) => content.clone(),
                    Content::OutputAudio => {
                        // Truncation removes the transcript from the context.
                        let transcript = if item.truncated_ms.is_some() {
                            ""
                        } else {
                            &item.text
                        };
                        let mut part = json!({"type": "output_audio", "transcript": transcript});
                        if with_audio {
                            part["audio"] = json!(BASE64_STANDARD.encode(&self.audio));
                        }
                        json!([part])
                    }
                    Content::OutputText => json!([{"type": "output_text", "text": item.text}]),
                    Content::InputAudio => {
                        let transcript = if item.text.is_empty() {
                            Value::Null
                        } else {
                            json!(item.text)
                        };
                        json!([{"type": "input_audio", "transcript": transcript}])
                    }
                };
                json!({
                    "id": item.id, "object": "realtime.item", "type": "message",
                    "status": item.status, "role": role.as_str(), "content": content,
                })
            }
            ItemKind::FunctionCall {
                call_id,
                name,
                arguments,
            } => json!({
                "id": item.id, "object": "realtime.item", "type": "function_call",
                "status": item.status, "call_id": call_id, "name": name, "arguments": arguments,
            }),
            ItemKind::FunctionCallOutput { call_id, output } => json!({
                "id": item.id, "object": "realtime.item", "type": "function_call_output",
                "status": item.status, "call_id": call_id, "output": output,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

type Obj = Map<String, Value>;

const SESSION_KEYS: &[&str] = &[
    "type",
    "model",
    "instructions",
    "output_modalities",
    "audio",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "truncation",
    "tracing",
    "prompt",
    "include",
    "reasoning",
    "parallel_tool_calls",
];

const RESPONSE_KEYS: &[&str] = &[
    "output_modalities",
    "audio",
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "conversation",
    "input",
    "metadata",
    "prompt",
];

/// A GA `session` object of a `session.update`. `type` is checked first: a beta-shaped update
/// has none, and that is what the service reports first.
fn check_session(s: &Obj) -> Result<(), ApiError> {
    let ty = s
        .get("type")
        .ok_or_else(|| ApiError::missing("session.type"))?;
    known(s, "session", SESSION_KEYS)?;
    if one_of(ty, "session.type", &["realtime", "transcription"])? == "transcription" {
        return Err(ApiError::new(
            Some("invalid_value"),
            "Cannot change the type of a realtime session to 'transcription'.",
            Some("session.type"),
        ));
    }
    for (key, v) in s {
        let path = format!("session.{key}");
        match key.as_str() {
            "model" | "instructions" => {
                string(v, &path)?;
            }
            "output_modalities" => check_modalities(v, &path)?,
            "audio" => check_audio(v, &path, false)?,
            "tools" => check_tools(v, &path)?,
            "tool_choice" => check_tool_choice(v, &path)?,
            "max_output_tokens" => check_max_tokens(v, &path)?,
            "truncation" if !v.is_object() => {
                one_of(v, &path, &["auto", "disabled"])?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The `response` overrides of a `response.create`.
fn check_response(r: &Obj) -> Result<(), ApiError> {
    known(r, "response", RESPONSE_KEYS)?;
    for (key, v) in r {
        let path = format!("response.{key}");
        match key.as_str() {
            "instructions" => {
                string(v, &path)?;
            }
            "output_modalities" => check_modalities(v, &path)?,
            "audio" => check_audio(v, &path, true)?,
            "tools" => check_tools(v, &path)?,
            "tool_choice" => check_tool_choice(v, &path)?,
            "max_output_tokens" => check_max_tokens(v, &path)?,
            "conversation" => {
                one_of(v, &path, &["auto", "none"])?;
            }
            "input" if !v.is_array() => return Err(ApiError::invalid_type(&path, "an array", v)),
            "metadata" if !v.is_object() && !v.is_null() => {
                return Err(ApiError::invalid_type(&path, "an object", v));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_modalities(v: &Value, path: &str) -> Result<(), ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::invalid_type(path, "an array", v))?;
    for (i, m) in list.iter().enumerate() {
        one_of(m, &format!("{path}[{i}]"), &["audio", "text"])?;
    }
    if list.len() != 1 {
        let shown: Vec<String> = list.iter().map(shown).collect();
        return Err(ApiError::new(
            Some("invalid_value"),
            format!(
                "Invalid modalities: [{}]. Supported combinations are: ['text'] and ['audio'].",
                shown.join(", ")
            ),
            Some(path),
        ));
    }
    Ok(())
}

fn check_audio(v: &Value, path: &str, response: bool) -> Result<(), ApiError> {
    let audio = object(v, path)?;
    known(
        audio,
        path,
        if response {
            &["output"]
        } else {
            &["input", "output"]
        },
    )?;
    if let Some(input) = audio.get("input") {
        let path = format!("{path}.input");
        let input = object(input, &path)?;
        known(
            input,
            &path,
            &[
                "format",
                "transcription",
                "noise_reduction",
                "turn_detection",
            ],
        )?;
        if let Some(f) = input.get("format") {
            check_format(f, &format!("{path}.format"))?;
        }
        if let Some(t) = input.get("transcription").filter(|t| !t.is_null()) {
            let p = format!("{path}.transcription");
            let t = object(t, &p)?;
            known(t, &p, &["model", "language", "prompt"])?;
            for (k, v) in t {
                string(v, &format!("{p}.{k}"))?;
            }
        }
        if let Some(n) = input.get("noise_reduction").filter(|n| !n.is_null()) {
            let p = format!("{path}.noise_reduction");
            let n = object(n, &p)?;
            known(n, &p, &["type"])?;
            let ty = n
                .get("type")
                .ok_or_else(|| ApiError::missing(&format!("{p}.type")))?;
            one_of(ty, &format!("{p}.type"), &["near_field", "far_field"])?;
        }
        if let Some(t) = input.get("turn_detection") {
            check_turn_detection(t, &format!("{path}.turn_detection"))?;
        }
    }
    if let Some(output) = audio.get("output") {
        let path = format!("{path}.output");
        let output = object(output, &path)?;
        let allowed: &[&str] = if response {
            &["format", "voice"]
        } else {
            &["format", "voice", "speed"]
        };
        known(output, &path, allowed)?;
        if let Some(f) = output.get("format") {
            check_format(f, &format!("{path}.format"))?;
        }
        if let Some(voice) = output.get("voice") {
            let p = format!("{path}.voice");
            if let Some(custom) = voice.as_object() {
                known(custom, &p, &["id"])?;
                let id = custom
                    .get("id")
                    .ok_or_else(|| ApiError::missing(&format!("{p}.id")))?;
                string(id, &format!("{p}.id"))?;
            } else {
                one_of(voice, &p, VOICES)?;
            }
        }
        if let Some(speed) = output.get("speed") {
            number(speed, &format!("{path}.speed"), 0.25, 1.5)?;
        }
    }
    Ok(())
}

fn check_format(v: &Value, path: &str) -> Result<Format, ApiError> {
    let f = object(v, path)?;
    known(f, path, &["type", "rate"])?;
    let ty = f
        .get("type")
        .ok_or_else(|| ApiError::missing(&format!("{path}.type")))?;
    let ty = one_of(
        ty,
        &format!("{path}.type"),
        &["audio/pcm", "audio/pcmu", "audio/pcma"],
    )?;
    if let Some(rate) = f.get("rate") {
        if ty != "audio/pcm" {
            return Err(ApiError::unknown(&format!("{path}.rate")));
        }
        if rate.as_u64() != Some(24_000) {
            return Err(ApiError::new(
                Some("invalid_value"),
                format!(
                    "Invalid value: {}. Supported values are: 24000.",
                    shown(rate)
                ),
                Some(&format!("{path}.rate")),
            ));
        }
    }
    Format::from_json(v).ok_or_else(|| ApiError::invalid_type(path, "an audio format", v))
}

fn check_turn_detection(v: &Value, path: &str) -> Result<(), ApiError> {
    if v.is_null() {
        return Ok(());
    }
    let td = object(v, path)?;
    let ty = td
        .get("type")
        .ok_or_else(|| ApiError::missing(&format!("{path}.type")))?;
    let ty = one_of(ty, &format!("{path}.type"), &["server_vad", "semantic_vad"])?;
    if ty == "server_vad" {
        known(
            td,
            path,
            &[
                "type",
                "threshold",
                "prefix_padding_ms",
                "silence_duration_ms",
                "idle_timeout_ms",
                "create_response",
                "interrupt_response",
            ],
        )?;
    } else {
        known(
            td,
            path,
            &["type", "eagerness", "create_response", "interrupt_response"],
        )?;
    }
    for (key, v) in td {
        let p = format!("{path}.{key}");
        match key.as_str() {
            "threshold" => {
                number(v, &p, 0.0, 1.0)?;
            }
            "prefix_padding_ms" | "silence_duration_ms" => {
                integer(v, &p, 0, i64::MAX)?;
            }
            "idle_timeout_ms" if !v.is_null() => {
                integer(v, &p, 0, i64::MAX)?;
            }
            "create_response" | "interrupt_response" => {
                boolean(v, &p)?;
            }
            "eagerness" => {
                one_of(v, &p, &["low", "medium", "high", "auto"])?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_tools(v: &Value, path: &str) -> Result<(), ApiError> {
    let tools = v
        .as_array()
        .ok_or_else(|| ApiError::invalid_type(path, "an array", v))?;
    for (i, tool) in tools.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let t = object(tool, &p)?;
        let ty = t.get("type").map_or(Ok("function"), |ty| {
            one_of(ty, &format!("{p}.type"), &["function", "mcp"])
        })?;
        if ty == "function" {
            known(t, &p, &["type", "name", "description", "parameters"])?;
            let name = t
                .get("name")
                .ok_or_else(|| ApiError::missing(&format!("{p}.name")))?;
            string(name, &format!("{p}.name"))?;
            if let Some(d) = t.get("description") {
                string(d, &format!("{p}.description"))?;
            }
            if let Some(params) = t.get("parameters") {
                object(params, &format!("{p}.parameters"))?;
            }
        }
    }
    Ok(())
}

fn check_tool_choice(v: &Value, path: &str) -> Result<(), ApiError> {
    if let Some(choice) = v.as_object() {
        let ty = choice
            .get("type")
            .ok_or_else(|| ApiError::missing(&format!("{path}.type")))?;
        if one_of(ty, &format!("{path}.type"), &["function", "mcp"])? == "function" {
            known(choice, path, &["type", "name"])?;
            let name = choice
                .get("name")
                .ok_or_else(|| ApiError::missing(&format!("{path}.name")))?;
            string(name, &format!("{path}.name"))?;
        }
        return Ok(());
    }
    one_of(v, path, &["auto", "none", "required"]).map(|_| ())
}

fn check_max_tokens(v: &Value, path: &str) -> Result<(), ApiError> {
    if v.as_str() == Some("inf") {
        return Ok(());
    }
    if v.is_string() {
        return Err(ApiError::invalid_value(path, v, &["inf"]));
    }
    integer(v, path, 1, 4096).map(|_| ())
}

/// A `conversation.item.create` item: kind, content as echoed, text, audio ms.
fn check_item(item: &Obj, input: Format) -> Result<(ItemKind, Value, String, u64), ApiError> {
    let ty = item
        .get("type")
        .ok_or_else(|| ApiError::missing("item.type"))?;
    let ty = one_of(
        ty,
        "item.type",
        &["message", "function_call", "function_call_output"],
    )?;
    let required_string = |key: &str| -> Result<String, ApiError> {
        let path = format!("item.{key}");
        let v = item.get(key).ok_or_else(|| ApiError::missing(&path))?;
        string(v, &path).map(str::to_owned)
    };
    match ty {
        "function_call" => {
            known(
                item,
                "item",
                &[
                    "id",
                    "type",
                    "object",
                    "status",
                    "call_id",
                    "name",
                    "arguments",
                ],
            )?;
            let kind = ItemKind::FunctionCall {
                call_id: required_string("call_id")?,
                name: required_string("name")?,
                arguments: required_string("arguments")?,
            };
            Ok((kind, Value::Null, String::new(), 0))
        }
        "function_call_output" => {
            known(
                item,
                "item",
                &["id", "type", "object", "status", "call_id", "output"],
            )?;
            let kind = ItemKind::FunctionCallOutput {
                call_id: required_string("call_id")?,
                output: required_string("output")?,
            };
            Ok((kind, Value::Null, String::new(), 0))
        }
        _ => {
            known(
                item,
                "item",
                &["id", "type", "object", "status", "role", "content"],
            )?;
            let role = item
                .get("role")
                .ok_or_else(|| ApiError::missing("item.role"))?;
            let role = match one_of(role, "item.role", &["user", "assistant", "system"])? {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                _ => Role::System,
            };
            let content = item
                .get("content")
                .ok_or_else(|| ApiError::missing("item.content"))?;
            let parts = content
                .as_array()
                .ok_or_else(|| ApiError::invalid_type("item.content", "an array", content))?;
            let allowed: &[&str] = match role {
                Role::User => &["input_text", "input_audio", "input_image"],
                Role::System => &["input_text"],
                // The service "cannot populate assistant audio messages".
                Role::Assistant => &["output_text"],
            };
            let mut text = String::new();
            let mut audio_ms = 0;
            for (i, part) in parts.iter().enumerate() {
                let p = format!("item.content[{i}]");
                let part = object(part, &p)?;
                let ty = part
                    .get("type")
                    .ok_or_else(|| ApiError::missing(&format!("{p}.type")))?;
                let ty = one_of(ty, &format!("{p}.type"), allowed)?;
                match ty {
                    "input_text" | "output_text" => {
                        known(part, &p, &["type", "text"])?;
                        let t = part
                            .get("text")
                            .ok_or_else(|| ApiError::missing(&format!("{p}.text")))?;
                        text.push_str(string(t, &format!("{p}.text"))?);
                    }
                    "input_audio" => {
                        known(part, &p, &["type", "audio", "transcript"])?;
                        if let Some(a) = part.get("audio") {
                            let a = string(a, &format!("{p}.audio"))?;
                            let bytes = BASE64_STANDARD.decode(a).map_err(|_| {
                                ApiError::new(
                                    Some("invalid_value"),
                                    format!(
                                        "Invalid '{p}.audio': expected base64-encoded audio bytes."
                                    ),
                                    Some(&format!("{p}.audio")),
                                )
                            })?;
                            audio_ms += input.ms(bytes.len());
                        }
                        if let Some(t) = part.get("transcript").filter(|t| !t.is_null()) {
                            text.push_str(string(t, &format!("{p}.transcript"))?);
                        }
                    }
                    _ => {
                        known(part, &p, &["type", "image_url", "detail"])?;
                    }
                }
            }
            Ok((ItemKind::Message { role }, content.clone(), text, audio_ms))
        }
    }
}

fn object<'v>(v: &'v Value, path: &str) -> Result<&'v Obj, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::invalid_type(path, "an object", v))
}

fn known(obj: &Obj, path: &str, allowed: &[&str]) -> Result<(), ApiError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(ApiError::unknown(&format!("{path}.{key}"))),
        None => Ok(()),
    }
}

fn string<'v>(v: &'v Value, path: &str) -> Result<&'v str, ApiError> {
    v.as_str()
        .ok_or_else(|| ApiError::invalid_type(path, "a string", v))
}

fn boolean(v: &Value, path: &str) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| ApiError::invalid_type(path, "a boolean", v))
}

fn one_of<'v>(v: &'v Value, path: &str, allowed: &[&str]) -> Result<&'v str, ApiError> {
    let s = string(v, path)?;
    if allowed.contains(&s) {
        Ok(s)
    } else {
        Err(ApiError::invalid_value(path, v, allowed))
    }
}

fn number(v: &Value, path: &str, min: f64, max: f64) -> Result<f64, ApiError> {
    let n = v
        .as_f64()
        .ok_or_else(|| ApiError::invalid_type(path, "a decimal", v))?;
    if n > max {
        return Err(ApiError::new(
            Some("decimal_above_max_value"),
            format!(
                "Invalid '{path}': decimal above maximum value. Expected a value <= {max}, but \
                 got {v} instead."
            ),
            Some(path),
        ));
    }
    if n < min {
        return Err(ApiError::new(
            Some("decimal_below_min_value"),
            format!(
                "Invalid '{path}': decimal below minimum value. Expected a value >= {min}, but \
                 got {v} instead."
            ),
            Some(path),
        ));
    }
    Ok(n)
}

fn integer(v: &Value, path: &str, min: i64, max: i64) -> Result<i64, ApiError> {
    let n = v
        .as_i64()
        .ok_or_else(|| ApiError::invalid_type(path, "an integer", v))?;
    if n > max {
        return Err(ApiError::new(
            Some("integer_above_max_value"),
            format!(
                "Invalid '{path}': integer above maximum value. Expected a value <= {max}, but \
                 got {n} instead."
            ),
            Some(path),
        ));
    }
    if n < min {
        return Err(ApiError::new(
            Some("integer_below_min_value"),
            format!(
                "Invalid '{path}': integer below minimum value. Expected a value >= {min}, but \
                 got {n} instead."
            ),
            Some(path),
        ));
    }
    Ok(n)
}

/// How the API names a JSON type in `invalid_type` messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as the API quotes it in messages: strings in single quotes.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}

/// `'a'`, `'a' and 'b'`, `'a', 'b', and 'c'`.
fn list(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}

// ---------------------------------------------------------------------------------------------
// Session object, merge, ids, text helpers
// ---------------------------------------------------------------------------------------------

/// The session a connection starts with, as the service's `session.created` shows it.
fn default_session(id: &str, model: &str, expires_at: u64) -> Value {
    json!({
        "type": "realtime",
        "object": "realtime.session",
        "id": id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": null,
        "truncation": "auto",
        "prompt": null,
        "expires_at": expires_at,
        "include": null,
        "audio": {
            "input": {
                "format": Format::Pcm24k.json(),
                "transcription": null,
                "noise_reduction": null,
                "turn_detection": turn_detection_defaults("server_vad"),
            },
            "output": {
                "format": Format::Pcm24k.json(),
                "voice": "marin",
                "speed": 1.0,
            },
        },
    })
}

fn turn_detection_defaults(kind: &str) -> Value {
    if kind == "semantic_vad" {
        json!({"type": "semantic_vad", "eagerness": "auto", "create_response": true,
               "interrupt_response": true})
    } else {
        // silence_duration_ms: the captured session.created default (200), not the docstring's.
        json!({"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
               "silence_duration_ms": 200, "idle_timeout_ms": null, "create_response": true,
               "interrupt_response": true})
    }
}

/// The effective session after a (validated) update: only the fields present change; `audio`
/// merges per direction and field; `turn_detection` is replaced, defaults filled in; `model`
/// stays what the URL chose.
fn merge_session(current: &Value, update: &Obj) -> Value {
    let mut merged = current.clone();
    let Some(m) = merged.as_object_mut() else {
        return merged;
    };
    for (key, value) in update {
        match key.as_str() {
            "model" => {}
            "audio" => {
                for dir in ["input", "output"] {
                    let Some(fields) = value.get(dir).and_then(Value::as_object) else {
                        continue;
                    };
                    let target = m
                        .entry("audio")
                        .or_insert_with(|| json!({}))
                        .as_object_mut()
                        .and_then(|a| a.entry(dir).or_insert_with(|| json!({})).as_object_mut());
                    let Some(target) = target else { continue };
                    for (field, v) in fields {
                        let v = match field.as_str() {
                            "format" => {
                                Format::from_json(v).map_or_else(|| v.clone(), Format::json)
                            }
                            "turn_detection" if v.is_object() => {
                                let mut td =
                                    turn_detection_defaults(v["type"].as_str().unwrap_or(""));
                                if let (Some(td), Some(given)) = (td.as_object_mut(), v.as_object())
                                {
                                    for (k, x) in given {
                                        td.insert(k.clone(), x.clone());
                                    }
                                }
                                td
                            }
                            _ => v.clone(),
                        };
                        target.insert(field.clone(), v);
                    }
                }
            }
            _ => {
                m.insert(key.clone(), value.clone());
            }
        }
    }
    merged
}

/// Ids that look like the service's: a prefix and random alphanumerics.
struct Ids {
    state: u64,
}

impl Ids {
    fn new() -> Self {
        static SEED: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let state = SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ nanos;
        Self { state: state | 1 }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn make(&mut self, prefix: &str, len: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut id = String::with_capacity(prefix.len() + len);
        id.push_str(prefix);
        for _ in 0..len {
            id.push(ALPHABET[(self.next() % ALPHABET.len() as u64) as usize] as char);
        }
        id
    }

    fn event(&mut self) -> String {
        self.make("event_", 21)
    }
}

/// Text tokens for this many characters (about four per token).
fn tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// Splits `text` into at most `parts` pieces at word starts; the pieces concatenate to `text`.
fn split_words(text: &str, parts: usize) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    // Words with their leading whitespace: "Hello", " there", "!".
    let mut words = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if !in_space && i > start {
                words.push(&text[start..i]);
                start = i;
            }
            in_space = true;
        } else {
            in_space = false;
        }
    }
    words.push(&text[start..]);
    let parts = parts.clamp(1, words.len());
    let mut out = vec![String::new(); parts];
    for (j, w) in words.iter().enumerate() {
        out[j * parts / words.len()].push_str(w);
    }
    out
}

/// Splits `text` into pieces of at most `n` characters.
fn split_chars(text: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in text.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            out.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// Masks a key as the API's error message does: the start and the last four characters.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Core {
        let request = Request {
            path: "/v1/realtime".to_owned(),
            query_pairs: vec![("model".to_owned(), "gpt-realtime".to_owned())],
            headers: Vec::new(),
        };
        Core::new(&DoubleConfig::default(), &request)
    }

    /// Every queued event, parsed, and the queue emptied.
    fn sent(core: &mut Core) -> Vec<Value> {
        core.out
            .drain(..)
            .filter_map(|o| match o {
                Out::Event(text) => serde_json::from_str(&text).ok(),
                Out::Close(..) => None,
            })
            .collect()
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().filter_map(|e| e["type"].as_str()).collect()
    }

    #[test]
    fn split_words_keeps_every_character() {
        let text = "Hello there, how are you today?";
        for parts in 1..10 {
            let pieces = split_words(text, parts);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.len() <= parts);
        }
        assert_eq!(split_words("", 3), Vec::<String>::new());
        assert_eq!(split_chars("abcdefg", 3), vec!["abc", "def", "g"]);
        assert_eq!(split_chars("", 3), Vec::<&str>::new());
    }

    #[test]
    fn list_and_mask_read_like_the_api() {
        assert_eq!(list(&["a"]), "'a'");
        assert_eq!(list(&["a", "b"]), "'a' and 'b'");
        assert_eq!(list(&["a", "b", "c"]), "'a', 'b', and 'c'");
        assert_eq!(mask_key("sk-wrong-key-1234"), "sk-**********1234");
        assert_eq!(percent_decode("gpt%2Drealtime+x"), "gpt-realtime x");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn session_created_comes_first_and_ids_look_like_the_service() {
        let mut core = core();
        let events = sent(&mut core);
        assert_eq!(types(&events), ["session.created"]);
        let id = events[0]["event_id"].as_str().unwrap();
        assert!(id.starts_with("event_") && id.len() == 27, "{id}");
        assert!(
            events[0]["session"]["id"]
                .as_str()
                .unwrap()
                .starts_with("sess_")
        );
        assert_eq!(events[0]["session"]["model"], "gpt-realtime");
    }

    #[test]
    fn session_update_merges_audio_and_fills_turn_detection_defaults() {
        let mut core = core();
        sent(&mut core);
        core.handle_text(
            &json!({"type": "session.update", "session": {"type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcmu"},
                                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}})
            .to_string(),
        );
        let events = sent(&mut core);
        assert_eq!(types(&events), ["session.updated"]);
        let s = &events[0]["session"];
        assert_eq!(s["audio"]["input"]["format"], json!({"type": "audio/pcmu"}));
        assert_eq!(s["audio"]["output"]["format"], Format::Pcm24k.json());
        assert_eq!(
            s["audio"]["input"]["turn_detection"]["silence_duration_ms"],
            500
        );
        assert_eq!(
            s["audio"]["input"]["turn_detection"]["interrupt_response"],
            true
        );
        assert_eq!(core.input_format(), Format::Pcmu);
    }

    #[test]
    fn validation_errors_name_the_parameter() {
        let cases = [
            (
                json!({"session": {"type": "realtime", "audio": {"input": {"format": "g711_ulaw"}}}}),
                "invalid_type",
                "session.audio.input.format",
            ),
            (
                json!({"session": {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}}),
                "invalid_value",
                "session.audio.output.format.rate",
            ),
            (
                json!({"session": {"type": "realtime", "output_modalities": ["audio", "text"]}}),
                "invalid_value",
                "session.output_modalities",
            ),
            (
                json!({"session": {"type": "realtime", "audio": {"output": {"voice": "bob"}}}}),
                "invalid_value",
                "session.audio.output.voice",
            ),
            (
                json!({"session": {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}}}),
                "decimal_above_max_value",
                "session.audio.input.turn_detection.threshold",
            ),
            (
                json!({"session": {"type": "realtime", "tool_choice": {"type": "function", "function": {"name": "x"}}}}),
                "unknown_parameter",
                "session.tool_choice.function",
            ),
            (
                json!({"session": {"type": "realtime", "temperature": 0.8}}),
                "unknown_parameter",
                "session.temperature",
            ),
        ];
        for (mut event, code, param) in cases {
            let mut core = core();
            sent(&mut core);
            event["type"] = json!("session.update");
            core.handle_text(&event.to_string());
            let events = sent(&mut core);
            assert_eq!(types(&events), ["error"], "{event}");
            assert_eq!(events[0]["error"]["code"], code, "{event}: {}", events[0]);
            assert_eq!(events[0]["error"]["param"], param, "{event}");
        }
    }

    #[test]
    fn an_insert_before_a_streaming_item_does_not_misdirect_its_audio() {
        let mut core = core();
        core.begin_response(None);
        let spoken = core.open_message();
        core.stream(&Format::Pcm24k.silence(100), "One");
        core.handle_text(
            &json!({"type": "conversation.item.create", "previous_item_id": "root",
                    "item": {"type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": "Earlier."}]}})
            .to_string(),
        );
        core.stream(&Format::Pcm24k.silence(200), " two");
        // Truncating the streaming item keeps what was sent on record.
        core.handle_text(
            &json!({"type": "conversation.item.truncate", "item_id": spoken.item_id,
                    "content_index": 0, "audio_end_ms": 250})
            .to_string(),
        );
        core.stream(&Format::Pcm24k.silence(100), " three");
        core.finish_response("completed", None);
        let events = sent(&mut core);
        assert!(!types(&events).contains(&"error"), "{events:?}");
        let item = &core.items[1].item;
        assert_eq!(item.id, spoken.item_id);
        assert_eq!(item.text, "One two three");
        assert_eq!((item.audio_ms, item.truncated_ms), (400, Some(250)));
        assert_eq!(core.items[1].format.ms(core.items[1].audio_bytes), 350);
        assert_eq!(core.items[0].item.text, "Earlier.");
        assert_eq!(core.items[0].item.audio_ms, 0);
        let done = events.last().unwrap();
        assert_eq!(done["response"]["output"][0]["id"], spoken.item_id.as_str());
    }

    #[test]
    fn usage_counts_context_and_output() {
        let mut core = core();
        sent(&mut core);
        core.begin_response(None);
        let spoken = core
            .speak(&Format::Pcm24k.silence(1000), "Hello there.")
            .unwrap();
        let events = sent(&mut core);
        let done = events.last().unwrap();
        assert_eq!(done["type"], "response.done");
        let usage = &done["response"]["usage"];
        assert_eq!(usage["output_token_details"]["audio_tokens"], 20);
        assert_eq!(usage["output_token_details"]["text_tokens"], 3);
        assert!(usage["input_tokens"].as_u64().unwrap() > 100);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
        );
        assert_eq!(core.items[0].item.id, spoken.item_id);
        assert_eq!(core.items[0].item.audio_ms, 1000);
    }
}
