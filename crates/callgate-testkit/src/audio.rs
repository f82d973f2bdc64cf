//! Test audio: non-silent, never periodic within a call, so reordering or corruption shows.

/// `ms` of 16-bit little-endian mono PCM at `rate`: a chirp plus a counter-seeded dither, so
/// every 20 ms frame differs from every other.
pub fn speechlike_pcm16(ms: u32, rate: u32, seed: u32) -> Vec<u8> {
    let n = (rate as u64 * ms as u64 / 1000) as usize;
    let mut out = Vec::with_capacity(n * 2);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for i in 0..n {
        let t = i as f64 / rate as f64;
        let f = 200.0 + 600.0 * (t * 0.7).sin().abs();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let noise = (x % 512) as f64 - 256.0;
        let s = (8000.0 * (2.0 * std::f64::consts::PI * f * t).sin() + noise) as i16;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// Splits audio into frames of `frame` bytes (the last may be shorter).
pub fn frames(audio: &[u8], frame: usize) -> Vec<bytes::Bytes> {
    audio
        .chunks(frame)
        .map(bytes::Bytes::copy_from_slice)
        .collect()
}
