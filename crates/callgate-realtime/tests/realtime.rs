//! The `realtime` agent over real sockets: a phone (the testkit's) calls a server whose route
//! runs the agent against the testkit's Realtime double, a local server that follows the
//! documented protocol (events, truncation and its errors, function calls, errors, abrupt
//! disconnects), scripted per test. Tools call a real local HTTP server (axum). The record is
//! read back through the admin API.
//!
//! The API key is the value of `PATH` (`api_key_env = "PATH"`): tests cannot set variables
//! (process-global), and PATH is always set.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use callgate_agent::Catalog;
use callgate_kit::AgentEnv;
use callgate_realtime::RealtimeMetrics;
use callgate_realtime::metrics::RealtimeCollector;
use callgate_server::routes::parse_spec;
use callgate_testkit::realtime::{BadKey, Double, DoubleConfig, Format, Session};
use callgate_testkit::{Phone, Received, TestServer, spawn_server_with_catalog};
use serde_json::{Value, json};

/// How long the phone hears nothing before a test takes the audio as over (the playout sends
/// a frame every 20 ms while it has any; a second without one is not jitter).
const QUIET: Duration = Duration::from_secs(1);

fn key() -> String {
    std::env::var("PATH").expect("PATH is set")
}

async fn double(config: DoubleConfig) -> Double {
    Double::start(DoubleConfig {
        api_key: key(),
        ..config
    })
    .await
}

/// A server whose only route runs `realtime` with `settings` (over the defaults below).
async fn server(double: &Double, settings: Value) -> TestServer {
    server_with(double, settings, None).await
}

/// Like [`server`], with CallBridge's OPEN API at `callbridge` (its key in `PATH`).
async fn server_with(double: &Double, settings: Value, callbridge: Option<&str>) -> TestServer {
    let mut all = json!({
        "url": double.url(),
        "api_key_env": "PATH",
        "greeting": false,
        "fallback_message": "Sorry, the assistant is not available. Goodbye.",
        "connect_timeout": "2s",
        "reconnect_within": "3s",
    });
    for (k, v) in settings.as_object().expect("an object") {
        all[k] = v.clone();
    }
    let dir = callgate_testkit::TempDir::new("realtime-env");
    let mut catalog = Catalog::builtin();
    let metrics = RealtimeMetrics::new();
    callgate_realtime::register(
        &mut catalog,
        AgentEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: callbridge.map(|base_url| callgate_kit::CallBridgeApi {
                base_url: base_url.to_owned(),
                api_key_env: "PATH".into(),
            }),
            stt: None,
        },
        metrics.clone(),
    );
    let route = parse_spec(
        json!({"name": "ai", "agent": "realtime", "settings": all}),
        0,
    )
    .expect("route");
    let server = spawn_server_with_catalog(&catalog, move |c| {
        c.routes = vec![route];
        c.metrics = vec![Arc::new(RealtimeCollector(metrics))];
    })
    .await;
    // The speech cache of the fallback is not needed once the routes are built.
    drop(dir);
    server
}

/// A CallBridge start message with these formats.
fn start(cdr: &str, format: &str) -> String {
    json!({
        "call_config": {"siteId": "921004322052", "caller": "01012341234",
                        "callee": "07012345678", "cdrId": cdr,
                        "callActionId": "1.758187055878E9", "ivrIp": "192.168.150.103:29034",
                        "agentId": "agent-main", "agentType": "voice"},
        "audio_format": {"phone_output_audio_format": format,
                         "phone_input_audio_format": format}
    })
    .to_string()
}

/// Places a CallBridge call and waits for `started`.
async fn call(server: &TestServer, cdr: &str, format: &str) -> Phone {
    let mut phone = server.phone("/").await;
    phone.text(start(cdr, format)).await;
    let started = phone.recv_json().await;
    assert_eq!(started["type"], "started", "{started}");
    phone
}

/// A session set up by the agent: its `session.update` checked and answered (the double
/// answers `session.updated` itself).
async fn session(double: &mut Double) -> (Session, Value) {
    let mut s = double.session().await;
    let update = s.expect("session.update").await;
    (s, update)
}

/// Reads the phone's audio until `bytes` arrived (more may come in the same message).
async fn hear(phone: &mut Phone, bytes: usize) -> Vec<u8> {
    let mut heard = Vec::new();
    while heard.len() < bytes {
        match phone.recv().await {
            Received::Binary(b) => heard.extend_from_slice(&b),
            Received::Text(_) => {}
            other => panic!(
                "the call ended after {} of {bytes} bytes: {other:?}",
                heard.len()
            ),
        }
    }
    heard
}

/// Reads the phone's audio until nothing came for `quiet`.
async fn hear_until_quiet(phone: &mut Phone, quiet: Duration) -> Vec<u8> {
    let mut heard = Vec::new();
    while let Ok(message) = tokio::time::timeout(quiet, phone.recv()).await {
        match message {
            Received::Binary(b) => heard.extend_from_slice(&b),
            Received::Text(_) => {}
            other => panic!("the call ended: {other:?}"),
        }
    }
    heard
}

/// The agent's events of a call, as (name, detail).
async fn agent_events(server: &TestServer, id: &str) -> Vec<(String, Value)> {
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "agent")
        .map(|e| {
            (
                e["detail"]["name"].as_str().unwrap_or("").to_owned(),
                e["detail"]["detail"].clone(),
            )
        })
        .collect()
}

async fn transcript(server: &TestServer, id: &str) -> Vec<Value> {
    let (_, t) = server.get(&format!("/api/calls/{id}/transcript")).await;
    t["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_ai_greets_and_g711_passes_straight_through_both_ways() {
    let mut double = double(DoubleConfig::default()).await;
    let server = server(&double, json!({"greeting": true, "voice": "cedar"})).await;
    let mut phone = call(&server, "rt-ulaw", "ULAW_8000").await;
    let (mut s, update) = session(&mut double).await;
    let request = s.request().clone();
    assert_eq!(request.path, "/v1/realtime");
    assert_eq!(request.model(), Some("gpt-realtime"));
    assert_eq!(
        request.beta_header(),
        None,
        "the GA protocol: no OpenAI-Beta header"
    );
    let session = &update["session"];
    assert_eq!(session["type"], "realtime");
    assert_eq!(session["output_modalities"], json!(["audio"]));
    assert_eq!(session["audio"]["input"]["format"]["type"], "audio/pcmu");
    assert_eq!(session["audio"]["output"]["format"]["type"], "audio/pcmu");
    assert_eq!(session["audio"]["output"]["voice"], "cedar");
    assert_eq!(
        session["audio"]["input"]["turn_detection"]["type"],
        "server_vad"
    );
    // The greeting: a user message, then a response.
    let item = s.expect("conversation.item.create").await;
    assert_eq!(item["item"]["role"], "user");
    let greeting = Format::Pcmu.tone(1200, 1);
    s.answer_create(&greeting, "Hello, thank you for calling.")
        .await;
    // Byte for byte: µ-law from the service is µ-law to the phone.
    let heard = hear(&mut phone, greeting.len()).await;
    assert_eq!(heard, greeting);
    // And the caller's µ-law reaches the service unchanged.
    let said = Format::Pcmu.tone(400, 7);
    for frame in said.chunks(160) {
        phone.binary(frame.to_vec()).await;
    }
    s.wait_appended(said.len()).await;
    assert_eq!(s.appended(), said);
    phone.close(1000, "bye").await;
    let record = server.ended_call("rt-ulaw").await;
    let id = record["id"].as_str().expect("id");
    let turns = transcript(&server, id).await;
    assert_eq!(turns.len(), 1, "{turns:?}");
    assert_eq!(turns[0]["speaker"], "agent");
    assert_eq!(turns[0]["text"], "Hello, thank you for calling.");
    assert_eq!(turns[0]["interrupted"], false);
    assert!(
        record["usage"]["output_tokens"].as_f64().unwrap_or(0.0) > 0.0,
        "{record}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn wideband_legs_use_24k_pcm_converted_at_the_edges() {
    let mut double = double(DoubleConfig::default()).await;
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "rt-16k", "PCM_16000").await;
    let (mut s, update) = session(&mut double).await;
    assert_eq!(update["session"]["audio"]["input"]["format"]["rate"], 24000);
    assert_eq!(
        update["session"]["audio"]["output"]["format"]["type"],
        "audio/pcm"
    );
    // One second of caller audio at 16 kHz is one second at 24 kHz for the service.
    let said = callgate_testkit::audio::speechlike_pcm16(1000, 16000, 3);
    for frame in said.chunks(640) {
        phone.binary(frame.to_vec()).await;
    }
    s.wait_appended(47_000).await;
    let appended = s.appended().len();
    assert!(
        (47_000..=48_000).contains(&appended),
        "{appended} bytes at 24 kHz"
    );
    // One second from the service is one second at 16 kHz on the phone.
    s.begin_response().await;
    s.speak(&Format::Pcm24k.tone(1000, 2), "One second.").await;
    let heard =
        hear(&mut phone, 31_000).await.len() + hear_until_quiet(&mut phone, QUIET).await.len();
    assert!(
        (31_000..=32_100).contains(&heard),
        "{heard} bytes at 16 kHz"
    );
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

#[tokio::test]
async fn barge_in_truncates_at_exactly_what_the_caller_heard_of_a_burst() {
    let mut double = double(DoubleConfig::default()).await;
    let server = server(&double, json!({"greeting": true})).await;
    let mut phone = call(&server, "rt-barge", "PCM_8000").await;
    let (mut s, _) = session(&mut double).await;
    s.expect("conversation.item.create").await;
    // A 4 s answer in one burst (the service is faster than real time).
    let text = "Our opening hours are nine to six on weekdays and ten to two on Saturdays.";
    let spoken = s.answer_create(&Format::Pcmu.tone(4000, 5), text).await;
    // The caller listens for about a second, then speaks.
    let mut heard = hear(&mut phone, 16 * 1000).await.len();
    s.speech_started(1000).await;
    let truncate = s.expect("conversation.item.truncate").await;
    heard += hear_until_quiet(&mut phone, QUIET).await.len();
    // PCM_8000: 16 bytes per ms. The service is told exactly what the phone was sent.
    assert_eq!(truncate["item_id"], spoken.item_id.as_str());
    assert_eq!(truncate["content_index"], 0);
    assert_eq!(truncate["audio_end_ms"].as_u64(), Some(heard as u64 / 16));
    assert!(
        heard < 16 * 1500,
        "the playout stopped at once: {heard} bytes heard"
    );
    let item = s.item(&spoken.item_id).expect("the item");
    assert_eq!(item.truncated_ms, Some(heard as u64 / 16));
    assert!(
        s.errors().is_empty(),
        "no error from the service: {:?}",
        s.errors()
    );
    phone.close(1000, "bye").await;
    let record = server.ended_call("rt-barge").await;
    let id = record["id"].as_str().expect("id");
    let turns = transcript(&server, id).await;
    let agent = turns
        .iter()
        .find(|t| t["speaker"] == "agent")
        .expect("an agent turn");
    assert_eq!(agent["interrupted"], true);
    let cut = agent["text"].as_str().expect("text");
    assert!(
        !cut.is_empty() && text.starts_with(cut) && cut.len() < text.len() / 2,
        "{cut:?}"
    );
    let events = agent_events(&server, id).await;
    let barge = events
        .iter()
        .find(|(n, _)| n == "barge_in")
        .expect("a barge_in event");
    assert_eq!(barge.1["source"], "service");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("callgate_realtime_barge_ins_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("callgate_realtime_connects_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("callgate_realtime_callgate_latency_seconds_count"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_barge_in_while_the_answer_streams_cancels_it_and_drops_the_rest() {
    let mut double = double(DoubleConfig {
        interrupt_response: Some(false),
        ..DoubleConfig::default()
    })
    .await;
    let server = server(
        &double,
        json!({"turn_detection": {"interrupt_response": false}}),
    )
    .await;
    let mut phone = call(&server, "rt-stream", "ULAW_8000").await;
    let (mut s, _) = session(&mut double).await;
    s.begin_response().await;
    let spoken = s.begin_speaking().await;
    s.speak_more(&Format::Pcmu.tone(600, 1), "I can certainly ")
        .await;
    hear(&mut phone, 8 * 300).await;
    s.speech_started(500).await;
    // The response still runs: the agent cancels it and truncates the item.
    let mut seen = Vec::new();
    while !(seen.contains(&"response.cancel".to_owned())
        && seen.contains(&"conversation.item.truncate".to_owned()))
    {
        let event = s.next().await;
        seen.push(event["type"].as_str().unwrap_or("").to_owned());
    }
    assert!(s.active_response().is_none(), "cancelled");
    assert!(
        !s.speak_more(&Format::Pcmu.tone(600, 2), "help").await,
        "nothing more is spoken"
    );
    let item = s.item(&spoken.item_id).expect("item");
    let heard = 8 * 300 + hear_until_quiet(&mut phone, QUIET).await.len();
    assert_eq!(item.truncated_ms, Some(heard as u64 / 8));
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

/// A local HTTP server for tools: `/lookup` answers at once, `/slow` after 2 s; every body it
/// got is kept.
async fn tool_server() -> (String, Arc<Mutex<Vec<(Value, String)>>>) {
    let seen: Arc<Mutex<Vec<(Value, String)>>> = Arc::default();
    let record = seen.clone();
    let app = Router::new()
        .route(
            "/lookup",
            post(move |headers: axum::http::HeaderMap, body: String| {
                let record = record.clone();
                async move {
                    let call = headers
                        .get("x-callgate-call-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    record.lock().expect("lock").push((body, call));
                    r#"{"status":"shipped","eta":"tomorrow"}"#
                }
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "late"
            }),
        )
        .route("/never", post(std::future::pending::<&'static str>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    callgate_server::Tasks::new().spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn tools_are_called_on_a_real_http_server_validated_and_bounded() {
    let (base, seen) = tool_server().await;
    let mut double = double(DoubleConfig::default()).await;
    let server = server(
        &double,
        json!({"tools": [
            {"name": "lookup", "description": "Order status", "url": format!("{base}/lookup"),
             "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                            "required": ["order_id"], "additionalProperties": false}},
            {"name": "slow", "description": "Too slow", "url": format!("{base}/slow"),
             "timeout": "300ms"}
        ]}),
    )
    .await;
    let mut phone = call(&server, "rt-tools", "PCM_8000").await;
    let (mut s, update) = session(&mut double).await;
    let tools = update["session"]["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["hang_up", "lookup", "slow"]);

    // Success: the arguments are the body; the answer is the output; then a response.
    s.begin_response().await;
    let called = s
        .call_function(
            "lookup",
            "",
            r#"{"order_id":"A-17"}"#,
            Some((&Format::Pcmu.tone(300, 1), "Let me check.")),
        )
        .await;
    let output = s.expect("conversation.item.create").await;
    assert_eq!(output["item"]["type"], "function_call_output");
    assert_eq!(output["item"]["call_id"], called.call_id.as_str());
    assert_eq!(
        output["item"]["output"],
        r#"{"status":"shipped","eta":"tomorrow"}"#
    );
    s.expect("response.create").await;
    s.finish_response().await;
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, json!({"order_id": "A-17"}));
        assert!(!seen[0].1.is_empty(), "the call id header");
    }

    // Invalid arguments: refused before any request.
    s.begin_response().await;
    s.call_function("lookup", "", r#"{"order":17}"#, None).await;
    let output = s.expect("conversation.item.create").await;
    let text = output["item"]["output"].as_str().expect("output");
    assert!(text.contains("invalid arguments"), "{text}");
    s.expect("response.create").await;
    s.finish_response().await;
    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "no request for bad arguments"
    );

    // A timeout: a clear error, and audio kept flowing meanwhile.
    s.begin_response().await;
    s.call_function("slow", "", "{}", None).await;
    for _ in 0..10 {
        phone.binary(vec![0u8; 320]).await;
    }
    let output = s.expect("conversation.item.create").await;
    let text = output["item"]["output"].as_str().expect("output");
    assert!(text.contains("did not answer within 300ms"), "{text}");
    assert!(
        s.appended_len() >= 8 * 200,
        "caller audio went on during the tool"
    );
    s.expect("response.create").await;
    s.finish_response().await;

    phone.close(1000, "bye").await;
    let record = server.ended_call("rt-tools").await;
    let events = agent_events(&server, record["id"].as_str().expect("id")).await;
    let calls: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "tool_call")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(calls.len(), 3, "{events:?}");
    assert_eq!(calls[0]["ok"], true);
    assert_eq!(calls[0]["arguments"], r#"{"order_id":"A-17"}"#);
    assert_eq!(calls[1]["ok"], false);
    assert_eq!(calls[2]["ok"], false);
    assert!(calls[2]["duration_ms"].as_f64().unwrap_or(0.0) >= 300.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_hang_up_mid_answer_keeps_the_answer_and_the_unanswered_tool_in_the_record() {
    let (base, _) = tool_server().await;
    let mut double = double(DoubleConfig::default()).await;
    let server = server(
        &double,
        json!({"tools": [{"name": "never", "description": "Never answers",
                          "url": format!("{base}/never"), "timeout": "60s"}]}),
    )
    .await;
    let mut phone = call(&server, "rt-end", "PCM_8000").await;
    let (mut s, _) = session(&mut double).await;
    // A tool that is still running when the call ends.
    s.begin_response().await;
    s.call_function("never", "", "{}", None).await;
    // A 4 s answer: the caller hears a second of it, then hangs up.
    let text = "Our opening hours are nine to six on weekdays.";
    s.begin_response().await;
    s.speak(&Format::Pcmu.tone(4000, 5), text).await;
    s.finish_response().await;
    hear(&mut phone, 16 * 1000).await;
    phone.close(1000, "bye").await;
    let record = server.ended_call("rt-end").await;
    let id = record["id"].as_str().expect("id").to_owned();
    // Both are written after the end, while the call still polls its agent.
    let turns = server
        .until_stored("the answer's turn", async || {
            let turns = transcript(&server, &id).await;
            (!turns.is_empty()).then_some(turns)
        })
        .await;
    assert_eq!(turns.len(), 1, "{turns:?}");
    assert_eq!(turns[0]["speaker"], "agent");
    assert_eq!(turns[0]["text"], text);
    assert_eq!(turns[0]["interrupted"], true);
    let tool = server
        .until_stored("the unanswered tool", async || {
            let events = agent_events(&server, &id).await;
            events
                .into_iter()
                .find(|(n, _)| n == "tool_call")
                .map(|(_, d)| d)
        })
        .await;
    assert_eq!(tool["name"], "never");
    assert_eq!(tool["ok"], false);
    assert_eq!(tool["output"], "the call ended before the tool answered");
    server.shutdown().await;
}

/// A local HTTP server that records the raw path and query of every request: `/moved`
/// answers a redirect to `/landed`, everything else `{"ok":1}`.
async fn recording_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let keep = seen.clone();
    let app = Router::new().fallback(move |uri: axum::http::Uri| {
        let keep = keep.clone();
        async move {
            use axum::response::IntoResponse;
            let raw = uri
                .path_and_query()
                .map_or_else(String::new, |pq| pq.as_str().to_owned());
            keep.lock().expect("lock").push(raw);
            if uri.path() == "/moved" {
                (
                    axum::http::StatusCode::FOUND,
                    [(axum::http::header::LOCATION, "/landed")],
                    "",
                )
                    .into_response()
            } else {
                r#"{"ok":1}"#.into_response()
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    callgate_server::Tasks::new().spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn tool_urls_take_call_values_as_data_and_follow_no_redirect() {
    let (base, seen) = recording_server().await;
    let mut double = double(DoubleConfig::default()).await;
    let server = server(
        &double,
        json!({"tools": [
            {"name": "customer", "description": "d",
             "url": format!("{base}/customers/{{{{caller}}}}/lookup")},
            {"name": "site", "description": "d", "method": "GET",
             "url": format!("{base}/sites?site={{{{siteId}}}}")},
            {"name": "moved", "description": "d", "url": format!("{base}/moved")},
        ]}),
    )
    .await;
    let mut phone = server.phone("/").await;
    // The phone's values: a caller number that climbs to an admin path, a siteId that adds a
    // query parameter.
    let start = json!({
        "call_config": {"siteId": "S1&admin=true",
                        "caller": "0101234/../../../admin/delete?token=x#",
                        "callee": "07012345678", "cdrId": "rt-url",
                        "callActionId": "1.7E9", "ivrIp": "10.0.0.1:29034",
                        "agentId": "agent-main", "agentType": "voice"},
        "audio_format": {"phone_output_audio_format": "PCM_8000",
                         "phone_input_audio_format": "PCM_8000"}
    });
    phone.text(start.to_string()).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    let (mut s, _) = session(&mut double).await;
    let mut outputs = Vec::new();
    for (name, arguments) in [
        ("customer", "{}"),
        ("site", r#"{"n":"1"}"#),
        ("moved", "{}"),
    ] {
        s.begin_response().await;
        s.call_function(name, "", arguments, None).await;
        let output = s.expect("conversation.item.create").await;
        outputs.push(output["item"]["output"].as_str().unwrap_or("").to_owned());
        s.expect("response.create").await;
        s.finish_response().await;
    }
    assert_eq!(outputs[0], r#"{"ok":1}"#);
    assert_eq!(outputs[1], r#"{"ok":1}"#);
    assert!(
        outputs[2].contains("moved answered HTTP 302"),
        "{}",
        outputs[2]
    );
    assert_eq!(
        *seen.lock().expect("lock"),
        [
            "/customers/0101234%2F..%2F..%2F..%2Fadmin%2Fdelete%3Ftoken%3Dx%23/lookup",
            "/sites?site=S1%26admin%3Dtrue&n=1",
            "/moved",
        ],
        "the intended paths and queries, the values intact; the redirect not followed"
    );
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_tool_url_whose_value_is_a_dot_segment_fails_without_a_request() {
    let (base, seen) = recording_server().await;
    let mut double = double(DoubleConfig::default()).await;
    let server = server(
        &double,
        json!({"tools": [{"name": "customer", "description": "d",
                          "url": format!("{base}/customers/{{{{caller}}}}/lookup")}]}),
    )
    .await;
    let mut phone = server.phone("/").await;
    let start = json!({
        "call_config": {"siteId": "S1", "caller": "..", "callee": "07012345678",
                        "cdrId": "rt-dots", "callActionId": "1.7E9", "ivrIp": "10.0.0.1:1",
                        "agentId": "agent-main", "agentType": "voice"},
        "audio_format": {"phone_output_audio_format": "PCM_8000",
                         "phone_input_audio_format": "PCM_8000"}
    });
    phone.text(start.to_string()).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    let (mut s, _) = session(&mut double).await;
    s.begin_response().await;
    s.call_function("customer", "", "{}", None).await;
    let output = s.expect("conversation.item.create").await;
    let text = output["item"]["output"].as_str().unwrap_or("");
    assert!(text.contains("path segment"), "{text}");
    s.expect("response.create").await;
    s.finish_response().await;
    assert!(seen.lock().expect("lock").is_empty(), "no request was made");
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

#[tokio::test]
async fn hang_up_ends_the_call_after_the_goodbye_has_played() {
    let mut double = double(DoubleConfig::default()).await;
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "rt-bye", "ULAW_8000").await;
    let (mut s, _) = session(&mut double).await;
    s.begin_response().await;
    let goodbye = Format::Pcmu.tone(1500, 9);
    s.call_function(
        "hang_up",
        "",
        r#"{"reason":"done"}"#,
        Some((&goodbye, "Goodbye!")),
    )
    .await;
    let mut heard = Vec::new();
    let close = loop {
        match phone.recv().await {
            Received::Binary(b) => heard.extend_from_slice(&b),
            Received::Text(_) => {}
            Received::Close(code, reason) => break (code, reason),
            Received::Eof => panic!("no close frame"),
        }
    };
    assert_eq!(heard, goodbye, "the whole goodbye, then the hangup");
    assert_eq!(close.0, 1000);
    let record = server.ended_call("rt-bye").await;
    assert_eq!(record["end_reason"], "agent_hangup", "{record}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_dropped_connection_is_reestablished_with_the_conversation_so_far() {
    let mut double = double(DoubleConfig::default()).await;
    let server = server(&double, json!({"transcription": {"language": "en"}})).await;
    let mut phone = call(&server, "rt-drop", "ULAW_8000").await;
    let (mut s, _) = session(&mut double).await;
    // A turn: the caller asks, the AI answers.
    for frame in Format::Pcmu.tone(600, 4).chunks(160) {
        phone.binary(frame.to_vec()).await;
    }
    let user = s.speech_started(0).await;
    s.speech_stopped(600).await;
    s.caller_transcript(&user, "What are your hours?").await;
    let answer = Format::Pcmu.tone(500, 6);
    s.speak(&answer, "We open at nine.").await;
    hear(&mut phone, answer.len()).await;
    // The whole answer has played: wait for the turn to be recorded, then drop the service.
    let id = server.call("rt-drop").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    server
        .until_stored("both turns in the transcript", async || {
            (transcript(&server, &id).await.len() == 2).then_some(())
        })
        .await;
    s.drop_abruptly();
    // A new session, configured the same, seeded with the conversation as text.
    let (mut s2, update) = session(&mut double).await;
    assert_eq!(
        update["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );
    let first = s2.expect("conversation.item.create").await;
    assert_eq!(first["item"]["role"], "user");
    assert_eq!(first["item"]["content"][0]["text"], "What are your hours?");
    let second = s2.expect("conversation.item.create").await;
    assert_eq!(second["item"]["role"], "assistant");
    assert_eq!(second["item"]["content"][0]["type"], "output_text");
    assert_eq!(second["item"]["content"][0]["text"], "We open at nine.");
    // The call goes on with the new session.
    s2.begin_response().await;
    let more = Format::Pcmu.tone(300, 8);
    s2.speak(&more, "Anything else?").await;
    assert_eq!(hear(&mut phone, more.len()).await, more);
    phone.close(1000, "bye").await;
    server.ended_call("rt-drop").await;
    let events = agent_events(&server, &id).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"backend_lost"), "{names:?}");
    let reconnected = events
        .iter()
        .find(|(n, _)| n == "backend_reconnected")
        .expect("reconnected");
    assert_eq!(reconnected.1["seeded_turns"], 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_bad_key_plays_the_fallback_message_and_hangs_up_without_retrying() {
    for bad_key in [BadKey::Http401, BadKey::Close3000] {
        let double = Double::start(DoubleConfig {
            api_key: "another-key".into(),
            bad_key,
            ..DoubleConfig::default()
        })
        .await;
        let server = server(&double, json!({})).await;
        let cdr = format!("rt-badkey-{bad_key:?}");
        let mut phone = call(&server, &cdr, "PCM_8000").await;
        let mut heard = 0;
        let close = loop {
            match phone.recv().await {
                Received::Binary(b) => heard += b.len(),
                Received::Text(_) => {}
                Received::Close(code, _) => break code,
                Received::Eof => panic!("no close frame"),
            }
        };
        assert_eq!(close, 1000);
        assert!(
            heard > 16 * 1000,
            "the fallback message was heard: {heard} bytes"
        );
        let record = server.ended_call(&cdr).await;
        let events = agent_events(&server, record["id"].as_str().expect("id")).await;
        let failed = events
            .iter()
            .find(|(n, _)| n == "backend_failed")
            .expect("failed");
        assert_eq!(failed.1["fatal"], true, "{failed:?}");
        let reason = failed.1["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("401") || reason.contains("invalid_api_key"),
            "{reason}"
        );
        assert!(
            !reason.contains("/bin"),
            "no part of the key in the record: {reason}"
        );
        assert_eq!(double.connections(), 1, "no retry loop on a bad key");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn retired_beta_event_names_from_a_compatible_server_still_play() {
    let mut double = double(DoubleConfig::default()).await;
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "rt-beta", "ULAW_8000").await;
    let (mut s, _) = session(&mut double).await;
    let audio = Format::Pcmu.tone(200, 3);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&audio);
    s.send(json!({"type": "response.created", "response": {"id": "resp_beta"}}))
        .await;
    s.send(json!({"type": "conversation.item.created",
                  "item": {"id": "item_beta", "type": "message", "role": "assistant"}}))
        .await;
    s.send(
        json!({"type": "response.audio.delta", "response_id": "resp_beta",
                  "item_id": "item_beta", "output_index": 0, "content_index": 0,
                  "delta": b64}),
    )
    .await;
    s.send(
        json!({"type": "response.audio_transcript.done", "item_id": "item_beta",
                  "transcript": "Hi."}),
    )
    .await;
    s.send(json!({"type": "response.audio.done", "item_id": "item_beta"}))
        .await;
    assert_eq!(hear(&mut phone, audio.len()).await, audio);
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

/// A TLS front for the double (the service is `wss://`): terminates TLS with `cert` and pipes
/// each connection to `to`.
async fn tls_front(cert: &callgate_testkit::tls::ServerCert, to: std::net::SocketAddr) -> u16 {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tasks = callgate_server::Tasks::new();
    let spawn = tasks.clone();
    tasks.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            spawn.spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn wss_reaches_a_service_signed_by_the_ca_file_and_an_untrusted_one_is_not_retried() {
    let ca = callgate_testkit::tls::TestCa::new("realtime");
    let other = callgate_testkit::tls::TestCa::new("someone else");
    let dir = callgate_testkit::TempDir::new("realtime-ca");
    let mut double = double(DoubleConfig::default()).await;
    let port = tls_front(&ca.server_cert("ai"), double.addr()).await;
    let url = format!("wss://127.0.0.1:{port}/v1/realtime");

    let trusted = ca.write(dir.path(), "ca.pem");
    let server1 = server(&double, json!({"url": url, "ca_file": trusted})).await;
    let mut phone = call(&server1, "rt-wss", "ULAW_8000").await;
    let (mut s, _) = session(&mut double).await;
    s.begin_response().await;
    let audio = Format::Pcmu.tone(200, 1);
    s.speak(&audio, "Over TLS.").await;
    assert_eq!(hear(&mut phone, audio.len()).await, audio);
    phone.close(1000, "bye").await;
    server1.shutdown().await;

    let untrusted = other.write(dir.path(), "other.pem");
    let server2 = server(&double, json!({"url": url, "ca_file": untrusted})).await;
    let mut phone = call(&server2, "rt-wss-bad", "PCM_8000").await;
    let close = phone.closed().await;
    assert_eq!(close.0, 1000, "the fallback, then a clean hangup");
    let record = server2.ended_call("rt-wss-bad").await;
    let events = agent_events(&server2, record["id"].as_str().expect("id")).await;
    let failed = events
        .iter()
        .find(|(n, _)| n == "backend_failed")
        .expect("failed");
    assert_eq!(failed.1["fatal"], true, "{failed:?}");
    assert!(
        failed.1["reason"].as_str().unwrap_or("").contains("TLS"),
        "{failed:?}"
    );
    assert_eq!(
        double.connections(),
        1,
        "only the trusted call reached the service"
    );
    server2.shutdown().await;
}

#[tokio::test]
async fn send_sms_texts_the_caller_through_callbridge_and_the_record_keeps_no_content() {
    use callgate_testkit::openapi::{Answer, OpenApiDouble};
    let api = OpenApiDouble::start(&key()).await;
    let mut double = double(DoubleConfig::default()).await;
    let server = server_with(
        &double,
        json!({"builtin_tools": ["hang_up", "send_sms"]}),
        Some(api.base_url()),
    )
    .await;
    let mut phone = server.phone("/").await;
    let mut start: Value = serde_json::from_str(&start("rt-sms", "PCM_8000")).expect("JSON");
    start["call_config"]["agentId"] = json!("17");
    phone.text(start.to_string()).await;
    assert_eq!(phone.recv_json().await["type"], "started");
    let (mut s, update) = session(&mut double).await;
    let names: Vec<&str> = update["session"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["hang_up", "send_sms"]);

    let secret = "계좌번호 123-456-789";
    api.answer(Answer::Ok);
    api.answer(Answer::Status(500));
    let mut outputs = Vec::new();
    for arguments in [
        json!({ "content": secret }),
        json!({"content": "다시", "title": "안내"}),
        json!({ "content": "가".repeat(2001) }),
    ] {
        s.begin_response().await;
        s.call_function("send_sms", "", &arguments.to_string(), None)
            .await;
        let output = s.expect("conversation.item.create").await;
        outputs.push(
            output["item"]["output"]
                .as_str()
                .expect("output")
                .to_owned(),
        );
        s.expect("response.create").await;
        s.finish_response().await;
    }
    assert!(outputs[0].contains("010****1234"), "{}", outputs[0]);
    assert!(outputs[1].contains("HTTP 500"), "{}", outputs[1]);
    assert!(outputs[2].contains("2001 characters"), "{}", outputs[2]);
    let sent = api.messages();
    assert_eq!(
        sent,
        [
            json!({"agentId": 17, "cdrId": "rt-sms", "messageType": "SMS", "content": secret}),
            json!({"agentId": 17, "cdrId": "rt-sms", "messageType": "LMS", "title": "안내",
                   "content": "다시"}),
        ],
        "too long content is refused before a request"
    );

    phone.close(1000, "bye").await;
    let record = server.ended_call("rt-sms").await;
    let events = agent_events(&server, record["id"].as_str().expect("id")).await;
    let calls: Vec<&Value> = events
        .iter()
        .filter(|(n, d)| n == "tool_call" && d["name"] == "send_sms")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(calls.len(), 3, "{events:?}");
    assert_eq!(calls[0]["ok"], true);
    assert!(
        calls[0]["output"]
            .as_str()
            .unwrap_or("")
            .contains("REQUESTED")
    );
    assert!(
        !format!("{events:?}").contains("123-456-789"),
        "the content is not in the record: {events:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn open_api_tools_need_callbridge_to_load() {
    let double = double(DoubleConfig::default()).await;
    let mut catalog = Catalog::builtin();
    callgate_realtime::register(&mut catalog, AgentEnv::default(), RealtimeMetrics::new());
    let settings = json!({"url": double.url(), "api_key_env": "PATH",
                          "builtin_tools": ["send_sms"]});
    let Err(error) = catalog.build("realtime", &settings) else {
        panic!("send_sms was accepted without [callbridge]");
    };
    assert!(error.to_string().contains("send_sms"), "{error}");
}
