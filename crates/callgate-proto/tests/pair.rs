//! Deterministic session tests: the phone side and the server session of each protocol wired
//! together in-process, frames shuttled by hand, time faked.

#![allow(
    clippy::disallowed_methods,
    reason = "a fake clock needs one real Instant as its origin"
)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::detect::{self, Start};
use callgate_proto::{
    CallEvent, Close, Command, Digit, Disconnect, DtmfDuration, EndReason, Frame, Output,
    PhoneEvent, callbridge, inbound,
};

/// Everything one side produced in one exchange.
#[derive(Debug, Default)]
struct Seen<E> {
    frames: Vec<Frame>,
    close: Option<Close>,
    events: Vec<E>,
}

fn split<E>(outputs: impl Iterator<Item = Output<E>>) -> Seen<E> {
    let mut seen = Seen {
        frames: Vec::new(),
        close: None,
        events: Vec::new(),
    };
    for o in outputs {
        match o {
            Output::Send(f) => seen.frames.push(f),
            Output::Close(c) => seen.close = Some(c),
            Output::Event(e) => seen.events.push(e),
        }
    }
    seen
}

fn drain_inbound(s: &mut inbound::Session) -> Seen<CallEvent> {
    split(std::iter::from_fn(|| s.poll_output()))
}

fn drain_phone(p: &mut inbound::Phone) -> Seen<PhoneEvent> {
    split(std::iter::from_fn(|| p.poll_output()))
}

fn deliver_to_server(s: &mut inbound::Session, now: Instant, frames: Vec<Frame>) {
    for f in frames {
        match f {
            Frame::Text(t) => s.handle_text(now, &t),
            Frame::Binary(b) => s.handle_binary(now, b),
        }
    }
}

fn deliver_to_phone(p: &mut inbound::Phone, frames: Vec<Frame>) {
    for f in frames {
        match f {
            Frame::Text(t) => p.handle_text(&t),
            Frame::Binary(b) => p.handle_binary(b),
        }
    }
}

#[test]
fn inbound_reference_flow_between_phone_and_server() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let call = inbound::IncomingCall {
        caller_id: "01011112222".into(),
        did_number: "0212345678".into(),
        session_id: "pair-1".into(),
    };
    let mut phone = inbound::Phone::new(&call);
    let first = drain_phone(&mut phone);
    let Frame::Text(start) = &first.frames[0] else {
        panic!("the phone starts with text");
    };
    let Ok(Start::Inbound(parsed)) = detect::first_message(start, None) else {
        panic!("the server detects inbound");
    };
    assert_eq!(parsed, call);
    let mut server = inbound::Session::new(at(0), parsed, inbound::Config::default());

    // The agent answers; the phone sees it.
    server.handle_command(at(5), Command::Answer).unwrap();
    let out = drain_inbound(&mut server);
    assert_eq!(out.events, [CallEvent::Answered]);
    deliver_to_phone(&mut phone, out.frames);
    assert_eq!(drain_phone(&mut phone).events, [PhoneEvent::Answered]);

    // Audio and DTMF both ways.
    let frame = Bytes::from(vec![7u8; 320]);
    phone.send_audio(frame.clone());
    phone.send_dtmf(Digit::Star);
    deliver_to_server(&mut server, at(20), drain_phone(&mut phone).frames);
    assert_eq!(
        drain_inbound(&mut server).events,
        [
            CallEvent::Audio(frame.clone()),
            CallEvent::Dtmf(Digit::Star)
        ]
    );
    let duration = DtmfDuration::from_millis(200).unwrap();
    server
        .handle_command(at(40), Command::Audio(frame.clone()))
        .unwrap();
    server
        .handle_command(
            at(41),
            Command::Dtmf {
                digit: Digit::D9,
                duration,
            },
        )
        .unwrap();
    deliver_to_phone(&mut phone, drain_inbound(&mut server).frames);
    assert_eq!(
        drain_phone(&mut phone).events,
        [
            PhoneEvent::Audio(frame),
            PhoneEvent::Dtmf {
                digit: Digit::D9,
                duration
            }
        ]
    );

    // The agent hangs up; the phone answers with its CDR; the server closes.
    server
        .handle_command(at(10_000), Command::Hangup(EndReason::AgentHangup))
        .unwrap();
    let out = drain_inbound(&mut server);
    assert_eq!(out.events, [CallEvent::Ended(EndReason::AgentHangup)]);
    assert_eq!(
        server.poll_timeout(),
        Some(at(10_000) + inbound::Config::default().cdr_timeout)
    );
    deliver_to_phone(&mut phone, out.frames);
    assert_eq!(drain_phone(&mut phone).events, [PhoneEvent::Hangup]);
    let cdr = inbound::Cdr {
        session_id: "pair-1".into(),
        destination: "0212345678".into(),
        start_time: "2026-11-21T10:00:00Z".into(),
        answer_time: Some("2026-11-21T10:00:00Z".into()),
        end_time: "2026-11-21T10:00:10Z".into(),
        duration: 10.0,
        billable_seconds: 10.0,
        disposition: "ANSWERED".into(),
        hangup_by: "server".into(),
        hangup_cause_code: "16".into(),
        hangup_cause_text: "Normal Clearing".into(),
    };
    phone.send_cdr(&cdr);
    let out = drain_phone(&mut phone);
    assert_eq!(out.close.map(|c| c.code.0), Some(1000));
    deliver_to_server(&mut server, at(10_050), out.frames);
    let out = drain_inbound(&mut server);
    let [CallEvent::Cdr(report)] = out.events.as_slice() else {
        panic!("expected the CDR, got {:?}", out.events);
    };
    assert_eq!(report.problem, None);
    assert_eq!(inbound::Cdr::parse(&report.raw), Ok(cdr));
    assert_eq!(out.close.map(|c| c.code.0), Some(1000));
    assert!(server.is_closed());
}

#[test]
fn inbound_cdr_wait_is_bounded_on_the_fake_clock() {
    let t0 = Instant::now();
    let call = inbound::IncomingCall {
        caller_id: "1".into(),
        did_number: "2".into(),
        session_id: "3".into(),
    };
    let config = inbound::Config {
        cdr_timeout: Duration::from_secs(3),
    };
    let mut server = inbound::Session::new(t0, call, config);
    server.handle_command(t0, Command::Answer).unwrap();
    server.handle_text(t0 + Duration::from_secs(1), r#"{"event":"hangup"}"#);
    drain_inbound(&mut server);
    let deadline = server.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(4));
    server.handle_timeout(deadline - Duration::from_millis(1));
    assert!(!server.is_closed());
    server.handle_timeout(deadline);
    let out = drain_inbound(&mut server);
    assert_eq!(out.events, [CallEvent::CdrMissing]);
    assert_eq!(out.close.map(|c| c.code.0), Some(1000));
}

#[test]
fn callbridge_flow_between_phone_and_server() {
    let t0 = Instant::now();
    let start = callbridge::Start::new(
        callbridge::CallConfig {
            site_id: "site".into(),
            caller: "01012341234".into(),
            callee: "07012345678".into(),
            cdr_id: "10014473".into(),
            call_action_id: "1.758187055878E9".into(),
            ivr_ip: "192.168.150.103:29034".into(),
            agent_id: "agent-main".into(),
            agent_type: "voice".into(),
        },
        callbridge::AudioFormats::default(),
    );
    let mut phone = callbridge::Phone::new(&start);
    let Some(Output::Send(Frame::Text(first))) = phone.poll_output() else {
        panic!("the phone starts with the start message");
    };
    let Ok(Start::CallBridge(parsed)) = detect::first_message(&first, None) else {
        panic!("the server detects CallBridge");
    };
    assert_eq!(parsed, start);
    let mut server = callbridge::Session::new(t0, parsed);
    server.handle_command(t0, Command::Answer).unwrap();
    while let Some(o) = server.poll_output() {
        if let Output::Send(Frame::Text(t)) = o {
            phone.handle_text(&t);
        }
    }
    assert_eq!(
        phone.poll_output(),
        Some(Output::Event(PhoneEvent::Answered))
    );
    assert!(phone.is_answered());
    phone.hangup();
    assert!(matches!(phone.poll_output(), Some(Output::Close(c)) if c.code.0 == 1000));
    server.handle_peer_close(t0, Disconnect::Closed);
    assert_eq!(
        server.poll_output(),
        Some(Output::Event(CallEvent::Ended(EndReason::PeerClosed)))
    );
    assert!(server.is_closed());
}
