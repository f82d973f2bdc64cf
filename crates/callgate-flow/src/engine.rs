//! The step engine: a sans-IO state machine that runs one call through a [`Flow`].
//!
//! Inputs, each given the time (`now`, read by the driver): [`Engine::start`],
//! [`Engine::handle_dtmf`], [`Engine::handle_mark`], [`Engine::handle_audio`] (while
//! recording), [`Engine::handle_timeout`], [`Engine::handle_done`] (speech, webhook and file
//! work the driver did off the call task) and [`Engine::handle_ended`]. Effects come out of
//! [`Engine::poll_output`]; [`Engine::poll_timeout`] is the next deadline. The invariant:
//! after every `handle_*`, drain `poll_output` before awaiting anything.
//!
//! The engine never reads a clock and does no I/O, so its tests run whole flows in
//! microseconds on a made-up clock; the driver (`agent`) moves bytes and time. Inside, times
//! are ms since the call began (the zero of every `at_ms` the call records).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_agent::{AgentCommand, CallInfo, MarkState, RecordEvent, Speaker, Turn};
use callgate_audio::pcm;
use callgate_proto::{Digit, Protocol};
use serde_json::{Value, json};

use crate::Error;
use crate::audio::PromptAudio;
use crate::messages::WAV_HEADER_BYTES;
use crate::spec::{Flow, Next, Prompt, PromptPart, StepKind};
use crate::tts::ProviderName;

/// The name of the flow's event-log entries.
pub const FLOW_STEP: &str = "flow_step";
/// Steps run one after another without waiting for anything, at most (a `goto` loop). Also
/// bounds the recursion of steps that end at once.
pub const MAX_INSTANT_STEPS: u32 = 100;
/// Caller audio below this RMS level (of full scale, about -40 dBFS) is silence to `record`.
pub const SILENCE_RMS: f64 = 0.01;
/// The largest webhook answer read.
pub const MAX_HTTP_ANSWER: usize = callgate_kit::http::MAX_ANSWER;
/// How long CallBridge has to end the call after accepting agent-terminate (its announcement
/// plays first) before the flow hangs up itself.
pub const TERMINATE_GRACE_MS: u64 = 60_000;
/// Gap between keys of a `send_dtmf` on the inbound protocol.
pub const DTMF_GAP_MS: u64 = 100;
/// Caller audio kept from before the voice detector fired, so a word's start is heard.
pub const PRE_ROLL_MS: u64 = 300;
/// The longest the caller may speak to a gather (then what was said is transcribed).
pub const MAX_SPEECH_MS: u64 = 15_000;

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this command to the call.
    Command(AgentCommand),
    /// Play a prompt (in the call's output format, cut into chunks).
    Play(Arc<PromptAudio>),
    /// Play 16-bit PCM at the call's output rate (speech rendered for this call).
    PlayPcm(Bytes),
    /// Drop everything not yet heard (the caller typed over a prompt).
    Clear,
    /// Render speech for this call, off the call task; answer with [`Done::Speech`].
    Speak {
        /// Answer with this.
        seq: u64,
        /// The text.
        text: String,
        /// The voice.
        voice: String,
        /// The provider.
        provider: ProviderName,
    },
    /// POST `body` to `url`; answer with [`Done::Http`].
    Http {
        /// Answer with this.
        seq: u64,
        /// Where.
        url: String,
        /// The JSON body.
        body: Value,
        /// How long the request may take.
        timeout: Duration,
    },
    /// POST `body` to CallBridge's `agent-terminate` API; answer with [`Done::Http`].
    Terminate {
        /// Answer with this.
        seq: u64,
        /// `{ivrIp, id, cdrId, callerNo, calleeNo, actionId, ment}`.
        body: Value,
        /// How long the request may take.
        timeout: Duration,
    },
    /// POST `body` to CallBridge's `messages/send-direct` API; answer with [`Done::Sms`].
    SendSms {
        /// Answer with this.
        seq: u64,
        /// `{agentId, cdrId, messageType, title?, content}`.
        body: Value,
        /// How long the request may take.
        timeout: Duration,
    },
    /// Reserve room in `data_dir/messages` for a recording: up to `bytes`, at least
    /// `min_bytes`; answer with [`Done::Reserved`]. The driver holds the reservation until
    /// the recording is written ([`Action::Save`]) or the call ends.
    Reserve {
        /// Answer with this.
        seq: u64,
        /// The most the recording may take (WAV header included).
        bytes: u64,
        /// Less than this is not worth recording.
        min_bytes: u64,
    },
    /// A `record` step stored nothing (count it): `full` or `call_limit`.
    MessageRefused {
        /// Why.
        reason: &'static str,
    },
    /// Write a recording (mono 16-bit WAV) to `path` under the data dir, within the
    /// reservation; answer with [`Done::Saved`].
    Save {
        /// Answer with this.
        seq: u64,
        /// Relative to the data dir.
        path: PathBuf,
        /// Sample rate.
        rate: u32,
        /// The audio.
        samples: Vec<i16>,
    },
    /// The caller started speaking to a gather: start an utterance with the recogniser of
    /// step `step` and push `samples` (the audio from just before the voice was detected).
    Listen {
        /// Names the utterance in what follows.
        seq: u64,
        /// The gather step (its `Listen` has the recogniser).
        step: usize,
        /// The first audio (16-bit, the call's input rate).
        samples: Vec<i16>,
    },
    /// More of the utterance.
    Hear {
        /// As in [`Action::Listen`].
        seq: u64,
        /// The audio.
        samples: Vec<i16>,
    },
    /// The caller stopped speaking: finish the utterance, off the call task; answer with
    /// [`Done::Transcript`].
    Transcribe {
        /// As in [`Action::Listen`].
        seq: u64,
    },
    /// Drop the utterance (a key came first, or the step ended).
    StopListening {
        /// As in [`Action::Listen`].
        seq: u64,
    },
    /// The flow is over (a hangup was sent): send what is queued, then stop.
    Finished,
}

/// Work the driver did for the engine.
#[derive(Debug)]
pub enum Done {
    /// Speech for [`Action::Speak`]: 16-bit PCM at the call's output rate, or why not.
    Speech {
        /// As asked.
        seq: u64,
        /// The audio or the error.
        result: Result<Bytes, Error>,
    },
    /// The answer to [`Action::Http`]: status and body, or why there is none.
    Http {
        /// As asked.
        seq: u64,
        /// Status and body, or the failure (connection refused, timeout...).
        result: Result<(u16, Bytes), Error>,
    },
    /// The answer to [`Action::SendSms`]: the answer's `data`, or why the message was not
    /// sent.
    Sms {
        /// As asked.
        seq: u64,
        /// The data or the error.
        result: Result<Value, Error>,
    },
    /// The answer to [`Action::Reserve`]: the bytes reserved, or `None` (no room).
    Reserved {
        /// As asked.
        seq: u64,
        /// The bytes reserved.
        granted: Option<u64>,
    },
    /// The text of an utterance ([`Action::Transcribe`]), or why there is none.
    Transcript {
        /// As asked.
        seq: u64,
        /// The text (empty: nothing recognised) or the error.
        result: Result<String, Error>,
    },
    /// [`Action::Save`] finished.
    Saved {
        /// As asked.
        seq: u64,
        /// Or why it failed.
        result: Result<(), Error>,
    },
}

/// A prompt being played.
#[derive(Debug)]
struct PromptRun {
    parts: VecDeque<PromptPart>,
    /// Waiting for this speech before going on.
    speech: Option<u64>,
    /// The mark sent after the last part.
    mark: Option<u64>,
    start_ms: u64,
    /// What the parts queued so far say (a file's name in brackets).
    label: Vec<String>,
    /// What the whole prompt says, when the flow gives it (`text`): the transcript's turn.
    words: Option<String>,
}

#[derive(Debug)]
struct GatherRun {
    attempt: u32,
    digits: String,
    first_ms: Option<u64>,
    listening: bool,
    /// The caller is speaking (an utterance is open).
    speech: Option<SpeechRun>,
    /// The utterance whose text is awaited: its seq and when it began and ended.
    awaiting: Option<(u64, u64, u64)>,
    /// The latest caller audio while nobody speaks (at most [`PRE_ROLL_MS`]).
    pre_roll: VecDeque<i16>,
}

#[derive(Debug)]
struct SpeechRun {
    seq: u64,
    start_ms: u64,
    /// Samples heard since the voice was last detected (silence is counted in audio, not
    /// in wall time: audio that arrives in a burst ends speech just the same).
    quiet: u64,
    /// Samples in the utterance.
    heard: u64,
}

#[derive(Debug)]
struct RecordRun {
    samples: Vec<i16>,
    max_samples: usize,
    silence_run: usize,
    silence_limit: Option<usize>,
    terminator: Option<Digit>,
    start_ms: u64,
    /// `max_samples` is the room reserved, shorter than `max_length`.
    limited: bool,
}

#[derive(Debug)]
enum State {
    /// Not started, or between steps.
    Idle,
    /// A play/say step: its prompt is playing.
    Playing,
    /// A pause or an echo: until the deadline.
    Waiting,
    /// A gather.
    Gathering(GatherRun),
    /// A send_dtmf on the inbound protocol: keys still to send, one per deadline.
    SendingDtmf(VecDeque<Digit>),
    /// Waiting for room to record in.
    Reserving { seq: u64 },
    /// Recording the caller.
    Recording(RecordRun),
    /// Writing the recording.
    Saving { seq: u64, path: String, ms: u64 },
    /// Waiting for a webhook.
    Http { seq: u64 },
    /// Waiting for CallBridge's answer to agent-terminate.
    Terminating { seq: u64 },
    /// Waiting for CallBridge's answer to send-direct.
    Texting { seq: u64 },
    /// CallBridge accepted agent-terminate: it announces and drops the line; if it has not
    /// by the deadline, the flow hangs up itself.
    AwaitingEnd,
    /// The flow is over.
    Done,
}

/// One call's run through a flow.
#[derive(Debug)]
pub struct Engine {
    flow: Arc<Flow>,
    /// When the call began: times are kept as ms since then.
    origin: Instant,
    protocol: Protocol,
    call_id: String,
    input_rate: u32,
    call_vars: BTreeMap<String, String>,
    vars: BTreeMap<String, String>,
    out: VecDeque<Action>,
    answered: bool,
    current: usize,
    state: State,
    prompt: Option<PromptRun>,
    deadline: Option<u64>,
    seq: u64,
    instant_steps: u32,
    recordings: u32,
    /// Bytes this call's recordings took (WAV headers included).
    message_bytes: u64,
    ended: bool,
}

impl Engine {
    /// An engine for one call that began at `origin` (the zero of every `at_ms` the call
    /// records, and of the engine's own ms).
    pub fn new(flow: Arc<Flow>, call: &CallInfo, origin: Instant) -> Self {
        Self {
            origin,
            current: flow.start,
            flow,
            protocol: call.protocol,
            call_id: call.call_id.clone(),
            input_rate: call.input_format.sample_rate(),
            call_vars: call
                .variables()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            vars: BTreeMap::new(),
            out: VecDeque::new(),
            answered: false,
            state: State::Idle,
            prompt: None,
            deadline: None,
            seq: 0,
            instant_steps: 0,
            recordings: 0,
            message_bytes: 0,
            ended: false,
        }
    }

    /// Starts the flow at its first step.
    pub fn start(&mut self, now: Instant) {
        let now = self.ms(now);
        let start = self.flow.start;
        self.enter(now, Some(start));
    }

    /// The next effect.
    pub fn poll_output(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When [`Engine::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
            .map(|ms| self.origin + Duration::from_millis(ms))
    }

    /// `now` as the engine counts time: ms since the call began.
    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether caller audio should be sent back (an `echo` step).
    pub fn is_echoing(&self) -> bool {
        matches!(self.state, State::Waiting)
            && matches!(self.flow.steps[self.current].kind, StepKind::Echo { .. })
    }

    /// Whether caller audio is wanted ([`Engine::handle_audio`]): a `record` step.
    pub fn is_recording(&self) -> bool {
        matches!(self.state, State::Recording(_))
    }

    /// Whether the flow is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// A variable's value: the flow's own first, then the call's.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .or_else(|| self.call_vars.get(name))
            .map(String::as_str)
    }

    /// The deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.ms(now);
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.deadline = None;
        let flow = self.flow.clone();
        let step = &flow.steps[self.current];
        match (&mut self.state, &step.kind) {
            (State::Waiting, StepKind::Pause { next, .. } | StepKind::Echo { next, .. }) => {
                self.finish(now, json!({}), *next);
            }
            (State::Gathering(run), StepKind::Gather(_)) => {
                if run.speech.is_some() {
                    self.end_speech(now);
                } else if run.digits.is_empty() {
                    self.gather_failed(now, "no_input", String::new());
                } else {
                    self.gather_complete(now);
                }
            }
            (State::SendingDtmf(_), _) => self.send_next_digit(now),
            (
                State::Terminating { .. },
                StepKind::AgentTerminate {
                    on_error, timeout, ..
                },
            ) => {
                let (on_error, timeout) = (*on_error, *timeout);
                self.finish(
                    now,
                    json!({"error": format!("no answer within {timeout:?}")}),
                    on_error,
                );
            }
            (State::Texting { .. }, StepKind::SendSms(s)) => {
                let (on_error, timeout) = (s.on_error, s.timeout);
                self.finish(
                    now,
                    json!({"error": format!("no answer within {timeout:?}")}),
                    on_error,
                );
            }
            (State::AwaitingEnd, _) => self.hangup(now),
            (State::Recording(_), _) => self.stop_recording(now, "max_length"),
            (State::Http { .. }, StepKind::Http(h)) => {
                let on_error = h.on_error;
                let timeout = h.timeout;
                self.finish(
                    now,
                    json!({"error": format!("no answer within {timeout:?}")}),
                    on_error,
                );
            }
            _ => {}
        }
    }

    /// The caller pressed a key.
    pub fn handle_dtmf(&mut self, now: Instant, digit: Digit) {
        let now = self.ms(now);
        match &mut self.state {
            State::Gathering(_) => {
                let StepKind::Gather(g) = &self.flow.steps[self.current].kind else {
                    return;
                };
                if g.dtmf {
                    self.stop_listening();
                    self.gather_digit(now, digit);
                }
            }
            State::Recording(run) if run.terminator == Some(digit) => {
                self.stop_recording(now, "terminator");
            }
            _ => {}
        }
    }

    /// A mark came back.
    pub fn handle_mark(&mut self, now: Instant, id: u64, state: MarkState) {
        let now = self.ms(now);
        let Some(prompt) = &self.prompt else {
            return;
        };
        if prompt.mark != Some(id) {
            return;
        }
        self.prompt_over(now, state == MarkState::Cleared);
        match &mut self.state {
            State::Playing => {
                if let StepKind::Play { next, .. } = self.flow.steps[self.current].kind {
                    self.finish(now, json!({}), next);
                }
            }
            State::Gathering(run) => {
                run.listening = true;
                if run.digits.is_empty() && run.speech.is_none() && run.awaiting.is_none() {
                    self.arm_gather_timer(now, true);
                }
            }
            _ => {}
        }
    }

    /// Caller audio (decoded), while recording.
    pub fn handle_audio(&mut self, now: Instant, samples: &[i16]) {
        let now = self.ms(now);
        let State::Recording(run) = &mut self.state else {
            return;
        };
        let room = run.max_samples.saturating_sub(run.samples.len());
        run.samples
            .extend_from_slice(&samples[..samples.len().min(room)]);
        if pcm::rms(samples) < SILENCE_RMS {
            run.silence_run += samples.len();
        } else {
            run.silence_run = 0;
        }
        if run.samples.len() >= run.max_samples {
            let why = if run.limited { "limit" } else { "max_length" };
            self.stop_recording(now, why);
        } else if run
            .silence_limit
            .is_some_and(|limit| run.silence_run >= limit)
        {
            self.stop_recording(now, "silence");
        }
    }

    /// Whether the caller's speech is wanted ([`Engine::handle_speech`]): a gather that
    /// listens, not yet waiting for a transcript.
    pub fn is_listening(&self) -> bool {
        let State::Gathering(run) = &self.state else {
            return false;
        };
        matches!(&self.flow.steps[self.current].kind, StepKind::Gather(g) if g.speech.is_some())
            && run.awaiting.is_none()
    }

    /// Caller audio (decoded) while listening, with the voice detector's verdict: speech
    /// that starts over the prompt cuts it (as a key does) and opens an utterance; silence
    /// for the step's `end_of_speech` ends it.
    pub fn handle_speech(&mut self, now: Instant, samples: &[i16], voiced: bool) {
        let now = self.ms(now);
        if !self.is_listening() {
            return;
        }
        let flow = self.flow.clone();
        let StepKind::Gather(g) = &flow.steps[self.current].kind else {
            return;
        };
        let Some(listen) = &g.speech else {
            return;
        };
        let pre_roll_max = (PRE_ROLL_MS * u64::from(self.input_rate) / 1000) as usize;
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        match &mut run.speech {
            Some(speech) => {
                let seq = speech.seq;
                let n = samples.len() as u64;
                speech.quiet = if voiced { 0 } else { speech.quiet + n };
                speech.heard += n;
                let rate = u64::from(self.input_rate);
                let over = speech.quiet * 1000 >= ms(listen.end_of_speech) * rate
                    || speech.heard * 1000 >= MAX_SPEECH_MS * rate;
                self.out.push_back(Action::Hear {
                    seq,
                    samples: samples.to_vec(),
                });
                if over {
                    self.end_speech(now);
                }
            }
            None if voiced => {
                let mut first: Vec<i16> = run.pre_roll.drain(..).collect();
                first.extend_from_slice(samples);
                let lead = first.len() as u64 * 1000 / u64::from(self.input_rate.max(1));
                self.seq += 1;
                let seq = self.seq;
                run.speech = Some(SpeechRun {
                    seq,
                    start_ms: now.saturating_sub(lead),
                    quiet: 0,
                    heard: first.len() as u64,
                });
                run.listening = true;
                self.deadline = Some(now + MAX_SPEECH_MS);
                self.instant_steps = 0;
                if self.prompt.is_some() {
                    // Speaking over the prompt: stop it at once, as a key does.
                    self.out.push_back(Action::Clear);
                    self.prompt_over(now, true);
                }
                self.out.push_back(Action::Listen {
                    seq,
                    step: self.current,
                    samples: first,
                });
            }
            None => {
                run.pre_roll.extend(samples);
                let extra = run.pre_roll.len().saturating_sub(pre_roll_max);
                run.pre_roll.drain(..extra);
            }
        }
    }

    /// Work the driver did.
    pub fn handle_done(&mut self, now: Instant, done: Done) {
        let now = self.ms(now);
        match done {
            Done::Transcript { seq, result } => self.transcript_done(now, seq, result),
            Done::Speech { seq, result } => {
                let Some(prompt) = &mut self.prompt else {
                    return;
                };
                if prompt.speech != Some(seq) {
                    return;
                }
                prompt.speech = None;
                match result {
                    Ok(pcm) => self.out.push_back(Action::PlayPcm(pcm)),
                    Err(error) => self.event(
                        self.current,
                        "error",
                        json!({ "error": format!("speech: {error}") }),
                    ),
                }
                self.pump_prompt(now);
            }
            Done::Http { seq, result } => {
                if matches!(self.state, State::Terminating { seq: s } if s == seq) {
                    self.deadline = None;
                    self.terminate_answer(now, result);
                    return;
                }
                if !matches!(self.state, State::Http { seq: s } if s == seq) {
                    return;
                }
                self.deadline = None;
                self.http_answer(now, result);
            }
            Done::Sms { seq, result } => {
                if !matches!(self.state, State::Texting { seq: s } if s == seq) {
                    return;
                }
                self.deadline = None;
                let StepKind::SendSms(step) = &self.flow.steps[self.current].kind else {
                    return;
                };
                let (next, on_error) = (step.next, step.on_error);
                match result {
                    Ok(data) => {
                        let sent = data
                            .get("result")
                            .map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_owned))
                            .unwrap_or_default();
                        self.vars.insert("sms_result".into(), sent);
                        // The answer (the masked number, the result), never the content.
                        self.finish(now, json!({ "sms": data }), next);
                    }
                    Err(error) => {
                        self.vars.insert("sms_result".into(), String::new());
                        self.finish(now, json!({ "error": error.to_string() }), on_error);
                    }
                }
            }
            Done::Reserved { seq, granted } => {
                if !matches!(self.state, State::Reserving { seq: s } if s == seq) {
                    return;
                }
                match granted {
                    Some(bytes) => self.begin_recording(now, bytes),
                    None => self.record_refused(now, "full"),
                }
            }
            Done::Saved { seq, result } => {
                let State::Saving { seq: s, path, ms } = &self.state else {
                    return;
                };
                if *s != seq {
                    return;
                }
                let (path, ms) = (path.clone(), *ms);
                let flow = self.flow.clone();
                let StepKind::Record(r) = &flow.steps[self.current].kind else {
                    return;
                };
                let next = r.next;
                match result {
                    Ok(()) => {
                        self.vars.insert(r.variable.clone(), path.clone());
                        self.vars
                            .insert(format!("{}_ms", r.variable), ms.to_string());
                        self.transcript(
                            Speaker::Caller,
                            format!("(recorded message {path}, {ms} ms)"),
                            now.saturating_sub(ms),
                            now,
                            false,
                        );
                        self.finish(now, json!({"path": path, "ms": ms}), next);
                    }
                    Err(error) => self.finish(now, json!({"error": error.to_string()}), next),
                }
            }
        }
    }

    /// The call ended: a recording in progress is kept (a caller who hangs up after the
    /// message is the usual end of one); everything else stops.
    pub fn handle_ended(&mut self, now: Instant) {
        let now = self.ms(now);
        self.ended = true;
        if matches!(self.state, State::Recording(_)) {
            self.stop_recording(now, "hangup");
            return;
        }
        if !matches!(self.state, State::Saving { .. } | State::Done) {
            self.state = State::Done;
            self.deadline = None;
            self.out.push_back(Action::Finished);
        }
    }

    // --- steps ---------------------------------------------------------------------------

    fn enter(&mut self, now: u64, next: Next) {
        let mut next = next;
        loop {
            let Some(index) = next.take() else {
                self.hangup(now);
                return;
            };
            if self.ended {
                self.state = State::Done;
                self.out.push_back(Action::Finished);
                return;
            }
            self.instant_steps += 1;
            if self.instant_steps > MAX_INSTANT_STEPS {
                self.event(
                    index,
                    "error",
                    json!({
                        "error": format!(
                            "{MAX_INSTANT_STEPS} steps ran without waiting for anything: \
                             a loop? hanging up"
                        ),
                    }),
                );
                self.hangup(now);
                return;
            }
            self.current = index;
            self.state = State::Idle;
            self.deadline = None;
            let flow = self.flow.clone();
            let step = &flow.steps[index];
            self.event(index, "start", json!({}));
            match &step.kind {
                StepKind::Answer { next: n } => {
                    self.answer();
                    next = self.result(json!({}), *n);
                }
                StepKind::Play { prompt, .. } => {
                    self.answer();
                    self.state = State::Playing;
                    self.begin_prompt(now, prompt);
                    return;
                }
                StepKind::Pause { duration, .. } | StepKind::Echo { duration, .. } => {
                    if matches!(step.kind, StepKind::Echo { .. }) {
                        self.answer();
                    }
                    self.state = State::Waiting;
                    self.deadline = Some(now + ms(*duration));
                    self.instant_steps = 0;
                    return;
                }
                StepKind::Gather(g) => {
                    self.answer();
                    self.state = State::Gathering(GatherRun {
                        attempt: 0,
                        digits: String::new(),
                        first_ms: None,
                        listening: false,
                        speech: None,
                        awaiting: None,
                        pre_roll: VecDeque::new(),
                    });
                    self.begin_attempt(now, &g.prompt);
                    return;
                }
                StepKind::Set { vars, next: n } => {
                    let values: Vec<(String, String)> = vars
                        .iter()
                        .map(|(k, t)| (k.clone(), t.render(|name| self.var(name))))
                        .collect();
                    let detail: serde_json::Map<String, Value> = values
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect();
                    self.vars.extend(values);
                    next = self.result(json!({"vars": detail}), *n);
                }
                StepKind::Goto { next: n } => next = self.result(json!({}), *n),
                StepKind::Branch {
                    variable,
                    on,
                    next: default,
                } => {
                    let value = self.var(variable).unwrap_or("").to_owned();
                    let target = on
                        .iter()
                        .find(|(v, _)| *v == value)
                        .map_or(*default, |(_, t)| *t);
                    next = self.result(json!({"value": value}), target);
                }
                StepKind::Hangup => {
                    let _ = self.result(json!({}), None);
                    self.hangup(now);
                    return;
                }
                StepKind::SendDtmf {
                    digits,
                    duration,
                    next: n,
                } => {
                    self.answer();
                    if self.protocol == Protocol::Inbound {
                        self.state = State::SendingDtmf(digits.iter().copied().collect());
                        self.send_next_digit(now);
                        return;
                    }
                    // CallBridge has no DTMF message: in-band tones, queued in the playout.
                    for &digit in digits {
                        self.command(AgentCommand::DtmfTone {
                            digit,
                            duration: *duration,
                        });
                    }
                    next = self.result(json!({"digits": digits_text(digits), "inband": true}), *n);
                }
                StepKind::Record(r) => {
                    self.answer();
                    // `instant_steps` is reset only once recording starts: a step refused at
                    // once (a full store) in a loop is stopped like any instant loop.
                    let rate = u64::from(self.input_rate);
                    let full = WAV_HEADER_BYTES + 2 * (rate * ms(r.max_length) / 1000);
                    let min_bytes = full.min(WAV_HEADER_BYTES + 2 * rate);
                    let left = self
                        .flow
                        .messages
                        .max_call_bytes
                        .saturating_sub(self.message_bytes);
                    if left < min_bytes {
                        self.record_refused(now, "call_limit");
                        return;
                    }
                    self.seq += 1;
                    self.state = State::Reserving { seq: self.seq };
                    self.out.push_back(Action::Reserve {
                        seq: self.seq,
                        bytes: full.min(left),
                        min_bytes,
                    });
                    return;
                }
                StepKind::AgentTerminate {
                    ment,
                    timeout,
                    on_error,
                } => {
                    if self.protocol != Protocol::CallBridge {
                        next = self.result(
                            json!({"error": "agent_terminate needs a CallBridge call"}),
                            *on_error,
                        );
                        continue;
                    }
                    // The announcement is for a connected call.
                    self.answer();
                    self.seq += 1;
                    let body = callgate_kit::callbridge::terminate_body(
                        |name| self.var(name),
                        &ment.render(|name| self.var(name)),
                    );
                    self.state = State::Terminating { seq: self.seq };
                    self.deadline = Some(now + ms(*timeout) + 1000);
                    self.instant_steps = 0;
                    self.out.push_back(Action::Terminate {
                        seq: self.seq,
                        body,
                        timeout: *timeout,
                    });
                    return;
                }
                StepKind::SendSms(step) => {
                    if self.protocol != Protocol::CallBridge {
                        next = self.result(
                            json!({"error": "send_sms needs a CallBridge call"}),
                            step.on_error,
                        );
                        continue;
                    }
                    let content = step.content.render(|name| self.var(name));
                    let title = step.title.as_ref().map(|t| t.render(|name| self.var(name)));
                    let body = callgate_kit::callbridge::Sms::new(&content, title.as_deref())
                        .and_then(|sms| {
                            callgate_kit::callbridge::sms_body(|name| self.var(name), &sms)
                        });
                    let body = match body {
                        Ok(body) => body,
                        Err(error) => {
                            self.vars.insert("sms_result".into(), String::new());
                            next = self.result(json!({"error": error.to_string()}), step.on_error);
                            continue;
                        }
                    };
                    self.seq += 1;
                    self.state = State::Texting { seq: self.seq };
                    self.deadline = Some(now + ms(step.timeout) + 1000);
                    self.instant_steps = 0;
                    self.out.push_back(Action::SendSms {
                        seq: self.seq,
                        body,
                        timeout: step.timeout,
                    });
                    return;
                }
                StepKind::Http(h) => {
                    let url = match h.url.render(|name| self.var(name)) {
                        Ok(url) => url,
                        Err(error) => {
                            // No request: the values would have changed the URL's path.
                            self.vars.insert("http_status".into(), String::new());
                            next = self.result(json!({"error": error.to_string()}), h.on_error);
                            continue;
                        }
                    };
                    self.seq += 1;
                    let body = json!({
                        "call_id": self.call_id,
                        "step": step.name,
                        "call": self.call_vars,
                        "variables": self.vars,
                    });
                    self.state = State::Http { seq: self.seq };
                    // A guard of our own beside the request's timeout: the call never hangs
                    // on a webhook, whatever the HTTP client does.
                    self.deadline = Some(now + ms(h.timeout) + 1000);
                    self.instant_steps = 0;
                    self.out.push_back(Action::Http {
                        seq: self.seq,
                        url,
                        body,
                        timeout: h.timeout,
                    });
                    return;
                }
            }
        }
    }

    /// Logs the current step's result (its fields, and `next`) and says where to go (for
    /// steps that end at once).
    fn result(&mut self, result: Value, next: Next) -> Next {
        let mut fields = result;
        fields["next"] = json!(next.map(|i| self.flow.steps[i].name.clone()));
        self.event(self.current, "end", fields);
        next
    }

    /// The current step is over: log its result and go on.
    fn finish(&mut self, now: u64, result: Value, next: Next) {
        let next = self.result(result, next);
        self.enter(now, next);
    }

    fn hangup(&mut self, _now: u64) {
        self.state = State::Done;
        self.deadline = None;
        self.prompt = None;
        self.command(AgentCommand::Hangup);
        self.out.push_back(Action::Finished);
    }

    fn answer(&mut self) {
        if !self.answered {
            self.answered = true;
            self.command(AgentCommand::Answer);
        }
    }

    fn send_next_digit(&mut self, now: u64) {
        let flow = self.flow.clone();
        let StepKind::SendDtmf {
            duration,
            next,
            digits,
        } = &flow.steps[self.current].kind
        else {
            return;
        };
        let (duration, next) = (*duration, *next);
        let State::SendingDtmf(left) = &mut self.state else {
            return;
        };
        if let Some(digit) = left.pop_front() {
            let more = !left.is_empty();
            self.command(AgentCommand::Dtmf { digit, duration });
            if more {
                self.deadline = Some(now + u64::from(duration.as_millis()) + DTMF_GAP_MS);
                self.instant_steps = 0;
                return;
            }
        }
        let text = digits_text(digits);
        self.finish(now, json!({"digits": text, "inband": false}), next);
    }

    // --- prompts -------------------------------------------------------------------------

    fn begin_prompt(&mut self, now: u64, prompt: &Prompt) {
        self.prompt = Some(PromptRun {
            parts: prompt.parts.iter().cloned().collect(),
            speech: None,
            mark: None,
            start_ms: now,
            label: Vec::new(),
            words: prompt.words.clone(),
        });
        self.instant_steps = 0;
        self.pump_prompt(now);
    }

    /// Queues the prompt's parts up to the next one that needs rendering, then its mark.
    fn pump_prompt(&mut self, _now: u64) {
        loop {
            let Some(prompt) = &mut self.prompt else {
                return;
            };
            if prompt.speech.is_some() || prompt.mark.is_some() {
                return;
            }
            match prompt.parts.pop_front() {
                Some(PromptPart::File(audio)) => {
                    prompt.label.push(format!("[{}]", audio.label));
                    self.out.push_back(Action::Play(audio));
                }
                Some(PromptPart::Audio(audio)) => {
                    prompt.label.push(audio.label.clone());
                    self.out.push_back(Action::Play(audio));
                }
                Some(PromptPart::Digits { text, files }) => {
                    let text = text.render(|name| {
                        self.vars
                            .get(name)
                            .or_else(|| self.call_vars.get(name))
                            .map(String::as_str)
                    });
                    let Some(prompt) = &mut self.prompt else {
                        return;
                    };
                    prompt.label.push(text.clone());
                    for key in text.chars() {
                        if let Some(audio) = files.get(&key) {
                            self.out.push_back(Action::Play(audio.clone()));
                        }
                    }
                }
                Some(PromptPart::Speak {
                    text,
                    voice,
                    provider,
                }) => {
                    let text = text.render(|name| {
                        self.vars
                            .get(name)
                            .or_else(|| self.call_vars.get(name))
                            .map(String::as_str)
                    });
                    self.seq += 1;
                    let Some(prompt) = &mut self.prompt else {
                        return;
                    };
                    prompt.label.push(text.clone());
                    prompt.speech = Some(self.seq);
                    self.out.push_back(Action::Speak {
                        seq: self.seq,
                        text,
                        voice,
                        provider,
                    });
                }
                None => {
                    self.seq += 1;
                    prompt.mark = Some(self.seq);
                    let id = self.seq;
                    self.command(AgentCommand::Mark(id));
                }
            }
        }
    }

    /// The prompt has been heard (or cut short): write its turn.
    fn prompt_over(&mut self, now: u64, interrupted: bool) {
        if let Some(prompt) = self.prompt.take() {
            let label = prompt.words.unwrap_or_else(|| prompt.label.join(" "));
            if !label.is_empty() {
                self.transcript(Speaker::Agent, label, prompt.start_ms, now, interrupted);
            }
        }
    }

    // --- gather --------------------------------------------------------------------------

    fn begin_attempt(&mut self, now: u64, prompt: &Prompt) {
        if let State::Gathering(run) = &mut self.state {
            run.digits.clear();
            run.first_ms = None;
            run.listening = prompt.is_empty();
            run.speech = None;
            run.awaiting = None;
            run.pre_roll.clear();
        }
        if prompt.is_empty() {
            self.arm_gather_timer(now, true);
        } else {
            self.begin_prompt(now, prompt);
        }
    }

    fn arm_gather_timer(&mut self, now: u64, first: bool) {
        let StepKind::Gather(g) = &self.flow.steps[self.current].kind else {
            return;
        };
        let wait = if first {
            g.first_digit_timeout
        } else {
            g.inter_digit_timeout
        };
        self.deadline = Some(now + ms(wait));
        self.instant_steps = 0;
    }

    fn gather_digit(&mut self, now: u64, digit: Digit) {
        let flow = self.flow.clone();
        let StepKind::Gather(g) = &flow.steps[self.current].kind else {
            return;
        };
        if self.prompt.is_some() {
            // Typing over the prompt: stop it at once; its mark comes back as cleared.
            self.out.push_back(Action::Clear);
            self.prompt_over(now, true);
        }
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        run.listening = true;
        if g.terminator == Some(digit) {
            if run.digits.is_empty() {
                self.gather_failed(now, "no_input", String::new());
            } else {
                self.gather_complete(now);
            }
            return;
        }
        run.first_ms.get_or_insert(now);
        run.digits.push(digit.as_char());
        if run.digits.len() >= g.max_digits {
            self.gather_complete(now);
        } else {
            self.arm_gather_timer(now, false);
        }
    }

    fn gather_complete(&mut self, now: u64) {
        let flow = self.flow.clone();
        let StepKind::Gather(g) = &flow.steps[self.current].kind else {
            return;
        };
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        let digits = std::mem::take(&mut run.digits);
        let start = run.first_ms.unwrap_or(now);
        let attempt = run.attempt;
        self.deadline = None;
        self.transcript(Speaker::Caller, digits.clone(), start, now, false);
        self.vars.insert(g.variable.clone(), digits.clone());
        if g.on.is_empty() {
            self.finish(
                now,
                json!({"digits": digits, "attempt": attempt + 1}),
                g.next,
            );
            return;
        }
        match g.on.iter().find(|(d, _)| *d == digits) {
            Some((_, target)) => {
                self.finish(
                    now,
                    json!({"digits": digits, "attempt": attempt + 1}),
                    *target,
                );
            }
            None => self.gather_failed(now, "no_match", digits),
        }
    }

    fn gather_failed(&mut self, now: u64, why: &'static str, digits: String) {
        self.gather_failed_with(now, why, digits, None);
    }

    /// Ends the caller's speech: its text is awaited.
    fn end_speech(&mut self, now: u64) {
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        let Some(speech) = run.speech.take() else {
            return;
        };
        run.awaiting = Some((speech.seq, speech.start_ms, now));
        // The recogniser has its own timeout and always answers.
        self.deadline = None;
        self.out.push_back(Action::Transcribe { seq: speech.seq });
    }

    /// Drops an open or awaited utterance (a key came first).
    fn stop_listening(&mut self) {
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        run.pre_roll.clear();
        if let Some(speech) = run.speech.take() {
            self.out
                .push_back(Action::StopListening { seq: speech.seq });
        }
        run.awaiting = None;
    }

    /// The text of what the caller said to a gather.
    fn transcript_done(&mut self, now: u64, seq: u64, result: Result<String, Error>) {
        let flow = self.flow.clone();
        let step = &flow.steps[self.current];
        let StepKind::Gather(g) = &step.kind else {
            return;
        };
        let Some(listen) = &g.speech else {
            return;
        };
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        let Some((awaited, start_ms, end_ms)) = run.awaiting else {
            return;
        };
        if awaited != seq {
            return;
        }
        run.awaiting = None;
        let attempt = run.attempt;
        let text = match result {
            Ok(text) => text.trim().to_owned(),
            Err(error) => {
                self.event(
                    self.current,
                    "error",
                    json!({ "error": format!("speech to text: {error}") }),
                );
                self.gather_failed_with(now, "stt_error", String::new(), None);
                return;
            }
        };
        if crate::stt::normalize(&text).is_empty() {
            // Noise the voice detector took for speech, or words the recogniser could not
            // make out: as if nothing was said.
            self.gather_failed_with(now, "no_input", String::new(), Some(text));
            return;
        }
        self.transcript(Speaker::Caller, text.clone(), start_ms, end_ms, false);
        self.vars
            .insert(format!("{}_transcript", g.variable), text.clone());
        if listen.expect.is_empty() {
            self.vars.insert(g.variable.clone(), text.clone());
            self.finish(
                now,
                json!({"input": "speech", "transcript": text, "attempt": attempt + 1}),
                g.next,
            );
            return;
        }
        match listen.pick(&text) {
            Some((key, target)) => {
                self.vars.insert(g.variable.clone(), key.to_owned());
                self.finish(
                    now,
                    json!({"input": "speech", "transcript": text, "match": key,
                           "attempt": attempt + 1}),
                    target,
                );
            }
            None => self.gather_failed_with(now, "no_match", String::new(), Some(text)),
        }
    }

    /// An attempt failed (`why`: no_input, no_match, stt_error): retry, or leave through
    /// `no_input` (no_match and stt_error: `no_match`). `transcript`: what the caller said,
    /// when they spoke.
    fn gather_failed_with(
        &mut self,
        now: u64,
        why: &'static str,
        digits: String,
        transcript: Option<String>,
    ) {
        let flow = self.flow.clone();
        let step = &flow.steps[self.current];
        let StepKind::Gather(g) = &step.kind else {
            return;
        };
        let State::Gathering(run) = &mut self.state else {
            return;
        };
        run.digits.clear();
        self.deadline = None;
        if run.attempt < g.retries {
            run.attempt += 1;
            let attempt = run.attempt;
            let mut result = json!({"outcome": why, "digits": digits, "attempt": attempt});
            if let Some(text) = &transcript {
                result["transcript"] = json!(text);
            }
            self.event(self.current, "retry", result);
            self.begin_attempt(now, &g.retry_prompt);
            return;
        }
        let attempts = run.attempt + 1;
        let target = if why == "no_input" {
            g.no_input
        } else {
            g.no_match
        };
        self.vars.insert(g.variable.clone(), digits.clone());
        let mut result = json!({"outcome": why, "digits": digits, "attempts": attempts});
        if let Some(text) = transcript {
            result["transcript"] = json!(text);
        }
        self.finish(now, result, target);
    }

    // --- record --------------------------------------------------------------------------

    /// Room for `bytes` was reserved: record.
    fn begin_recording(&mut self, now: u64, bytes: u64) {
        let StepKind::Record(r) = &self.flow.steps[self.current].kind else {
            return;
        };
        let rate = u64::from(self.input_rate);
        let length = rate * ms(r.max_length) / 1000;
        let room = bytes.saturating_sub(WAV_HEADER_BYTES) / 2;
        self.state = State::Recording(RecordRun {
            samples: Vec::new(),
            max_samples: usize::try_from(length.min(room)).unwrap_or(usize::MAX),
            silence_run: 0,
            silence_limit: r
                .silence
                .map(|d| usize::try_from(rate * ms(d) / 1000).unwrap_or(usize::MAX)),
            terminator: r.terminator,
            start_ms: now,
            limited: room < length,
        });
        self.deadline = Some(now + ms(r.max_length));
        self.instant_steps = 0;
    }

    /// Nothing can be recorded: the variable is empty and the step goes to `on_full`.
    fn record_refused(&mut self, now: u64, reason: &'static str) {
        let flow = self.flow.clone();
        let StepKind::Record(r) = &flow.steps[self.current].kind else {
            return;
        };
        self.state = State::Idle;
        self.out.push_back(Action::MessageRefused { reason });
        self.vars.insert(r.variable.clone(), String::new());
        self.vars.insert(format!("{}_ms", r.variable), "0".into());
        self.finish(now, json!({"refused": reason}), r.on_full);
    }

    fn stop_recording(&mut self, now: u64, why: &'static str) {
        let State::Recording(run) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        self.deadline = None;
        self.recordings += 1;
        let name = &self.flow.steps[self.current].name;
        let file = if self.recordings == 1 {
            format!("{name}.wav")
        } else {
            format!("{name}-{}.wav", self.recordings)
        };
        let path = format!("messages/{}/{file}", self.call_id);
        let ms = run.samples.len() as u64 * 1000 / u64::from(self.input_rate.max(1));
        self.message_bytes += WAV_HEADER_BYTES + 2 * run.samples.len() as u64;
        self.seq += 1;
        self.event(
            self.current,
            "stopped",
            json!({"reason": why, "ms": ms, "started_ms": run.start_ms, "at_ms": now}),
        );
        self.state = State::Saving {
            seq: self.seq,
            path: path.clone(),
            ms,
        };
        self.out.push_back(Action::Save {
            seq: self.seq,
            path: PathBuf::from(path),
            rate: self.input_rate,
            samples: run.samples,
        });
    }

    // --- http ----------------------------------------------------------------------------

    fn http_answer(&mut self, now: u64, result: Result<(u16, Bytes), Error>) {
        let flow = self.flow.clone();
        let StepKind::Http(h) = &flow.steps[self.current].kind else {
            return;
        };
        let fail = |this: &mut Self, status: Option<u16>, error: String| {
            this.vars.insert(
                "http_status".into(),
                status.map_or_else(String::new, |s| s.to_string()),
            );
            this.finish(now, json!({"status": status, "error": error}), h.on_error);
        };
        let (status, body) = match result {
            Ok(answer) => answer,
            Err(error) => return fail(self, None, error.to_string()),
        };
        if !(200..300).contains(&status) {
            return fail(self, Some(status), format!("HTTP {status}"));
        }
        let answer: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return fail(self, Some(status), format!("the answer is not JSON: {e}")),
            }
        };
        let Value::Object(answer) = answer else {
            return fail(self, Some(status), "the answer is not a JSON object".into());
        };
        let mut set = Vec::new();
        match answer.get("variables") {
            None | Some(Value::Null) => {}
            Some(Value::Object(vars)) => {
                for (k, v) in vars {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => {
                            return fail(
                                self,
                                Some(status),
                                format!("variables.{k} is not a string, number or boolean"),
                            );
                        }
                    };
                    if !crate::template::is_name(k) {
                        return fail(
                            self,
                            Some(status),
                            format!("variables: {k:?} is not a variable name"),
                        );
                    }
                    set.push((k.clone(), text));
                }
            }
            Some(_) => return fail(self, Some(status), "variables is not an object".into()),
        }
        let next = match answer.get("next") {
            None | Some(Value::Null) => h.next,
            Some(Value::String(name)) => match flow.step_index(name) {
                Some(i) => Some(i),
                None => {
                    return fail(
                        self,
                        Some(status),
                        format!("next: no step is named {name:?}"),
                    );
                }
            },
            Some(_) => return fail(self, Some(status), "next is not a string".into()),
        };
        let detail: serde_json::Map<String, Value> = set
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        self.vars.extend(set);
        self.vars.insert("http_status".into(), status.to_string());
        self.finish(now, json!({"status": status, "vars": detail}), next);
    }

    fn terminate_answer(&mut self, now: u64, result: Result<(u16, Bytes), Error>) {
        let StepKind::AgentTerminate { on_error, .. } = self.flow.steps[self.current].kind else {
            return;
        };
        match result {
            Ok((status, _)) if (200..300).contains(&status) => {
                let _ = self.result(json!({"status": status}), None);
                // CallBridge announces and drops the line: the call ends from its side.
                self.state = State::AwaitingEnd;
                self.deadline = Some(now + TERMINATE_GRACE_MS);
                self.instant_steps = 0;
            }
            Ok((status, _)) => {
                self.finish(
                    now,
                    json!({"status": status, "error": format!("HTTP {status}")}),
                    on_error,
                );
            }
            Err(error) => self.finish(now, json!({"error": error.to_string()}), on_error),
        }
    }

    // --- records -------------------------------------------------------------------------

    fn command(&mut self, command: AgentCommand) {
        self.out.push_back(Action::Command(command));
    }

    /// Writes a `flow_step` entry, flat (docs/events.md): `step`, `kind`, `phase`, then
    /// `fields` (an object: the phase's own fields).
    fn event(&mut self, index: usize, phase: &'static str, fields: Value) {
        let step = &self.flow.steps[index];
        let mut detail = match fields {
            Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        };
        detail.insert("step".into(), json!(step.name));
        detail.insert("kind".into(), json!(step.kind.name()));
        detail.insert("phase".into(), json!(phase));
        self.command(AgentCommand::FlatEvent(Box::new(RecordEvent {
            name: FLOW_STEP.into(),
            detail: Value::Object(detail),
        })));
    }

    fn transcript(
        &mut self,
        speaker: Speaker,
        text: String,
        start_ms: u64,
        end_ms: u64,
        interrupted: bool,
    ) {
        self.command(AgentCommand::Transcript(Box::new(Turn {
            speaker,
            text,
            start_ms,
            end_ms,
            interrupted,
        })));
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

fn digits_text(digits: &[Digit]) -> String {
    digits.iter().map(|d| d.as_char()).collect()
}

#[cfg(test)]
mod tests {
    use callgate_agent::PhoneInfo;
    use callgate_proto::AudioFormat;

    use super::*;
    use crate::spec::tests::parse;

    /// The test calls' start: every test reads the same clock, made once.
    #[allow(clippy::disallowed_methods)] // the test clock's origin
    fn t0() -> Instant {
        static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *T0
    }

    /// `ms` into the test call.
    fn at(ms: u64) -> Instant {
        t0() + Duration::from_millis(ms)
    }

    fn call(protocol: Protocol) -> CallInfo {
        CallInfo {
            call_id: "c1".into(),
            protocol,
            caller: "0101".into(),
            callee: "0202".into(),
            external_id: "e".into(),
            phone: PhoneInfo::Inbound {
                caller_id: "0101".into(),
                did_number: "0202".into(),
                session_id: "e".into(),
            },
            route: "r".into(),
            agent: "flow".into(),
            input_format: AudioFormat::Pcm8000,
            output_format: AudioFormat::Pcm8000,
        }
    }

    /// Drains the actions, summarised as short strings.
    fn drain(e: &mut Engine) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(a) = e.poll_output() {
            all.push(match a {
                Action::Command(AgentCommand::FlatEvent(ev)) => {
                    // step:phase:{the phase's own fields}
                    let mut fields = ev.detail.as_object().cloned().unwrap_or_default();
                    let mut take = |key: &str| match fields.remove(key) {
                        Some(Value::String(s)) => s,
                        _ => String::new(),
                    };
                    let (step, phase) = (take("step"), take("phase"));
                    let _ = (take("kind"), take("next"));
                    let fields = match phase.as_str() {
                        "start" | "error" => String::new(),
                        _ => Value::Object(fields).to_string(),
                    };
                    format!("{step}:{phase}:{fields}")
                }
                Action::Command(AgentCommand::Mark(id)) => format!("mark {id}"),
                Action::Command(AgentCommand::Transcript(t)) => {
                    format!("turn {}:{}", t.speaker.as_str(), t.text)
                }
                Action::Command(c) => format!("{c:?}"),
                Action::Play(p) => format!("play {}", p.label),
                Action::PlayPcm(_) => "play pcm".into(),
                Action::Clear => "clear".into(),
                Action::Speak { text, .. } => format!("speak {text}"),
                Action::Http { url, .. } => format!("http {url}"),
                Action::Terminate { body, .. } => format!("terminate {body}"),
                Action::SendSms { body, .. } => format!("sms {body}"),
                Action::Reserve {
                    bytes, min_bytes, ..
                } => format!("reserve {bytes} {min_bytes}"),
                Action::MessageRefused { reason } => format!("refused {reason}"),
                Action::Save { path, samples, .. } => {
                    format!("save {} {}", path.display(), samples.len())
                }
                Action::Listen { seq, samples, .. } => format!("listen {seq} {}", samples.len()),
                Action::Hear { seq, samples } => format!("hear {seq} {}", samples.len()),
                Action::Transcribe { seq } => format!("transcribe {seq}"),
                Action::StopListening { seq } => format!("stop listening {seq}"),
                Action::Finished => "finished".into(),
            });
        }
        all
    }

    fn engine(text: &str, protocol: Protocol) -> Engine {
        Engine::new(Arc::new(parse(text).unwrap()), &call(protocol), t0())
    }

    const MENU: &str = r#"
        [[step]]
        name = "menu"
        kind = "gather"
        say = "Press 1 or 2"
        retries = 1
        first_digit_timeout = "5s"
        on = { "1" = "one", "2" = "two" }
        no_input = "bye"
        [[step]]
        name = "one"
        kind = "say"
        text = "You chose one, {{caller}}"
        next = "bye"
        [[step]]
        name = "two"
        kind = "set"
        vars = { x = "{{digits}}!" }
        next = "bye"
        [[step]]
        name = "bye"
        kind = "hangup"
    "#;

    #[test]
    fn a_gather_retries_after_no_input_then_gives_up() {
        let mut e = engine(MENU, Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert_eq!(a[0], "menu:start:");
        assert_eq!(a[1], "Answer");
        assert_eq!(a[2], "play Press 1 or 2");
        assert_eq!(a[3], "mark 1");
        assert_eq!(
            e.poll_timeout(),
            None,
            "the timer starts when the prompt has played"
        );
        e.handle_mark(at(800), 1, MarkState::Played);
        assert_eq!(drain(&mut e), ["turn agent:Press 1 or 2"]);
        assert_eq!(e.poll_timeout(), Some(at(5800)));
        e.handle_timeout(at(5800));
        let a = drain(&mut e);
        assert!(a[0].starts_with("menu:retry:"), "{a:?}");
        assert!(a[0].contains("no_input"), "{a:?}");
        assert_eq!(a[1..], ["play Press 1 or 2", "mark 2"]);
        e.handle_mark(at(6600), 2, MarkState::Played);
        drain(&mut e);
        e.handle_timeout(at(11600));
        let a = drain(&mut e);
        assert!(
            a[0].starts_with("menu:end:") && a[0].contains("\"attempts\":2"),
            "{a:?}"
        );
        assert_eq!(a[1], "bye:start:");
        assert!(a.contains(&"Hangup".to_owned()) && a.last().unwrap() == "finished");
    }

    #[test]
    fn typing_over_the_prompt_clears_it_and_a_wrong_key_retries() {
        let mut e = engine(MENU, Protocol::Inbound);
        e.start(at(0));
        drain(&mut e);
        e.handle_dtmf(at(300), Digit::D9);
        let a = drain(&mut e);
        assert_eq!(a[0], "clear");
        assert_eq!(a[1], "turn agent:Press 1 or 2");
        assert_eq!(a[2], "turn caller:9");
        assert!(
            a[3].starts_with("menu:retry:") && a[3].contains("no_match"),
            "{a:?}"
        );
        // The cleared prompt's mark is ignored; the retry's is awaited.
        e.handle_mark(at(310), 1, MarkState::Cleared);
        assert!(drain(&mut e).is_empty());
        e.handle_dtmf(at(400), Digit::D1);
        let a = drain(&mut e);
        assert_eq!(a[0], "clear");
        assert!(
            a.iter()
                .any(|s| s.starts_with("menu:end:") && s.contains("\"digits\":\"1\"")),
            "{a:?}"
        );
        assert!(a.iter().any(|s| s == "speak You chose one, 0101"), "{a:?}");
    }

    /// The `flow_step` details the engine wrote, in order.
    fn entries(e: &mut Engine) -> Vec<Value> {
        std::iter::from_fn(|| e.poll_output())
            .filter_map(|a| match a {
                Action::Command(AgentCommand::FlatEvent(ev)) if ev.name == FLOW_STEP => {
                    Some(ev.detail)
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn flow_step_entries_are_flat() {
        let mut e = engine(MENU, Protocol::Inbound);
        e.start(at(0));
        e.handle_mark(at(100), 1, MarkState::Played);
        e.handle_timeout(at(5100));
        e.handle_mark(at(5900), 2, MarkState::Played);
        e.handle_dtmf(at(6000), Digit::D2);
        let all = entries(&mut e);
        assert_eq!(
            all[0],
            json!({"step": "menu", "kind": "gather", "phase": "start"})
        );
        assert_eq!(
            all[1],
            json!({"step": "menu", "kind": "gather", "phase": "retry",
                   "outcome": "no_input", "digits": "", "attempt": 1})
        );
        assert_eq!(
            all[2],
            json!({"step": "menu", "kind": "gather", "phase": "end",
                   "digits": "2", "attempt": 2, "next": "two"})
        );
        assert_eq!(
            all[4],
            json!({"step": "two", "kind": "set", "phase": "end",
                   "vars": {"x": "2!"}, "next": "bye"})
        );
        for entry in &all {
            assert!(
                entry.get("result").is_none() && entry.get("detail").is_none(),
                "nothing nests: {entry}"
            );
        }
    }

    #[test]
    fn a_prompt_says_its_words_and_a_file_without_them_its_name_in_brackets() {
        let dir = std::env::temp_dir().join(format!(
            "callgate-flow-words-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for name in ["hello.wav", "beep.wav"] {
            callgate_kit::files::write_wav(&dir.join(name), 8000, &[1000; 800]).expect("wav");
        }
        let text = r#"
            [[step]]
            name = "hello"
            kind = "play"
            file = ["hello.wav", "beep.wav"]
            text = "Hello there."
            [[step]]
            name = "bare"
            kind = "play"
            file = ["hello.wav", "beep.wav"]
        "#;
        let flow = Flow::parse(
            &dir.join("words.toml"),
            text,
            &crate::tts::TtsSettings::default(),
            &crate::spec::tests::FakeLoader,
        );
        let _ = std::fs::remove_dir_all(&dir);
        let mut e = Engine::new(
            Arc::new(flow.expect("valid")),
            &call(Protocol::Inbound),
            t0(),
        );
        e.start(at(0));
        let a = drain(&mut e);
        assert!(a.contains(&"play hello.wav".to_owned()), "{a:?}");
        e.handle_mark(at(200), 1, MarkState::Played);
        let a = drain(&mut e);
        assert_eq!(a[0], "turn agent:Hello there.", "the words, not the files");
        // Cut short, the turn is the same words, marked interrupted.
        e.handle_mark(at(250), 2, MarkState::Cleared);
        let turns: Vec<Turn> = std::iter::from_fn(|| e.poll_output())
            .filter_map(|a| match a {
                Action::Command(AgentCommand::Transcript(t)) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(
            turns[0].text, "[hello.wav] [beep.wav]",
            "no words: the files"
        );
        assert!(turns[0].interrupted);
    }

    #[test]
    fn set_and_templates_use_gathered_digits() {
        let mut e = engine(MENU, Protocol::Inbound);
        e.start(at(0));
        drain(&mut e);
        e.handle_mark(at(100), 1, MarkState::Played);
        e.handle_dtmf(at(200), Digit::D2);
        drain(&mut e);
        assert_eq!(e.var("x"), Some("2!"));
        assert_eq!(e.var("caller"), Some("0101"));
        assert!(e.is_finished());
    }

    #[test]
    fn multi_digit_gather_with_terminator_and_inter_digit_timeout() {
        let text = r#"
            [[step]]
            name = "pin"
            kind = "gather"
            max_digits = 4
            inter_digit_timeout = "2s"
            next = "done"
            [[step]]
            name = "done"
            kind = "hangup"
        "#;
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        drain(&mut e);
        assert_eq!(
            e.poll_timeout(),
            Some(at(5000)),
            "no prompt: the first-digit timer runs"
        );
        e.handle_dtmf(at(1000), Digit::D4);
        assert_eq!(e.poll_timeout(), Some(at(3000)));
        e.handle_dtmf(at(1500), Digit::D2);
        e.handle_dtmf(at(1600), Digit::Pound);
        drain(&mut e);
        assert_eq!(e.var("digits"), Some("42"));
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        e.handle_dtmf(at(1000), Digit::D7);
        e.handle_timeout(at(3000));
        assert_eq!(
            e.var("digits"),
            Some("7"),
            "the inter-digit timeout ends the input"
        );
    }

    #[test]
    fn send_dtmf_is_protocol_dtmf_on_inbound_and_tones_on_callbridge() {
        let text = "[[step]]\nname = \"k\"\nkind = \"send_dtmf\"\ndigits = \"12\"\n";
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert!(a.iter().any(|s| s.starts_with("Dtmf { digit: D1")), "{a:?}");
        assert_eq!(e.poll_timeout(), Some(at(300)));
        e.handle_timeout(at(300));
        let a = drain(&mut e);
        assert!(a[0].starts_with("Dtmf { digit: D2"), "{a:?}");
        assert!(
            a.contains(&"Hangup".to_owned()),
            "runs off the end: hang up"
        );
        let mut e = engine(text, Protocol::CallBridge);
        e.start(at(0));
        let a = drain(&mut e);
        assert_eq!(
            a.iter().filter(|s| s.starts_with("DtmfTone")).count(),
            2,
            "{a:?}"
        );
    }

    #[test]
    fn a_recording_ends_on_silence_or_the_terminator_and_is_saved() {
        let text = r#"
            [[step]]
            name = "msg"
            kind = "record"
            silence = "1s"
            max_length = "10s"
        "#;
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        assert!(
            drain(&mut e).contains(&"reserve 160044 16044".to_owned()),
            "10 s at 8 kHz, at least 1 s"
        );
        assert!(!e.is_recording(), "not before the room is reserved");
        e.handle_done(at(0), reserved(1, 160_044));
        assert!(e.is_recording());
        e.handle_audio(at(20), &[5000i16; 160]);
        for i in 0..50 {
            e.handle_audio(at(40 + i * 20), &[0i16; 160]);
        }
        let a = drain(&mut e);
        assert!(
            a.iter().any(|s| s.contains("\"reason\":\"silence\"")),
            "{a:?}"
        );
        assert!(
            a.iter().any(|s| s == "save messages/c1/msg.wav 8160"),
            "{a:?}"
        );
        e.handle_done(
            at(1100),
            Done::Saved {
                seq: 2,
                result: Ok(()),
            },
        );
        let a = drain(&mut e);
        assert!(
            a.iter()
                .any(|s| s.starts_with("msg:end:") && s.contains("\"ms\":1020")),
            "{a:?}"
        );
        assert_eq!(e.var("recording"), Some("messages/c1/msg.wav"));

        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        e.handle_done(at(0), reserved(1, 160_044));
        e.handle_audio(at(20), &[5000i16; 160]);
        e.handle_dtmf(at(40), Digit::Pound);
        assert!(drain(&mut e).iter().any(|s| s.contains("terminator")));
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        e.handle_done(at(0), reserved(1, 160_044));
        e.handle_audio(at(20), &[5000i16; 160]);
        e.handle_ended(at(40));
        assert!(
            drain(&mut e).iter().any(|s| s.starts_with("save")),
            "kept at hangup"
        );
    }

    fn reserved(seq: u64, bytes: u64) -> Done {
        Done::Reserved {
            seq,
            granted: Some(bytes),
        }
    }

    #[test]
    fn recordings_stay_within_the_room_reserved_and_the_calls_share() {
        // 3 s at most per call (48,000 bytes of audio at 8 kHz, plus a header).
        let text = r#"
            [messages]
            max_call_bytes = 48044
            [[step]]
            name = "msg"
            kind = "record"
            max_length = "2s"
            on_full = "full"
            next = "again"
            [[step]]
            name = "again"
            kind = "record"
            max_length = "2s"
            on_full = "full"
            next = "bye"
            [[step]]
            name = "bye"
            kind = "hangup"
            [[step]]
            name = "full"
            kind = "hangup"
        "#;
        // The store has room for only half a second more than the minimum: the recording
        // stops at the room, as `limit`.
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        assert!(drain(&mut e).contains(&"reserve 32044 16044".to_owned()));
        e.handle_done(at(0), reserved(1, 24_044));
        for i in 0..100 {
            e.handle_audio(at(20 + i * 20), &[5000i16; 160]);
        }
        let a = drain(&mut e);
        assert!(
            a.contains(&"save messages/c1/msg.wav 12000".to_owned()),
            "{a:?}"
        );
        assert!(
            a.iter().any(|s| s.contains("\"reason\":\"limit\"")),
            "{a:?}"
        );
        e.handle_done(
            at(2000),
            Done::Saved {
                seq: 2,
                result: Ok(()),
            },
        );
        // The call has 48,044 - 24,044 = 24,000 bytes left: the next asks for at most that.
        let a = drain(&mut e);
        assert!(a.contains(&"reserve 24000 16044".to_owned()), "{a:?}");
        // The store is full: nothing is recorded, the variable is empty, on_full is taken.
        e.handle_done(
            at(2000),
            Done::Reserved {
                seq: 3,
                granted: None,
            },
        );
        let a = drain(&mut e);
        assert!(a.contains(&"refused full".to_owned()), "{a:?}");
        assert!(a.contains(&"full:start:".to_owned()), "{a:?}");
        assert!(!e.is_recording());
        assert_eq!(
            (e.var("recording"), e.var("recording_ms")),
            (Some(""), Some("0"))
        );

        // A call whose share is spent is refused without asking the store.
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        drain(&mut e);
        e.handle_done(at(0), reserved(1, 32_044));
        for i in 0..100 {
            e.handle_audio(at(20 + i * 20), &[5000i16; 160]);
        }
        e.handle_done(
            at(2000),
            Done::Saved {
                seq: 2,
                result: Ok(()),
            },
        );
        let a = drain(&mut e);
        assert!(
            !a.iter().any(|s| s.starts_with("reserve"))
                && a.contains(&"refused call_limit".to_owned()),
            "16,000 bytes left is less than a second: {a:?}"
        );
        assert!(a.contains(&"full:start:".to_owned()), "{a:?}");
    }

    #[test]
    fn a_loop_back_to_a_refused_record_step_is_stopped() {
        let text = r#"
            [messages]
            max_call_bytes = 100
            [[step]]
            name = "msg"
            kind = "record"
            on_full = "again"
            [[step]]
            name = "again"
            kind = "goto"
            next = "msg"
        "#;
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert!(a.iter().any(|s| s == "msg:error:"), "{a:?}");
        assert!(e.is_finished());
        // The same when the store is what refuses: each answer comes back at once.
        let text = text.replace("max_call_bytes = 100", "max_call_bytes = 1000000");
        let mut e = engine(&text, Protocol::Inbound);
        e.start(at(0));
        let mut rounds = 0;
        loop {
            let a = drain(&mut e);
            if e.is_finished() {
                assert!(a.iter().any(|s| s == "msg:error:"), "{a:?}");
                break;
            }
            rounds += 1;
            assert!(rounds <= MAX_INSTANT_STEPS, "the loop was not stopped");
            e.handle_done(
                at(0),
                Done::Reserved {
                    seq: e.seq,
                    granted: None,
                },
            );
        }
    }

    #[test]
    fn webhook_answers_set_variables_choose_steps_or_take_the_error_branch() {
        let text = r#"
            [[step]]
            name = "ask"
            kind = "http"
            url = "http://example.invalid/{{caller}}"
            timeout = "2s"
            on_error = "failed"
            next = "ok"
            [[step]]
            name = "ok"
            kind = "hangup"
            [[step]]
            name = "other"
            kind = "hangup"
            [[step]]
            name = "failed"
            kind = "hangup"
        "#;
        let run = |answer: Option<Result<(u16, Bytes), Error>>| -> (Vec<String>, Engine) {
            let mut e = engine(text, Protocol::Inbound);
            e.start(at(0));
            let a = drain(&mut e);
            assert!(
                a.contains(&"http http://example.invalid/0101".to_owned()),
                "{a:?}"
            );
            match answer {
                Some(result) => e.handle_done(at(50), Done::Http { seq: 1, result }),
                None => e.handle_timeout(at(3000)),
            }
            (drain(&mut e), e)
        };
        let went = |a: &[String]| {
            a.iter()
                .find(|s| s.ends_with(":start:"))
                .cloned()
                .unwrap_or_default()
        };
        let (a, e) = run(Some(Ok((
            200,
            Bytes::from_static(br#"{"variables":{"name":"Kim","n":3}}"#),
        ))));
        assert_eq!(went(&a), "ok:start:");
        assert_eq!(
            (e.var("name"), e.var("n"), e.var("http_status")),
            (Some("Kim"), Some("3"), Some("200"))
        );
        let (a, _) = run(Some(Ok((200, Bytes::from_static(br#"{"next":"other"}"#)))));
        assert_eq!(went(&a), "other:start:");
        for bad in [
            Ok((500, Bytes::new())),
            Ok((200, Bytes::from_static(b"<html>"))),
            Ok((200, Bytes::from_static(b"[1]"))),
            Ok((200, Bytes::from_static(br#"{"next":"nowhere"}"#))),
            Ok((200, Bytes::from_static(br#"{"variables":{"a":[1]}}"#))),
            Err(Error::Request(callgate_kit::http::Error::Timeout(
                Duration::from_secs(3),
            ))),
        ] {
            let shown = format!("{bad:?}");
            let (a, _) = run(Some(bad));
            assert_eq!(went(&a), "failed:start:", "{shown}: {a:?}");
        }
        let (a, _) = run(None);
        assert_eq!(went(&a), "failed:start:", "our own guard: {a:?}");
    }

    #[test]
    fn a_value_that_would_be_a_dot_segment_takes_the_error_branch_without_a_request() {
        let text = r#"
            [[step]]
            name = "ask"
            kind = "http"
            url = "http://example.invalid/customers/{{caller}}/lookup"
            on_error = "failed"
            [[step]]
            name = "ok"
            kind = "hangup"
            [[step]]
            name = "failed"
            kind = "hangup"
        "#;
        for (caller, failed) in [("..", true), (".", true), ("...", false), ("0101", false)] {
            let mut info = call(Protocol::Inbound);
            info.caller = caller.into();
            let mut e = Engine::new(Arc::new(parse(text).unwrap()), &info, t0());
            e.start(at(0));
            let a = drain(&mut e);
            let requested = a.iter().any(|s| s.starts_with("http "));
            assert_eq!(requested, !failed, "{caller:?}: {a:?}");
            assert_eq!(
                a.iter().any(|s| s == "failed:start:"),
                failed,
                "{caller:?}: {a:?}"
            );
            if failed {
                let end = a.iter().find(|s| s.starts_with("ask:end:")).unwrap();
                assert!(end.contains("path segment"), "{end}");
            }
        }
    }

    #[test]
    fn agent_terminate_asks_callbridge_then_waits_for_the_line_to_drop() {
        let text = r#"
            [[step]]
            name = "bye"
            kind = "agent_terminate"
            ment = "Goodbye {{caller}}"
            on_error = "fallback"
            [[step]]
            name = "fallback"
            kind = "hangup"
        "#;
        let mut e = engine(text, Protocol::CallBridge);
        e.start(at(0));
        let a = drain(&mut e);
        let body = a
            .iter()
            .find(|s| s.starts_with("terminate "))
            .expect("the request");
        assert!(
            body.contains("\"ment\":\"Goodbye 0101\"") && body.contains("\"callerNo\":\"0101\""),
            "{body}"
        );
        e.handle_done(
            at(40),
            Done::Http {
                seq: 1,
                result: Ok((200, Bytes::new())),
            },
        );
        let a = drain(&mut e);
        assert!(
            a.iter()
                .any(|s| s.starts_with("bye:end:") && s.contains("200")),
            "{a:?}"
        );
        assert!(
            !a.contains(&"Hangup".to_owned()),
            "CallBridge drops the line"
        );
        assert_eq!(e.poll_timeout(), Some(at(40 + TERMINATE_GRACE_MS)));
        e.handle_timeout(at(40 + TERMINATE_GRACE_MS));
        assert!(
            drain(&mut e).contains(&"Hangup".to_owned()),
            "unless it does not"
        );

        let mut e = engine(text, Protocol::CallBridge);
        e.start(at(0));
        drain(&mut e);
        e.handle_done(
            at(40),
            Done::Http {
                seq: 1,
                result: Ok((401, Bytes::new())),
            },
        );
        assert!(drain(&mut e).iter().any(|s| s == "fallback:start:"));
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert!(
            a.iter().any(|s| s.contains("needs a CallBridge call")),
            "{a:?}"
        );
        assert!(a.iter().any(|s| s == "fallback:start:"));
    }

    fn sms_flow(content: &str) -> String {
        format!(
            r#"
            [[step]]
            name = "ids"
            kind = "set"
            vars = {{ agentId = "17", cdrId = "c-1", long = "{long}" }}
            [[step]]
            name = "text"
            kind = "send_sms"
            content = "{content}"
            title = "{{{{caller}}}} 안내"
            timeout = "2s"
            on_error = "failed"
            [[step]]
            name = "done"
            kind = "hangup"
            [[step]]
            name = "failed"
            kind = "hangup"
        "#,
            long = "가".repeat(2001)
        )
    }

    #[test]
    fn send_sms_sends_the_rendered_message_and_branches_on_the_answer() {
        let text = sms_flow("요금은 {{caller}}원");
        let mut e = engine(&text, Protocol::CallBridge);
        e.start(at(0));
        let a = drain(&mut e);
        let sms = a
            .iter()
            .find(|s| s.starts_with("sms "))
            .expect("the request");
        let body: Value = serde_json::from_str(&sms[4..]).unwrap();
        assert_eq!(
            body,
            json!({"agentId": 17, "cdrId": "c-1", "messageType": "LMS",
                   "title": "0101 안내", "content": "요금은 0101원"})
        );
        e.handle_done(
            at(40),
            Done::Sms {
                seq: 1,
                result: Ok(json!({"result": "REQUESTED", "phoneNumber": "010****1234"})),
            },
        );
        let a = drain(&mut e);
        assert!(a.iter().any(|s| s == "done:start:"), "{a:?}");
        assert_eq!(e.var("sms_result"), Some("REQUESTED"));

        // An error, and no answer in time, take on_error.
        let mut e = engine(&text, Protocol::CallBridge);
        e.start(at(0));
        drain(&mut e);
        e.handle_done(
            at(40),
            Done::Sms {
                seq: 1,
                result: Err(Error::Sms(callgate_kit::callbridge::SmsError::Refused {
                    status: 500,
                    code: None,
                    message: String::new(),
                })),
            },
        );
        assert!(drain(&mut e).iter().any(|s| s == "failed:start:"));
        let mut e = engine(&text, Protocol::CallBridge);
        e.start(at(0));
        drain(&mut e);
        assert_eq!(e.poll_timeout(), Some(at(3000)));
        e.handle_timeout(at(3000));
        let a = drain(&mut e);
        assert!(a.iter().any(|s| s.contains("no answer within")), "{a:?}");
        assert!(a.iter().any(|s| s == "failed:start:"));
    }

    #[test]
    fn send_sms_on_an_inbound_call_or_with_too_long_content_sends_nothing() {
        let mut e = engine(&sms_flow("안녕하세요"), Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert!(
            a.iter().any(|s| s.contains("needs a CallBridge call")),
            "{a:?}"
        );
        assert!(a.iter().any(|s| s == "failed:start:"));
        assert!(!a.iter().any(|s| s.starts_with("sms ")));
        let mut e = engine(&sms_flow("{{long}}"), Protocol::CallBridge);
        e.start(at(0));
        let a = drain(&mut e);
        assert!(a.iter().any(|s| s.contains("2001 characters")), "{a:?}");
        assert!(a.iter().any(|s| s == "failed:start:"));
        assert!(!a.iter().any(|s| s.starts_with("sms ")));
        // Fixed text is checked when the flow loads.
        let fixed = format!(
            "[[step]]\nname = \"text\"\nkind = \"send_sms\"\ncontent = \"{}\"\n",
            "가".repeat(2001)
        );
        let Err(error) = parse(&fixed) else {
            panic!("2001 characters were accepted");
        };
        let error = error.to_string();
        assert!(
            error.contains("content") && error.contains("2001"),
            "{error}"
        );
    }

    #[test]
    fn the_seed_demo_keeps_the_documents_timing_to_the_millisecond() {
        let text = std::str::from_utf8(crate::demo::file("seed-demo.toml").unwrap()).unwrap();
        // The commands, without the flow_step events.
        let commands = |e: &mut Engine| -> Vec<String> {
            drain(e)
                .into_iter()
                .filter(|s| !s.contains(":start:") && !s.contains(":end:"))
                .collect()
        };
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        assert_eq!(commands(&mut e), ["Answer"]);
        assert_eq!(
            e.poll_timeout(),
            Some(at(2000)),
            "DTMF two seconds after the answer"
        );
        e.handle_timeout(at(2000));
        let a = commands(&mut e);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(
            a[0].starts_with("Dtmf { digit: D1, duration: DtmfDuration(200)"),
            "{a:?}"
        );
        assert!(e.is_echoing(), "the echo starts with the DTMF");
        assert_eq!(e.poll_timeout(), Some(at(12000)), "ten seconds of echo");
        e.handle_timeout(at(12000));
        assert_eq!(commands(&mut e), ["Hangup", "finished"]);

        let mut e = engine(text, Protocol::CallBridge);
        e.start(at(0));
        assert_eq!(commands(&mut e), ["Answer"]);
        e.handle_timeout(at(2000));
        assert!(commands(&mut e).is_empty(), "no DTMF on CallBridge");
        assert!(e.is_echoing());
        assert_eq!(e.poll_timeout(), Some(at(12000)));
    }

    #[test]
    fn a_goto_loop_is_stopped() {
        let text = "[[step]]\nname = \"a\"\nkind = \"goto\"\nnext = \"a\"\n";
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert!(a.iter().any(|s| s.starts_with("a:error")), "{a:?}");
        assert!(e.is_finished());
    }

    #[test]
    fn per_call_speech_waits_for_rendering() {
        let text = "[[step]]\nname = \"hi\"\nkind = \"say\"\ntext = \"Hi {{caller}}\"\n";
        let mut e = engine(text, Protocol::Inbound);
        e.start(at(0));
        let a = drain(&mut e);
        assert_eq!(a.last().unwrap(), "speak Hi 0101");
        e.handle_done(
            at(30),
            Done::Speech {
                seq: 1,
                result: Ok(Bytes::from_static(&[0, 0])),
            },
        );
        assert_eq!(drain(&mut e), ["play pcm", "mark 2"]);
        e.handle_mark(at(100), 2, MarkState::Played);
        let a = drain(&mut e);
        assert_eq!(a[0], "turn agent:Hi 0101");
        assert!(a.contains(&"Hangup".to_owned()));
    }

    const LISTENING_MENU: &str = r#"
        [[step]]
        name = "menu"
        kind = "gather"
        say = "Press 1 or say billing"
        input = ["dtmf", "speech"]
        on = { "1" = "billing" }
        expect = { billing = ["요금", "청구", "billing"], agent = ["상담원"] }
        end_of_speech = "200ms"
        retries = 1
        [[step]]
        name = "billing"
        kind = "hangup"
        [[step]]
        name = "agent"
        kind = "hangup"
    "#;

    /// 20 ms frames at 8 kHz: `voiced` frames of speech, then `quiet` of silence.
    fn speak(e: &mut Engine, now: &mut u64, voiced: usize, quiet: usize) -> Vec<String> {
        let frame = [100i16; 160];
        let mut all = Vec::new();
        for i in 0..voiced + quiet {
            *now += 20;
            e.handle_speech(at(*now), &frame, i < voiced);
            all.extend(drain(e));
        }
        all
    }

    fn listening_menu() -> (Engine, u64) {
        let mut e = engine(LISTENING_MENU, Protocol::CallBridge);
        e.start(at(0));
        let out = drain(&mut e);
        assert!(out.iter().any(|a| a.starts_with("play Press 1")), "{out:?}");
        (e, 0)
    }

    #[test]
    fn speech_over_the_prompt_cuts_it_and_its_transcript_picks_the_branch() {
        let (mut e, mut now) = listening_menu();
        assert!(
            e.is_listening(),
            "a gather that listens hears the prompt's time too"
        );
        // Silence first: kept as pre-roll, nothing sent.
        assert!(speak(&mut e, &mut now, 0, 25).is_empty());
        let out = speak(&mut e, &mut now, 10, 0);
        assert_eq!(out[0], "clear", "{out:?}");
        assert!(out.iter().any(|a| a.starts_with("turn agent:")), "{out:?}");
        // The pre-roll (300 ms) and the first frame open the utterance.
        assert!(out.contains(&"listen 2 2560".to_owned()), "{out:?}");
        // 200 ms of silence ends it (10 frames), not before.
        let out = speak(&mut e, &mut now, 0, 9);
        assert!(!out.iter().any(|a| a.starts_with("transcribe")), "{out:?}");
        let out = speak(&mut e, &mut now, 0, 1);
        assert_eq!(
            out.last().map(String::as_str),
            Some("transcribe 2"),
            "{out:?}"
        );
        assert!(!e.is_listening(), "waiting for the text");
        e.handle_done(
            at(now),
            Done::Transcript {
                seq: 2,
                result: Ok("음 요금 문의요.".into()),
            },
        );
        let out = drain(&mut e);
        assert!(
            out.contains(&"turn caller:음 요금 문의요.".to_owned()),
            "{out:?}"
        );
        let end = out
            .iter()
            .find(|a| a.starts_with("menu:end"))
            .expect("the end");
        assert!(end.contains("\"match\":\"billing\""), "{end}");
        assert!(end.contains("\"transcript\":\"음 요금 문의요.\""), "{end}");
        assert_eq!(e.var("digits"), Some("billing"));
        assert_eq!(e.var("digits_transcript"), Some("음 요금 문의요."));
    }

    #[test]
    fn the_phrase_said_first_wins_and_unknown_speech_is_no_match() {
        let (e, _) = listening_menu();
        let StepKind::Gather(g) = &e.flow.steps[0].kind else {
            panic!("a gather");
        };
        let listen = g.speech.as_ref().expect("listens");
        assert_eq!(
            listen.pick("상담원 연결, 요금 말고요").map(|p| p.0),
            Some("agent")
        );
        assert_eq!(
            listen.pick("요금 말고 상담원").map(|p| p.0),
            Some("billing")
        );
        assert_eq!(listen.pick("BILLING please").map(|p| p.0), Some("billing"));
        assert_eq!(
            listen.pick("상담 원"),
            Some(("agent", Some(2))),
            "spaces do not matter"
        );
        assert_eq!(listen.pick("날씨가 좋네요"), None);
        assert_eq!(
            listen.pick("요금이요").map(|p| p.0),
            Some("billing"),
            "a particle after"
        );
        assert_eq!(listen.pick("과요금"), None, "a phrase begins a word");

        let (mut e, mut now) = listening_menu();
        speak(&mut e, &mut now, 10, 10);
        e.handle_done(
            at(now),
            Done::Transcript {
                seq: 2,
                result: Ok("날씨가 좋네요".into()),
            },
        );
        let out = drain(&mut e);
        let retry = out
            .iter()
            .find(|a| a.starts_with("menu:retry"))
            .expect("a retry");
        assert!(
            retry.contains("no_match") && retry.contains("날씨가"),
            "{retry}"
        );
        // The last attempt: a recogniser failure goes to no_match (here: the next step).
        speak(&mut e, &mut now, 10, 10);
        let seq = e.seq;
        e.handle_done(
            at(now),
            Done::Transcript {
                seq,
                result: Err(Error::Stt(callgate_kit::stt::SttError::Status {
                    status: 503,
                    body: String::new(),
                })),
            },
        );
        let out = drain(&mut e);
        assert_eq!(out[0], "menu:error:", "{out:?}");
        let end = out
            .iter()
            .find(|a| a.starts_with("menu:end"))
            .expect("the end");
        assert!(end.contains("stt_error"), "{end}");
    }

    #[test]
    fn a_key_during_speech_wins_and_the_late_transcript_is_ignored() {
        let (mut e, mut now) = listening_menu();
        speak(&mut e, &mut now, 5, 0);
        e.handle_dtmf(at(now), Digit::D1);
        let out = drain(&mut e);
        assert_eq!(out[0], "stop listening 2", "{out:?}");
        assert!(
            out.iter().any(|a| a.contains("\"digits\":\"1\"")),
            "{out:?}"
        );
        e.handle_done(
            at(now),
            Done::Transcript {
                seq: 2,
                result: Ok("상담원".into()),
            },
        );
        assert!(drain(&mut e).is_empty(), "the flow went on with the key");
    }

    #[test]
    fn a_speech_only_gather_ignores_keys() {
        let flow = LISTENING_MENU
            .replace("input = [\"dtmf\", \"speech\"]", "input = [\"speech\"]")
            .replace("on = { \"1\" = \"billing\" }", "");
        let mut e = engine(&flow, Protocol::CallBridge);
        e.start(at(0));
        drain(&mut e);
        e.handle_dtmf(at(0), Digit::D1);
        assert!(drain(&mut e).is_empty());
        assert!(e.is_listening());
    }
}
