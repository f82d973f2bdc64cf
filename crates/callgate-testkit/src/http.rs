//! A minimal HTTP/1.1 client for the admin API (one request per connection). Every request
//! is bounded by [`WAIT`], connect included: a server that never answers fails the test with
//! the request's name.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest a request may take, from connect to the end of the answer (a bound, not a
/// pace: the largest bodies the tests send take a fraction of it).
pub const WAIT: Duration = Duration::from_secs(30);

/// `work`, or a panic naming the request if it takes longer than [`WAIT`].
async fn bounded<T>(method: &str, path: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} was not answered within {WAIT:?}"))
}

/// Sends one request and returns the status code and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    request_with(addr, method, path, body, &[]).await
}

/// Like [`request`], with extra headers (`("Authorization", "Bearer ...")`).
pub async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let stream = bounded(method, path, TcpStream::connect(addr))
        .await
        .expect("connect to admin API");
    request_on(stream, addr, method, path, body.map(str::as_bytes), headers).await
}

/// Like [`request_with`], over HTTPS to a server whose certificate `connector` trusts.
pub async fn request_tls(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let stream = bounded(method, path, crate::tls::connect(addr, connector))
        .await
        .expect("TLS connect to the admin API");
    request_on(stream, addr, method, path, body.map(str::as_bytes), headers).await
}

/// Sends one request with a raw body over `stream` and returns the status code and body.
pub async fn request_on(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let answer = exchange_on(stream, addr, method, path, body, headers).await;
    (answer.status, answer.text())
}

/// A whole answer: status, headers and body bytes.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The header lines, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Like [`request_with`] with a raw body, returning the whole answer.
pub async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Answer {
    let stream = bounded(method, path, TcpStream::connect(addr))
        .await
        .expect("connect to admin API");
    exchange_on(stream, addr, method, path, body, headers).await
}

/// Sends one request with a raw body over `stream` and returns the whole answer.
pub async fn exchange_on(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Answer {
    bounded(
        method,
        path,
        exchange_unbounded(stream, addr, method, path, body, headers),
    )
    .await
}

async fn exchange_unbounded(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Answer {
    let body = body.unwrap_or(b"");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let has_type = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    let content_type = if has_type {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         {content_type}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write request");
    // A server may answer (a 413) and close before the whole body is written.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    // A TLS server may close without close_notify after `Connection: close`: what was read
    // is the answer.
    let _ = stream.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&body[..line_end]);
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        let rest = &body[line_end + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        body = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}
