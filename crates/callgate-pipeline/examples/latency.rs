//! callgate's own share of the `pipeline` agent's response latency, at N concurrent calls.
//!
//! ```text
//! cargo run --release -p callgate-pipeline --example latency -- [--calls 1,50,200] [--turns 5]
//! ```
//!
//! One process runs a callgate server (the `pipeline` route), the testkit's OpenAI double in
//! benchmark mode (every transcription, chat completion and speech request answered at once:
//! "요금 문의요", a one-sentence answer, its speech) and N phones. Each phone places a
//! CallBridge call at 8 kHz and, `--turns` times, says "요금 문의요" (espeak-ng, rendered once)
//! in real time (a 20 ms frame every 20 ms), then stays silent for 2 s, hearing the answer.
//!
//! The figures are the record's `turn_latency` events: from the end of the caller's turn as
//! the agent detected it (600 ms of silence) to each step, the last being the answer's first
//! frame handed to the call (`first_frame_ms`). With doubles that answer at once, that is
//! callgate's own share: the agent's work, its HTTP requests and answers on loopback (the
//! multipart WAV upload, the event stream, the PCM stream and its resampling), and the
//! scheduling of everything at that load. The phones and the double share the process (and the
//! machine's 2 cores) with the server, so the figures are an upper bound.
//!
//! Prints one Markdown table row per size on stdout.

use std::time::Duration;

use bytes::Bytes;
use callgate_agent::Catalog;
use callgate_kit::AgentEnv;
use callgate_server::routes::parse_spec;
use callgate_testkit::openai::{ChatScript, OpenAiDouble};
use callgate_testkit::{Phone, Received, TestServer, spawn_server_with_catalog};
use serde_json::{Value, json};

const USAGE: &str = "usage: latency [--calls 1,50,200] [--turns 5]";
/// The double's key: the value of PATH (always set; the example sets no variable).
const KEY_ENV: &str = "PATH";

fn main() {
    let (sizes, turns) = match parse(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            std::process::exit(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("latency: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(message) = runtime.block_on(run(sizes, turns)) {
        eprintln!("latency: {message}");
        std::process::exit(1);
    }
}

fn parse(args: impl Iterator<Item = String>) -> Result<(Vec<usize>, usize), String> {
    let mut sizes = vec![1, 50, 200];
    let mut turns = 5;
    let mut args = args;
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--calls" => {
                sizes = value
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|_| format!("--calls: {n:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--turns" => turns = value.parse().map_err(|_| format!("--turns: {value:?}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok((sizes, turns))
}

async fn run(sizes: Vec<usize>, turns: usize) -> Result<(), String> {
    let key = std::env::var(KEY_ENV).map_err(|_| format!("${KEY_ENV} is not set"))?;
    let words = speech("요금 문의요").await?;
    println!(
        "| calls | turns measured | stt p50 / p99 | llm first token p50 / p99 | \
         tts first audio p50 / p99 | **first frame p50 / p99** | max |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for n in sizes {
        let double = OpenAiDouble::start(&key).await;
        double.always(
            "요금 문의요",
            ChatScript::says(&["네, 요금은 삼만 원입니다."]),
        );
        let server = server(&double).await;
        let tasks = callgate_server::Tasks::new();
        // Independent callers: the starts are spread over one turn's cycle (the words and 2 s
        // of silence), so turn ends are spread evenly rather than all in one burst.
        let cycle_ms = (words.len() as u64 + 100) * 20;
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let words = words.clone();
                let url = server.url("/");
                tasks.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(i as u64 * cycle_ms / n as u64)).await;
                    caller(&url, &format!("bench-{n}-{i}"), &words, turns).await
                })
            })
            .collect();
        for h in handles {
            h.await.map_err(|e| e.to_string())??;
        }
        let mut latency: [Vec<u64>; 4] = Default::default();
        for i in 0..n {
            for event in turn_latencies(&server, &format!("bench-{n}-{i}")).await {
                for (j, field) in [
                    "stt_ms",
                    "llm_first_token_ms",
                    "tts_first_audio_ms",
                    "first_frame_ms",
                ]
                .iter()
                .enumerate()
                {
                    if let Some(ms) = event[field].as_u64() {
                        latency[j].push(ms);
                    }
                }
            }
        }
        let cell = |v: &mut Vec<u64>| {
            v.sort_unstable();
            format!("{} / {} ms", quantile(v, 0.5), quantile(v, 0.99))
        };
        let max = latency[3].iter().max().copied().unwrap_or(0);
        let measured = latency[3].len();
        let [stt, llm, tts, first] = &mut latency;
        println!(
            "| {n} | {measured} of {} | {} | {} | {} | **{}** | {max} ms |",
            n * turns,
            cell(stt),
            cell(llm),
            cell(tts),
            cell(first)
        );
        server.shutdown().await;
    }
    Ok(())
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The caller's words as 8 kHz PCM frames of 20 ms.
async fn speech(text: &str) -> Result<Vec<Bytes>, String> {
    let http = callgate_kit::http::client().map_err(|e| e.to_string())?;
    let provider = callgate_kit::TtsSettings::default()
        .provider(&http)
        .map_err(|e| e.to_string())?;
    let audio = provider
        .synthesize(text, "ko")
        .await
        .map_err(|e| e.to_string())?;
    let pcm = callgate_kit::audio::resampled_pcm(&audio, 8000).map_err(|e| e.to_string())?;
    Ok(pcm.chunks(320).map(Bytes::copy_from_slice).collect())
}

async fn server(double: &OpenAiDouble) -> TestServer {
    let api = |extra: Value| {
        let mut v = json!({"base_url": double.base_url(), "api_key_env": KEY_ENV,
                           "timeout": "10s"});
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        v
    };
    let settings = json!({
        "instructions": "You answer calls.",
        "fallback_message": "Sorry, goodbye.",
        "stt": api(json!({"provider": "openai", "model": "whisper", "language": "ko"})),
        "llm": api(json!({"model": "llm"})),
        "tts": api(json!({"provider": "openai", "model": "tts", "voice": "nova"})),
    });
    let mut catalog = Catalog::builtin();
    let dir = callgate_testkit::TempDir::new("pipeline-bench");
    callgate_pipeline::register(
        &mut catalog,
        AgentEnv {
            data_dir: dir.path().to_path_buf(),
            tts: Default::default(),
            callbridge: None,
            stt: None,
        },
    );
    let route = parse_spec(
        json!({"name": "ai", "agent": "pipeline", "settings": settings}),
        0,
    );
    spawn_server_with_catalog(&catalog, move |c| {
        c.routes = route.into_iter().collect();
        c.max_calls = 5000;
    })
    .await
}

/// One call: `turns` times the words then 2 s of silence, in real time; the answer is read
/// (and dropped) as it comes.
async fn caller(url: &str, cdr: &str, words: &[Bytes], turns: usize) -> Result<(), String> {
    let mut phone = Phone::connect(url).await;
    phone
        .text(
            json!({
                "call_config": {"siteId": "1", "caller": "01012341234", "callee": "0701",
                                "cdrId": cdr, "callActionId": "1", "ivrIp": "10.0.0.1:1",
                                "agentId": "17", "agentType": "voice"},
                "audio_format": {"phone_output_audio_format": "PCM_8000",
                                 "phone_input_audio_format": "PCM_8000"}
            })
            .to_string(),
        )
        .await;
    let silence = Bytes::from(vec![0u8; 320]);
    let frames: Vec<Bytes> = (0..turns)
        .flat_map(|_| {
            words
                .iter()
                .cloned()
                .chain(std::iter::repeat_n(silence.clone(), 100))
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut frames = frames.into_iter();
    loop {
        tokio::select! {
            m = phone.recv() => match m {
                Received::Close(..) | Received::Eof => {
                    return Err(format!("{cdr}: the call ended early"));
                }
                _ => {}
            },
            _ = tick.tick() => match frames.next() {
                Some(frame) => phone.binary(frame).await,
                None => {
                    phone.close(1000, "done").await;
                    return Ok(());
                }
            },
        }
    }
}

async fn turn_latencies(server: &TestServer, cdr: &str) -> Vec<Value> {
    let record = server.ended_call(cdr).await;
    let id = record["id"].as_str().unwrap_or_default().to_owned();
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    log["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "agent" && e["detail"]["name"] == "turn_latency")
        .map(|e| e["detail"]["detail"].clone())
        .collect()
}
