//! An answer's text cut to what the caller heard, so the conversation the LLM reads next
//! never claims it said what the caller never heard.
//!
//! The answer was spoken sentence by sentence; each sentence's audio length is known once it
//! is synthesized, and the call reports how much of the answer played. Sentences heard to
//! their end are kept whole; the sentence playing when the caller barged in is cut in
//! proportion to how much of its audio played, back to a word boundary (a text without spaces,
//! Chinese or Japanese, at a character); sentences never heard are dropped. A cut text ends
//! with a marker (e.g. `…`) the LLM can read as "interrupted here".

/// One sentence as it was spoken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spoken {
    /// Its text.
    pub text: String,
    /// How long its audio is, milliseconds.
    pub audio_ms: u64,
}

/// What the caller heard of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// The text heard (with the marker when cut; empty when nothing was heard).
    pub text: String,
    /// Whether the caller heard it all.
    pub whole: bool,
}

/// What was heard of `spoken` when `heard_ms` of its audio played; `marker` ends a cut text.
pub fn cut(spoken: &[Spoken], heard_ms: u64, marker: &str) -> Heard {
    let mut parts: Vec<String> = Vec::new();
    let mut left = heard_ms;
    for sentence in spoken {
        if left >= sentence.audio_ms {
            left -= sentence.audio_ms;
            // Keys pressed in-band have audio but no text.
            if !sentence.text.is_empty() {
                parts.push(sentence.text.clone());
            }
            continue;
        }
        let partial = cut_sentence(&sentence.text, left, sentence.audio_ms);
        if !partial.is_empty() {
            parts.push(partial);
        }
        let mut text = parts.join(" ");
        if !text.is_empty() {
            text.push_str(marker);
        }
        return Heard { text, whole: false };
    }
    Heard {
        text: parts.join(" "),
        whole: true,
    }
}

/// The start of `text` heard in `heard_ms` of `audio_ms`: proportional by characters, back
/// to a word boundary.
fn cut_sentence(text: &str, heard_ms: u64, audio_ms: u64) -> String {
    let chars: Vec<char> = text.chars().collect();
    if audio_ms == 0 || heard_ms == 0 {
        return String::new();
    }
    let n = usize::try_from(u64::try_from(chars.len()).unwrap_or(u64::MAX) * heard_ms / audio_ms)
        .unwrap_or(chars.len())
        .min(chars.len());
    if !chars.iter().any(|c| c.is_whitespace()) {
        // No words to respect (Chinese, Japanese, one long word): characters.
        return chars[..n].iter().collect();
    }
    // A word is heard when the character after it (a space, or the end) was reached.
    if n == chars.len() || chars[n].is_whitespace() {
        return chars[..n].iter().collect::<String>().trim_end().to_owned();
    }
    match chars[..n].iter().rposition(|c| c.is_whitespace()) {
        Some(space) => chars[..space]
            .iter()
            .collect::<String>()
            .trim_end()
            .to_owned(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spoken(parts: &[(&str, u64)]) -> Vec<Spoken> {
        parts
            .iter()
            .map(|&(t, ms)| Spoken {
                text: t.into(),
                audio_ms: ms,
            })
            .collect()
    }

    #[test]
    fn whole_sentences_stay_and_the_one_playing_is_cut_at_a_word() {
        let s = spoken(&[
            ("안녕하세요.", 1000),
            ("요금은 삼만 원이고 다음 달은 이만 원입니다.", 3000),
        ]);
        assert_eq!(
            cut(&s, 4000, "…"),
            Heard {
                text: "안녕하세요. 요금은 삼만 원이고 다음 달은 이만 원입니다.".into(),
                whole: true
            }
        );
        // Half of the second sentence: 12 of its 25 characters, back to the word before.
        let half = cut(&s, 2500, "…");
        assert_eq!(half.text, "안녕하세요. 요금은 삼만 원이고…");
        assert!(!half.whole);
        // Within the first word of the second sentence: only the first sentence.
        assert_eq!(cut(&s, 1100, "…").text, "안녕하세요.…");
        assert_eq!(
            cut(&s, 0, "…"),
            Heard {
                text: String::new(),
                whole: false
            }
        );
    }

    #[test]
    fn text_without_spaces_is_cut_at_a_character_and_the_rest_is_dropped() {
        let s = spoken(&[
            ("こんにちは。", 600),
            ("お元気ですか？", 700),
            ("はい。", 300),
        ]);
        assert_eq!(cut(&s, 600 + 350, "…").text, "こんにちは。 お元気…");
        assert_eq!(cut(&s, 600 + 700, "").text, "こんにちは。 お元気ですか？");
    }
}
