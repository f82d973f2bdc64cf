//! The core's tests: plain `#[test]`s on a virtual clock (the test advances `now`), no
//! runtime.

use callgate_agent::{Interruption, MarkState, PhoneInfo, Speaker, Turn};
use callgate_proto::Protocol;
use callgate_proto::callbridge::CallConfig;

use super::link::RENEW_RETRY;
use super::*;
use crate::protocol::ApiError;
use crate::settings::{Builtin, HttpTool, RealtimeSettings};

/// The tests' origin of time (the core itself never reads the clock).
#[allow(clippy::disallowed_methods, reason = "the tests' origin of time")]
pub(crate) fn origin() -> Instant {
    Instant::now()
}

#[test]
fn text_is_cut_at_a_word_boundary_in_proportion() {
    let text = "Our opening hours are nine to five on weekdays.";
    assert_eq!(cut_text(text, 500, 1000), "Our opening hours are");
    assert_eq!(cut_text(text, 1000, 1000), text);
    assert_eq!(cut_text(text, 0, 1000), "");
    assert_eq!(
        cut_text("안녕하세요 고객님 무엇을 도와드릴까요", 600, 1000),
        "안녕하세요 고객님"
    );
}

fn settings() -> RealtimeSettings {
    RealtimeSettings {
        api_key_env: "PATH".into(),
        ..RealtimeSettings::default()
    }
}

fn call(protocol: Protocol) -> CallInfo {
    CallInfo {
        call_id: "call-1".into(),
        protocol,
        caller: "01012341234".into(),
        callee: "07012345678".into(),
        external_id: "10014473".into(),
        phone: match protocol {
            Protocol::CallBridge => PhoneInfo::CallBridge(CallConfig {
                site_id: "921004322052".into(),
                caller: "01012341234".into(),
                callee: "07012345678".into(),
                cdr_id: "10014473".into(),
                call_action_id: "1.758187055878E9".into(),
                ivr_ip: "192.168.150.103:29034".into(),
                agent_id: "agent-main".into(),
                agent_type: "voice".into(),
            }),
            Protocol::Inbound | Protocol::Twilio => PhoneInfo::Inbound {
                caller_id: "01012341234".into(),
                did_number: "07012345678".into(),
                session_id: "10014473".into(),
            },
        },
        route: "ai".into(),
        agent: "realtime".into(),
        input_format: AudioFormat::Pcm8000,
        output_format: AudioFormat::Pcm8000,
    }
}

/// An HTTP tool of the route (its URL is never reached: the driver runs tools, not the core).
fn http_tool(name: &str, description: &str, parameters: Value) -> HttpTool {
    HttpTool {
        name: name.into(),
        description: description.into(),
        parameters,
        url: "http://127.0.0.1:1/".into(),
        method: crate::settings::Method::Post,
        headers: Default::default(),
        headers_env: Default::default(),
        timeout: None,
    }
}

/// A core on a virtual clock, with its outputs collected.
struct T {
    core: Core,
    t0: Instant,
    now: Instant,
    sent: Vec<Value>,
    audio: u64,
    commands: Vec<AgentCommand>,
    other: Vec<Output>,
}

impl T {
    fn new(settings: RealtimeSettings, protocol: Protocol) -> Self {
        let t0 = origin();
        let plan = Arc::new(crate::test_plan(settings));
        let mut t = Self {
            core: Core::new(plan, call(protocol), Epoch(0), t0, t0),
            t0,
            now: t0,
            sent: Vec::new(),
            audio: 0,
            commands: Vec::new(),
            other: Vec::new(),
        };
        t.drain();
        t
    }

    fn at(&mut self, ms: u64) {
        self.now = self.t0 + Duration::from_millis(ms);
    }

    fn drain(&mut self) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Send {
                    message: Outgoing::Text(t),
                    ..
                } => self.sent.push(serde_json::from_str(&t).unwrap()),
                Output::Send {
                    message: Outgoing::Append(a),
                    ..
                } => self.sent.push(json!({"type": "append", "bytes": a.len()})),
                o => self.other.push(o),
            }
        }
        // The call takes every command at once.
        while let Some((_, c)) = self.core.front() {
            self.core.pop();
            match c {
                AgentCommand::Audio(a) => self.audio += a.len() as u64 / 2,
                c => self.commands.push(c),
            }
        }
    }

    fn server(&mut self, event: ServerEvent) {
        let conn = self.core.current_conn().unwrap_or(0);
        self.core.handle_server(self.now, conn, event, self.now);
        self.drain();
    }

    fn call_event(&mut self, event: AgentEvent) {
        self.core.handle_call_event(self.now, event);
        self.drain();
    }

    fn ready(&mut self) {
        self.server(ServerEvent::SessionCreated);
        self.server(ServerEvent::SessionUpdated);
    }

    fn lost(&mut self, conn: u64, fatal: bool, reason: &str) {
        // A fatal loss as the upgrade refused with 401; the other as a broken connection.
        let lost = if fatal {
            Lost::Refused {
                status: 401,
                body: reason.into(),
            }
        } else {
            Lost::Broken(reason.into())
        };
        self.core.handle_lost(self.now, conn, lost);
        self.drain();
    }

    fn lost_with(&mut self, conn: u64, lost: Lost) {
        self.core.handle_lost(self.now, conn, lost);
        self.drain();
    }

    fn server_on(&mut self, conn: u64, event: ServerEvent) {
        self.core.handle_server(self.now, conn, event, self.now);
        self.drain();
    }

    /// The call reports that `item` began playing when `played_ms` of agent audio had
    /// been heard (its Start mark).
    fn started(&mut self, item: &str, played_ms: u64, at_ms: u64) {
        let id = self.core.timeline.start_mark(item).expect("a start mark");
        self.call_event(AgentEvent::Mark {
            id,
            played_ms,
            at_ms,
            state: MarkState::Played,
        });
    }

    fn sent_types(&mut self) -> Vec<String> {
        let types = self
            .sent
            .iter()
            .map(|v| v["type"].as_str().unwrap_or("").to_owned())
            .collect();
        self.sent.clear();
        types
    }

    /// A whole spoken answer of `ms` in one burst (G.711: 8 bytes per ms).
    fn speak(&mut self, response: &str, item: &str, ms: u64, text: &str) {
        self.server(ServerEvent::ResponseCreated {
            id: response.into(),
        });
        self.server(ServerEvent::ItemAdded {
            response_id: Some(response.into()),
            item: crate::protocol::Item {
                id: item.into(),
                kind: "message".into(),
                role: Some("assistant".into()),
                name: None,
                call_id: None,
                arguments: None,
            },
        });
        for _ in 0..ms / 100 {
            self.server(ServerEvent::AudioDelta {
                response_id: response.into(),
                item_id: item.into(),
                audio: Bytes::from(vec![0xFFu8; 800]),
            });
        }
        self.server(ServerEvent::TranscriptDone {
            item_id: item.into(),
            transcript: text.into(),
        });
        self.server(ServerEvent::AudioDone {
            item_id: item.into(),
        });
    }

    fn done(&mut self, response: &str) {
        self.server(ServerEvent::ResponseDone {
            id: response.into(),
            status: "completed".into(),
            status_details: Value::Null,
            calls: Vec::new(),
            usage: json!({"input_tokens": 10, "output_tokens": 20,
                          "output_token_details": {"audio_tokens": 15}}),
        });
    }

    fn cleared(&mut self, played_ms: u64, at_ms: u64) {
        self.call_event(AgentEvent::Cleared(Interruption {
            played_ms,
            dropped_ms: 1,
            at_ms,
            epoch: Epoch(1),
        }));
    }

    /// The service calls the function `name` (`call_id`) in `response` (`None`: outside one).
    fn function_call(
        &mut self,
        response: Option<&str>,
        call_id: &str,
        name: &str,
        arguments: &str,
    ) {
        self.server(ServerEvent::FunctionCall {
            response_id: response.map(str::to_owned),
            item_id: None,
            call_id: call_id.into(),
            name: Some(name.into()),
            arguments: arguments.into(),
        });
    }

    /// Whether 100 ms more audio of `item` in `response` is played (a cut response's is not).
    fn late_audio_plays(&mut self, response: &str, item: &str) -> bool {
        let before = self.audio;
        self.server(ServerEvent::AudioDelta {
            response_id: response.into(),
            item_id: item.into(),
            audio: Bytes::from(vec![0u8; 800]),
        });
        self.audio != before
    }

    fn turns(&self) -> Vec<Turn> {
        self.commands
            .iter()
            .filter_map(|c| match c {
                AgentCommand::Transcript(t) => Some((**t).clone()),
                _ => None,
            })
            .collect()
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.commands
            .iter()
            .filter_map(|c| match c {
                AgentCommand::Event(e) if e.name == name => Some(e.detail.clone()),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn the_session_is_set_up_for_the_phone_format_and_the_ai_greets() {
    let mut t = T::new(settings(), Protocol::CallBridge);
    assert_eq!(t.commands, vec![AgentCommand::Answer]);
    assert_eq!(t.other, vec![Output::Connect { conn: 1 }]);
    t.server(ServerEvent::SessionCreated);
    let update = t.sent.remove(0);
    assert_eq!(update["type"], "session.update");
    let s = &update["session"];
    assert_eq!(s["type"], "realtime");
    assert_eq!(s["audio"]["input"]["format"]["type"], "audio/pcmu");
    assert_eq!(s["audio"]["output"]["format"]["type"], "audio/pcmu");
    assert_eq!(s["audio"]["output"]["voice"], "marin");
    assert_eq!(s["tools"][0]["name"], "hang_up");
    assert!(update.get("modalities").is_none() && s.get("modalities").is_none());
    // Caller audio before the session is ready is kept, then sent.
    t.core
        .handle_caller_audio(t.now, &Bytes::from(vec![0u8; 320]));
    t.server(ServerEvent::SessionUpdated);
    assert_eq!(
        t.sent_types(),
        ["append", "conversation.item.create", "response.create"]
    );
    assert_eq!(t.events("backend_connected").len(), 1);
}

#[test]
fn barge_in_truncates_each_item_at_exactly_what_was_heard() {
    let mut t = T::new(settings(), Protocol::CallBridge);
    t.ready();
    t.sent.clear();
    // A 3 s answer arrives in one burst at 100 ms.
    t.at(100);
    t.speak(
        "resp_1",
        "item_1",
        3000,
        "Hello, thank you for calling the front desk today.",
    );
    t.started("item_1", 0, 100);
    assert_eq!(t.audio, 3000 * 8, "all of it handed to the playout at once");
    t.done("resp_1");
    // The service hears the caller 1.24 s into the answer (played_ms from the call).
    t.at(1400);
    t.server(ServerEvent::SpeechStarted {
        item_id: "item_u1".into(),
        audio_start_ms: 1300,
    });
    assert!(
        t.other.contains(&Output::Clear),
        "the playout is cleared at once"
    );
    t.cleared(1240, 1400);
    let sent = std::mem::take(&mut t.sent);
    let truncate = sent
        .iter()
        .find(|v| v["type"] == "conversation.item.truncate")
        .expect("a truncate");
    assert_eq!(truncate["item_id"], "item_1");
    assert_eq!(truncate["audio_end_ms"], 1240);
    assert_eq!(truncate["content_index"], 0);
    assert!(
        !sent.iter().any(|v| v["type"] == "response.cancel"),
        "the response was done: nothing to cancel"
    );
    let turns = t.turns();
    assert_eq!(turns.len(), 1);
    assert!(turns[0].interrupted);
    assert_eq!(turns[0].text, "Hello, thank you for");
    // The next answer starts where the caller's hearing stopped: a second barge-in
    // 500 ms into it truncates at 500, though 3 s were sent before.
    t.at(3000);
    t.speak("resp_2", "item_2", 2000, "Sure.");
    t.started("item_2", 1240, 3000);
    t.server(ServerEvent::SpeechStarted {
        item_id: "item_u2".into(),
        audio_start_ms: 3400,
    });
    assert!(
        t.sent.iter().any(|v| v["type"] == "response.cancel"),
        "still running"
    );
    t.cleared(1240 + 500, 3500);
    let truncate = t
        .sent
        .iter()
        .find(|v| v["type"] == "conversation.item.truncate")
        .expect("a truncate");
    assert_eq!(truncate["item_id"], "item_2");
    assert_eq!(truncate["audio_end_ms"], 500);
    // Later audio of the cancelled response is not played.
    assert!(!t.late_audio_plays("resp_2", "item_2"));
}

#[test]
fn an_item_nothing_of_which_was_heard_is_deleted_and_truncation_never_exceeds_the_item() {
    let mut t = T::new(settings(), Protocol::CallBridge);
    t.ready();
    t.at(100);
    t.speak("resp_1", "item_1", 1000, "One.");
    t.speak("resp_1", "item_2", 1000, "Two.");
    t.started("item_1", 0, 100);
    t.started("item_2", 1000, 1100);
    t.sent.clear();
    t.server(ServerEvent::SpeechStarted {
        item_id: "u".into(),
        audio_start_ms: 0,
    });
    // The call reports more heard than item_1 holds (it moved on to item_2 by 300 ms).
    t.cleared(1300, 1400);
    let by_type = |sent: &[Value], ty: &str| -> Vec<Value> {
        sent.iter().filter(|v| v["type"] == ty).cloned().collect()
    };
    assert!(
        by_type(&t.sent, "conversation.item.truncate")
            .iter()
            .all(|v| v["item_id"] != "item_1"),
        "item_1 was heard whole"
    );
    assert_eq!(
        by_type(&t.sent, "conversation.item.truncate")[0]["audio_end_ms"],
        300
    );
    t.sent.clear();
    // A barge-in before any of the next answer played: delete, not truncate at 0.
    t.speak("resp_2", "item_3", 1000, "Three.");
    t.server(ServerEvent::SpeechStarted {
        item_id: "u2".into(),
        audio_start_ms: 0,
    });
    t.cleared(1300, 1500);
    assert_eq!(by_type(&t.sent, "conversation.item.truncate").len(), 0);
    assert_eq!(
        by_type(&t.sent, "conversation.item.delete")[0]["item_id"],
        "item_3"
    );
}

#[test]
fn a_dropped_connection_is_reseeded_and_a_bad_key_plays_the_fallback() {
    let mut t = T::new(settings(), Protocol::CallBridge);
    t.ready();
    t.at(100);
    t.speak("resp_1", "item_1", 500, "Welcome.");
    t.done("resp_1");
    t.call_event(AgentEvent::Mark {
        id: 2,
        played_ms: 500,
        at_ms: 600,
        state: MarkState::Played,
    });
    t.server(ServerEvent::CallerTranscript {
        item_id: "u1".into(),
        transcript: "What are your hours?".into(),
    });
    t.sent.clear();
    t.at(1000);
    t.lost(1, false, "reset");
    assert_eq!(t.events("backend_lost").len(), 1);
    // The first retry is immediate.
    t.core.handle_timeout(t.now);
    t.drain();
    assert!(t.other.contains(&Output::Connect { conn: 2 }));
    // Audio while reconnecting is kept for the new session.
    t.core
        .handle_caller_audio(t.now, &Bytes::from(vec![0u8; 320]));
    t.at(1300);
    t.ready();
    let types = t.sent_types();
    assert_eq!(
        types,
        [
            "session.update",
            "conversation.item.create",
            "conversation.item.create",
            "append"
        ]
    );
    assert_eq!(t.events("backend_reconnected")[0]["outage_ms"], 300);
    // A bad key: the fallback message, then the hangup; no retry.
    let mut t = T::new(settings(), Protocol::CallBridge);
    t.lost(1, true, "HTTP 401");
    assert_eq!(t.audio, 8000, "one second of fallback");
    assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
    assert_eq!(t.events("backend_failed")[0]["fatal"], true);
    assert_eq!(t.core.poll_timeout(), None, "nothing more to wait for");
}

#[test]
fn reconnecting_gives_up_after_reconnect_within() {
    let mut t = T::new(settings(), Protocol::Inbound);
    t.ready();
    t.lost(1, false, "reset");
    for attempt in 0..100 {
        let Some(at) = t.core.poll_timeout() else {
            break;
        };
        t.now = at;
        t.core.handle_timeout(t.now);
        t.drain();
        if let Some(conn) = t.core.current_conn() {
            t.core
                .handle_lost(t.now, conn, Lost::Broken(format!("refused {attempt}")));
            t.drain();
        }
        if t.commands.contains(&AgentCommand::Hangup) {
            break;
        }
    }
    let failed = t.events("backend_failed");
    assert_eq!(failed.len(), 1, "{:?}", t.commands);
    assert_eq!(failed[0]["fatal"], false);
    let elapsed = t.now.duration_since(t.t0);
    assert!(elapsed <= Duration::from_secs(10), "{elapsed:?}");
    assert!(elapsed >= Duration::from_secs(9), "{elapsed:?}");
}

#[test]
fn tools_answer_after_the_response_is_done_and_bad_arguments_never_run() {
    let mut s = settings();
    s.tools.push(http_tool(
        "lookup",
        "Look up an order",
        json!({"type": "object", "properties": {"id": {"type": "string"}},
                           "required": ["id"]}),
    ));
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    t.sent.clear();
    t.server(ServerEvent::ResponseCreated { id: "r1".into() });
    t.function_call(Some("r1"), "call_bad", "lookup", "{\"order\": 1}");
    let output = t
        .sent
        .iter()
        .find(|v| v["type"] == "conversation.item.create")
        .expect("an output at once");
    assert!(
        output["item"]["output"]
            .as_str()
            .unwrap()
            .contains("missing required property")
    );
    assert!(
        !t.sent.iter().any(|v| v["type"] == "response.create"),
        "not before response.done"
    );
    t.function_call(Some("r1"), "call_ok", "lookup", "{\"id\": \"A1\"}");
    assert!(matches!(t.other.last(), Some(Output::Tool(c)) if c.call_id == "call_ok"));
    t.done("r1");
    assert!(
        !t.sent.iter().any(|v| v["type"] == "response.create"),
        "a tool is still running"
    );
    t.at(700);
    t.core.handle_tool_done(
        t.now,
        ToolDone {
            call_id: "call_ok".into(),
            ok: true,
            output: "{\"status\":\"shipped\"}".into(),
        },
    );
    t.drain();
    let types = t.sent_types();
    assert_eq!(types.last().map(String::as_str), Some("response.create"));
    let calls = t.events("tool_call");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1]["duration_ms"], 700.0);
    assert!(t.commands.iter().any(|c| matches!(c, AgentCommand::Usage(u)
        if u.contains(&("output_audio_tokens".to_owned(), 15.0)))));
}

#[test]
fn hang_up_waits_for_the_goodbye() {
    let mut t = T::new(settings(), Protocol::Inbound);
    t.ready();
    t.speak("r1", "item_1", 1000, "Goodbye!");
    t.function_call(Some("r1"), "call_h", "hang_up", "{}");
    assert!(!t.commands.contains(&AgentCommand::Hangup));
    t.done("r1");
    let audio_at = t
        .commands
        .iter()
        .position(|c| *c == AgentCommand::Hangup)
        .expect("hangs up");
    assert!(
        t.commands[..audio_at]
            .iter()
            .any(|c| matches!(c, AgentCommand::Mark(_))),
        "after the goodbye's audio and its end mark"
    );
}

#[test]
fn a_session_is_renewed_after_session_max_at_a_quiet_moment() {
    let mut s = settings();
    s.session_max = crate::settings::Dur(Duration::from_secs(60));
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    t.at(50_000);
    t.speak("r1", "item_1", 500, "Still there?");
    t.done("r1");
    t.other.clear();
    // Due, but the answer is still playing: no renewal yet.
    t.at(60_000);
    t.core.handle_timeout(t.now);
    t.drain();
    assert!(!t.other.iter().any(|o| matches!(o, Output::Connect { .. })));
    // It has played: the renewal happens now, seeded like a reconnection.
    t.call_event(AgentEvent::Mark {
        id: 2,
        played_ms: 500,
        at_ms: 60_100,
        state: MarkState::Played,
    });
    // Make before break: the new session is set up while the old one serves.
    assert_eq!(t.other, vec![Output::Connect { conn: 2 }]);
    t.other.clear();
    t.sent.clear();
    t.server_on(2, ServerEvent::SessionCreated);
    assert_eq!(t.sent_types(), ["session.update"]);
    assert_eq!(
        t.core.current_conn(),
        Some(1),
        "the old session still serves"
    );
    t.server_on(2, ServerEvent::SessionUpdated);
    assert_eq!(
        t.other,
        vec![Output::Close { conn: 1 }, Output::Count(Counted::Connected)]
    );
    assert_eq!(t.core.current_conn(), Some(2));
    assert_eq!(t.events("backend_renewed").len(), 1);
    assert_eq!(
        t.sent_types(),
        ["conversation.item.create"],
        "the agent's turn, as text"
    );
    assert!(
        t.events("backend_lost").is_empty(),
        "a renewal is not an outage"
    );
}

#[test]
fn callgates_own_barge_in_cancels_and_truncates_too() {
    let mut t = T::new(settings(), Protocol::Inbound);
    t.ready();
    t.speak("r1", "item_1", 2000, "A long answer that goes on.");
    t.started("item_1", 0, 200);
    t.sent.clear();
    // The call's VAD cleared the playout by itself.
    t.call_event(AgentEvent::BargeIn(Interruption {
        played_ms: 700,
        dropped_ms: 1300,
        at_ms: 900,
        epoch: Epoch(1),
    }));
    let types = t.sent_types();
    assert_eq!(types, ["response.cancel", "conversation.item.truncate"]);
    assert_eq!(t.events("barge_in")[0]["source"], "callgate");
    assert!(
        !t.other.contains(&Output::Clear),
        "the call cleared already"
    );
}

#[test]
fn a_response_cancelled_before_it_was_named_is_cancelled_by_name() {
    let mut t = T::new(
        RealtimeSettings {
            greeting: true,
            ..settings()
        },
        Protocol::Inbound,
    );
    t.ready();
    t.sent.clear();
    // The caller speaks before the greeting's response was even created.
    t.server(ServerEvent::SpeechStarted {
        item_id: "u".into(),
        audio_start_ms: 0,
    });
    assert!(t.sent.is_empty(), "nothing to cancel by name yet");
    t.server(ServerEvent::ResponseCreated { id: "r1".into() });
    let cancel = t.sent.pop().expect("a cancel");
    assert_eq!(cancel["type"], "response.cancel");
    assert_eq!(cancel["response_id"], "r1");
    // Its audio is not played.
    assert!(!t.late_audio_plays("r1", "i1"));
}

#[test]
fn a_refused_create_for_tool_outputs_is_asked_again_after_the_running_response() {
    let mut s = settings();
    s.builtin_tools.push(Builtin::SendDtmf);
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    t.server(ServerEvent::ResponseCreated { id: "r1".into() });
    t.function_call(Some("r1"), "c1", "send_dtmf", "{\"digits\": \"12#\"}");
    let dtmf = t
        .commands
        .iter()
        .filter(|c| matches!(c, AgentCommand::Dtmf { .. }))
        .count();
    assert_eq!(dtmf, 3, "protocol DTMF on an inbound call");
    t.done("r1");
    assert_eq!(t.sent.last().unwrap()["type"], "response.create");
    t.sent.clear();
    // Our create raced with one the service started (r2): refused.
    t.server(ServerEvent::ResponseCreated { id: "r2".into() });
    t.server(ServerEvent::Error(ApiError {
        kind: Some("invalid_request_error".into()),
        code: Some("conversation_already_has_active_response".into()),
        message: None,
        event_id: Some("cg_create".into()),
    }));
    assert!(t.sent.is_empty(), "not while r2 runs");
    t.done("r2");
    assert_eq!(t.sent_types(), ["response.create"], "asked again, after r2");
}

#[test]
fn a_failed_renewal_keeps_the_old_session() {
    let mut s = settings();
    s.session_max = crate::settings::Dur(Duration::from_secs(60));
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    t.at(60_000);
    // The caller is speaking: not quiet, no renewal.
    t.server(ServerEvent::SpeechStarted {
        item_id: "u".into(),
        audio_start_ms: 0,
    });
    t.other.clear();
    t.core.handle_timeout(t.now);
    t.drain();
    assert!(t.other.is_empty(), "{:?}", t.other);
    t.server(ServerEvent::SpeechStopped {
        item_id: "u".into(),
        audio_end_ms: 100,
    });
    assert!(t.other.is_empty(), "an answer is coming: still not quiet");
    t.server(ServerEvent::ResponseCreated { id: "r1".into() });
    t.done("r1");
    assert_eq!(t.other, vec![Output::Connect { conn: 2 }]);
    t.other.clear();
    t.lost(2, true, "refused");
    assert_eq!(t.core.current_conn(), Some(1), "the old session goes on");
    assert!(t.events("backend_failed").is_empty());
    assert_eq!(t.events("backend_renewal_failed").len(), 1);
    assert_eq!(t.core.poll_timeout(), Some(t.now + RENEW_RETRY));
}

#[test]
fn refused_session_settings_play_the_fallback_at_once() {
    let mut t = T::new(settings(), Protocol::Inbound);
    t.server(ServerEvent::SessionCreated);
    t.server(ServerEvent::Error(ApiError {
        kind: Some("invalid_request_error".into()),
        code: Some("invalid_value".into()),
        message: Some("Invalid value: 'nova'.".into()),
        event_id: Some("cg_session".into()),
    }));
    let failed = t.events("backend_failed");
    assert_eq!(failed[0]["fatal"], true);
    assert!(failed[0]["reason"].as_str().unwrap().contains("nova"));
    assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
}

#[test]
fn max_duration_hangs_up_after_the_audio_queued() {
    let mut s = settings();
    s.max_duration = crate::settings::Dur(Duration::from_secs(120));
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    assert_eq!(t.core.poll_timeout(), Some(t.t0 + Duration::from_secs(120)));
    t.at(120_000);
    t.core.handle_timeout(t.now);
    t.drain();
    assert_eq!(t.events("max_duration").len(), 1);
    assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
}

#[test]
fn a_tool_answer_after_a_reconnection_is_recorded_not_sent() {
    let mut s = settings();
    s.tools
        .push(http_tool("slow", "d", json!({"type": "object"})));
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    t.server(ServerEvent::ResponseCreated { id: "r1".into() });
    t.function_call(Some("r1"), "c1", "slow", "{}");
    t.lost(1, false, "reset");
    t.core.handle_timeout(t.now);
    t.drain();
    t.ready();
    t.sent.clear();
    t.core.handle_tool_done(
        t.now,
        ToolDone {
            call_id: "c1".into(),
            ok: true,
            output: "late".into(),
        },
    );
    t.drain();
    assert!(
        t.sent.is_empty(),
        "the new session never made that call: {:?}",
        t.sent
    );
    assert_eq!(t.events("tool_call")[0]["delivered"], false);
}

fn assistant_item(id: &str) -> crate::protocol::Item {
    crate::protocol::Item {
        id: id.into(),
        kind: "message".into(),
        role: Some("assistant".into()),
        name: None,
        call_id: None,
        arguments: None,
    }
}

/// Feeds the core the start of an answer with `deltas` × 100 ms of audio, leaving what it
/// queues for the call in the core (the call has not taken it).
fn answer_undrained(t: &mut T, response: &str, item: &str, deltas: usize) {
    let conn = t.core.current_conn().expect("a session");
    let events = [
        ServerEvent::ResponseCreated {
            id: response.into(),
        },
        ServerEvent::ItemAdded {
            response_id: Some(response.into()),
            item: assistant_item(item),
        },
    ];
    for event in events {
        t.core.handle_server(t.now, conn, event, t.now);
    }
    for _ in 0..deltas {
        let delta = ServerEvent::AudioDelta {
            response_id: response.into(),
            item_id: item.into(),
            audio: Bytes::from(vec![0xFFu8; 800]),
        };
        t.core.handle_server(t.now, conn, delta, t.now);
    }
}

/// Everything waiting for the call, taken.
fn take_all(core: &mut Core) -> Vec<(Epoch, AgentCommand)> {
    let mut all = Vec::new();
    while let Some(next) = core.front() {
        core.pop();
        all.push(next);
    }
    all
}

fn is_audio_or_mark(command: &AgentCommand) -> bool {
    matches!(command, AgentCommand::Audio(_) | AgentCommand::Mark(_))
}

#[test]
fn which_losses_are_fatal_is_the_cores_decision() {
    let closed = |code| Lost::Closed {
        code,
        reason: String::new(),
    };
    for code in [3000, 4000, 1008] {
        assert!(closed(code).is_fatal(), "{code}");
    }
    for code in [1000, 1001, 1005, 1006, 1011, 1013] {
        assert!(!closed(code).is_fatal(), "{code}");
    }
    let refused = |status| Lost::Refused {
        status,
        body: String::new(),
    };
    for status in [400, 401, 403, 404] {
        assert!(refused(status).is_fatal(), "{status}");
    }
    for status in [429, 500, 502, 503] {
        assert!(!refused(status).is_fatal(), "{status}");
    }
    assert!(Lost::Untrusted("TLS".into()).is_fatal());
    assert!(Lost::Unusable("bad url".into()).is_fatal());
    assert!(!Lost::Broken("reset".into()).is_fatal());
    // On a call: a close with 1011 is an outage (reconnect); one with 1008 is final.
    let mut t = T::new(settings(), Protocol::Inbound);
    t.ready();
    t.lost_with(1, closed(1011));
    assert!(t.events("backend_failed").is_empty());
    assert_eq!(
        t.events("backend_lost")[0]["reason"],
        "the service closed the connection (1011 )"
    );
    t.core.handle_timeout(t.now);
    t.drain();
    assert!(t.other.contains(&Output::Connect { conn: 2 }));
    t.ready();
    t.lost_with(2, closed(1008));
    let failed = t.events("backend_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["fatal"], true);
    assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
    assert_eq!(t.core.poll_timeout(), None, "no retry");
}

#[test]
fn a_clear_drops_what_waits_for_the_call_and_later_audio_has_the_new_epoch() {
    let mut t = T::new(settings(), Protocol::Inbound);
    t.ready();
    answer_undrained(&mut t, "r1", "item_1", 5);
    let waiting = t.core.front().expect("the answer waits for the call");
    assert_eq!(waiting.0, Epoch(0));
    // The service hears the caller: the core clears; nothing of the answer is left to send.
    let conn = t.core.current_conn().expect("a session");
    let speech = ServerEvent::SpeechStarted {
        item_id: "u1".into(),
        audio_start_ms: 0,
    };
    t.core.handle_server(t.now, conn, speech, t.now);
    let mut clears = 0;
    while let Some(output) = t.core.poll_output() {
        clears += usize::from(output == Output::Clear);
    }
    assert_eq!(clears, 1);
    let left = take_all(&mut t.core);
    assert!(
        !left.iter().any(|(_, c)| is_audio_or_mark(c)),
        "audio made before the clear is dropped at once: {left:?}"
    );
    // The driver cleared the call: epoch 1. The next answer's audio belongs to it.
    t.core.handle_cleared(Epoch(1));
    t.cleared(0, 100);
    answer_undrained(&mut t, "r2", "item_2", 2);
    let next = take_all(&mut t.core);
    assert!(
        next.iter()
            .any(|(_, c)| matches!(c, AgentCommand::Audio(_)))
    );
    assert!(next.iter().all(|(e, _)| *e == Epoch(1)), "{next:?}");
    // The call's own barge-in (epoch 2) drops the rest of that answer too, and what the core
    // records about it is stamped with epoch 2.
    answer_undrained(&mut t, "r3", "item_3", 3);
    t.core.handle_call_event(
        t.now,
        AgentEvent::BargeIn(Interruption {
            played_ms: 0,
            dropped_ms: 300,
            at_ms: 200,
            epoch: Epoch(2),
        }),
    );
    let after = take_all(&mut t.core);
    assert!(!after.iter().any(|(_, c)| is_audio_or_mark(c)), "{after:?}");
    let barge_in = after
        .iter()
        .find(|(_, c)| matches!(c, AgentCommand::Event(e) if e.name == "barge_in"))
        .expect("the barge-in is recorded");
    assert_eq!(barge_in.0, Epoch(2));
}

#[test]
fn the_agent_is_finished_when_the_call_ends_not_when_it_hangs_up() {
    // A bad key: the fallback plays, then the hang-up; the agent is not done before the call
    // has taken them.
    let mut t = T::new(settings(), Protocol::Inbound);
    t.core.handle_lost(
        t.now,
        1,
        Lost::Closed {
            code: 3000,
            reason: "invalid key".into(),
        },
    );
    assert!(!t.core.is_finished());
    assert!(matches!(
        t.core.front(),
        Some((_, AgentCommand::Event(_) | AgentCommand::Audio(_)))
    ));
    t.core.pop();
    // The caller hangs up before the rest was sent: nothing more reaches the call.
    t.core.handle_call_event(
        t.now,
        AgentEvent::Ended(callgate_proto::EndReason::PeerHangup),
    );
    assert!(t.core.is_finished());
    assert_eq!(t.core.front(), None);
    assert_eq!(t.core.poll_timeout(), None);
    // A call that ends mid-session: its connection closes, a running tool is recorded as
    // never answered, and the agent is done.
    let mut s = settings();
    s.builtin_tools.push(Builtin::SendSms);
    let mut t = T::new(s, Protocol::CallBridge);
    t.ready();
    t.function_call(None, "c1", "send_sms", "{\"content\": \"hi\"}");
    assert!(matches!(t.other.last(), Some(Output::Tool(_))));
    t.other.clear();
    assert!(!t.core.is_finished());
    t.core.handle_call_event(
        t.now,
        AgentEvent::Ended(callgate_proto::EndReason::PeerHangup),
    );
    let mut closed = Vec::new();
    while let Some(output) = t.core.poll_output() {
        closed.push(output);
    }
    assert!(closed.contains(&Output::Close { conn: 1 }), "{closed:?}");
    assert!(t.core.is_finished());
    // What is left for the call is only what its record takes: the tool that never answered.
    let Some((_, AgentCommand::Event(e))) = t.core.front() else {
        panic!(
            "the unanswered tool is left for the record: {:?}",
            t.core.front()
        );
    };
    assert_eq!(e.name, "tool_call");
    assert_eq!(e.detail["ok"], false);
    assert_eq!(
        e.detail["output"],
        "the call ended before the tool answered"
    );
    t.core.pop();
    assert_eq!(
        t.core.front(),
        None,
        "nothing else is sent to an ended call"
    );
}

#[test]
fn the_answer_still_playing_when_the_call_ends_reaches_the_record() {
    let mut t = T::new(settings(), Protocol::Inbound);
    t.ready();
    t.speak(
        "r1",
        "a1",
        2000,
        "Our opening hours are nine to five on weekdays.",
    );
    t.done("r1");
    t.at(100);
    t.started("a1", 0, 100);
    assert!(t.turns().is_empty(), "still playing: no turn yet");
    t.at(700);
    t.call_event(AgentEvent::Ended(callgate_proto::EndReason::PeerHangup));
    assert!(t.core.is_finished());
    let turns = t.turns();
    assert_eq!(turns.len(), 1, "{turns:?}");
    assert_eq!(turns[0].speaker, Speaker::Agent);
    assert_eq!(
        turns[0].text,
        "Our opening hours are nine to five on weekdays."
    );
    assert_eq!((turns[0].start_ms, turns[0].end_ms), (100, 700));
    assert!(turns[0].interrupted);
    assert_eq!(t.core.front(), None);
}

#[test]
fn a_session_set_up_again_while_hanging_up_is_never_renewed() {
    let mut s = settings();
    s.max_duration = crate::settings::Dur(Duration::from_secs(120));
    let mut t = T::new(s, Protocol::Inbound);
    t.ready();
    t.at(120_000);
    t.core.handle_timeout(t.now);
    t.drain();
    assert_eq!(t.commands.last(), Some(&AgentCommand::Hangup));
    // The connection drops during the goodbye: it is set up again, and serves to the end.
    t.lost(1, false, "reset");
    fire_next(&mut t).expect("the reconnection");
    assert_eq!(t.core.current_conn(), Some(2));
    t.ready();
    assert!(t.core.session.is_ready());
    assert_eq!(
        t.core.poll_timeout(),
        None,
        "no renewal is due while hanging up"
    );
}

/// Fires the core's next deadline. The core must consume what fired: a deadline can be due
/// again at the same instant only as a new step (the first retry is at once), and a few
/// steps settle it; a deadline left due would have the driver wake again and again without
/// time passing.
fn fire_next(t: &mut T) -> Option<Instant> {
    let at = t.core.poll_timeout()?;
    t.now = t.now.max(at);
    for _ in 0..3 {
        t.core.handle_timeout(t.now);
        t.drain();
        match t.core.poll_timeout() {
            Some(next) if next <= t.now => continue,
            _ => return Some(at),
        }
    }
    panic!("a deadline is still due at {:?} after 3 steps", t.now);
}

#[test]
fn every_deadline_is_consumed_when_it_fires() {
    let mut s = settings();
    s.greeting = false;
    s.session_max = crate::settings::Dur(Duration::from_secs(60));
    s.max_duration = crate::settings::Dur(Duration::from_secs(300));
    let mut t = T::new(s, Protocol::Inbound);
    // The first connection never answers: its set-up deadline, then the retry at once.
    let first = fire_next(&mut t).expect("the set-up deadline");
    assert_eq!(first, t.t0 + settings().connect_timeout.0);
    assert!(t.other.contains(&Output::Close { conn: 1 }));
    assert!(t.other.contains(&Output::Connect { conn: 2 }));
    t.ready();
    let ready_at = t.now;
    // Renewal due at a quiet moment: it starts; its new session never answers.
    t.other.clear();
    let renew = fire_next(&mut t).expect("the renewal");
    assert_eq!(renew, ready_at + Duration::from_secs(60));
    assert_eq!(t.other, vec![Output::Connect { conn: 3 }]);
    fire_next(&mut t).expect("the renewal's set-up deadline");
    assert_eq!(t.events("backend_renewal_failed").len(), 1);
    assert_eq!(t.core.current_conn(), Some(2));
    // Then max_duration: the call hangs up, and nothing more is due.
    while !t.commands.contains(&AgentCommand::Hangup) {
        fire_next(&mut t).expect("max_duration");
    }
    assert_eq!(t.events("max_duration").len(), 1);
    // Hanging up: no renewal is due any more (the renewal's retry was set), so no deadline
    // is left to fire, and none fires once the call has ended.
    assert_eq!(t.core.poll_timeout(), None, "no deadline while hanging up");
    t.other.clear();
    t.call_event(AgentEvent::Ended(callgate_proto::EndReason::AgentHangup));
    assert_eq!(t.core.poll_timeout(), None, "no deadline after the end");
    assert!(
        !t.other.iter().any(|o| matches!(o, Output::Connect { .. })),
        "{:?}",
        t.other
    );
}
