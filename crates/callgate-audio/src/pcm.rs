//! 16-bit PCM bytes and samples, and decoding/encoding any call format to and from them.

use bytes::Bytes;
use callgate_proto::AudioFormat;

use crate::g711;

/// Little-endian 16-bit PCM bytes → samples, appended to `out`. A trailing odd byte is ignored.
pub fn le_bytes_to_samples(bytes: &[u8], out: &mut Vec<i16>) {
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]])),
    );
}

/// Samples → little-endian 16-bit PCM bytes, appended to `out`.
pub fn samples_to_le_bytes(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len() * 2);
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

/// Decodes audio in `format` to 16-bit samples, appended to `out`.
pub fn decode(format: AudioFormat, bytes: &[u8], out: &mut Vec<i16>) {
    match format {
        AudioFormat::Ulaw8000 => out.extend(bytes.iter().map(|&b| g711::ULAW_TO_PCM[b as usize])),
        AudioFormat::Alaw8000 => out.extend(bytes.iter().map(|&b| g711::ALAW_TO_PCM[b as usize])),
        _ => le_bytes_to_samples(bytes, out),
    }
}

/// Encodes 16-bit samples into `format`.
pub fn encode(format: AudioFormat, samples: &[i16]) -> Bytes {
    let mut out = Vec::with_capacity(samples.len() * 2);
    match format {
        AudioFormat::Ulaw8000 => out.extend(samples.iter().map(|&s| g711::ulaw_encode(s))),
        AudioFormat::Alaw8000 => out.extend(samples.iter().map(|&s| g711::alaw_encode(s))),
        _ => samples_to_le_bytes(samples, &mut out),
    }
    Bytes::from(out)
}

/// Root-mean-square level of samples, 0.0..=1.0 of full scale.
pub fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s).powi(2)).sum();
    (sum / samples.len() as f64).sqrt() / 32768.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_round_trips() {
        let samples = [0i16, 1, -1, i16::MAX, i16::MIN, 1234];
        let mut bytes = Vec::new();
        samples_to_le_bytes(&samples, &mut bytes);
        let mut back = Vec::new();
        decode(AudioFormat::Pcm16000, &bytes, &mut back);
        assert_eq!(back, samples);
        assert_eq!(
            encode(AudioFormat::Pcm8000, &samples).as_ref(),
            bytes.as_slice()
        );
    }
}
