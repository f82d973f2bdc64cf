//! The `bridge` agent over real sockets: a phone (the testkit's raw WebSocket, speaking Twilio
//! Media Streams or CallBridge) calls a server whose route bridges the call to the testkit's
//! Twilio bot double on 127.0.0.1, scripted per test. The record is read back through the
//! admin API.
//!
//! Secrets come from `PATH` (`twilio_auth_token_env = "PATH"`): tests cannot set variables
//! (process-global), and PATH is always set.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use callgate_agent::Catalog;
use callgate_bridge::metrics::{By, Direction, Reason};
use callgate_bridge::{BridgeCollector, BridgeMetrics};
use callgate_kit::AgentEnv;
use callgate_server::routes::parse_spec;
use callgate_testkit::twilio_bot::{Bot, BotConfig};
use callgate_testkit::{
    Phone, Received, TempDir, TestServer, spawn_server_in, spawn_server_with_catalog,
};
use serde_json::{Value, json};

fn path_var() -> String {
    std::env::var("PATH").expect("PATH is set")
}

/// A server whose only route runs `bridge` with `settings` (fallback: hang up, unless set).
async fn server(settings: Value) -> TestServer {
    server_with(settings, |_| {}).await
}

/// [`server`] with the server's configuration changed by `tweak`.
async fn server_with(
    settings: Value,
    tweak: impl FnOnce(&mut callgate_server::Config),
) -> TestServer {
    server_counting(settings, BridgeMetrics::new(), tweak).await
}

/// [`server_with`], the agent counting into `metrics` (exposed on the server's `/metrics`).
async fn server_counting(
    settings: Value,
    metrics: Arc<BridgeMetrics>,
    tweak: impl FnOnce(&mut callgate_server::Config),
) -> TestServer {
    let mut all = json!({"fallback": "hangup"});
    for (k, v) in settings.as_object().expect("an object") {
        all[k] = v.clone();
    }
    let dir = TempDir::new("bridge-env");
    let mut catalog = Catalog::builtin();
    callgate_bridge::register_with(
        &mut catalog,
        AgentEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
            stt: None,
        },
        metrics.clone(),
    );
    let route = parse_spec(
        json!({"name": "bot", "agent": "bridge", "settings": all}),
        0,
    )
    .expect("route");
    spawn_server_with_catalog(&catalog, move |c| {
        c.routes = vec![route];
        c.metrics.push(Arc::new(BridgeCollector(metrics)));
        tweak(c);
    })
    .await
}

/// Places a Twilio call (`connected`, `start`); callgate answers nothing.
async fn twilio_call(server: &TestServer, call_sid: &str) -> Phone {
    let mut phone = server.phone("/twilio").await;
    phone.text(callgate_proto::twilio::connected_json()).await;
    let start = json!({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZphone",
        "start": {"streamSid": "MZphone", "accountSid": "ACphone", "callSid": call_sid,
                  "tracks": ["inbound"],
                  "customParameters": {"from": "+15550100", "to": "+15550199", "campaign": "x"},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
    });
    phone.text(start.to_string()).await;
    phone
}

async fn phone_media(phone: &mut Phone, audio: &[u8]) {
    let m = json!({"event": "media", "streamSid": "MZphone",
                   "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                             "payload": BASE64.encode(audio)}});
    phone.text(m.to_string()).await;
}

async fn phone_mark(phone: &mut Phone, name: &str) {
    let m = json!({"event": "mark", "streamSid": "MZphone", "mark": {"name": name}});
    phone.text(m.to_string()).await;
}

/// What a Twilio phone hears: media payloads, callgate's marks (returned at once when
/// `confirm`), clears; until `until` says stop or the connection closes.
struct Heard {
    audio: Vec<u8>,
    marks: Vec<String>,
    clears: usize,
    close: Option<u16>,
}

async fn listen(phone: &mut Phone, confirm: bool, until: impl Fn(&Heard) -> bool) -> Heard {
    let mut heard = Heard {
        audio: Vec::new(),
        marks: Vec::new(),
        clears: 0,
        close: None,
    };
    while !until(&heard) {
        match phone.recv().await {
            Received::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                match v["event"].as_str() {
                    Some("media") => heard.audio.extend(
                        BASE64
                            .decode(v["media"]["payload"].as_str().expect("payload"))
                            .expect("base64"),
                    ),
                    Some("mark") => {
                        let name = v["mark"]["name"].as_str().expect("name").to_owned();
                        if confirm {
                            phone_mark(phone, &name).await;
                        }
                        heard.marks.push(name);
                    }
                    Some("clear") => heard.clears += 1,
                    other => panic!("callgate sent {other:?} to Twilio"),
                }
            }
            Received::Close(code, _) => {
                heard.close = Some(code);
                break;
            }
            Received::Eof => break,
            Received::Binary(_) => panic!("a binary frame to Twilio"),
        }
    }
    heard
}

/// The bridge's record events of a call, in order.
async fn bridge_events(server: &TestServer, id: &str) -> Vec<Value> {
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "agent" && e["detail"]["name"] == "bridge")
        .map(|e| e["detail"]["detail"].clone())
        .collect()
}

/// 20 ms frames, each filled with its own byte (never 0xFF, μ-law silence).
fn frames(n: usize, first: u8) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| vec![first.wrapping_add(i as u8) % 0xF0; 160])
        .collect()
}

#[tokio::test]
async fn round_trip_echo_is_byte_exact_with_twilios_messages_dtmf_and_stop() {
    let mut bot = Bot::start(BotConfig {
        echo: true,
        ..Default::default()
    })
    .await;
    let server = server(json!({"url": bot.url("/twilio")})).await;
    let mut phone = twilio_call(&server, "CA-echo").await;
    let mut conn = bot.accept().await;
    let connected = conn.recv().await.expect("connected");
    assert_eq!(
        connected,
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    );
    let start = conn.recv().await.expect("start");
    let record = server.call("CA-echo").await;
    assert_eq!(start["event"], "start");
    assert_eq!(start["sequenceNumber"], "1");
    let sid = start["streamSid"].as_str().expect("streamSid");
    assert!(sid.starts_with("MZ") && sid.len() == 34, "{sid}");
    assert_eq!(start["start"]["streamSid"], sid);
    assert_eq!(start["start"]["callSid"], record["id"]);
    assert_eq!(
        start["start"]["accountSid"],
        "AC00000000000000000000000000000000"
    );
    assert_eq!(start["start"]["tracks"], json!(["inbound"]));
    assert_eq!(
        start["start"]["mediaFormat"],
        json!({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1})
    );
    let params = &start["start"]["customParameters"];
    assert_eq!(
        params["campaign"], "x",
        "a Twilio call's own parameters: {params}"
    );
    assert_eq!(params["from_number"], "+15550100");
    assert_eq!(params["to_number"], "+15550199");
    assert_eq!(params["callgate_call_id"], record["id"]);
    assert_eq!(params["callgate_route"], "bot");
    assert_eq!(params["callgate_protocol"], "twilio");

    let sent = frames(50, 1);
    for f in &sent {
        phone_media(&mut phone, f).await;
    }
    phone
        .text(
            json!({"event": "dtmf", "streamSid": "MZphone",
                   "dtmf": {"track": "inbound_track", "digit": "7"}})
            .to_string(),
        )
        .await;
    let expected: Vec<u8> = sent.concat();
    let heard = listen(&mut phone, true, |h| h.audio.len() >= expected.len()).await;
    assert_eq!(heard.audio, expected, "byte-exact echo, in order");

    // What the bot got: 50 media (chunk 1..50), then the key, every message numbered.
    let mut media = Vec::new();
    let mut sequence = 1;
    let dtmf = loop {
        let m = conn.recv().await.expect("a message");
        sequence += 1;
        assert_eq!(m["sequenceNumber"], sequence.to_string(), "{m}");
        assert_eq!(m["streamSid"], sid);
        match m["event"].as_str() {
            Some("media") => media.push(m),
            Some("dtmf") => break m,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        dtmf["dtmf"],
        json!({"track": "inbound_track", "digit": "7"})
    );
    assert_eq!(media.len(), 50);
    for (i, m) in media.iter().enumerate() {
        assert_eq!(m["media"]["chunk"], (i + 1).to_string());
        assert_eq!(m["media"]["track"], "inbound");
        assert!(m["media"]["timestamp"].is_string());
    }
    let stamps: Vec<u64> = media
        .iter()
        .map(|m| m["media"]["timestamp"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[1] >= w[0] + 20), "{stamps:?}");

    // The caller hangs up: the bot gets `stop` with the same ids, then the close.
    phone
        .text(
            json!({"event": "stop", "streamSid": "MZphone", "sequenceNumber": "99",
                     "stop": {"accountSid": "ACphone", "callSid": "CA-echo"}})
            .to_string(),
        )
        .await;
    let stop = conn.expect("stop").await;
    assert_eq!(stop["stop"]["callSid"], record["id"]);
    assert_eq!(
        stop["stop"]["accountSid"],
        "AC00000000000000000000000000000000"
    );
    assert!(conn.recv().await.is_none(), "the socket closes after stop");
    let ended = server.ended_call("CA-echo").await;
    assert_eq!(ended["end_reason"], "peer_hangup");
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    assert_eq!(events[0]["what"], "connected");
    assert!(events[0]["latency_ms"].is_u64());
    let last = events.last().expect("events");
    assert_eq!(last["what"], "disconnect");
    assert_eq!(last["by"], "callgate");
}

#[tokio::test]
async fn marks_come_back_only_once_the_caller_heard_the_audio_before_them() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server(json!({"url": bot.url("/")})).await;
    let mut phone = twilio_call(&server, "CA-marks").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    let speech: Vec<u8> = frames(25, 10).concat();
    conn.media(&speech).await;
    conn.mark("m1").await;
    // The phone gets all of it and callgate's own mark after it, but does not confirm it
    // (Twilio has not played it yet).
    let heard = listen(&mut phone, false, |h| {
        h.audio.len() >= speech.len() && !h.marks.is_empty()
    })
    .await;
    assert_eq!(heard.audio, speech);
    while let Some(m) = conn.try_recv() {
        assert_ne!(
            m["event"], "mark",
            "a mark before the caller heard its audio: {m}"
        );
    }
    // Twilio confirms: only now does the bot's mark come back.
    for name in &heard.marks {
        phone_mark(&mut phone, name).await;
    }
    let echoed = conn.expect("mark").await;
    assert_eq!(echoed["mark"]["name"], "m1");
    assert_eq!(echoed["streamSid"], conn.stream_sid());
    // With nothing queued, a mark comes back at once; two come back in order.
    conn.mark("m2").await;
    conn.mark("m3").await;
    assert_eq!(conn.expect("mark").await["mark"]["name"], "m2");
    assert_eq!(conn.expect("mark").await["mark"]["name"], "m3");
    phone.close(1000, "bye").await;
    let record = server.ended_call("CA-marks").await;
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    let marks: Vec<&Value> = events.iter().filter(|e| e["what"] == "mark").collect();
    assert_eq!(marks.len(), 3);
    assert_eq!(marks[0]["name"], "m1");
    assert_eq!(marks[0]["state"], "played");
    assert_eq!(
        marks[0]["played_ms"], 500,
        "the played position: {events:?}"
    );
}

#[tokio::test]
async fn a_clear_drops_what_the_caller_has_not_heard_and_returns_the_pending_marks() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server(json!({"url": bot.url("/")})).await;
    let mut phone = twilio_call(&server, "CA-clear").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    let old = vec![0x11u8; 5 * 8000];
    conn.media(&old).await;
    conn.mark("long").await;
    let first = listen(&mut phone, true, |h| h.audio.len() >= 10 * 160).await;
    conn.clear().await;
    // The pending mark comes back at once, long before its 5 s of audio could have played.
    assert_eq!(conn.expect("mark").await["mark"]["name"], "long");
    let new = vec![0x22u8; 5 * 160];
    conn.media(&new).await;
    conn.mark("after").await;
    let rest = listen(&mut phone, true, |h| {
        h.clears > 0 && h.audio.ends_with(&new)
    })
    .await;
    let heard_old = first.audio.len() + rest.audio.iter().filter(|&&b| b == 0x11).count();
    assert!(
        heard_old < old.len() / 2,
        "only {heard_old} of {} played",
        old.len()
    );
    // Nothing of the old audio after callgate's clear: the playout dropped it at once.
    let cleared_at = rest
        .audio
        .iter()
        .position(|&b| b == 0x22)
        .expect("new audio");
    assert!(
        rest.audio[cleared_at..].iter().all(|&b| b == 0x22),
        "old audio after the clear"
    );
    // Twilio confirms callgate's mark after the new audio: the bot's mark follows.
    listen(&mut phone, true, |h| !h.marks.is_empty()).await;
    assert_eq!(conn.expect("mark").await["mark"]["name"], "after");
    phone.close(1000, "bye").await;
    let record = server.ended_call("CA-clear").await;
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    let clear = events
        .iter()
        .find(|e| e["what"] == "clear")
        .expect("a clear event");
    assert_eq!(clear["by"], "bot");
    // Twilio confirms what played every second: 200 ms in, none of it was confirmed, so all
    // the audio sent counts as dropped (docs/protocols/twilio.md).
    assert!(clear["played_ms"].is_u64(), "{clear}");
    assert!(clear["dropped_ms"].as_u64().unwrap() >= 1000, "{clear}");
}

#[tokio::test]
async fn a_bot_that_closes_ends_the_call_after_its_goodbye() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server(json!({"url": bot.url("/")})).await;
    let mut phone = twilio_call(&server, "CA-bye").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    let goodbye = vec![0x33u8; 25 * 160];
    conn.media(&goodbye).await;
    conn.close(1000, "done").await;
    let heard = listen(&mut phone, true, |_| false).await;
    assert_eq!(heard.audio, goodbye, "the whole goodbye, then the hang-up");
    assert_eq!(heard.close, Some(1000));
    let record = server.ended_call("CA-bye").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    let bye = events
        .iter()
        .find(|e| e["what"] == "disconnect")
        .expect("disconnect");
    assert_eq!(bye["by"], "bot");
    assert_eq!(bye["code"], 1000);
    assert_eq!(bye["reason"], "done");
    assert!(
        !events.iter().any(|e| e["what"] == "fallback"),
        "{events:?}"
    );
}

/// `text` spoken by espeak-ng, 8 kHz.
fn speech(dir: &TempDir, text: &str) -> Vec<i16> {
    let path = dir.path().join("speech.wav");
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng runs (scripts/test installs it)");
    assert!(status.success());
    let audio = callgate_audio::wav::read_mono(&path).expect("wav");
    let mut out = Vec::new();
    let mut r = callgate_audio::Resampler::new(audio.rate, 8000).expect("resampler");
    r.process(&audio.samples, &mut out);
    r.flush(&mut out);
    out
}

/// A one-second WAV of a constant, for the fallback.
fn fallback_wav(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path().join("sorry.wav");
    callgate_audio::wav::write_mono(&path, 8000, &vec![3000i16; 8000]).expect("wav");
    path
}

#[tokio::test]
async fn a_bot_that_drops_mid_call_gets_the_fallback_and_the_record_says_why() {
    let dir = TempDir::new("bridge-fallback");
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server(json!({
        "url": bot.url("/"), "fallback": "wav", "fallback_wav": fallback_wav(&dir),
    }))
    .await;
    let mut phone = twilio_call(&server, "CA-drop").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    conn.media(&[0x44u8; 160]).await;
    conn.drop_connection().await;
    let heard = listen(&mut phone, true, |_| false).await;
    let ulaw = callgate_audio::g711::ulaw_encode(3000);
    assert_eq!(&heard.audio[..160], &[0x44u8; 160], "the bot's audio first");
    assert_eq!(heard.audio.len(), 160 + 8000, "then the 1 s fallback");
    assert!(heard.audio[160..].iter().all(|&b| b == ulaw));
    assert_eq!(heard.close, Some(1000));
    let record = server.ended_call("CA-drop").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    let fallback = events
        .iter()
        .find(|e| e["what"] == "fallback")
        .expect("fallback");
    assert!(
        fallback["reason"]
            .as_str()
            .unwrap()
            .starts_with("bot dropped"),
        "{fallback}"
    );
    let gone = events.iter().find(|e| e["what"] == "disconnect").unwrap();
    assert_eq!(gone["close_frame"], false);
}

#[tokio::test]
async fn an_unreachable_bot_gets_the_fallback() {
    let dir = TempDir::new("bridge-unreachable");
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics = BridgeMetrics::new();
    let settings = json!({
        "url": format!("ws://127.0.0.1:{port}/"), "fallback": "wav",
        "fallback_wav": fallback_wav(&dir),
    });
    let server = server_counting(settings, metrics.clone(), |_| {}).await;
    let mut phone = twilio_call(&server, "CA-down").await;
    let heard = listen(&mut phone, true, |_| false).await;
    assert_eq!(heard.audio.len(), 8000, "the fallback, then the hang-up");
    assert_eq!(heard.close, Some(1000));
    let record = server.ended_call("CA-down").await;
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    assert_eq!(events[0]["what"], "unreachable");
    assert!(
        events[0]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{events:?}"
    );
    assert_eq!(events[1]["what"], "fallback");
    // Counted as the call ended (its figures are merged before the agent returns, and the
    // call's end waits for the agent).
    server.shutdown().await;
    let refused = Reason { reason: "connect" };
    assert_eq!(metrics.connect_failures.get_or_create(&refused).get(), 1);
    assert_eq!(metrics.fallbacks.get(), 1);
    assert_eq!(metrics.connects.get(), 0);
}

/// The length of `message` as callgate wrote it: compact JSON (the key order does not change
/// the length).
fn wire_len(message: &Value) -> u64 {
    message.to_string().len() as u64
}

#[tokio::test]
async fn the_last_seconds_usage_and_the_metrics_count_every_byte_each_way() {
    let mut bot = Bot::start(BotConfig {
        echo: true,
        ..Default::default()
    })
    .await;
    let metrics = BridgeMetrics::new();
    let server = server_counting(json!({"url": bot.url("/")}), metrics.clone(), |_| {}).await;
    let mut phone = twilio_call(&server, "CA-usage").await;
    let mut conn = bot.accept().await;
    let mut to_bot = 0;
    let mut from_bot = 0;
    for _ in 0..2 {
        to_bot += wire_len(&conn.recv().await.expect("connected, start"));
    }
    // A short call: it ends well within the first second of usage reports, so without the
    // last report after the end the record would have no usage at all.
    let sent = frames(5, 1);
    for f in &sent {
        phone_media(&mut phone, f).await;
    }
    let heard = listen(&mut phone, true, |h| h.audio.len() >= 5 * 160).await;
    assert_eq!(heard.audio, sent.concat());
    phone
        .text(
            json!({"event": "stop", "streamSid": "MZphone", "sequenceNumber": "9",
                     "stop": {"accountSid": "ACphone", "callSid": "CA-usage"}})
            .to_string(),
        )
        .await;
    while let Some(m) = conn.recv().await {
        to_bot += wire_len(&m);
        if m["event"] == "media" {
            // The echo bot's answer: the same payload under its stream's id.
            let reply = json!({"event": "media", "streamSid": conn.stream_sid(),
                               "media": {"payload": m["media"]["payload"]}});
            from_bot += wire_len(&reply);
        }
    }
    let id = server.ended_call("CA-usage").await["id"].clone();
    // Everything the call task writes is committed once the server has stopped; a second
    // server on the same data reads it back.
    let mut server = server;
    server.begin_shutdown();
    let dir = server.stopped().await;
    let metrics_after = metrics.clone();
    let again = spawn_server_in(dir, move |c| {
        c.metrics.push(Arc::new(BridgeCollector(metrics_after)));
    })
    .await;
    let (_, record) = again
        .get(&format!("/api/calls/{}", id.as_str().unwrap()))
        .await;
    assert_eq!(
        record["usage"]["bridge_bytes_to_bot"],
        json!(to_bot as f64),
        "connected, start, 5 media and stop: {record}"
    );
    assert_eq!(
        record["usage"]["bridge_bytes_from_bot"],
        json!(from_bot as f64)
    );
    // The same figures in the metrics, with the connection's life.
    let to = Direction {
        direction: "to_bot",
    };
    let from = Direction {
        direction: "from_bot",
    };
    assert_eq!(metrics.bytes.get_or_create(&to).get(), to_bot);
    assert_eq!(metrics.bytes.get_or_create(&from).get(), from_bot);
    assert_eq!(metrics.connects.get(), 1);
    let by_callgate = By { by: "callgate" };
    assert_eq!(metrics.disconnects.get_or_create(&by_callgate).get(), 1);
    let text = again.metrics_text().await;
    for line in [
        format!("callgate_bridge_bytes_total{{direction=\"to_bot\"}} {to_bot}"),
        "callgate_bridge_connects_total 1".to_owned(),
        "callgate_bridge_connect_latency_seconds_count 1".to_owned(),
        "callgate_bridge_disconnects_total{by=\"callgate\"} 1".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
}

#[tokio::test]
async fn the_upgrade_is_signed_as_twilio_signs_it_and_a_bot_that_checks_can_refuse() {
    let mut bot = Bot::start(BotConfig {
        auth_token: Some(path_var()),
        ..Default::default()
    })
    .await;
    let url = bot.url("/twilio?tenant=a");
    let server = server(json!({
        "url": url, "twilio_auth_token_env": "PATH",
        "headers": {"X-Static": "one"}, "headers_env": {"X-From-Env": "PATH"},
    }))
    .await;
    let mut phone = twilio_call(&server, "CA-signed").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    assert_eq!(conn.path, "/twilio?tenant=a");
    assert_eq!(conn.header("x-static"), Some("one"));
    assert_eq!(conn.header("x-from-env"), Some(path_var().as_str()));
    assert_eq!(
        conn.header("x-twilio-signature"),
        Some(callgate_testkit::twilio_bot::signature(&path_var(), &url).as_str())
    );
    phone.close(1000, "bye").await;
    server.ended_call("CA-signed").await;
    assert_eq!(bot.refused(), 0);

    // Signed with another token: the bot refuses the upgrade; the caller gets the fallback.
    let other = server_with_token(&bot, "HOME").await;
    let mut phone = twilio_call(&other, "CA-bad-sig").await;
    let heard = listen(&mut phone, true, |_| false).await;
    assert_eq!(heard.close, Some(1000));
    let record = other.ended_call("CA-bad-sig").await;
    let events = bridge_events(&other, record["id"].as_str().unwrap()).await;
    assert!(
        events[0]["reason"].as_str().unwrap().contains("HTTP 403"),
        "{events:?}"
    );
    assert_eq!(bot.refused(), 1);
}

async fn server_with_token(bot: &Bot, var: &str) -> TestServer {
    server(json!({"url": bot.url("/twilio"), "twilio_auth_token_env": var})).await
}

#[tokio::test]
async fn a_callbridge_call_in_pcm_16k_reaches_the_bot_as_ulaw_8k_and_back() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server(json!({"url": bot.url("/")})).await;
    let mut phone = server.phone("/").await;
    let start = json!({
        "call_config": {"siteId": "site-1", "caller": "0101", "callee": "0702",
                        "cdrId": "cdr-pcm", "callActionId": "1.0", "ivrIp": "10.0.0.1:1",
                        "agentId": "agent-main", "agentType": "voice"},
        "audio_format": {"phone_output_audio_format": "PCM_16000",
                         "phone_input_audio_format": "PCM_16000"}
    });
    phone.text(start.to_string()).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    let mut conn = bot.accept().await;
    let start = conn.expect("start").await;
    let params = &start["start"]["customParameters"];
    assert_eq!(params["cdrId"], "cdr-pcm");
    assert_eq!(params["siteId"], "site-1");
    assert_eq!(params["from_number"], "0101");
    assert_eq!(params["to_number"], "0702");
    assert_eq!(params["callgate_protocol"], "callbridge");
    // 200 ms of a 16 kHz tone in 20 ms frames of 640 bytes (the resampler holds a few
    // samples back: the first 100 ms are checked).
    let samples: Vec<i16> = (0..3200)
        .map(|i| ((i as f64 * 0.2).sin() * 8000.0) as i16)
        .collect();
    for frame in samples.chunks(320) {
        let bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
        phone.binary(bytes).await;
    }
    for _ in 0..5 {
        let m = conn.expect("media").await;
        let payload = BASE64
            .decode(m["media"]["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload.len(), 160, "20 ms of μ-law 8 kHz");
    }
    // The bot's μ-law comes out as 16 kHz PCM (the resampler holds a few samples back until
    // more audio comes: 200 ms sent, the first 100 ms = 3200 bytes checked).
    conn.media(&vec![callgate_audio::g711::ulaw_encode(4000); 1600])
        .await;
    let mut heard = Vec::new();
    while heard.len() < 3200 {
        match phone.recv().await {
            Received::Binary(b) => heard.extend_from_slice(&b),
            Received::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(
        heard.len() >= 3200 && heard.len() % 640 == 0,
        "{}",
        heard.len()
    );
    let mid = i16::from_le_bytes([heard[1600], heard[1601]]);
    assert!((3500..4500).contains(&mid), "{mid}");
    phone.close(1000, "bye").await;
}

#[tokio::test]
async fn invalid_bot_messages_are_counted_and_the_call_goes_on() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server(json!({"url": bot.url("/")})).await;
    let mut phone = twilio_call(&server, "CA-bad").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    conn.send_text("not json").await;
    conn.send_text(r#"{"event":"dance"}"#).await;
    conn.send_text(r#"{"event":"media","media":{"payload":"***"}}"#)
        .await;
    conn.mark("still-here").await;
    assert_eq!(conn.expect("mark").await["mark"]["name"], "still-here");
    phone.close(1000, "bye").await;
    let record = server.ended_call("CA-bad").await;
    assert_eq!(record["end_reason"], "peer_closed");
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["what"] == "invalid")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["not_json", "unknown_event", "bad_media"]);
}

#[tokio::test]
async fn callgates_barge_in_clears_and_echoes_the_marks_and_in_band_keys_reach_the_bot() {
    let mut bot = Bot::start(BotConfig::default()).await;
    let server = server_with(json!({"url": bot.url("/")}), |c| {
        c.vad = Some(callgate_audio::vad::VadConfig::default());
        c.barge_in = true;
        c.inband_dtmf = true;
    })
    .await;
    let mut phone = twilio_call(&server, "CA-barge").await;
    let mut conn = bot.accept().await;
    conn.expect("start").await;
    conn.media(&vec![0x55u8; 5 * 8000]).await;
    conn.mark("long").await;
    // The caller listens for half a second (sending silence, as phones do), then speaks
    // over the bot (espeak-ng's speech, in real time): callgate's VAD barges in.
    let dir = TempDir::new("bridge-barge");
    let words = speech(&dir, "hello, I would like to speak to a person please");
    let mut caller = vec![0i16; 4000];
    caller.extend(words);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    for frame in caller.chunks(160) {
        tick.tick().await;
        let ulaw = callgate_audio::pcm::encode(callgate_proto::AudioFormat::Ulaw8000, frame);
        phone_media(&mut phone, &ulaw).await;
    }
    // The bot learns of it as Twilio would tell it: its pending mark comes back (the phone
    // confirmed nothing, so without the barge-in it would never come).
    assert_eq!(conn.expect("mark").await["mark"]["name"], "long");
    let heard = listen(&mut phone, true, |h| h.clears > 0).await;
    assert!(heard.audio.len() < 4 * 8000, "the playout was cleared");
    // An in-band key (a DTMF tone in the caller's audio) reaches the bot as `dtmf`.
    let tone = callgate_audio::dtmf::tone(callgate_proto::Digit::D9, 200, 8000, 0.5);
    let mut keyed = tone;
    keyed.extend(std::iter::repeat_n(0i16, 1600));
    for frame in keyed.chunks(160) {
        let ulaw = callgate_audio::pcm::encode(callgate_proto::AudioFormat::Ulaw8000, frame);
        phone_media(&mut phone, &ulaw).await;
    }
    assert_eq!(conn.expect("dtmf").await["dtmf"]["digit"], "9");
    phone.close(1000, "bye").await;
    let record = server.ended_call("CA-barge").await;
    let events = bridge_events(&server, record["id"].as_str().unwrap()).await;
    let clear = events.iter().find(|e| e["what"] == "clear").expect("clear");
    assert_eq!(clear["by"], "callgate");
    assert_eq!(clear["cause"], "barge_in");
}
