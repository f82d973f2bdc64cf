//! Format-to-format conversion of a stream: decode, resample, encode; stateful across frames.

use bytes::Bytes;
use callgate_proto::AudioFormat;

use crate::{Error, Resampler, pcm};

/// Converts a stream of audio in one call format to another.
#[derive(Debug)]
pub struct Converter {
    from: AudioFormat,
    to: AudioFormat,
    resampler: Resampler,
    decoded: Vec<i16>,
    resampled: Vec<i16>,
}

impl Converter {
    /// A converter from `from` to `to`.
    pub fn new(from: AudioFormat, to: AudioFormat) -> Result<Self, Error> {
        Ok(Self {
            from,
            to,
            resampler: Resampler::new(from.sample_rate(), to.sample_rate())?,
            decoded: Vec::new(),
            resampled: Vec::new(),
        })
    }

    /// Whether this converter changes anything.
    pub fn is_identity(&self) -> bool {
        self.from == self.to
    }

    /// Converts one piece of the stream. Identity conversions return the input as is.
    pub fn convert(&mut self, input: &Bytes) -> Bytes {
        if self.is_identity() {
            return input.clone();
        }
        self.decoded.clear();
        pcm::decode(self.from, input, &mut self.decoded);
        self.resampled.clear();
        self.resampler.process(&self.decoded, &mut self.resampled);
        pcm::encode(self.to, &self.resampled)
    }

    /// Ends the stream, returning what the resampler still held.
    pub fn flush(&mut self) -> Bytes {
        self.resampled.clear();
        self.resampler.flush(&mut self.resampled);
        pcm::encode(self.to, &self.resampled)
    }
}
