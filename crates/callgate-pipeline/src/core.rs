//! The conversation core of one `pipeline` call, in quinn-proto's shape: time passed in as the
//! call clock's milliseconds, `handle_*` for inputs, [`Core::poll_output`] and
//! [`Core::poll_timeout`] for outputs; no channels, atomics, runtime types or clock inside.
//!
//! - **Turns** from per-frame voice activity: speech that stays silent for `end_of_speech`
//!   ends the caller's turn; its audio goes to speech-to-text.
//! - **Answers** stream: each sentence of the LLM's answer goes to text-to-speech as soon as it
//!   is complete, and its audio to the call as it arrives; the next sentence is synthesized
//!   while the current one plays (one ahead, its audio held), so sentences follow without a
//!   gap.
//! - **Pause, resume, barge-in**: caller speech over the agent for `min_barge_in` pauses the
//!   answer at once (the playout is cleared, the answer's audio held). When the transcript is
//!   only backchannels the answer resumes from the position the call reported; otherwise the
//!   held audio is dropped, the running LLM and TTS requests are cancelled, and each assistant
//!   message of the answer (one per tool round) is cut to what was heard of it.
//! - **Tools**: `hang_up` ends the call once the goodbye has played (the LLM is not asked
//!   again); other tools' results go back to the LLM.
//! - **Failures**: a provider failing is retried once where safe (nothing of its answer used
//!   yet), then the fallback message plays and the call hangs up; the record says why.
//! - **The record**: transcript turns on the call clock, a `turn_latency` event per answer,
//!   usage at the end.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use callgate_agent::{AgentCommand, MarkState, RecordEvent, Speaker, Turn};
use callgate_audio::AudioFormat;
use callgate_proto::{Digit, DtmfDuration, Protocol};
use serde_json::{Value, json};

use crate::chat::{Answer, ToolCall};
use crate::heard::{self, Spoken};
use crate::sentences::Splitter;

/// The longest caller turn sent to speech-to-text, ms (a longer one is ended there).
pub const MAX_TURN_MS: u64 = 30_000;
/// The most tool rounds (LLM asked again after tools) in one answer.
pub const MAX_TOOL_ROUNDS: u32 = 4;
/// A sentence longer than this many characters is cut at a clause for speech.
pub const MAX_SENTENCE_CHARS: usize = 160;
/// What ends an answer's text cut by a barge-in, for the LLM to read.
pub const CUT_MARKER: &str = "…";
/// How long CallBridge has to drop the line after accepting `agent_terminate` (it announces
/// first); then the call hangs up itself, ms.
pub const TERMINATE_GRACE_MS: u64 = 60_000;
/// One key's tone pressed with `send_dtmf`, ms (then a 60 ms gap).
pub const TONE_MS: u32 = 100;

/// How the core is set up (from the route's settings).
#[derive(Debug, Clone)]
pub struct Config {
    /// The system prompt, rendered for this call.
    pub instructions: String,
    /// Spoken at the answer and the assistant's first message (empty: none).
    pub greeting: String,
    /// Silence that ends the caller's turn, ms.
    pub end_of_speech_ms: u64,
    /// Speech over the agent this long pauses it, ms.
    pub min_barge_in_ms: u64,
    /// Words that never interrupt (compared normalised).
    pub backchannels: Vec<String>,
    /// The tools' declarations for the LLM (chat completions form).
    pub tools: Vec<Value>,
    /// Bytes of the call's output audio per ms.
    pub output_bytes_per_ms: u64,
    /// Caller audio samples per ms.
    pub input_samples_per_ms: u64,
    /// The longest call, ms.
    pub max_duration_ms: u64,
    /// The call's protocol: `send_dtmf` presses keys as protocol DTMF on inbound calls and as
    /// in-band tones on CallBridge and Twilio calls.
    pub protocol: Protocol,
    /// The call's output audio format (for in-band tones).
    pub output_format: AudioFormat,
}

/// A request to a provider.
pub type ReqId = u64;

/// Which provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Speech-to-text.
    Stt,
    /// The LLM.
    Llm,
    /// Text-to-speech.
    Tts,
}

impl Provider {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stt => "stt",
            Self::Llm => "llm",
            Self::Tts => "tts",
        }
    }
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Transcribe the caller's turn (16-bit mono PCM at the input rate).
    Transcribe {
        /// The request.
        req: ReqId,
        /// The samples.
        samples: Vec<i16>,
    },
    /// Ask the LLM (streaming) with these chat messages.
    Complete {
        /// The request.
        req: ReqId,
        /// The conversation.
        messages: Vec<Value>,
    },
    /// Speak this text (audio back through [`Core::handle_tts_audio`]).
    Speak {
        /// The request.
        req: ReqId,
        /// The sentence.
        text: String,
    },
    /// Abandon a running request (its answers are ignored if they still come).
    Cancel {
        /// The request.
        req: ReqId,
    },
    /// Run a tool the model called (not `hang_up`: the core does that).
    Tool(ToolCall),
    /// Clear the call's playout now (its report comes back as `handle_cleared`).
    Clear,
    /// A command for the call.
    Command(AgentCommand),
    /// Play the fallback message, then hang up.
    Fallback,
}

/// A provider's failure, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened (timeout, HTTP 503, refused...).
    pub reason: String,
    /// Whether asking again may help (timeouts, 5xx, refused connections; not 4xx).
    pub retryable: bool,
}

/// One running provider request.
#[derive(Debug, Clone, PartialEq)]
struct Running {
    req: ReqId,
    provider: Provider,
    /// Whether this is the retry already.
    retried: bool,
    /// Whether any of its answer was used (then a retry would repeat it).
    used: bool,
}

/// The caller's side of the turn.
#[derive(Debug, Clone, PartialEq)]
enum Caller {
    /// Silent.
    Quiet,
    /// Speaking since `start_ms`; the last voiced frame ended at `last_voice_ms`.
    Speaking {
        start_ms: u64,
        last_voice_ms: u64,
        samples: Vec<i16>,
    },
}

/// The phase of the call: a hangup cannot be undone by a later event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live,
    /// CallBridge accepted `agent_terminate`: it announces and drops the line; what is queued
    /// plays, the caller is not listened to and the LLM is not asked again. If the line is
    /// still up at `until_ms`, the call hangs up itself.
    Terminating {
        until_ms: u64,
    },
    /// Done: nothing more is asked of anyone.
    Over,
}

/// What an answer plays, in order; `round` is the LLM round (one per tool round) it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// A sentence for text-to-speech.
    Sentence { text: String, round: u32 },
    /// Keys pressed with `send_dtmf`, after what was said before the call of the tool.
    Keys { keys: Vec<Digit>, round: u32 },
}

/// The sentence whose audio goes to the call as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Playing {
    req: ReqId,
    text: String,
    round: u32,
    /// Its audio so far, bytes.
    bytes: u64,
}

/// The next sentence, synthesized while the current one plays (no gap between them): its
/// audio is held until the current sentence is done.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ahead {
    req: ReqId,
    text: String,
    round: u32,
    audio: Vec<u8>,
    /// Its speech request finished.
    done: bool,
}

/// The answer being spoken.
#[derive(Debug)]
struct Speech {
    splitter: Splitter,
    /// Sentences (and keys) waiting for speech.
    queue: VecDeque<Item>,
    /// The sentence being spoken.
    speaking: Option<Playing>,
    /// The next one, synthesized ahead.
    ahead: Option<Ahead>,
    /// Sentences spoken (text and audio length), with their round.
    spoken: Vec<(u32, Spoken)>,
    /// The LLM round now streaming (0, then one more after each tool round).
    round: u32,
    /// Every byte of this answer's audio (held for a resume after a pause).
    audio: Vec<u8>,
    /// The mark sent before its first byte, and the call's played count there once reached.
    start_mark: Option<(u64, Option<u64>)>,
    /// A clear was asked for and the call has not reported it yet.
    clear_pending: bool,
    /// Paused: the caller talks over it; audio held.
    paused: bool,
    /// Heard of it, ms, as of the last clear.
    heard_ms: u64,
    /// The LLM finished (no more sentences will come).
    text_done: bool,
    /// The end mark, once every sentence was sent.
    end_mark: Option<u64>,
    /// The conversation messages holding this answer, one per round finished (to cut them).
    messages: Vec<(u32, usize)>,
    /// Text of the answer so far.
    text: String,
    /// The first audio's time on the call clock.
    first_audio_ms: Option<u64>,
    /// `hang_up` was called in this answer.
    hang_up: bool,
    /// The conversation messages holding `hang_up`'s results (rewritten if the caller
    /// interrupts the goodbye: the call did not end).
    hang_up_results: Vec<usize>,
}

impl Speech {
    fn new() -> Self {
        Self {
            splitter: Splitter::new(MAX_SENTENCE_CHARS),
            queue: VecDeque::new(),
            speaking: None,
            ahead: None,
            spoken: Vec::new(),
            round: 0,
            audio: Vec::new(),
            start_mark: None,
            clear_pending: false,
            paused: false,
            heard_ms: 0,
            text_done: false,
            end_mark: None,
            messages: Vec::new(),
            text: String::new(),
            first_audio_ms: None,
            hang_up: false,
            hang_up_results: Vec::new(),
        }
    }
}

/// Latency of one answer, from the end of the caller's speech.
#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    end_of_speech_ms: u64,
    detected_after_ms: u64,
    stt_ms: Option<u64>,
    llm_first_token_ms: Option<u64>,
    tts_first_audio_ms: Option<u64>,
    first_frame_ms: Option<u64>,
}

/// Usage of the whole call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Caller audio sent to speech-to-text, ms.
    pub stt_ms: u64,
    /// LLM input tokens.
    pub llm_input_tokens: u64,
    /// LLM output tokens.
    pub llm_output_tokens: u64,
    /// Characters sent to text-to-speech.
    pub tts_characters: u64,
}

/// The conversation core of one call.
#[derive(Debug)]
pub struct Core {
    config: Config,
    /// When the call began: times are kept as ms since then (the call clock).
    origin: Instant,
    phase: Phase,
    caller: Caller,
    messages: Vec<Value>,
    running: Vec<Running>,
    speech: Option<Speech>,
    /// The caller's turn waiting for its transcript: (request, start, end).
    turn: Option<(ReqId, u64, u64)>,
    latency: Option<Latency>,
    usage: Usage,
    tool_rounds: u32,
    /// Tool calls waiting for results.
    tools_pending: Vec<ToolCall>,
    /// The caller's words, waiting for the call's report of the clear they caused.
    awaiting_clear: Option<String>,
    /// The last turn's samples, kept for one retry of its transcription.
    last_samples: Vec<i16>,
    next_req: u64,
    next_mark: u64,
    out: VecDeque<Output>,
}

impl Core {
    /// A core for a call that began at `origin` (the zero of the call clock's ms: `at_ms`,
    /// `Config::max_duration_ms`), answered at `now`: the greeting (if any) is spoken first.
    pub fn new(config: Config, origin: Instant, now: Instant) -> Self {
        let now =
            u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX);
        let mut core = Self {
            origin,
            messages: vec![json!({"role": "system", "content": config.instructions})],
            config,
            phase: Phase::Live,
            caller: Caller::Quiet,
            running: Vec::new(),
            speech: None,
            turn: None,
            latency: None,
            usage: Usage::default(),
            tool_rounds: 0,
            tools_pending: Vec::new(),
            last_samples: Vec::new(),
            awaiting_clear: None,
            next_req: 1,
            next_mark: 1,
            out: VecDeque::new(),
        };
        let greeting = core.config.greeting.trim().to_owned();
        if !greeting.is_empty() {
            let mut speech = Speech::new();
            speech.splitter.push(&greeting);
            speech.text = greeting.clone();
            speech.text_done = true;
            core.messages
                .push(json!({"role": "assistant", "content": greeting}));
            speech.messages.push((0, core.messages.len() - 1));
            core.speech = Some(speech);
            core.pump_speech(now);
        }
        core
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Core::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timeout_ms()
            .map(|ms| self.origin + std::time::Duration::from_millis(ms))
    }

    /// `now` on the call clock: ms since the call began.
    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// When [`Core::handle_timeout`] is due, on the call clock.
    fn timeout_ms(&self) -> Option<u64> {
        if self.phase == Phase::Over {
            return None;
        }
        let turn_end = match &self.caller {
            Caller::Speaking { last_voice_ms, .. } => {
                Some(last_voice_ms + self.config.end_of_speech_ms)
            }
            Caller::Quiet => None,
        };
        let limit = match self.phase {
            Phase::Terminating { until_ms } => until_ms.min(self.config.max_duration_ms),
            _ => self.config.max_duration_ms,
        };
        Some(turn_end.map_or(limit, |t| t.min(limit)))
    }

    /// Whether the call is over for the core.
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// The usage so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The conversation as the LLM will read it.
    pub fn messages(&self) -> &[Value] {
        &self.messages
    }

    /// One frame of caller audio (`samples` at the input rate) ending at `now`, and whether
    /// it holds speech.
    pub fn handle_audio(&mut self, now: Instant, samples: &[i16], voiced: bool) {
        let now = self.ms(now);
        if self.phase != Phase::Live {
            return;
        }
        match &mut self.caller {
            Caller::Quiet if voiced => {
                let frame_ms = samples.len() as u64 / self.config.input_samples_per_ms.max(1);
                self.caller = Caller::Speaking {
                    start_ms: now.saturating_sub(frame_ms),
                    last_voice_ms: now,
                    samples: samples.to_vec(),
                };
            }
            Caller::Quiet => return,
            Caller::Speaking {
                last_voice_ms,
                samples: held,
                ..
            } => {
                held.extend_from_slice(samples);
                if voiced {
                    *last_voice_ms = now;
                }
            }
        }
        let Caller::Speaking {
            start_ms,
            last_voice_ms,
            samples: held,
        } = &self.caller
        else {
            return;
        };
        let (start_ms, last_voice_ms) = (*start_ms, *last_voice_ms);
        let long = held.len() as u64 >= MAX_TURN_MS * self.config.input_samples_per_ms;
        if long {
            self.end_turn(now);
            return;
        }
        if last_voice_ms.saturating_sub(start_ms) >= self.config.min_barge_in_ms {
            self.pause(now);
        }
    }

    /// Time passed: a turn may have ended, the call may have lasted long enough.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.ms(now);
        if self.phase == Phase::Over {
            return;
        }
        if now >= self.config.max_duration_ms {
            self.record(
                "max_duration",
                json!({"after_ms": self.config.max_duration_ms}),
            );
            self.hang_up_now();
            return;
        }
        if let Phase::Terminating { until_ms } = self.phase
            && now >= until_ms
        {
            self.record("terminate_timeout", json!({"after_ms": TERMINATE_GRACE_MS}));
            self.phase = Phase::Live;
            self.hang_up_now();
            return;
        }
        if let Caller::Speaking { last_voice_ms, .. } = &self.caller
            && now >= last_voice_ms + self.config.end_of_speech_ms
        {
            self.end_turn(now);
        }
    }

    /// The transcript of the caller's turn (`req`), or why there is none.
    pub fn handle_transcript(&mut self, now: Instant, req: ReqId, result: Result<String, Failure>) {
        let now = self.ms(now);
        let Some(running) = self.finish_req(req) else {
            return;
        };
        let text = match result {
            Ok(text) => text.trim().to_owned(),
            Err(failure) => {
                if self.retry(&running, &failure) {
                    // Transcribing again repeats nothing the caller heard: always safe.
                    let req = self.next_req;
                    self.next_req += 1;
                    if let Some(turn) = &mut self.turn {
                        turn.0 = req;
                    }
                    self.running.push(Running {
                        req,
                        provider: Provider::Stt,
                        retried: true,
                        used: false,
                    });
                    self.out.push_back(Output::Transcribe {
                        req,
                        samples: self.last_samples.clone(),
                    });
                    return;
                }
                return self.fail(now, Provider::Stt, &failure.reason);
            }
        };
        let Some((_, start_ms, end_ms)) = self.turn.take() else {
            return;
        };
        if let Some(l) = &mut self.latency {
            l.stt_ms = Some(now.saturating_sub(l.end_of_speech_ms));
        }
        if text.is_empty() {
            // Noise: nothing was said; a paused answer goes on.
            self.resume(now);
            return;
        }
        self.out
            .push_back(Output::Command(AgentCommand::Transcript(Box::new(Turn {
                speaker: Speaker::Caller,
                text: text.clone(),
                start_ms,
                end_ms,
                interrupted: false,
            }))));
        if self.speech.is_some() && self.is_backchannel(&text) {
            // A backchannel never interrupts: a paused answer goes on where it paused.
            let paused = self.speech.as_ref().is_some_and(|s| s.paused);
            self.record("backchannel", json!({"resumed": paused}));
            self.resume(now);
            return;
        }
        if let Some(speech) = &mut self.speech
            && speech.start_mark.is_some()
            && (!speech.paused || speech.clear_pending)
        {
            // What the caller heard is the call's count: wait for its report of the clear.
            if !speech.paused {
                speech.paused = true;
                speech.clear_pending = true;
                self.out.push_back(Output::Clear);
            }
            self.awaiting_clear = Some(text);
            return;
        }
        self.take_turn(now, text);
    }

    /// The caller's words end the answer (cut to what was heard) and go to the LLM.
    fn take_turn(&mut self, now: u64, text: String) {
        self.interrupt(now);
        self.messages.push(json!({"role": "user", "content": text}));
        self.tool_rounds = 0;
        self.ask_llm(now);
    }

    /// More of the LLM's answer to `req`.
    pub fn handle_llm_delta(&mut self, now: Instant, req: ReqId, text: &str) {
        let now = self.ms(now);
        if !self.is_running(req) || self.phase != Phase::Live {
            return;
        }
        if let Some(r) = self.running.iter_mut().find(|r| r.req == req) {
            r.used = true;
        }
        if let Some(l) = &mut self.latency
            && l.llm_first_token_ms.is_none()
        {
            l.llm_first_token_ms = Some(now.saturating_sub(l.end_of_speech_ms));
        }
        let speech = self.speech.get_or_insert_with(Speech::new);
        speech.text.push_str(text);
        speech.splitter.push(text);
        self.pump_speech(now);
    }

    /// The LLM's answer to `req` is complete, or failed.
    pub fn handle_llm_done(&mut self, now: Instant, req: ReqId, result: Result<Answer, Failure>) {
        let now = self.ms(now);
        let Some(running) = self.finish_req(req) else {
            return;
        };
        let answer = match result {
            Ok(answer) => answer,
            Err(failure) => {
                if self.retry(&running, &failure) {
                    self.speech = None;
                    return self.ask_llm_again(now, true);
                }
                return self.fail(now, Provider::Llm, &failure.reason);
            }
        };
        if let Some(u) = answer.usage {
            self.usage.llm_input_tokens += u.prompt_tokens;
            self.usage.llm_output_tokens += u.completion_tokens;
            self.count(&[
                ("llm_input_tokens", u.prompt_tokens as f64),
                ("llm_output_tokens", u.completion_tokens as f64),
            ]);
        }
        let mut message = json!({"role": "assistant", "content": answer.content});
        let (hang_up, others): (Vec<ToolCall>, Vec<ToolCall>) = answer
            .tool_calls
            .into_iter()
            .partition(|c| c.name == "hang_up");
        let calls: Vec<&ToolCall> = hang_up.iter().chain(others.iter()).collect();
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(
                calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect(),
            );
        }
        self.messages.push(message);
        let index = self.messages.len() - 1;
        let mut results = Vec::new();
        for call in &hang_up {
            self.messages
                .push(json!({"role": "tool", "tool_call_id": call.id,
                                      "content": "{\"ok\": true}"}));
            results.push(self.messages.len() - 1);
            self.record("tool_call", json!({"name": "hang_up"}));
        }
        let ending = !hang_up.is_empty();
        let run = !ending && self.tool_rounds < MAX_TOOL_ROUNDS;
        // What the answer said before its tools is queued before any key they press.
        let speech = self.speech.get_or_insert_with(Speech::new);
        let round = speech.round;
        while let Some(text) = speech.splitter.poll_sentence() {
            speech.queue.push_back(Item::Sentence { text, round });
        }
        if let Some(text) = speech.splitter.finish() {
            speech.queue.push_back(Item::Sentence { text, round });
        }
        speech.hang_up_results = results;
        speech.messages.push((round, index));
        speech.hang_up = ending;
        let mut external = Vec::new();
        let mut answered_here = false;
        for call in others {
            if !run {
                // Every call of the model gets a result, or the next request is refused.
                let why = if ending {
                    "not run: the call is ending"
                } else {
                    "not run: too many tool rounds in one answer"
                };
                self.tool_message(&call.id, &json!({ "error": why }).to_string());
                continue;
            }
            self.record("tool_call", json!({"name": call.name}));
            if call.name == "send_dtmf" && self.offers("send_dtmf") {
                let output = self.send_dtmf(&call.arguments);
                self.tool_message(&call.id, &output);
                answered_here = true;
            } else {
                external.push(call);
            }
        }
        if run && (answered_here || !external.is_empty()) {
            self.tool_rounds += 1;
        }
        for call in &external {
            self.out.push_back(Output::Tool(call.clone()));
        }
        let again = answered_here && external.is_empty();
        self.tools_pending = external;
        if again {
            // Every result is in: the LLM goes on (the keys play first, they are queued).
            self.ask_llm_again(now, false);
        } else if let Some(speech) = &mut self.speech {
            speech.text_done = true;
        }
        self.pump_speech(now);
    }

    /// Whether the model is offered the tool `name`.
    fn offers(&self, name: &str) -> bool {
        self.config
            .tools
            .iter()
            .any(|t| t["function"]["name"] == name)
    }

    /// A tool's result in the conversation.
    fn tool_message(&mut self, call_id: &str, output: &str) {
        self.messages
            .push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
    }

    /// `send_dtmf`: the keys queued after what the answer said so far; the result for the
    /// model.
    fn send_dtmf(&mut self, arguments: &str) -> String {
        let args: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
        let digits = args.get("digits").and_then(Value::as_str).unwrap_or("");
        let keys: Option<Vec<Digit>> = digits.chars().map(Digit::from_char).collect();
        match keys {
            Some(keys) if !keys.is_empty() && keys.iter().all(|k| k.is_sendable()) => {
                let speech = self.speech.get_or_insert_with(Speech::new);
                let round = speech.round;
                speech.queue.push_back(Item::Keys { keys, round });
                json!({ "pressed": digits }).to_string()
            }
            _ => json!({"error": "digits must be one or more of 0-9, * and #"}).to_string(),
        }
    }

    /// Presses `keys` now: protocol DTMF on inbound calls; in-band tones in the answer's
    /// audio on CallBridge and Twilio calls (they have no DTMF message towards the caller).
    fn press(&mut self, now: u64, keys: &[Digit], round: u32) {
        match self.config.protocol {
            Protocol::Inbound => {
                let Some(duration) = DtmfDuration::from_millis(u64::from(TONE_MS)) else {
                    return;
                };
                for &digit in keys {
                    self.out
                        .push_back(Output::Command(AgentCommand::Dtmf { digit, duration }));
                }
            }
            Protocol::CallBridge | Protocol::Twilio => {
                let format = self.config.output_format;
                let rate = format.sample_rate();
                let gap = vec![0i16; rate as usize * 60 / 1000];
                let mut samples = Vec::new();
                for &digit in keys {
                    samples.extend(callgate_audio::dtmf::tone(digit, TONE_MS, rate, 0.25));
                    samples.extend_from_slice(&gap);
                }
                let audio = callgate_audio::pcm::encode(format, &samples);
                let audio_ms = audio.len() as u64 / self.config.output_bytes_per_ms.max(1);
                self.play(now, &audio);
                if let Some(speech) = &mut self.speech {
                    speech.spoken.push((
                        round,
                        Spoken {
                            text: String::new(),
                            audio_ms,
                        },
                    ));
                }
            }
        }
    }

    /// A tool's result.
    pub fn handle_tool_done(&mut self, now: Instant, done: callgate_kit::tools::ToolDone) {
        let now = self.ms(now);
        let Some(i) = self.tools_pending.iter().position(|c| c.id == done.call_id) else {
            return;
        };
        let call = self.tools_pending.remove(i);
        self.tool_message(&done.call_id, &done.output);
        // The answer as the model reads it (a send_sms answer has the masked number and the
        // result, never the content).
        let shown: String = done.output.chars().take(2000).collect();
        self.record(
            "tool_result",
            json!({"name": call.name, "ok": done.ok, "output": shown}),
        );
        if call.name == "agent_terminate" && done.ok && self.phase == Phase::Live {
            // CallBridge announces and drops the line: nothing more is asked or heard.
            self.record("agent_terminate", json!({"accepted": true}));
            for r in std::mem::take(&mut self.running) {
                if r.provider == Provider::Stt {
                    self.out.push_back(Output::Cancel { req: r.req });
                } else {
                    self.running.push(r);
                }
            }
            self.caller = Caller::Quiet;
            self.turn = None;
            self.phase = Phase::Terminating {
                until_ms: now + TERMINATE_GRACE_MS,
            };
        }
        if self.tools_pending.is_empty() {
            if self.phase == Phase::Live {
                self.ask_llm_again(now, false);
            } else if let Some(speech) = &mut self.speech {
                // The answer ends with what was said: its end is marked, then heard.
                speech.text_done = true;
                self.pump_speech(now);
            }
        }
    }

    /// Audio of the sentence being spoken for `req` (the call's output format).
    pub fn handle_tts_audio(&mut self, now: Instant, req: ReqId, audio: &[u8]) {
        let now = self.ms(now);
        if !self.is_running(req) || self.phase == Phase::Over {
            return;
        }
        if let Some(l) = &mut self.latency
            && l.tts_first_audio_ms.is_none()
        {
            l.tts_first_audio_ms = Some(now.saturating_sub(l.end_of_speech_ms));
        }
        let Some(speech) = &mut self.speech else {
            return;
        };
        if let Some(ahead) = &mut speech.ahead
            && ahead.req == req
        {
            // Held until the sentence before it is done: not used yet (a retry is safe).
            ahead.audio.extend_from_slice(audio);
            return;
        }
        let Some(playing) = &mut speech.speaking else {
            return;
        };
        if playing.req != req {
            return;
        }
        playing.bytes += audio.len() as u64;
        if let Some(r) = self.running.iter_mut().find(|r| r.req == req) {
            r.used = true;
        }
        self.play(now, audio);
    }

    /// Audio of the answer for the call (held while the answer is paused).
    fn play(&mut self, now: u64, audio: &[u8]) {
        let Some(speech) = &mut self.speech else {
            return;
        };
        if speech.start_mark.is_none() {
            let id = self.next_mark;
            self.next_mark += 1;
            speech.start_mark = Some((id, None));
            self.out.push_back(Output::Command(AgentCommand::Mark(id)));
        }
        speech.first_audio_ms.get_or_insert(now);
        speech.audio.extend_from_slice(audio);
        if !speech.paused {
            self.out.push_back(Output::Command(AgentCommand::Audio(
                Bytes::copy_from_slice(audio),
            )));
            if let Some(l) = &mut self.latency
                && l.first_frame_ms.is_none()
            {
                l.first_frame_ms = Some(now.saturating_sub(l.end_of_speech_ms));
                let l = *l;
                self.record(
                    "turn_latency",
                    json!({"end_of_speech_wait_ms": l.detected_after_ms,
                           "stt_ms": l.stt_ms, "llm_first_token_ms": l.llm_first_token_ms,
                           "tts_first_audio_ms": l.tts_first_audio_ms,
                           "first_frame_ms": l.first_frame_ms}),
                );
            }
        }
    }

    /// The sentence of `req` is fully spoken, or its speech failed.
    pub fn handle_tts_done(&mut self, now: Instant, req: ReqId, result: Result<(), Failure>) {
        let now = self.ms(now);
        let Some(running) = self.finish_req(req) else {
            return;
        };
        let ahead = self
            .speech
            .as_ref()
            .and_then(|s| s.ahead.as_ref())
            .is_some_and(|a| a.req == req);
        if let Err(failure) = result {
            if self.retry(&running, &failure)
                && let Some(speech) = &mut self.speech
            {
                let again = if ahead {
                    speech.ahead.take().map(|a| (a.text, a.round))
                } else {
                    speech.speaking.take().map(|p| (p.text, p.round))
                };
                if let Some((text, round)) = again {
                    self.request_speech(text, round, ahead, true);
                    return;
                }
            }
            return self.fail(now, Provider::Tts, &failure.reason);
        }
        if ahead {
            if let Some(a) = self.speech.as_mut().and_then(|s| s.ahead.as_mut()) {
                a.done = true;
            }
            return;
        }
        self.finish_sentence();
        self.pump_speech(now);
    }

    /// The sentence being spoken is done: it joins what was spoken.
    fn finish_sentence(&mut self) {
        let bytes_per_ms = self.config.output_bytes_per_ms.max(1);
        if let Some(speech) = &mut self.speech
            && let Some(p) = speech.speaking.take()
        {
            speech.spoken.push((
                p.round,
                Spoken {
                    text: p.text,
                    audio_ms: p.bytes / bytes_per_ms,
                },
            ));
        }
    }

    /// The call reports a mark.
    pub fn handle_mark(&mut self, now: Instant, id: u64, played_ms: u64, state: MarkState) {
        let now = self.ms(now);
        let Some(speech) = &mut self.speech else {
            return;
        };
        if let Some((start, base)) = &mut speech.start_mark
            && *start == id
        {
            *base = Some(played_ms);
        }
        if speech.end_mark == Some(id) && state == MarkState::Played && !speech.paused {
            self.answer_heard(now);
        }
    }

    /// The call cleared the playout (at the core's request, or a barge-in of its own):
    /// `played_ms` is all the agent audio the caller has heard.
    pub fn handle_cleared(&mut self, now: Instant, played_ms: u64) {
        let now = self.ms(now);
        let Some(speech) = &mut self.speech else {
            return;
        };
        let base = speech.start_mark.and_then(|(_, base)| base);
        speech.heard_ms = base.map_or(0, |b| played_ms.saturating_sub(b));
        // A clear the core did not ask for (the call's own barge-in) is held as a pause.
        speech.paused = true;
        speech.clear_pending = false;
        if let Some(text) = self.awaiting_clear.take() {
            self.take_turn(now, text);
        }
    }

    fn pause(&mut self, _now: u64) {
        let Some(speech) = &mut self.speech else {
            return;
        };
        if speech.paused || speech.start_mark.is_none() {
            return;
        }
        speech.paused = true;
        speech.clear_pending = true;
        self.out.push_back(Output::Clear);
    }

    /// The answer goes on from where the caller stopped hearing it.
    fn resume(&mut self, _now: u64) {
        let bytes_per_ms = self.config.output_bytes_per_ms.max(1);
        let Some(speech) = &mut self.speech else {
            return;
        };
        if !speech.paused {
            return;
        }
        speech.paused = false;
        let from = usize::try_from(speech.heard_ms * bytes_per_ms)
            .unwrap_or(usize::MAX)
            .min(speech.audio.len());
        // A new base: the rest is heard from a new mark.
        let id = self.next_mark;
        self.next_mark += 1;
        // The audio before `from` was heard: counted in the new base by subtracting it.
        speech.start_mark = Some((id, None));
        speech.heard_ms = 0;
        let rest = speech.audio.split_off(from);
        let skipped: Vec<u8> = std::mem::replace(&mut speech.audio, rest);
        self.out.push_back(Output::Command(AgentCommand::Mark(id)));
        if !speech.audio.is_empty() {
            self.out
                .push_back(Output::Command(AgentCommand::Audio(Bytes::from(
                    speech.audio.clone(),
                ))));
        }
        // What was heard before the pause stays heard: the spoken list keeps its texts; the
        // offset is folded into the first sentences' lengths.
        let mut skip_ms = skipped.len() as u64 / bytes_per_ms;
        for (_, s) in &mut speech.spoken {
            let take = skip_ms.min(s.audio_ms);
            s.audio_ms -= take;
            skip_ms -= take;
        }
        // The rest of what was heard is of the sentence still being spoken.
        if let Some(p) = &mut speech.speaking {
            p.bytes = p.bytes.saturating_sub(skip_ms * bytes_per_ms);
        }
        if speech.end_mark.is_some() {
            let id = self.next_mark;
            self.next_mark += 1;
            speech.end_mark = Some(id);
            self.out.push_back(Output::Command(AgentCommand::Mark(id)));
        }
    }

    /// The caller took the turn: the answer (if any) stops, cut to what was heard.
    fn interrupt(&mut self, now: u64) {
        let Some(mut speech) = self.speech.take() else {
            return;
        };
        for r in std::mem::take(&mut self.running) {
            if matches!(r.provider, Provider::Llm | Provider::Tts) {
                self.out.push_back(Output::Cancel { req: r.req });
            } else {
                self.running.push(r);
            }
        }
        self.tools_pending.clear();
        if !speech.paused && speech.start_mark.is_some() {
            // Not heard since the clear: nothing more is.
            self.out.push_back(Output::Clear);
        }
        if let Some(p) = speech.speaking.take() {
            speech.spoken.push((
                p.round,
                Spoken {
                    text: p.text,
                    audio_ms: p.bytes / self.config.output_bytes_per_ms.max(1),
                },
            ));
        }
        for &i in &speech.hang_up_results {
            if let Some(m) = self.messages.get_mut(i) {
                m["content"] = json!(
                    "{\"error\": \"the caller spoke before the goodbye was heard: the call goes on\"}"
                );
            }
        }
        // Each round of the answer (one per tool round) is its own assistant message: each is
        // cut to what was heard of it, and a round after the cut was not heard at all.
        let mut left = speech.heard_ms;
        let mut cut_before = false;
        let mut said = Vec::new();
        for round in 0..=speech.round {
            let spoken: Vec<Spoken> = speech
                .spoken
                .iter()
                .filter(|(r, _)| *r == round)
                .map(|(_, s)| s.clone())
                .collect();
            let length: u64 = spoken.iter().map(|s| s.audio_ms).sum();
            let heard = if cut_before {
                heard::Heard {
                    text: String::new(),
                    whole: false,
                }
            } else {
                heard::cut(&spoken, left, CUT_MARKER)
            };
            left = left.saturating_sub(length);
            let message = speech
                .messages
                .iter()
                .find(|(r, _)| *r == round)
                .map(|(_, i)| *i);
            let unsaid = speech
                .queue
                .iter()
                .any(|item| matches!(item, Item::Sentence { round: r, .. } if *r == round))
                || speech.ahead.as_ref().is_some_and(|a| a.round == round)
                || message.is_none();
            let complete = heard.whole && !unsaid;
            cut_before |= !complete;
            let text = if complete {
                message
                    .and_then(|i| self.messages.get(i))
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            } else if heard.whole && !heard.text.is_empty() {
                // Every sentence spoken was heard, but the answer had more to say.
                format!("{}{CUT_MARKER}", heard.text)
            } else {
                heard.text
            };
            match message {
                Some(i) => {
                    if !complete && let Some(m) = self.messages.get_mut(i) {
                        m["content"] = json!(text);
                    }
                }
                None if !text.is_empty() => {
                    self.messages
                        .push(json!({"role": "assistant", "content": text}));
                }
                None => {}
            }
            if !text.is_empty() {
                said.push(text);
            }
        }
        // A cut answer whose tool calls never ran: the conversation must still pair each
        // call with a result.
        for &(_, i) in &speech.messages {
            let Some(calls) = self
                .messages
                .get(i)
                .and_then(|m| m.get("tool_calls"))
                .cloned()
            else {
                continue;
            };
            let answered: Vec<String> = self.messages[i + 1..]
                .iter()
                .filter_map(|m| m.get("tool_call_id").and_then(Value::as_str))
                .map(str::to_owned)
                .collect();
            for call in calls.as_array().into_iter().flatten() {
                let id = call["id"].as_str().unwrap_or_default();
                if !answered.iter().any(|a| a == id) {
                    self.messages
                        .push(json!({"role": "tool", "tool_call_id": id,
                        "content": "{\"error\": \"interrupted by the caller\"}"}));
                }
            }
        }
        let text = said.join(" ");
        if !text.is_empty() {
            self.out
                .push_back(Output::Command(AgentCommand::Transcript(Box::new(Turn {
                    speaker: Speaker::Agent,
                    text,
                    start_ms: speech.first_audio_ms.unwrap_or(now),
                    end_ms: now,
                    interrupted: true,
                }))));
        }
    }

    /// The whole answer was heard.
    fn answer_heard(&mut self, now: u64) {
        let Some(speech) = self.speech.take() else {
            return;
        };
        if !speech.text.trim().is_empty() {
            self.out
                .push_back(Output::Command(AgentCommand::Transcript(Box::new(Turn {
                    speaker: Speaker::Agent,
                    text: speech.text.trim().to_owned(),
                    start_ms: speech.first_audio_ms.unwrap_or(now),
                    end_ms: now,
                    interrupted: false,
                }))));
        }
        if speech.hang_up {
            self.hang_up_now();
        }
    }

    /// Hangs up after what is queued (a mark tells when it played).
    fn hang_up_now(&mut self) {
        if self.phase != Phase::Live {
            return;
        }
        for r in std::mem::take(&mut self.running) {
            self.out.push_back(Output::Cancel { req: r.req });
        }
        self.phase = Phase::Over;
        self.out.push_back(Output::Command(AgentCommand::Hangup));
    }

    /// Sentences ready go to speech (the next one synthesized while the current one plays);
    /// the end of the answer is marked.
    fn pump_speech(&mut self, now: u64) {
        let Some(speech) = &mut self.speech else {
            return;
        };
        let round = speech.round;
        while let Some(text) = speech.splitter.poll_sentence() {
            speech.queue.push_back(Item::Sentence { text, round });
        }
        if speech.text_done
            && let Some(text) = speech.splitter.finish()
        {
            speech.queue.push_back(Item::Sentence { text, round });
        }
        // The current sentence: the one synthesized ahead, else the next item.
        loop {
            let Some(speech) = &mut self.speech else {
                return;
            };
            if speech.speaking.is_some() {
                break;
            }
            if let Some(ahead) = speech.ahead.take() {
                speech.speaking = Some(Playing {
                    req: ahead.req,
                    text: ahead.text,
                    round: ahead.round,
                    bytes: ahead.audio.len() as u64,
                });
                if !ahead.audio.is_empty() {
                    if let Some(r) = self.running.iter_mut().find(|r| r.req == ahead.req) {
                        r.used = true;
                    }
                    self.play(now, &ahead.audio);
                }
                if ahead.done {
                    self.finish_sentence();
                    continue;
                }
                break;
            }
            match speech.queue.pop_front() {
                None => break,
                Some(Item::Keys { keys, round }) => self.press(now, &keys, round),
                Some(Item::Sentence { text, round }) => {
                    self.request_speech(text, round, false, false);
                    break;
                }
            }
        }
        let Some(speech) = &mut self.speech else {
            return;
        };
        // The next sentence is synthesized while this one plays: no gap between them.
        if speech.speaking.is_some()
            && speech.ahead.is_none()
            && let Some(Item::Sentence { .. }) = speech.queue.front()
            && let Some(Item::Sentence { text, round }) = speech.queue.pop_front()
        {
            self.request_speech(text, round, true, false);
        }
        let Some(speech) = &mut self.speech else {
            return;
        };
        let finished = speech.text_done
            && speech.speaking.is_none()
            && speech.ahead.is_none()
            && speech.queue.is_empty()
            && speech.end_mark.is_none()
            && self.tools_pending.is_empty();
        if finished {
            if speech.start_mark.is_none() {
                // Nothing was said (a tool-only answer): nothing to wait for.
                let hang_up = speech.hang_up;
                self.speech = None;
                if hang_up {
                    self.hang_up_now();
                }
                return;
            }
            let id = self.next_mark;
            self.next_mark += 1;
            speech.end_mark = Some(id);
            self.out.push_back(Output::Command(AgentCommand::Mark(id)));
        }
    }

    /// Asks for the speech of one sentence: the current one (its audio goes to the call as
    /// it arrives) or the next (`ahead`: held until the current one is done).
    fn request_speech(&mut self, text: String, round: u32, ahead: bool, retried: bool) {
        let req = self.next_req;
        self.next_req += 1;
        let characters = text.chars().count() as u64;
        self.usage.tts_characters += characters;
        self.count(&[("tts_characters", characters as f64)]);
        let Some(speech) = &mut self.speech else {
            return;
        };
        if ahead {
            speech.ahead = Some(Ahead {
                req,
                text: text.clone(),
                round,
                audio: Vec::new(),
                done: false,
            });
        } else {
            speech.speaking = Some(Playing {
                req,
                text: text.clone(),
                round,
                bytes: 0,
            });
        }
        self.running.push(Running {
            req,
            provider: Provider::Tts,
            retried,
            used: false,
        });
        self.out.push_back(Output::Speak { req, text });
    }

    fn end_turn(&mut self, now: u64) {
        let Caller::Speaking {
            start_ms,
            last_voice_ms,
            samples,
        } = std::mem::replace(&mut self.caller, Caller::Quiet)
        else {
            return;
        };
        let req = self.next_req;
        self.next_req += 1;
        let ms = samples.len() as u64 / self.config.input_samples_per_ms.max(1);
        self.usage.stt_ms += ms;
        self.count(&[("stt_seconds", ms as f64 / 1000.0)]);
        self.turn = Some((req, start_ms, last_voice_ms));
        // Counted from the end of the turn as detected (the caller's last voiced frame plus
        // `end_of_speech`, or the longest turn): the silence waited is stated beside it.
        self.latency = Some(Latency {
            end_of_speech_ms: now,
            detected_after_ms: now.saturating_sub(last_voice_ms),
            ..Latency::default()
        });
        self.running.push(Running {
            req,
            provider: Provider::Stt,
            retried: false,
            used: false,
        });
        self.last_samples = samples.clone();
        self.out.push_back(Output::Transcribe { req, samples });
        // Speech shorter than min_barge_in never paused the answer; it is transcribed all the
        // same, and words that are not backchannels interrupt.
    }

    /// Asks the LLM with the conversation as it is.
    fn ask_llm(&mut self, now: u64) {
        self.ask_llm_again(now, false);
    }

    fn ask_llm_again(&mut self, _now: u64, retried: bool) {
        if self.phase != Phase::Live {
            return;
        }
        if let Some(speech) = &mut self.speech {
            // After tools the answer goes on, in a new assistant message (a new round).
            speech.text_done = false;
            if speech.messages.iter().any(|(r, _)| *r == speech.round) {
                speech.round += 1;
            }
        }
        let req = self.next_req;
        self.next_req += 1;
        self.running.push(Running {
            req,
            provider: Provider::Llm,
            retried,
            used: false,
        });
        self.out.push_back(Output::Complete {
            req,
            messages: self.messages.clone(),
        });
    }

    fn is_running(&self, req: ReqId) -> bool {
        self.running.iter().any(|r| r.req == req)
    }

    /// Takes `req` off the running list; `None` for a request cancelled or unknown.
    fn finish_req(&mut self, req: ReqId) -> Option<Running> {
        let i = self.running.iter().position(|r| r.req == req)?;
        Some(self.running.remove(i))
    }

    /// Whether to retry after `failure`: once, when retrying may help and repeats nothing.
    fn retry(&mut self, running: &Running, failure: &Failure) -> bool {
        let again = failure.retryable && !running.retried && !running.used;
        self.record(
            "provider_error",
            json!({"provider": running.provider.as_str(), "reason": failure.reason,
                   "retry": again}),
        );
        again
    }

    /// A provider failed for good: the fallback message, then the call ends.
    fn fail(&mut self, _now: u64, provider: Provider, reason: &str) {
        if self.phase != Phase::Live {
            return;
        }
        for r in std::mem::take(&mut self.running) {
            self.out.push_back(Output::Cancel { req: r.req });
        }
        if self.speech.as_ref().is_some_and(|s| s.start_mark.is_some()) {
            self.out.push_back(Output::Clear);
        }
        self.speech = None;
        self.record(
            "provider_failed",
            json!({"provider": provider.as_str(), "reason": reason}),
        );
        self.phase = Phase::Over;
        self.out.push_back(Output::Fallback);
    }

    fn record(&mut self, name: &str, detail: Value) {
        self.out
            .push_back(Output::Command(AgentCommand::Event(Box::new(
                RecordEvent {
                    name: name.to_owned(),
                    detail,
                },
            ))));
    }

    /// Adds to the call's usage counters (the call sums them per name), as it is spent.
    fn count(&mut self, counters: &[(&str, f64)]) {
        self.out.push_back(Output::Command(AgentCommand::Usage(
            counters.iter().map(|&(k, v)| (k.to_owned(), v)).collect(),
        )));
    }

    /// Whether `text` is only backchannel words ("네", "uh-huh").
    fn is_backchannel(&self, text: &str) -> bool {
        let words: Vec<String> = normalise(text)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        !words.is_empty()
            && words.iter().all(|w| {
                self.config
                    .backchannels
                    .iter()
                    .any(|b| normalise(b).split_whitespace().any(|bw| bw == w))
            })
    }
}

/// Lower case, punctuation as space.
pub fn normalise(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                ' '
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Usage as ChatUsage;

    /// The test calls' start: every test reads the same clock, made once.
    #[allow(clippy::disallowed_methods)] // the test clock's origin
    fn t0() -> Instant {
        static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *T0
    }

    /// `ms` into the test call.
    fn at(ms: u64) -> Instant {
        t0() + std::time::Duration::from_millis(ms)
    }

    /// The core's deadline on the test call's clock.
    fn timeout_ms(core: &Core) -> Option<u64> {
        core.poll_timeout()
            .map(|i| i.duration_since(t0()).as_millis() as u64)
    }

    const FRAME: u64 = 20;

    fn config() -> Config {
        Config {
            instructions: "You answer calls.".into(),
            greeting: String::new(),
            end_of_speech_ms: 600,
            min_barge_in_ms: 300,
            backchannels: vec!["네".into(), "예".into(), "uh-huh".into()],
            tools: Vec::new(),
            output_bytes_per_ms: 16,
            input_samples_per_ms: 8,
            max_duration_ms: 3_600_000,
            protocol: Protocol::CallBridge,
            output_format: AudioFormat::Pcm8000,
        }
    }

    fn drain(core: &mut Core) -> Vec<Output> {
        std::iter::from_fn(|| core.poll_output()).collect()
    }

    /// The caller speaks from `from` for `ms`, then is silent until the turn ends; returns
    /// the outputs and the time the turn ended.
    fn speak(core: &mut Core, from: u64, ms: u64) -> (Vec<Output>, u64) {
        let mut out = Vec::new();
        let mut t = from;
        while t < from + ms {
            t += FRAME;
            core.handle_audio(at(t), &[1000; 160], true);
            out.extend(drain(core));
        }
        let end = timeout_ms(core).unwrap();
        while t + FRAME < end {
            t += FRAME;
            core.handle_audio(at(t), &[0; 160], false);
        }
        core.handle_timeout(at(end));
        out.extend(drain(core));
        (out, end)
    }

    fn req_of(out: &[Output], f: impl Fn(&Output) -> Option<ReqId>) -> ReqId {
        out.iter().find_map(f).expect("the request")
    }

    fn transcribe_req(out: &[Output]) -> ReqId {
        req_of(out, |o| match o {
            Output::Transcribe { req, .. } => Some(*req),
            _ => None,
        })
    }

    fn complete(out: &[Output]) -> (ReqId, Vec<Value>) {
        out.iter()
            .find_map(|o| match o {
                Output::Complete { req, messages } => Some((*req, messages.clone())),
                _ => None,
            })
            .expect("an LLM request")
    }

    fn speaks(out: &[Output]) -> Vec<(ReqId, String)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Speak { req, text } => Some((*req, text.clone())),
                _ => None,
            })
            .collect()
    }

    fn events(out: &[Output], name: &str) -> Vec<Value> {
        out.iter()
            .filter_map(|o| match o {
                Output::Command(AgentCommand::Event(e)) if e.name == name => Some(e.detail.clone()),
                _ => None,
            })
            .collect()
    }

    fn marks(out: &[Output]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Output::Command(AgentCommand::Mark(id)) => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn audio_bytes(out: &[Output]) -> usize {
        out.iter()
            .map(|o| match o {
                Output::Command(AgentCommand::Audio(a)) => a.len(),
                _ => 0,
            })
            .sum()
    }

    fn answer(content: &str) -> Answer {
        Answer {
            content: content.into(),
            tool_calls: Vec::new(),
            finish_reason: Some("stop".into()),
            usage: Some(ChatUsage {
                prompt_tokens: 20,
                completion_tokens: 5,
            }),
        }
    }

    /// A call where the caller asked and the answer "안녕하세요. 요금은 삼만 원입니다." is
    /// streaming: the first sentence's second of audio has been sent and its start mark
    /// reached at played 0. Returns the core, the LLM request and the TTS request.
    fn answering() -> (Core, ReqId, ReqId, u64) {
        let mut core = Core::new(config(), t0(), at(0));
        let (out, end) = speak(&mut core, 0, 1000);
        let stt = transcribe_req(&out);
        core.handle_transcript(at(end + 200), stt, Ok("요금 문의요".into()));
        let (llm, _) = complete(&drain(&mut core));
        core.handle_llm_delta(at(end + 300), llm, "안녕하세요. 요금은");
        let out = drain(&mut core);
        let (tts, first) = speaks(&out)[0].clone();
        assert_eq!(first, "안녕하세요.");
        core.handle_tts_audio(at(end + 400), tts, &[7; 16 * 1000]);
        let out = drain(&mut core);
        let start = marks(&out)[0];
        core.handle_mark(at(end + 400), start, 0, MarkState::Played);
        (core, llm, tts, end)
    }

    #[test]
    fn a_turn_is_transcribed_answered_and_spoken_sentence_by_sentence() {
        let mut core = Core::new(config(), t0(), at(0));
        let (out, end) = speak(&mut core, 0, 1000);
        // The turn ends after 600 ms of silence from the last voiced frame.
        assert_eq!(end, 1000 + 600);
        let Some(Output::Transcribe { samples, .. }) =
            out.iter().find(|o| matches!(o, Output::Transcribe { .. }))
        else {
            panic!("no transcription in {out:?}");
        };
        assert!(samples.len() >= 8 * 1000, "{}", samples.len());
        let stt = transcribe_req(&out);
        core.handle_transcript(at(1800), stt, Ok("요금 문의요".into()));
        let out = drain(&mut core);
        let (llm, messages) = complete(&out);
        assert_eq!(
            messages[1],
            json!({"role": "user", "content": "요금 문의요"})
        );
        // The first sentence goes to speech before the LLM has finished.
        core.handle_llm_delta(at(1900), llm, "안녕하세요. 요금은");
        let (tts1, text) = speaks(&drain(&mut core))[0].clone();
        assert_eq!(text, "안녕하세요.");
        core.handle_llm_delta(at(1950), llm, " 삼만 원입니다.");
        assert!(
            speaks(&drain(&mut core)).is_empty(),
            "a sentence goes to speech once it is complete"
        );
        core.handle_tts_audio(at(2000), tts1, &[7; 1600]);
        let out = drain(&mut core);
        assert_eq!(audio_bytes(&out), 1600);
        let latency = &events(&out, "turn_latency")[0];
        assert_eq!(
            latency,
            &json!({"end_of_speech_wait_ms": 600, "stt_ms": 200, "llm_first_token_ms": 300,
                    "tts_first_audio_ms": 400, "first_frame_ms": 400})
        );
        let start = marks(&out)[0];
        core.handle_llm_done(
            at(2050),
            llm,
            Ok(answer("안녕하세요. 요금은 삼만 원입니다.")),
        );
        core.handle_tts_done(at(2100), tts1, Ok(()));
        let (tts2, text) = speaks(&drain(&mut core))[0].clone();
        assert_eq!(text, "요금은 삼만 원입니다.");
        core.handle_tts_audio(at(2200), tts2, &[8; 3200]);
        core.handle_tts_done(at(2300), tts2, Ok(()));
        let out = drain(&mut core);
        let end_mark = *marks(&out).last().expect("the end mark");
        assert_ne!(end_mark, start);
        core.handle_mark(at(2400), start, 0, MarkState::Played);
        core.handle_mark(at(2600), end_mark, 300, MarkState::Played);
        let out = drain(&mut core);
        let turns: Vec<&Turn> = out
            .iter()
            .filter_map(|o| match o {
                Output::Command(AgentCommand::Transcript(t)) => Some(&**t),
                _ => None,
            })
            .collect();
        assert_eq!(turns.len(), 1);
        assert_eq!(turns[0].text, "안녕하세요. 요금은 삼만 원입니다.");
        assert!(!turns[0].interrupted);
        assert_eq!(
            core.usage(),
            Usage {
                stt_ms: core.usage().stt_ms,
                llm_input_tokens: 20,
                llm_output_tokens: 5,
                tts_characters: 6 + 12,
            }
        );
        assert!(core.usage().stt_ms >= 1000);
    }

    #[test]
    fn barge_in_pauses_at_once_then_cuts_the_answer_to_what_was_heard_and_cancels() {
        let (mut core, llm, tts, end) = answering();
        // 300 ms of speech over the agent pauses it: the playout is cleared at once.
        let (out, end2) = speak(&mut core, end + 500, 1000);
        let clear_at = out
            .iter()
            .position(|o| *o == Output::Clear)
            .expect("a clear");
        assert_eq!(
            out.iter().filter(|o| **o == Output::Clear).count(),
            1,
            "{out:?}"
        );
        assert!(clear_at < out.len());
        // The call heard 500 ms of the sentence's 1000.
        core.handle_cleared(at(end + 820), 500);
        let stt = transcribe_req(&out);
        core.handle_tts_done(at(end2), tts, Ok(()));
        core.handle_transcript(at(end2 + 100), stt, Ok("잠깐만요, 다른 질문이요".into()));
        let out = drain(&mut core);
        assert!(out.contains(&Output::Cancel { req: llm }), "{out:?}");
        let (_, messages) = complete(&out);
        let n = messages.len();
        assert_eq!(messages[n - 2]["role"], "assistant");
        let said = messages[n - 2]["content"].as_str().unwrap();
        assert!(said.ends_with(CUT_MARKER), "{said}");
        assert!(!said.contains("요금은"), "never heard: {said}");
        assert_eq!(messages[n - 1]["content"], "잠깐만요, 다른 질문이요");
        let cut = out.iter().find_map(|o| match o {
            Output::Command(AgentCommand::Transcript(t)) if t.speaker == Speaker::Agent => {
                Some(t.clone())
            }
            _ => None,
        });
        assert!(cut.expect("the agent's turn").interrupted);
        // Audio from the cut answer still arriving is ignored.
        core.handle_llm_delta(at(end2 + 200), llm, "더 있습니다.");
        assert!(drain(&mut core).is_empty());
    }

    #[test]
    fn a_backchannel_resumes_where_the_answer_paused_and_asks_nothing() {
        let (mut core, _llm, _tts, end) = answering();
        let (out, end2) = speak(&mut core, end + 500, 400);
        assert!(out.contains(&Output::Clear));
        core.handle_cleared(at(end + 820), 250);
        let stt = transcribe_req(&out);
        core.handle_transcript(at(end2 + 100), stt, Ok("네.".into()));
        let out = drain(&mut core);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Complete { .. } | Output::Cancel { .. })),
            "{out:?}"
        );
        // The held audio from 250 ms on is sent again after a new mark.
        assert_eq!(audio_bytes(&out), 16 * (1000 - 250));
        assert_eq!(marks(&out).len(), 1);
        assert_eq!(events(&out, "backchannel"), vec![json!({"resumed": true})]);
    }

    #[test]
    fn hang_up_waits_for_the_goodbye_and_the_llm_is_not_asked_again() {
        let mut core = Core::new(config(), t0(), at(0));
        let (out, end) = speak(&mut core, 0, 500);
        core.handle_transcript(at(end + 100), transcribe_req(&out), Ok("끊을게요".into()));
        let (llm, _) = complete(&drain(&mut core));
        core.handle_llm_delta(at(end + 200), llm, "안녕히 계세요.");
        let mut done = answer("안녕히 계세요.");
        done.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "hang_up".into(),
            arguments: "{}".into(),
        });
        done.finish_reason = Some("tool_calls".into());
        core.handle_llm_done(at(end + 250), llm, Ok(done));
        let (tts, _) = speaks(&drain(&mut core))[0].clone();
        core.handle_tts_audio(at(end + 300), tts, &[1; 800]);
        core.handle_tts_done(at(end + 350), tts, Ok(()));
        let out = drain(&mut core);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Command(AgentCommand::Hangup)))
        );
        let m = marks(&out);
        core.handle_mark(at(end + 300), m[0], 0, MarkState::Played);
        assert!(
            !drain(&mut core)
                .iter()
                .any(|o| matches!(o, Output::Command(AgentCommand::Hangup)))
        );
        core.handle_mark(at(end + 400), m[1], 50, MarkState::Played);
        let out = drain(&mut core);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Command(AgentCommand::Hangup)))
        );
        assert!(!out.iter().any(|o| matches!(o, Output::Complete { .. })));
        assert!(core.is_over());
        let tool_result = core.messages().last().unwrap();
        assert_eq!(tool_result["tool_call_id"], "call_1");
    }

    #[test]
    fn other_tools_run_and_the_llm_is_asked_again_with_their_results() {
        let mut core = Core::new(config(), t0(), at(0));
        let (out, end) = speak(&mut core, 0, 500);
        core.handle_transcript(at(end + 100), transcribe_req(&out), Ok("잔액은요".into()));
        let (llm, _) = complete(&drain(&mut core));
        let mut done = answer("");
        done.tool_calls.push(ToolCall {
            id: "call_9".into(),
            name: "balance".into(),
            arguments: "{}".into(),
        });
        core.handle_llm_done(at(end + 200), llm, Ok(done));
        let out = drain(&mut core);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Tool(c) if c.id == "call_9"))
        );
        assert!(!out.iter().any(|o| matches!(o, Output::Complete { .. })));
        core.handle_tool_done(
            at(end + 300),
            callgate_kit::tools::ToolDone {
                call_id: "call_9".into(),
                ok: true,
                output: "{\"balance\": 3}".into(),
            },
        );
        let (_, messages) = complete(&drain(&mut core));
        let last = messages.last().unwrap();
        assert_eq!(last["role"], "tool");
        assert_eq!(last["tool_call_id"], "call_9");
        assert_eq!(
            messages[messages.len() - 2]["tool_calls"][0]["id"],
            "call_9"
        );
    }

    #[test]
    fn a_failing_provider_is_retried_once_then_the_fallback_plays() {
        let retryable = || Failure {
            reason: "HTTP 503".into(),
            retryable: true,
        };
        let mut core = Core::new(config(), t0(), at(0));
        let (out, end) = speak(&mut core, 0, 500);
        let first = transcribe_req(&out);
        core.handle_transcript(at(end + 100), first, Err(retryable()));
        let out = drain(&mut core);
        let second = transcribe_req(&out);
        assert_ne!(first, second);
        core.handle_transcript(at(end + 200), second, Err(retryable()));
        let out = drain(&mut core);
        assert_eq!(out.last(), Some(&Output::Fallback));
        assert_eq!(
            events(&out, "provider_failed"),
            vec![json!({"provider": "stt", "reason": "HTTP 503"})]
        );
        assert!(core.is_over());

        // An LLM that failed after its first words is not asked again (they were spoken).
        let (mut core, llm, _tts, end) = answering();
        core.handle_llm_done(at(end + 600), llm, Err(retryable()));
        let out = drain(&mut core);
        assert!(!out.iter().any(|o| matches!(o, Output::Complete { .. })));
        assert!(out.contains(&Output::Fallback));
        assert!(out.contains(&Output::Clear));

        // A TTS refusing (4xx) is not retried.
        let (mut core, _llm, tts, end) = answering();
        core.handle_tts_done(
            at(end + 600),
            tts,
            Err(Failure {
                reason: "HTTP 400".into(),
                retryable: false,
            }),
        );
        assert!(drain(&mut core).contains(&Output::Fallback));
    }

    #[test]
    fn the_greeting_is_spoken_first_and_is_the_assistants_first_message() {
        let mut c = config();
        c.greeting = "안녕하세요, 콜게이트입니다. 무엇을 도와드릴까요?".into();
        let mut core = Core::new(c, t0(), at(0));
        let out = drain(&mut core);
        assert_eq!(speaks(&out)[0].1, "안녕하세요, 콜게이트입니다.");
        assert_eq!(core.messages()[1]["role"], "assistant");
    }
    fn tool_answer(content: &str, calls: &[(&str, &str, &str)]) -> Answer {
        let mut done = answer(content);
        for (id, name, arguments) in calls {
            done.tool_calls.push(ToolCall {
                id: (*id).into(),
                name: (*name).into(),
                arguments: (*arguments).into(),
            });
        }
        done.finish_reason = Some("tool_calls".into());
        done
    }

    fn offering(mut c: Config, names: &[&str]) -> Config {
        c.tools = names
            .iter()
            .map(|n| json!({"type": "function", "function": {"name": n}}))
            .collect();
        c
    }

    /// A core whose caller asked something, and the LLM request for it.
    fn asked(c: Config) -> (Core, ReqId, u64) {
        let mut core = Core::new(c, t0(), at(0));
        let (out, end) = speak(&mut core, 0, 500);
        core.handle_transcript(
            at(end + 100),
            transcribe_req(&out),
            Ok("눌러 주세요".into()),
        );
        let (llm, _) = complete(&drain(&mut core));
        (core, llm, end)
    }

    #[test]
    fn send_dtmf_plays_tones_after_what_was_said_and_the_llm_goes_on() {
        let (mut core, llm, end) = asked(offering(config(), &["send_dtmf"]));
        core.handle_llm_delta(at(end + 200), llm, "연결합니다. ");
        let (tts, _) = speaks(&drain(&mut core))[0].clone();
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer(
                "연결합니다.",
                &[("call_k", "send_dtmf", "{\"digits\":\"12#\"}")],
            )),
        );
        let out = drain(&mut core);
        // The keys wait for the sentence before them; the LLM is asked again at once.
        assert_eq!(audio_bytes(&out), 0, "{out:?}");
        let (_, messages) = complete(&out);
        let last = messages.last().unwrap();
        assert_eq!(last["tool_call_id"], "call_k");
        assert_eq!(last["content"], "{\"pressed\":\"12#\"}");
        core.handle_tts_audio(at(end + 300), tts, &[7; 1600]);
        core.handle_tts_done(at(end + 350), tts, Ok(()));
        let out = drain(&mut core);
        // The sentence's 1600 bytes, then three tones of 160 ms at 8 kHz (16 bytes a ms).
        assert_eq!(audio_bytes(&out), 1600 + 3 * 160 * 16, "{out:?}");
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Command(AgentCommand::Dtmf { .. })))
        );

        // Inbound calls press protocol keys; bad digits are the model's error.
        let mut c = offering(config(), &["send_dtmf"]);
        c.protocol = Protocol::Inbound;
        let (mut core, llm, end) = asked(c);
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer(
                "",
                &[
                    ("k1", "send_dtmf", "{\"digits\":\"9*\"}"),
                    ("k2", "send_dtmf", "{\"digits\":\"A\"}"),
                ],
            )),
        );
        let out = drain(&mut core);
        let keys: Vec<char> = out
            .iter()
            .filter_map(|o| match o {
                Output::Command(AgentCommand::Dtmf { digit, .. }) => Some(digit.as_char()),
                _ => None,
            })
            .collect();
        assert_eq!(keys, ['9', '*']);
        let (_, messages) = complete(&out);
        assert!(
            messages.last().unwrap()["content"]
                .as_str()
                .unwrap()
                .contains("0-9, * and #")
        );
    }

    #[test]
    fn a_builtin_tool_not_offered_goes_to_the_driver_which_refuses_it() {
        let (mut core, llm, end) = asked(config());
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer("", &[("k", "send_dtmf", "{\"digits\":\"1\"}")])),
        );
        let out = drain(&mut core);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Tool(c) if c.id == "k"))
        );
        assert_eq!(audio_bytes(&out), 0);
    }

    #[test]
    fn agent_terminate_accepted_stops_the_conversation_and_a_refusal_goes_to_the_llm() {
        let c = offering(config(), &["agent_terminate"]);
        let (mut core, llm, end) = asked(c.clone());
        core.handle_llm_delta(at(end + 200), llm, "안녕히 계세요. ");
        let (tts, _) = speaks(&drain(&mut core))[0].clone();
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer(
                "안녕히 계세요.",
                &[("t", "agent_terminate", "{\"message\":\"bye\"}")],
            )),
        );
        let out = drain(&mut core);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Tool(c) if c.name == "agent_terminate"))
        );
        core.handle_tool_done(
            at(end + 300),
            callgate_kit::tools::ToolDone {
                call_id: "t".into(),
                ok: true,
                output: "{}".into(),
            },
        );
        let out = drain(&mut core);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Complete { .. })),
            "{out:?}"
        );
        assert_eq!(
            events(&out, "agent_terminate"),
            vec![json!({"accepted": true})]
        );
        // The goodbye still plays; the caller is not listened to any more.
        core.handle_tts_audio(at(end + 350), tts, &[7; 800]);
        assert_eq!(audio_bytes(&drain(&mut core)), 800);
        for i in 0..100 {
            core.handle_audio(at(end + 400 + 20 * i), &[1000; 160], true);
        }
        core.handle_timeout(at(end + 4000));
        let out = drain(&mut core);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Transcribe { .. } | Output::Clear)),
            "{out:?}"
        );
        // CallBridge never dropped the line: the call hangs up itself after the grace.
        let due = timeout_ms(&core).unwrap();
        assert_eq!(due, end + 300 + TERMINATE_GRACE_MS);
        core.handle_timeout(at(due));
        assert!(
            drain(&mut core)
                .iter()
                .any(|o| matches!(o, Output::Command(AgentCommand::Hangup)))
        );

        let (mut core, llm, end) = asked(c);
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer("", &[("t", "agent_terminate", "{}")])),
        );
        drain(&mut core);
        core.handle_tool_done(
            at(end + 300),
            callgate_kit::tools::ToolDone {
                call_id: "t".into(),
                ok: false,
                output: "{\"error\":\"HTTP 500\"}".into(),
            },
        );
        let (_, messages) = complete(&drain(&mut core));
        assert_eq!(
            messages.last().unwrap()["content"],
            "{\"error\":\"HTTP 500\"}"
        );
    }

    #[test]
    fn tool_calls_that_do_not_run_still_get_a_result() {
        let (mut core, llm, end) = asked(config());
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer(
                "안녕히 계세요.",
                &[("h", "hang_up", "{}"), ("x", "lookup", "{}")],
            )),
        );
        let out = drain(&mut core);
        assert!(!out.iter().any(|o| matches!(o, Output::Tool(_))), "{out:?}");
        let ids: Vec<&Value> = core.messages().iter().map(|m| &m["tool_call_id"]).collect();
        assert!(
            ids.contains(&&json!("h")) && ids.contains(&&json!("x")),
            "{ids:?}"
        );
    }
    #[test]
    fn the_next_sentence_is_synthesized_while_the_current_one_plays_and_follows_it_at_once() {
        let mut core = Core::new(config(), t0(), at(0));
        let (out, end) = speak(&mut core, 0, 500);
        core.handle_transcript(at(end + 100), transcribe_req(&out), Ok("요금이요".into()));
        let (llm, _) = complete(&drain(&mut core));
        core.handle_llm_delta(at(end + 200), llm, "첫 문장입니다. 둘째 문장입니다. 셋째");
        let out = drain(&mut core);
        let asked = speaks(&out);
        // The first sentence and, ahead, the second: before the first has any audio.
        assert_eq!(
            asked.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
            ["첫 문장입니다.", "둘째 문장입니다."]
        );
        let (first, second) = (asked[0].0, asked[1].0);
        core.handle_tts_audio(at(end + 300), first, &[1; 800]);
        let out = drain(&mut core);
        assert_eq!(audio_bytes(&out), 800);
        let start = marks(&out)[0];
        core.handle_mark(at(end + 300), start, 0, MarkState::Played);
        // The second's audio is held while the first still streams...
        core.handle_tts_audio(at(end + 350), second, &[2; 480]);
        core.handle_tts_done(at(end + 360), second, Ok(()));
        let out = drain(&mut core);
        assert_eq!(audio_bytes(&out), 0, "{out:?}");
        assert!(speaks(&out).is_empty(), "one sentence ahead, no more");
        core.handle_tts_audio(at(end + 400), first, &[1; 800]);
        assert_eq!(audio_bytes(&drain(&mut core)), 800);
        // ...and follows the first the moment it is done.
        core.handle_tts_done(at(end + 410), first, Ok(()));
        let out = drain(&mut core);
        let sent: Vec<u8> = out
            .iter()
            .filter_map(|o| match o {
                Output::Command(AgentCommand::Audio(a)) => Some(a.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            sent.len() == 480 && sent.iter().all(|b| *b == 2),
            "{}",
            sent.len()
        );
        core.handle_llm_done(
            at(end + 420),
            llm,
            Ok(answer("첫 문장입니다. 둘째 문장입니다. 셋째")),
        );
        let out = drain(&mut core);
        assert_eq!(speaks(&out)[0].1, "셋째");
        // The played count is still inside the first sentence (100 ms of its 100).
        core.handle_mark(at(end + 420), start, 0, MarkState::Played);
    }

    /// A call whose answer went through a tool round: "잠시만요." (round 0, 1 s of audio), the
    /// tool, then "잔액은 삼만 원입니다. 더 필요하신 것 있으세요?" (round 1, 1 s each).
    fn answered_after_a_tool() -> (Core, u64) {
        let (mut core, llm, end) = asked(config());
        core.handle_llm_delta(at(end + 200), llm, "잠시만요. ");
        let (tts, _) = speaks(&drain(&mut core))[0].clone();
        core.handle_llm_done(
            at(end + 250),
            llm,
            Ok(tool_answer("잠시만요.", &[("c1", "balance", "{}")])),
        );
        drain(&mut core);
        core.handle_tts_audio(at(end + 300), tts, &[1; 16_000]);
        core.handle_tts_done(at(end + 300), tts, Ok(()));
        let out = drain(&mut core);
        core.handle_mark(at(end + 300), marks(&out)[0], 0, MarkState::Played);
        core.handle_tool_done(
            at(end + 400),
            callgate_kit::tools::ToolDone {
                call_id: "c1".into(),
                ok: true,
                output: "{\"balance\": 30000}".into(),
            },
        );
        let (llm2, _) = complete(&drain(&mut core));
        core.handle_llm_delta(
            at(end + 500),
            llm2,
            "잔액은 삼만 원입니다. 더 필요하신 것 있으세요?",
        );
        core.handle_llm_done(
            at(end + 500),
            llm2,
            Ok(answer("잔액은 삼만 원입니다. 더 필요하신 것 있으세요?")),
        );
        let asked = speaks(&drain(&mut core));
        for (req, _) in &asked {
            core.handle_tts_audio(at(end + 600), *req, &[2; 16_000]);
            core.handle_tts_done(at(end + 600), *req, Ok(()));
        }
        drain(&mut core);
        (core, end)
    }

    #[test]
    fn a_barge_in_after_a_tool_round_cuts_each_message_of_the_answer_to_what_was_heard() {
        // Heard: all of round 0 and half of round 1's first sentence.
        let (mut core, end) = answered_after_a_tool();
        let (out, end2) = speak(&mut core, end + 2000, 600);
        assert!(out.contains(&Output::Clear));
        core.handle_cleared(at(end2), 1500);
        core.handle_transcript(
            at(end2 + 100),
            transcribe_req(&out),
            Ok("그게 아니고요".into()),
        );
        let (_, messages) = complete(&drain(&mut core));
        let assistant: Vec<&Value> = messages
            .iter()
            .filter(|m| m["role"] == "assistant")
            .collect();
        assert_eq!(assistant.len(), 2, "{messages:?}");
        assert_eq!(assistant[0]["content"], "잠시만요.");
        assert_eq!(assistant[0]["tool_calls"][0]["id"], "c1");
        let second = assistant[1]["content"].as_str().unwrap();
        assert!(
            second.starts_with("잔액은") && second.ends_with(CUT_MARKER),
            "{second}"
        );
        assert!(!second.contains("필요"), "never heard: {second}");

        // Heard: half of round 0: round 1 was never heard at all.
        let (mut core, end) = answered_after_a_tool();
        let (out, end2) = speak(&mut core, end + 2000, 600);
        core.handle_cleared(at(end2), 500);
        core.handle_transcript(
            at(end2 + 100),
            transcribe_req(&out),
            Ok("그게 아니고요".into()),
        );
        let (_, messages) = complete(&drain(&mut core));
        let assistant: Vec<&Value> = messages
            .iter()
            .filter(|m| m["role"] == "assistant")
            .collect();
        assert!(
            assistant[0]["content"]
                .as_str()
                .unwrap()
                .ends_with(CUT_MARKER),
            "{messages:?}"
        );
        assert_eq!(assistant[1]["content"], "", "{messages:?}");
        // Every tool call still has its result, in order.
        assert_eq!(messages[3]["tool_call_id"], "c1", "{messages:?}");
    }
}
