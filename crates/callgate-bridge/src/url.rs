//! The bot's URL: a `ws://`/`wss://` template over the call's variables (values are data,
//! percent-encoded in the path and query, never in the scheme, host or port), and the
//! `X-Twilio-Signature` Twilio puts on the upgrade request.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use callgate_kit::template::UrlTemplate;

/// A compiled bot URL template.
#[derive(Debug, Clone)]
pub struct BotUrl {
    /// `wss` (true) or `ws`.
    tls: bool,
    /// The same template with `http(s)` as its scheme (the kit's URL templates are HTTP ones;
    /// the rules for where a value may go are the same).
    template: UrlTemplate,
}

/// A bot URL that cannot work, or a call whose values do not make one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Neither `ws://` nor `wss://`.
    #[error("{0:?} is not a ws:// or wss:// URL")]
    Scheme(String),
    /// The template breaks a URL template's rules (said in ws terms).
    #[error("{0}")]
    Template(String),
    /// A call's values do not make a valid URL.
    #[error(transparent)]
    Render(#[from] callgate_kit::template::UrlError),
}

impl BotUrl {
    /// Parses `text`, which must start with `ws://` or `wss://`.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let lower = text.get(..6).unwrap_or(text).to_ascii_lowercase();
        let (tls, rest) = if lower.starts_with("wss://") {
            (true, &text[6..])
        } else if lower.starts_with("ws://") {
            (false, &text[5..])
        } else {
            return Err(UrlError::Scheme(text.to_owned()));
        };
        let http = format!("{}://{rest}", if tls { "https" } else { "http" });
        let template = UrlTemplate::parse(&http)
            .map_err(|e| UrlError::Template(e.to_string().replace("http(s)", "ws(s)")))?;
        Ok(Self { tls, template })
    }

    /// The URL for a call, each variable replaced by `lookup(name)`.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, UrlError> {
        let http = self.template.render(lookup)?;
        let rest = http.split_once("://").map_or(http.as_str(), |(_, r)| r);
        Ok(format!("{}://{rest}", if self.tls { "wss" } else { "ws" }))
    }
}

/// `X-Twilio-Signature` for an upgrade to `url`: base64 of HMAC-SHA1 of the URL (a GET has no
/// form parameters to append), keyed with the account's auth token.
pub fn twilio_signature(auth_token: &str, url: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        auth_token.as_bytes(),
    );
    BASE64.encode(ring::hmac::sign(&key, url.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_data_in_the_path_and_query() {
        let url = BotUrl::parse("wss://bot.example.com/calls/{{call_id}}?from={{caller}}").unwrap();
        let rendered = url
            .render(|name| match name {
                "call_id" => Some("a/b"),
                "caller" => Some("+1 555&x=y"),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            rendered,
            "wss://bot.example.com/calls/a%2Fb?from=%2B1%20555%26x%3Dy"
        );
        let plain = BotUrl::parse("ws://127.0.0.1:9000/twilio").unwrap();
        assert_eq!(
            plain.render(|_| None).unwrap(),
            "ws://127.0.0.1:9000/twilio"
        );
        assert!(BotUrl::parse("ws://{{host}}/").is_err());
        assert!(BotUrl::parse("https://bot/").is_err());
    }

    #[test]
    fn the_signature_is_twilios() {
        // HMAC-SHA1("12345", url), base64: the value Twilio's own validators compute for the
        // same token and URL (cross-checked with Python's hmac module).
        assert_eq!(
            twilio_signature("12345", "wss://bot.example.com/twilio"),
            "Qo623mTKSBBeQp3YeX1D4pz6VHU="
        );
    }
}
