//! The tone agent: answers and plays a steady tone (`frequency_hz`, default 440 Hz, at
//! `level_dbfs`, default -12 dBFS) until the call ends, through the playout clock. For
//! diagnostics (does the caller hear a clean, unbroken tone?) and for measuring pacing
//! (`callgate load --mode playout`).

use std::sync::Arc;

use bytes::Bytes;
use callgate_audio::pcm;
use callgate_proto::AudioFormat;

use crate::catalog::{Settings, SettingsError};
use crate::{Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed};

/// Audio per command, ms.
pub const CHUNK_MS: u32 = 200;

/// The tone agent's settings (`[routes.settings]`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToneSettings {
    /// The tone's frequency, Hz (1 to 3999: it must fit under the 4 kHz limit of 8 kHz phone
    /// audio).
    pub frequency_hz: f64,
    /// Its level, dBFS (-60 to 0).
    pub level_dbfs: f64,
}

impl Default for ToneSettings {
    fn default() -> Self {
        Self {
            frequency_hz: 440.0,
            level_dbfs: -12.0,
        }
    }
}

impl Settings for ToneSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !(self.frequency_hz >= 1.0 && self.frequency_hz < 4000.0) {
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

/// The tone, generated chunk after chunk with its phase carried over, so chunks join without
/// a click at any frequency.
#[derive(Debug)]
struct Oscillator {
    format: AudioFormat,
    step: f64,
    amplitude: f64,
    phase: f64,
    samples: Vec<i16>,
}

impl Oscillator {
    fn new(format: AudioFormat, settings: &ToneSettings) -> Self {
        let rate = f64::from(format.sample_rate());
        Self {
            format,
            step: std::f64::consts::TAU * settings.frequency_hz / rate,
            amplitude: 32767.0 * 10f64.powf(settings.level_dbfs / 20.0),
            phase: 0.0,
            samples: Vec::new(),
        }
    }

    fn chunk(&mut self) -> Bytes {
        let n = (self.format.sample_rate() * CHUNK_MS / 1000) as usize;
        self.samples.clear();
        for _ in 0..n {
            self.samples
                .push((self.amplitude * self.phase.sin()) as i16);
            self.phase = (self.phase + self.step) % std::f64::consts::TAU;
        }
        pcm::encode(self.format, &self.samples)
    }
}

impl Agent for Tone {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let mut oscillator = Oscillator::new(io.call.output_format, &self.settings);
        let sender = io.sender();
        if sender.send(AgentCommand::Answer).await.is_err() {
            return Ok(());
        }
        let mut chunk = oscillator.chunk();
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
                    chunk = oscillator.chunk();
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
    fn chunks_join_without_a_jump() {
        let settings = ToneSettings {
            frequency_hz: 600.0,
            level_dbfs: -6.0,
        };
        let mut osc = Oscillator::new(AudioFormat::Pcm8000, &settings);
        let mut all = Vec::new();
        for _ in 0..3 {
            let chunk = osc.chunk();
            pcm::decode(AudioFormat::Pcm8000, &chunk, &mut all);
        }
        // The largest step between samples of a 600 Hz sine at 8 kHz, -6 dBFS, is
        // A * 2 sin(pi f / fs) ~ 0.5 * 32767 * 0.468; a click at a chunk boundary would exceed it.
        let bound = 0.502 * 32767.0 * 2.0 * (std::f64::consts::PI * 600.0 / 8000.0).sin() + 2.0;
        let worst = all
            .windows(2)
            .map(|w| (f64::from(w[1]) - f64::from(w[0])).abs())
            .fold(0.0, f64::max);
        assert!(worst <= bound, "{worst} > {bound}");
        let peak = all.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!((16000..=16500).contains(&peak), "{peak}");
    }
}
