//! The tone agent: answers and plays a steady tone (`frequency_hz`, default 440 Hz, at
//! `level_dbfs`, default -12 dBFS) until the call ends, through the playout clock. For
//! diagnostics (does the caller hear a clean, unbroken tone?) and for measuring pacing
//! (`callgate load --mode playout`).

use std::sync::Arc;

use bytes::Bytes;
use callgate_audio::pcm;
use callgate_proto::AudioFormat;

use crate::settings::{Settings, SettingsError};
use crate::{Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed};

/// Audio per command, ms.
pub const CHUNK_MS: u32 = 200;

/// The tone agent's settings (`[routes.settings]`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToneSettings {
    /// The tone's frequency, whole Hz (1 to 3999: it must fit under the 4 kHz limit of 8 kHz
    /// phone audio).
    pub frequency_hz: u32,
    /// Its level, dBFS (-60 to 0).
    pub level_dbfs: f64,
}

impl Default for ToneSettings {
    fn default() -> Self {
        Self {
            frequency_hz: 440,
            level_dbfs: -12.0,
        }
    }
}

impl Settings for ToneSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !(1..4000).contains(&self.frequency_hz) {
            return Err(SettingsError::new(
                "frequency_hz",
                format!("{} Hz is outside 1..4000 Hz", self.frequency_hz),
            ));
        }
        if !(-60.0..=0.0).contains(&self.level_dbfs) {
            return Err(SettingsError::new(
                "level_dbfs",
                format!("{} dBFS is outside -60..0", self.level_dbfs),
            ));
        }
        Ok(())
    }
}

/// Plays a tone.
#[derive(Debug, Clone)]
pub struct Tone {
    settings: Arc<ToneSettings>,
}

/// One chunk of the tone that holds a whole number of cycles, so the same chunk repeats
/// without a click: at least [`CHUNK_MS`], at most one second (a whole number of cycles always
/// fits in one second of whole-Hz tone). Built once per call; each send shares it.
fn chunk(format: AudioFormat, settings: &ToneSettings) -> Bytes {
    let rate = format.sample_rate();
    // The shortest whole-cycle length: rate / gcd(rate, f) samples.
    let (mut a, mut b) = (rate, settings.frequency_hz);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let period = (rate / a) as usize;
    let min = (rate * CHUNK_MS / 1000) as usize;
    let n = period * min.div_ceil(period);
    let amplitude = 32767.0 * 10f64.powf(settings.level_dbfs / 20.0);
    let step = std::f64::consts::TAU * f64::from(settings.frequency_hz) / f64::from(rate);
    let samples: Vec<i16> = (0..n)
        .map(|i| (amplitude * (step * i as f64).sin()) as i16)
        .collect();
    pcm::encode(format, &samples)
}

impl Agent for Tone {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let chunk = chunk(io.call.output_format, &self.settings);
        let sender = io.sender();
        if sender.send(AgentCommand::Answer).await.is_err() {
            return Ok(());
        }
        loop {
            tokio::select! {
                event = io.recv() => match event {
                    None | Some(AgentEvent::Ended(_)) => return Ok(()),
                    Some(_) => {}
                },
                // Waits while the playout is full: the call's backpressure paces this loop.
                sent = sender.send(AgentCommand::Audio(chunk.clone())) => {
                    if sent.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Makes [`Tone`] agents.
#[derive(Debug, Clone, Default)]
pub struct ToneFactory {
    settings: Arc<ToneSettings>,
}

impl ToneFactory {
    /// Tones with these (validated) settings.
    pub fn new(settings: ToneSettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

impl AgentFactory for ToneFactory {
    fn name(&self) -> &str {
        "tone"
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(
            Tone {
                settings: self.settings.clone(),
            },
            io,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_repeat_without_a_jump() {
        for (hz, rate_format) in [
            (600, AudioFormat::Pcm8000),
            (441, AudioFormat::Pcm8000),
            (1000, AudioFormat::Pcm24000),
        ] {
            let settings = ToneSettings {
                frequency_hz: hz,
                level_dbfs: -6.0,
            };
            let chunk = chunk(rate_format, &settings);
            let mut all = Vec::new();
            for _ in 0..3 {
                pcm::decode(rate_format, &chunk, &mut all);
            }
            let rate = f64::from(rate_format.sample_rate());
            assert!(all.len() as f64 / 3.0 >= rate * 0.2, "at least 200 ms");
            // The largest step between samples of the sine, A * 2 sin(pi f / fs); a click at a
            // chunk boundary would exceed it.
            let bound =
                0.502 * 32767.0 * 2.0 * (std::f64::consts::PI * f64::from(hz) / rate).sin() + 2.0;
            let worst = all
                .windows(2)
                .map(|w| (f64::from(w[1]) - f64::from(w[0])).abs())
                .fold(0.0, f64::max);
            assert!(worst <= bound, "{hz} Hz: {worst} > {bound}");
            let peak = all.iter().map(|s| s.unsigned_abs()).max().unwrap();
            assert!((16000..=16500).contains(&peak), "{peak}");
        }
    }
}
