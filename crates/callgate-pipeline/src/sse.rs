//! Server-sent events (the WHATWG `text/event-stream` format), decoded incrementally: bytes
//! in as they arrive ([`Decoder::push`]), events out ([`Decoder::poll_event`]).
//!
//! Lines end with `\n`, `\r\n` or `\r` (a `\r` at the end of one chunk and a `\n` at the start
//! of the next are one line end); `data:` lines are joined with `\n`; `event:` names the
//! event; a line starting with `:` is a comment; a blank line dispatches the event (an event
//! with no `data` is not dispatched). One space after the colon is dropped.
//!
//! Bounded: a line, or an event's data, longer than the decoder's `max` bytes is an error (a
//! server that never ends a line cannot grow memory without end), and so is text that is not
//! UTF-8.

use std::collections::VecDeque;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Why the stream cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// A line or an event's data passed the bound.
    #[error("a server-sent event is longer than {0} bytes")]
    TooLong(usize),
    /// A line is not UTF-8.
    #[error("a server-sent event is not UTF-8")]
    NotUtf8,
}

/// The decoder of one stream.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    line: Vec<u8>,
    /// The last byte seen was `\r`: a `\n` next is part of the same line end.
    after_cr: bool,
    data: Option<String>,
    event: Option<String>,
    ready: VecDeque<Event>,
    failed: Option<SseError>,
}

impl Decoder {
    /// A decoder refusing lines and events longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            line: Vec::new(),
            after_cr: false,
            data: None,
            event: None,
            ready: VecDeque::new(),
            failed: None,
        }
    }

    /// Feeds the next bytes of the stream. After an error every call returns it again.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        for &b in bytes {
            let result = match b {
                b'\n' if self.after_cr => {
                    self.after_cr = false;
                    Ok(())
                }
                b'\n' => self.end_line(),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line()
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= self.max {
                        Err(SseError::TooLong(self.max))
                    } else {
                        self.line.push(b);
                        Ok(())
                    }
                }
            };
            if let Err(e) = result {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    /// The next complete event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    fn end_line(&mut self) -> Result<(), SseError> {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.is_empty() {
            let event = self.event.take();
            if let Some(data) = self.data.take() {
                self.ready.push_back(Event {
                    event: event.unwrap_or_else(|| "message".into()),
                    data,
                });
            }
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "data" => {
                let data = self.data.get_or_insert_with(String::new);
                let extra = value.len() + usize::from(!data.is_empty());
                if data.len() + extra > self.max {
                    return Err(SseError::TooLong(self.max));
                }
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            "event" => self.event = Some(value.to_owned()),
            // `id` and `retry` matter to reconnecting browsers, not to one HTTP answer.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(d: &mut Decoder) -> Vec<Event> {
        std::iter::from_fn(|| d.poll_event()).collect()
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\r\n\r\n: keep-alive\n\nevent: done\ndata: x\ndata:y\n\ndata: [DONE]\r\r";
        for cut in 0..stream.len() {
            let mut d = Decoder::new(1024);
            d.push(&stream[..cut]).unwrap();
            d.push(&stream[cut..]).unwrap();
            let events = all(&mut d);
            assert_eq!(
                events,
                vec![
                    Event {
                        event: "message".into(),
                        data: "{\"a\":1}".into()
                    },
                    Event {
                        event: "done".into(),
                        data: "x\ny".into()
                    },
                    Event {
                        event: "message".into(),
                        data: "[DONE]".into()
                    },
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_event_is_dispatched_only_at_the_blank_line() {
        let mut d = Decoder::new(1024);
        d.push(b"data: half\n").unwrap();
        assert_eq!(d.poll_event(), None);
        d.push(b"\n").unwrap();
        assert_eq!(d.poll_event().map(|e| e.data), Some("half".into()));
    }

    #[test]
    fn a_line_or_event_over_the_bound_fails_and_stays_failed() {
        let mut d = Decoder::new(8);
        assert_eq!(d.push(b"data: 123456789"), Err(SseError::TooLong(8)));
        assert_eq!(d.push(b"\n\n"), Err(SseError::TooLong(8)));
        let mut d = Decoder::new(12);
        assert_eq!(
            d.push(b"data: 123456\ndata: 123456\n"),
            Err(SseError::TooLong(12))
        );
        let mut d = Decoder::new(8);
        assert_eq!(d.push(b"data: \xff\n"), Err(SseError::NotUtf8));
    }
}
