//! In-band DTMF: a tone generator (so agents can play keys) and a Goertzel detector that turns
//! tones in the caller's audio into the same DTMF events as protocol DTMF.
//!
//! The detector follows the usual telephony rules: it looks at 8 row/column frequencies in
//! blocks of ~12.75 ms (102 samples at 8 kHz, scaled with the rate), and accepts a key only
//! when one row and one column stand out clearly (each at least 6 dB above the other
//! candidates of its group), the two are within the allowed twist (column up to 4 dB stronger,
//! row up to 8 dB stronger), together they carry most of the block's energy (speech spreads
//! its energy over many frequencies and fails this), and the same key holds for 3 blocks in a
//! row (~40 ms, the shortest valid tone). A key is reported once per press: it must disappear
//! for 2 blocks before it can be reported again.

use callgate_proto::Digit;

const ROWS: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
const COLS: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
const KEYS: [[char; 4]; 4] = [
    ['1', '2', '3', 'A'],
    ['4', '5', '6', 'B'],
    ['7', '8', '9', 'C'],
    ['*', '0', '#', 'D'],
];

/// The row and column frequencies of a key.
pub fn frequencies(digit: Digit) -> (f64, f64) {
    let c = digit.as_char();
    for (r, row) in KEYS.iter().enumerate() {
        for (k, &key) in row.iter().enumerate() {
            if key == c {
                return (ROWS[r], COLS[k]);
            }
        }
    }
    (0.0, 0.0)
}

/// `ms` of a key's tone at `rate`, each frequency at `level` of full scale (0.25 ≈ -12 dBFS),
/// with 2 ms ramps so the edges do not click.
pub fn tone(digit: Digit, ms: u32, rate: u32, level: f64) -> Vec<i16> {
    let (f1, f2) = frequencies(digit);
    let n = (u64::from(rate) * u64::from(ms) / 1000) as usize;
    if n == 0 {
        return Vec::new();
    }
    let ramp = (rate as usize / 500).max(1);
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let env = (i.min(n - 1 - i) as f64 / ramp as f64).min(1.0);
            let v = level
                * env
                * ((2.0 * std::f64::consts::PI * f1 * t).sin()
                    + (2.0 * std::f64::consts::PI * f2 * t).sin());
            (v * 32767.0).clamp(-32768.0, 32767.0) as i16
        })
        .collect()
}

/// Detects DTMF keys in a stream of samples.
#[derive(Debug, Clone)]
pub struct Detector {
    block: usize,
    coeffs: [f64; 8],
    buffer: Vec<f64>,
    candidate: Option<char>,
    held: u32,
    reported: Option<char>,
    absent: u32,
}

/// Blocks a key must hold before it is reported.
const HOLD: u32 = 3;
/// Blocks a key must be gone before the same key can be reported again.
const RELEASE: u32 = 2;

impl Detector {
    /// A detector for audio at `rate` Hz.
    pub fn new(rate: u32) -> Self {
        let block = (rate as usize * 102 / 8000).max(32);
        let mut coeffs = [0.0; 8];
        // Each filter sits exactly on its key frequency (not on the nearest DFT bin, which
        // for 1209 Hz would be 0.4 bins off and lose 40% of the tone's power).
        for (i, f) in ROWS.iter().chain(COLS.iter()).enumerate() {
            coeffs[i] = 2.0 * (2.0 * std::f64::consts::PI * f / f64::from(rate)).cos();
        }
        Self {
            block,
            coeffs,
            buffer: Vec::with_capacity(block),
            candidate: None,
            held: 0,
            reported: None,
            absent: 0,
        }
    }

    /// Feeds samples; returns the keys that completed a press in them.
    pub fn process(&mut self, samples: &[i16], out: &mut Vec<Digit>) {
        for &s in samples {
            self.buffer.push(f64::from(s) / 32768.0);
            if self.buffer.len() == self.block {
                let key = self.analyse();
                self.buffer.clear();
                self.step(key, out);
            }
        }
    }

    fn step(&mut self, key: Option<char>, out: &mut Vec<Digit>) {
        match key {
            Some(k) if Some(k) == self.candidate => self.held += 1,
            Some(k) => {
                self.candidate = Some(k);
                self.held = 1;
            }
            None => {
                self.candidate = None;
                self.held = 0;
            }
        }
        if key.is_none() || key != self.reported {
            self.absent += 1;
            if self.absent >= RELEASE {
                self.reported = None;
            }
        } else {
            self.absent = 0;
        }
        if let Some(k) = self.candidate
            && self.held >= HOLD
            && self.reported.is_none()
        {
            self.reported = Some(k);
            self.absent = 0;
            if let Some(d) = Digit::from_char(k) {
                out.push(d);
            }
        }
    }

    /// The key this block holds, if it holds exactly one.
    fn analyse(&self) -> Option<char> {
        let energy: f64 = self.buffer.iter().map(|x| x * x).sum();
        // Below about -40 dBFS there is nothing to detect.
        if energy < self.block as f64 * 1e-4 {
            return None;
        }
        let mut power = [0.0f64; 8];
        for (p, &c) in power.iter_mut().zip(self.coeffs.iter()) {
            let (mut s1, mut s2) = (0.0, 0.0);
            for &x in &self.buffer {
                let s0 = x + c * s1 - s2;
                s2 = s1;
                s1 = s0;
            }
            *p = s1 * s1 + s2 * s2 - c * s1 * s2;
        }
        let best = |group: &[f64]| -> Option<(usize, f64)> {
            let (i, &p) = group.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
            // Every other candidate of the group at least 6 dB (4x) below.
            let clear = group
                .iter()
                .enumerate()
                .all(|(j, &q)| j == i || q * 4.0 < p);
            clear.then_some((i, p))
        };
        let (r, pr) = best(&power[..4])?;
        let (c, pc) = best(&power[4..])?;
        // Twist: the column may be up to 4 dB above the row, the row up to 8 dB above.
        if pc > pr * 2.5 || pr > pc * 6.3 {
            return None;
        }
        // A sine of amplitude A gives a Goertzel power of (A·N/2)² and a block energy of
        // N·A²/2, so 2·power/N is the energy the tone accounts for. A clean key puts nearly
        // all of the block's energy in its two tones; speech spreads it out.
        let tone_energy = 2.0 * (pr + pc) / self.block as f64;
        if tone_energy < 0.7 * energy {
            return None;
        }
        Some(KEYS[r][c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(samples: &[i16], rate: u32) -> String {
        let mut d = Detector::new(rate);
        let mut out = Vec::new();
        for chunk in samples.chunks(rate as usize / 50) {
            d.process(chunk, &mut out);
        }
        out.iter().map(|d| d.as_char()).collect()
    }

    fn silence(ms: u32, rate: u32) -> Vec<i16> {
        vec![0; (rate * ms / 1000) as usize]
    }

    #[test]
    fn detects_every_key_at_8_and_16_khz() {
        for rate in [8000, 16000] {
            let mut audio = Vec::new();
            let keys = "0123456789*#ABCD";
            for c in keys.chars() {
                let digit = Digit::from_char(c).unwrap();
                audio.extend(tone(digit, 80, rate, 0.2));
                audio.extend(silence(60, rate));
            }
            assert_eq!(detect(&audio, rate), keys, "at {rate} Hz");
        }
    }

    #[test]
    fn a_held_key_is_reported_once_and_short_blips_never() {
        let mut audio = tone(Digit::D5, 600, 8000, 0.2);
        audio.extend(silence(50, 8000));
        audio.extend(tone(Digit::D5, 100, 8000, 0.2));
        audio.extend(silence(50, 8000));
        audio.extend(tone(Digit::D7, 20, 8000, 0.2));
        assert_eq!(detect(&audio, 8000), "55");
    }

    #[test]
    fn survives_noise_and_quiet_tones() {
        let mut x: u32 = 1;
        let mut audio = tone(Digit::Pound, 100, 8000, 0.05);
        for s in &mut audio {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *s = s.saturating_add(((x % 400) as i16) - 200);
        }
        assert_eq!(detect(&audio, 8000), "#");
    }
}
