//! DTMF digits and tone durations, parsed once so invalid values cannot travel further.

use std::fmt;

/// A DTMF key: `0-9 * #` and the rarely used `A-D` column.
///
/// The inbound protocol accepts all sixteen from the phone side; what we send is restricted to
/// `0-9 * #` (see [`Digit::is_sendable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Digit {
    /// 0
    D0,
    /// 1
    D1,
    /// 2
    D2,
    /// 3
    D3,
    /// 4
    D4,
    /// 5
    D5,
    /// 6
    D6,
    /// 7
    D7,
    /// 8
    D8,
    /// 9
    D9,
    /// `*`
    Star,
    /// `#`
    Pound,
    /// A
    A,
    /// B
    B,
    /// C
    C,
    /// D
    D,
}

impl Digit {
    /// Parses one key from its character. Lower-case `a-d` are not accepted: the protocol
    /// names them in upper case.
    pub fn from_char(c: char) -> Option<Self> {
        Some(match c {
            '0' => Self::D0,
            '1' => Self::D1,
            '2' => Self::D2,
            '3' => Self::D3,
            '4' => Self::D4,
            '5' => Self::D5,
            '6' => Self::D6,
            '7' => Self::D7,
            '8' => Self::D8,
            '9' => Self::D9,
            '*' => Self::Star,
            '#' => Self::Pound,
            'A' => Self::A,
            'B' => Self::B,
            'C' => Self::C,
            'D' => Self::D,
            _ => return None,
        })
    }

    /// Parses a one-character string.
    pub fn parse(s: &str) -> Option<Self> {
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Self::from_char(c),
            _ => None,
        }
    }

    /// Parses a digit that we may send to the phone side (`0-9 * #`).
    pub fn parse_sendable(s: &str) -> Option<Self> {
        Self::parse(s).filter(|d| d.is_sendable())
    }

    /// The key's character.
    pub fn as_char(self) -> char {
        match self {
            Self::D0 => '0',
            Self::D1 => '1',
            Self::D2 => '2',
            Self::D3 => '3',
            Self::D4 => '4',
            Self::D5 => '5',
            Self::D6 => '6',
            Self::D7 => '7',
            Self::D8 => '8',
            Self::D9 => '9',
            Self::Star => '*',
            Self::Pound => '#',
            Self::A => 'A',
            Self::B => 'B',
            Self::C => 'C',
            Self::D => 'D',
        }
    }

    /// Whether the inbound protocol lets the server send this key (`0-9 * #`).
    pub fn is_sendable(self) -> bool {
        !matches!(self, Self::A | Self::B | Self::C | Self::D)
    }
}

impl fmt::Display for Digit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// How long a DTMF tone we send lasts: 1..=1000 ms, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DtmfDuration(u16);

impl DtmfDuration {
    /// The longest tone the inbound protocol allows.
    pub const MAX_MS: u64 = 1000;

    /// Validates a duration in milliseconds.
    pub fn from_millis(ms: u64) -> Option<Self> {
        if (1..=Self::MAX_MS).contains(&ms) {
            // In range 1..=1000, so it fits in u16.
            Some(Self(ms as u16))
        } else {
            None
        }
    }

    /// The duration in milliseconds.
    pub fn as_millis(self) -> u16 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_digit_round_trips() {
        for c in "0123456789*#ABCD".chars() {
            let d = Digit::from_char(c).unwrap();
            assert_eq!(d.as_char(), c);
            assert_eq!(d.is_sendable(), !"ABCD".contains(c));
        }
        assert_eq!(Digit::parse("12"), None);
        assert_eq!(Digit::parse(""), None);
        assert_eq!(Digit::parse("a"), None);
        assert_eq!(Digit::parse_sendable("A"), None);
    }

    #[test]
    fn duration_bounds() {
        assert!(DtmfDuration::from_millis(0).is_none());
        assert_eq!(DtmfDuration::from_millis(1).unwrap().as_millis(), 1);
        assert_eq!(DtmfDuration::from_millis(1000).unwrap().as_millis(), 1000);
        assert!(DtmfDuration::from_millis(1001).is_none());
    }
}
