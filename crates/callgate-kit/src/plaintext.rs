//! Warnings for API keys that would cross the network readable: a provider URL that carries a
//! key (`Authorization: Bearer`) but is neither `https`/`wss` nor on a loopback address.
//!
//! It is a warning, not an error: a key sent over plain HTTP to a proxy on the same host, or
//! inside a private network the operator trusts, is a choice callgate cannot judge.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};

/// Whether a request to `url` with an API key would send the key in clear text over a
/// network: the scheme is not `https`/`wss` and the host is not loopback (`localhost`,
/// `127.0.0.0/8`, `::1`). A URL that does not parse is not judged here (it is refused where
/// it is validated).
pub fn exposes_key(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    if matches!(url.scheme(), "https" | "wss") {
        return false;
    }
    let Some(host) = url.host_str() else {
        return true;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    !loopback
}

/// Warns, once per setting and URL for the process, when `url` (the value of `setting`)
/// would send its API key in clear text ([`exposes_key`]). Loading happens before the binary
/// sets up logging, so without a tracing subscriber the warning goes to stderr.
pub fn warn_if_exposed(setting: &str, url: &str) {
    if !exposes_key(url) {
        return;
    }
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let first = WARNED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(format!("{setting}\n{url}"));
    if !first {
        return;
    }
    if tracing::dispatcher::has_been_set() {
        tracing::warn!(
            setting,
            url,
            "An API key will be sent in clear text: the URL is neither https/wss nor loopback."
        );
    } else {
        eprintln!(
            "callgate: warning: {setting} {url:?}: an API key will be sent in clear text (the \
             URL is neither https/wss nor loopback)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clear_text_to_another_host_exposes_a_key() {
        for url in [
            "http://tts.example.com/v1",
            "ws://10.0.0.5:8080/v1/realtime",
            "http://192.168.1.10",
            "http://[2001:db8::1]:80/",
            "http://127.example.com/",
            "http://localhost.example.com/",
        ] {
            assert!(exposes_key(url), "{url}");
        }
        for url in [
            "https://api.openai.com",
            "wss://api.openai.com/v1/realtime",
            "http://localhost:8000",
            "http://LOCALHOST./x",
            "ws://api.localhost/x",
            "http://127.0.0.1:9000",
            "ws://127.1.2.3/x",
            "http://[::1]:8000",
            "http://[::ffff:127.0.0.1]/",
            "not a url",
        ] {
            assert!(!exposes_key(url), "{url}");
        }
    }
}
