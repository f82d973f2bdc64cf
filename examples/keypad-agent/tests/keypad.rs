//! The keypad example over a real socket: typing over the prompt cuts it, the keys come back
//! as tones the caller hears, the transcript has the exchange, and the call ends after the
//! read-back has played.

use callgate_agent::Catalog;
use callgate_audio::{AudioFormat, dtmf, pcm};
use callgate_server::routes::parse_spec;
use callgate_testkit::{Received, cdr, incoming_call, spawn_server_with_catalog};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_read_back_and_written_to_the_transcript() {
    let mut catalog = Catalog::builtin();
    callgate_example_keypad::register(&mut catalog);
    let server = spawn_server_with_catalog(&catalog, |c| {
        c.routes = vec![
            parse_spec(
                json!({"name": "keys", "agent": "keypad",
                    "settings": {"max_digits": 4, "prompt_ms": 3000}}),
                0,
            )
            .unwrap(),
        ];
    })
    .await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("keypad")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    // The prompt starts; the caller types over it.
    assert!(matches!(phone.recv().await, Received::Binary(_)));
    for digit in ["4", "2", "#"] {
        phone
            .text(json!({"event": "dtmf", "digit": digit}).to_string())
            .await;
    }
    let mut heard = Vec::new();
    loop {
        match phone.recv().await {
            Received::Binary(b) => pcm::decode(AudioFormat::Pcm8000, &b, &mut heard),
            Received::Text(t) => {
                assert_eq!(t, r#"{"event":"hangup"}"#);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    phone.text(cdr("keypad")).await;
    phone.closed().await;
    // The prompt was cut short: far less than its 3 s reached the caller.
    assert!(heard.len() < 8000 * 2, "{} samples", heard.len());
    let mut detector = dtmf::Detector::new(8000);
    let mut keys = Vec::new();
    detector.process(&heard, &mut keys);
    let keys: String = keys.iter().map(|d| d.as_char()).collect();
    assert_eq!(
        keys, "42",
        "the read-back is heard in full before the hangup"
    );

    let record = server.ended_call("keypad").await;
    assert_eq!(record["end_reason"], "agent_hangup");
    assert_eq!(record["route"], "keys");
    assert_eq!(record["usage"], json!({"digits": 2.0}));
    let id = record["id"].as_str().unwrap();
    let (_, transcript) = server.get(&format!("/api/calls/{id}/transcript")).await;
    let turns: Vec<(String, String, bool)> = transcript["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["speaker"].as_str().unwrap().to_owned(),
                e["text"].as_str().unwrap().to_owned(),
                e["interrupted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        turns,
        [
            ("agent".into(), "(prompt tone)".into(), true),
            ("caller".into(), "42".into(), false),
            ("agent".into(), "(read back 42)".into(), false),
        ]
    );
    server.shutdown().await;
}

#[test]
fn bad_settings_are_refused_at_load_naming_the_field() {
    let mut catalog = Catalog::builtin();
    callgate_example_keypad::register(&mut catalog);
    let error = catalog
        .build("keypad", &json!({"max_digits": 0}))
        .err()
        .expect("zero digits");
    assert!(error.to_string().contains("settings.max_digits"), "{error}");
    let error = catalog
        .build("keypad", &json!({"prompt": 1}))
        .err()
        .expect("unknown key");
    assert!(
        error.to_string().contains("unknown field `prompt`"),
        "{error}"
    );
}
