//! A `bridge` route's `[routes.settings]`: parsed into [`BridgeSettings`] and validated once,
//! when the routes are loaded (errors name the field: `headers_env.X-Api-Key`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use callgate_agent::catalog::{Settings, SettingsError};
use callgate_kit::Dur;
use serde::Deserialize;

/// The `accountSid` sent when `account_sid` is not given.
pub const DEFAULT_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
/// What the caller hears by default when the bot cannot be reached or drops.
pub const DEFAULT_FALLBACK_MESSAGE: &str =
    "Sorry, the assistant is not available right now. Please call again later. Goodbye.";

/// The protocol spoken to the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BotProtocol {
    /// Twilio Media Streams (bidirectional), as Twilio sends it.
    #[default]
    Twilio,
}

/// What the caller hears when the bot cannot be reached or drops mid-call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    /// `fallback_message`, spoken (text-to-speech rendered at load), then hang up.
    #[default]
    Message,
    /// `fallback_wav` played, then hang up.
    Wav,
    /// Hang up at once (after the bot's audio already queued).
    Hangup,
}

/// A `bridge` route's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeSettings {
    /// The bot's WebSocket URL (`ws://` or `wss://`); `{{variable}}`s are the call's
    /// variables, percent-encoded, in the path and query only.
    pub url: String,
    /// The protocol spoken to the bot: `twilio` (the only one for now).
    pub protocol: BotProtocol,
    /// Headers sent on the upgrade request, as written.
    pub headers: BTreeMap<String, String>,
    /// Headers sent on the upgrade request, each value read from the named environment
    /// variable when the routes load (for secrets).
    pub headers_env: BTreeMap<String, String>,
    /// A PEM file of certificate authorities to trust for `wss://` (instead of the platform's).
    pub ca_file: Option<PathBuf>,
    /// How long the TCP connect, TLS and the upgrade may take.
    pub connect_timeout: Dur,
    /// The `accountSid` in `start` and `stop`.
    pub account_sid: String,
    /// The environment variable holding a Twilio auth token: the upgrade is then signed with
    /// `X-Twilio-Signature`, as Twilio signs it.
    pub twilio_auth_token_env: Option<String>,
    /// What the bot receives in `start.customParameters`: names to templates over the call's
    /// variables. Given, it replaces the default set.
    pub custom_parameters: Option<BTreeMap<String, String>>,
    /// `message` (default), `wav` or `hangup`.
    pub fallback: FallbackKind,
    /// Spoken with `fallback = "message"`.
    pub fallback_message: String,
    /// Played with `fallback = "wav"` (any PCM WAV).
    pub fallback_wav: Option<PathBuf>,
    /// The text-to-speech voice for the fallback message (default: the server's `[tts]` voice).
    pub tts_voice: Option<String>,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            protocol: BotProtocol::Twilio,
            headers: BTreeMap::new(),
            headers_env: BTreeMap::new(),
            ca_file: None,
            connect_timeout: Dur(Duration::from_secs(3)),
            account_sid: DEFAULT_ACCOUNT_SID.into(),
            twilio_auth_token_env: None,
            custom_parameters: None,
            fallback: FallbackKind::Message,
            fallback_message: DEFAULT_FALLBACK_MESSAGE.into(),
            fallback_wav: None,
            tts_voice: None,
        }
    }
}

impl Settings for BridgeSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if self.url.trim().is_empty() {
            return Err(SettingsError::new(
                "url",
                "the bot's ws:// or wss:// URL is required",
            ));
        }
        crate::url::BotUrl::parse(&self.url).map_err(|e| SettingsError::caused("url", e))?;
        if self.connect_timeout.0.is_zero() || self.connect_timeout.0 > Duration::from_secs(60) {
            return Err(SettingsError::new(
                "connect_timeout",
                "must be more than 0 and at most 60s",
            ));
        }
        if self.account_sid.is_empty() {
            return Err(SettingsError::new("account_sid", "must not be empty"));
        }
        for (name, value) in self.headers.iter() {
            check_header(name, value, &format!("headers.{name}"))?;
        }
        for name in self.headers_env.keys() {
            check_header(name, "", &format!("headers_env.{name}"))?;
            if self.headers.keys().any(|h| h.eq_ignore_ascii_case(name)) {
                return Err(SettingsError::new(
                    format!("headers_env.{name}"),
                    "also given in headers",
                ));
            }
        }
        if let Some(params) = &self.custom_parameters {
            for (name, template) in params {
                callgate_kit::template::Template::parse(template)
                    .map_err(|e| SettingsError::caused(format!("custom_parameters.{name}"), e))?;
            }
        }
        match self.fallback {
            FallbackKind::Message if self.fallback_message.trim().is_empty() => {
                return Err(SettingsError::new(
                    "fallback_message",
                    "must not be empty with fallback = \"message\" (or use fallback = \"hangup\")",
                ));
            }
            FallbackKind::Wav if self.fallback_wav.is_none() => {
                return Err(SettingsError::new(
                    "fallback_wav",
                    "is required with fallback = \"wav\"",
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Checks a header's name (a token) and value (visible ASCII and spaces); reserved names of
/// the upgrade itself are refused.
fn check_header(name: &str, value: &str, field: &str) -> Result<(), SettingsError> {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(SettingsError::new(field, "not a valid header name"));
    }
    const RESERVED: [&str; 7] = [
        "host",
        "connection",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "x-twilio-signature",
    ];
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(SettingsError::new(
            field,
            "set by callgate itself (use twilio_auth_token_env for X-Twilio-Signature)",
        ));
    }
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(SettingsError::new(field, "not a valid header value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: serde_json::Value) -> Result<BridgeSettings, SettingsError> {
        callgate_agent::catalog::parse::<BridgeSettings>(&v)
    }

    #[test]
    fn defaults_need_only_the_url() {
        let s = parse(json!({"url": "ws://127.0.0.1:9000/twilio"})).unwrap();
        assert_eq!(s.connect_timeout.0, Duration::from_secs(3));
        assert_eq!(s.account_sid, DEFAULT_ACCOUNT_SID);
        assert_eq!(s.protocol, BotProtocol::Twilio);
        assert_eq!(s.fallback, FallbackKind::Message);
        assert!(s.custom_parameters.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({}), "settings.url"),
            (json!({"url": "http://bot/x"}), "settings.url"),
            (json!({"url": "ws://{{caller}}/x"}), "settings.url"),
            (
                json!({"url": "ws://b/", "protocol": "vonage"}),
                "settings.protocol",
            ),
            (
                json!({"url": "ws://b/", "connect_timeout": "0s"}),
                "settings.connect_timeout",
            ),
            (
                json!({"url": "ws://b/", "headers": {"Host": "x"}}),
                "settings.headers.Host",
            ),
            (
                json!({"url": "ws://b/", "headers": {"a b": "x"}}),
                "settings.headers.a b",
            ),
            (
                json!({"url": "ws://b/", "headers": {"X": "a\nb"}}),
                "settings.headers.X",
            ),
            (
                json!({"url": "ws://b/", "custom_parameters": {"p": "{{oops"}}),
                "settings.custom_parameters.p",
            ),
            (
                json!({"url": "ws://b/", "fallback": "wav"}),
                "settings.fallback_wav",
            ),
            (
                json!({"url": "ws://b/", "fallback_message": " "}),
                "settings.fallback_message",
            ),
            (
                json!({"url": "ws://b/", "tls": true}),
                "unknown field `tls`",
            ),
        ];
        for (value, expected) in cases {
            let error = parse(value.clone()).expect_err(&value.to_string());
            assert!(
                error.to_string().contains(expected),
                "{value}: {error} (expected {expected})"
            );
        }
    }
}
