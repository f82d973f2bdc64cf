//! Prompt audio: read once (any PCM WAV: rate, channels, bit depth) at load, and converted to a
//! call rate the first time a call at that rate plays it (the driver does that off the call
//! task); after that a call only slices (PCM) or G.711-encodes what it plays. Audio already at
//! a call rate (the shipped 8 kHz prompts) needs no conversion at all.

use std::sync::OnceLock;

use bytes::Bytes;
use callgate_audio::wav::MonoAudio;
use callgate_audio::{AudioFormat, Resampler, g711, pcm};

/// The PCM rates calls use.
const RATES: [u32; 4] = [8000, 16000, 24000, 48000];

/// Audio per play command, ms: small enough that a clear (typing over a prompt) stops it at
/// once, large enough that a prompt is a handful of commands.
pub const CHUNK_MS: usize = 200;

/// One prompt, ready for any call format.
#[derive(PartialEq, Eq)]
pub struct PromptAudio {
    /// What it is (a file name, or the spoken text), for events and the transcript.
    pub label: String,
    /// Its length, ms.
    pub ms: u64,
    /// The audio as read.
    source: MonoAudio,
    /// 16-bit little-endian PCM at each of [`RATES`], converted on first use.
    pcm: [OnceLock<Bytes>; 4],
}

impl std::fmt::Debug for PromptAudio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The label and length, not the audio.
        f.debug_struct("PromptAudio")
            .field("label", &self.label)
            .field("ms", &self.ms)
            .finish_non_exhaustive()
    }
}

impl PromptAudio {
    /// A prompt of `audio` (checked now: every call rate can be made from its rate).
    pub fn new(label: impl Into<String>, audio: &MonoAudio) -> Result<Self, callgate_audio::Error> {
        let pcm: [OnceLock<Bytes>; 4] = Default::default();
        for (slot, rate) in pcm.iter().zip(RATES) {
            if rate == audio.rate {
                let _ = slot.set(resampled_pcm(audio, rate)?);
            } else {
                Resampler::new(audio.rate, rate)?;
            }
        }
        let ms = if audio.rate == 0 {
            0
        } else {
            audio.samples.len() as u64 * 1000 / u64::from(audio.rate)
        };
        Ok(Self {
            label: label.into(),
            ms,
            source: audio.clone(),
            pcm,
        })
    }

    fn slot(&self, format: AudioFormat) -> &OnceLock<Bytes> {
        let rate = format.sample_rate();
        let index = RATES.iter().position(|&r| r == rate).unwrap_or(0);
        &self.pcm[index]
    }

    /// Whether [`PromptAudio::chunks`] for `format` is cheap (no conversion left to do).
    pub fn is_ready(&self, format: AudioFormat) -> bool {
        self.slot(format).get().is_some()
    }

    /// The prompt in `format`, cut into [`CHUNK_MS`] pieces. The first call for a rate
    /// resamples (CPU: call it off the call task unless [`PromptAudio::is_ready`]).
    pub fn chunks(&self, format: AudioFormat) -> Vec<Bytes> {
        let pcm16 = self.slot(format).get_or_init(|| {
            // The rates were checked in `new`: this cannot fail.
            resampled_pcm(&self.source, format.sample_rate()).unwrap_or_default()
        });
        chunks(pcm16, format)
    }
}

/// `audio` resampled to `rate`, as 16-bit little-endian PCM bytes.
pub fn resampled_pcm(audio: &MonoAudio, rate: u32) -> Result<Bytes, callgate_audio::Error> {
    let mut out = Vec::new();
    if audio.rate == rate {
        pcm::samples_to_le_bytes(&audio.samples, &mut out);
        return Ok(Bytes::from(out));
    }
    let mut resampler = Resampler::new(audio.rate, rate)?;
    let mut samples = Vec::new();
    resampler.process(&audio.samples, &mut samples);
    resampler.flush(&mut samples);
    pcm::samples_to_le_bytes(&samples, &mut out);
    Ok(Bytes::from(out))
}

/// 16-bit PCM at the format's rate, encoded in `format` and cut into [`CHUNK_MS`] pieces.
pub fn chunks(pcm16: &Bytes, format: AudioFormat) -> Vec<Bytes> {
    let samples_per_chunk = format.sample_rate() as usize * CHUNK_MS / 1000;
    let bytes_per_chunk = samples_per_chunk.max(1) * 2;
    let mut out = Vec::with_capacity(pcm16.len() / bytes_per_chunk + 1);
    let mut start = 0;
    while start < pcm16.len() {
        let end = (start + bytes_per_chunk).min(pcm16.len()) & !1;
        if end <= start {
            break;
        }
        let piece = pcm16.slice(start..end);
        out.push(match format {
            AudioFormat::Ulaw8000 | AudioFormat::Alaw8000 => {
                let ulaw = format == AudioFormat::Ulaw8000;
                piece
                    .chunks_exact(2)
                    .map(|b| {
                        let s = i16::from_le_bytes([b[0], b[1]]);
                        if ulaw {
                            g711::ulaw_encode(s)
                        } else {
                            g711::alaw_encode(s)
                        }
                    })
                    .collect::<Vec<u8>>()
                    .into()
            }
            // Every other format is 16-bit PCM: the slice is the audio, no copy.
            _ => piece,
        });
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_is_converted_to_each_call_format() {
        let audio = MonoAudio {
            rate: 22050,
            samples: (0..22050).map(|i| ((i % 100) * 100) as i16).collect(),
        };
        let prompt = PromptAudio::new("x.wav", &audio).unwrap();
        assert_eq!(prompt.ms, 1000);
        assert!(
            !prompt.is_ready(AudioFormat::Pcm16000),
            "converted on first use"
        );
        let total = |f: AudioFormat| prompt.chunks(f).iter().map(|c| c.len()).sum::<usize>();
        assert_eq!(total(AudioFormat::Pcm8000), 16000);
        assert_eq!(total(AudioFormat::Pcm16000), 32000);
        assert_eq!(total(AudioFormat::Ulaw8000), 8000);
        assert_eq!(prompt.chunks(AudioFormat::Pcm8000).len(), 5);
        assert!(prompt.is_ready(AudioFormat::Pcm16000));
        let native = MonoAudio {
            rate: 8000,
            samples: vec![0; 800],
        };
        let native = PromptAudio::new("y.wav", &native).unwrap();
        assert!(
            native.is_ready(AudioFormat::Ulaw8000),
            "no conversion at its own rate"
        );
    }
}
