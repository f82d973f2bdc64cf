//! Streaming, band-limited sample-rate conversion.
//!
//! A windowed-sinc resampler (rubato's asynchronous sinc, 128 taps, Blackman-Harris window)
//! that keeps its filter state across calls, so a stream cut into frames of any size converts
//! exactly like the whole stream at once: no clicks at frame boundaries, no point sampling.
//!
//! The output is delay-compensated: the filter's start-up delay is trimmed, and [`Resampler::
//! flush`] pushes the tail out, so N input samples always become exactly
//! `round(N × to / from)` output samples.

use audioadapter_buffers::direct::InterleavedSlice;
use rubato::{
    Async, FixedAsync, Indexing, Resampler as _, SincInterpolationParameters,
    SincInterpolationType, WindowFunction,
};

use crate::Error;

/// Converts a stream of samples from one rate to another.
pub struct Resampler {
    from: u32,
    to: u32,
    /// `None` when the rates are equal: samples pass through untouched.
    inner: Option<Async<f32>>,
    /// Input waiting for a whole chunk.
    pending: Vec<f32>,
    /// Input samples per chunk (20 ms).
    chunk: usize,
    /// Output scratch space.
    scratch: Vec<f32>,
    /// Output samples still to drop (the filter delay).
    skip: usize,
    samples_in: u64,
    samples_out: u64,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl Resampler {
    /// A resampler from `from` Hz to `to` Hz.
    pub fn new(from: u32, to: u32) -> Result<Self, Error> {
        let chunk = (from / 50).max(1) as usize;
        let inner = if from == to {
            None
        } else {
            let params = SincInterpolationParameters::new(128, WindowFunction::BlackmanHarris2)
                .oversampling_factor(128)
                .interpolation(SincInterpolationType::Linear);
            let ratio = f64::from(to) / f64::from(from);
            Some(
                Async::<f32>::new_sinc(ratio, 1.0, &params, chunk, 1, FixedAsync::Input).map_err(
                    |e| Error::Resampler {
                        from,
                        to,
                        detail: e.to_string(),
                    },
                )?,
            )
        };
        let skip = inner.as_ref().map_or(0, |r| r.output_delay());
        let scratch = vec![0.0; inner.as_ref().map_or(0, |r| r.output_frames_max())];
        Ok(Self {
            from,
            to,
            inner,
            pending: Vec::with_capacity(chunk * 2),
            chunk,
            scratch,
            skip,
            samples_in: 0,
            samples_out: 0,
        })
    }

    /// Converts `input`, appending what is ready to `out`. Up to one 20 ms chunk may stay
    /// buffered until more input (or [`Resampler::flush`]) comes.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        self.samples_in += input.len() as u64;
        if self.inner.is_none() {
            self.samples_out += input.len() as u64;
            out.extend_from_slice(input);
            return;
        }
        self.pending
            .extend(input.iter().map(|&s| f32::from(s) / 32768.0));
        let mut start = 0;
        while self.pending.len() - start >= self.chunk {
            self.run_chunk(start, None, out);
            start += self.chunk;
        }
        self.pending.drain(..start);
    }

    /// Ends the stream: converts what is buffered and pushes the filter's tail out, so the
    /// total output is exactly `round(samples_in × to / from)`.
    pub fn flush(&mut self, out: &mut Vec<i16>) {
        if self.inner.is_none() {
            return;
        }
        let target = (self.samples_in * u64::from(self.to) + u64::from(self.from) / 2)
            / u64::from(self.from);
        // Each round feeds one chunk (real input, then zeros) until the tail is out; the
        // bound only guards against a resampler that stops producing.
        for _ in 0..64 {
            if self.samples_out >= target {
                break;
            }
            self.pending.resize(self.chunk.max(self.pending.len()), 0.0);
            self.run_chunk(0, Some((target - self.samples_out) as usize), out);
            self.pending.drain(..self.chunk);
        }
        self.pending.clear();
    }

    /// Converts `pending[start..start + chunk]`, appending at most `limit` samples.
    fn run_chunk(&mut self, start: usize, limit: Option<usize>, out: &mut Vec<i16>) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let input = &self.pending[start..start + self.chunk];
        let frames_out = inner.output_frames_next();
        if self.scratch.len() < frames_out {
            self.scratch.resize(frames_out, 0.0);
        }
        let (Ok(adapter_in), Ok(mut adapter_out)) = (
            InterleavedSlice::new(input, 1, self.chunk),
            InterleavedSlice::new_mut(&mut self.scratch[..frames_out], 1, frames_out),
        ) else {
            return;
        };
        let indexing: Option<&Indexing> = None;
        let Ok((_, written)) = inner.process_into_buffer(&adapter_in, &mut adapter_out, indexing)
        else {
            return;
        };
        let mut produced = &self.scratch[..written];
        let skipped = self.skip.min(produced.len());
        self.skip -= skipped;
        produced = &produced[skipped..];
        if let Some(limit) = limit {
            produced = &produced[..produced.len().min(limit)];
        }
        self.samples_out += produced.len() as u64;
        out.extend(
            produced
                .iter()
                .map(|&s| (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
    }
}
