//! Every error a client of the admin port can see is the documented JSON, hyper's own
//! refusals included (a request target or head too large, a malformed head), and a refused
//! upload gets its whole 413 every time, never a reset.

use std::net::SocketAddr;
use std::time::Duration;

use callgate_testkit::spawn_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any one exchange below may take (a failure fails fast, with a message).
const BOUND: Duration = Duration::from_secs(60);

/// Sends `head`, then `body_len` zero bytes, then reads until the server closes: the way most
/// HTTP clients upload (the whole body, then the answer). A reset while sending is a failure:
/// such a client reports the reset and never reads the answer. Returns everything read.
async fn exchange(addr: SocketAddr, head: &[u8], body_len: usize) -> Result<Vec<u8>, String> {
    let run = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut sent = Ok(());
        if let Err(e) = stream.write_all(head).await {
            sent = Err(e);
        }
        let chunk = vec![0u8; 64 * 1024];
        let mut left = body_len;
        while left > 0 && sent.is_ok() {
            let n = left.min(chunk.len());
            sent = stream.write_all(&chunk[..n]).await;
            left -= n;
        }
        let mut out = Vec::new();
        let read = stream.read_to_end(&mut out).await;
        let answer = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
        match (sent, read) {
            (Ok(()), Ok(_)) => Ok(out),
            (Err(e), _) => Err(format!(
                "the upload failed with {left} bytes left ({e}); read {answer:?} after"
            )),
            (Ok(()), Err(e)) => Err(format!("read failed after {answer:?}: {e}")),
        }
    };
    tokio::time::timeout(BOUND, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer and no close within {BOUND:?}")))
}

/// Splits one HTTP response: status, head, JSON body (the body must be JSON).
fn json_response(bytes: &[u8]) -> (u16, String, serde_json::Value) {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {text:?}"));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let body = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the body of {head:?} is not JSON ({e}): {body:?}"));
    (status, head.to_ascii_lowercase(), body)
}

#[tokio::test]
async fn hypers_own_refusals_are_the_documented_json() {
    let server = spawn_server(|_| {}).await;
    let addr = server.admin_addr;
    let cases = [
        // Over hyper's own limit of 65534 bytes: hyper answered 414 with no body.
        (
            format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(70_000)),
            414,
            "uri_too_long",
        ),
        // Over ours (8 KiB), under hyper's.
        (
            format!(
                "GET /api/calls?{} HTTP/1.1\r\nHost: t\r\n\r\n",
                "a".repeat(9000)
            ),
            414,
            "uri_too_long",
        ),
        // Over hyper's buffer (about 400 KiB): hyper answered 431 with no body.
        (
            format!(
                "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
                "b".repeat(500_000)
            ),
            431,
            "headers_too_large",
        ),
        // More than 100 fields: hyper answered 431 with no body.
        (
            format!(
                "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
                (0..120)
                    .map(|i| format!("X-{i}: 1\r\n"))
                    .collect::<String>()
            ),
            431,
            "headers_too_large",
        ),
        // Malformed: hyper answered 400 with no body.
        (
            "GET / HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n".to_owned(),
            400,
            "bad_request",
        ),
        ("GET / HTTP/7.0\r\n\r\n".to_owned(), 400, "bad_request"),
        (
            "POST /api/calls HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_owned(),
            400,
            "bad_request",
        ),
    ];
    for (request, status, code) in cases {
        let shown: String = request.chars().take(40).collect();
        let response = exchange(addr, request.as_bytes(), 0)
            .await
            .unwrap_or_else(|e| panic!("{shown:?}: {e}"));
        let (got, head, body) = json_response(&response);
        assert_eq!(got, status, "{shown:?}: {head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body["code"], code, "{shown:?}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    // A good request first on the same connection is answered as always, then the bad one.
    let both = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nBad Name: x\r\n\r\n";
    let response = exchange(addr, both, 0).await.expect("answered");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let second = text
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .map(|(at, _)| &text[at..])
        .unwrap_or_else(|| panic!("one answer only: {text}"));
    let (status, _, body) = json_response(second.as_bytes());
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    // The admin API still works.
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_100_mb_upload_always_reads_its_json_413() {
    let server = spawn_server(|_| {}).await;
    let len = 100 * 1000 * 1000;
    let head = format!(
        "POST /api/calls/0190a5d0-ac96-774b-bcce-b302099a8057/play HTTP/1.1\r\nHost: t\r\n\
         Content-Type: audio/wav\r\nContent-Length: {len}\r\n\r\n"
    );
    // Before the lingering close, about one upload in three read a reset or an empty 413.
    for attempt in 1..=6 {
        let response = exchange(server.admin_addr, head.as_bytes(), len)
            .await
            .unwrap_or_else(|e| panic!("upload {attempt}: {e}"));
        let (status, head, body) = json_response(&response);
        assert_eq!(status, 413, "upload {attempt}: {head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body["code"], "too_large", "upload {attempt}: {body}");
    }
    server.shutdown().await;
}
