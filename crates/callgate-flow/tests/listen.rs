//! Flows that listen, over real sockets: a phone calls a server whose flow has a `gather` with
//! `input = ["dtmf", "speech"]`; the caller's words are real Korean speech from espeak-ng,
//! recognised by the testkit's OpenAI double (an OpenAI-compatible
//! `POST /v1/audio/transcriptions`) or, with the `vosk` feature, by vosk in process with the
//! real Korean model ($CALLGATE_VOSK_MODEL). The record is read back through the admin API.
//!
//! Prompts are DTMF tones (the menu is a 5, the billing branch a 7, the agent branch an 8,
//! no_match a 9) so the phone can tell exactly what it heard. The API key is the value of
//! `PATH` (tests cannot set variables; PATH is always set).

use std::path::Path;

use callgate_agent::Catalog;
use callgate_audio::{AudioFormat, dtmf, pcm};
use callgate_flow::{FlowEnv, SttSettings};
use callgate_proto::Digit;
use callgate_server::routes::parse_spec;
use callgate_testkit::openai::{OpenAiDouble, Reply};
use callgate_testkit::{Phone, Received, TempDir, TestServer, cdr, incoming_call};
use serde_json::{Value, json};

fn tone_wav(dir: &Path, name: &str, digit: char, ms: u32) {
    let digit = Digit::from_char(digit).expect("a key");
    let samples = dtmf::tone(digit, ms, 16000, 0.25);
    callgate_audio::wav::write_mono(&dir.join(name), 16000, &samples).expect("write wav");
}

/// The menu: "press 1 or say 요금 / 청구 for billing, say 상담원 (or 네) for an agent".
fn menu(expect: &str, retries: u32) -> String {
    format!(
        r#"
[[step]]
name = "menu"
kind = "gather"
play = "five.wav"
input = ["dtmf", "speech"]
on = {{ "1" = "billing" }}
expect = {{ {expect} }}
end_of_speech = "400ms"
first_digit_timeout = "5s"
retries = {retries}
no_match = "sorry"

[[step]]
name = "billing"
kind = "play"
file = "seven.wav"
next = "bye"

[[step]]
name = "agent"
kind = "play"
file = "eight.wav"
next = "bye"

[[step]]
name = "sorry"
kind = "play"
file = "nine.wav"

[[step]]
name = "bye"
kind = "hangup"
"#
    )
}

const BILLING: &str = r#"billing = ["요금", "청구", "billing"], agent = ["상담원", "네"]"#;

/// A server running `flow` with `stt` as the server's `[stt]`.
async fn server(dir: &TempDir, flow: &str, stt: SttSettings, menu_ms: u32) -> TestServer {
    tone_wav(dir.path(), "five.wav", '5', menu_ms);
    tone_wav(dir.path(), "seven.wav", '7', 200);
    tone_wav(dir.path(), "eight.wav", '8', 200);
    tone_wav(dir.path(), "nine.wav", '9', 200);
    let file = dir.path().join("flow.toml");
    std::fs::write(&file, flow).expect("write flow");
    let mut catalog = Catalog::builtin();
    callgate_flow::register(
        &mut catalog,
        FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
            stt: Some(stt),
        },
    );
    let data = dir.path().to_path_buf();
    callgate_testkit::spawn_server_with_catalog(&catalog, move |c| {
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

fn openai(double: &OpenAiDouble) -> SttSettings {
    SttSettings {
        base_url: double.base_url().to_owned(),
        model: "whisper-test".into(),
        language: Some("ko".into()),
        api_key_env: Some("PATH".into()),
        ..Default::default()
    }
}

/// Real Korean speech (espeak-ng) at 8 kHz, then `silence_ms` of silence, as 20 ms frames.
async fn say(phone: &mut Phone, text: &str, silence_ms: usize) {
    let http = callgate_kit::http::client().expect("client");
    let espeak = callgate_kit::TtsSettings::default()
        .provider(&http)
        .expect("espeak-ng is installed");
    let audio = espeak.synthesize(text, "ko").await.expect("speech");
    let pcm = callgate_kit::audio::resampled_pcm(&audio, 8000).expect("resampled");
    for frame in pcm
        .chunks(320)
        .chain(std::iter::repeat_n(&[0u8; 320][..], silence_ms / 20))
    {
        phone.binary(frame.to_vec()).await;
    }
}

/// Answers the call and reads until the menu's tone (5) is heard.
async fn until_the_menu(phone: &mut Phone, session: &str) -> usize {
    phone.text(incoming_call(session)).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
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
    samples.len()
}

/// The keys heard until the server hangs up, and how many samples.
async fn hear_to_the_hangup(phone: &mut Phone) -> (String, usize) {
    let mut samples = Vec::new();
    loop {
        match phone.recv().await {
            Received::Binary(b) => pcm::decode(AudioFormat::Pcm8000, &b, &mut samples),
            Received::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["event"] == "hangup" {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut detector = dtmf::Detector::new(8000);
    let mut keys = Vec::new();
    detector.process(&samples, &mut keys);
    (keys.iter().map(|d| d.as_char()).collect(), samples.len())
}

/// The menu step's end (its result and next), and the call's transcript.
async fn outcome(server: &TestServer, session: &str) -> (Value, Vec<(String, String)>) {
    let record = server.ended_call(session).await;
    let id = record["id"].as_str().expect("id");
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    let end = log["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["detail"])
        .find(|d| d["step"] == "menu" && d["phase"] == "end")
        .cloned()
        .expect("the menu's end");
    let (_, t) = server.get(&format!("/api/calls/{id}/transcript")).await;
    let turns = t["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["speaker"].as_str().unwrap_or("").to_owned(),
                e["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    (end, turns)
}

async fn hang_up(phone: &mut Phone, session: &str) {
    phone.text(cdr(session)).await;
    phone.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn korean_speech_over_the_menu_cuts_it_and_picks_the_billing_branch() {
    let double = OpenAiDouble::start(&std::env::var("PATH").expect("PATH")).await;
    double.transcript(Reply::Ok("요금 문의요.".into()));
    let dir = TempDir::new("listen-billing");
    let server = server(&dir, &menu(BILLING, 0), openai(&double), 4000).await;
    let mut phone = server.phone("/").await;
    let before = until_the_menu(&mut phone, "ko-1").await;
    say(&mut phone, "요금 문의요", 600).await;
    let (keys, after) = hear_to_the_hangup(&mut phone).await;
    hang_up(&mut phone, "ko-1").await;
    assert_eq!(
        keys.trim_start_matches('5'),
        "7",
        "the billing branch plays, the menu does not go on"
    );
    assert!(
        before + after < 8000 * 4,
        "the 4 s menu was cut when the caller spoke: {} samples",
        before + after
    );
    let stt = double.stt_requests();
    assert_eq!(stt.len(), 1, "{stt:?}");
    assert_eq!(
        (
            stt[0].model.as_str(),
            stt[0].language.as_deref(),
            stt[0].rate
        ),
        ("whisper-test", Some("ko"), 8000)
    );
    assert!(
        stt[0].samples > 8000 / 2,
        "the utterance was sent whole: {} samples",
        stt[0].samples
    );
    let (end, turns) = outcome(&server, "ko-1").await;
    assert_eq!(end["next"], "billing", "{end}");
    assert_eq!(end["input"], "speech");
    assert_eq!(end["match"], "billing");
    assert_eq!(end["transcript"], "요금 문의요.");
    assert!(
        turns.contains(&("caller".into(), "요금 문의요.".into())),
        "the caller's words are in the transcript: {turns:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_speech_is_no_match_and_keys_still_work() {
    let double = OpenAiDouble::start(&std::env::var("PATH").expect("PATH")).await;
    double.transcript(Reply::Ok("날씨가 좋네요".into()));
    let dir = TempDir::new("listen-nomatch");
    let server = server(&dir, &menu(BILLING, 0), openai(&double), 300).await;

    let mut phone = server.phone("/").await;
    until_the_menu(&mut phone, "ko-2").await;
    say(&mut phone, "날씨가 좋네요", 600).await;
    let (keys, _) = hear_to_the_hangup(&mut phone).await;
    hang_up(&mut phone, "ko-2").await;
    assert_eq!(keys.trim_start_matches('5'), "9", "no_match plays");
    let (end, turns) = outcome(&server, "ko-2").await;
    assert_eq!(end["next"], "sorry", "{end}");
    assert_eq!(end["outcome"], "no_match");
    assert_eq!(end["transcript"], "날씨가 좋네요");
    assert!(turns.contains(&("caller".into(), "날씨가 좋네요".into())));

    let mut phone = server.phone("/").await;
    until_the_menu(&mut phone, "ko-3").await;
    phone
        .text(json!({"event": "dtmf", "digit": "1"}).to_string())
        .await;
    let (keys, _) = hear_to_the_hangup(&mut phone).await;
    hang_up(&mut phone, "ko-3").await;
    assert_eq!(keys.trim_start_matches('5'), "7", "key 1 is billing");
    let (end, _) = outcome(&server, "ko-3").await;
    assert_eq!(end["digits"], "1", "{end}");
    assert_eq!(
        double.stt_requests().len(),
        1,
        "no speech, no transcription"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_recogniser_is_in_the_record_and_the_caller_is_asked_again() {
    let double = OpenAiDouble::start(&std::env::var("PATH").expect("PATH")).await;
    double.transcript(Reply::Status(503));
    double.transcript(Reply::Ok("청구서 문의".into()));
    let dir = TempDir::new("listen-503");
    let server = server(&dir, &menu(BILLING, 1), openai(&double), 300).await;
    let mut phone = server.phone("/").await;
    until_the_menu(&mut phone, "ko-4").await;
    say(&mut phone, "요금", 600).await;
    // The retry plays the menu again; speak once it has started.
    double
        .wait_for("the first request", |d| d.stt_requests().len() == 1)
        .await;
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
    say(&mut phone, "청구서 문의", 600).await;
    let (keys, _) = hear_to_the_hangup(&mut phone).await;
    hang_up(&mut phone, "ko-4").await;
    assert_eq!(keys.trim_start_matches('5'), "7");
    let record = server.ended_call("ko-4").await;
    let id = record["id"].as_str().expect("id");
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    let details: Vec<&Value> = log["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["detail"])
        .filter(|d| d["name"] == "flow_step" && d["step"] == "menu")
        .collect();
    let error = details
        .iter()
        .find(|d| d["phase"] == "error")
        .expect("the failure is recorded");
    assert!(
        error["error"].as_str().unwrap_or("").contains("503"),
        "{error}"
    );
    let retry = details
        .iter()
        .find(|d| d["phase"] == "retry")
        .expect("a retry");
    assert_eq!(retry["outcome"], "stt_error");
    let end = details.iter().find(|d| d["phase"] == "end").expect("end");
    assert_eq!(end["match"], "billing", "{end}");
    server.shutdown().await;
}

/// With the real recogniser: vosk and the Korean model in process.
#[cfg(feature = "vosk")]
mod vosk {
    use super::*;

    fn vosk() -> SttSettings {
        SttSettings {
            provider: "vosk".into(),
            model: std::env::var("CALLGATE_VOSK_MODEL")
                .expect("the vosk tests need CALLGATE_VOSK_MODEL: eval \"$(scripts/fetch-vosk)\""),
            ..Default::default()
        }
    }

    /// espeak-ng's Korean is robotic: the small model makes out "네" and little else (see
    /// callgate-kit's tests/vosk.rs), so the agent branch listens for it too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vosk_hears_korean_through_a_real_call_and_picks_the_branch() {
        let dir = TempDir::new("listen-vosk");
        let server = server(&dir, &menu(BILLING, 0), vosk(), 300).await;
        let mut phone = server.phone("/").await;
        until_the_menu(&mut phone, "vosk-1").await;
        say(&mut phone, "네 네", 600).await;
        let (keys, _) = hear_to_the_hangup(&mut phone).await;
        hang_up(&mut phone, "vosk-1").await;
        assert_eq!(keys.trim_start_matches('5'), "8", "the agent branch plays");
        let (end, turns) = outcome(&server, "vosk-1").await;
        assert_eq!(end["match"], "agent", "{end}");
        assert_eq!(end["transcript"], "네 네");
        assert!(
            turns.contains(&("caller".into(), "네 네".into())),
            "{turns:?}"
        );

        let mut phone = server.phone("/").await;
        until_the_menu(&mut phone, "vosk-2").await;
        say(&mut phone, "어머니", 600).await;
        let (keys, _) = hear_to_the_hangup(&mut phone).await;
        hang_up(&mut phone, "vosk-2").await;
        assert_eq!(keys.trim_start_matches('5'), "9", "no_match plays");
        let (end, _) = outcome(&server, "vosk-2").await;
        assert_eq!(end["outcome"], "no_match", "{end}");
        server.shutdown().await;
    }
}

#[test]
fn the_korean_demo_menu_listens_when_the_server_has_a_recogniser() {
    let dir = TempDir::new("menu-ko");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flows/menu-ko.toml");
    for stt in [None, Some(SttSettings::default())] {
        let listens = stt.is_some();
        let env = FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
            stt,
        };
        let factory = callgate_flow::load(&path, &env).expect("menu-ko loads");
        let menu = factory
            .flow()
            .steps
            .iter()
            .find(|s| s.name == "menu")
            .expect("a menu");
        let callgate_flow::spec::StepKind::Gather(g) = &menu.kind else {
            panic!("the menu is a gather");
        };
        assert!(g.dtmf);
        assert_eq!(g.speech.is_some(), listens, "speech only with a recogniser");
        if let Some(listen) = &g.speech {
            let pick = |said: &str| listen.pick(said).map(|(key, _)| key.to_owned());
            assert_eq!(pick("메시지 남길게요").as_deref(), Some("message-intro"));
            assert_eq!(pick("에코 테스트요").as_deref(), Some("echo-intro"));
            assert_eq!(pick("제 전화번호요").as_deref(), Some("number"));
            assert_eq!(pick("안녕하세요"), None);
        }
    }
}
