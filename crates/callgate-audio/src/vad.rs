//! Voice activity on the caller's audio: earshot's detector with hysteresis, reporting when
//! speech starts and stops, timestamped on the caller-audio clock (ms of caller audio
//! received), which is the call's clock as the phone keeps it.
//!
//! earshot works on 16 ms frames at 16 kHz. 8 kHz audio is doubled by linear interpolation
//! (the detector's features live well below 4 kHz, so this costs nothing in accuracy and
//! almost nothing in CPU); 24 and 48 kHz go through the band-limited resampler.

use crate::{Error, Resampler};

/// Detector settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadConfig {
    /// Score (0..1) at or above which a frame counts as speech.
    pub threshold: f32,
    /// Speech frames in a row (16 ms each) before speech is reported as started.
    pub start_frames: u32,
    /// Non-speech frames in a row before speech is reported as stopped.
    pub stop_frames: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            start_frames: 4,
            stop_frames: 25,
        }
    }
}

/// A change in the caller's voice activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// The caller started speaking, this many ms into the caller's audio.
    SpeechStarted {
        /// Position in the caller's audio where speech began, ms.
        at_ms: u64,
    },
    /// The caller stopped speaking.
    SpeechStopped {
        /// Position in the caller's audio where speech ended, ms.
        at_ms: u64,
    },
}

/// How caller audio reaches 16 kHz.
enum To16k {
    Same,
    Double { last: i16 },
    Resample(Box<Resampler>),
}

/// The voice-activity detector of one call.
pub struct Vad {
    config: VadConfig,
    detector: Box<earshot::Detector>,
    to16k: To16k,
    buffer: Vec<i16>,
    scratch: Vec<i16>,
    /// 16 kHz samples fed to the detector.
    fed: u64,
    speaking: bool,
    run: u32,
    /// Where the current run of speech or silence began, in 16 kHz samples.
    run_start: u64,
}

impl std::fmt::Debug for Vad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vad")
            .field("config", &self.config)
            .field("speaking", &self.speaking)
            .finish_non_exhaustive()
    }
}

const FRAME: usize = 256;

impl Vad {
    /// A detector for caller audio at `rate` Hz.
    pub fn new(rate: u32, config: VadConfig) -> Result<Self, Error> {
        let to16k = match rate {
            16000 => To16k::Same,
            8000 => To16k::Double { last: 0 },
            other => To16k::Resample(Box::new(Resampler::new(other, 16000)?)),
        };
        Ok(Self {
            config,
            detector: Box::default(),
            to16k,
            buffer: Vec::with_capacity(FRAME * 2),
            scratch: Vec::new(),
            fed: 0,
            speaking: false,
            run: 0,
            run_start: 0,
        })
    }

    /// Feeds caller samples; returns a change of state, if this audio caused one.
    pub fn process(&mut self, samples: &[i16]) -> Option<VadEvent> {
        self.scratch.clear();
        match &mut self.to16k {
            To16k::Same => self.scratch.extend_from_slice(samples),
            To16k::Double { last } => {
                for &s in samples {
                    self.scratch
                        .push(((i32::from(*last) + i32::from(s)) / 2) as i16);
                    self.scratch.push(s);
                    *last = s;
                }
            }
            To16k::Resample(r) => r.process(samples, &mut self.scratch),
        }
        self.buffer.extend_from_slice(&self.scratch);
        let mut event = None;
        let mut start = 0;
        while self.buffer.len() - start >= FRAME {
            let score = self
                .detector
                .predict_i16(&self.buffer[start..start + FRAME]);
            start += FRAME;
            if let Some(e) = self.decide(score >= self.config.threshold) {
                event = Some(e);
            }
            self.fed += FRAME as u64;
        }
        self.buffer.drain(..start);
        event
    }

    fn decide(&mut self, voiced: bool) -> Option<VadEvent> {
        if voiced != self.speaking {
            if self.run == 0 {
                self.run_start = self.fed;
            }
            self.run += 1;
        } else {
            self.run = 0;
        }
        let needed = if self.speaking {
            self.config.stop_frames
        } else {
            self.config.start_frames
        };
        if self.run < needed {
            return None;
        }
        self.speaking = voiced;
        self.run = 0;
        let at_ms = self.run_start / 16;
        Some(if voiced {
            VadEvent::SpeechStarted { at_ms }
        } else {
            VadEvent::SpeechStopped { at_ms }
        })
    }
}
