//! A client of the live event stream (`GET /api/stream`, server-sent events) over a plain
//! socket, for tests that run the server as a child process and so cannot watch its store:
//! they wait for what the server announces (a call's `call.ended`) instead of polling the
//! admin API.
//!
//! The server subscribes a stream before it sends the response head, so once
//! [`EventStream::open`] has returned, every event committed after it is delivered: open the
//! stream, then read the state, then wait for the event (see [`ended_call`]). Every await is
//! bounded ([`WAIT`]), and a failure names what was awaited.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest a test waits for the stream to open or for an event it expects.
pub const WAIT: Duration = Duration::from_secs(30);

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its `event:` (`call.ended`, `reset`...).
    pub event: String,
    /// Its `id:` (empty if none).
    pub id: String,
    /// Its `data:` as JSON (a string if it is not JSON).
    pub data: Value,
}

/// An open `GET /api/stream`.
#[derive(Debug)]
pub struct EventStream {
    stream: TcpStream,
    body: Decoder,
}

/// The stream's body, bytes in, events out (sans-IO, so its tests need no socket).
#[derive(Debug, Default)]
struct Decoder {
    /// Body bytes read and not decoded yet (a chunk not whole yet).
    raw: Vec<u8>,
    /// Whether the body is chunked (HTTP/1.1 with no length: it is, from axum).
    chunked: bool,
    /// Decoded bytes not parsed into events yet (an event not whole yet; text is decoded by
    /// whole event, so a character split between reads stays whole).
    text: Vec<u8>,
    /// Events parsed and not handed out yet.
    ready: VecDeque<Event>,
    /// The body has ended (the last chunk, or the server closed).
    ended: bool,
}

impl EventStream {
    /// Opens the stream of the admin API at `admin`, with extra request headers
    /// (`Authorization`, `Last-Event-ID`); panics unless it answers 200 within [`WAIT`].
    pub async fn open(admin: SocketAddr, headers: &[(&str, &str)]) -> Self {
        tokio::time::timeout(WAIT, Self::open_unbounded(admin, headers))
            .await
            .unwrap_or_else(|_| panic!("GET /api/stream did not answer within {WAIT:?}"))
    }

    async fn open_unbounded(admin: SocketAddr, headers: &[(&str, &str)]) -> Self {
        let mut stream = TcpStream::connect(admin)
            .await
            .expect("connect to the admin API");
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!(
            "GET /api/stream HTTP/1.1\r\nHost: {admin}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the stream request");
        let mut raw = Vec::new();
        let split = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.expect("read the stream's head");
            assert!(n > 0, "the stream closed before its head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines.next().unwrap_or_default();
        assert!(
            status.split_whitespace().nth(1) == Some("200"),
            "GET /api/stream answered {status:?}: {}",
            String::from_utf8_lossy(&raw[split + 4..])
        );
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        assert!(
            header("content-type").is_some_and(|t| t.starts_with("text/event-stream")),
            "GET /api/stream is not an event stream: {head}"
        );
        let chunked =
            header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        let mut body = Decoder {
            chunked,
            ..Decoder::default()
        };
        body.feed(&raw[split + 4..]);
        Self { stream, body }
    }

    /// The first event from now on for which `want` holds, skipping the others; panics,
    /// naming `what`, if the stream ends first or [`WAIT`] passes.
    pub async fn wait_for(&mut self, what: &str, mut want: impl FnMut(&Event) -> bool) -> Event {
        let wait = async {
            loop {
                match self.next_unbounded().await {
                    Some(event) if want(&event) => return event,
                    Some(_) => {}
                    None => panic!("waited for {what}: the event stream ended first"),
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("waited {WAIT:?} for {what} on the event stream"))
    }

    /// The first `kind` event (`call.started`, `call.ended`...) of the call with external id
    /// `external_id` from now on; panics, naming both, after [`WAIT`].
    pub async fn wait_for_call(&mut self, kind: &str, external_id: &str) -> Event {
        self.wait_for(&format!("{kind} of call {external_id}"), |e| {
            e.event == kind && e.data["data"]["external_id"] == external_id
        })
        .await
    }

    async fn next_unbounded(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.body.ready.pop_front() {
                return Some(event);
            }
            if self.body.ended {
                return None;
            }
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => self.body.close(),
                Ok(n) => self.body.feed(&buf[..n]),
            }
        }
    }
}

impl Decoder {
    /// Takes bytes of the body: the events they complete become ready.
    fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        self.decode();
        self.parse();
    }

    /// The connection closed: the body has ended.
    fn close(&mut self) {
        self.ended = true;
    }

    /// Moves the whole chunks of `raw` (or all of it, unchunked) into `text`.
    fn decode(&mut self) {
        if self.ended {
            // After the last chunk (its trailer's blank line): nothing more is the body.
            self.raw.clear();
            return;
        }
        if !self.chunked {
            self.text.append(&mut self.raw);
            return;
        }
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line = String::from_utf8_lossy(&self.raw[..line_end]);
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("a bad chunk size in the event stream: {line:?}"));
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.text.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next ready event.
    #[cfg(test)]
    fn pop(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// Moves the whole events of `text` into `ready`.
    fn parse(&mut self) {
        // An event ends at a blank line: `\n\n` (axum's), or `\r\n\r\n`.
        let blank = |t: &[u8]| {
            let lf = t.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
            let crlf = t.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            match (lf, crlf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        while let Some(end) = blank(&self.text) {
            let block: Vec<u8> = self.text.drain(..end).collect();
            let block = String::from_utf8_lossy(&block);
            let (mut event, mut id, mut data) = (String::new(), String::new(), Vec::new());
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = value.to_owned(),
                    "id" => id = value.to_owned(),
                    "data" => data.push(value),
                    // A comment (`: keep-alive`), or a field this client does not use.
                    _ => {}
                }
            }
            if event.is_empty() && data.is_empty() {
                continue;
            }
            let data = data.join("\n");
            self.ready.push_back(Event {
                event: if event.is_empty() {
                    "message".into()
                } else {
                    event
                },
                id,
                data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
            });
        }
    }
}

/// The record of the call with external id `external_id` once it has ended, from the admin
/// API at `admin` (with `headers`, for a token): read at once if it has ended, or else after
/// the event stream announced its `call.ended`. Panics, naming the call, after [`WAIT`].
pub async fn ended_call(admin: SocketAddr, headers: &[(&str, &str)], external_id: &str) -> Value {
    // Subscribed before the read: an end committed between the two is on the stream.
    let mut stream = EventStream::open(admin, headers).await;
    if let Some(record) = find_ended(admin, headers, external_id).await {
        return record;
    }
    stream.wait_for_call("call.ended", external_id).await;
    find_ended(admin, headers, external_id)
        .await
        .unwrap_or_else(|| panic!("call {external_id}: call.ended came, but no ended record"))
}

/// The ended record of `external_id` among the newest calls, if it is there.
async fn find_ended(
    admin: SocketAddr,
    headers: &[(&str, &str)],
    external_id: &str,
) -> Option<Value> {
    let (status, body) =
        crate::http::request_with(admin, "GET", "/api/calls?limit=1000", None, headers).await;
    assert_eq!(status, 200, "GET /api/calls: {body}");
    let body: Value = serde_json::from_str(&body).expect("GET /api/calls answers JSON");
    body["calls"]
        .as_array()?
        .iter()
        .find(|c| c["external_id"] == external_id && !c["ended_at"].is_null())
        .cloned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chunk(text: &str) -> Vec<u8> {
        chunk_of(text.as_bytes())
    }

    fn chunk_of(bytes: &[u8]) -> Vec<u8> {
        let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn a_character_split_between_chunks_stays_whole() {
        let text = "data: \"안녕\"\n\n".as_bytes();
        // Inside the first Hangul syllable (3 bytes from byte 7).
        let mut d = Decoder {
            chunked: true,
            ..Decoder::default()
        };
        d.feed(&chunk_of(&text[..8]));
        d.feed(&chunk_of(&text[8..]));
        assert_eq!(d.pop().map(|e| e.data), Some(json!("안녕")));
    }

    #[test]
    fn chunks_split_anywhere_give_whole_events_and_comments_are_skipped() {
        let mut body = Vec::new();
        body.extend(chunk(": keep-alive\n\n"));
        body.extend(chunk("event: call.ended\nid: msg_1\ndata: {\"data\":"));
        body.extend(chunk(
            "{\"external_id\":\"a\"}}\n\nevent: reset\ndata: x\ndata: y\n\n",
        ));
        body.extend(b"0\r\n\r\n");
        // Every split of the bytes gives the same events, and only once whole.
        for cut in 0..body.len() {
            let mut d = Decoder {
                chunked: true,
                ..Decoder::default()
            };
            d.feed(&body[..cut]);
            let mut events: Vec<Event> = std::iter::from_fn(|| d.pop()).collect();
            d.feed(&body[cut..]);
            events.extend(std::iter::from_fn(|| d.pop()));
            assert_eq!(
                events,
                vec![
                    Event {
                        event: "call.ended".into(),
                        id: "msg_1".into(),
                        data: json!({"data": {"external_id": "a"}}),
                    },
                    Event {
                        event: "reset".into(),
                        id: String::new(),
                        data: json!("x\ny"),
                    },
                ],
                "cut at {cut}"
            );
            assert!(d.ended, "the last chunk ends the body (cut at {cut})");
        }
    }

    #[test]
    fn an_unchunked_body_is_read_as_it_comes_and_an_event_not_whole_waits() {
        let mut d = Decoder::default();
        d.feed(b"event: call.started\r\ndata: 1\r\n");
        assert_eq!(d.pop(), None, "no blank line yet");
        d.feed(b"\r\n");
        assert_eq!(
            d.pop(),
            Some(Event {
                event: "call.started".into(),
                id: String::new(),
                data: json!(1),
            })
        );
        assert!(!d.ended);
        d.close();
        assert!(d.ended);
    }
}
