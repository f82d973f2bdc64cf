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
    server_with(double, settings, None).await
}

/// Like [`server`], with CallBridge's OPEN API at `callbridge` (its key in `PATH`).
async fn server_with(
    double: &OpenAiDouble,
    settings: Value,
    callbridge: Option<&str>,
) -> TestServer {
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
            callbridge: callbridge.map(|base_url| callgate_kit::CallBridgeApi {
                base_url: base_url.to_owned(),
                api_key_env: "PATH".into(),
            }),
            stt: None,
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
                                "agentId": "17", "agentType": "voice"},
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

/// Korean speech (espeak-ng) as 16 kHz PCM frames of 20 ms.
async fn speech_frames(text: &str) -> Vec<Vec<u8>> {
    let tts = callgate_kit::TtsSettings::default();
    let http = callgate_kit::http::client().expect("client");
    let provider = tts.provider(&http).expect("espeak-ng is installed");
    let audio = provider.synthesize(text, "ko").await.expect("speech");
    let pcm: Bytes = callgate_kit::audio::resampled_pcm(&audio, 16000).expect("resampled");
    pcm.chunks(640).map(<[u8]>::to_vec).collect()
}

/// Reads the phone's audio until `bytes` arrived.
async fn hear(phone: &mut Phone, bytes: usize) -> usize {
    let mut heard = 0;
    while heard < bytes {
        match phone.recv().await {
            Received::Binary(b) => heard += b.len(),
            Received::Text(_) => {}
            other => panic!("the call ended after {heard} bytes: {other:?}"),
        }
    }
    heard
}

/// Speaks `frames` as a phone does (one every 20 ms: the agent measures speech on the call's
/// clock), then silence until `done` holds, reading the agent's audio all along. Returns the
/// audio bytes heard meanwhile.
async fn talk_over(
    phone: &mut Phone,
    frames: Vec<Vec<u8>>,
    double: &OpenAiDouble,
    done: impl Fn(&OpenAiDouble) -> bool,
) -> usize {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    let mut frames = frames.into_iter();
    let mut heard = 0;
    loop {
        tokio::select! {
            m = phone.recv() => match m {
                Received::Binary(b) => heard += b.len(),
                Received::Text(_) => {}
                other => panic!("the call ended: {other:?}"),
            },
            _ = tick.tick() => {
                if done(double) {
                    return heard;
                }
                let frame = frames.next().unwrap_or_else(|| vec![0; 640]);
                phone.binary(frame).await;
            }
        }
    }
}

/// An answer of two sentences: a short one, then one of about 2.5 s of speech.
fn long_answer() -> (ChatScript, String) {
    let second = format!(
        "{}끝입니다.",
        "요금 안내를 차례로 말씀드리겠습니다 ".repeat(8)
    );
    let script = ChatScript {
        content: vec!["안녕하세요 고객님. ".into(), second.clone()],
        tool_calls: vec![ScriptedCall {
            id: "call_bye".into(),
            name: "hang_up".into(),
            arguments: "{}".into(),
        }],
    };
    (script, format!("안녕하세요 고객님. {second}"))
}

#[tokio::test]
async fn barge_in_cuts_the_answer_to_what_was_heard_in_the_next_llm_request() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Ok("요금 문의요".into()));
    let (script, full) = long_answer();
    double.answer(Reply::Ok(script));
    double.transcript(Reply::Ok("잠깐만요 질문이 있어요".into()));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["네, 말씀하세요.".into()],
        tool_calls: vec![ScriptedCall {
            id: "call_end".into(),
            name: "hang_up".into(),
            arguments: "{}".into(),
        }],
    }));
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "pl-barge").await;
    say(&mut phone, "요금 문의요").await;
    // Half a second of the answer, then the caller talks over it.
    hear(&mut phone, 16_000).await;
    let words = speech_frames("잠깐만요 질문이 있어요").await;
    talk_over(&mut phone, words, &double, |d| d.chat_requests().len() >= 2).await;
    hear_to_the_end(&mut phone).await;

    let chat = double.chat_requests();
    let messages = chat[1]["messages"].as_array().expect("messages").clone();
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert_eq!(messages[2]["role"], "assistant");
    let kept = messages[2]["content"].as_str().expect("content");
    assert!(kept.starts_with("안녕하세요 고객님."), "{kept}");
    assert!(kept.ends_with('…'), "cut and marked: {kept}");
    assert!(
        kept.chars().count() < full.chars().count(),
        "the LLM is not told what the caller never heard: {kept}"
    );
    // Its hang_up never took effect, and the LLM is told so.
    assert_eq!(messages[3]["tool_call_id"], "call_bye");
    assert!(
        messages[3]["content"]
            .as_str()
            .unwrap_or("")
            .contains("the call goes on"),
        "{}",
        messages[3]
    );
    assert_eq!(
        messages[4],
        json!({"role": "user", "content": "잠깐만요 질문이 있어요"})
    );
    let (_, turns, _) = record(&server, "pl-barge").await;
    let agent: Vec<&Value> = turns.iter().filter(|t| t["speaker"] == "agent").collect();
    assert_eq!(agent[0]["interrupted"], true, "{turns:?}");
    assert_eq!(agent[0]["text"].as_str(), Some(kept));
    server.shutdown().await;
}

#[tokio::test]
async fn a_backchannel_does_not_interrupt_and_the_answer_is_heard_whole() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Ok("요금 문의요".into()));
    let (script, full) = long_answer();
    double.answer(Reply::Ok(script));
    double.transcript(Reply::Ok("네 네".into()));
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "pl-backchannel").await;
    say(&mut phone, "요금 문의요").await;
    let mut heard = hear(&mut phone, 16_000).await;
    let words = speech_frames("네 네 네 네").await;
    heard += talk_over(&mut phone, words, &double, |d| d.stt_requests().len() >= 2).await;
    heard += hear_to_the_end(&mut phone).await;
    assert_eq!(
        double.chat_requests().len(),
        1,
        "the LLM was not asked again"
    );
    // All of the answer was heard: what played before the pause, and the rest after it.
    let expected = full.chars().count() * 10 * 32;
    assert!(
        heard + 2000 >= expected,
        "heard {heard} of {expected} bytes"
    );
    let (_, turns, events) = record(&server, "pl-backchannel").await;
    assert!(
        events
            .iter()
            .any(|(n, d)| n == "backchannel" && d["resumed"] == true),
        "{events:?}"
    );
    let agent: Vec<&Value> = turns.iter().filter(|t| t["speaker"] == "agent").collect();
    assert_eq!(agent.len(), 1, "{turns:?}");
    assert_eq!(agent[0]["interrupted"], false);
    assert_eq!(agent[0]["text"].as_str(), Some(full.as_str()));
    server.shutdown().await;
}

fn tool(id: &str, name: &str, arguments: &str) -> ScriptedCall {
    ScriptedCall {
        id: id.into(),
        name: name.into(),
        arguments: arguments.into(),
    }
}

/// Reads the phone's audio until the call ends: the bytes.
async fn record_to_the_end(phone: &mut Phone) -> Vec<u8> {
    let mut audio = Vec::new();
    loop {
        match phone.recv().await {
            Received::Binary(b) => audio.extend_from_slice(&b),
            Received::Text(_) => {}
            Received::Close(..) | Received::Eof => return audio,
        }
    }
}

/// The keys pressed in 16 kHz PCM, each with the byte offset where it was detected.
fn keys_in(audio: &[u8]) -> Vec<(char, usize)> {
    let mut detector = callgate_audio::dtmf::Detector::new(16000);
    let mut found = Vec::new();
    let mut out = Vec::new();
    for (i, frame) in audio.chunks(640).enumerate() {
        let samples: Vec<i16> = frame
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        detector.process(&samples, &mut out);
        found.extend(out.drain(..).map(|d| (d.as_char(), i * 640)));
    }
    found
}

/// The last message of the `n`th chat request.
fn last_message(double: &OpenAiDouble, n: usize) -> Value {
    let chat = double.chat_requests();
    chat[n]["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .expect("a message")
}

#[tokio::test]
async fn send_dtmf_presses_the_keys_after_what_was_said_and_the_llm_goes_on() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Ok("내선 12번 눌러 주세요".into()));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["연결해 드리겠습니다. ".into()],
        tool_calls: vec![tool("k1", "send_dtmf", "{\"digits\":\"12#\"}")],
    }));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["눌렀습니다.".into()],
        tool_calls: vec![tool("bye", "hang_up", "{}")],
    }));
    let server = server(&double, json!({"builtin_tools": ["hang_up", "send_dtmf"]})).await;
    let mut phone = call(&server, "pl-dtmf").await;
    say(&mut phone, "내선 12번 눌러 주세요").await;
    let audio = record_to_the_end(&mut phone).await;
    let keys = keys_in(&audio);
    assert_eq!(
        keys.iter().map(|(k, _)| *k).collect::<String>(),
        "12#",
        "{keys:?}"
    );
    // In-band, after the first sentence's speech (10 chars: 100 ms, 3200 bytes at 16 kHz).
    assert!(keys[0].1 >= 3000, "{keys:?}");
    assert_eq!(
        last_message(&double, 1),
        json!({"role": "tool", "tool_call_id": "k1", "content": "{\"pressed\":\"12#\"}"})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn open_api_tools_are_refused_at_load_without_callbridge() {
    for tool in ["agent_terminate", "send_sms"] {
        let mut catalog = Catalog::builtin();
        callgate_pipeline::register(&mut catalog, AgentEnv::default());
        let Err(error) = catalog.build("pipeline", &json!({"builtin_tools": [tool]})) else {
            panic!("{tool} was accepted without [callbridge]");
        };
        let text = error.to_string();
        assert!(
            text.contains(tool) && text.contains("[callbridge]"),
            "{tool}: {text}"
        );
    }
}

#[tokio::test]
async fn agent_terminate_asks_callbridge_to_end_the_call_with_the_announcement() {
    let double = OpenAiDouble::start(&key()).await;
    let api = callgate_testkit::openapi::OpenApiDouble::start(&key()).await;
    double.transcript(Reply::Ok("이제 끊을게요".into()));
    double.answer(Reply::Ok(ChatScript {
        content: vec![
            "네, 알겠습니다. ".into(),
            "오늘 상담은 여기까지입니다. 안녕히 계세요.".into(),
        ],
        tool_calls: vec![tool(
            "t1",
            "agent_terminate",
            "{\"message\":\"이용해 주셔서 감사합니다\"}",
        )],
    }));
    let server = server_with(
        &double,
        json!({"builtin_tools": ["agent_terminate"]}),
        Some(api.base_url()),
    )
    .await;
    let mut phone = call(&server, "pl-term").await;
    say(&mut phone, "이제 끊을게요").await;
    api.wait_for("agent-terminate", |a| !a.requests().is_empty())
        .await;
    // The goodbye still plays (CallBridge announces, then drops the line: here, the phone).
    hear(&mut phone, 20 * 10 * 32).await;
    phone.close(1000, "terminated").await;
    let request = api.requests()[0].clone();
    assert_eq!(request.endpoint, "terminate");
    assert_eq!(request.authorization, format!("Bearer {}", key()));
    assert_eq!(
        request.body,
        json!({"ivrIp": "10.0.0.1:1", "id": "17", "cdrId": "pl-term",
               "callerNo": "01012341234", "calleeNo": "0701", "actionId": "1",
               "ment": "이용해 주셔서 감사합니다"})
    );
    let (_, _, events) = record(&server, "pl-term").await;
    assert!(
        events
            .iter()
            .any(|(n, d)| n == "agent_terminate" && d["accepted"] == true),
        "{events:?}"
    );
    assert_eq!(
        double.chat_requests().len(),
        1,
        "the LLM is not asked again"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn send_sms_texts_the_caller_and_the_llm_reads_the_answer_or_the_error() {
    use callgate_testkit::openapi::{Answer, OpenApiDouble};
    let double = OpenAiDouble::start(&key()).await;
    let api = OpenApiDouble::start(&key()).await;
    let secret = "계좌번호 123-456-789";
    double.transcript(Reply::Ok("계좌번호 문자로 보내 주세요".into()));
    let sms = |id: &str, arguments: String| {
        Reply::Ok(ChatScript {
            content: Vec::new(),
            tool_calls: vec![tool(id, "send_sms", &arguments)],
        })
    };
    // Sent; refused (HTTP 500); an unreadable answer; content too long (no request).
    double.answer(sms("s1", json!({ "content": secret }).to_string()));
    double.answer(sms(
        "s2",
        json!({"content": "다시", "title": "안내"}).to_string(),
    ));
    double.answer(sms("s3", json!({ "content": "한 번 더" }).to_string()));
    double.answer(sms(
        "s4",
        json!({ "content": "가".repeat(2001) }).to_string(),
    ));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["문자를 보냈습니다. 안녕히 계세요.".into()],
        tool_calls: vec![tool("bye", "hang_up", "{}")],
    }));
    api.answer(Answer::Ok);
    api.answer(Answer::Status(500));
    api.answer(Answer::Garbage);
    let server = server_with(
        &double,
        json!({"builtin_tools": ["hang_up", "send_sms"]}),
        Some(api.base_url()),
    )
    .await;
    let mut phone = call(&server, "pl-sms").await;
    say(&mut phone, "계좌번호 문자로 보내 주세요").await;
    hear_to_the_end(&mut phone).await;

    let sent = api.messages();
    assert_eq!(
        sent.len(),
        3,
        "too long content is refused before a request: {sent:?}"
    );
    assert_eq!(
        sent[0],
        json!({"agentId": 17, "cdrId": "pl-sms", "messageType": "SMS", "content": secret})
    );
    assert_eq!(
        sent[1],
        json!({"agentId": 17, "cdrId": "pl-sms", "messageType": "LMS", "title": "안내",
               "content": "다시"})
    );
    assert_eq!(api.requests()[0].authorization, format!("Bearer {}", key()));
    let result = |n: usize| {
        let m = last_message(&double, n);
        serde_json::from_str::<Value>(m["content"].as_str().expect("content")).expect("JSON")
    };
    assert_eq!(result(1)["data"]["phoneNumber"], "010****1234");
    assert!(
        result(2)["error"]
            .as_str()
            .unwrap_or("")
            .contains("HTTP 500"),
        "{}",
        result(2)
    );
    assert!(
        result(3)["error"]
            .as_str()
            .unwrap_or("")
            .contains("not readable"),
        "{}",
        result(3)
    );
    assert!(
        result(4)["error"]
            .as_str()
            .unwrap_or("")
            .contains("2001 characters"),
        "{}",
        result(4)
    );
    let (record, _, events) = record(&server, "pl-sms").await;
    let answers: Vec<&Value> = events
        .iter()
        .filter(|(n, d)| n == "tool_result" && d["name"] == "send_sms")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(answers.len(), 4, "{events:?}");
    assert_eq!(answers[0]["ok"], true);
    assert!(
        answers[0]["output"]
            .as_str()
            .unwrap_or("")
            .contains("010****1234")
    );
    assert_eq!(answers[1]["ok"], false);
    assert!(
        !record.to_string().contains("123-456-789")
            && !format!("{events:?}").contains("123-456-789"),
        "the content is not in the record"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_next_sentence_is_synthesized_while_the_current_one_still_streams() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Ok("요금 문의요".into()));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["요금은 삼만 원입니다. ".into(), "안녕히 계세요.".into()],
        tool_calls: vec![tool("bye", "hang_up", "{}")],
    }));
    // The first sentence's speech stays open after its audio, as a server synthesizing in
    // real time would: the second is asked for all the same.
    double.hold_speech(&[true]);
    let server = server(&double, json!({})).await;
    let mut phone = call(&server, "pl-ahead").await;
    say(&mut phone, "요금 문의요").await;
    double
        .wait_for("the second sentence's speech request", |d| {
            d.speech_requests().len() >= 2
        })
        .await;
    let asked: Vec<Value> = double
        .speech_requests()
        .iter()
        .map(|r| r["input"].clone())
        .collect();
    assert_eq!(
        asked,
        [json!("요금은 삼만 원입니다."), json!("안녕히 계세요.")]
    );
    double.release_speech();
    let heard = hear_to_the_end(&mut phone).await;
    // Both sentences, in order and whole (10 ms a character, 32 bytes a ms).
    let expected = (11 + 7) * 10 * 32;
    assert!(heard + 200 >= expected, "heard {heard} of {expected} bytes");
    server.shutdown().await;
}

#[tokio::test]
async fn espeak_speaks_each_sentence_when_the_route_asks_for_it() {
    let double = OpenAiDouble::start(&key()).await;
    double.transcript(Reply::Ok("끊을게요".into()));
    double.answer(Reply::Ok(ChatScript {
        content: vec!["네. ".into(), "안녕히 계세요.".into()],
        tool_calls: vec![tool("bye", "hang_up", "{}")],
    }));
    let server = server(
        &double,
        json!({"greeting": "안녕하세요.", "tts": {"provider": "espeak", "voice": "ko"}}),
    )
    .await;
    let mut phone = call(&server, "pl-espeak").await;
    // The greeting (espeak-ng: about a second of speech at 16 kHz, 32 bytes a ms).
    hear(&mut phone, 10_000).await;
    say(&mut phone, "끊을게요").await;
    let heard = hear_to_the_end(&mut phone).await;
    assert!(heard > 20_000, "both sentences were heard: {heard} bytes");
    assert!(double.speech_requests().is_empty(), "no speech API asked");
    let (_, turns, _) = record(&server, "pl-espeak").await;
    assert!(
        turns
            .iter()
            .any(|t| t["speaker"] == "agent" && t["text"] == "네. 안녕히 계세요."),
        "{turns:?}"
    );
    server.shutdown().await;
}
