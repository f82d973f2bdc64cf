//! Stamped audio frames for the load generator.
//!
//! Layout (little-endian): `magic: u32 = 0xCA11_6A7E`, `call: u32`, `seq: u32`,
//! `sent_ns: u64` (since the run started), then a payload that is a function of
//! `(call, seq, index)`. An echoed frame proves its integrity (magic and payload), its order
//! (seq) and its round-trip time (now − sent_ns), exactly, frame by frame.

/// Bytes of header at the start of every stamped frame.
pub const HEADER: usize = 20;
const MAGIC: u32 = 0xCA11_6A7E;

/// Builds a stamped frame of `len` bytes (at least [`HEADER`]).
pub fn build(call: u32, seq: u32, sent_ns: u64, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len.max(HEADER));
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&call.to_le_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&sent_ns.to_le_bytes());
    for i in HEADER..len.max(HEADER) {
        f.push(payload_byte(call, seq, i));
    }
    f
}

fn payload_byte(call: u32, seq: u32, i: usize) -> u8 {
    (call.wrapping_mul(131) ^ seq.wrapping_mul(31) ^ (i as u32).wrapping_mul(7)) as u8
}

/// A frame that came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Intact: its call, sequence number and send time.
    Intact {
        /// The call it belongs to.
        call: u32,
        /// Its sequence number.
        seq: u32,
        /// When it was sent, ns since the run started.
        sent_ns: u64,
    },
    /// Not a stamped frame, or its payload changed.
    Corrupt,
}

/// Checks an echoed frame.
pub fn check(frame: &[u8]) -> Checked {
    if frame.len() < HEADER {
        return Checked::Corrupt;
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    if u32_at(0) != MAGIC {
        return Checked::Corrupt;
    }
    let (call, seq) = (u32_at(4), u32_at(8));
    let mut ns = [0u8; 8];
    ns.copy_from_slice(&frame[12..20]);
    let intact = frame[HEADER..]
        .iter()
        .enumerate()
        .all(|(k, &b)| b == payload_byte(call, seq, HEADER + k));
    if intact {
        Checked::Intact {
            call,
            seq,
            sent_ns: u64::from_le_bytes(ns),
        }
    } else {
        Checked::Corrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let f = build(7, 42, 123_456_789, 320);
        assert_eq!(f.len(), 320);
        assert_eq!(
            check(&f),
            Checked::Intact {
                call: 7,
                seq: 42,
                sent_ns: 123_456_789
            }
        );
        let mut bad = f.clone();
        bad[200] ^= 1;
        assert_eq!(check(&bad), Checked::Corrupt);
        assert_eq!(check(&f[..10]), Checked::Corrupt);
    }
}
