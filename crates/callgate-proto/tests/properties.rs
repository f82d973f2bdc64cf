//! Property tests: nothing panics on any input, sessions keep their invariants, and every
//! message round-trips through encode and decode.

#![allow(
    clippy::disallowed_methods,
    reason = "a fake clock needs one real Instant as its origin"
)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::detect::{self, Start};
use callgate_proto::{
    AudioFormat, CallEvent, Command, Digit, Disconnect, DtmfDuration, EndReason, Error, Output,
    Protocol, Session, callbridge, inbound, twilio,
};
use proptest::prelude::*;

/// Strings that look like protocol messages often enough to get past the JSON parser.
fn messageish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("event"),
        Just("call_config"),
        Just("audio_format"),
        Just("digit"),
        Just("callerId"),
        Just("didNumber"),
        Just("sessionId"),
        Just("cdrId"),
        Just("caller"),
        Just("duration"),
        Just("hangupCauseCode"),
        Just("media"),
        Just("mark"),
        Just("start"),
        Just("streamSid"),
    ];
    let value = prop_oneof![
        Just("\"incoming_call\"".to_owned()),
        Just("\"dtmf\"".to_owned()),
        Just("\"hangup\"".to_owned()),
        Just("\"cdr\"".to_owned()),
        Just("null".to_owned()),
        Just("{}".to_owned()),
        Just("[1]".to_owned()),
        Just("\"PCM_8000\"".to_owned()),
        Just("\"connected\"".to_owned()),
        Just("\"media\"".to_owned()),
        Just("\"mark\"".to_owned()),
        Just("\"stop\"".to_owned()),
        Just("{\"payload\":\"AAEC\"}".to_owned()),
        Just("{\"name\":\"cg-1\"}".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:?}")),
        "\\PC{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
    ];
    prop_oneof![
        any::<String>(),
        prop::collection::vec((key, value), 0..6).prop_map(|kvs| {
            let body: Vec<String> = kvs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        }),
    ]
}

#[derive(Debug, Clone)]
enum Input {
    Text(String),
    Binary(Vec<u8>),
    PeerClose(bool),
    Command(u8, u16),
    Timeout(u64),
    Shutdown,
    TooBig,
    Mark,
    Clear,
}

fn inputs() -> impl Strategy<Value = Vec<Input>> {
    prop::collection::vec(
        prop_oneof![
            messageish().prop_map(Input::Text),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(Input::Binary),
            any::<bool>().prop_map(Input::PeerClose),
            (0u8..5, 0u16..1200).prop_map(|(c, d)| Input::Command(c, d)),
            (0u64..20_000).prop_map(Input::Timeout),
            Just(Input::Shutdown),
            Just(Input::TooBig),
            Just(Input::Mark),
            Just(Input::Clear),
        ],
        0..24,
    )
}

fn command(c: u8, d: u16) -> Option<Command> {
    Some(match c {
        0 => Command::Answer,
        1 => Command::Audio(Bytes::from_static(b"\x01\x02")),
        2 => Command::Dtmf {
            digit: Digit::from_char("0123456789*#ABCD".chars().nth(d as usize % 16)?)?,
            duration: DtmfDuration::from_millis(u64::from(d))?,
        },
        3 => Command::Hangup(EndReason::AgentHangup),
        _ => Command::Hangup(EndReason::OperatorHangup),
    })
}

/// Drives a session through `inputs` and checks: Ended at most once, Close last and at most
/// once, nothing after Close, and `is_closed` once a Close or a peer disconnect happened.
macro_rules! check_session {
    ($session:expr, $inputs:expr) => {{
        let t0 = Instant::now();
        let mut s = $session;
        let mut ended = 0;
        let mut closed = false;
        let mut clock = 0u64;
        for input in $inputs {
            let now = t0 + Duration::from_millis(clock);
            match input {
                Input::Text(t) => s.handle_text(now, &t),
                Input::Binary(b) => s.handle_binary(now, Bytes::from(b)),
                Input::PeerClose(clean) => s.handle_peer_close(
                    now,
                    if clean {
                        Disconnect::Closed
                    } else {
                        Disconnect::Dropped
                    },
                ),
                Input::Command(c, d) => {
                    if let Some(c) = command(c, d) {
                        let _ = s.handle_command(now, c);
                    }
                }
                Input::Timeout(ms) => {
                    clock += ms;
                    s.handle_timeout(t0 + Duration::from_millis(clock));
                }
                Input::Shutdown => s.handle_shutdown(now),
                Input::TooBig => s.handle_violation(now, Error::MessageTooBig { max: 1 }),
                Input::Mark => {
                    let _ = s.handle_mark(now);
                }
                Input::Clear => s.handle_clear(now),
            }
            while let Some(o) = s.poll_output() {
                prop_assert!(!closed, "output after close: {o:?}");
                match o {
                    Output::Close(_) => closed = true,
                    Output::Event(CallEvent::Ended(_)) => ended += 1,
                    _ => {}
                }
            }
            prop_assert!(ended <= 1);
            if closed {
                prop_assert!(s.is_closed());
            }
        }
    }};
}

fn start_tw() -> twilio::Start {
    twilio::Start {
        info: twilio::StartInfo {
            stream_sid: "MZ1".into(),
            account_sid: "AC1".into(),
            call_sid: "CA1".into(),
            tracks: vec!["inbound".into()],
            custom_parameters: Default::default(),
            media_format: twilio::MediaFormat::default(),
        },
    }
}

fn start_cb() -> callbridge::Start {
    callbridge::Start::new(
        callbridge::CallConfig {
            site_id: "s".into(),
            caller: "1".into(),
            callee: "2".into(),
            cdr_id: "c".into(),
            call_action_id: "a".into(),
            ivr_ip: "i".into(),
            agent_id: "g".into(),
            agent_type: "t".into(),
        },
        callbridge::AudioFormats::default(),
    )
}

fn incoming() -> inbound::IncomingCall {
    inbound::IncomingCall {
        caller_id: "1".into(),
        did_number: "2".into(),
        session_id: "s".into(),
    }
}

proptest! {
    #[test]
    fn detect_never_panics(text in messageish(), forced in 0u8..3) {
        let forced = [None, Some(Protocol::CallBridge), Some(Protocol::Inbound)][forced as usize];
        if let Err(e) = detect::first_message(&text, forced) {
            // Every refusal has a close code in the documented set and a reason that fits.
            prop_assert!([1002, 1003, 1007, 1008, 1009].contains(&e.close_code().0));
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn handshake_never_panics(texts in prop::collection::vec(messageish(), 1..3), forced in 0u8..4) {
        let forced = [None, Some(Protocol::CallBridge), Some(Protocol::Inbound), Some(Protocol::Twilio)][forced as usize];
        let mut h = detect::Handshake::new(forced);
        for text in texts {
            match h.handle_text(&text) {
                Ok(None) => continue,
                Ok(Some(_)) => break,
                Err(e) => {
                    prop_assert!([1002, 1003, 1007, 1008, 1009].contains(&e.close_code().0));
                    break;
                }
            }
        }
    }

    #[test]
    fn twilio_session_invariants(inputs in inputs()) {
        check_session!(Session::Twilio(twilio::Session::new(Instant::now(), start_tw())), inputs);
    }

    #[test]
    fn twilio_start_round_trips(
        ids in prop::collection::vec("\\PC{0,12}", 3),
        params in prop::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..4),
    ) {
        let start = twilio::Start { info: twilio::StartInfo {
            stream_sid: ids[0].clone(),
            account_sid: ids[1].clone(),
            call_sid: ids[2].clone(),
            tracks: vec!["inbound".into()],
            custom_parameters: params,
            media_format: twilio::MediaFormat::default(),
        }};
        let mut h = detect::Handshake::new(None);
        prop_assert_eq!(h.handle_text(&twilio::connected_json()), Ok(None));
        prop_assert_eq!(h.handle_text(&start.to_json()), Ok(Some(Start::Twilio(start))));
    }

    #[test]
    fn twilio_messages_round_trip(
        seq in any::<u64>(), n in any::<u64>(), text in "\\PC{0,12}",
        payload in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::STANDARD.encode(&payload);
        let sid = text.clone();
        let to_bot = [
            twilio::ToBot::Media { sequence_number: twilio::Counter(seq), stream_sid: sid.clone(),
                media: twilio::MediaIn { track: "inbound".into(), chunk: twilio::Counter(n),
                    timestamp: twilio::Counter(n), payload: payload.clone() } },
            twilio::ToBot::Mark { sequence_number: twilio::Counter(seq), stream_sid: sid.clone(),
                mark: twilio::MarkInfo { name: text.clone() } },
            twilio::ToBot::Dtmf { sequence_number: twilio::Counter(seq), stream_sid: sid.clone(),
                dtmf: twilio::DtmfInfo { track: "inbound_track".into(), digit: text.clone() } },
            twilio::ToBot::Stop { sequence_number: twilio::Counter(seq), stream_sid: sid.clone(),
                stop: twilio::StopInfo { account_sid: text.clone(), call_sid: text.clone() } },
        ];
        for m in to_bot {
            prop_assert_eq!(serde_json::from_str::<twilio::ToBot>(&m.to_json()).ok(), Some(m));
        }
        let to_twilio = [
            twilio::ToTwilio::Media { stream_sid: sid.clone(), media: twilio::MediaOut { payload } },
            twilio::ToTwilio::Mark { stream_sid: sid.clone(), mark: twilio::MarkInfo { name: text } },
            twilio::ToTwilio::Clear { stream_sid: sid },
        ];
        for m in to_twilio {
            prop_assert_eq!(serde_json::from_str::<twilio::ToTwilio>(&m.to_json()).ok(), Some(m));
        }
    }

    #[test]
    fn parsers_never_panic(text in messageish()) {
        let _ = twilio::Start::parse(&text);
        let _ = callbridge::Start::parse(&text);
        let _ = inbound::IncomingCall::parse(&text);
        let _ = inbound::Cdr::parse(&text);
    }

    #[test]
    fn callbridge_session_invariants(inputs in inputs()) {
        check_session!(Session::CallBridge(callbridge::Session::new(Instant::now(), start_cb())), inputs);
    }

    #[test]
    fn inbound_session_invariants(inputs in inputs()) {
        check_session!(
            Session::Inbound(inbound::Session::new(Instant::now(), incoming(), inbound::Config::default())),
            inputs
        );
    }

    #[test]
    fn callbridge_start_round_trips(
        fields in prop::collection::vec("\\PC{0,12}", 8),
        out in 0usize..6,
        inp in 0usize..6,
    ) {
        let formats = [
            AudioFormat::Pcm8000, AudioFormat::Pcm16000, AudioFormat::Pcm24000,
            AudioFormat::Pcm48000, AudioFormat::Ulaw8000, AudioFormat::Alaw8000,
        ];
        let start = callbridge::Start::new(
            callbridge::CallConfig {
                site_id: fields[0].clone(),
                caller: fields[1].clone(),
                callee: fields[2].clone(),
                cdr_id: fields[3].clone(),
                call_action_id: fields[4].clone(),
                ivr_ip: fields[5].clone(),
                agent_id: fields[6].clone(),
                agent_type: fields[7].clone(),
            },
            callbridge::AudioFormats { phone_output: formats[out], phone_input: formats[inp] },
        );
        let parsed = detect::first_message(&start.to_json(), None);
        prop_assert_eq!(parsed, Ok(Start::CallBridge(start)));
    }

    #[test]
    fn incoming_call_round_trips(a in "\\PC{0,12}", b in "\\PC{0,12}", c in "\\PC{0,12}") {
        let call = inbound::IncomingCall { caller_id: a, did_number: b, session_id: c };
        prop_assert_eq!(inbound::IncomingCall::parse(&call.to_json()), Ok(call));
    }

    #[test]
    fn cdr_round_trips(
        text in prop::collection::vec("\\PC{0,10}", 8),
        answered in any::<bool>(),
        duration in 0.0f64..100_000.0,
        billable in 0u32..100_000,
        code in prop_oneof!["[0-9]{1,3}", "\\PC{0,6}"],
    ) {
        let cdr = inbound::Cdr {
            session_id: text[0].clone(),
            destination: text[1].clone(),
            start_time: text[2].clone(),
            answer_time: answered.then(|| text[3].clone()),
            end_time: text[4].clone(),
            duration,
            billable_seconds: f64::from(billable),
            disposition: text[5].clone(),
            hangup_by: text[6].clone(),
            hangup_cause_code: code,
            hangup_cause_text: text[7].clone(),
        };
        prop_assert_eq!(inbound::Cdr::parse(&cdr.to_json()), Ok(cdr));
    }
}
