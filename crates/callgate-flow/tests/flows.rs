//! Flows over real sockets: calls placed with the testkit's phone against a server whose
//! catalog has the `flow` agent, webhooks against a real local HTTP server (axum), and the
//! record checked through the admin API.
//!
//! Prompts in these tests are DTMF tones (a 4 for the greeting, a 5 for the menu...), so the
//! phone side can tell exactly what it heard by decoding them.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use callgate_agent::Catalog;
use callgate_audio::{AudioFormat, dtmf, pcm};
use callgate_flow::FlowEnv;
use callgate_proto::Digit;
use callgate_server::routes::parse_spec;
use callgate_testkit::audio::speechlike_pcm16;
use callgate_testkit::{
    Phone, Received, TempDir, TestServer, callbridge_start, cdr, incoming_call,
    spawn_server_with_catalog,
};
use serde_json::{Value, json};

/// A WAV of `digit`'s tone, `ms` long, at 16 kHz (the flow converts it to the call's rate).
fn tone_wav(dir: &Path, name: &str, digit: char, ms: u32) {
    let digit = Digit::from_char(digit).expect("a key");
    let samples = dtmf::tone(digit, ms, 16000, 0.25);
    callgate_audio::wav::write_mono(&dir.join(name), 16000, &samples).expect("write wav");
}

/// A server running `flow` (the text) as its only route, with the data dir `dir`.
async fn server_with_flow(dir: &TempDir, flow: &str) -> TestServer {
    let file = dir.path().join("flow.toml");
    std::fs::write(&file, flow).expect("write flow");
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
    let data = dir.path().to_path_buf();
    spawn_server_with_catalog(&catalog, move |c| {
        c.data_dir = data;
        c.routes = vec![
            parse_spec(
                json!({"name": "ivr", "agent": "flow", "settings": {"file": file}}),
                0,
            )
            .expect("route"),
        ];
    })
    .await
}

/// What the phone heard until the server's hangup: the keys decoded from the audio, and the
/// text messages (DTMF events from the server).
struct Heard {
    keys: String,
    texts: Vec<Value>,
    samples: usize,
}

async fn listen_until_hangup(phone: &mut Phone) -> Heard {
    let mut samples = Vec::new();
    let mut texts = Vec::new();
    loop {
        match phone.recv().await {
            Received::Binary(b) => pcm::decode(AudioFormat::Pcm8000, &b, &mut samples),
            Received::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["event"] == "hangup" {
                    break;
                }
                texts.push(v);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut detector = dtmf::Detector::new(8000);
    let mut keys = Vec::new();
    detector.process(&samples, &mut keys);
    Heard {
        keys: keys.iter().map(|d| d.as_char()).collect(),
        texts,
        samples: samples.len(),
    }
}

/// The flow_step events of a call, as (name, phase, detail).
async fn flow_steps(server: &TestServer, id: &str) -> Vec<(String, String, Value)> {
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "agent" && e["detail"]["name"] == "flow_step")
        .map(|e| {
            let d = &e["detail"];
            (
                d["step"].as_str().unwrap_or("").to_owned(),
                d["phase"].as_str().unwrap_or("").to_owned(),
                d.clone(),
            )
        })
        .collect()
}

async fn transcript(server: &TestServer, id: &str) -> Vec<(String, String)> {
    let (_, t) = server.get(&format!("/api/calls/{id}/transcript")).await;
    t["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["speaker"].as_str().unwrap_or("").to_owned(),
                e["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

async fn dtmf(phone: &mut Phone, digit: &str) {
    phone
        .text(json!({"event": "dtmf", "digit": digit}).to_string())
        .await;
}

const MENU: &str = r#"
[[step]]
name = "greeting"
kind = "play"
file = "four.wav"

[[step]]
name = "menu"
kind = "gather"
play = "five.wav"
text = "Press 1 or 2."
retry_play = "six.wav"
retries = 1
first_digit_timeout = "300ms"
on = { "1" = "one", "2" = "two" }
no_input = "nobody"

[[step]]
name = "one"
kind = "play"
file = "seven.wav"
next = "bye"

[[step]]
name = "two"
kind = "play"
file = "eight.wav"
next = "bye"

[[step]]
name = "nobody"
kind = "play"
file = "nine.wav"

[[step]]
name = "bye"
kind = "hangup"
"#;

fn menu_prompts(dir: &TempDir, menu_ms: u32) {
    tone_wav(dir.path(), "four.wav", '4', 200);
    tone_wav(dir.path(), "five.wav", '5', menu_ms);
    tone_wav(dir.path(), "six.wav", '6', 200);
    tone_wav(dir.path(), "seven.wav", '7', 200);
    tone_wav(dir.path(), "eight.wav", '8', 200);
    tone_wav(dir.path(), "nine.wav", '9', 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_over_the_menu_cuts_it_and_a_key_chooses_the_branch() {
    let dir = TempDir::new("flow-menu");
    menu_prompts(&dir, 4000);
    let server = server_with_flow(&dir, MENU).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("menu-1")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    // Wait until the menu tone (5) is heard, then type over it.
    let mut samples = Vec::new();
    let mut detector = dtmf::Detector::new(8000);
    let mut keys = Vec::new();
    while !keys.contains(&Digit::D5) {
        if let Received::Binary(b) = phone.recv().await {
            let start = samples.len();
            pcm::decode(AudioFormat::Pcm8000, &b, &mut samples);
            detector.process(&samples[start..], &mut keys);
        }
    }
    dtmf(&mut phone, "2").await;
    let heard = listen_until_hangup(&mut phone).await;
    phone.text(cdr("menu-1")).await;
    phone.closed().await;
    // (A last frame or two of the menu may still arrive after the key: its tail may read as
    // a 5 to a fresh detector.)
    assert_eq!(
        heard.keys.trim_start_matches('5'),
        "8",
        "the branch of key 2 plays, the menu does not go on"
    );
    assert!(
        samples.len() + heard.samples < 8000 * 3,
        "the 4 s menu was cut short: {} samples in all",
        samples.len() + heard.samples
    );

    let record = server.ended_call("menu-1").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let menu_end = steps
        .iter()
        .find(|(n, p, _)| n == "menu" && p == "end")
        .expect("the menu's result");
    assert_eq!(menu_end.2["kind"], "gather");
    assert_eq!(menu_end.2["digits"], "2");
    assert_eq!(menu_end.2["next"], "two");
    let names: Vec<&str> = steps
        .iter()
        .filter(|(_, p, _)| p == "start")
        .map(|(n, _, _)| n.as_str())
        .collect();
    assert_eq!(names, ["greeting", "menu", "two", "bye"]);
    let turns = transcript(&server, id).await;
    assert!(
        turns.contains(&("caller".into(), "2".into())),
        "the digits are in the transcript: {turns:?}"
    );
    // A prompt with its words has them in the transcript; one without, its file's name.
    assert!(
        turns.contains(&("agent".into(), "Press 1 or 2.".into())),
        "{turns:?}"
    );
    assert!(
        turns.contains(&("agent".into(), "[four.wav]".into())),
        "{turns:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_input_retries_with_the_reprompt_then_takes_the_no_input_branch() {
    let dir = TempDir::new("flow-retry");
    menu_prompts(&dir, 200);
    let server = server_with_flow(&dir, MENU).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("retry-1")).await;
    let heard = listen_until_hangup(&mut phone).await;
    phone.text(cdr("retry-1")).await;
    phone.closed().await;
    assert_eq!(
        heard.keys, "4569",
        "greeting, menu, the re-prompt after no input, then the no-input branch"
    );
    let record = server.ended_call("retry-1").await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let retry = steps
        .iter()
        .find(|(n, p, _)| n == "menu" && p == "retry")
        .expect("a retry");
    assert_eq!(retry.2["outcome"], "no_input");
    let end = steps
        .iter()
        .find(|(n, p, _)| n == "menu" && p == "end")
        .expect("the menu's result");
    assert_eq!(end.2["outcome"], "no_input");
    assert_eq!(end.2["attempts"], 2);
    assert_eq!(end.2["next"], "nobody");

    // A wrong key is retried too; the right one on the retry is taken.
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("retry-2")).await;
    let mut samples = Vec::new();
    let mut detector = dtmf::Detector::new(8000);
    let mut keys = Vec::new();
    let mut pressed = Vec::new();
    let heard = loop {
        match phone.recv().await {
            Received::Binary(b) => {
                let start = samples.len();
                pcm::decode(AudioFormat::Pcm8000, &b, &mut samples);
                detector.process(&samples[start..], &mut keys);
                if keys.contains(&Digit::D5) && !pressed.contains(&"9") {
                    pressed.push("9");
                    dtmf(&mut phone, "9").await;
                }
                if keys.contains(&Digit::D6) && !pressed.contains(&"1") {
                    pressed.push("1");
                    dtmf(&mut phone, "1").await;
                }
            }
            Received::Text(t) if t.contains("hangup") => break keys,
            _ => {}
        }
    };
    phone.text(cdr("retry-2")).await;
    phone.closed().await;
    let heard: String = heard.iter().map(|d| d.as_char()).collect();
    assert!(heard.starts_with("456") && heard.ends_with('7'), "{heard}");
    let record = server.ended_call("retry-2").await;
    let steps = flow_steps(&server, record["id"].as_str().expect("id")).await;
    let retry = steps
        .iter()
        .find(|(n, p, _)| n == "menu" && p == "retry")
        .expect("a retry");
    assert_eq!(retry.2["outcome"], "no_match");
    assert_eq!(retry.2["digits"], "9");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_dtmf_is_a_dtmf_message_on_inbound_and_a_tone_on_callbridge() {
    let dir = TempDir::new("flow-dtmf");
    let flow =
        "[[step]]\nname = \"keys\"\nkind = \"send_dtmf\"\ndigits = \"3#\"\nduration = \"150ms\"\n";
    let server = server_with_flow(&dir, flow).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("dtmf-in")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let heard = listen_until_hangup(&mut phone).await;
    assert_eq!(
        heard.texts,
        [
            json!({"event": "dtmf", "digit": "3", "duration": 150}),
            json!({"event": "dtmf", "digit": "#", "duration": 150}),
        ]
    );
    phone.text(cdr("dtmf-in")).await;
    phone.closed().await;

    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("dtmf-cb")).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    let mut samples = Vec::new();
    let close = loop {
        match phone.recv().await {
            Received::Binary(b) => pcm::decode(AudioFormat::Pcm8000, &b, &mut samples),
            Received::Close(code, _) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(close, 1000);
    let mut detector = dtmf::Detector::new(8000);
    let mut keys = Vec::new();
    detector.process(&samples, &mut keys);
    assert_eq!(
        keys,
        [Digit::D3, Digit::Pound],
        "in-band, heard in full before the hangup"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_message_is_exactly_what_the_caller_sent_and_is_served() {
    let dir = TempDir::new("flow-record");
    let flow = r#"
        [[step]]
        name = "message"
        kind = "record"
        max_length = "30s"
        [[step]]
        name = "bye"
        kind = "hangup"
    "#;
    let server = server_with_flow(&dir, flow).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("rec-1")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let sent = speechlike_pcm16(1500, 8000, 7);
    for frame in sent.chunks(320) {
        phone.binary(frame.to_vec()).await;
    }
    dtmf(&mut phone, "#").await;
    assert_eq!(phone.recv_json().await, json!({"event": "hangup"}));
    phone.text(cdr("rec-1")).await;
    phone.closed().await;

    let record = server.ended_call("rec-1").await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let end = steps
        .iter()
        .find(|(n, p, _)| n == "message" && p == "end")
        .expect("the recording's result");
    let path = format!("messages/{id}/message.wav");
    assert_eq!((&end.2["path"], &end.2["ms"]), (&json!(path), &json!(1500)));
    let audio = callgate_audio::wav::read_mono(&dir.path().join(&path)).expect("the WAV");
    assert_eq!(audio.rate, 8000);
    let mut expected = Vec::new();
    pcm::le_bytes_to_samples(&sent, &mut expected);
    assert_eq!(
        audio.samples, expected,
        "sample for sample what the caller sent"
    );
    let turns = transcript(&server, id).await;
    assert!(
        turns
            .iter()
            .any(|(s, t)| s == "caller" && t.contains("message.wav")),
        "{turns:?}"
    );
    // The admin API serves it.
    let url = format!(
        "http://{}/api/calls/{id}/messages/message.wav",
        server.admin_addr
    );
    let served = reqwest::get(&url).await.expect("GET");
    assert_eq!(served.status(), 200);
    let bytes = served.bytes().await.expect("body");
    assert_eq!(
        bytes.as_ref(),
        std::fs::read(dir.path().join(&path)).unwrap()
    );
    let (status, body) = server
        .get(&format!("/api/calls/{id}/messages/..%2Fx.wav"))
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("no_message")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_kept_when_the_caller_hangs_up() {
    let dir = TempDir::new("flow-record-hangup");
    let flow = "[[step]]\nname = \"vm\"\nkind = \"record\"\nsilence = \"5s\"\n";
    let server = server_with_flow(&dir, flow).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("rec-2")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let sent = speechlike_pcm16(600, 8000, 9);
    for frame in sent.chunks(320) {
        phone.binary(frame.to_vec()).await;
    }
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("rec-2")).await;
    phone.closed().await;
    let record = server.ended_call("rec-2").await;
    let id = record["id"].as_str().expect("id");
    let end = server
        .until_stored("the recording's result", async || {
            let steps = flow_steps(&server, id).await;
            steps.into_iter().find(|(n, p, _)| n == "vm" && p == "end")
        })
        .await;
    assert_eq!(end.2["ms"], 600);
    server.shutdown().await;
}

/// A webhook server: `/ok` answers variables and a step, `/fail` 500, `/slow` never in time,
/// `/bad` something that is not JSON. It keeps the bodies it was sent.
async fn webhooks() -> (
    String,
    Arc<Mutex<Vec<Value>>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = |seen: Arc<Mutex<Vec<Value>>>| {
        move |axum::Json(body): axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                seen.lock().expect("lock").push(body);
            }
        }
    };
    let app = Router::new()
        .route(
            "/ok/{caller}",
            post({
                let k = keep(seen.clone());
                move |body| async move {
                    k(body).await;
                    axum::Json(json!({"variables": {"name": "Kim", "balance": 42}, "next": "good"}))
                }
            }),
        )
        .route(
            "/fail",
            post({
                let k = keep(seen.clone());
                move |body| async move {
                    k(body).await;
                    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom")
                }
            }),
        )
        .route(
            "/slow",
            post({
                let k = keep(seen.clone());
                move |body| async move {
                    k(body).await;
                    std::future::pending::<()>().await;
                }
            }),
        )
        .route(
            "/bad",
            post({
                let k = keep(seen.clone());
                move |body| async move {
                    k(body).await;
                    "<html>not json</html>"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("local server");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    callgate_server::Tasks::new().spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    (format!("http://{addr}"), seen, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_success_failure_timeout_and_nonsense_each_take_their_branch() {
    let (base, seen, stop) = webhooks().await;
    let dir = TempDir::new("flow-http");
    let flow = format!(
        r#"
        [[step]]
        name = "answer"
        kind = "answer"
        [[step]]
        name = "lookup"
        kind = "http"
        url = "{base}/ok/{{{{caller}}}}"
        on_error = "broken"
        [[step]]
        name = "broken"
        kind = "hangup"
        [[step]]
        name = "good"
        kind = "set"
        vars = {{ greeting = "Hello {{{{name}}}}, {{{{balance}}}}" }}
        next = "jump"
        [[step]]
        name = "fail"
        kind = "http"
        url = "{base}/fail"
        on_error = "slow"
        next = "broken"
        [[step]]
        name = "slow"
        kind = "http"
        url = "{base}/slow"
        timeout = "300ms"
        on_error = "bad"
        next = "broken"
        [[step]]
        name = "bad"
        kind = "http"
        url = "{base}/bad"
        on_error = "done"
        next = "broken"
        [[step]]
        name = "done"
        kind = "hangup"
        [[step]]
        name = "jump"
        kind = "goto"
        next = "fail"
        "#
    );
    let server = server_with_flow(&dir, &flow).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("http-1")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    assert_eq!(phone.recv_json().await, json!({"event": "hangup"}));
    phone.text(cdr("http-1")).await;
    phone.closed().await;
    let record = server.ended_call("http-1").await;
    let id = record["id"].as_str().expect("id");
    let steps = flow_steps(&server, id).await;
    let end = |name: &str| {
        steps
            .iter()
            .find(|(n, p, _)| n == name && p == "end")
            .map(|(_, _, d)| d.clone())
            .unwrap_or_else(|| panic!("no end of {name}: {steps:?}"))
    };
    assert_eq!(end("lookup")["next"], "good", "the answer chose the step");
    assert_eq!(end("lookup")["status"], 200);
    assert_eq!(
        end("good")["vars"]["greeting"],
        "Hello Kim, 42",
        "the answer's variables are in templates"
    );
    assert_eq!(end("jump")["next"], "fail", "goto");
    assert_eq!(end("fail")["next"], "slow");
    assert_eq!(end("fail")["status"], 500);
    assert_eq!(end("slow")["next"], "bad");
    assert!(
        end("slow")["error"]
            .as_str()
            .unwrap_or("")
            .contains("no answer within"),
        "{:?}",
        end("slow")
    );
    assert_eq!(end("bad")["next"], "done");
    assert!(
        end("bad")["error"]
            .as_str()
            .unwrap_or("")
            .contains("not JSON")
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 4, "each webhook was called once");
    assert_eq!(seen[0]["step"], "lookup");
    assert_eq!(seen[0]["call"]["callerId"], "01099998888");
    assert_eq!(
        seen[1]["variables"]["name"], "Kim",
        "later webhooks see the variables"
    );
    let _ = stop.send(());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_menu_answers_and_reads_the_callers_number() {
    let dir = TempDir::new("flow-demo");
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
    let server = spawn_server_with_catalog(&catalog, |c| {
        c.routes = vec![
            parse_spec(
                json!({"name": "demo", "agent": "flow", "settings": {"demo": "menu"}}),
                0,
            )
            .expect("route"),
        ];
    })
    .await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("demo-1")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    // Once the greeting has been heard, the menu plays: type 3 over it.
    let welcome = callgate_flow::demo::file("prompts/en/welcome.wav").expect("built in");
    let welcome = hound::WavReader::new(std::io::Cursor::new(welcome))
        .expect("wav")
        .duration() as usize;
    let mut got = 0;
    while got <= welcome * 2 {
        if let Received::Binary(b) = phone.recv().await {
            got += b.len();
        }
    }
    dtmf(&mut phone, "3").await;
    let heard = listen_until_hangup(&mut phone).await;
    phone.text(cdr("demo-1")).await;
    phone.closed().await;
    assert!(
        heard.samples > 8000,
        "the number and the goodbye were played"
    );
    let record = server.ended_call("demo-1").await;
    let id = record["id"].as_str().expect("id");
    let names: Vec<String> = flow_steps(&server, id)
        .await
        .into_iter()
        .filter(|(_, p, _)| p == "start")
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "welcome",
            "menu",
            "number",
            "number-digits",
            "goodbye",
            "hangup"
        ]
    );
    let turns = transcript(&server, id).await;
    assert!(
        turns.contains(&("agent".into(), "01099998888".into())),
        "the number read out: {turns:?}"
    );
    // The shipped prompts carry their words.
    for words in [
        "Welcome to callgate.",
        "You are calling from",
        "Thank you for calling. Goodbye.",
    ] {
        assert!(
            turns.contains(&("agent".into(), words.into())),
            "{words:?} in {turns:?}"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_terminate_asks_callbridges_open_api_to_end_the_call() {
    // The key's variable: one cargo sets for every test process (tests cannot set one).
    let key = std::env::var("CARGO_PKG_NAME").expect("cargo sets it");
    let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let app = Router::new().route(
        "/api/calls/agent-terminate",
        post({
            let seen = seen.clone();
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    seen.lock().expect("lock").push((auth, body));
                    axum::Json(json!({"result": "ok"}))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("local server");
    let addr = listener.local_addr().expect("address");
    callgate_server::Tasks::new().spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = TempDir::new("flow-terminate");
    let file = dir.path().join("flow.toml");
    std::fs::write(
        &file,
        "[[step]]\nname = \"bye\"\nkind = \"agent_terminate\"\nment = \"Goodbye\"\n",
    )
    .expect("write flow");
    let mut catalog = Catalog::builtin();
    callgate_flow::register(
        &mut catalog,
        FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: Some(callgate_flow::CallBridgeApi {
                base_url: format!("http://{addr}/api"),
                api_key_env: "CARGO_PKG_NAME".into(),
            }),
            stt: None,
        },
    );
    let server = spawn_server_with_catalog(&catalog, |c| {
        // The live call's events reach the store within 100 ms (the test waits for one).
        c.progress_interval = Duration::from_millis(100);
        c.routes = vec![
            parse_spec(
                json!({"name": "cb", "agent": "flow", "settings": {"file": file}}),
                0,
            )
            .expect("route"),
        ];
    })
    .await;
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("term-1")).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    // CallBridge answers, then drops the line: close once the step has its answer, which
    // it has only after the request arrived (closing as soon as the request arrived raced
    // the answer).
    let id = server.call("term-1").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    server
        .until_stored("the step's answer", async || {
            let steps = flow_steps(&server, &id).await;
            steps
                .iter()
                .any(|(n, p, _)| n == "bye" && p == "end")
                .then_some(())
        })
        .await;
    phone.close(1000, "terminated").await;
    let (auth, body) = seen
        .lock()
        .expect("lock")
        .first()
        .cloned()
        .expect("agent-terminate was called");
    assert_eq!(auth, format!("Bearer {key}"));
    assert_eq!(
        body,
        json!({"ivrIp": "192.168.150.103:29034", "id": "agent-main", "cdrId": "term-1",
            "callerNo": "01012341234", "calleeNo": "07012345678",
            "actionId": "1.758187055878E9", "ment": "Goodbye"})
    );
    let record = server.ended_call("term-1").await;
    assert_eq!(record["end_reason"], "peer_closed");
    let steps = flow_steps(&server, record["id"].as_str().expect("id")).await;
    let end = steps
        .iter()
        .find(|(n, p, _)| n == "bye" && p == "end")
        .expect("the step's result");
    assert_eq!(end.2["status"], 200);
    server.shutdown().await;
}
