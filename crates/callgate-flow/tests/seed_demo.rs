//! The seed demo (`examples/flows/seed-demo.toml`, built in as `demo = "seed-demo"`) from the
//! phone side: the reference call flow of the inbound API document. answer at once; two
//! seconds later DTMF `1` for 200 ms; the caller's audio echoed; ten seconds after that the
//! server hangs up and waits for the CDR. CallBridge calls get the same minus the DTMF.
//!
//! Timing is measured from the phone side and printed. The assertions on it are lower bounds
//! (with one frame of slack), which a busy machine cannot break: the server never acts early.
// The phone's side times the call (answer to DTMF, to hangup): it reads the clock, the engine
// under test does not.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use callgate_agent::Catalog;
use callgate_flow::FlowEnv;
use callgate_server::routes::parse_spec;
use callgate_testkit::audio::{frames, speechlike_pcm16};
use callgate_testkit::{
    Phone, Received, TempDir, TestServer, callbridge_start, cdr, incoming_call,
    spawn_server_with_catalog,
};
use serde_json::json;
use tokio::time::Instant;

/// One 20 ms frame.
const FRAME: Duration = Duration::from_millis(20);

async fn seed_server(dir: &TempDir) -> TestServer {
    let mut catalog = Catalog::builtin();
    callgate_flow::register(
        &mut catalog,
        FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
            stt: None,
        },
    );
    spawn_server_with_catalog(&catalog, |c| {
        c.routes = vec![
            parse_spec(
                json!({"name": "seed", "agent": "flow", "settings": {"demo": "seed-demo"}}),
                0,
            )
            .expect("route"),
        ];
    })
    .await
}

/// What the phone saw, with times since the call was answered (or started, CallBridge).
#[derive(Debug, Default)]
struct Seen {
    dtmf: Vec<(Duration, serde_json::Value)>,
    /// Echoed frames: when the first came, and their indexes in what the phone sent.
    first_echo: Option<Duration>,
    echoed: Vec<usize>,
    end: Option<(Duration, Received)>,
}

/// Streams audio (one frame every 20 ms) and records what comes back until the server hangs
/// up or closes, or until `hang_up_after` (then the phone hangs up).
async fn stream(phone: &mut Phone, answered: Instant, hang_up_after: Option<Duration>) -> Seen {
    let sent = frames(&speechlike_pcm16(20_000, 8000, 3), 320);
    let mut next = 0;
    let mut tick = tokio::time::interval(FRAME);
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if hang_up_after.is_some_and(|after| answered.elapsed() >= after) {
                    phone.text(r#"{"event":"hangup"}"#).await;
                    return seen;
                }
                if let Some(frame) = sent.get(next) {
                    phone.binary(frame.clone()).await;
                    next += 1;
                }
            }
            received = phone.recv() => {
                let at = answered.elapsed();
                match received {
                    Received::Binary(b) => {
                        let index = sent
                            .iter()
                            .position(|f| *f == b)
                            .expect("every frame heard is one the caller sent");
                        seen.first_echo.get_or_insert(at);
                        seen.echoed.push(index);
                    }
                    Received::Text(t) => {
                        let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                        if v["event"] == "dtmf" {
                            seen.dtmf.push((at, v));
                        } else {
                            seen.end = Some((at, Received::Text(t)));
                            return seen;
                        }
                    }
                    other => {
                        seen.end = Some((at, other));
                        return seen;
                    }
                }
            }
        }
    }
}

fn check_echo(seen: &Seen) {
    assert!(
        seen.echoed.len() > 50,
        "{} frames echoed",
        seen.echoed.len()
    );
    assert!(
        seen.echoed.windows(2).all(|w| w[1] == w[0] + 1),
        "the echo is the caller's audio, in order, without gaps"
    );
    // Nothing is echoed during the first two seconds (the pause).
    let first = seen.first_echo.expect("an echo");
    assert!(
        first >= Duration::from_secs(2) - FRAME,
        "first echo at {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_answer_dtmf_after_2s_echo_then_the_server_hangs_up_after_10s() {
    let dir = TempDir::new("seed-server");
    let server = seed_server(&dir).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("seed-1")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    let answered = Instant::now();
    let seen = stream(&mut phone, answered, None).await;
    eprintln!(
        "seed demo (inbound): dtmf at {:?}, echo from {:?}, hangup at {:?}",
        seen.dtmf.first().map(|d| d.0),
        seen.first_echo,
        seen.end.as_ref().map(|e| e.0)
    );
    assert_eq!(seen.dtmf.len(), 1, "{seen:?}");
    let (dtmf_at, dtmf) = &seen.dtmf[0];
    assert_eq!(
        *dtmf,
        json!({"event": "dtmf", "digit": "1", "duration": 200})
    );
    assert!(*dtmf_at >= Duration::from_secs(2) - FRAME, "{dtmf_at:?}");
    let (hangup_at, hangup) = seen.end.as_ref().expect("the server hung up");
    assert_eq!(*hangup, Received::Text(r#"{"event":"hangup"}"#.into()));
    assert!(
        *hangup_at >= *dtmf_at + Duration::from_secs(10) - FRAME,
        "{hangup_at:?}"
    );
    check_echo(&seen);
    // The server waits for the CDR, then closes.
    phone.text(cdr("seed-1")).await;
    assert_eq!(phone.closed().await.0, 1000);
    let record = server.ended_call("seed-1").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    assert!(record["cdr"].is_object(), "{record}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_the_caller_hangs_up_first_during_the_echo() {
    let dir = TempDir::new("seed-caller");
    let server = seed_server(&dir).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("seed-2")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    let answered = Instant::now();
    let seen = stream(&mut phone, answered, Some(Duration::from_secs(4))).await;
    assert_eq!(seen.dtmf.len(), 1, "{seen:?}");
    assert!(seen.dtmf[0].0 >= Duration::from_secs(2) - FRAME);
    assert!(
        seen.end.is_none(),
        "the server did not hang up first: {seen:?}"
    );
    check_echo(&seen);
    phone.text(cdr("seed-2")).await;
    phone.closed().await;
    let record = server.ended_call("seed-2").await;
    assert_eq!(record["end_reason"], "peer_hangup");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbridge_gets_the_same_minus_the_dtmf() {
    let dir = TempDir::new("seed-cb");
    let server = seed_server(&dir).await;
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("seed-3")).await;
    assert_eq!(phone.recv().await.json()["type"], "started");
    let started = Instant::now();
    let seen = stream(&mut phone, started, None).await;
    eprintln!(
        "seed demo (CallBridge): echo from {:?}, close at {:?}",
        seen.first_echo,
        seen.end.as_ref().map(|e| e.0)
    );
    assert!(seen.dtmf.is_empty());
    let (closed_at, end) = seen.end.as_ref().expect("the server ended the call");
    assert!(matches!(end, Received::Close(1000, _)), "{end:?}");
    assert!(
        *closed_at >= Duration::from_secs(12) - FRAME,
        "{closed_at:?}"
    );
    check_echo(&seen);
    let record = server.ended_call("seed-3").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    server.shutdown().await;
}
