//! Phone numbers in logs: redacted unless the operator turned `log_pii` on.

use std::fmt;

/// A value that is personal data. Displays as `*******34` (the last two characters kept, so
/// an operator can still tell calls apart) unless revealing was configured.
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
            return f.write_str(self.value);
        }
        let n = self.value.chars().count();
        let keep = if n > 4 { 2 } else { 0 };
        for _ in 0..n - keep {
            f.write_str("*")?;
        }
        for c in self.value.chars().skip(n - keep) {
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_all_but_the_last_two() {
        assert_eq!(Pii::new("01012341234", false).to_string(), "*********34");
        assert_eq!(Pii::new("1234", false).to_string(), "****");
        assert_eq!(Pii::new("01012341234", true).to_string(), "01012341234");
    }
}
