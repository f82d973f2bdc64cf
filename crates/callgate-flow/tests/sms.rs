//! The flow step `send_sms` over real sockets: CallBridge calls placed with the testkit's
//! phone, the message sent to the testkit's double of CallBridge's OPEN API
//! (`messages/send-direct`), and each outcome's branch read back from the record.

use callgate_agent::Catalog;
use callgate_flow::FlowEnv;
use callgate_server::routes::parse_spec;
use callgate_testkit::openapi::{Answer, OpenApiDouble};
use callgate_testkit::{Received, TempDir, TestServer, spawn_server_with_catalog};
use serde_json::{Value, json};

/// The key's variable: one cargo sets for every test process (tests cannot set one).
const KEY_ENV: &str = "CARGO_PKG_NAME";

const FLOW: &str = r#"
[[step]]
name = "text"
kind = "send_sms"
content = "{{caller}}님, 이번 달 요금은 3만원입니다."
timeout = "500ms"
on_error = "failed"

[[step]]
name = "done"
kind = "hangup"

[[step]]
name = "failed"
kind = "hangup"
"#;

async fn server(dir: &TempDir, api: &OpenApiDouble) -> TestServer {
    let file = dir.path().join("flow.toml");
    std::fs::write(&file, FLOW).expect("write flow");
    let mut catalog = Catalog::builtin();
    callgate_flow::register(
        &mut catalog,
        FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: Some(callgate_flow::CallBridgeApi {
                base_url: api.base_url().to_owned(),
                api_key_env: KEY_ENV.into(),
            }),
            stt: None,
        },
    );
    spawn_server_with_catalog(&catalog, move |c| {
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

/// Places a CallBridge call with this cdrId and agentId, and waits for the flow to hang up.
async fn call(server: &TestServer, cdr: &str, agent: &str) {
    let mut phone = server.phone("/").await;
    phone
        .text(
            json!({
                "call_config": {"siteId": "1", "caller": "01012341234", "callee": "0701",
                                "cdrId": cdr, "callActionId": "1", "ivrIp": "10.0.0.1:1",
                                "agentId": agent, "agentType": "voice"},
                "audio_format": {"phone_output_audio_format": "PCM_8000",
                                 "phone_input_audio_format": "PCM_8000"}
            })
            .to_string(),
        )
        .await;
    loop {
        if let Received::Close(..) | Received::Eof = phone.recv().await {
            return;
        }
    }
}

/// The `text` step's result and the step taken after it.
async fn outcome(server: &TestServer, cdr: &str) -> (Value, String, String) {
    let record = server.ended_call(cdr).await;
    let id = record["id"].as_str().expect("id");
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    let end = log["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["detail"].clone())
        .find(|d| d["name"] == "flow_step" && d["step"] == "text" && d["phase"] == "end")
        .expect("the step's result");
    (
        end.clone(),
        end["next"].as_str().unwrap_or("").to_owned(),
        log.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_sms_texts_the_caller_and_each_failure_takes_the_error_branch() {
    let key = std::env::var(KEY_ENV).expect("cargo sets it");
    let api = OpenApiDouble::start(&key).await;
    let dir = TempDir::new("flow-sms");
    let server = server(&dir, &api).await;

    api.answer(Answer::Ok);
    call(&server, "sms-ok", "17").await;
    let (result, next, log) = outcome(&server, "sms-ok").await;
    assert_eq!(next, "done", "{result}");
    assert_eq!(result["sms"]["phoneNumber"], "010****1234");
    assert_eq!(result["sms"]["result"], "REQUESTED");
    let sent = api.requests();
    assert_eq!(sent[0].authorization, format!("Bearer {key}"));
    assert_eq!(
        sent[0].body,
        json!({"agentId": 17, "cdrId": "sms-ok", "messageType": "SMS",
               "content": "01012341234님, 이번 달 요금은 3만원입니다."})
    );
    assert!(
        !log.contains("이번 달 요금"),
        "the content is not in the record"
    );

    for (cdr, answer, error) in [
        ("sms-500", Answer::Status(500), "HTTP 500"),
        ("sms-never", Answer::Never, "did not answer within 500ms"),
        ("sms-garbage", Answer::Garbage, "not readable"),
    ] {
        api.answer(answer);
        call(&server, cdr, "17").await;
        let (result, next, _) = outcome(&server, cdr).await;
        assert_eq!(next, "failed", "{cdr}: {result}");
        let text = result["error"].as_str().unwrap_or("");
        assert!(text.contains(error), "{cdr}: {text}");
    }
    assert_eq!(api.messages().len(), 4);

    // agentId is a string in call_config and a number in the API: no request for a name.
    call(&server, "sms-agent", "agent-main").await;
    let (result, next, _) = outcome(&server, "sms-agent").await;
    assert_eq!(next, "failed");
    assert!(
        result["error"]
            .as_str()
            .unwrap_or("")
            .contains("not a number"),
        "{result}"
    );
    assert_eq!(api.messages().len(), 4, "no request");
    server.shutdown().await;
}
