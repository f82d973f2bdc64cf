//! Routes over real sockets: which agent answers which call, calls no route takes, the record's
//! `route` and `agent` with the list's filters and pages, a table replaced while calls run,
//! and an agent writing its transcript, usage and events.

use std::sync::Arc;

use callgate_agent::{
    AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Catalog, RecordEvent, Speaker, Turn,
};
use callgate_audio::{AudioFormat, pcm};
use callgate_server::RouteTable;
use callgate_server::routes::{RouteSpec, parse_spec};
use callgate_testkit::{
    Received, callbridge_start, cdr, incoming_call, spawn_server, spawn_server_with_catalog,
};
use serde_json::json;

fn routes(specs: serde_json::Value) -> Vec<RouteSpec> {
    specs
        .as_array()
        .expect("a list of routes")
        .iter()
        .enumerate()
        .map(|(i, v)| parse_spec(v.clone(), i).expect("a valid route"))
        .collect()
}

fn callbridge(cdr_id: &str, agent_id: &str) -> String {
    let mut start: serde_json::Value =
        serde_json::from_str(&callbridge_start(cdr_id)).expect("JSON");
    start["call_config"]["agentId"] = json!(agent_id);
    start.to_string()
}

fn inbound_to(session_id: &str, did: &str) -> String {
    json!({"event": "incoming_call", "callerId": "01099998888", "didNumber": did,
        "sessionId": session_id})
    .to_string()
}

/// Frequency of a steady tone from its zero crossings.
fn frequency(samples: &[i16], rate: u32) -> f64 {
    let crossings = samples
        .windows(2)
        .filter(|w| (w[0] < 0) != (w[1] < 0))
        .count();
    crossings as f64 / 2.0 / (samples.len() as f64 / f64::from(rate))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_choose_the_agent_and_the_record_names_them() {
    let server = spawn_server(|c| {
        c.routes = routes(json!([
            {"name": "sales", "agent": "tone",
             "match": {"protocol": "callbridge", "agent_id": ["sales", "sales-2"]},
             "settings": {"frequency_hz": 600}},
            {"name": "dids", "agent": "echo", "match": {"callee": "0700*"}},
        ]));
    })
    .await;

    // CallBridge agentId sales-2: the tone route, with its typed setting reaching the agent.
    let mut cb = server.phone("/").await;
    cb.text(callbridge("r-sales", "sales-2")).await;
    let started = cb.recv().await.json();
    assert_eq!(started["type"], "started");
    let mut samples = Vec::new();
    while samples.len() < 8000 {
        if let Received::Binary(b) = cb.recv().await {
            pcm::decode(AudioFormat::Pcm8000, &b, &mut samples);
        }
    }
    let hz = frequency(&samples, 8000);
    assert!((hz - 600.0).abs() < 5.0, "heard {hz} Hz");
    cb.close(1000, "bye").await;
    let record = server.ended_call("r-sales").await;
    assert_eq!(
        (record["route"].as_str(), record["agent"].as_str()),
        (Some("sales"), Some("tone"))
    );

    // An inbound call to a DID under 0700: the echo route.
    let mut echo = server.phone("/").await;
    echo.text(inbound_to("r-did", "07001234")).await;
    assert_eq!(echo.recv_json().await, json!({"event": "answer"}));
    echo.binary(vec![7u8; 320]).await;
    assert_eq!(echo.recv().await, Received::Binary(vec![7u8; 320].into()));
    echo.text(r#"{"event":"hangup"}"#).await;
    echo.text(cdr("r-did")).await;
    echo.closed().await;
    let record = server.ended_call("r-did").await;
    assert_eq!(
        (record["route"].as_str(), record["agent"].as_str()),
        (Some("dids"), Some("echo"))
    );

    // No route and no default: refused unanswered, with a record and a metric.
    let mut lost = server.phone("/").await;
    lost.text(inbound_to("r-none", "0212345678")).await;
    let (code, reason) = lost.closed().await;
    assert_eq!(code, 1008);
    assert!(
        reason.contains("no route") && reason.contains("0212345678"),
        "{reason}"
    );
    let record = server.ended_call("r-none").await;
    assert_eq!(record["end_reason"], "no_route");
    assert_eq!(record["hangup_by"], "server");
    assert!(
        record["route"].is_null() && record["agent"].is_null(),
        "{record}"
    );
    assert!(record["answered_at"].is_null());

    let mut other = server.phone("/").await;
    other.text(callbridge("r-other", "support")).await;
    let (code, reason) = other.closed().await;
    assert_eq!(code, 1008, "no `started` before the close");
    assert!(reason.contains("agentId \"support\""), "{reason}");
    let unrouted = server.ended_call("r-other").await;
    assert_eq!(unrouted["end_reason"], "no_route");
    // Routed or not, a record says the same of its call: these two CallBridge calls differ
    // only in their agentId and cdrId.
    let routed = server.ended_call("r-sales").await;
    for field in [
        "protocol",
        "caller",
        "callee",
        "audio_format",
        "node",
        "key_name",
    ] {
        assert_eq!(routed[field], unrouted[field], "{field}");
    }
    assert_eq!(unrouted["caller"], "01012341234");
    assert_eq!(unrouted["node"], server.config.node_id.as_str());
    assert_eq!(
        unrouted["audio_format"]["phone_output_audio_format"],
        "PCM_8000"
    );
    assert_eq!(unrouted["external_id"], "r-other");
    let mut config = routed["call_config"].clone();
    config["cdrId"] = json!("r-other");
    config["agentId"] = json!("support");
    assert_eq!(unrouted["call_config"], config);
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("callgate_calls_unrouted_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("end_reason=\"no_route\""));

    // The list's filters and pages.
    let ids = |body: &serde_json::Value| -> Vec<String> {
        body["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["external_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, body) = server.get("/api/calls?route=sales").await;
    assert_eq!(ids(&body), ["r-sales"]);
    let (_, body) = server.get("/api/calls?agent=echo").await;
    assert_eq!(ids(&body), ["r-did"]);
    let (_, body) = server
        .get("/api/calls?end_reason=no_route&protocol=inbound")
        .await;
    assert_eq!(ids(&body), ["r-none"]);
    let (_, body) = server.get("/api/calls?route=nope").await;
    assert_eq!(ids(&body), Vec::<String>::new());
    let mut seen = Vec::new();
    let mut query = "/api/calls?limit=3".to_owned();
    loop {
        let (status, body) = server.get(&query).await;
        assert_eq!(status, 200, "{body}");
        seen.extend(ids(&body));
        match body["next"].as_str() {
            Some(next) => query = format!("/api/calls?limit=3&before={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["r-other", "r-none", "r-did", "r-sales"]);
    let (status, body) = server.get("/api/calls?rout=sales").await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "bad_query");
    assert!(body["error"].as_str().unwrap().contains("\"rout\""));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_route_table_serves_new_calls_while_live_calls_keep_theirs() {
    let server = spawn_server(|c| c.agent = "echo".into()).await;
    let mut live = server.phone("/").await;
    live.text(incoming_call("before")).await;
    assert_eq!(live.recv_json().await, json!({"event": "answer"}));

    let catalog = Catalog::builtin();
    let table = RouteTable::build(
        &routes(json!([{"name": "tones", "agent": "tone"}])),
        &catalog,
    )
    .unwrap();
    server.routes.replace(table);

    let mut next = server.phone("/").await;
    next.text(incoming_call("after")).await;
    assert_eq!(next.recv_json().await, json!({"event": "answer"}));
    // The new call hears the tone agent...
    assert!(matches!(next.recv().await, Received::Binary(_)));
    // ...while the live call still echoes.
    live.binary(vec![3u8; 320]).await;
    assert_eq!(live.recv().await, Received::Binary(vec![3u8; 320].into()));
    for (phone, id) in [(&mut live, "before"), (&mut next, "after")] {
        phone.text(r#"{"event":"hangup"}"#).await;
        phone.text(cdr(id)).await;
        phone.closed().await;
    }
    assert_eq!(server.ended_call("before").await["route"], "default");
    assert_eq!(server.ended_call("before").await["agent"], "echo");
    assert_eq!(server.ended_call("after").await["route"], "tones");
    server.shutdown().await;
}

/// Answers, says one turn, hears the caller's key, writes what happened, and hangs up.
struct Scribe;

impl AgentFactory for Scribe {
    fn name(&self) -> &str {
        "scribe"
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        Box::pin(async move {
            io.send(AgentCommand::Answer).await?;
            let start_ms = io.now_ms();
            let greeting = pcm::encode(io.call.output_format, &vec![1000i16; 8000 / 5]);
            io.send(AgentCommand::Audio(greeting)).await?;
            io.send(AgentCommand::Mark(1)).await?;
            let mut heard = None;
            while let Some(event) = io.recv().await {
                match event {
                    AgentEvent::Mark {
                        id: 1,
                        at_ms,
                        played_ms,
                        ..
                    } => {
                        heard = Some(played_ms);
                        io.send(AgentCommand::Transcript(Box::new(Turn {
                            speaker: Speaker::Agent,
                            text: format!("Hello from {}", io.call.route),
                            start_ms,
                            end_ms: at_ms,
                            interrupted: false,
                        })))
                        .await?;
                    }
                    AgentEvent::Dtmf(digit) => {
                        let now = io.now_ms();
                        io.send(AgentCommand::Transcript(Box::new(Turn {
                            speaker: Speaker::Caller,
                            text: format!("pressed {digit}"),
                            start_ms: now,
                            end_ms: now,
                            interrupted: false,
                        })))
                        .await?;
                        io.send(AgentCommand::Event(Box::new(RecordEvent {
                            name: "heard".into(),
                            detail: json!({ "played_ms": heard }),
                        })))
                        .await?;
                        io.send(AgentCommand::Usage(vec![
                            ("input_tokens".into(), 120.0),
                            ("audio_out_seconds".into(), 0.2),
                        ]))
                        .await?;
                        io.send(AgentCommand::Usage(vec![("input_tokens".into(), 5.0)]))
                            .await?;
                        io.send(AgentCommand::Hangup).await?;
                    }
                    AgentEvent::Ended(_) => break,
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_writes_its_transcript_usage_and_events_to_the_record() {
    let mut catalog = Catalog::builtin();
    catalog.register("scribe", |settings| {
        callgate_agent::catalog::parse::<callgate_agent::catalog::NoSettings>(settings)?;
        Ok(Arc::new(Scribe) as Arc<dyn AgentFactory>)
    });
    let server = spawn_server_with_catalog(&catalog, |c| {
        c.routes = routes(json!([{"name": "front-desk", "agent": "scribe"}]));
    })
    .await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("scribe")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let mut got = 0;
    while got < 3200 {
        if let Received::Binary(b) = phone.recv().await {
            got += b.len();
        }
    }
    phone.text(r#"{"event":"dtmf","digit":"7"}"#).await;
    assert_eq!(phone.recv_json().await, json!({"event": "hangup"}));
    phone.text(cdr("scribe")).await;
    phone.closed().await;
    let record = server.ended_call("scribe").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    assert_eq!(
        record["usage"],
        json!({"input_tokens": 125.0, "audio_out_seconds": 0.2})
    );
    let id = record["id"].as_str().unwrap();
    let (status, transcript) = server.get(&format!("/api/calls/{id}/transcript")).await;
    assert_eq!(status, 200, "{transcript}");
    let entries = transcript["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{transcript}");
    assert_eq!(entries[0]["speaker"], "agent");
    assert_eq!(entries[0]["text"], "Hello from front-desk");
    // The mark comes when the last frame has left (a frame ahead of its slot): 200 ms of
    // audio is sent by 160 ms after the first frame.
    assert!(
        entries[0]["end_ms"].as_u64().unwrap() >= 150,
        "{transcript}"
    );
    assert_eq!(entries[1]["speaker"], "caller");
    assert_eq!(entries[1]["text"], "pressed 7");
    assert_eq!(transcript["usage"]["input_tokens"], 125.0);
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    let agent_event = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "agent")
        .cloned()
        .expect("the agent's own event");
    assert_eq!(
        agent_event["detail"],
        json!({"name": "heard", "detail": {"played_ms": 200}})
    );
    let (status, body) = server
        .get("/api/calls/0190a5d0-ac96-774b-bcce-b302099a8057/transcript")
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("call_not_found"))
    );
    server.shutdown().await;
}
