//! Text-to-speech: espeak-ng as a subprocess (English and Korean), and an OpenAI-compatible
//! `POST /v1/audio/speech` provider against a local server that follows the documented API
//! (bearer key, JSON body, audio answer), with its error and timeout paths; fixed prompts are
//! rendered at load and cached in the data dir.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use callgate_agent::Catalog;
use callgate_flow::FlowEnv;
use callgate_flow::tts::{self, Cache, TtsError, TtsSettings};
use callgate_server::routes::parse_spec;
use callgate_testkit::{Received, TempDir, cdr, incoming_call, spawn_server_with_catalog};
use serde_json::{Value, json};

/// The environment variable the tests name as `api_key_env`: one cargo sets for every test
/// process (tests cannot set variables: `std::env::set_var` is banned, and unsafe).
const KEY_ENV: &str = "CARGO_PKG_NAME";

/// A speech API: answers 0.5 s of 24 kHz PCM for the right key, 401 otherwise; the input
/// `"slow"` never gets an answer. Keeps the bodies it was sent.
async fn speech_api() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let key = std::env::var(KEY_ENV).expect("cargo sets CARGO_PKG_NAME");
    let app = Router::new().route(
        "/v1/audio/speech",
        post({
            let seen = seen.clone();
            move |headers: HeaderMap, axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                let key = key.clone();
                async move {
                    seen.lock().expect("lock").push(body.clone());
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if auth != format!("Bearer {key}") {
                        return (StatusCode::UNAUTHORIZED, "bad key").into_response();
                    }
                    if body["input"] == "slow" {
                        std::future::pending::<()>().await;
                    }
                    if body["response_format"] != "pcm" {
                        return (StatusCode::BAD_REQUEST, "pcm only here").into_response();
                    }
                    let samples: Vec<u8> = (0..12000)
                        .flat_map(|i: i32| (((i % 50) * 400 - 10000) as i16).to_le_bytes())
                        .collect();
                    samples.into_response()
                }
            }
        }),
    );
    // A redirect to the real one, keeping the method and the body (and, if followed, the key).
    let app = app.route(
        "/moved/v1/audio/speech",
        post(|| async {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, "/v1/audio/speech")],
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("local server");
    let addr = listener.local_addr().expect("address");
    callgate_server::Tasks::new().spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

fn openai(base: &str, key_env: &str) -> TtsSettings {
    toml::from_str(&format!(
        "provider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"tts-test\"\napi_key_env = \"{key_env}\"\ntimeout = \"300ms\"\n"
    ))
    .expect("settings")
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_compatible_provider_follows_the_api_and_reports_errors() {
    let (base, seen) = speech_api().await;
    let dir = TempDir::new("tts-openai");
    let cache = Cache::new(dir.path());
    let provider = openai(&base, KEY_ENV)
        .provider(&client())
        .expect("provider");
    let audio = tts::speak(&cache, provider.as_ref(), "alloy", "Hello there")
        .await
        .expect("speech");
    assert_eq!((audio.rate, audio.samples.len()), (24000, 12000));
    assert_eq!(
        seen.lock().expect("lock")[0],
        json!({"model": "tts-test", "voice": "alloy", "input": "Hello there", "response_format": "pcm"})
    );
    // The second time comes from the cache: the API is not asked again.
    let again = tts::speak(&cache, provider.as_ref(), "alloy", "Hello there")
        .await
        .expect("cached");
    assert_eq!(again, audio);
    assert_eq!(seen.lock().expect("lock").len(), 1);

    let slow = tts::speak(&cache, provider.as_ref(), "alloy", "slow").await;
    assert!(matches!(slow, Err(TtsError::Timeout(_))), "{slow:?}");

    let wrong_key = openai(&base, "CARGO_PKG_VERSION")
        .provider(&client())
        .expect("provider");
    let refused = tts::speak(&cache, wrong_key.as_ref(), "alloy", "Hi").await;
    assert!(
        matches!(&refused, Err(TtsError::Status { status: 401, .. })),
        "{refused:?}"
    );

    let gone = openai("http://127.0.0.1:9", KEY_ENV)
        .provider(&client())
        .expect("provider");
    let failed = tts::speak(&cache, gone.as_ref(), "alloy", "Hi").await;
    assert!(
        matches!(&failed, Err(TtsError::Request { url, .. }) if url.ends_with("/audio/speech")),
        "{failed:?}"
    );

    let missing = openai(&base, "CALLGATE_TEST_NO_SUCH_VARIABLE").provider(&client());
    assert!(
        matches!(&missing, Err(TtsError::Config(m)) if m.contains("CALLGATE_TEST_NO_SUCH_VARIABLE")),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_prompts_are_rendered_at_load_and_errors_name_the_step() {
    let (base, seen) = speech_api().await;
    let dir = TempDir::new("tts-load");
    let file = dir.path().join("flow.toml");
    std::fs::write(
        &file,
        "[[step]]\nname = \"hi\"\nkind = \"say\"\ntext = \"Welcome\"\nvoice = \"nova\"\n",
    )
    .unwrap();
    let env = FlowEnv {
        data_dir: dir.path().to_path_buf(),
        tts: openai(&base, KEY_ENV),
        callbridge: None,
        stt: None,
    };
    let file2 = file.clone();
    let env2 = env.clone();
    let loaded = tokio::task::spawn_blocking(move || callgate_flow::load(&file2, &env2))
        .await
        .unwrap();
    assert!(loaded.is_ok(), "{loaded:?}");
    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "rendered once, at load"
    );
    assert_eq!(seen.lock().expect("lock")[0]["voice"], "nova");
    assert!(
        std::fs::read_dir(dir.path().join("tts-cache"))
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "wav")),
        "cached in the data dir"
    );
    // Private whatever the umask: the directory 0700, each file 0600.
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&dir.path().join("tts-cache")), 0o700);
    for entry in std::fs::read_dir(dir.path().join("tts-cache")).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    // A second load finds it in the cache.
    let (file2, env2) = (file.clone(), env.clone());
    tokio::task::spawn_blocking(move || callgate_flow::load(&file2, &env2))
        .await
        .unwrap()
        .expect("loads");
    assert_eq!(seen.lock().expect("lock").len(), 1);

    std::fs::write(
        &file,
        "[[step]]\nname = \"late\"\nkind = \"say\"\ntext = \"slow\"\n",
    )
    .unwrap();
    let error = tokio::task::spawn_blocking(move || callgate_flow::load(&file, &env))
        .await
        .unwrap()
        .expect_err("the provider timed out");
    let error = error.to_string();
    assert!(
        error.contains("step \"late\": text: speech synthesis timed out"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_api_redirect_is_not_followed() {
    let (base, seen) = speech_api().await;
    let dir = TempDir::new("tts-redirect");
    let file = dir.path().join("flow.toml");
    std::fs::write(
        &file,
        "[[step]]\nname = \"hi\"\nkind = \"say\"\ntext = \"Moved\"\n",
    )
    .unwrap();
    let env = FlowEnv {
        data_dir: dir.path().to_path_buf(),
        tts: openai(&format!("{base}/moved"), KEY_ENV),
        callbridge: None,
        stt: None,
    };
    let error = tokio::task::spawn_blocking(move || callgate_flow::load(&file, &env))
        .await
        .unwrap()
        .expect_err("a redirect is the answer, an error");
    assert!(error.to_string().contains("HTTP 307"), "{error}");
    assert!(
        seen.lock().expect("lock").is_empty(),
        "the key and the text never reached the redirect's target"
    );
}

#[test]
fn espeak_renders_english_and_korean_at_load() {
    let dir = TempDir::new("tts-espeak");
    let file = dir.path().join("flow.toml");
    std::fs::write(
        &file,
        "[[step]]\nname = \"en\"\nkind = \"say\"\ntext = \"Hello\"\n\
         [[step]]\nname = \"ko\"\nkind = \"say\"\ntext = \"안녕하세요\"\nvoice = \"ko\"\n",
    )
    .unwrap();
    let env = FlowEnv {
        data_dir: dir.path().to_path_buf(),
        tts: TtsSettings::default(),
        callbridge: None,
        stt: None,
    };
    let factory = callgate_flow::load(&file, &env).expect("espeak-ng is installed");
    assert_eq!(factory.flow().steps.len(), 2);
    let cached = std::fs::read_dir(dir.path().join("tts-cache"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wav")
        })
        .count();
    assert_eq!(cached, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_with_variables_is_rendered_per_call() {
    let dir = TempDir::new("tts-call");
    let file = dir.path().join("flow.toml");
    std::fs::write(
        &file,
        "[[step]]\nname = \"number\"\nkind = \"say\"\ntext = \"You are calling from {{caller}}\"\n",
    )
    .unwrap();
    let mut catalog = Catalog::builtin();
    callgate_flow::register(
        &mut catalog,
        FlowEnv {
            data_dir: dir.path().to_path_buf(),
            tts: TtsSettings::default(),
            callbridge: None,
            stt: None,
        },
    );
    let server = spawn_server_with_catalog(&catalog, |c| {
        c.routes = vec![
            parse_spec(
                json!({"name": "say", "agent": "flow", "settings": {"file": file}}),
                0,
            )
            .unwrap(),
        ];
    })
    .await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("say-1")).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let mut bytes = 0;
    loop {
        match phone.recv().await {
            Received::Binary(b) => bytes += b.len(),
            Received::Text(t) => {
                assert_eq!(t, r#"{"event":"hangup"}"#);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(bytes > 16000, "at least a second of speech: {bytes} bytes");
    phone.text(cdr("say-1")).await;
    phone.closed().await;
    let record = server.ended_call("say-1").await;
    let id = record["id"].as_str().unwrap();
    let (_, transcript) = server.get(&format!("/api/calls/{id}/transcript")).await;
    assert_eq!(
        transcript["entries"][0]["text"],
        "You are calling from 01099998888"
    );
    assert!(
        !dir.path().join("tts-cache").exists(),
        "per-call speech (a phone number) is not kept on disk"
    );
    server.shutdown().await;
}
