//! Many calls at once, shutdown with live calls, and agents that fail.

use std::sync::Arc;

use callgate_agent::{AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun};
use callgate_testkit::audio::{frames, speechlike_pcm16};
use callgate_testkit::{
    Received, callbridge_start, cdr, incoming_call, spawn_server, spawn_server_with_agent,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_mixed_calls_all_echo_exactly() {
    let server = Arc::new(spawn_server(|_| {}).await);
    let tasks = callgate_server::Tasks::new();
    for n in 0..50u32 {
        let server = server.clone();
        tasks.spawn(async move {
            let inbound = n % 2 == 0;
            let id = format!("many-{n}");
            let mut phone = server.phone("/").await;
            if inbound {
                phone.text(incoming_call(&id)).await;
            } else {
                phone.text(callbridge_start(&id)).await;
            }
            phone.recv().await;
            let audio = speechlike_pcm16(1000, 8000, n);
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            for f in frames(&audio, 320) {
                tick.tick().await;
                phone.binary(f).await;
            }
            let mut echoed = Vec::new();
            while echoed.len() < audio.len() {
                match phone.recv().await {
                    Received::Binary(b) => echoed.extend_from_slice(&b),
                    other => panic!("call {n}: expected audio, got {other:?}"),
                }
            }
            assert!(echoed == audio, "call {n} echo is exact");
            if inbound {
                phone.text(r#"{"event":"hangup"}"#).await;
                phone.text(cdr(&id)).await;
            } else {
                phone.close(1000, "done").await;
            }
            assert_eq!(phone.closed().await.0, 1000);
        });
    }
    tasks.close();
    tasks.wait().await;
    let calls = server.calls().await;
    assert_eq!(calls.len(), 50);
    for c in &calls {
        assert_eq!(c["bytes_in"], 16000, "{c}");
        assert_eq!(c["bytes_out"], 16000, "{c}");
        assert!(!c["ended_at"].is_null());
    }
    let server = Arc::into_inner(server).expect("no other owner");
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_hangs_up_inbound_closes_callbridge_and_finalizes_records() {
    let mut server = spawn_server(|_| {}).await;
    let mut inbound = server.phone("/").await;
    inbound.text(incoming_call("sd-in")).await;
    inbound.recv().await;
    let mut silent = server.phone("/").await;
    silent.text(incoming_call("sd-silent")).await;
    silent.recv().await;
    let mut cb = server.phone("/").await;
    cb.text(callbridge_start("sd-cb")).await;
    cb.recv().await;
    let admin = server.admin_addr;

    server.begin_shutdown();
    assert_eq!(cb.closed().await, (1001, "server shutting down".to_owned()));
    assert_eq!(inbound.recv_json().await, json!({"event": "hangup"}));
    assert_eq!(silent.recv_json().await, json!({"event": "hangup"}));
    // The admin API still serves while stopping.
    let (status, body) = callgate_testkit::http::request(admin, "GET", "/healthz", None).await;
    assert_eq!(status, 503);
    assert!(body.contains("stopping"), "{body}");
    inbound.text(cdr("sd-in")).await;
    assert_eq!(
        inbound.closed().await,
        (1001, "server shutting down".to_owned())
    );
    // The silent gateway never sends its CDR: the bounded wait ends it.
    assert_eq!(silent.closed().await.0, 1001);
    let data = server.stopped().await;

    // Reopen the same data dir: every record ended as server_shutdown, none interrupted.
    let again = callgate_testkit::spawn_server_in(data, |_| {}).await;
    let calls = again.calls().await;
    assert_eq!(calls.len(), 3);
    for c in &calls {
        assert_eq!(c["end_reason"], "server_shutdown", "{c}");
        assert_eq!(c["hangup_by"], "server");
    }
    let with_cdr: Vec<_> = calls.iter().filter(|c| c["cdr"].is_object()).collect();
    assert_eq!(with_cdr.len(), 1);
    assert_eq!(with_cdr[0]["external_id"], "sd-in");
    again.shutdown().await;
}

/// An agent that fails in a chosen way once the call is answered.
struct Faulty {
    panic: bool,
}

impl AgentFactory for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        let panic = self.panic;
        Box::pin(async move {
            io.send(AgentCommand::Answer).await?;
            // Fail on the first audio frame.
            while let Some(event) = io.recv().await {
                if let AgentEvent::Audio(_) = event {
                    if panic {
                        panic!("agent bug");
                    }
                    return Err(callgate_agent::Error::failed("backend unreachable"));
                }
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn an_agent_that_panics_or_fails_ends_the_call_as_agent_failed() {
    for panic in [true, false] {
        let server = spawn_server_with_agent(Arc::new(Faulty { panic }), |_| {}).await;
        let mut cb = server.phone("/").await;
        cb.text(callbridge_start("faulty-cb")).await;
        cb.recv().await;
        cb.binary(vec![0u8; 320]).await;
        assert_eq!(cb.closed().await, (1011, "agent failed".to_owned()));
        let record = server.ended_call("faulty-cb").await;
        assert_eq!(record["end_reason"], "agent_failed");
        assert_eq!(record["hangup_by"], "server");
        // The call's log says why, in the words the agent's error reads.
        let id = record["id"].as_str().unwrap();
        let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
        let failed: Vec<&Value> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "agent_failed")
            .collect();
        let message = if panic {
            "agent panicked: agent bug"
        } else {
            "agent failed: backend unreachable"
        };
        assert_eq!(failed.len(), 1, "{log}");
        assert_eq!(failed[0]["detail"]["message"], message, "{log}");

        let mut inbound = server.phone("/").await;
        inbound.text(incoming_call("faulty-in")).await;
        inbound.recv().await;
        inbound.binary(vec![0u8; 320]).await;
        assert_eq!(inbound.recv_json().await, json!({"event": "hangup"}));
        inbound.text(cdr("faulty-in")).await;
        assert_eq!(inbound.closed().await.0, 1011);
        assert_eq!(
            server.ended_call("faulty-in").await["end_reason"],
            "agent_failed"
        );
        // Other calls are unaffected: the server still answers.
        let mut next = server.phone("/").await;
        next.text(incoming_call("after")).await;
        assert_eq!(next.recv().await.json(), json!({"event": "answer"}));
        server.shutdown().await;
    }
}
