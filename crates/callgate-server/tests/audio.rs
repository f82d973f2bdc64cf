//! The audio engine over real sockets: operator playback through the playout clock (checked
//! against sox), clear, barge-in on generated speech, in-band DTMF, the recording, and format
//! conversion at the call's edges.
//!
//! sox and espeak-ng are real tools here (installed by `.ci/run`): sox is the independent
//! oracle for conversion, espeak-ng the source of real speech.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic with its location is the failure report"
)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callgate_agent::{AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun};
use callgate_audio::{AudioFormat, dtmf, pcm, wav};
use callgate_proto::Digit;
use callgate_testkit::audio::{frames, speechlike_pcm16};
use callgate_testkit::{
    Received, TempDir, callbridge_start, cdr, http, incoming_call, spawn_server,
    spawn_server_with_agent,
};
use serde_json::json;

fn tool(name: &str, args: &[&str]) {
    let status = Command::new(name)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{name} must be installed (apt-get install {name}): {e}"));
    assert!(status.success(), "{name} {args:?} failed");
}

/// A WAV of real speech from espeak-ng, as mono samples at `rate`.
fn speech(dir: &Path, text: &str, rate: u32) -> Vec<i16> {
    let raw = dir.join("speech.wav");
    let out = dir.join("speech-8k.wav");
    tool(
        "espeak-ng",
        &["-v", "en-us", "-w", raw.to_str().unwrap(), text],
    );
    tool(
        "sox",
        &[
            raw.to_str().unwrap(),
            "-r",
            &rate.to_string(),
            "-c",
            "1",
            "-b",
            "16",
            out.to_str().unwrap(),
        ],
    );
    wav::read_mono(&out).unwrap().samples
}

fn wav_bytes(rate: u32, samples: &[i16]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut buf, wav::spec(rate, 1)).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    buf.into_inner()
}

fn tone(hz: f64, rate: u32, ms: u32, amplitude: f64) -> Vec<i16> {
    (0..(rate * ms / 1000))
        .map(|i| {
            (amplitude
                * 32767.0
                * (2.0 * std::f64::consts::PI * hz * f64::from(i) / f64::from(rate)).sin())
                as i16
        })
        .collect()
}

/// POST with a binary body.
async fn post_bytes(
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: audio/wav\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(json!(body)))
}

/// Best normalised cross-correlation of `a` and `b` within ±`lag` samples.
fn correlation(a: &[i16], b: &[i16], lag: i64) -> f64 {
    let mut best = 0.0f64;
    for l in -lag..=lag {
        let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..a.len() as i64 {
            let j = i + l;
            if j < 0 || j >= b.len() as i64 {
                continue;
            }
            let (x, y) = (f64::from(a[i as usize]), f64::from(b[j as usize]));
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        if aa > 0.0 && bb > 0.0 {
            best = best.max(ab / (aa * bb).sqrt());
        }
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_played_wav_arrives_paced_in_20ms_frames_and_matches_sox() {
    let server = spawn_server(|c| c.inbound_audio_format = AudioFormat::Ulaw8000).await;
    let dir = TempDir::new("play");
    // 1.5 s at 16 kHz: a chord, so conversion errors would show.
    let src: Vec<i16> = tone(440.0, 16000, 1500, 0.3)
        .iter()
        .zip(tone(1250.0, 16000, 1500, 0.2))
        .map(|(a, b)| a.saturating_add(b))
        .collect();
    let src_path = dir.path().join("src.wav");
    std::fs::write(&src_path, wav_bytes(16000, &src)).unwrap();

    let mut phone = server.phone("/").await;
    phone.text(incoming_call("play")).await;
    phone.recv().await;
    let id = server.call("play").await["id"].as_str().unwrap().to_owned();
    // Before the request: the playout cannot start before it.
    let start = Instant::now();
    let (status, body) = post_bytes(
        server.admin_addr,
        &format!("/api/calls/{id}/play"),
        &wav_bytes(16000, &src),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queued_ms"], 1500);

    let mut got = Vec::new();
    let mut sizes = Vec::new();
    while got.len() < 12000 {
        match phone.recv().await {
            Received::Binary(b) => {
                sizes.push(b.len());
                got.extend_from_slice(&b);
            }
            other => panic!("expected audio, got {other:?}"),
        }
    }
    let span = start.elapsed();
    assert!(
        sizes.iter().all(|&n| n == 160),
        "every frame is 20 ms of mu-law: {sizes:?}"
    );
    assert_eq!(sizes.len(), 75);
    // The clock cannot send faster than real time: with its one frame of slack, frame 75
    // leaves no earlier than 73 × 20 ms after the audio was queued (after `start`).
    assert!(
        span >= Duration::from_millis(1455),
        "sent too fast: {span:?}"
    );

    // sox is the oracle: the same file converted to 8 kHz mu-law by sox.
    let sox_out = dir.path().join("sox.ul");
    tool(
        "sox",
        &[
            src_path.to_str().unwrap(),
            "-r",
            "8000",
            "-c",
            "1",
            "-e",
            "u-law",
            "-t",
            "raw",
            sox_out.to_str().unwrap(),
        ],
    );
    let sox_bytes = std::fs::read(&sox_out).unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    pcm::decode(AudioFormat::Ulaw8000, &got, &mut ours);
    pcm::decode(AudioFormat::Ulaw8000, &sox_bytes, &mut theirs);
    let n = ours.len().min(theirs.len());
    let c = correlation(&ours[400..n - 400], &theirs[400..n - 400], 4);
    assert!(c > 0.99, "our conversion matches sox's: correlation {c}");
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_stops_the_audio_within_one_frame() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("clear")).await;
    phone.recv().await;
    let id = server.call("clear").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = post_bytes(
        server.admin_addr,
        &format!("/api/calls/{id}/play"),
        &wav_bytes(8000, &tone(300.0, 8000, 5000, 0.3)),
    )
    .await;
    assert_eq!(status, 200);
    let mut before = 0;
    while before < 10 {
        if let Received::Binary(_) = phone.recv().await {
            before += 1;
        }
    }
    let (status, cleared) = server.post(&format!("/api/calls/{id}/clear"), "").await;
    assert_eq!(status, 200, "{cleared}");
    let played = cleared["played_ms"].as_u64().unwrap();
    let dropped = cleared["dropped_ms"].as_u64().unwrap();
    assert_eq!(played + dropped, 5000, "{cleared}");
    // A marker through the echo agent: everything before it was sent before the clear.
    phone.binary(vec![42u8; 320]).await;
    let mut after = 0;
    loop {
        match phone.recv().await {
            Received::Binary(b) if b.iter().all(|&x| x == 42) => break,
            Received::Binary(_) => after += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Exactly what the server says was played reached the phone, and nothing after the clear
    // (the marker came next): the clear took effect at once.
    assert_eq!(
        (before + after) * 20,
        played,
        "played_ms is exactly what the phone got"
    );
    phone.close(1000, "bye").await;
    server.shutdown().await;
}

/// Plays a long prompt and reports what it hears.
struct Talker {
    seen: Arc<Mutex<Vec<AgentEvent>>>,
}

impl AgentFactory for Talker {
    fn name(&self) -> &str {
        "talker"
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        let seen = self.seen.clone();
        Box::pin(async move {
            io.send(AgentCommand::Answer).await?;
            let rate = io.call.output_format.sample_rate();
            let prompt = pcm::encode(io.call.output_format, &tone(500.0, rate, 6000, 0.3));
            let sender = io.sender();
            let mut offset = 0;
            let mut sending = true;
            loop {
                let chunk = prompt.slice(offset..(offset + 3200).min(prompt.len()));
                tokio::select! {
                    // Events first: a well-behaved agent stops talking when told.
                    biased;
                    event = io.recv() => match event {
                        Some(AgentEvent::Audio(_)) => {}
                        Some(AgentEvent::Ended(_)) | None => return Ok(()),
                        Some(e) => {
                            if matches!(e, AgentEvent::BargeIn { .. }) {
                                sending = false;
                            }
                            seen.lock().unwrap().push(e);
                        }
                    },
                    // Waits while the playout is full (backpressure).
                    sent = sender.send(AgentCommand::Audio(chunk.clone())),
                        if sending && !chunk.is_empty() =>
                    {
                        sent?;
                        offset += chunk.len();
                    }
                }
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_clears_the_agent_when_the_caller_speaks() {
    let dir = TempDir::new("barge");
    let words = speech(
        dir.path(),
        "hello, I would like to speak to a person please",
        8000,
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = spawn_server_with_agent(Arc::new(Talker { seen: seen.clone() }), |c| {
        c.vad = Some(callgate_audio::vad::VadConfig::default());
    })
    .await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("barge")).await;
    phone.recv().await;
    // The caller listens to the prompt for a while (sending silence, as phones do)...
    let silence = vec![0u8; 320];
    let mut received_bytes = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..25 {
        tick.tick().await;
        phone.binary(silence.clone()).await;
    }
    // ...then talks over it.
    let spoken = pcm::encode(AudioFormat::Pcm8000, &words);
    for f in frames(&spoken, 320) {
        tick.tick().await;
        phone.binary(f).await;
    }
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("barge")).await;
    loop {
        match phone.recv().await {
            Received::Binary(b) => received_bytes += b.len(),
            Received::Close(..) | Received::Eof => break,
            Received::Text(_) => {}
        }
    }
    let events = seen.lock().unwrap().clone();
    let started = events.iter().find_map(|e| match e {
        AgentEvent::SpeechStarted { at_ms } => Some(*at_ms),
        _ => None,
    });
    let barge = events.iter().find_map(|e| match e {
        AgentEvent::BargeIn(i) => Some((i.played_ms, i.dropped_ms)),
        _ => None,
    });
    let at_ms = started.expect("speech was detected");
    assert!(
        (400..1500).contains(&at_ms),
        "speech starts after the 500 ms of silence: {at_ms}"
    );
    let (played, dropped) = barge.expect("the caller barged in");
    assert!(dropped > 0);
    // The caller heard exactly what the server says was played: nothing after the barge-in.
    assert_eq!(
        received_bytes as u64 / 16,
        played,
        "heard {received_bytes} bytes"
    );
    let record = server.ended_call("barge").await;
    let id = record["id"].as_str().unwrap();
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    assert!(
        log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "barge_in")
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inband_dtmf_is_detected_from_tones_and_not_from_speech() {
    let dir = TempDir::new("dtmf");
    let server = spawn_server(|c| c.inband_dtmf = true).await;
    let mut audio = Vec::new();
    for c in "159#".chars() {
        audio.extend(dtmf::tone(Digit::from_char(c).unwrap(), 100, 8000, 0.2));
        audio.extend(vec![0i16; 800]);
    }
    let words = speech(
        dir.path(),
        "one five nine, my account number is four two",
        8000,
    );
    for (id, samples, expected) in [("tones", audio, "159#"), ("speech", words, "")] {
        let mut phone = server.phone("/").await;
        phone.text(incoming_call(id)).await;
        phone.recv().await;
        for f in frames(&pcm::encode(AudioFormat::Pcm8000, &samples), 320) {
            phone.binary(f).await;
        }
        phone.text(r#"{"event":"hangup"}"#).await;
        phone.text(cdr(id)).await;
        phone.closed().await;
        let record = server.ended_call(id).await;
        assert_eq!(record["dtmf"], expected, "{id}");
    }
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"callgate_dtmf_total{source="inband"} 4"#),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recording_keeps_the_caller_exactly_and_the_agent_as_played() {
    let server = spawn_server(|c| c.record = true).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("rec")).await;
    phone.recv().await;
    let audio = speechlike_pcm16(2000, 8000, 3);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut echoed = 0;
    for f in frames(&audio, 320) {
        tick.tick().await;
        phone.binary(f).await;
    }
    while echoed < audio.len() {
        if let Received::Binary(b) = phone.recv().await {
            echoed += b.len();
        }
    }
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("rec")).await;
    phone.closed().await;
    let record = server.ended_call("rec").await;
    assert_eq!(record["recording"], true);
    let id = record["id"].as_str().unwrap();
    let (status, body) = http::request(
        server.admin_addr,
        "GET",
        &format!("/api/calls/{id}/recording"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let _ = body; // text view of binary data; fetch the bytes from disk for exactness.
    let path = server
        .config
        .data_dir
        .join("recordings")
        .join(format!("{id}.wav"));
    let reader = hound::WavReader::open(&path).unwrap();
    assert_eq!(reader.spec().channels, 2);
    assert_eq!(reader.spec().sample_rate, 8000);
    let samples: Vec<i16> = reader.into_samples::<i16>().map(Result::unwrap).collect();
    let left: Vec<u8> = samples
        .iter()
        .step_by(2)
        .flat_map(|s| s.to_le_bytes())
        .collect();
    let right: Vec<i16> = samples.iter().skip(1).step_by(2).copied().collect();
    assert!(
        left[..audio.len()] == audio[..],
        "the caller channel is byte-identical"
    );
    let mut sent = Vec::new();
    pcm::le_bytes_to_samples(&audio, &mut sent);
    // The agent channel holds every echoed frame as played: intact, in order, placed on the
    // call's clock (silence between them). Where exactly depends on the phone's pacing, so
    // the check is order and content, not a fixed offset.
    let mut at = 0;
    for (k, frame) in sent.chunks(160).enumerate() {
        let found = (at..right.len().saturating_sub(159))
            .find(|&i| right[i..i + 160] == *frame)
            .unwrap_or_else(|| panic!("echoed frame {k} is in the agent channel after {at}"));
        at = found + 160;
    }
    let (status, err) = server
        .get("/api/calls/0190a5d0-ac96-774b-bcce-b302099a8057/recording")
        .await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "call_not_found");
    server.shutdown().await;
}

/// An echo agent that works at 16 kHz whatever the call's format.
struct WideEcho;

impl AgentFactory for WideEcho {
    fn name(&self) -> &str {
        "wide-echo"
    }

    fn audio_format(&self) -> Option<AudioFormat> {
        Some(AudioFormat::Pcm16000)
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        Box::pin(async move {
            assert_eq!(io.call.input_format, AudioFormat::Pcm16000);
            io.send(AgentCommand::Answer).await?;
            while let Some(e) = io.recv().await {
                match e {
                    AgentEvent::Audio(b) => io.send(AgentCommand::Audio(b)).await?,
                    AgentEvent::Ended(_) => break,
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_converts_at_its_edges() {
    let server = spawn_server_with_agent(Arc::new(WideEcho), |_| {}).await;
    let mut phone = server.phone("/").await;
    // CallBridge with different formats each way: the caller speaks 8 kHz PCM, hears mu-law.
    phone
        .text(callbridge_start("edges").replace(
            r#""phone_input_audio_format":"PCM_8000""#,
            r#""phone_input_audio_format":"ULAW_8000""#,
        ))
        .await;
    phone.recv().await;
    let input = tone(700.0, 8000, 1000, 0.4);
    let bytes = pcm::encode(AudioFormat::Pcm8000, &input);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for f in frames(&bytes, 320) {
        tick.tick().await;
        phone.binary(f).await;
    }
    let mut got = Vec::new();
    while got.len() < 7000 {
        match phone.recv().await {
            Received::Binary(b) => {
                assert!(b.len() <= 160, "mu-law frames of at most 20 ms");
                got.extend_from_slice(&b);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut heard = Vec::new();
    pcm::decode(AudioFormat::Ulaw8000, &got, &mut heard);
    let c = correlation(&input[400..6000], &heard[400..6000], 200);
    assert!(
        c > 0.98,
        "8k PCM -> 16k agent -> 8k mu-law keeps the tone: {c}"
    );
    phone.close(1000, "bye").await;
    server.shutdown().await;
}
