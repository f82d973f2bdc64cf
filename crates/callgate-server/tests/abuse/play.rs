//! Item 9: `POST /api/calls/{id}/play` amplification.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::support::*;

/// A mono 16-bit PCM WAV at `rate` whose header promises `frames` frames, with `body` bytes of
/// silence after it.
fn wav(rate: u32, frames: u32, body: usize) -> Vec<u8> {
    let data = frames.saturating_mul(2);
    let mut w = Vec::with_capacity(44 + body);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&data.saturating_add(36).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.resize(44 + body, 0);
    w
}

/// The API answered this status with this error code, as JSON.
fn expect(response: &Response, status: u16, code: &str) {
    assert_eq!(response.status, status, "{:?}", response.json());
    assert!(response.is_json(), "{}", response.head);
    let body = response.json().expect("a JSON body");
    assert_eq!(body["code"], code, "{body}");
}

/// Item 9: a 40 KB WAV at 1 Hz was resampled inside the call task: 6.5 s of CPU and +548 MB
/// (a 32 MiB body would have run out of memory). Here, against a live call and again and
/// again while the canary runs: the 1 Hz WAV and a header promising 11 minutes are refused
/// (422) before anything is decoded, a body over 32 MiB is refused (413), a body for a call
/// that does not exist is refused (404) before it is looked at, and the largest valid WAVs
/// are decoded off the call task until the call's 10 minutes of queued audio are full (409
/// `queue_full`: before this test it said `call_not_live` of a live call).
/// The canary and the call played to go on, memory stays bounded.
#[tokio::test]
async fn play_refuses_absurd_audio_before_decoding_and_caps_the_queue() {
    let strength = Strength::get();
    let repeats = strength.pick(10, 100);
    // The valid WAVs: the long run plays 300 s at 48 kHz (28.8 MB, resampled to 8 kHz), the
    // largest that fits the 32 MiB body limit, until the queue is full. The short version
    // resamples 10 s at 16 kHz once (a debug build resamples slowly), then fills the queue
    // with 60 s at 8 kHz.
    let (rate, seconds) = strength.pick((16_000u32, 10u32), (48_000, 300));
    let (fill_rate, fill_seconds) = strength.pick((8_000u32, 60u32), (48_000, 300));
    let one_hz = wav(1, 20_000, 40_000);
    let eleven_minutes = wav(8_000, 8_000 * 660, 1_000);
    let too_big = vec![0u8; 33 << 20];
    let valid = wav(rate, rate * seconds, (rate * seconds * 2) as usize);
    let fill = wav(
        fill_rate,
        fill_rate * fill_seconds,
        (fill_rate * fill_seconds * 2) as usize,
    );
    let mut rig = Rig::start("item 9: POST /play amplification", |_| {}).await;
    rig.bound_rss(strength.pick(128, 320) << 20);
    let canary = rig.canary().await;
    let server = &rig.server;
    let admin = server.admin_addr;
    let mut target = place_call(server, ATTACKER, "played-to")
        .await
        .expect("answered");
    let id = record_id(admin, "played-to").await;
    let play = format!("/api/calls/{id}/play");

    let phase = rig.phase();
    let mut slowest = Duration::ZERO;
    for _ in 0..repeats {
        let sent = Instant::now();
        expect(&admin_post(admin, &play, &one_hz).await, 422, "bad_rate");
        expect(
            &admin_post(admin, &play, &eleven_minutes).await,
            422,
            "too_long",
        );
        slowest = slowest.max(sent.elapsed());
    }
    let refused_grew = phase.grew();
    // A valid WAV for a call that does not exist: 404 before it is parsed (its body is read:
    // the memory this costs is the body's, client's and server's copies).
    let phase = rig.phase();
    for _ in 0..repeats {
        expect(
            &admin_post(
                admin,
                "/api/calls/0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192/play",
                &valid,
            )
            .await,
            404,
            "call_not_found",
        );
    }
    let no_call_grew = phase.grew();
    for _ in 0..strength.pick(2, 5) {
        expect(&admin_post(admin, &play, &too_big).await, 413, "too_large");
    }
    // Valid plays until the call's queue is full: 600 s of audio.
    let phase = rig.phase();
    let mut queued_ms = 0;
    let mut played = 0;
    let mut body = &valid;
    let full = loop {
        let response = admin_post(admin, &play, body).await;
        if response.status != 200 {
            break response;
        }
        queued_ms += response.json().unwrap()["queued_ms"].as_u64().unwrap();
        played += 1;
        assert!(queued_ms <= 600_000, "more than 10 minutes queued");
        body = &fill;
    };
    expect(&full, 409, "queue_full");
    assert!(
        queued_ms + u64::from(fill_seconds) * 1000 > 600_000,
        "{queued_ms}"
    );
    let decoded_grew = phase.grew();
    rig.figure("refused requests (1 Hz, 11 min)", 2 * repeats);
    rig.figure("slowest pair of refusals (ms)", ms(slowest));
    rig.figure("memory growth while refusing (MiB)", mib(refused_grew));
    rig.figure(
        "memory growth while refusing valid WAVs for no call (MiB)",
        mib(no_call_grew),
    );
    rig.figure("first valid WAV", format!("{seconds} s at {rate} Hz"));
    rig.figure(
        "largest valid WAV (MiB)",
        mib(valid.len().max(fill.len()) as u64),
    );
    rig.figure("valid plays before 409", played);
    rig.figure("audio queued before 409 (s)", queued_ms / 1000);
    rig.figure("memory growth while decoding (MiB)", mib(decoded_grew));
    // The call played to is still a call: the operator's audio reaches it paced, one frame
    // per 20 ms (a second's worth takes about a second, and none of it is late), and it ends
    // normally.
    // What piled up while the test was not reading comes at once: read until a frame is
    // awaited (real time), then time 50 frames.
    loop {
        match tokio::time::timeout(Duration::from_millis(10), target.next()).await {
            Err(_) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("the call played to was dropped: {other:?}"),
        }
    }
    let began = Instant::now();
    let mut frames = 0;
    while frames < 50 {
        match tokio::time::timeout(Duration::from_secs(5), target.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                assert_eq!(b.len(), 320);
                frames += 1;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the call played to was dropped: {other:?}"),
        }
    }
    let second = began.elapsed();
    rig.figure("the call played to: 50 frames took (ms)", ms(second));
    rig.expect(
        second > Duration::from_millis(900),
        format!("not paced: 50 frames in {second:?}"),
    );
    assert_eq!(hang_up(&mut target, "played-to").await.0, 1000);
    let record = ended_record(admin, &id).await;
    assert_eq!(record["end_reason"], "peer_hangup");
    rig.finish(canary).await;
}
