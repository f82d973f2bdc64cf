//! `callgate sim` and `callgate load` against the real server.

use std::process::Command;
use std::time::Duration;

use callgate_audio::wav;
use callgate_phone::load::{self, LoadOptions, Mix};
use callgate_phone::sim::{self, SimOptions, Source, Timeline};
use callgate_proto::{AudioFormat, Digit, Protocol};
use callgate_testkit::{TempDir, spawn_server};

fn opts(server: &callgate_testkit::TestServer, id: &str) -> SimOptions {
    SimOptions {
        url: server.url("/"),
        call_id: id.into(),
        ..SimOptions::default()
    }
}

#[tokio::test]
async fn sim_plays_a_tone_with_dtmf_records_the_echo_and_sends_a_consistent_cdr() {
    let server = spawn_server(|_| {}).await;
    let dir = TempDir::new("sim");
    let recording = dir.path().join("heard.wav");
    let mut timeline = Vec::new();
    let summary = sim::run(
        &SimOptions {
            source: Source::Tone {
                hz: 440.0,
                duration: Duration::from_secs(2),
            },
            dtmf: vec![
                (Digit::D4, Duration::from_millis(500)),
                (Digit::Pound, Duration::from_secs(1)),
            ],
            record: Some(recording.clone()),
            ..opts(&server, "sim-tone")
        },
        |e| timeline.push(e.clone()),
    )
    .await
    .unwrap();
    assert_eq!(summary.frames_sent, 100);
    assert_eq!(summary.frames_received, 100);
    assert_eq!(summary.audio_received_ms, 2000);
    assert_eq!(
        summary.rtt.unwrap().samples,
        100,
        "every frame echoed and matched"
    );
    assert_eq!(summary.ended_by, "caller");
    assert_eq!(summary.close_code, 1000);
    let kinds: Vec<&str> = timeline
        .iter()
        .map(|e| match e {
            Timeline::Connected { .. } => "connected",
            Timeline::Answered { .. } => "answered",
            Timeline::AudioStarted { .. } => "audio",
            Timeline::DtmfSent { .. } => "dtmf",
            Timeline::CallerHangup { .. } => "hangup",
            Timeline::CdrSent { .. } => "cdr",
            Timeline::Closed { .. } => "closed",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "connected",
            "answered",
            "audio",
            "dtmf",
            "dtmf",
            "hangup",
            "cdr",
            "closed"
        ]
    );

    // The recording holds the echoed tone on the call's time axis.
    let heard = wav::read_mono(&recording).unwrap();
    assert_eq!(heard.rate, 8000);
    let expected = sim::prepare_audio(
        &Source::Tone {
            hz: 440.0,
            duration: Duration::from_secs(2),
        },
        AudioFormat::Pcm8000,
    )
    .unwrap();
    let mut sent = Vec::new();
    for f in &expected {
        callgate_audio::pcm::le_bytes_to_samples(f, &mut sent);
    }
    let start = heard.samples.len() - sent.len();
    assert!(
        heard.samples[start..] == sent[..],
        "the echo is recorded intact"
    );
    assert!(
        heard.samples[..start].iter().all(|&s| s == 0),
        "before the audio: silence"
    );

    let record = server.ended_call("sim-tone").await;
    assert_eq!(record["dtmf"], "4#");
    assert_eq!(record["end_reason"], "peer_hangup");
    assert_eq!(record["cdr"]["sessionId"], "sim-tone");
    assert_eq!(record["cdr"]["disposition"], "ANSWERED");
    assert_eq!(record["cdr"]["hangupCauseCode"], 16);
    assert_eq!(record["cdr"]["hangupBy"], "caller");
    server.shutdown().await;
}

#[tokio::test]
async fn sim_says_the_callee_hung_up_when_the_server_did() {
    let server = spawn_server(|_| {}).await;
    let options = SimOptions {
        source: Source::Tone {
            hz: 440.0,
            duration: Duration::from_secs(30),
        },
        ..opts(&server, "sim-bye")
    };
    let hang_up = async {
        let live = server.call("sim-bye").await;
        let id = live["id"].as_str().expect("id");
        let (status, body) = server.post(&format!("/api/calls/{id}/hangup"), "").await;
        assert_eq!(status, 200, "{body}");
    };
    let (summary, ()) = tokio::join!(sim::run(&options, |_| {}), hang_up);
    summary.expect("sim");
    let record = server.ended_call("sim-bye").await;
    assert_eq!(record["end_reason"], "operator_hangup", "{record}");
    assert_eq!(record["cdr"]["hangupBy"], "callee", "{record}");
    server.shutdown().await;
}

#[tokio::test]
async fn sim_plays_twilio_media_streams() {
    let server = spawn_server(|_| {}).await;
    let mut timeline = Vec::new();
    let summary = sim::run(
        &SimOptions {
            url: server.url("/twilio"),
            protocol: Protocol::Twilio,
            send_format: AudioFormat::Ulaw8000,
            receive_format: AudioFormat::Ulaw8000,
            caller: "+14155550100".into(),
            callee: "+14155550199".into(),
            custom: vec![("campaign".into(), "spring".into())],
            source: Source::Tone {
                hz: 440.0,
                duration: Duration::from_secs(1),
            },
            dtmf: vec![(Digit::D9, Duration::from_millis(300))],
            ..opts(&server, "CAsim")
        },
        |e| timeline.push(e.clone()),
    )
    .await
    .unwrap();
    assert_eq!(summary.protocol, "twilio");
    assert_eq!(summary.frames_sent, 50);
    assert_eq!(summary.frames_received, 50);
    assert_eq!(
        summary.rtt.unwrap().samples,
        50,
        "every frame echoed byte-exact"
    );
    assert_eq!(
        (summary.ended_by.as_str(), summary.close_code),
        ("caller", 1000)
    );
    // Marks were returned, not reported as unexpected.
    assert!(
        !timeline
            .iter()
            .any(|e| matches!(e, Timeline::Unexpected { .. })),
        "{timeline:?}"
    );
    let record = server.ended_call("CAsim").await;
    assert_eq!(record["protocol"], "twilio");
    assert_eq!(record["caller"], "+14155550100");
    assert_eq!(record["callee"], "+14155550199");
    assert_eq!(record["dtmf"], "9");
    assert_eq!(record["end_reason"], "peer_hangup");
    assert_eq!(
        record["call_config"]["customParameters"]["campaign"],
        "spring"
    );
    // Twilio carries mu-law only: another format is refused before dialling.
    let err = sim::run(
        &SimOptions {
            protocol: Protocol::Twilio,
            ..opts(&server, "CAbad")
        },
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("ULAW_8000"), "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn sim_converts_any_wav_to_the_call_format() {
    let server = spawn_server(|c| c.inbound_audio_format = AudioFormat::Ulaw8000).await;
    let dir = TempDir::new("wav");
    let path = dir.path().join("in.wav");
    // 1.5 s of 44.1 kHz stereo 24-bit.
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44100,
        bits_per_sample: 24,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for i in 0..(44100 * 3 / 2) {
        let v =
            ((i as f64 * 2.0 * std::f64::consts::PI * 500.0 / 44100.0).sin() * 4_000_000.0) as i32;
        w.write_sample(v).unwrap();
        w.write_sample(v).unwrap();
    }
    w.finalize().unwrap();
    let summary = sim::run(
        &SimOptions {
            source: Source::Wav(path),
            send_format: AudioFormat::Ulaw8000,
            receive_format: AudioFormat::Ulaw8000,
            ..opts(&server, "sim-wav")
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(summary.frames_sent, 75);
    assert_eq!(summary.bytes_sent, 12000, "1.5 s of 8 kHz mu-law");
    assert_eq!(summary.bytes_received, 12000);
    server.shutdown().await;
}

#[tokio::test]
async fn sim_misbehaves_on_purpose() {
    let server = spawn_server(|c| {
        c.max_message_size = 64 * 1024;
        c.cdr_timeout = Duration::from_millis(500);
    })
    .await;
    let garbage = sim::run(
        &SimOptions {
            garbage_first: true,
            ..opts(&server, "g")
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(garbage.close_code, 1007);
    assert!(garbage.close_reason.starts_with("invalid JSON"));

    let oversize = sim::run(
        &SimOptions {
            oversize: true,
            source: Source::Tone {
                hz: 300.0,
                duration: Duration::from_millis(200),
            },
            protocol: Protocol::CallBridge,
            ..opts(&server, "o")
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(oversize.close_code, 1009);
    assert_eq!(server.ended_call("o").await["end_reason"], "protocol_error");

    let no_cdr = sim::run(
        &SimOptions {
            no_cdr: true,
            hangup_at: Some(Duration::from_millis(100)),
            ..opts(&server, "n")
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        no_cdr.close_code, 1000,
        "the server gives up on the CDR and closes"
    );
    let id = server.ended_call("n").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, events) = server.get(&format!("/api/calls/{id}/events")).await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "cdr_missing")
    );

    let dropped = sim::run(
        &SimOptions {
            drop_at: Some(Duration::from_millis(300)),
            source: Source::Tone {
                hz: 300.0,
                duration: Duration::from_secs(2),
            },
            ..opts(&server, "d")
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(dropped.ended_by, "dropped");
    assert_eq!(
        server.ended_call("d").await["end_reason"],
        "peer_disconnected"
    );

    let burst = sim::run(
        &SimOptions {
            burst: true,
            source: Source::Tone {
                hz: 300.0,
                duration: Duration::from_secs(3),
            },
            ..opts(&server, "b")
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(burst.frames_sent, 150);
    assert_eq!(
        burst.frames_received, 150,
        "3 s of audio at once is still echoed"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_runs_100_calls_for_3_seconds_with_no_loss() {
    let server = spawn_server(|_| {}).await;
    let report = load::run(
        &LoadOptions {
            url: server.url("/"),
            calls: 100,
            ramp: 200.0,
            duration: Duration::from_secs(3),
            mix: Mix::Mixed,
            server_pid: Some(std::process::id()),
            ..LoadOptions::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.calls_ok, 100, "{:?}", report.calls_failed);
    assert_eq!(report.frames.sent, 100 * 150);
    assert_eq!(report.frames.received, 100 * 150);
    assert_eq!(report.frames.lost, 0);
    assert_eq!(report.frames.corrupt, 0);
    assert_eq!(report.frames.reordered, 0);
    assert_eq!(report.rtt_ms.samples, 15_000);
    assert!(report.server.is_some());
    assert_eq!(server.calls().await.len(), 100);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_runs_twilio_streams_with_no_loss() {
    let server = spawn_server(|_| {}).await;
    let options = LoadOptions {
        url: server.url("/twilio"),
        calls: 20,
        duration: Duration::from_secs(2),
        mix: Mix::Twilio,
        format: AudioFormat::Ulaw8000,
        ..LoadOptions::default()
    };
    let report = load::run(&options, |_| {}).await.unwrap();
    assert_eq!(report.calls_ok, 20, "{:?}", report.calls_failed);
    assert_eq!(report.frames.sent, 20 * 100);
    assert_eq!(report.frames.received, 20 * 100);
    assert_eq!(report.frames.lost, 0);
    assert_eq!(report.frames.corrupt, 0);
    let calls = server.calls().await;
    assert_eq!(calls.len(), 20);
    assert!(calls.iter().all(|c| c["protocol"] == "twilio"));
    let pcm = LoadOptions {
        format: AudioFormat::Pcm8000,
        ..options
    };
    assert!(
        load::run(&pcm, |_| {}).await.is_err(),
        "Twilio is mu-law only"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_measures_playout_pacing_against_the_tone_agent() {
    let server = spawn_server(|c| c.agent = "tone".into()).await;
    let report = load::run(
        &LoadOptions {
            url: server.url("/"),
            calls: 20,
            duration: Duration::from_secs(2),
            mix: Mix::Mixed,
            mode: load::Mode::Playout,
            ..LoadOptions::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.calls_ok, 20, "{:?}", report.calls_failed);
    let jitter = report
        .playout_jitter_ms
        .expect("playout mode reports pacing");
    // 2 s of 20 ms frames per call, give or take the frame in flight at each end.
    assert!(jitter.samples >= 20 * 98, "{} frames", jitter.samples);
    assert!(report.longest_gap_ms.is_some());
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("callgate_playout_jitter_seconds_count"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_cli_prints_json_for_machines() {
    let server = spawn_server(|_| {}).await;
    let url = server.url("/");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_callgate"))
            .args([
                "sim",
                "--url",
                &url,
                "--protocol",
                "callbridge",
                "--id",
                "cli-1",
            ])
            .args(["--tone", "350", "--tone-duration", "0.5s", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["frames_sent"], 25);
    assert_eq!(v["summary"]["frames_received"], 25);
    assert_eq!(v["summary"]["protocol"], "callbridge");
    assert_eq!(v["timeline"][0]["event"], "connected");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_steady_state_redials_each_slot_until_the_time_is_up() {
    let server = spawn_server(|_| {}).await;
    let report = load::run(
        &LoadOptions {
            url: server.url("/"),
            calls: 4,
            ramp: 0.0,
            duration: Duration::from_millis(200),
            mix: Mix::Mixed,
            steady_for: Some(Duration::from_secs(2)),
            ..LoadOptions::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert!(report.calls > 4, "every slot re-dials: {report:?}");
    assert_eq!(report.calls_ok, report.calls, "{:?}", report.calls_failed);
    assert_eq!((report.calls_refused, report.calls_dropped), (0, 0));
    assert_eq!(report.frames.sent, report.calls * 10);
    assert_eq!(report.frames.lost, 0);
    assert_eq!(report.steady_for_s, Some(2.0));
    // Every call the generator counted is a call the server recorded.
    assert_eq!(server.calls().await.len() as u64, report.calls);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_steady_state_counts_refused_and_dropped_calls() {
    let mut server = spawn_server(|_| {}).await;
    let opts = |steady: u64, duration: u64| LoadOptions {
        url: server.url("/"),
        calls: 2,
        ramp: 0.0,
        duration: Duration::from_secs(duration),
        steady_for: Some(Duration::from_secs(steady)),
        answer_timeout: Duration::from_secs(2),
        ..LoadOptions::default()
    };

    // A draining node: every call is refused with 503, none is dropped.
    server.lifecycle.drain().await;
    let report = load::run(&opts(1, 1), |_| {}).await.unwrap();
    assert!(report.calls >= 2);
    assert_eq!(report.calls_refused, report.calls, "{report:?}");
    assert_eq!(report.calls_dropped, 0);
    assert_eq!(report.calls_failed.get("refused_503"), Some(&report.calls));
    server.lifecycle.undrain().await.unwrap();

    // The server stops under two live calls: both are dropped, the re-dials refused.
    let (up, calls_up) = tokio::sync::oneshot::channel();
    let mut up = Some(up);
    let stopping = server.lifecycle.clone();
    let stop = callgate_server::Tasks::new().spawn(async move {
        if calls_up.await.is_ok() {
            stopping.interrupt().await;
        }
    });
    let report = load::run(&opts(3, 30), |p| {
        if p.calls_up == 2
            && let Some(up) = up.take()
        {
            let _ = up.send(());
        }
    })
    .await
    .unwrap();
    stop.await.unwrap();
    assert_eq!(report.calls_dropped, 2, "{report:?}");
    // Inbound calls: the server's `hangup` ends them.
    assert_eq!(
        report.calls_failed.get("server_hung_up"),
        Some(&2),
        "{report:?}"
    );
    assert!(report.calls_refused >= 1, "{report:?}");
    assert_eq!(report.calls_ok, 0);
    server.begin_shutdown();
    server.stopped().await;
}
