//! vosk in process with the real library and the real Korean model, on real Korean speech
//! (espeak-ng `-v ko`). espeak-ng's Korean is robotic: the small model makes out short words
//! of it ("네", "예") and little else, so these tests speak those (measured: "요금 문의" comes
//! back as "이어 일목요연 하다"); callers' own voices are what the model is trained on. Built only with the `vosk` feature; the model directory comes from
//! $CALLGATE_VOSK_MODEL (scripts/fetch-vosk prints it), which that build requires.
#![cfg(feature = "vosk")]

use callgate_kit::stt::{Stt, SttSettings, normalize};

fn model() -> String {
    std::env::var("CALLGATE_VOSK_MODEL")
        .expect("the vosk tests need CALLGATE_VOSK_MODEL: eval \"$(scripts/fetch-vosk)\"")
}

fn vosk() -> Stt {
    let http = callgate_kit::http::client().expect("client");
    let settings = SttSettings {
        provider: "vosk".into(),
        model: model(),
        ..Default::default()
    };
    Stt::build(&settings, &http).expect("the model loads")
}

/// Korean speech from espeak-ng at `rate`, as 16-bit samples.
async fn korean(text: &str, rate: u32) -> Vec<i16> {
    let http = callgate_kit::http::client().expect("client");
    let espeak = callgate_kit::TtsSettings::default()
        .provider(&http)
        .expect("espeak-ng is installed");
    let audio = espeak
        .synthesize(text, "ko")
        .await
        .expect("espeak-ng speaks");
    let pcm = callgate_kit::audio::resampled_pcm(&audio, rate).expect("resampled");
    pcm.chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[tokio::test]
async fn korean_speech_streamed_at_8_khz_is_transcribed() {
    let stt = vosk();
    assert_eq!(stt.name(), "vosk");
    let samples = korean("네 네", 8000).await;
    let mut utterance = stt.start(8000).expect("a stream");
    for frame in samples.chunks(160) {
        utterance.push(frame);
    }
    utterance.push(&[0; 4000]);
    let text = utterance.finish().await.expect("a transcript");
    assert_eq!(normalize(&text), "네네", "heard {text:?}");
}

#[tokio::test]
async fn two_streams_of_one_model_run_side_by_side_frame_by_frame() {
    let (a, b) = (vosk(), vosk());
    let one = korean("네 네", 8000).await;
    let two = korean("예", 8000).await;
    let (mut x, mut y) = (a.start(8000).expect("x"), b.start(8000).expect("y"));
    let longest = one.len().max(two.len()) + 4000;
    for at in (0..longest).step_by(160) {
        let frame = |s: &[i16]| -> Vec<i16> {
            (at..at + 160)
                .map(|i| s.get(i).copied().unwrap_or(0))
                .collect()
        };
        x.push(&frame(&one));
        y.push(&frame(&two));
    }
    let (tx, ty) = tokio::join!(x.finish(), y.finish());
    let (tx, ty) = (tx.expect("x text"), ty.expect("y text"));
    assert_eq!(normalize(&tx), "네네", "heard {tx:?}");
    assert_eq!(normalize(&ty), "예", "heard {ty:?}");
}

#[tokio::test]
async fn silence_is_an_empty_transcript_and_a_missing_model_is_refused() {
    let stt = vosk();
    let text = stt
        .transcribe(&[0; 16000], 8000)
        .await
        .expect("a transcript");
    assert_eq!(text, "");
    let http = callgate_kit::http::client().expect("client");
    let bad = SttSettings {
        provider: "vosk".into(),
        model: "/nonexistent".into(),
        ..Default::default()
    };
    let e = Stt::build(&bad, &http).expect_err("refused").to_string();
    assert!(
        e.contains("stt.model") && e.contains("not a vosk model"),
        "{e}"
    );
}
