//! The call recording: one stereo 16-bit WAV per call, caller on the left exactly as received,
//! agent on the right exactly as played, aligned on the call's clock.
//!
//! The caller channel is the caller's audio sample after sample (its position is its own
//! sample count). The agent channel is placed by the owner at the sample index the playout
//! clock sent it (ms since the call started × rate), with silence where the agent said nothing.
//! Samples are buffered only until the other channel catches up, and a channel that runs more
//! than [`SLACK_MS`] ahead makes the other one silent up to there, so memory stays bounded.
//! [`Recorder::sync`] rewrites the WAV header, so the file stays valid (up to the last sync)
//! even if the process is killed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use crate::{Error, wav};

/// How far one channel may run ahead before the other is filled with silence.
pub const SLACK_MS: u64 = 500;

/// A recording being written.
pub struct Recorder {
    writer: hound::WavWriter<BufWriter<File>>,
    rate: u32,
    left: VecDeque<i16>,
    right: VecDeque<i16>,
    /// Stereo frames written so far.
    written: u64,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("rate", &self.rate)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates the file (and its directory).
    pub fn create(path: &Path, rate: u32) -> Result<Self, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::Wav(hound::Error::IoError(e)))?;
        }
        Ok(Self {
            writer: hound::WavWriter::create(path, wav::spec(rate, 2))?,
            rate,
            left: VecDeque::new(),
            right: VecDeque::new(),
            written: 0,
        })
    }

    /// Appends caller audio (left).
    pub fn caller(&mut self, samples: &[i16]) -> Result<(), Error> {
        self.left.extend(samples.iter().copied());
        self.write_ready()
    }

    /// Places agent audio (right) at sample index `at` of the call's clock. Audio that would
    /// start before what is already placed is appended right after it instead.
    pub fn agent(&mut self, at: u64, samples: &[i16]) -> Result<(), Error> {
        let end = self.written + self.right.len() as u64;
        if at > end {
            let gap = (at - end).min(self.slack() * 4);
            self.right.extend(std::iter::repeat_n(0, gap as usize));
        }
        self.right.extend(samples.iter().copied());
        self.write_ready()
    }

    /// Rewrites the header so the file is valid as it stands.
    pub fn sync(&mut self) -> Result<(), Error> {
        self.writer.flush()?;
        Ok(())
    }

    /// Writes what is left (the shorter channel padded with silence) and closes the file.
    pub fn finish(mut self) -> Result<(), Error> {
        let n = self.left.len().max(self.right.len());
        self.left.resize(n, 0);
        self.right.resize(n, 0);
        self.write_frames(n)?;
        self.writer.finalize()?;
        Ok(())
    }

    fn slack(&self) -> u64 {
        u64::from(self.rate) * SLACK_MS / 1000
    }

    fn write_ready(&mut self) -> Result<(), Error> {
        let slack = self.slack() as usize;
        // A channel far ahead means the other is silent: fill it.
        if self.left.len() > self.right.len() + slack {
            let n = self.left.len() - slack;
            self.right.resize(n.max(self.right.len()), 0);
        } else if self.right.len() > self.left.len() + slack {
            let n = self.right.len() - slack;
            self.left.resize(n.max(self.left.len()), 0);
        }
        let ready = self.left.len().min(self.right.len());
        self.write_frames(ready)
    }

    fn write_frames(&mut self, n: usize) -> Result<(), Error> {
        for (l, r) in self.left.drain(..n).zip(self.right.drain(..n)) {
            self.writer.write_sample(l)?;
            self.writer.write_sample(r)?;
        }
        self.written += n as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_align_and_the_file_is_valid_before_finish() {
        let dir = std::env::temp_dir().join(format!("callgate-rec-{}", std::process::id()));
        let path = dir.join("r.wav");
        let mut r = Recorder::create(&path, 8000).unwrap();
        let caller: Vec<i16> = (0..8000).map(|i| (i % 1000) as i16).collect();
        r.caller(&caller[..4000]).unwrap();
        // The agent speaks from 0.25 s for 0.1 s.
        r.agent(2000, &[7; 800]).unwrap();
        r.caller(&caller[4000..]).unwrap();
        r.sync().unwrap();
        // Valid as it stands (what a crash would leave).
        let partial = hound::WavReader::open(&path).unwrap();
        assert_eq!(partial.spec().channels, 2);
        assert!(partial.len() > 0);
        r.finish().unwrap();
        let samples: Vec<i16> = hound::WavReader::open(&path)
            .unwrap()
            .into_samples::<i16>()
            .map(Result::unwrap)
            .collect();
        let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
        let right: Vec<i16> = samples.iter().skip(1).step_by(2).copied().collect();
        assert_eq!(
            left, caller,
            "the caller channel is exactly what was received"
        );
        assert!(right[..2000].iter().all(|&s| s == 0));
        assert!(right[2000..2800].iter().all(|&s| s == 7));
        assert!(right[2800..].iter().all(|&s| s == 0));
        let _ = std::fs::remove_dir_all(dir);
    }
}
