//! The `pipeline` agent over real sockets: a phone (the testkit's) calls a server whose route
//! runs the agent against the testkit's OpenAI double (transcriptions, streamed chat
//! completions, streamed speech, as documented). The caller's words are real speech from
//! espeak-ng. The record is read back through the admin API.
//!
//! The API key is the value of `PATH` (`api_key_env = "PATH"`): tests cannot set variables
//! (process-global), and PATH is always set.

use bytes::Bytes;
use callgate_agent::Catalog;
use callgate_kit::AgentEnv;
use callgate_server::routes::parse_spec;
use callgate_testkit::openai::{ChatScript, OpenAiDouble, Reply, ScriptedCall};
use callgate_testkit::{Phone, Received, TestServer, spawn_server_with_catalog};
use serde_json::{Value, json};

fn key() -> String {
    std::env::var("PATH").expect("PATH is set")
}

/// A server whose only route runs `pipeline` against `double` with `settings` over these.
async fn server(double: &OpenAiDouble, settings: Value) -> TestServer {
    let api = |extra: Value| {
        let mut v = json!({"base_url": double.base_url(), "api_key_env": "PATH",
                           "timeout": "5s"});
        for (k, x) in extra.as_object().expect("an object") {
            v[k] = x.clone();
        }
        v
    };
    let mut all = json!({
        "instructions": "You answer calls for {{caller}}.",
        "fallback_message": "Sorry, goodbye.",
        "stt": api(json!({"provider": "openai", "model": "whisper-test", "language": "ko"})),
        "llm": api(json!({"model": "llm-test", "temperature": 0.2})),
        "tts": api(json!({"provider": "openai", "model": "tts-test", "voice": "nova"})),
    });
    for (k, v) in settings.as_object().expect("an object") {
        all[k] = v.clone();
    }
    let dir = callgate_testkit::TempDir::new("pipeline-env");
    let mut catalog = Catalog::builtin();
    callgate_pipeline::register(
        &mut catalog,
        AgentEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
        },
    );
    let route = parse_spec(
        json!({"name": "ai", "agent": "pipeline", "settings": all}),
        0,
    )
    .expect("route");
    let server = spawn_server_with_catalog(&catalog, move |c| c.routes = vec![route]).await;
    drop(dir);
    server
}

/// Places a CallBridge call at 16 kHz PCM and waits for `started`.
async fn call(server: &TestServer, cdr: &str) -> Phone {
    let mut phone = server.phone("/").await;
    phone
        .text(
            json!({
                "call_config": {"siteId": "1", "caller": "01012341234", "callee": "0701",
                                "cdrId": cdr, "callActionId": "1", "ivrIp": "10.0.0.1:1",
                                "agentId": "a", "agentType": "voice"},
                "audio_format": {"phone_output_audio_format": "PCM_16000",
                                 "phone_input_audio_format": "PCM_16000"}
            })
            .to_string(),
        )
        .await;
    let started = phone.recv_json().await;
    assert_eq!(started["type"], "started", "{started}");
    phone
}

/// Real Korean speech (espeak-ng) as 16 kHz PCM, then a second of silence.
async fn say(phone: &mut Phone, text: &str) {
    let tts = callgate_kit::TtsSettings::default();
    let http = callgate_kit::http::client().expect("client");
    let provider = tts.provider(&http).expect("espeak-ng is installed");
    let audio = provider.synthesize(text, "ko").await.expect("speech");
    let pcm: Bytes = callgate_kit::audio::resampled_pcm(&audio, 16000).expect("resampled");
    for frame in pcm
        .chunks(640)
        .chain(std::iter::repeat_n(&[0u8; 640][..], 50))
    {
        phone.binary(frame.to_vec()).await;
    }
}

/// Reads the phone's audio until the call ends.
async fn hear_to_the_end(phone: &mut Phone) -> usize {
    let mut heard = 0;
    loop {
        match phone.recv().await {
            Received::Binary(b) => heard += b.len(),
            Received::Text(_) => {}
            Received::Close(..) | Received::Eof => return heard,
        }
    }
}

async fn record(server: &TestServer, cdr: &str) -> (Value, Vec<Value>, Vec<(String, Value)>) {
    let record = server.ended_call(cdr).await;
    let id = record["id"].as_str().expect("id").to_owned();
    let (_, t) = server.get(&format!("/api/calls/{id}/transcript")).await;
    let turns = t["entries"].as_array().cloned().unwrap_or_default();
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    let events = log["events"]
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
        .collect();
    (record, turns, events)
}

#[tokio::test]
async fn a_korean_call_is_transcribed_answered_heard_and_hung_up_after_the_goodbye() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Ok("요금 문의요".into()));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["요금은 삼만 원입니다. ".into(), "안녕히 계세요.".into()],
        tool_calls: vec![ScriptedCall {
            id: "call_1".into(),
            name: "hang_up".into(),
            arguments: "{\"reason\":\"done\"}".into(),
        }],
    }));
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "pl-answer").await;
    say(&mut phone, "요금 문의요").await;
    let heard = hear_to_the_end(&mut phone).await;
    // Both sentences' speech (10 ms a character at 16 kHz, 32 bytes a ms), give or take
    // the resampler's edges.
    let expected = (12 + 8) * 10 * 32;
    assert!(heard + 200 >= expected, "heard {heard} of {expected} bytes");

    let stt = double.stt_requests();
    assert_eq!(stt.len(), 1);
    assert_eq!(
        (stt[0].model.as_str(), stt[0].language.as_deref()),
        ("whisper-test", Some("ko"))
    );
    assert_eq!(stt[0].rate, 16000);
    assert!(stt[0].samples > 16000 / 2, "{} samples", stt[0].samples);
    let chat = double.chat_requests();
    assert_eq!(chat.len(), 1, "the LLM is not asked again after hang_up");
    let c = &chat[0];
    assert_eq!(c["model"], "llm-test");
    assert_eq!(c["stream"], true);
    assert_eq!(c["stream_options"]["include_usage"], true);
    assert_eq!(c["temperature"], 0.2);
    assert_eq!(
        c["messages"],
        json!([{"role": "system", "content": "You answer calls for 01012341234."},
               {"role": "user", "content": "요금 문의요"}])
    );
    assert_eq!(c["tools"][0]["function"]["name"], "hang_up");
    let spoken: Vec<Value> = double
        .speech_requests()
        .iter()
        .map(|r| json!([r["input"], r["response_format"], r["voice"], r["model"]]))
        .collect();
    assert_eq!(
        spoken,
        vec![
            json!(["요금은 삼만 원입니다.", "pcm", "nova", "tts-test"]),
            json!(["안녕히 계세요.", "pcm", "nova", "tts-test"])
        ]
    );

    let (record, turns, events) = record(&server, "pl-answer").await;
    let said: Vec<(Value, Value, Value)> = turns
        .iter()
        .map(|t| {
            (
                t["speaker"].clone(),
                t["text"].clone(),
                t["interrupted"].clone(),
            )
        })
        .collect();
    assert_eq!(
        said,
        vec![
            (json!("caller"), json!("요금 문의요"), json!(false)),
            (
                json!("agent"),
                json!("요금은 삼만 원입니다. 안녕히 계세요."),
                json!(false)
            ),
        ]
    );
    let latency = events
        .iter()
        .find(|(n, _)| n == "turn_latency")
        .map(|(_, d)| d.clone())
        .expect("a turn_latency event");
    for field in [
        "stt_ms",
        "llm_first_token_ms",
        "tts_first_audio_ms",
        "first_frame_ms",
    ] {
        assert!(latency[field].is_u64(), "{field}: {latency}");
    }
    assert!(latency["first_frame_ms"].as_u64() >= latency["stt_ms"].as_u64());
    let usage = &record["usage"];
    assert_eq!(usage["llm_input_tokens"], 42.0, "{record}");
    assert_eq!(usage["llm_output_tokens"], 7.0);
    assert_eq!(usage["tts_characters"], 20.0);
    assert!(
        usage["stt_seconds"].as_f64().unwrap_or(0.0) > 0.5,
        "{record}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_failing_provider_is_retried_once_then_the_fallback_plays_and_the_call_ends() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Status(503));
    double.transcript(Reply::Status(503));
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "pl-fail").await;
    say(&mut phone, "요금 문의요").await;
    let heard = hear_to_the_end(&mut phone).await;
    assert!(
        heard > 16000,
        "the fallback message was heard: {heard} bytes"
    );
    assert_eq!(double.stt_requests().len(), 2, "one retry");
    assert!(double.chat_requests().is_empty());
    let (_, _, events) = record(&server, "pl-fail").await;
    let failed: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "provider_failed")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0]["provider"], "stt");
    assert!(failed[0]["reason"].as_str().unwrap_or("").contains("503"));
    server.shutdown().await;
}

#[tokio::test]
async fn the_llm_and_the_speech_api_failing_each_end_in_the_fallback() {
    for (cdr, llm, tts) in [("pl-llm", true, false), ("pl-tts", false, true)] {
        let double = OpenAiDouble::start(&key()).await;
        double.transcript(Reply::Ok("여보세요".into()));
        if llm {
            double.answer(Reply::Status(500));
            double.answer(Reply::Status(500));
        } else {
            double.answer(Reply::Ok(ChatScript::says(&["네, 말씀하세요."])));
        }
        if tts {
            double.speech(Reply::Status(400));
        }
        let server = server(&double, json!({})).await;
        let mut phone = call(&server, cdr).await;
        say(&mut phone, "여보세요").await;
        let heard = hear_to_the_end(&mut phone).await;
        assert!(
            heard > 16000,
            "{cdr}: the fallback was heard: {heard} bytes"
        );
        let (_, _, events) = record(&server, cdr).await;
        let failed: Vec<String> = events
            .iter()
            .filter(|(n, _)| n == "provider_failed")
            .map(|(_, d)| d["provider"].as_str().unwrap_or("").to_owned())
            .collect();
        let expected = if llm { "llm" } else { "tts" };
        assert_eq!(failed, vec![expected.to_owned()], "{cdr}: {events:?}");
        if llm {
            assert_eq!(double.chat_requests().len(), 2, "one retry of a 500");
        } else {
            assert_eq!(double.speech_requests().len(), 1, "a 400 is not retried");
        }
        server.shutdown().await;
    }
}
