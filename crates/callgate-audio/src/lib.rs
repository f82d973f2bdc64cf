//! Audio for callgate: the formats calls carry, conversion between them, and WAV files.
//!
//! # Layout
//! - [`g711`]: mu-law and A-law, table-based.
//! - [`pcm`]: 16-bit little-endian PCM bytes ↔ samples, and decoding/encoding any
//!   [`AudioFormat`] to and from 16-bit samples.
//! - [`resample`]: a streaming band-limited resampler (windowed sinc, via rubato) whose output
//!   is delay-compensated, so N input samples always become N × ratio output samples.
//! - [`convert`]: [`Converter`], format to format, stateful across frames.
//! - [`wav`]: reading any PCM WAV to mono samples, and writing WAV files.
//! - [`playout`]: the playout clock: one 20 ms frame every 20 ms, clear, marks, played ms.
//! - [`vad`]: voice activity (earshot) with hysteresis, for barge-in.
//! - [`dtmf`]: in-band DTMF: a tone generator and a Goertzel detector.
//! - [`recording`]: the stereo call recording (caller left, agent right): [`recording::Recorder`]
//!   per call queues sample batches, never blocking; [`recording::Recordings`], one per server,
//!   writes every recording to disk on its own thread.
//!
//! Samples are `i16` everywhere at the edges; the resampler works in `f32` inside.

pub mod convert;
pub mod dtmf;
pub mod g711;
pub mod pcm;
pub mod playout;
pub mod recording;
pub mod resample;
pub mod vad;
pub mod wav;

pub use callgate_proto::AudioFormat;
pub use convert::Converter;
pub use resample::Resampler;

/// An audio failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The resampler could not be built for this pair of rates.
    #[error("cannot resample from {from} Hz to {to} Hz: {detail}")]
    Resampler {
        /// Input rate.
        from: u32,
        /// Output rate.
        to: u32,
        /// What rubato said.
        detail: String,
    },
    /// A WAV file could not be read or written.
    #[error("WAV file: {0}")]
    Wav(#[from] hound::Error),
    /// A WAV file in a sample format we do not read.
    #[error("unsupported WAV sample format: {0}")]
    UnsupportedWav(String),
    /// A recording was refused: [`recording::Config::max_open`] recordings are open already.
    #[error("too many recordings open (limit {limit})")]
    TooManyRecordings {
        /// The limit.
        limit: usize,
    },
    /// The recording is no longer written: its failure was returned already, or the
    /// recording writer was closed.
    #[error("recording stopped")]
    RecordingStopped,
    /// The recording reached the largest size a WAV file can hold (4 GiB); it is complete up
    /// to there.
    #[error("recording reached the WAV size limit")]
    RecordingFull,
    /// The recording writer's thread could not be started.
    #[error("cannot start the recording writer: {0}")]
    RecordingWriterStart(#[source] std::io::Error),
    /// The recording writer's thread panicked: recordings it had open may be incomplete.
    #[error("the recording writer panicked")]
    RecordingWriterPanicked,
    /// The recording writer had not finished when the wait ran out.
    #[error("the recording writer did not finish within {0:?}")]
    RecordingWriterBusy(std::time::Duration),
}
