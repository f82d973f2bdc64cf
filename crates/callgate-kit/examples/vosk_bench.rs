//! What vosk costs per live call: N calls that speak Korean in real time (one 20 ms frame per
//! call every 20 ms, each utterance followed by silence and `finish`), through the kit's
//! recogniser (the shared model, the worker pool). Prints, as one JSON line:
//!
//! - `model_rss_mb`: resident memory the model added when it loaded, and `load_ms`;
//! - `cpu_per_call`: process CPU seconds per wall second, divided by N;
//! - `final_p50_ms` / `final_p99_ms` / `final_max_ms`: from an utterance's last frame to its
//!   text (small when the pool keeps up; it grows without bound when it cannot);
//! - `overloaded`: utterances dropped because the pool fell more than 3 s behind;
//! - `realtime`: whether every utterance's text came within 1 s and none was dropped.
//!
//! Usage: `vosk_bench MODEL_DIR CALLS SECONDS` (8 kHz). The pool has one worker per CPU the
//! process may use: run it under `taskset -c 0` to ask what one core can do.
//!
//! `vosk_bench MODEL_DIR cost UTTERANCES`: the same utterance recognised UTTERANCES times as
//! fast as the pool can, one stream at a time; prints `cpu_per_audio_second` (process CPU
//! seconds per second of audio recognised: what one live call that speaks all the time costs,
//! whatever else the machine is doing) and `calls_per_core` (its inverse).
//! bench/vosk.sh runs both.

use std::time::{Duration, Instant};

use callgate_kit::stt::{Stt, SttSettings};

const RATE: u32 = 8000;
const FRAME: usize = 160;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Process CPU time (user + system), seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

async fn korean(http: &reqwest::Client, text: &str) -> Vec<i16> {
    let espeak = callgate_kit::TtsSettings::default()
        .provider(http)
        .expect("espeak-ng is installed");
    let audio = espeak.synthesize(text, "ko").await.expect("speech");
    let pcm = callgate_kit::audio::resampled_pcm(&audio, RATE).expect("resampled");
    pcm.chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// One utterance: a Korean sentence, then 800 ms of silence.
async fn utterance(http: &reqwest::Client) -> Vec<i16> {
    let mut speech = korean(
        http,
        "안녕하세요, 요금 문의 때문에 전화했습니다. 상담원 연결 부탁드립니다.",
    )
    .await;
    speech.extend(std::iter::repeat_n(0i16, RATE as usize * 8 / 10));
    speech
}

/// CPU per second of audio, one stream at a time, as fast as it goes.
async fn cost(model: &str, n: usize) {
    let http = callgate_kit::http::client().expect("client");
    let speech = utterance(&http).await;
    let before = rss_kb();
    let loading = Instant::now();
    let settings = SttSettings {
        provider: "vosk".into(),
        model: model.to_owned(),
        ..Default::default()
    };
    let stt = Stt::build(&settings, &http).expect("the model loads");
    let load_ms = loading.elapsed().as_millis();
    let model_rss_mb = rss_kb().saturating_sub(before) / 1024;
    // A first utterance warms the recogniser's caches; it is not counted.
    let _ = stt.transcribe(&speech, RATE).await;
    let cpu_start = cpu_seconds();
    let started = Instant::now();
    for _ in 0..n {
        // One push (as the pipeline hands over a turn): frames pushed faster than real time
        // would be dropped as falling behind, which is the policy for live calls.
        let text = stt.transcribe(&speech, RATE).await.expect("a text");
        assert!(!text.is_empty(), "the sentence was heard");
    }
    let cpu = cpu_seconds() - cpu_start;
    let audio = (speech.len() * n) as f64 / f64::from(RATE);
    println!(
        "{{\"mode\": \"cost\", \"utterances\": {n}, \"audio_seconds\": {audio:.1}, \
         \"wall_seconds\": {:.1}, \"load_ms\": {load_ms}, \"model_rss_mb\": {model_rss_mb}, \
         \"peak_rss_mb\": {}, \"cpu_per_audio_second\": {:.3}, \"calls_per_core\": {:.1}}}",
        started.elapsed().as_secs_f64(),
        rss_kb() / 1024,
        cpu / audio,
        audio / cpu,
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(2).map(String::as_str) == Some("cost") {
        let (Some(model), Some(n)) = (args.get(1), args.get(3).and_then(|v| v.parse().ok())) else {
            eprintln!("usage: vosk_bench MODEL_DIR cost UTTERANCES");
            std::process::exit(2);
        };
        cost(model, n).await;
        return;
    }
    let (Some(model), Some(calls), Some(seconds)) = (
        args.get(1),
        args.get(2).and_then(|v| v.parse::<usize>().ok()),
        args.get(3).and_then(|v| v.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: vosk_bench MODEL_DIR CALLS SECONDS");
        std::process::exit(2);
    };
    let http = callgate_kit::http::client().expect("client");
    let speech = utterance(&http).await;

    let before = rss_kb();
    let loading = Instant::now();
    let settings = SttSettings {
        provider: "vosk".into(),
        model: model.clone(),
        ..Default::default()
    };
    let stt = Stt::build(&settings, &http).expect("the model loads");
    let load_ms = loading.elapsed().as_millis();
    let model_rss_mb = rss_kb().saturating_sub(before) / 1024;

    let frames_per_utterance = speech.len().div_ceil(FRAME);
    let mut streams: Vec<_> = (0..calls)
        .map(|_| stt.start(RATE).expect("a stream"))
        .collect();
    // Calls start staggered, as real ones do.
    let mut position: Vec<usize> = (0..calls)
        .map(|i| i * frames_per_utterance / calls.max(1))
        .collect();
    // Finishing utterances, each awaited here (a JoinSet: every task is owned by this run).
    let mut finishing = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let cpu_start = cpu_seconds();
    let end = started + Duration::from_secs(seconds);
    while Instant::now() < end {
        tick.tick().await;
        for (i, stream) in streams.iter_mut().enumerate() {
            let at = position[i] * FRAME;
            let frame = &speech[at..(at + FRAME).min(speech.len())];
            stream.push(frame);
            position[i] += 1;
            if position[i] == frames_per_utterance {
                position[i] = 0;
                let done = std::mem::replace(stream, stt.start(RATE).expect("a stream"));
                let last = Instant::now();
                finishing.spawn(async move {
                    let result = done.finish().await;
                    (last.elapsed(), result.is_ok())
                });
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    let mut latencies = Vec::new();
    let mut overloaded = 0;
    while let Some(joined) = finishing.join_next().await {
        let Ok((latency, ok)) = joined else {
            continue;
        };
        if ok {
            latencies.push(latency.as_millis() as u64);
        } else {
            overloaded += 1;
        }
    }
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let (p50, p99, max) = (
        pick(0.5),
        pick(0.99),
        latencies.last().copied().unwrap_or(0),
    );
    println!(
        "{{\"calls\": {calls}, \"workers\": {workers}, \"seconds\": {wall:.1}, \
         \"load_ms\": {load_ms}, \"model_rss_mb\": {model_rss_mb}, \
         \"cpu_per_call\": {:.3}, \"utterances\": {}, \"final_p50_ms\": {p50}, \
         \"final_p99_ms\": {p99}, \"final_max_ms\": {max}, \"overloaded\": {overloaded}, \
         \"realtime\": {}}}",
        cpu / wall / calls as f64,
        latencies.len() + overloaded,
        overloaded == 0 && max < 1000 && !latencies.is_empty(),
    );
}
