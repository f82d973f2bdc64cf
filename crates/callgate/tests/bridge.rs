//! The `bridge` agent through both halves of Twilio Media Streams, with the real binary:
//! `callgate sim --protocol twilio` (its library) → `callgate serve` (a `bridge` route) → a
//! Twilio bot on 127.0.0.1 (the testkit's echo bot, or a Python bot written as a Pipecat user
//! writes one, `examples/bridge/echo_bot.py`, when `CALLGATE_TEST_PYTHON` names a Python that
//! has the `websockets` package; the same bot in Node with `ws`, `examples/bridge/echo_bot.js`,
//! when `CALLGATE_TEST_NODE_MODULES` names a `node_modules` that has `ws`; `.ci/run` makes
//! both).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use callgate_phone::sim::{self, SimOptions, Source};
use callgate_proto::{AudioFormat, Digit, Protocol};
use callgate_testkit::twilio_bot::{Bot, BotConfig};
use callgate_testkit::{Phone, Received, TempDir};
use common::Proc;
use serde_json::Value;

/// `callgate serve` with one `bridge` route to `url`.
fn serve(data: &TempDir, url: &str, extra: &str) -> Proc {
    let config = data.path().join("callgate.toml");
    let text = format!(
        "[[routes]]\nname = \"bot\"\nagent = \"bridge\"\n[routes.settings]\nurl = \"{url}\"\n\
         fallback = \"hangup\"\n{extra}\n"
    );
    std::fs::write(&config, text).expect("write config");
    Proc::serve(data, Some(&config))
}

async fn bridge_events(proc: &Proc, id: &str) -> Vec<Value> {
    let (status, body) = callgate_testkit::http::request(
        proc.admin,
        "GET",
        &format!("/api/calls/{id}/events"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let log: Value = serde_json::from_str(&body).expect("JSON");
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "agent" && e["detail"]["name"] == "bridge")
        .map(|e| e["detail"]["detail"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_twilio_through_a_bridge_route_to_an_echo_bot_round_trips_byte_exact() {
    let mut bot = Bot::start(BotConfig {
        echo: true,
        ..Default::default()
    })
    .await;
    let data = TempDir::new("bridge-sim");
    let proc = serve(&data, &bot.url("/twilio"), "");
    let summary = sim::run(
        &SimOptions {
            url: format!("ws://{}/twilio", proc.calls),
            protocol: Protocol::Twilio,
            call_id: "CA-sim".into(),
            send_format: AudioFormat::Ulaw8000,
            receive_format: AudioFormat::Ulaw8000,
            source: Source::Tone {
                hz: 440.0,
                duration: Duration::from_secs(1),
            },
            dtmf: vec![(Digit::D4, Duration::from_millis(300))],
            ..SimOptions::default()
        },
        |_| {},
    )
    .await
    .expect("the call runs");
    assert_eq!(summary.frames_sent, 50);
    // The caller's audio from before the bot's socket opened is dropped and counted (the
    // sim starts talking at once); everything after it comes back byte for byte.
    let record = proc.last_call().await;
    let events = bridge_events(&proc, record["id"].as_str().expect("id")).await;
    let dropped = events[0]["audio_dropped_before_open_frames"]
        .as_u64()
        .expect("counted");
    assert!(dropped < 10, "{events:?}");
    let echoed = summary.rtt.expect("echoed").samples;
    assert_eq!(
        echoed + dropped,
        50,
        "every frame after the open came back byte for byte"
    );
    assert_eq!(summary.ended_by, "caller");
    let mut conn = bot.accept().await;
    let start = conn.expect("start").await;
    assert_eq!(
        start["start"]["customParameters"]["callgate_protocol"],
        "twilio"
    );
    assert_eq!(conn.expect("dtmf").await["dtmf"]["digit"], "4");
    conn.expect("stop").await;
    assert_eq!(bot.echoed(), echoed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_twilio_hears_the_bots_goodbye_then_the_hang_up() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let data = TempDir::new("bridge-bye");
    let proc = serve(&data, &bot.url("/"), "");
    let sim = tokio::task::spawn_blocking({
        let url = format!("ws://{}/twilio", proc.calls);
        move || {
            let out = Command::new(common::BIN)
                .args(["sim", "--protocol", "twilio", "--wait-hangup", "--json"])
                .args(["--url", &url, "--id", "CA-bye"])
                .output()
                .expect("callgate sim");
            serde_json::from_slice::<Value>(&out.stdout).expect("the summary")
        }
    });
    let conn = bot.accept().await;
    let mut conn = conn;
    conn.expect("start").await;
    conn.media(&[0x2Au8; 4000]).await;
    conn.close(1000, "goodbye").await;
    let summary = sim.await.expect("sim")["summary"].clone();
    assert_eq!(summary["ended_by"], "server");
    assert_eq!(summary["close_code"], 1000);
    assert_eq!(
        summary["audio_received_ms"], 500,
        "the whole goodbye: {summary}"
    );
    let record = proc.last_call().await;
    assert_eq!(record["end_reason"], "agent_hangup");
}

/// A Python that has `websockets`, from `CALLGATE_TEST_PYTHON`.
fn python() -> Option<String> {
    std::env::var("CALLGATE_TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
}

/// A directory whose `node_modules` has `ws`, from `CALLGATE_TEST_NODE_MODULES`.
fn node_modules() -> Option<String> {
    std::env::var("CALLGATE_TEST_NODE_MODULES")
        .ok()
        .filter(|p| !p.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_bot_written_like_a_pipecat_bot_answers_a_callbridge_call() {
    let Some(python) = python() else {
        eprintln!("CALLGATE_TEST_PYTHON is not set: the Python bot test is skipped");
        return;
    };
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/bridge/echo_bot.py");
    let mut command = Command::new(python);
    command.arg(&script);
    a_bot_answers_a_callbridge_call(command, "cdr-py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_bot_written_with_ws_answers_a_callbridge_call() {
    let Some(modules) = node_modules() else {
        eprintln!("CALLGATE_TEST_NODE_MODULES is not set: the Node bot test is skipped");
        return;
    };
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/bridge/echo_bot.js");
    let mut command = Command::new("node");
    command.arg(&script).env("NODE_PATH", modules);
    a_bot_answers_a_callbridge_call(command, "cdr-node").await;
}

/// The bot `command` starts (`examples/bridge/echo_bot.*`: it prints `listening` with its
/// port, then one JSON line per event) answers a CallBridge call: five echoed replies, each
/// mark back once heard, the goodbye, then its close hangs up.
async fn a_bot_answers_a_callbridge_call(mut command: Command, cdr: &str) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bot");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let next = || {
        lines
            .recv_timeout(common::LOG_WAIT)
            .expect("the bot reports")
    };
    let listening = next();
    let port = listening["port"].as_u64().expect("port");
    let data = TempDir::new("bridge-script");
    let proc = serve(
        &data,
        &format!("ws://127.0.0.1:{port}/calls/{{{{cdrId}}}}"),
        "twilio_auth_token_env = \"PATH\"",
    );
    let mut phone = Phone::connect(&proc.url()).await;
    phone.text(callgate_testkit::callbridge_start(cdr)).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    // One second of the caller, in real time; the bot echoes it in five 200 ms replies.
    let caller = callgate_testkit::audio::speechlike_pcm16(1000, 8000, 7);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for frame in caller.chunks(320) {
        tick.tick().await;
        phone.binary(frame.to_vec()).await;
    }
    let mut heard = 0usize;
    let close = loop {
        match phone.recv().await {
            Received::Binary(b) => heard += b.len(),
            Received::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["type"] == "hangup" || v["event"] == "hangup" {
                    continue;
                }
            }
            Received::Close(code, _) => break code,
            Received::Eof => break 1006,
        }
    };
    // 1 s of echo and the 500 ms goodbye, as 8 kHz PCM.
    assert_eq!(
        heard,
        16000 + 8000,
        "the replies and the goodbye were played"
    );
    assert_eq!(close, 1000);
    let start = next();
    assert_eq!(start["event"], "start");
    assert_eq!(start["path"], format!("/calls/{cdr}"));
    assert_eq!(start["params"]["cdrId"], cdr);
    assert!(start["signature"].is_string(), "{start}");
    let marks: Vec<String> = (0..5)
        .map(|_| next()["name"].as_str().expect("a mark").to_owned())
        .collect();
    assert_eq!(
        marks,
        ["reply-1", "reply-2", "reply-3", "reply-4", "reply-5"]
    );
    let record = proc.last_call().await;
    assert_eq!(record["end_reason"], "agent_hangup");
    let events = bridge_events(&proc, record["id"].as_str().expect("id")).await;
    let bye = events
        .iter()
        .find(|e| e["what"] == "disconnect")
        .expect("disconnect");
    assert_eq!(bye["by"], "bot");
    assert_eq!(bye["code"], 1000);
    let _ = child.kill();
    let _ = child.wait();
}
