//! Function calls: the model's calls checked and run (built-in ones here, HTTP and OPEN API
//! ones by the driver off the call task), their answers delivered to the session that asked,
//! and the goodbye that hangs up once its response is done.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use callgate_agent::AgentCommand;
use callgate_proto::{Digit, DtmfDuration, Protocol};
use serde_json::{Value, json};

use super::{Core, Counted, Output, Phase, ToolCall, ToolDone, ToolKind};
use crate::protocol::{Item, client};
use crate::settings::Builtin;

/// Function calls remembered to ignore their repeats (`.done` and `response.done` both list
/// them).
const MAX_SEEN_CALLS: usize = 64;
/// How long a DTMF key sounds.
const TONE_MS: u64 = 100;

/// A tool running for the model.
#[derive(Debug)]
struct PendingTool {
    name: String,
    /// Its arguments as the record keeps them.
    arguments: String,
    started: Instant,
    /// The session that asked: its answer goes nowhere else.
    conn: u64,
}

/// A function-call item, by its item id (beta servers name the function only here).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CallItem {
    name: String,
}

/// The tool concern's state.
#[derive(Debug, Default)]
pub(crate) struct Tools {
    /// Running, by call id.
    running: HashMap<String, PendingTool>,
    /// Call ids seen (most recent last).
    seen: VecDeque<String>,
    items: HashMap<String, CallItem>,
    /// The `hang_up` call waiting for its response's end (the goodbye), by call id.
    hangup: Option<String>,
}

impl Tools {
    pub(crate) fn none_running(&self) -> bool {
        self.running.is_empty()
    }

    /// Whether a goodbye is being spoken (a `hang_up` call waits for its response's end).
    pub(crate) fn goodbye(&self) -> bool {
        self.hangup.is_some()
    }

    /// A function-call item was added: its name is remembered.
    pub(crate) fn function_item(&mut self, item: Item) {
        if let (Some(name), Some(_)) = (item.name, item.call_id) {
            self.items.insert(item.id, CallItem { name });
        }
    }

    /// The function named by item `item_id`.
    pub(crate) fn item_name(&self, item_id: Option<&str>) -> Option<String> {
        item_id
            .and_then(|i| self.items.get(i))
            .map(|c| c.name.clone())
    }

    /// The session is gone: its goodbye will not end.
    pub(crate) fn session_lost(&mut self) {
        self.hangup = None;
    }
}

impl Core {
    /// A tool finished.
    pub fn handle_tool_done(&mut self, now: Instant, done: ToolDone) {
        let Some(tool) = self.tools.running.remove(&done.call_id) else {
            return;
        };
        self.tool_result(now, &done.call_id, tool, done.ok, &done.output);
    }

    /// The model called `name`: checked, then answered at once (built-ins, bad arguments) or
    /// handed to the driver.
    pub(super) fn function_call(
        &mut self,
        now: Instant,
        response_id: Option<String>,
        call_id: String,
        name: String,
        arguments: String,
    ) {
        if call_id.is_empty() || self.tools.seen.contains(&call_id) {
            return;
        }
        if response_id
            .as_ref()
            .is_some_and(|r| self.response.is_cancelled(r))
        {
            // The caller interrupted the answer that asked for it.
            return;
        }
        self.tools.seen.push_back(call_id.clone());
        if self.tools.seen.len() > MAX_SEEN_CALLS {
            self.tools.seen.pop_front();
        }
        let pending = PendingTool {
            name: name.clone(),
            arguments: recorded_arguments(&name, &arguments),
            started: now,
            conn: self.current_conn().unwrap_or(0),
        };
        let args: Value = match serde_json::from_str(&arguments) {
            Ok(v) => v,
            Err(e) => {
                let out = json!({"error": format!("the arguments are not JSON: {e}")}).to_string();
                self.tool_result(now, &call_id, pending, false, &out);
                return;
            }
        };
        let builtin = self
            .plan
            .settings
            .builtin_tools
            .iter()
            .copied()
            .find(|b| b.name() == name);
        let callbridge = self.call.protocol == Protocol::CallBridge;
        match builtin {
            Some(Builtin::HangUp) => self.hang_up_call(call_id, &arguments),
            Some(Builtin::SendDtmf) => {
                let (ok, out) = self.press(&args);
                self.tool_result(now, &call_id, pending, ok, &out);
            }
            Some(Builtin::AgentTerminate) if callbridge => {
                self.run_tool(call_id, pending, ToolKind::AgentTerminate, args);
            }
            Some(Builtin::SendSms) if callbridge => {
                self.run_tool(call_id, pending, ToolKind::SendSms, args);
            }
            _ => self.http_call(now, call_id, pending, args),
        }
    }

    /// `hang_up`: after the goodbye in this response has played, at its `response.done`.
    fn hang_up_call(&mut self, call_id: String, arguments: &str) {
        self.tools.hangup = Some(call_id.clone());
        self.count(Counted::Tool { ok: true });
        self.event(
            "tool_call",
            json!({"name": Builtin::HangUp.name(), "call_id": call_id, "arguments": arguments,
                   "ok": true, "output": "the call ends after the goodbye",
                   "duration_ms": 0.0}),
        );
    }

    /// `send_dtmf`: the keys, if they are all sendable; the tool's answer.
    fn press(&mut self, args: &Value) -> (bool, String) {
        let digits = args.get("digits").and_then(Value::as_str).unwrap_or("");
        let keys: Option<Vec<Digit>> = digits.chars().map(Digit::from_char).collect();
        match keys {
            Some(keys) if !keys.is_empty() && keys.iter().all(|k| k.is_sendable()) => {
                self.send_dtmf(&keys);
                (true, format!("pressed {digits}"))
            }
            _ => (
                false,
                json!({"error": "digits must be one or more of 0-9, * and #"}).to_string(),
            ),
        }
    }

    /// One of the route's HTTP tools, its arguments checked against its schema.
    fn http_call(&mut self, now: Instant, call_id: String, pending: PendingTool, args: Value) {
        let Some(index) = self.plan.tool_index(&pending.name) else {
            let out = json!({"error": format!("there is no tool {:?}", pending.name)}).to_string();
            self.tool_result(now, &call_id, pending, false, &out);
            return;
        };
        if let Err(problem) = self.plan.schemas[index].validate(&args) {
            let out = json!({"error": format!("invalid arguments: {problem}")}).to_string();
            self.tool_result(now, &call_id, pending, false, &out);
            return;
        }
        self.run_tool(call_id, pending, ToolKind::Http(index), args);
    }

    /// Hands a tool to the driver.
    fn run_tool(&mut self, call_id: String, pending: PendingTool, tool: ToolKind, args: Value) {
        self.tools.running.insert(call_id.clone(), pending);
        self.out.push_back(Output::Tool(ToolCall {
            call_id,
            tool,
            arguments: args,
        }));
    }

    fn send_dtmf(&mut self, keys: &[Digit]) {
        match self.call.protocol {
            Protocol::Inbound => {
                let Some(duration) = DtmfDuration::from_millis(TONE_MS) else {
                    return;
                };
                for &digit in keys {
                    self.command(AgentCommand::Dtmf { digit, duration });
                }
            }
            // CallBridge and Twilio have no DTMF message towards the caller: in-band tones,
            // generated here so the timeline knows their length.
            Protocol::CallBridge | Protocol::Twilio => {
                let format = self.call.output_format;
                let rate = format.sample_rate();
                let gap = vec![0i16; (rate as usize) * 60 / 1000];
                for &digit in keys {
                    let mut samples = callgate_audio::dtmf::tone(digit, TONE_MS as u32, rate, 0.25);
                    samples.extend_from_slice(&gap);
                    let chunk = callgate_audio::pcm::encode(format, &samples);
                    self.command(AgentCommand::Audio(chunk));
                }
            }
        }
    }

    /// A tool's answer: recorded, and sent to the session that asked if it is still there.
    fn tool_result(
        &mut self,
        now: Instant,
        call_id: &str,
        tool: PendingTool,
        ok: bool,
        output: &str,
    ) {
        let ms = now.saturating_duration_since(tool.started).as_secs_f64() * 1000.0;
        let shown: String = output.chars().take(2000).collect();
        // A session that is gone cannot take the answer (the new one never made the call).
        let delivered = matches!(self.phase, Phase::Live | Phase::Terminating)
            && Some(tool.conn) == self.current_conn();
        self.count(Counted::Tool { ok });
        self.event(
            "tool_call",
            json!({"name": tool.name, "call_id": call_id, "arguments": tool.arguments,
                   "ok": ok, "output": shown, "duration_ms": ms, "delivered": delivered}),
        );
        if !delivered {
            return;
        }
        self.send(client::function_output(call_id, output));
        if ok && tool.name == Builtin::AgentTerminate.name() {
            // CallBridge announces and ends the call: the AI must not talk over it.
            self.phase = Phase::Terminating;
            return;
        }
        self.response.owe_tool_answer();
        self.maybe_create();
    }

    /// The response is done: a goodbye in it hangs up now (its audio is queued before the
    /// hang-up), unless the caller cut it (`cancelled`). Whether the call hangs up.
    pub(super) fn goodbye_done(&mut self, cancelled: bool) -> bool {
        let Some(call_id) = self.tools.hangup.take() else {
            return false;
        };
        if cancelled {
            // The caller spoke over the goodbye before it was all sent: the call goes on.
            self.event("hang_up_cancelled", json!({ "call_id": call_id }));
            return false;
        }
        self.send(client::function_output(&call_id, "{\"ok\":true}"));
        self.hang_up();
        true
    }

    /// The call ended: tools still running never answered, says the record.
    pub(super) fn tools_ended(&mut self, now: Instant) {
        let pending: Vec<(String, PendingTool)> = self.tools.running.drain().collect();
        for (call_id, tool) in pending {
            let ms = now.saturating_duration_since(tool.started).as_secs_f64() * 1000.0;
            self.count(Counted::Tool { ok: false });
            self.event(
                "tool_call",
                json!({"name": tool.name, "call_id": call_id, "arguments": tool.arguments,
                       "ok": false, "output": "the call ended before the tool answered",
                       "duration_ms": ms}),
            );
        }
    }
}

/// A tool's arguments as the record keeps them: a text message's content is the caller's
/// business, so `send_sms` keeps its length (and title) only.
fn recorded_arguments(name: &str, arguments: &str) -> String {
    if name != Builtin::SendSms.name() {
        return arguments.to_owned();
    }
    let args: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
    let chars = args
        .get("content")
        .and_then(Value::as_str)
        .map(|c| c.chars().count());
    json!({"content_chars": chars, "title": args.get("title")}).to_string()
}
