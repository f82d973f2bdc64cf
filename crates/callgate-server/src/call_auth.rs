//! Who may place a call (`[call_auth]`): named API keys, an IP allowlist, and the proxies
//! whose `X-Forwarded-For` is believed. Checked in the HTTP upgrade, before any WebSocket
//! exists: a refused connection gets 401 or 403 with a short reason and holds nothing.
//!
//! A key is presented as `Authorization: Bearer KEY`, as `x-api-key: KEY`, or as the `apiKey`
//! query parameter (the forms CallBridge integrations use). Keys are kept as SHA-256 digests
//! and compared without an early exit (see [`crate::auth`]); a key may be limited to some
//! routes. Only a key's name is ever logged or stored.
//!
//! Twilio Media Streams cannot send a custom header: with `twilio_auth_token_env`, a stream
//! is admitted by its `X-Twilio-Signature` (HMAC-SHA1 of the URL Twilio dialled, keyed with the
//! account's auth token; see [`TwilioToken`]) instead of a key. A signature that is present
//! and wrong is refused (401), and so is none on `/twilio` without a valid key.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::auth::{Secret, bearer, same_digest};

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `2001:db8::/32`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (CIDR)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Net {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One API key for the call port.
#[derive(Clone, PartialEq, Eq)]
pub struct CallKey {
    /// Its name (stored with every call it places, logged; the secret never is).
    pub name: String,
    secret: Secret,
    /// The routes calls with this key may take; `None`: any.
    pub routes: Option<Vec<String>>,
}

impl fmt::Debug for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallKey")
            .field("name", &self.name)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl CallKey {
    /// A key from its secret, or from the hex SHA-256 digest of it.
    pub fn new(name: &str, secret: Secret, routes: Option<Vec<String>>) -> Self {
        Self {
            name: name.to_owned(),
            secret,
            routes,
        }
    }
}

/// `[call_auth]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallAuth {
    /// The keys; none: no key is asked for.
    pub keys: Vec<CallKey>,
    /// Where calls may come from; empty: anywhere.
    pub allow: Vec<Net>,
    /// Proxies whose `X-Forwarded-For` names the real client.
    pub trusted_proxies: Vec<Net>,
    /// The Twilio account's auth token: `X-Twilio-Signature` is checked with it.
    pub twilio: Option<TwilioToken>,
}

/// A Twilio account's auth token, the key of `X-Twilio-Signature` (never logged).
#[derive(Clone, PartialEq, Eq)]
pub struct TwilioToken(Vec<u8>);

impl fmt::Debug for TwilioToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TwilioToken(..)")
    }
}

impl TwilioToken {
    /// The token as the account shows it.
    pub fn new(token: &str) -> Self {
        Self(token.as_bytes().to_vec())
    }

    fn key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &self.0)
    }

    /// The signature Twilio sends for a request to `url` with no form body (a WebSocket
    /// upgrade is a GET): base64 of HMAC-SHA1(token, url).
    pub fn sign(&self, url: &str) -> String {
        use base64::Engine as _;
        let tag = ring::hmac::sign(&self.key(), url.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    }

    /// Whether `signature` signs the URL Twilio dialled for a request with this `Host` and
    /// path and query: `wss://` + host + path (also accepted: `https://`, and the host with
    /// the default port 443 added or removed, as Twilio's own validators do). Compared in
    /// constant time.
    pub fn verify(&self, host: &str, path_and_query: &str, signature: &[u8]) -> bool {
        use base64::Engine as _;
        let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(signature.trim_ascii())
        else {
            return false;
        };
        let key = self.key();
        let mut hosts = vec![host.to_owned()];
        match host.strip_suffix(":443") {
            Some(bare) => hosts.push(bare.to_owned()),
            // `[v6]` or a name without a port: add the default one.
            None if host.ends_with(']') || !host.contains(':') => hosts.push(format!("{host}:443")),
            None => {}
        }
        let mut valid = false;
        for scheme in ["wss", "https"] {
            for host in &hosts {
                let url = format!("{scheme}://{host}{path_and_query}");
                // Every candidate is checked: no early exit on the one that matches.
                valid |= ring::hmac::verify(&key, url.as_bytes(), &tag).is_ok();
            }
        }
        valid
    }
}

/// What the upgrade request says for the Twilio signature check.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedRequest<'a> {
    /// `X-Twilio-Signature`.
    pub signature: Option<&'a [u8]>,
    /// `Host`.
    pub host: Option<&'a str>,
    /// The request target (path and query) as sent.
    pub path_and_query: &'a str,
    /// The path is `/twilio` (the protocol is forced).
    pub twilio_path: bool,
}

/// A connection let through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The key's name, when keys are configured.
    pub key: Option<String>,
    /// The routes the key may take; `None`: any.
    pub routes: Option<Vec<String>>,
    /// Admitted by a valid `X-Twilio-Signature` (no key): only a Twilio stream may follow.
    pub twilio_signed: bool,
}

/// Why a connection was refused at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key was presented (401).
    MissingKey,
    /// The key is not one of the configured ones (401).
    BadKey,
    /// The client's address is not on the allowlist (403).
    NotAllowed,
    /// `X-Twilio-Signature` is missing on `/twilio`, and no valid key either (401).
    MissingSignature,
    /// `X-Twilio-Signature` does not sign the URL with the configured auth token (401).
    BadSignature,
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(self) -> u16 {
        match self {
            Self::MissingKey | Self::BadKey | Self::MissingSignature | Self::BadSignature => 401,
            Self::NotAllowed => 403,
        }
    }

    /// The stable code (metric label, log field).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::BadKey => "bad_key",
            Self::NotAllowed => "address_not_allowed",
            Self::MissingSignature => "missing_twilio_signature",
            Self::BadSignature => "bad_twilio_signature",
        }
    }

    /// The short reason sent back.
    pub fn reason(self) -> &'static str {
        match self {
            Self::MissingKey => {
                "an API key is required (Authorization: Bearer, x-api-key, or apiKey=)"
            }
            Self::BadKey => "invalid API key",
            Self::NotAllowed => "calls are not accepted from this address",
            Self::MissingSignature => {
                "an X-Twilio-Signature (or an API key) is required on /twilio"
            }
            Self::BadSignature => "invalid X-Twilio-Signature",
        }
    }
}

impl CallAuth {
    /// Whether anything is checked.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty() || !self.allow.is_empty() || self.twilio.is_some()
    }

    /// Checks a connection as [`CallAuth::admit`] does, and with a Twilio auth token
    /// configured, its `X-Twilio-Signature`: a valid one admits without a key (for a Twilio
    /// stream only: see [`CallAuth::admits_call`]), a wrong one is refused, and none on
    /// `/twilio` needs a valid key.
    pub fn admit_signed(
        &self,
        client: Option<IpAddr>,
        authorization: Option<&[u8]>,
        x_api_key: Option<&[u8]>,
        query: Option<&str>,
        request: SignedRequest<'_>,
    ) -> Result<Admission, Refusal> {
        let Some(token) = &self.twilio else {
            return self.admit(client, authorization, x_api_key, query);
        };
        if let Some(signature) = request.signature {
            // The allowlist first, as for keys.
            self.admit(client, None, None, None).or_else(|r| match r {
                Refusal::MissingKey => Ok(Admission::default()),
                other => Err(other),
            })?;
            let host = request.host.unwrap_or_default();
            return if token.verify(host, request.path_and_query, signature) {
                Ok(Admission {
                    twilio_signed: true,
                    ..Admission::default()
                })
            } else {
                Err(Refusal::BadSignature)
            };
        }
        match self.admit(client, authorization, x_api_key, query) {
            Ok(admission) if admission.key.is_none() && request.twilio_path => {
                Err(Refusal::MissingSignature)
            }
            Err(Refusal::MissingKey) if request.twilio_path => Err(Refusal::MissingSignature),
            other => other,
        }
    }

    /// Whether a connection admitted so may carry a call of `protocol`: with a Twilio auth
    /// token configured, a Twilio stream needs a valid signature or key, and a signature
    /// admits only a Twilio stream when keys are configured. `Err` is the close reason (1008).
    pub fn admits_call(
        &self,
        admission: &Admission,
        protocol: callgate_proto::Protocol,
    ) -> Result<(), &'static str> {
        let twilio = protocol == callgate_proto::Protocol::Twilio;
        if self.twilio.is_some() && twilio && !admission.twilio_signed && admission.key.is_none() {
            return Err("a Twilio stream needs a valid X-Twilio-Signature or API key");
        }
        if admission.twilio_signed && !twilio && !self.keys.is_empty() {
            return Err("an X-Twilio-Signature admits only a Twilio stream: send an API key");
        }
        Ok(())
    }

    /// The client behind `peer`: `peer` itself, unless it is a trusted proxy; then the chain
    /// of `X-Forwarded-For` header lines (`forwarded_for`, every line, in order: HTTP joins
    /// repeated lines with commas) is walked from the right over trusted proxies, and the
    /// first address that is not one is the client (all trusted: the left-most). A hop with a
    /// port (`203.0.113.7:4444`, `[2001:db8::1]:443`) counts as its address. `None` when a hop
    /// reached in that walk is not an IP address (`unknown`, a host name, non-ASCII bytes): the
    /// client cannot be known, and an allowlist refuses it, never falling back to the proxy.
    /// The `Forwarded` header (RFC 7239) is ignored.
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<IpAddr> {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(peer) {
            return Some(peer);
        }
        let lines: Vec<&[u8]> = forwarded_for.into_iter().collect();
        let mut client = peer;
        for hop in lines
            .iter()
            .rev()
            .flat_map(|line| line.rsplit(|&b| b == b','))
        {
            let hop = hop.trim_ascii();
            if hop.is_empty() {
                // `a, , b` or a trailing comma: an empty element carries no hop.
                continue;
            }
            let ip = hop_address(hop)?;
            client = ip;
            if !trusted(ip) {
                return Some(ip);
            }
        }
        Some(client)
    }

    /// Whether a connection from `peer` can ever be admitted: false only when an allowlist is
    /// configured, `peer` is not on it, and `peer` is not a trusted proxy (whose forwarded
    /// client might be). Checked at accept, before any TLS handshake.
    pub fn may_come_from(&self, peer: IpAddr) -> bool {
        self.allow.is_empty()
            || self.allow.iter().any(|n| n.contains(peer))
            || self.trusted_proxies.iter().any(|n| n.contains(peer))
    }

    /// Checks a connection: the client's address, then its key.
    /// `client` is [`CallAuth::client`]'s answer: `None` (an unreadable forwarded chain) is
    /// refused when an allowlist is configured.
    pub fn admit(
        &self,
        client: Option<IpAddr>,
        authorization: Option<&[u8]>,
        x_api_key: Option<&[u8]>,
        query: Option<&str>,
    ) -> Result<Admission, Refusal> {
        if !self.allow.is_empty()
            && !client.is_some_and(|client| self.allow.iter().any(|n| n.contains(client)))
        {
            return Err(Refusal::NotAllowed);
        }
        if self.keys.is_empty() {
            return Ok(Admission::default());
        }
        let from_query = query.and_then(|q| {
            q.split('&').find_map(|pair| match pair.split_once('=') {
                Some(("apiKey", v)) => Some(v.as_bytes()),
                _ => None,
            })
        });
        let presented = authorization
            .and_then(bearer)
            .or(x_api_key)
            .or(from_query)
            .map(<[u8]>::trim_ascii)
            .filter(|k| !k.is_empty())
            .ok_or(Refusal::MissingKey)?;
        let presented = Secret::digest_of(presented);
        let mut found = None;
        for key in &self.keys {
            if same_digest(&key.secret, &presented) && found.is_none() {
                found = Some(key);
            }
        }
        let key = found.ok_or(Refusal::BadKey)?;
        Ok(Admission {
            key: Some(key.name.clone()),
            routes: key.routes.clone(),
            twilio_signed: false,
        })
    }
}

/// What is weak in a configuration of `[call_auth]` (and the admin tokens): each a sentence
/// for a warning at start and at every reload. `calls` and `admin` are the addresses really
/// bound, `*_tls` whether each port has native TLS.
pub fn weaknesses(
    auth: &CallAuth,
    admin_tokens: bool,
    calls: SocketAddr,
    calls_tls: bool,
    admin: SocketAddr,
    admin_tls: bool,
) -> Vec<String> {
    let mut found = Vec::new();
    if !auth.keys.is_empty() && !calls_tls && !calls.ip().is_loopback() {
        found.push(format!(
            "call keys travel in plain text: the call port {calls} is not loopback and has no \
             [tls]; put it behind TLS ([tls] or a TLS proxy) before exposing it"
        ));
    }
    if admin_tokens && !admin_tls && !admin.ip().is_loopback() {
        found.push(format!(
            "admin tokens travel in plain text: the admin API {admin} is not loopback and has \
             no [admin.tls]; put it behind TLS before exposing it"
        ));
    }
    for net in &auth.trusted_proxies {
        if net.prefix == 0 {
            found.push(format!(
                "call_auth.trusted_proxies has {net}: every address is a trusted proxy, so any \
                 client can name itself in X-Forwarded-For and pass the allowlist"
            ));
        }
    }
    for (key, nets) in [
        ("call_auth.allow", &auth.allow),
        ("call_auth.trusted_proxies", &auth.trusted_proxies),
    ] {
        for net in nets {
            if let IpAddr::V6(v6) = net.addr
                && v6.to_ipv4_mapped().is_some()
            {
                found.push(format!(
                    "{key} has {net}, an IPv4-mapped IPv6 network: it can never match (such \
                     addresses are compared as IPv4); write the IPv4 network instead"
                ));
            }
        }
    }
    found
}

/// One `X-Forwarded-For` hop as an address: a bare IPv4 or IPv6 address, an IPv4 address
/// with a port, or a bracketed IPv6 address with or without a port. Anything else is `None`.
fn hop_address(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?;
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (v6, port) = rest.split_once(']')?;
        let port_ok = port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return port_ok
            .then(|| v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))
            .flatten();
    }
    let (v4, port) = hop.split_once(':')?;
    port.parse::<u16>().ok()?;
    v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The call-port auth in force, replaceable while calls run (key rotation). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CallAuthHandle {
    auth: Arc<RwLock<Arc<CallAuth>>>,
}

impl CallAuthHandle {
    /// A handle on `auth`.
    pub fn new(auth: CallAuth) -> Self {
        Self {
            auth: Arc::new(RwLock::new(Arc::new(auth))),
        }
    }

    /// What is in force now.
    pub fn current(&self) -> Arc<CallAuth> {
        // Replacing an Arc cannot leave the lock's value invalid, even if a holder panicked.
        self.auth.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `auth` in force for connections from now on.
    pub fn replace(&self, auth: CallAuth) {
        *self.auth.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(auth);
    }
}

/// How often refused upgrades are logged: at most one line per [`LOG_EVERY`], with the count.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// A rate-limited log of refused upgrades (a flood of them must not flood the log).
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    /// Notes a refusal; logs it (with those since the last line) at most every [`LOG_EVERY`].
    pub(crate) fn note(&self, refusal: Refusal, client: IpAddr) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        let now = Instant::now();
        if state
            .0
            .is_some_and(|last| now.duration_since(last) < LOG_EVERY)
        {
            return;
        }
        let refused = std::mem::take(&mut state.1);
        state.0 = Some(now);
        drop(state);
        tracing::warn!(
            refused,
            last_reason = refusal.as_str(),
            last_client = %client,
            "Refused connections at the upgrade (no or bad API key, or address not allowed)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_signatures_are_checked_as_twilio_computes_them() {
        // Computed independently with Python's hmac/hashlib (section 5 of the shared doc):
        // base64(HMAC-SHA1("12345", "wss://bot.example.com/twilio?x=1")).
        let token = TwilioToken::new("12345");
        let expected = "uSG82fd6iHU0ngeRuQhjdYr5uBc=";
        assert_eq!(token.sign("wss://bot.example.com/twilio?x=1"), expected);
        let ok = |host: &str, pq: &str, sig: &str| token.verify(host, pq, sig.as_bytes());
        assert!(ok("bot.example.com", "/twilio?x=1", expected));
        assert!(
            ok("bot.example.com:443", "/twilio?x=1", expected),
            "default port added"
        );
        let with_port = token.sign("wss://bot.example.com:443/twilio");
        assert!(
            ok("bot.example.com", "/twilio", &with_port),
            "default port removed"
        );
        let https = token.sign("https://bot.example.com/twilio");
        assert!(ok("bot.example.com", "/twilio", &https));
        assert!(
            !ok("bot.example.com", "/twilio?x=2", expected),
            "another query"
        );
        assert!(
            !ok("evil.example.com", "/twilio?x=1", expected),
            "another host"
        );
        assert!(
            !ok("bot.example.com:8443", "/twilio?x=1", expected),
            "another port"
        );
        assert!(!ok("bot.example.com", "/twilio?x=1", "not base64!"));
        assert!(!TwilioToken::new("54321").verify(
            "bot.example.com",
            "/twilio?x=1",
            expected.as_bytes()
        ));
        assert_eq!(format!("{token:?}"), "TwilioToken(..)");
    }

    #[test]
    fn a_twilio_signature_admits_without_a_key_and_a_wrong_one_is_refused() {
        let token = TwilioToken::new("tok");
        let good = token.sign("wss://cg.example.com/twilio");
        let auth = CallAuth {
            keys: vec![CallKey::new("k", Secret::digest_of(b"secret"), None)],
            twilio: Some(token),
            ..CallAuth::default()
        };
        let req = |sig: Option<&'static str>, path: &'static str| SignedRequest {
            signature: sig.map(str::as_bytes),
            host: Some("cg.example.com"),
            path_and_query: path,
            twilio_path: path == "/twilio",
        };
        let admit = |sig: Option<&'static str>, key: Option<&[u8]>, path: &'static str| {
            auth.admit_signed(None, None, key, None, req(sig, path))
        };
        let signed = auth
            .admit_signed(
                None,
                None,
                None,
                None,
                SignedRequest {
                    signature: Some(good.as_bytes()),
                    ..req(None, "/twilio")
                },
            )
            .unwrap();
        assert!(signed.twilio_signed && signed.key.is_none());
        assert_eq!(
            admit(Some("AAAA"), Some(b"secret"), "/twilio"),
            Err(Refusal::BadSignature)
        );
        assert_eq!(admit(None, None, "/twilio"), Err(Refusal::MissingSignature));
        assert_eq!(admit(None, None, "/"), Err(Refusal::MissingKey));
        assert_eq!(admit(None, Some(b"nope"), "/twilio"), Err(Refusal::BadKey));
        let keyed = admit(None, Some(b"secret"), "/twilio").unwrap();
        assert_eq!(keyed.key.as_deref(), Some("k"));
        // A signature admits a Twilio stream only.
        use callgate_proto::Protocol;
        assert_eq!(auth.admits_call(&signed, Protocol::Twilio), Ok(()));
        assert!(auth.admits_call(&signed, Protocol::CallBridge).is_err());
        assert_eq!(auth.admits_call(&keyed, Protocol::Inbound), Ok(()));
        // No keys: a Twilio stream needs the signature; other calls need nothing.
        let open = CallAuth {
            twilio: Some(TwilioToken::new("tok")),
            ..CallAuth::default()
        };
        let anon = open
            .admit_signed(None, None, None, None, req(None, "/"))
            .unwrap();
        assert!(open.admits_call(&anon, Protocol::Twilio).is_err());
        assert_eq!(open.admits_call(&anon, Protocol::Inbound), Ok(()));
        assert_eq!(
            open.admit_signed(None, None, None, None, req(None, "/twilio")),
            Err(Refusal::MissingSignature)
        );
        // The allowlist still applies to a signed stream.
        let fenced = CallAuth {
            allow: vec![net("10.0.0.0/8")],
            twilio: Some(TwilioToken::new("tok")),
            ..CallAuth::default()
        };
        let outside = "198.51.100.1".parse().ok();
        assert_eq!(
            fenced.admit_signed(
                outside,
                None,
                None,
                None,
                SignedRequest {
                    signature: Some(good.as_bytes()),
                    ..req(None, "/twilio")
                }
            ),
            Err(Refusal::NotAllowed)
        );
    }

    fn net(s: &str) -> Net {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("203.0.113.7").contains(ip("203.0.113.7")));
        assert!(!net("203.0.113.7/32").contains(ip("203.0.113.8")));
        assert!(net("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::5")));
        assert!(
            net("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")),
            "mapped v4"
        );
        assert!(!net("10.0.0.0/8").contains(ip("::1")));
        assert!("10.0.0.0/33".parse::<Net>().is_err());
        assert!("nope".parse::<Net>().is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let auth = CallAuth {
            trusted_proxies: vec![net("10.0.0.0/8")],
            ..CallAuth::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let client =
            |peer: &str, lines: &[&str]| auth.client(ip(peer), lines.iter().map(|l| l.as_bytes()));
        assert_eq!(
            client("198.51.100.1", &["1.2.3.4"]),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(
            client("10.0.0.5", &["1.2.3.4, 10.0.0.9"]),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            client("10.0.0.5", &["6.6.6.6, 1.2.3.4"]),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(client("10.0.0.5", &[]), Some(ip("10.0.0.5")));
        assert_eq!(
            client("10.0.0.5", &["10.0.0.7, 10.0.0.9"]),
            Some(ip("10.0.0.7"))
        );
    }

    #[test]
    fn every_forwarded_line_is_read_from_the_right() {
        // The client forges a line; the trusted proxy appends its own line with the real
        // address. Reading only the first line believed the forgery.
        let auth = CallAuth {
            trusted_proxies: vec![net("10.0.0.0/8")],
            ..CallAuth::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lines: [&[u8]; 2] = [b"8.8.8.8", b"198.51.100.7"];
        assert_eq!(auth.client(ip("10.0.0.5"), lines), Some(ip("198.51.100.7")));
        let lines: [&[u8]; 3] = [b"8.8.8.8", b"198.51.100.7, 10.0.0.3", b"10.0.0.4"];
        assert_eq!(auth.client(ip("10.0.0.5"), lines), Some(ip("198.51.100.7")));
    }

    #[test]
    fn a_hop_that_is_not_an_address_is_never_a_fallback() {
        let auth = CallAuth {
            allow: vec![net("10.0.0.0/8")],
            trusted_proxies: vec![net("10.0.0.0/8")],
            ..CallAuth::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.5");
        for bad in [
            &b"unknown"[..],
            b"host.example",
            b"8.8.8.8:notaport",
            b"8.8.8.8:99999",
            b"[2001:db8::1",
            b"1.2.3.4.5",
            "\u{ff11}.2.3.4".as_bytes(),
            &[0xff, 0xfe, b'1'],
            b"junk, 10.0.0.9",
        ] {
            let client = auth.client(proxy, [bad]);
            assert_eq!(client, None, "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(
                auth.admit(client, None, None, None),
                Err(Refusal::NotAllowed),
                "the proxy's own (allowed) address must not stand in"
            );
        }
        // Addresses with ports count as their address.
        for (hop, want) in [
            ("8.8.8.8:4444", "8.8.8.8"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            (" 10.1.2.3:80 ", "10.1.2.3"),
        ] {
            assert_eq!(
                auth.client(proxy, [hop.as_bytes()]),
                Some(ip(want)),
                "{hop}"
            );
        }
        assert_eq!(
            auth.admit(auth.client(proxy, [&b"8.8.8.8:4444"[..]]), None, None, None),
            Err(Refusal::NotAllowed)
        );
        // Beyond the first untrusted hop nothing is read.
        assert_eq!(
            auth.client(proxy, [&b"unknown, 203.0.113.9"[..]]),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn weak_settings_are_named() {
        let auth = CallAuth {
            keys: vec![CallKey::new(
                "k",
                Secret::from_text("cb-prod-key-0123456789").unwrap(),
                None,
            )],
            allow: vec![net("::ffff:10.0.0.0/104"), net("192.0.2.0/24")],
            trusted_proxies: vec![net("0.0.0.0/0")],
            twilio: None,
        };
        let open: SocketAddr = "0.0.0.0:4143".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:4144".parse().unwrap();
        let found = weaknesses(&auth, true, open, false, open, false);
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found[0].contains("call keys travel in plain text"));
        assert!(found[1].contains("admin tokens travel in plain text"));
        assert!(found[2].contains("every address is a trusted proxy"));
        assert!(found[3].contains("can never match"));
        // With TLS on both ports, or on loopback, nothing travels in plain text.
        let found = weaknesses(&auth, true, open, true, lo, false);
        assert_eq!(found.len(), 2, "{found:#?}");
        let fine = CallAuth {
            allow: vec![net("192.0.2.0/24"), net("2001:db8::/32")],
            trusted_proxies: vec![net("10.0.0.0/8")],
            ..auth
        };
        assert_eq!(
            weaknesses(&fine, true, lo, false, lo, false),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_peer_is_checked_at_accept() {
        let auth = CallAuth {
            allow: vec![net("192.0.2.0/24")],
            trusted_proxies: vec![net("10.0.0.0/8")],
            ..CallAuth::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(auth.may_come_from(ip("192.0.2.9")));
        assert!(
            auth.may_come_from(ip("10.0.0.5")),
            "a proxy's clients may be allowed"
        );
        assert!(!auth.may_come_from(ip("198.51.100.1")));
        assert!(CallAuth::default().may_come_from(ip("198.51.100.1")));
    }

    #[test]
    fn keys_come_in_three_forms_and_the_allowlist_comes_first() {
        let secret = Secret::from_text("cb-prod-key-0123456789").unwrap();
        let auth = CallAuth {
            keys: vec![CallKey::new(
                "callbridge-prod",
                secret,
                Some(vec!["sales".into()]),
            )],
            allow: vec![net("127.0.0.0/8")],
            trusted_proxies: Vec::new(),
            twilio: None,
        };
        let lo: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let ok = Admission {
            key: Some("callbridge-prod".into()),
            routes: Some(vec!["sales".into()]),
            twilio_signed: false,
        };
        let key = b"cb-prod-key-0123456789".as_slice();
        assert_eq!(
            auth.admit(lo, Some(b"Bearer cb-prod-key-0123456789"), None, None),
            Ok(ok.clone())
        );
        assert_eq!(auth.admit(lo, None, Some(key), None), Ok(ok.clone()));
        assert_eq!(
            auth.admit(lo, None, None, Some("x=1&apiKey=cb-prod-key-0123456789")),
            Ok(ok)
        );
        assert_eq!(auth.admit(lo, None, None, None), Err(Refusal::MissingKey));
        assert_eq!(
            auth.admit(lo, None, Some(b"wrong-key-0123456789"), None),
            Err(Refusal::BadKey)
        );
        let far: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        assert_eq!(
            auth.admit(far, None, Some(key), None),
            Err(Refusal::NotAllowed)
        );
        assert!(!format!("{:?}", auth.keys[0]).contains("cb-prod-key"));
    }
}
