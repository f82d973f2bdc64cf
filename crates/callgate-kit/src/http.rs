//! HTTP for agents: one client policy and one bound on what an answer may bring.
//!
//! - The client uses rustls on ring (installed as the process's provider if none is) and
//!   follows **no redirect**: a 3xx is the answer, so a server cannot send the call's data or
//!   an API key somewhere else.
//! - Every answer's body is read up to [`MAX_ANSWER`] bytes and no further, whatever its
//!   `Content-Length` promises: a webhook or an OPEN API call refuses a longer answer (its JSON
//!   would be cut), a tool hands the model the first [`MAX_ANSWER`] bytes with a note.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

/// The most of an HTTP answer's body callgate reads, bytes (webhooks, tools, OPEN API).
pub const MAX_ANSWER: usize = 64 * 1024;

/// Why a request of [`post_json`] brought no whole answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request failed (unreachable, refused, reset...).
    #[error("POST {url}: {source}")]
    Request {
        /// Where it went.
        url: String,
        /// What the client said.
        source: reqwest::Error,
    },
    /// The answer's body is longer than [`MAX_ANSWER`] (its JSON would be cut).
    #[error("the answer is larger than {max} bytes")]
    TooLarge {
        /// The bound, bytes.
        max: usize,
    },
}

/// Why the HTTP client could not be built (its TLS set-up).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct ClientError(#[source] reqwest::Error);

/// The HTTP client for webhooks, tools and speech/LLM APIs (no redirects; rustls on ring).
pub fn client() -> Result<reqwest::Client, ClientError> {
    // `Err`: a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(ClientError)
}

/// An answer's body, read up to a bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded {
    /// The first bytes of the body (at most the bound).
    pub body: Bytes,
    /// Whether the body was longer than the bound (the rest was not read).
    pub cut: bool,
}

/// Reads `answer`'s body up to `max` bytes; stops reading at the bound.
pub async fn read_bounded(
    mut answer: reqwest::Response,
    max: usize,
) -> Result<Bounded, reqwest::Error> {
    let mut data = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        let room = max.saturating_sub(data.len());
        data.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            return Ok(Bounded {
                body: Bytes::from(data),
                cut: true,
            });
        }
    }
    Ok(Bounded {
        body: Bytes::from(data),
        cut: false,
    })
}

/// POSTs `body` as JSON to `url` (with `bearer` as `Authorization: Bearer`): the status and
/// the whole body, or why not (unreachable, timeout, an answer over [`MAX_ANSWER`]).
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    body: &Value,
    timeout: Duration,
) -> Result<(u16, Bytes), Error> {
    let describe = |source: reqwest::Error| {
        if source.is_timeout() {
            Error::Timeout(timeout)
        } else {
            Error::Request {
                url: url.to_owned(),
                source,
            }
        }
    };
    let mut request = http.post(url).json(body).timeout(timeout);
    if let Some(key) = bearer {
        request = request.bearer_auth(key);
    }
    let answer = request.send().await.map_err(describe)?;
    let status = answer.status().as_u16();
    if answer
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER as u64)
    {
        return Err(Error::TooLarge { max: MAX_ANSWER });
    }
    let read = read_bounded(answer, MAX_ANSWER).await.map_err(describe)?;
    if read.cut {
        return Err(Error::TooLarge { max: MAX_ANSWER });
    }
    Ok((status, read.body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// Runs `client` against a local server answering `len` bytes to every request (the
    /// server runs in this task, beside the client, until the client is done).
    async fn with_server<F, T>(len: usize, client: impl FnOnce(String) -> F) -> T
    where
        F: Future<Output = T>,
    {
        let app = axum::Router::new().fallback(move || async move { vec![b'x'; len] });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::select! {
            served = axum::serve(listener, app) => panic!("the server stopped: {served:?}"),
            out = client(url) => out,
        }
    }

    #[tokio::test]
    async fn an_answer_at_the_bound_is_read_and_one_byte_more_is_refused() {
        let http = client().unwrap();
        let t = Duration::from_secs(10);
        let at = with_server(MAX_ANSWER, |url| async move {
            post_json(&http, &url, None, &Value::Null, t).await
        })
        .await
        .unwrap();
        assert_eq!((at.0, at.1.len()), (200, MAX_ANSWER));
        let http = client().unwrap();
        let over = with_server(MAX_ANSWER + 1, |url| async move {
            post_json(&http, &url, None, &Value::Null, t).await
        })
        .await
        .unwrap_err();
        assert!(
            matches!(over, Error::TooLarge { max: MAX_ANSWER }),
            "{over}"
        );
        assert_eq!(over.to_string(), "the answer is larger than 65536 bytes");
    }

    #[tokio::test]
    async fn read_bounded_stops_at_the_bound_and_says_it_cut() {
        let http = client().unwrap();
        let (cut, whole) = with_server(5000, |url| async move {
            let answer = http.get(&url).send().await.unwrap();
            let cut = read_bounded(answer, 1000).await.unwrap();
            let answer = http.get(&url).send().await.unwrap();
            (cut, read_bounded(answer, 5000).await.unwrap())
        })
        .await;
        assert_eq!((cut.body.len(), cut.cut), (1000, true));
        assert_eq!((whole.body.len(), whole.cut), (5000, false));
    }
}
