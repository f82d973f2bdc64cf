//! Audio format names as they travel on the wire (`PCM_8000`, `ULAW_8000`, ...).

use std::fmt;
use std::str::FromStr;

/// An audio format a call can carry. Every format is mono; PCM is signed 16-bit little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AudioFormat {
    /// 16-bit PCM at 8 kHz (the default of both protocols).
    Pcm8000,
    /// 16-bit PCM at 16 kHz.
    Pcm16000,
    /// 16-bit PCM at 24 kHz.
    Pcm24000,
    /// 16-bit PCM at 48 kHz.
    Pcm48000,
    /// G.711 mu-law at 8 kHz.
    Ulaw8000,
    /// G.711 A-law at 8 kHz.
    Alaw8000,
}

impl AudioFormat {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pcm8000 => "PCM_8000",
            Self::Pcm16000 => "PCM_16000",
            Self::Pcm24000 => "PCM_24000",
            Self::Pcm48000 => "PCM_48000",
            Self::Ulaw8000 => "ULAW_8000",
            Self::Alaw8000 => "ALAW_8000",
        }
    }

    /// Samples per second.
    pub fn sample_rate(self) -> u32 {
        match self {
            Self::Pcm8000 | Self::Ulaw8000 | Self::Alaw8000 => 8000,
            Self::Pcm16000 => 16000,
            Self::Pcm24000 => 24000,
            Self::Pcm48000 => 48000,
        }
    }

    /// Bytes per sample.
    pub fn bytes_per_sample(self) -> u32 {
        match self {
            Self::Ulaw8000 | Self::Alaw8000 => 1,
            _ => 2,
        }
    }

    /// Bytes in one 20 ms frame (320 for `PCM_8000`).
    pub fn frame_bytes_20ms(self) -> usize {
        (self.sample_rate() / 50 * self.bytes_per_sample()) as usize
    }
}

impl fmt::Display for AudioFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The format name is not one callgate supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unsupported audio format {0:?} (supported: PCM_8000, PCM_16000, PCM_24000, PCM_48000, ULAW_8000, ALAW_8000)"
)]
pub struct UnsupportedFormat(pub String);

impl FromStr for AudioFormat {
    type Err = UnsupportedFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "PCM_8000" => Self::Pcm8000,
            "PCM_16000" => Self::Pcm16000,
            "PCM_24000" => Self::Pcm24000,
            "PCM_48000" => Self::Pcm48000,
            "ULAW_8000" => Self::Ulaw8000,
            "ALAW_8000" => Self::Alaw8000,
            other => return Err(UnsupportedFormat(other.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in [
            AudioFormat::Pcm8000,
            AudioFormat::Pcm16000,
            AudioFormat::Pcm24000,
            AudioFormat::Pcm48000,
            AudioFormat::Ulaw8000,
            AudioFormat::Alaw8000,
        ] {
            assert_eq!(f.as_str().parse::<AudioFormat>().unwrap(), f);
        }
        assert_eq!(AudioFormat::Pcm8000.frame_bytes_20ms(), 320);
        assert_eq!(AudioFormat::Ulaw8000.frame_bytes_20ms(), 160);
        assert!("pcm_8000".parse::<AudioFormat>().is_err());
    }
}
