//! The model's response lifecycle: callgate's bookkeeping of the one response the service
//! runs at a time ([`Response`]), the `response.create` callgate owes ([`Owed`]), cancellation
//! at a barge-in, the service's errors, and the answer's latency ([`Latency`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Core, MAX_ERROR_EVENTS, Output, Phase};
use crate::protocol::{ApiError, Item, client};

/// Responses remembered as cancelled (their late audio and calls are ignored).
const MAX_CANCELLED: usize = 16;

/// The service's response, by our bookkeeping. Only `response.done` (or an error answering
/// our `response.create`) makes it `Idle` again: a cancelled response still runs until then.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Response {
    Idle,
    /// We sent `response.create`; the service has not named it yet.
    Requested,
    /// Requested, then a barge-in came: it is cancelled as soon as it is named.
    RequestedCancelled,
    /// Running on the service.
    Running {
        id: String,
    },
    /// We cancelled it; it runs until its `response.done`.
    Cancelling {
        id: String,
    },
}

/// What a `response.create` of ours is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// An answer (the greeting, a turn callgate detects, an answer again after a drop).
    Answer,
    /// Answering tool outputs (asked again if the service refuses it).
    ToolOutputs,
}

/// A `response.create` callgate owes the service once it can ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owed {
    Nothing,
    /// Tool outputs wait for an answer: asked once no response runs, no tool runs and the
    /// caller is not speaking.
    ToolOutputs,
    /// The connection dropped while an answer was being made: the new session answers again.
    Reanswer,
}

/// The time from the end of the caller's turn to the answer's first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Latency {
    Idle,
    /// The service's `speech_stopped` arrived `at`; the answer's audio has not.
    TurnEnded {
        at: Instant,
    },
    /// The answer's first audio arrived `arrived`, `backend` after the turn ended; its first
    /// frame has not left yet.
    FirstAudio {
        arrived: Instant,
        backend: Duration,
    },
}

/// The response concern's state.
#[derive(Debug)]
pub(crate) struct Responses {
    state: Response,
    /// Responses we stopped listening to (barge-in), most recent last.
    cancelled: VecDeque<String>,
    owed: Owed,
    /// What our last `response.create` was for.
    last_create: Purpose,
    latency: Latency,
}

impl Default for Responses {
    fn default() -> Self {
        Self {
            state: Response::Idle,
            cancelled: VecDeque::new(),
            owed: Owed::Nothing,
            last_create: Purpose::Answer,
            latency: Latency::Idle,
        }
    }
}

impl Responses {
    pub(crate) fn is_idle(&self) -> bool {
        self.state == Response::Idle
    }

    /// Whether a response is being made that the caller has not cut.
    pub(crate) fn answering(&self) -> bool {
        matches!(self.state, Response::Requested | Response::Running { .. })
    }

    /// The running response's id.
    pub(crate) fn running_id(&self) -> Option<&str> {
        match &self.state {
            Response::Running { id } | Response::Cancelling { id } => Some(id),
            _ => None,
        }
    }

    /// Whether `id` is the running response and nobody cancelled it.
    pub(crate) fn is_running_uncut(&self, id: &str) -> bool {
        matches!(&self.state, Response::Running { id: running } if running == id)
    }

    pub(crate) fn is_cancelled(&self, id: &str) -> bool {
        self.cancelled.iter().any(|c| c == id)
    }

    /// Whether `owed` is owed; it is not any more.
    pub(crate) fn take_owed(&mut self, owed: Owed) -> bool {
        if self.owed == owed {
            self.owed = Owed::Nothing;
            return true;
        }
        false
    }

    /// Tool outputs were sent: they want an answer.
    pub(crate) fn owe_tool_answer(&mut self) {
        self.owed = Owed::ToolOutputs;
    }

    /// The service answers the caller's turn on its own, and that answer sees any tool
    /// output: nothing is owed for them.
    pub(crate) fn tool_answer_not_needed(&mut self) {
        self.take_owed(Owed::ToolOutputs);
    }

    /// The caller's turn ended (the service's `speech_stopped`, read at `at`).
    pub(crate) fn turn_ended(&mut self, at: Instant) {
        self.latency = Latency::TurnEnded { at };
    }

    /// The answer's first audio arrived at `arrived`: whether it is the first since the
    /// caller's turn ended (its first frame is then measured).
    pub(crate) fn first_audio(&mut self, arrived: Instant) -> bool {
        let Latency::TurnEnded { at } = self.latency else {
            return false;
        };
        let backend = arrived.saturating_duration_since(at);
        self.latency = Latency::FirstAudio { arrived, backend };
        true
    }

    /// The answer's first frame left (`played`: it reached the caller) at `now`: the
    /// latencies, once.
    pub(crate) fn first_frame_left(
        &mut self,
        now: Instant,
        played: bool,
    ) -> Option<(Duration, Duration)> {
        let Latency::FirstAudio { arrived, backend } = self.latency else {
            return None;
        };
        self.latency = Latency::Idle;
        played.then(|| (backend, now.saturating_duration_since(arrived)))
    }

    /// The session is gone: no response runs; an answer it cut is owed to the next session.
    pub(crate) fn session_lost(&mut self) {
        if self.answering() {
            self.owed = Owed::Reanswer;
        } else if self.owed == Owed::ToolOutputs {
            self.owed = Owed::Nothing;
        }
        self.state = Response::Idle;
        if matches!(self.latency, Latency::TurnEnded { .. }) {
            self.latency = Latency::Idle;
        }
    }
}

impl Core {
    /// Asks for a response if none runs.
    pub(super) fn request_response(&mut self, for_tools: bool) {
        if self.response.state == Response::Idle && self.session.is_ready() {
            self.response.last_create = if for_tools {
                Purpose::ToolOutputs
            } else {
                Purpose::Answer
            };
            self.send(client::response_create());
            self.response.state = Response::Requested;
        }
    }

    /// Stops listening to the response (a barge-in): cancelled by name, now or once named.
    pub(super) fn cancel_response(&mut self) {
        match &self.response.state {
            Response::Idle | Response::RequestedCancelled | Response::Cancelling { .. } => {}
            Response::Requested => self.response.state = Response::RequestedCancelled,
            Response::Running { id } => {
                let id = id.clone();
                // The service may have cancelled it already (interrupt_response):
                // `response_cancel_not_active` then comes back, and is expected.
                self.send(client::response_cancel(&id));
                self.response.cancelled.push_back(id.clone());
                if self.response.cancelled.len() > MAX_CANCELLED {
                    self.response.cancelled.pop_front();
                }
                self.response.state = Response::Cancelling { id };
            }
        }
    }

    /// Whether the agent is talking or about to: an answer is being made, or its audio is on
    /// the timeline.
    pub(super) fn agent_busy(&self) -> bool {
        self.response.answering() || !self.timeline.is_empty()
    }

    /// `response.created`.
    pub(super) fn response_created(&mut self, id: String) {
        let cancel = self.response.state == Response::RequestedCancelled;
        self.response.state = Response::Running { id };
        if cancel {
            // Cancelled (barge-in) before the service named it: cancel it by name.
            self.cancel_response();
        }
    }

    /// Asks for the answer to tool outputs once nothing stands in the way.
    pub(super) fn maybe_create(&mut self) {
        if self.response.owed == Owed::ToolOutputs
            && self.response.is_idle()
            && self.tools.none_running()
            && self.phase == Phase::Live
            && !self.turns.caller_speaking()
            && self.session.is_ready()
        {
            self.response.owed = Owed::Nothing;
            self.request_response(true);
        }
    }

    /// `response.done`: the function calls it lists, the goodbye's hang-up, the usage.
    pub(super) fn response_done(
        &mut self,
        now: Instant,
        id: String,
        status: &str,
        details: Value,
        calls: Vec<Item>,
        usage: &Value,
    ) {
        // One response runs at a time: whatever ended, none runs now.
        self.response.state = Response::Idle;
        self.usage(usage);
        if matches!(status, "failed" | "incomplete") {
            self.event(
                "response_failed",
                json!({"response_id": id, "status": status, "details": details}),
            );
        }
        let cancelled = self.response.is_cancelled(&id) || status == "cancelled";
        if !cancelled {
            for call in calls {
                if let (Some(call_id), Some(name)) = (call.call_id, call.name) {
                    let args = call.arguments.unwrap_or_default();
                    self.function_call(now, Some(id.clone()), call_id, name, args);
                }
            }
        }
        if self.goodbye_done(cancelled) {
            return;
        }
        self.maybe_create();
        self.maybe_renew(now);
    }

    /// The response's token usage, for the record.
    fn usage(&mut self, usage: &Value) {
        let Some(u) = usage.as_object() else {
            return;
        };
        let n = |v: Option<&Value>| v.and_then(Value::as_f64).unwrap_or(0.0);
        let figures = [
            ("input_tokens", n(u.get("input_tokens"))),
            ("output_tokens", n(u.get("output_tokens"))),
            (
                "input_audio_tokens",
                n(usage.pointer("/input_token_details/audio_tokens")),
            ),
            (
                "input_text_tokens",
                n(usage.pointer("/input_token_details/text_tokens")),
            ),
            (
                "input_cached_tokens",
                n(usage.pointer("/input_token_details/cached_tokens")),
            ),
            (
                "output_audio_tokens",
                n(usage.pointer("/output_token_details/audio_tokens")),
            ),
            (
                "output_text_tokens",
                n(usage.pointer("/output_token_details/text_tokens")),
            ),
        ];
        let out: Vec<(String, f64)> = figures
            .into_iter()
            .filter(|(_, value)| *value > 0.0)
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        if !out.is_empty() {
            self.command(callgate_agent::AgentCommand::Usage(out));
        }
    }

    /// An `error` event from the session in use.
    pub(super) fn api_error(&mut self, now: Instant, e: ApiError) {
        let ours = e.event_id.as_deref();
        if ours == Some("cg_create") {
            // Our response.create was refused (the service had started one of its own, which
            // may have taken our place in the bookkeeping). If it was to answer tool outputs,
            // it is asked again once the running response is done.
            if matches!(
                self.response.state,
                Response::Requested | Response::RequestedCancelled
            ) {
                self.response.state = Response::Idle;
            }
            if self.response.last_create == Purpose::ToolOutputs
                && self.response.owed == Owed::Nothing
            {
                self.response.owed = Owed::ToolOutputs;
            }
        }
        match e.code() {
            // Expected after a barge-in: the service had cancelled (or finished) it already.
            "response_cancel_not_active" => {
                tracing::debug!("response.cancel found nothing running (expected).");
                return;
            }
            "conversation_already_has_active_response" => {
                tracing::debug!("response.create while one runs: asked again after it.");
                return;
            }
            _ => {}
        }
        let refused_setup = ours == Some("cg_session") && self.session.is_connecting();
        if e.is_fatal() || refused_setup {
            let reason = refusal(&e, refused_setup);
            self.fail(now, &reason, true);
            return;
        }
        if e.code() == "session_expired" {
            self.session_expired(now);
            return;
        }
        self.errors += 1;
        tracing::debug!(
            code = e.code(),
            message = e.message(),
            "The AI service reported an error."
        );
        if self.errors <= MAX_ERROR_EVENTS {
            self.event(
                "backend_error",
                json!({"type": e.kind, "code": e.code, "message": e.message,
                       "event_id": e.event_id}),
            );
        }
    }

    /// The answer's first frame left (its mark came back).
    pub(super) fn first_frame_left(&mut self, now: Instant, played: bool) {
        if let Some((backend, callgate)) = self.response.first_frame_left(now, played) {
            self.out.push_back(Output::Latency { backend, callgate });
            self.event(
                "response_latency",
                json!({"backend_ms": backend.as_secs_f64() * 1000.0,
                       "callgate_ms": callgate.as_secs_f64() * 1000.0}),
            );
        }
    }
}

/// Why the service's refusal ends the session, for the record. The service quotes part of a
/// wrong key in its message: not for the record.
fn refusal(e: &ApiError, refused_setup: bool) -> String {
    if e.code() == "invalid_api_key" {
        "the service refused the API key (invalid_api_key)".to_owned()
    } else if refused_setup {
        format!(
            "the service refused the session settings: {} ({})",
            e.message(),
            e.code()
        )
    } else {
        format!(
            "the service refused the session: {} ({})",
            e.message(),
            e.code()
        )
    }
}
