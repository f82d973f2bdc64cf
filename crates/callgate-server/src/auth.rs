//! Who may use the admin API: bearer tokens, each with a role, and the cluster secret other
//! nodes present with the operator requests they forward.
//!
//! Tokens are kept as SHA-256 digests only (a configuration may give the digest itself), and a
//! presented token is compared by digest against every configured one without stopping at the
//! first match, so neither the token nor which one matched leaks through timing. A token's
//! secret never appears in logs, records or metrics; its name does.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use crate::config::error::ConfigError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Records, events, transcripts, recordings, metrics.
    Read,
    /// Everything `Read` may, plus acting on calls: hangup, DTMF, play, clear, delete.
    Operator,
}

impl Role {
    /// The role's name in the configuration (`read`, `operator`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "operator" => Ok(Self::Operator),
            other => Err(Error::UnknownRole(other.to_owned())),
        }
    }
}

/// Why a role, a secret or a digest from the configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A role that is neither `read` nor `operator`.
    #[error("unknown role {0:?} (read or operator)")]
    UnknownRole(String),
    /// A secret shorter than [`MIN_SECRET`] characters.
    #[error("the secret is {0} characters long; use at least {MIN_SECRET}")]
    ShortSecret(usize),
    /// A SHA-256 digest that is not 64 characters long (its length in bytes).
    #[error("a SHA-256 digest is 64 hex digits, this one has {0} bytes")]
    DigestLength(usize),
    /// A SHA-256 digest with a character that is not a hex digit.
    #[error("a SHA-256 digest is 64 hex digits (0-9, a-f)")]
    DigestNotHex,
    /// A cluster secret shorter than [`MIN_CLUSTER_SECRET`] bytes (it has this many).
    #[error(
        "the cluster secret is {0} bytes long; use at least {MIN_CLUSTER_SECRET} \
         (e.g. `openssl rand -hex 32`)"
    )]
    ShortClusterSecret(usize),
    /// A cluster secret with something else than visible ASCII.
    #[error("the cluster secret must be visible ASCII characters (it travels in an HTTP header)")]
    ClusterSecretNotAscii,
}

/// A secret (token or key), kept only as its SHA-256 digest.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret as given (from an environment variable or a file; surrounding whitespace is
    /// not part of it). At least [`MIN_SECRET`] characters.
    pub fn from_text(secret: &str) -> Result<Self, Error> {
        let secret = secret.trim();
        if secret.len() < MIN_SECRET {
            return Err(Error::ShortSecret(secret.len()));
        }
        Ok(Self::digest_of(secret.as_bytes()))
    }

    /// A secret given as the hex SHA-256 digest of it: exactly 64 ASCII hex digits (either
    /// case), nothing else (no sign, no separators; surrounding whitespace is ignored).
    pub fn from_sha256_hex(hex: &str) -> Result<Self, Error> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return Err(Error::DigestLength(hex.len()));
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
            let (Some(high), Some(low)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
                return Err(Error::DigestNotHex);
            };
            *byte = (high << 4) | low;
        }
        Ok(Self(digest))
    }

    /// The digest of presented bytes, to compare with [`same_digest`].
    pub(crate) fn digest_of(bytes: &[u8]) -> Self {
        Self(digest(bytes))
    }
}

/// The value of one ASCII hex digit.
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The credentials of an `Authorization: Bearer ...` header value. The scheme name is
/// case-insensitive (RFC 9110 11.1), followed by one or more spaces.
pub(crate) fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Equal without an early exit: the time taken does not depend on where they differ.
pub(crate) fn same_digest(a: &Secret, b: &Secret) -> bool {
    same(&a.0, &b.0)
}

/// One admin token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Its name (logged; the secret never is).
    pub name: String,
    /// What it may do.
    pub role: Role,
    digest: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The smallest secret accepted: shorter ones can be guessed.
pub const MIN_SECRET: usize = 16;

impl Token {
    /// A token from its secret (taken from an environment variable or a file).
    pub fn from_secret(name: &str, role: Role, secret: &str) -> Result<Self, Error> {
        Ok(Self::new(name, role, Secret::from_text(secret)?))
    }

    /// A token given as the hex SHA-256 digest of its secret.
    pub fn from_sha256_hex(name: &str, role: Role, hex: &str) -> Result<Self, Error> {
        Ok(Self::new(name, role, Secret::from_sha256_hex(hex)?))
    }

    /// A token with this secret.
    pub fn new(name: &str, role: Role, secret: Secret) -> Self {
        Self {
            name: name.to_owned(),
            role,
            digest: secret.0,
        }
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equal without an early exit: the time taken does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The shortest cluster secret accepted, bytes.
pub const MIN_CLUSTER_SECRET: usize = 32;

/// The cluster secret (`[cluster] token_env`): sent as it is to the other nodes an operator
/// request is forwarded to, and compared by its digest when another node presents it.
#[derive(Clone)]
pub struct ClusterSecret {
    text: Arc<str>,
    digest: Secret,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// The secret as given (surrounding whitespace is not part of it): at least
    /// [`MIN_CLUSTER_SECRET`] bytes, and valid in an HTTP header (visible ASCII).
    pub fn new(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if text.len() < MIN_CLUSTER_SECRET {
            return Err(Error::ShortClusterSecret(text.len()));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::ClusterSecretNotAscii);
        }
        Ok(Self {
            text: Arc::from(text),
            digest: Secret::digest_of(text.as_bytes()),
        })
    }

    /// The secret itself, as this node presents it to others.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Whether `presented` is this secret (the time taken does not depend on where they
    /// differ).
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        same_digest(&Secret::digest_of(presented.trim_ascii()), &self.digest)
    }
}

/// The admin API's tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAuth {
    /// The tokens; none: the API is open (allowed only on loopback or `behind_own_auth`).
    pub tokens: Vec<Token>,
    /// The operator says a proxy in front of the admin API authenticates every request.
    pub behind_own_auth: bool,
}

/// Refuses admin tokens that would leave the admin API open on `listen`: no token, no proxy
/// said to authenticate in front of it, and an address that is not loopback. Checked at start
/// against the configured address and, on every reload, against the address really bound
/// ([`AdminAuthHandle::replace`]).
pub fn admin_exposure(listen: SocketAddr, auth: &AdminAuth) -> Result<(), ConfigError> {
    if auth.is_enabled() || auth.behind_own_auth || listen.ip().is_loopback() {
        return Ok(());
    }
    Err(ConfigError {
        key: "admin.tokens",
        problem: format!(
            "the admin API would listen on {listen} (not loopback) with no token: anyone who \
             can reach it could read every record and hang up calls. Configure [admin] tokens, \
             or set admin.behind_auth = true if a proxy in front of it authenticates every \
             request"
        ),
    })
}

/// The admin tokens in force, replaceable while the server runs (SIGHUP rotates them): each
/// request reads the current ones once. It knows the address the admin API is really bound
/// to, so no replacement can leave that address open (a reload's file may name another one).
#[derive(Debug, Clone)]
pub struct AdminAuthHandle {
    auth: Arc<RwLock<Arc<AdminAuth>>>,
    bound: SocketAddr,
}

impl AdminAuthHandle {
    /// A handle on `auth`, for the admin API bound to `bound`.
    pub fn new(auth: AdminAuth, bound: SocketAddr) -> Self {
        Self {
            auth: Arc::new(RwLock::new(Arc::new(auth))),
            bound,
        }
    }

    /// What is in force now.
    pub fn current(&self) -> Arc<AdminAuth> {
        // Replacing an Arc cannot leave the lock's value invalid, even if a holder panicked.
        self.auth
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether `auth` may be put in force on the address really bound: not with no token off
    /// loopback (see [`admin_exposure`]).
    pub fn check(&self, auth: &AdminAuth) -> Result<(), ConfigError> {
        admin_exposure(self.bound, auth)
    }

    /// Puts `auth` in force for the requests that start from now on, unless [`Self::check`]
    /// refuses it (the tokens in force then stay).
    pub fn replace(&self, auth: AdminAuth) -> Result<(), ConfigError> {
        self.check(&auth)?;
        *self.auth.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
        Ok(())
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` token, or one that is not configured (401).
    Unauthenticated,
    /// A valid token whose role may not do this (403).
    Forbidden,
}

impl AdminAuth {
    /// Whether requests need a token.
    pub fn is_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks an `Authorization` header value for an action needing `needed`; returns the
    /// token's name.
    pub fn check(&self, authorization: Option<&[u8]>, needed: Role) -> Result<&str, Refusal> {
        let presented = authorization
            .and_then(bearer)
            .map(Secret::digest_of)
            .ok_or(Refusal::Unauthenticated)?;
        let token = self.token(&presented).ok_or(Refusal::Unauthenticated)?;
        if token.role < needed {
            return Err(Refusal::Forbidden);
        }
        Ok(&token.name)
    }

    /// The configured token whose secret has this digest (a console session keeps the digest
    /// of the token it was opened with, so a rotated token ends its sessions too).
    pub(crate) fn token(&self, presented: &Secret) -> Option<&Token> {
        // Every token is compared: the time does not say which one matched, or how far.
        let mut found = None;
        for token in &self.tokens {
            if same(&token.digest, &presented.0) && found.is_none() {
                found = Some(token);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_secrets_are_checked() {
        let auth = AdminAuth {
            tokens: vec![
                Token::from_secret("grafana", Role::Read, "read-secret-0123456789").unwrap(),
                Token::from_sha256_hex(
                    "ops",
                    Role::Operator,
                    // SHA-256 of "operator-secret-0123456789".
                    &hex(&digest(b"operator-secret-0123456789")),
                )
                .unwrap(),
            ],
            behind_own_auth: false,
        };
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            auth.check(
                Some(bearer("read-secret-0123456789").as_bytes()),
                Role::Read
            ),
            Ok("grafana")
        );
        assert_eq!(
            auth.check(
                Some(bearer("read-secret-0123456789").as_bytes()),
                Role::Operator
            ),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            auth.check(
                Some(bearer("operator-secret-0123456789").as_bytes()),
                Role::Operator
            ),
            Ok("ops")
        );
        assert_eq!(
            auth.check(Some(bearer("nope-nope-nope-nope").as_bytes()), Role::Read),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            auth.check(Some(b"read-secret-0123456789"), Role::Read),
            Err(Refusal::Unauthenticated),
            "no Bearer scheme"
        );
        assert_eq!(auth.check(None, Role::Read), Err(Refusal::Unauthenticated));
        assert!(Token::from_secret("x", Role::Read, "short").is_err());
        assert!(Token::from_sha256_hex("x", Role::Read, "zz").is_err());
        let debug = format!("{:?}", auth.tokens[0]);
        assert!(!debug.contains("read-secret"), "{debug}");
    }

    #[test]
    fn digests_are_parsed_strictly_and_never_panic() {
        let good = hex(&digest(b"operator-secret-0123456789"));
        assert!(Secret::from_sha256_hex(&good).is_ok());
        assert!(Secret::from_sha256_hex(&good.to_uppercase()).is_ok());
        // 64 bytes that are not 64 ASCII characters: a multi-byte character at the start
        // (this panicked on a char boundary before).
        let euro = format!("€{}", &good[3..]);
        assert_eq!(euro.len(), 64);
        assert!(Secret::from_sha256_hex(&euro).is_err());
        let late = format!("{}€", &good[..61]);
        assert_eq!(late.len(), 64);
        assert!(Secret::from_sha256_hex(&late).is_err());
        // A sign is not a hex digit (`from_str_radix` accepted `+f`).
        let plus = format!("+{}", &good[1..]);
        assert!(Secret::from_sha256_hex(&plus).is_err());
        assert!(Secret::from_sha256_hex(&format!("0x{}", &good[2..])).is_err());
        assert!(Secret::from_sha256_hex(&good[..63]).is_err());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bEaReR   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
        assert_eq!(bearer("Béarer abc".as_bytes()), None);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
