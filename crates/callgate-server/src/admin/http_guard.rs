//! What every admin connection passes through before hyper reads it: each request head is read
//! whole and checked first, so that the requests hyper would refuse with an empty body (a
//! request target over [`MAX_URI`], a head over [`MAX_HEAD`] or with more than
//! [`MAX_HEADERS`] fields, a malformed head) get the API's JSON error instead, and a
//! connection closed while the client is still sending (a body refused before it was read,
//! such as a 413) lingers so that the client reads the answer rather than a reset.
//!
//! # How
//! [`Guarded`] wraps the connection's stream. Reading, it hands hyper a request head only once
//! the head is complete and valid ([`Scan`], sans-IO: bytes in, the bytes hyper may have out),
//! then the body as it comes (its framing followed: `Content-Length` or chunked, so the next
//! head is found). A head that fails the checks is never handed on: hyper reads the end of
//! the stream instead, finishes what it was answering and shuts the connection down; the
//! shutdown writes the [`Refusal`] (`Connection: close`) first. The checks are hyper's own
//! (the same parser, `httparse`, and the same rules for the method, the target, the fields and
//! the body's length) with limits below hyper's, so hyper never meets a head it refuses.
//!
//! # Lingering close
//! Closing a TCP socket with unread bytes in it makes the kernel send a reset, and a client
//! still sending may then lose the answer before reading it (one upload in three got a reset
//! or a 413 without its body). So when the connection is shut down in the middle of a request
//! (its body not all read) or after a refusal, [`Guarded`] sends the answer and a FIN, then
//! reads and drops what the client still sends until it closes: at most [`LINGER`] in all,
//! [`LINGER_IDLE`] without a byte, and [`MAX_LINGER_BYTES`] (nginx's lingering close does
//! the same).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The longest request target (path and query), bytes: longer is a 414 `uri_too_long`.
pub(crate) const MAX_URI: usize = 8 * 1024;
/// The largest request head (request line and header fields), bytes: larger is a 431
/// `headers_too_large`.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a request (hyper's own limit): more is a 431
/// `headers_too_large`.
pub(crate) const MAX_HEADERS: usize = 100;
/// How long a closing connection waits for more of what the client still sends.
pub(crate) const LINGER_IDLE: Duration = Duration::from_secs(5);
/// How long a closing connection reads what the client still sends, at most.
pub(crate) const LINGER: Duration = Duration::from_secs(30);
/// The most a closing connection reads (and drops) before it closes anyway.
pub(crate) const MAX_LINGER_BYTES: u64 = 256 * 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Reads a lingering connection makes before it lets other tasks run (1 MiB).
const LINGER_READS_PER_POLL: u32 = 64;
/// The longest chunk-size or trailer line followed; longer and the guard stops following the
/// body's framing (hyper refuses the body, the request is answered).
const MAX_CHUNK_LINE: usize = 4096;

/// A request the guard answers itself, in the API's error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 400, 414 or 431.
    pub(crate) status: u16,
    /// The stable code: `bad_request`, `uri_too_long` or `headers_too_large`.
    pub(crate) code: &'static str,
    /// What is wrong, in words.
    pub(crate) message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: "bad_request",
            message: format!("malformed request: {}", message.into()),
        }
    }

    fn uri_too_long() -> Self {
        Self {
            status: 414,
            code: "uri_too_long",
            message: format!("the request target is over {MAX_URI} bytes"),
        }
    }

    fn head_too_large(message: String) -> Self {
        Self {
            status: 431,
            code: "headers_too_large",
            message,
        }
    }

    /// The whole HTTP/1.1 answer: the JSON error, `Connection: close`.
    pub(crate) fn response(&self) -> Vec<u8> {
        let reason = match self.status {
            414 => "URI Too Long",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        let body = serde_json::json!({ "error": self.message, "code": self.code }).to_string();
        format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// Where the scan is in the stream of requests.
#[derive(Debug)]
enum State {
    /// Reading a head (the bytes so far are in `Scan::head`).
    Head,
    /// A body of this many bytes still to come.
    Body(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Everything from here on goes to hyper unchecked (an upgrade, a body whose framing
    /// the guard does not follow).
    Through,
}

/// Where a chunked body is.
#[derive(Debug)]
enum Chunk {
    /// The chunk-size line (bytes so far).
    Size(Vec<u8>),
    /// This many bytes of chunk data to come.
    Data(u64),
    /// The CRLF after a chunk's data: bytes of it seen.
    DataEnd(u8),
    /// The trailer section after the last chunk (the current line so far).
    Trailer(Vec<u8>),
}

/// The sans-IO request scanner: bytes read in, the bytes hyper may read out, or a refusal.
#[derive(Debug)]
pub(crate) struct Scan {
    state: State,
    head: Vec<u8>,
}

impl Default for Scan {
    fn default() -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
        }
    }
}

impl Scan {
    /// Takes bytes read from the client; appends to `out` the bytes hyper may have now. A
    /// refused head is not handed on (nor anything after it): the connection is over.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        while !input.is_empty() {
            match &mut self.state {
                State::Through => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Body(left) => {
                    let n = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                    out.extend_from_slice(&input[..n]);
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                    input = &input[n..];
                }
                State::Chunked(chunk) => {
                    let (used, next) = chunk_step(chunk, input);
                    out.extend_from_slice(&input[..used]);
                    input = &input[used..];
                    if let Some(next) = next {
                        self.state = next;
                    }
                }
                State::Head => {
                    let (used, complete) = self.head_step(input)?;
                    input = &input[used..];
                    if complete {
                        out.append(&mut self.head);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a request has begun and not all of it was read: closing now would leave the
    /// client sending.
    pub(crate) fn mid_request(&self) -> bool {
        match &self.state {
            State::Head => !self.head.is_empty(),
            State::Body(_) | State::Chunked(_) | State::Through => true,
        }
    }

    /// Adds head bytes; returns how many of `input` belong to the head, and whether the head
    /// is now complete and valid (the state is then its body's).
    fn head_step(&mut self, input: &[u8]) -> Result<(usize, bool), Refusal> {
        let before = self.head.len();
        // Only bytes up to the limit (and a little over, to tell "over" from "at") are kept.
        let room = (MAX_HEAD + 1).saturating_sub(before);
        let taken = &input[..input.len().min(room)];
        self.head.extend_from_slice(taken);
        // A head ends with an empty line: look for one only where the new bytes could end it
        // (a head sent a byte at a time is not parsed again for every byte).
        let from = before.saturating_sub(3);
        let tail = &self.head[from..];
        let ended =
            tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
        if ended && let Some(len) = self.check_head()? {
            // The bytes after the head belong to its body (or the next request).
            let in_head = len.saturating_sub(before);
            self.head.truncate(len);
            return Ok((in_head, true));
        }
        if !self.head.contains(&b'\n') && self.head.len() > MAX_URI + 64 {
            return Err(Refusal::uri_too_long());
        }
        if self.head.len() > MAX_HEAD {
            return Err(Refusal::head_too_large(format!(
                "the request head is over {MAX_HEAD} bytes"
            )));
        }
        Ok((taken.len(), false))
    }

    /// Parses the head so far: `None` while it is incomplete; its length once complete and
    /// valid (the state is then its body's).
    fn check_head(&mut self) -> Result<Option<usize>, Refusal> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut fields);
        let len = match request.parse(&self.head) {
            Ok(httparse::Status::Partial) => return Ok(None),
            Ok(httparse::Status::Complete(len)) => len,
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::head_too_large(format!(
                    "more than {MAX_HEADERS} header fields"
                )));
            }
            Err(error) => return Err(Refusal::bad(error.to_string())),
        };
        if len > MAX_HEAD {
            return Err(Refusal::head_too_large(format!(
                "the request head is over {MAX_HEAD} bytes"
            )));
        }
        let (Some(method), Some(target), Some(version)) =
            (request.method, request.path, request.version)
        else {
            return Err(Refusal::bad("incomplete request line"));
        };
        if target.len() > MAX_URI {
            return Err(Refusal::uri_too_long());
        }
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Refusal::bad(format!("invalid method {method:?}")))?;
        Uri::try_from(target).map_err(|e| Refusal::bad(format!("request target: {e}")))?;
        let http11 = version == 1;
        let mut upgrade = method == Method::CONNECT;
        let mut chunked = None;
        let mut length: Option<u64> = None;
        for field in request.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| Refusal::bad(format!("invalid header name {:?}", field.name)))?;
            HeaderValue::from_bytes(field.value)
                .map_err(|_| Refusal::bad(format!("invalid value of header {name}")))?;
            if name == axum::http::header::TRANSFER_ENCODING {
                if !http11 {
                    return Err(Refusal::bad("HTTP/1.0 cannot have Transfer-Encoding"));
                }
                let last = std::str::from_utf8(field.value)
                    .ok()
                    .and_then(|v| v.rsplit(',').next())
                    .map(str::trim);
                chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")));
            } else if name == axum::http::header::CONTENT_LENGTH {
                let n =
                    digits(field.value).ok_or_else(|| Refusal::bad("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Refusal::bad("Content-Length given twice, differently"));
                }
                length = Some(n);
            } else if name == axum::http::header::UPGRADE {
                upgrade = http11;
            }
        }
        self.state = match (upgrade, chunked, length) {
            (true, ..) => State::Through,
            (false, Some(false), _) => {
                return Err(Refusal::bad("Transfer-Encoding does not end in chunked"));
            }
            (false, Some(true), _) => State::Chunked(Chunk::Size(Vec::new())),
            (false, None, Some(n)) if n > 0 => State::Body(n),
            (false, None, _) => State::Head,
        };
        Ok(Some(len))
    }
}

/// A `Content-Length` value: digits only, as hyper takes it.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// One step through a chunked body: how many of `input` it used, and the scan's next state
/// when the body is over (or when the guard stops following it).
fn chunk_step(chunk: &mut Chunk, input: &[u8]) -> (usize, Option<State>) {
    match chunk {
        Chunk::Size(line) => {
            let Some(end) = input.iter().position(|&b| b == b'\n') else {
                line.extend_from_slice(input);
                let next = (line.len() > MAX_CHUNK_LINE).then_some(State::Through);
                return (input.len(), next);
            };
            line.extend_from_slice(&input[..end]);
            // The size, before any chunk extension (`;name=value`) and the CR.
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size).map(str::trim).unwrap_or("-");
            match u64::from_str_radix(size, 16) {
                Ok(0) => *chunk = Chunk::Trailer(Vec::new()),
                Ok(n) => *chunk = Chunk::Data(n),
                // hyper refuses the body; the guard stops following it.
                Err(_) => return (end + 1, Some(State::Through)),
            }
            (end + 1, None)
        }
        Chunk::Data(left) => {
            let n = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
            *left -= n as u64;
            if *left == 0 {
                *chunk = Chunk::DataEnd(0);
            }
            (n, None)
        }
        Chunk::DataEnd(seen) => match (input[0], *seen) {
            (b'\r', 0) => {
                *seen = 1;
                (1, None)
            }
            (b'\n', _) => {
                *chunk = Chunk::Size(Vec::new());
                (1, None)
            }
            _ => (0, Some(State::Through)),
        },
        Chunk::Trailer(line) => {
            let Some(end) = input.iter().position(|&b| b == b'\n') else {
                line.extend_from_slice(input);
                let next = (line.len() > MAX_CHUNK_LINE).then_some(State::Through);
                return (input.len(), next);
            };
            line.extend_from_slice(&input[..end]);
            if line.is_empty() || line.as_slice() == b"\r" {
                return (end + 1, Some(State::Head));
            }
            line.clear();
            (end + 1, None)
        }
    }
}

/// How a connection's end goes.
#[derive(Debug)]
enum Closing {
    /// Open.
    Open,
    /// Writing the refusal (bytes written so far).
    Answering(usize),
    /// Shutting down the write side.
    Finishing,
    /// Reading and dropping what the client still sends: until `idle` fires (pushed back
    /// by each read, never past `until`).
    Lingering {
        idle: Pin<Box<Sleep>>,
        until: Instant,
        read: u64,
    },
    /// Closed.
    Done,
}

/// A connection's stream behind the guard (see the module's doc).
#[derive(Debug)]
pub(crate) struct Guarded<IO> {
    io: IO,
    scan: Scan,
    /// Bytes checked and not yet read by hyper, from `at`.
    ready: Vec<u8>,
    at: usize,
    /// The head refused; written at shutdown.
    refusal: Option<Refusal>,
    closing: Closing,
}

impl<IO> Guarded<IO> {
    /// Guards `io`.
    pub(crate) fn new(io: IO) -> Self {
        Self {
            io,
            scan: Scan::default(),
            ready: Vec::new(),
            at: 0,
            refusal: None,
            closing: Closing::Open,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.at);
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                return Poll::Ready(Ok(()));
            }
            if this.refusal.is_some() {
                // The end of the stream, as far as hyper knows: it closes, and the shutdown
                // answers.
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.ready.clear();
            this.at = 0;
            if let Err(refusal) = this.scan.feed(read.filled(), &mut this.ready) {
                tracing::debug!(
                    status = refusal.status,
                    code = refusal.code,
                    "Refusing a malformed admin request."
                );
                this.refusal = Some(refusal);
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut reads = 0;
        loop {
            match &mut this.closing {
                Closing::Open => {
                    this.closing = if this.refusal.is_some() {
                        Closing::Answering(0)
                    } else {
                        Closing::Finishing
                    };
                }
                Closing::Answering(written) => {
                    let answer = this.refusal.as_ref().map(Refusal::response);
                    let answer = answer.as_deref().unwrap_or_default();
                    if *written < answer.len() {
                        let n = ready!(Pin::new(&mut this.io).poll_write(cx, &answer[*written..]))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *written += n;
                        continue;
                    }
                    ready!(Pin::new(&mut this.io).poll_flush(cx))?;
                    this.closing = Closing::Finishing;
                }
                Closing::Finishing => {
                    ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                    this.closing = if this.refusal.is_some() || this.scan.mid_request() {
                        let now = Instant::now();
                        Closing::Lingering {
                            idle: Box::pin(tokio::time::sleep_until(now + LINGER_IDLE)),
                            until: now + LINGER,
                            read: 0,
                        }
                    } else {
                        Closing::Done
                    };
                }
                Closing::Lingering { idle, until, read } => {
                    reads += 1;
                    if reads > LINGER_READS_PER_POLL {
                        // A fast sender is not read in one go: the worker serves others too.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    let mut chunk = [0u8; READ_CHUNK];
                    let mut buf = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *read += buf.filled().len() as u64;
                            let now = Instant::now();
                            if *read > MAX_LINGER_BYTES || now >= *until {
                                this.closing = Closing::Done;
                            } else {
                                idle.as_mut().reset((now + LINGER_IDLE).min(*until));
                            }
                        }
                        // The client closed, or the connection failed: nothing to wait for.
                        Poll::Ready(_) => this.closing = Closing::Done,
                        Poll::Pending => {
                            ready!(idle.as_mut().poll(cx));
                            this.closing = Closing::Done;
                        }
                    }
                }
                Closing::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; what hyper gets and the refusal, if any.
    fn scan(input: &[u8], step: usize) -> (Vec<u8>, Option<Refusal>) {
        let mut scan = Scan::default();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            if let Err(refusal) = scan.feed(piece, &mut out) {
                return (out, Some(refusal));
            }
        }
        (out, None)
    }

    #[test]
    fn good_requests_pass_whole_in_any_pieces() {
        let requests: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /api/y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 2, 7, 64, requests.len()] {
            let mut scan = Scan::default();
            let mut out = Vec::new();
            for piece in requests.chunks(step) {
                scan.feed(piece, &mut out).expect("valid");
            }
            assert_eq!(out, requests, "step {step}");
            assert!(!scan.mid_request(), "step {step}: between requests");
        }
    }

    #[test]
    fn a_head_is_handed_on_only_once_complete() {
        let mut scan = Scan::default();
        let mut out = Vec::new();
        scan.feed(b"GET / HTTP/1.1\r\nHost:", &mut out)
            .expect("partial");
        assert!(out.is_empty(), "a partial head is held back");
        assert!(scan.mid_request());
        scan.feed(b" a\r\n\r\n", &mut out).expect("complete");
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn a_body_not_all_read_is_mid_request() {
        let mut scan = Scan::default();
        let mut out = Vec::new();
        scan.feed(
            b"POST /p HTTP/1.1\r\nContent-Length: 100000000\r\n\r\nRIFF",
            &mut out,
        )
        .expect("valid");
        assert!(scan.mid_request());
    }

    #[test]
    fn over_long_targets_and_heads_are_refused_with_their_status() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_URI));
        for step in [100, long.len()] {
            let (out, refusal) = scan(long.as_bytes(), step);
            assert!(out.is_empty());
            assert_eq!(refusal.expect("refused").status, 414, "step {step}");
        }
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(MAX_HEAD));
        let (_, refusal) = scan(big.as_bytes(), 1000);
        let refusal = refusal.expect("refused");
        assert_eq!((refusal.status, refusal.code), (431, "headers_too_large"));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let (_, refusal) = scan(many.as_bytes(), many.len());
        let refusal = refusal.expect("refused");
        assert_eq!(refusal.status, 431);
        assert!(refusal.message.contains("more than 100"), "{refusal:?}");
    }

    #[test]
    fn malformed_heads_are_400s() {
        for bad in [
            &b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"[..],
            b"GET / HTTP/9.9\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (out, refusal) = scan(bad, bad.len());
            let refusal =
                refusal.unwrap_or_else(|| panic!("{:?} passed", String::from_utf8_lossy(bad)));
            assert_eq!(
                (refusal.status, refusal.code),
                (400, "bad_request"),
                "{refusal:?}"
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn a_refusal_after_good_requests_keeps_them() {
        let input = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nBad Name: x\r\n\r\n";
        let (out, refusal) = scan(input, input.len());
        assert_eq!(out, b"GET /a HTTP/1.1\r\n\r\n");
        assert_eq!(refusal.expect("refused").status, 400);
    }

    #[test]
    fn an_upgrade_goes_through_unchecked() {
        let input =
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        let (out, refusal) = scan(input, 3);
        assert_eq!(refusal, None);
        assert_eq!(out, input);
    }

    #[test]
    fn the_refusal_is_the_api_json_with_connection_close() {
        let text = String::from_utf8(Refusal::uri_too_long().response()).expect("text");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(body["code"], "uri_too_long");
        assert!(
            body["error"].as_str().expect("error").contains("8192"),
            "{body}"
        );
    }
}
