//! G.711 mu-law and A-law (ITU-T G.711), the classic segment algorithm; decoding goes through
//! 256-entry tables built at compile time.

/// Encodes one 16-bit sample to mu-law, as the ITU-T G.191 reference does: in the 14-bit
/// domain, with the one's complement as the magnitude of negative values.
pub fn ulaw_encode(sample: i16) -> u8 {
    let x = i32::from(sample) >> 2;
    let (magnitude, sign) = if x < 0 { (!x, 0x80u8) } else { (x, 0) };
    let biased = magnitude + 33;
    let code = if biased > 0x1FFF {
        0x7F
    } else {
        // Segment = how many bits the biased value has beyond the first segment's six.
        let segment = (32 - biased.leading_zeros() as i32 - 6).max(0);
        ((segment << 4) | ((biased >> (segment + 1)) & 0x0F)) as u8
    };
    !(sign | code)
}

/// Decodes one mu-law byte.
pub const fn ulaw_decode(byte: u8) -> i16 {
    let b = !byte;
    let sign = b & 0x80;
    let exponent = ((b >> 4) & 0x07) as i32;
    let mantissa = (b & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if sign != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Encodes one 16-bit sample to A-law (G.191: 13-bit domain, one's complement for negatives).
pub fn alaw_encode(sample: i16) -> u8 {
    let mut s = i32::from(sample) >> 3; // 13-bit magnitude domain
    let sign = if s >= 0 {
        0x80
    } else {
        s = -s - 1;
        0
    };
    let s = s.min(0x0FFF);
    let byte = if s < 32 {
        (s >> 1) as u8
    } else {
        let exponent = (31 - s.leading_zeros() as i32) - 4; // 1..=7
        let mantissa = (s >> exponent) & 0x0F;
        ((exponent << 4) as u8) | mantissa as u8
    };
    (byte | sign) ^ 0x55
}

/// Decodes one A-law byte.
pub const fn alaw_decode(byte: u8) -> i16 {
    let b = byte ^ 0x55;
    let sign = b & 0x80;
    let exponent = ((b >> 4) & 0x07) as i32;
    let mantissa = (b & 0x0F) as i32;
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    if sign != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

const fn ulaw_table() -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = ulaw_decode(i as u8);
        i += 1;
    }
    t
}

const fn alaw_table() -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = alaw_decode(i as u8);
        i += 1;
    }
    t
}

/// mu-law byte → sample.
pub static ULAW_TO_PCM: [i16; 256] = ulaw_table();
/// A-law byte → sample.
pub static ALAW_TO_PCM: [i16; 256] = alaw_table();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_independent_implementation() {
        use audio_codec_algorithms as other;
        for s in i16::MIN..=i16::MAX {
            assert_eq!(ulaw_encode(s), other::encode_ulaw(s), "ulaw encode {s}");
            assert_eq!(alaw_encode(s), other::encode_alaw(s), "alaw encode {s}");
        }
        for b in 0..=255u8 {
            assert_eq!(
                ULAW_TO_PCM[b as usize],
                other::decode_ulaw(b),
                "ulaw decode {b}"
            );
            assert_eq!(
                ALAW_TO_PCM[b as usize],
                other::decode_alaw(b),
                "alaw decode {b}"
            );
        }
    }

    #[test]
    fn decode_then_encode_is_identity() {
        for b in 0..=255u8 {
            // 0x7F and 0xFF both decode to 0 in mu-law ("negative zero"): 0 encodes to 0xFF.
            if b != 0x7F {
                assert_eq!(ulaw_encode(ULAW_TO_PCM[b as usize]), b);
            }
            assert_eq!(alaw_encode(ALAW_TO_PCM[b as usize]), b);
        }
    }
}
