//! Text from the network in logs: escaped and bounded ([`Escaped`]); phone numbers also redacted
//! unless the operator turned `log_pii` on ([`Pii`]).
//!
//! Anything a peer sent (ids, numbers, refusal reasons that quote a field, errors) is logged
//! only through these wrappers: a peer must not be able to forge a log line (a newline), drive
//! a terminal (an ANSI escape), make one line huge, or learn anything from a redaction.

use std::fmt::{self, Write as _};

/// The most characters of one value from the network a log line shows; the rest is summarised
/// as the number of bytes left out.
pub(crate) const MAX_SHOWN: usize = 128;

/// Text that came from the network, for logs: shown in double quotes, with backslashes,
/// quotes and every control or invisible formatting character escaped (`\n`, `\"`,
/// `\u{1b}`), and cut after [`MAX_SHOWN`] characters (`…(+1048000 bytes)`). Nothing is
/// formatted unless the log line is enabled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for (shown, (at, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_SHOWN {
                return write!(f, "\"…(+{} bytes)", self.0.len() - at);
            }
            escape(c, f)?;
        }
        f.write_char('"')
    }
}

fn escape(c: char, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match c {
        '\\' => f.write_str("\\\\"),
        '"' => f.write_str("\\\""),
        '\n' => f.write_str("\\n"),
        '\r' => f.write_str("\\r"),
        '\t' => f.write_str("\\t"),
        c if hidden(c) => write!(f, "\\u{{{:x}}}", u32::from(c)),
        c => f.write_char(c),
    }
}

/// Control characters (C0, DEL, C1: newlines, ANSI escapes) and the invisible ones that can
/// split, hide or reorder what a terminal or a log viewer shows: zero-width characters, line
/// and paragraph separators, bidirectional embeddings, overrides and isolates, the BOM.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
        )
}

/// A value that is personal data (a phone number). Redacted, it displays as `***34`: the last
/// two characters kept when they are ASCII letters or digits (so an operator can still tell
/// calls apart; a value of 4 characters or fewer shows none), and nothing that tells its
/// length. With `log_pii` it displays as [`Escaped`] text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pii<'a> {
    value: &'a str,
    reveal: bool,
}

impl<'a> Pii<'a> {
    pub(crate) fn new(value: &'a str, reveal: bool) -> Self {
        Self { value, reveal }
    }
}

impl fmt::Display for Pii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reveal {
            return Escaped(self.value).fmt(f);
        }
        f.write_str("***")?;
        if self.value.chars().nth(4).is_none() {
            return Ok(());
        }
        let mut last = self.value.chars().rev();
        let (b, a) = (last.next(), last.next());
        for c in [a, b].into_iter().flatten() {
            f.write_char(if c.is_ascii_alphanumeric() { c } else { '?' })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_all_but_the_last_two_without_telling_the_length() {
        assert_eq!(Pii::new("01012341234", false).to_string(), "***34");
        assert_eq!(Pii::new(&"0".repeat(1_000_000), false).to_string(), "***00");
        assert_eq!(Pii::new("1234", false).to_string(), "***");
        assert_eq!(Pii::new("", false).to_string(), "***");
        assert_eq!(Pii::new("0101234\n\u{1b}", false).to_string(), "***??");
        assert_eq!(Pii::new("01012341234", true).to_string(), "\"01012341234\"");
        assert_eq!(Pii::new("010\n12", true).to_string(), "\"010\\n12\"");
    }

    #[test]
    fn wire_text_is_escaped() {
        let shown = Escaped("a\nb\r\t\"c\\ \u{1b}[31m \u{202e} \u{85} ok é").to_string();
        assert_eq!(shown, r#""a\nb\r\t\"c\\ \u{1b}[31m \u{202e} \u{85} ok é""#);
        assert!(!shown.chars().any(char::is_control));
    }

    #[test]
    fn wire_text_is_bounded() {
        let long = "x".repeat(MAX_SHOWN + 1000);
        let shown = Escaped(&long).to_string();
        assert_eq!(
            shown,
            format!("\"{}\"…(+1000 bytes)", "x".repeat(MAX_SHOWN))
        );
        // The bound counts the value's characters; an escaped one takes at most 10 bytes.
        let newlines = "\n".repeat(10_000);
        assert!(Escaped(&newlines).to_string().len() < 2 * MAX_SHOWN + 32);
        assert_eq!(
            Escaped(&"y".repeat(MAX_SHOWN)).to_string().len(),
            MAX_SHOWN + 2
        );
    }
}
