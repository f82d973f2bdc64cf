//! WAV files: any PCM WAV in (8/16/24/32-bit integer or float, any rate, any channels), mono
//! 16-bit out; and writers for mono or stereo 16-bit files.

use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::Error;

/// A WAV file's audio, mixed down to mono 16-bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonoAudio {
    /// Samples per second.
    pub rate: u32,
    /// The samples.
    pub samples: Vec<i16>,
}

/// Reads a WAV file and mixes its channels down to mono 16-bit samples.
pub fn read_mono(path: &Path) -> Result<MonoAudio, Error> {
    read_mono_from(hound::WavReader::open(path)?)
}

/// Reads WAV audio as mono 16-bit (channels averaged; 8, 16, 24, 32-bit integer and 32-bit
/// float samples). Streams: no buffer larger than the result is built.
pub fn read_mono_from<R: Read>(reader: hound::WavReader<R>) -> Result<MonoAudio, Error> {
    read_mono_limited(reader, u64::MAX)
}

/// Like [`read_mono_from`], refusing audio longer than `max_frames` sample frames (per
/// channel) before allocating anything: the header says how long the data is.
pub fn read_mono_limited<R: Read>(
    reader: hound::WavReader<R>,
    max_frames: u64,
) -> Result<MonoAudio, Error> {
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let frames = u64::from(reader.duration());
    if frames > max_frames {
        return Err(Error::UnsupportedWav(format!(
            "{frames} sample frames is longer than the {max_frames} allowed"
        )));
    }
    // A header can claim more than the body holds: reserve at most a million samples up front.
    let mut samples = Vec::with_capacity(usize::try_from(frames.min(1 << 20)).unwrap_or(0));
    let mut mix = Mixer {
        channels,
        sum: 0,
        n: 0,
        out: &mut samples,
    };
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let shift = i32::from(bits) - 16;
            for s in reader.into_samples::<i32>() {
                let v = s?;
                mix.push(if shift >= 0 { v >> shift } else { v << -shift });
            }
        }
        (hound::SampleFormat::Float, 32) => {
            for s in reader.into_samples::<f32>() {
                mix.push((s?.clamp(-1.0, 1.0) * 32767.0) as i32);
            }
        }
        (format, bits) => {
            return Err(Error::UnsupportedWav(format!("{format:?} {bits}-bit")));
        }
    }
    Ok(MonoAudio {
        rate: spec.sample_rate,
        samples,
    })
}

/// Averages each frame's channels into one sample as they stream in.
struct Mixer<'a> {
    channels: usize,
    sum: i32,
    n: usize,
    out: &'a mut Vec<i16>,
}

impl Mixer<'_> {
    fn push(&mut self, v: i32) {
        self.sum += v;
        self.n += 1;
        if self.n == self.channels {
            let mean = self.sum / self.channels as i32;
            self.out
                .push(mean.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16);
            self.sum = 0;
            self.n = 0;
        }
    }
}

/// The spec of a 16-bit PCM WAV.
pub fn spec(rate: u32, channels: u16) -> hound::WavSpec {
    hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

/// Writes mono 16-bit samples to a WAV file.
pub fn write_mono(path: &Path, rate: u32, samples: &[i16]) -> Result<(), Error> {
    let mut w = hound::WavWriter::create(path, spec(rate, 1))?;
    write_samples(&mut w, samples)?;
    w.finalize()?;
    Ok(())
}

/// Appends samples to an open writer.
pub fn write_samples<W: Write + Seek>(
    w: &mut hound::WavWriter<W>,
    samples: &[i16],
) -> Result<(), Error> {
    let mut i16w = w.get_i16_writer(samples.len() as u32);
    for &s in samples {
        i16w.write_sample(s);
    }
    i16w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_bit_depth_and_mixes_channels() {
        for bits in [8u16, 16, 24, 32] {
            let mut buf = std::io::Cursor::new(Vec::new());
            let spec = hound::WavSpec {
                channels: 2,
                sample_rate: 22050,
                bits_per_sample: bits,
                sample_format: hound::SampleFormat::Int,
            };
            {
                let mut w = hound::WavWriter::new(&mut buf, spec).unwrap();
                let full = (1i64 << (bits - 1)) - 1;
                // Left at +half scale, right at 0: the mix is a quarter scale.
                for _ in 0..100 {
                    w.write_sample((full / 2) as i32).unwrap();
                    w.write_sample(0).unwrap();
                }
                w.finalize().unwrap();
            }
            buf.set_position(0);
            let audio = read_mono_from(hound::WavReader::new(buf).unwrap()).unwrap();
            assert_eq!(audio.rate, 22050);
            assert_eq!(audio.samples.len(), 100);
            let expected = 32767 / 4;
            assert!(
                (i32::from(audio.samples[50]) - expected).abs() <= 200,
                "{bits}-bit: {}",
                audio.samples[50]
            );
        }
    }
}
