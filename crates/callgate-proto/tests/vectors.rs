//! Golden vectors: every file under `tests/vectors/<protocol>/` is a script of inputs with the
//! exact outputs expected, run against the server session or the phone side with a fake clock.
//! The format is described in `tests/vectors/README.md`.

#![allow(
    clippy::disallowed_methods,
    reason = "a fake clock needs one real Instant as its origin"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::detect;
use callgate_proto::{
    CallEvent, Command, Digit, Disconnect, DtmfDuration, EndReason, Error, Frame, Output,
    PhoneEvent, Protocol, Session, callbridge, inbound, twilio,
};
use serde_json::{Value, json};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Bytes {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect::<Vec<_>>()
        .into()
}

fn error_value(e: &Error) -> Value {
    json!({ "code": e.close_code().0, "reason": e.to_string() })
}

thread_local! {
    /// Set by a vector with `"raw_text": true`: compare sent text byte for byte.
    static RAW_TEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn frame_value(frame: Frame) -> Value {
    match frame {
        Frame::Text(t) if RAW_TEXT.get() => json!({ "send_text_raw": t }),
        Frame::Text(t) => match serde_json::from_str::<Value>(&t) {
            Ok(v) => json!({ "send_text": v }),
            Err(_) => json!({ "send_text_raw": t }),
        },
        Frame::Binary(b) => json!({ "send_binary_hex": hex(&b) }),
    }
}

fn call_output(o: Output<CallEvent>) -> Value {
    match o {
        Output::Send(f) => frame_value(f),
        Output::Close(c) => json!({ "close": [c.code.0, c.reason] }),
        Output::Event(e) => json!({ "event": match e {
            CallEvent::Answered => json!("answered"),
            CallEvent::Audio(b) => json!({ "audio_hex": hex(&b) }),
            CallEvent::Dtmf(d) => json!({ "dtmf": d.to_string() }),
            CallEvent::Ended(r) => json!({ "ended": r.as_str() }),
            CallEvent::Cdr(c) => json!({ "cdr": {
                "raw": c.raw,
                "problem": c.problem.map(|p| p.to_string()),
            }}),
            CallEvent::CdrMissing => json!("cdr_missing"),
            CallEvent::Unknown(t) => json!({ "unknown": t }),
            CallEvent::Violation(e) => json!({ "violation": { "kind": e.kind(), "message": e.to_string() } }),
            CallEvent::MarkPlayed(n) => json!({ "mark_played": n }),
        }}),
    }
}

fn phone_output(o: Output<PhoneEvent>) -> Value {
    match o {
        Output::Send(f) => frame_value(f),
        Output::Close(c) => json!({ "close": [c.code.0, c.reason] }),
        Output::Event(e) => json!({ "event": match e {
            PhoneEvent::Answered => json!("answered"),
            PhoneEvent::Audio(b) => json!({ "audio_hex": hex(&b) }),
            PhoneEvent::Dtmf { digit, duration } => json!({ "dtmf": { "digit": digit.to_string(), "duration": duration.as_millis() } }),
            PhoneEvent::Hangup => json!("hangup"),
            PhoneEvent::Unknown(t) => json!({ "unknown": t }),
            PhoneEvent::Violation(e) => json!({ "violation": { "kind": e.kind(), "message": e.to_string() } }),
            PhoneEvent::Closed(d) => json!({ "closed": format!("{d:?}").to_lowercase() }),
        }}),
    }
}

fn disconnect(v: &Value) -> Disconnect {
    match v.as_str() {
        Some("closed") => Disconnect::Closed,
        Some("dropped") => Disconnect::Dropped,
        Some("send_timeout") => Disconnect::SendTimeout,
        other => panic!("unknown disconnect {other:?}"),
    }
}

fn command(v: &Value) -> Command {
    if let Some(s) = v.as_str() {
        return match s {
            "answer" => Command::Answer,
            "agent_hangup" => Command::Hangup(EndReason::AgentHangup),
            "operator_hangup" => Command::Hangup(EndReason::OperatorHangup),
            "agent_failed" => Command::Hangup(EndReason::AgentFailed),
            other => panic!("unknown command {other}"),
        };
    }
    if let Some(a) = v.get("audio_hex") {
        return Command::Audio(unhex(a.as_str().expect("hex")));
    }
    let d = &v["dtmf"];
    Command::Dtmf {
        digit: Digit::parse(d["digit"].as_str().expect("digit")).expect("valid digit"),
        duration: DtmfDuration::from_millis(d["duration"].as_u64().expect("ms")).expect("duration"),
    }
}

/// Runs one vector; returns a description of the first mismatch.
fn run(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("bad vector: {e}"))?;
    let t0 = Instant::now();
    let at = |step: &Value| t0 + Duration::from_millis(step["at_ms"].as_u64().unwrap_or(0));
    let side = v["side"].as_str().unwrap_or("server");
    RAW_TEXT.set(v["raw_text"].as_bool().unwrap_or(false));
    // `start`: the first message, or (Twilio) the list of messages before the call starts.
    let start_texts: Vec<String> = match &v["start"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(all) => all
            .iter()
            .map(|m| m.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or("start must be strings")?,
        _ => return Err("vector has no start".into()),
    };
    let start_text = start_texts.last().map_or("", String::as_str);
    let mut outputs: Vec<Value> = Vec::new();

    if side == "server" {
        let forced = v["path"].as_str().and_then(Protocol::from_path);
        let mut handshake = detect::Handshake::new(forced);
        let mut started = Ok(None);
        for text in &start_texts {
            started = handshake.handle_text(text);
            if !matches!(started, Ok(None)) {
                break;
            }
        }
        let start = match started {
            Ok(Some(s)) => s,
            Ok(None) => return Err("the start messages do not start a call".into()),
            Err(e) => {
                let got = error_value(&e);
                return if v["start_error"] == got {
                    Ok(())
                } else {
                    Err(format!(
                        "start error: expected {}, got {got}",
                        v["start_error"]
                    ))
                };
            }
        };
        if !v["start_error"].is_null() {
            return Err(format!(
                "expected start error {}, got a call",
                v["start_error"]
            ));
        }
        let cdr_timeout = Duration::from_millis(v["cdr_timeout_ms"].as_u64().unwrap_or(10_000));
        let mut s = Session::new(t0, start, inbound::Config { cdr_timeout });
        for (i, step) in v["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let now = at(step);
            let input = &step["input"];
            let mut command_error = Value::Null;
            if let Some(t) = input.get("text") {
                s.handle_text(now, t.as_str().expect("text"));
            } else if let Some(b) = input.get("binary_hex") {
                s.handle_binary(now, unhex(b.as_str().expect("hex")));
            } else if let Some(d) = input.get("peer_close") {
                s.handle_peer_close(now, disconnect(d));
            } else if let Some(c) = input.get("command") {
                if let Err(e) = s.handle_command(now, command(c)) {
                    command_error = json!(e.to_string());
                }
            } else if input.get("timeout").is_some() {
                s.handle_timeout(now);
            } else if input.get("shutdown").is_some() {
                s.handle_shutdown(now);
            } else if input.get("mark").is_some() {
                let placed = s.handle_mark(now);
                if let Some(expected) = step.get("mark_placed")
                    && json!(placed) != *expected
                {
                    return Err(format!(
                        "step {i}: mark expected {expected}, got {placed:?}"
                    ));
                }
            } else if input.get("clear").is_some() {
                s.handle_clear(now);
            } else if input.get("message_too_big").is_some() {
                s.handle_violation(now, Error::MessageTooBig { max: 4096 });
            } else {
                return Err(format!("step {i}: unknown input {input}"));
            }
            outputs.clear();
            while let Some(o) = s.poll_output() {
                outputs.push(call_output(o));
            }
            check(i, step, &outputs)?;
            if step["command_error"] != command_error {
                return Err(format!(
                    "step {i}: command error expected {}, got {command_error}",
                    step["command_error"]
                ));
            }
            let deadline = s
                .poll_timeout()
                .map(|d| d.duration_since(t0).as_millis() as u64);
            if let Some(expected) = step.get("deadline_ms")
                && json!(deadline) != *expected
            {
                return Err(format!(
                    "step {i}: deadline expected {expected}, got {deadline:?}"
                ));
            }
            if let Some(expected) = step.get("closed")
                && json!(s.is_closed()) != *expected
            {
                return Err(format!("step {i}: is_closed expected {expected}"));
            }
        }
        return Ok(());
    }

    // Phone side.
    let protocol = v["protocol"]
        .as_str()
        .ok_or("phone vector needs protocol")?;
    let mut cb = None;
    let mut ib = None;
    let mut tw = None;
    match protocol {
        "twilio" => {
            let start = twilio::Start::parse(start_text).map_err(|e| e.to_string())?;
            tw = Some(twilio::Phone::new(&start));
        }
        "callbridge" => {
            let start = callbridge::Start::parse(start_text).map_err(|e| e.to_string())?;
            cb = Some(callbridge::Phone::new(&start));
        }
        _ => {
            let call = inbound::IncomingCall::parse(start_text).map_err(|e| e.to_string())?;
            ib = Some(inbound::Phone::new(&call));
        }
    }
    let drain = |cb: &mut Option<callbridge::Phone>,
                 ib: &mut Option<inbound::Phone>,
                 tw: &mut Option<twilio::Phone>| {
        let mut out = Vec::new();
        if let Some(p) = tw {
            while let Some(o) = p.poll_output() {
                out.push(phone_output(o));
            }
        }
        if let Some(p) = cb {
            while let Some(o) = p.poll_output() {
                out.push(phone_output(o));
            }
        }
        if let Some(p) = ib {
            while let Some(o) = p.poll_output() {
                out.push(phone_output(o));
            }
        }
        out
    };
    let first = drain(&mut cb, &mut ib, &mut tw);
    if first != v["first"].as_array().cloned().unwrap_or_default() {
        return Err(format!(
            "first outputs: expected {}, got {}",
            v["first"],
            json!(first)
        ));
    }
    for (i, step) in v["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let input = &step["input"];
        if let Some(t) = input.get("text") {
            let t = t.as_str().expect("text");
            if let Some(p) = &mut cb {
                p.handle_text(t)
            }
            if let Some(p) = &mut ib {
                p.handle_text(t)
            }
            if let Some(p) = &mut tw {
                p.handle_text(t)
            }
        } else if let Some(b) = input.get("binary_hex") {
            let b = unhex(b.as_str().expect("hex"));
            if let Some(p) = &mut cb {
                p.handle_binary(b.clone())
            }
            if let Some(p) = &mut ib {
                p.handle_binary(b.clone())
            }
            if let Some(p) = &mut tw {
                p.handle_binary(b)
            }
        } else if let Some(d) = input.get("peer_close") {
            if let Some(p) = &mut cb {
                p.handle_peer_close(disconnect(d))
            }
            if let Some(p) = &mut ib {
                p.handle_peer_close(disconnect(d))
            }
            if let Some(p) = &mut tw {
                p.handle_peer_close(disconnect(d))
            }
        } else if let Some(a) = input.get("phone")
            && let Some(p) = &mut tw
        {
            match a.as_str() {
                Some("hangup") => p.hangup(),
                _ if a.get("audio_hex").is_some() => {
                    p.send_audio(unhex(a["audio_hex"].as_str().expect("hex")))
                }
                _ if a.get("dtmf").is_some() => {
                    p.send_dtmf(Digit::parse(a["dtmf"].as_str().expect("digit")).expect("digit"))
                }
                _ => return Err(format!("step {i}: unknown phone action {a}")),
            }
        } else if let Some(a) = input.get("phone") {
            match (a.as_str(), &mut cb, &mut ib) {
                (Some("hangup"), Some(p), _) => p.hangup(),
                (Some("hangup"), _, Some(p)) => p.hangup(),
                (Some("close"), _, Some(p)) => p.close(),
                _ if a.get("audio_hex").is_some() => {
                    let b = unhex(a["audio_hex"].as_str().expect("hex"));
                    if let Some(p) = &mut cb {
                        p.send_audio(b.clone())
                    }
                    if let Some(p) = &mut ib {
                        p.send_audio(b)
                    }
                }
                (_, _, Some(p)) if a.get("dtmf").is_some() => {
                    p.send_dtmf(Digit::parse(a["dtmf"].as_str().expect("digit")).expect("digit"))
                }
                (_, _, Some(p)) if a.get("cdr").is_some() => p.send_cdr(
                    &inbound::Cdr::parse(a["cdr"].as_str().expect("cdr")).expect("valid cdr"),
                ),
                _ => return Err(format!("step {i}: unknown phone action {a}")),
            }
        } else {
            return Err(format!("step {i}: unknown input {input}"));
        }
        let out = drain(&mut cb, &mut ib, &mut tw);
        check(i, step, &out)?;
    }
    Ok(())
}

fn check(i: usize, step: &Value, outputs: &[Value]) -> Result<(), String> {
    let expected = step["expect"].as_array().cloned().unwrap_or_default();
    if outputs != expected.as_slice() {
        return Err(format!(
            "step {i} ({}): expected\n  {}\ngot\n  {}",
            step["input"],
            json!(expected),
            json!(outputs)
        ));
    }
    Ok(())
}

#[test]
fn golden_vectors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut count = 0;
    let mut failures = Vec::new();
    for protocol in ["callbridge", "inbound", "twilio"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(protocol))
            .expect("vector dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for file in files {
            count += 1;
            if let Err(e) = run(&file) {
                failures.push(format!("{}: {e}", file.display()));
            }
        }
    }
    assert!(count >= 50, "only {count} vectors found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
