//! An incremental sentence splitter for an answer that streams in: text in as the LLM writes
//! it ([`Splitter::push`]), sentences out as soon as each is complete
//! ([`Splitter::poll_sentence`]), so the first goes to text-to-speech before the LLM has
//! finished.
//!
//! A sentence ends at `.`, `!`, `?` or `…` followed by white space (so `3.5` and `www.a.kr`
//! do not end one), at the full-width and ideographic `。`, `！`, `？`, `｡` (no space needed:
//! Chinese and Japanese write none), or at a line break; closing quotes and brackets right
//! after the punctuation (`"`, `”`, `’`, `」`, `』`, `)`, `）`...) stay with the sentence.
//! Korean ends sentences with the ASCII marks and spaces, so it is covered by the first rule.
//! The splitter waits for the character after a sentence's end before it decides (a closing
//! quote may still come).
//!
//! A sentence that grows past `max_chars` without an end is cut at its last clause boundary
//! (`,`, `;`, `:` followed by space, or `、`, `，`, `；`, `：`), else at its last space, else at
//! `max_chars`: a run-on answer still starts playing early.

/// Characters that end a sentence only when white space follows.
fn ends_before_space(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…')
}

/// Characters that end a sentence on their own.
fn ends_alone(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '｡')
}

/// Closing quotes and brackets that stay with the sentence before them.
fn closes(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '”' | '’' | '」' | '』' | ')' | '）' | ']' | '】' | '》' | '〉' | '»'
    )
}

/// A clause boundary: `(character, needs a space after it)`.
fn clause(c: char) -> Option<bool> {
    match c {
        ',' | ';' | ':' => Some(true),
        '、' | '，' | '；' | '：' => Some(false),
        _ => None,
    }
}

/// The splitter of one answer.
#[derive(Debug)]
pub struct Splitter {
    buf: String,
    max_chars: usize,
}

impl Splitter {
    /// A splitter cutting sentences longer than `max_chars` (at least 8) at a clause.
    pub fn new(max_chars: usize) -> Self {
        Self {
            buf: String::new(),
            max_chars: max_chars.max(8),
        }
    }

    /// Adds the next text of the answer.
    pub fn push(&mut self, text: &str) {
        self.buf.push_str(text);
    }

    /// The next complete sentence (trimmed, never empty).
    pub fn poll_sentence(&mut self) -> Option<String> {
        loop {
            let end = self.sentence_end().or_else(|| self.clause_end())?;
            let sentence: String = self.buf[..end].trim().to_owned();
            self.buf.drain(..end);
            if !sentence.is_empty() {
                return Some(sentence);
            }
        }
    }

    /// The rest, once the answer is complete (trimmed; `None` when only space is left).
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let rest = rest.trim();
        (!rest.is_empty()).then(|| rest.to_owned())
    }

    /// The byte index just past the first complete sentence, if one is complete.
    fn sentence_end(&self) -> Option<usize> {
        let chars: Vec<(usize, char)> = self.buf.char_indices().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i].1;
            if c == '\n' {
                return Some(chars[i].0 + 1);
            }
            if ends_before_space(c) || ends_alone(c) {
                let mut j = i + 1;
                // A run of marks (`?!`, `...`) and the closers after them.
                while j < chars.len() && (ends_before_space(chars[j].1) || ends_alone(chars[j].1)) {
                    j += 1;
                }
                while j < chars.len() && closes(chars[j].1) {
                    j += 1;
                }
                let alone = chars[i..j].iter().any(|&(_, m)| ends_alone(m));
                // The character after decides; none yet: wait for more text.
                let &(at, next) = chars.get(j)?;
                if alone || next.is_whitespace() {
                    return Some(at);
                }
                i = j;
                continue;
            }
            i += 1;
        }
        None
    }

    /// When the text passed `max_chars` without a sentence end: where to cut it.
    fn clause_end(&self) -> Option<usize> {
        let chars: Vec<(usize, char)> = self.buf.char_indices().collect();
        if chars.len() <= self.max_chars {
            return None;
        }
        let window = &chars[..self.max_chars];
        let after = |k: usize| chars.get(k + 1).map(|&(at, _)| at);
        let at_clause = window
            .iter()
            .enumerate()
            .rev()
            .find_map(|(k, &(_, c))| match clause(c) {
                Some(true) if chars.get(k + 1).is_some_and(|&(_, n)| n.is_whitespace()) => after(k),
                Some(false) => after(k),
                _ => None,
            });
        let at_space = || {
            window
                .iter()
                .rev()
                .find(|&&(at, c)| c.is_whitespace() && at > 0)
                .map(|&(at, _)| at)
        };
        at_clause
            .or_else(at_space)
            .or_else(|| chars.get(self.max_chars).map(|&(at, _)| at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` one character at a time; the sentences in order, the rest last.
    fn split(text: &str, max: usize) -> Vec<String> {
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        for c in text.chars() {
            s.push(&c.to_string());
            out.extend(std::iter::from_fn(|| s.poll_sentence()));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn korean_english_and_cjk_sentences_split_as_they_stream() {
        assert_eq!(
            split("안녕하세요. 요금 문의요? 네! 확인해 드릴게요", 200),
            ["안녕하세요.", "요금 문의요?", "네!", "확인해 드릴게요"]
        );
        assert_eq!(
            split("こんにちは。お元気ですか？はい", 200),
            ["こんにちは。", "お元気ですか？", "はい"]
        );
        assert_eq!(
            split(
                "It costs 3.5 dollars. See www.example.com now... Okay?!",
                200
            ),
            [
                "It costs 3.5 dollars.",
                "See www.example.com now...",
                "Okay?!"
            ]
        );
    }

    #[test]
    fn closing_quotes_stay_with_their_sentence_and_lines_end_sentences() {
        assert_eq!(
            split("He said \"stop.\" Then left.\n- one\n- two", 200),
            ["He said \"stop.\"", "Then left.", "- one", "- two"]
        );
        assert_eq!(split("「はい。」次", 200), ["「はい。」", "次"]);
    }

    #[test]
    fn the_first_sentence_is_out_before_the_answer_ends() {
        let mut s = Splitter::new(200);
        s.push("첫 문장입니다. 둘");
        assert_eq!(s.poll_sentence().as_deref(), Some("첫 문장입니다."));
        assert_eq!(s.poll_sentence(), None);
        s.push("째");
        assert_eq!(s.finish().as_deref(), Some("둘째"));
    }

    #[test]
    fn a_run_on_sentence_is_cut_at_a_clause_then_a_space() {
        let long = "고객님의 요금은 이번 달 삼만 원이고, 다음 달에는 할인이 적용되어 이만 원입니다";
        let parts = split(long, 30);
        assert_eq!(parts[0], "고객님의 요금은 이번 달 삼만 원이고,");
        assert_eq!(parts.join(" "), long);
        let words = "one two three four five six seven eight nine ten";
        let parts = split(words, 12);
        assert!(parts.iter().all(|p| p.chars().count() <= 12), "{parts:?}");
        assert_eq!(parts.join(" "), words);
        let solid = "가".repeat(20);
        assert_eq!(
            split(&solid, 8),
            ["가".repeat(8), "가".repeat(8), "가".repeat(4)]
        );
    }
}
