//! Console sign-in: an admin token exchanged for a session cookie.
//!
//! `POST /api/session {"token": "..."}` checks the token as a bearer token would be checked
//! and answers with a `Set-Cookie` (`HttpOnly; SameSite=Strict; Path=/`, `Secure` when the
//! admin port serves TLS) holding a random session id; the page, its `<audio>` and its event
//! stream then authenticate with that cookie, and the token itself is never stored by the
//! browser. `GET /api/session` says who is signed in, `DELETE /api/session` signs out.
//!
//! Sessions live in memory only (a restart signs everyone out) and last [`SESSION_TTL`] from
//! sign-in. The table keeps the SHA-256 of each session id, never the id, and the digest of the
//! admin token it was opened with: every use re-checks that token against the tokens in force,
//! so rotating or removing a token (SIGHUP) ends its sessions at once, and a role change
//! applies at once. At most [`MAX_SESSIONS`] are held; policy when full: expired sessions are
//! dropped first, then the one that would expire soonest.
//!
//! Cross-site requests: a request authenticated by the cookie that changes anything (any
//! method but `GET`/`HEAD`) must carry an `Origin` naming this very host; any request whose
//! `Origin` or `Sec-Fetch-Site` says it comes from another site is refused before it acts,
//! with or without tokens configured (a loopback API without tokens is then safe from pages
//! the operator happens to browse).
//!
//! The table is a sans-IO core: every method takes the time as a value.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{HeaderMap, Method, header};
use base64::Engine as _;
use tokio::time::Instant;

use crate::auth::{AdminAuth, Refusal, Role, Secret};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "callgate_session";
/// How long a session lasts from sign-in (a working shift).
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions held at once.
pub(crate) const MAX_SESSIONS: usize = 4096;
/// The largest cookie value looked at (a session id is 43 characters).
const MAX_COOKIE_VALUE: usize = 128;

/// One signed-in browser.
#[derive(Debug, Clone)]
struct Session {
    /// The digest of the admin token it was opened with.
    token: Secret,
    expires: Instant,
}

/// The console's sessions, by the SHA-256 of their ids.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
}

/// Why a request was refused before it reached its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No valid credentials, or a role that may not do this.
    Auth(Refusal),
    /// A browser request from another site (or a cookie-authenticated change with no
    /// `Origin`).
    CrossSite,
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The admin token's name.
    pub(crate) name: String,
    /// Its role.
    pub(crate) role: Role,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // Every operation is a single insert, remove or lookup: the map stays valid even if a
        // holder panicked.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a session for the token with this digest (already checked to be configured);
    /// returns the new session id, the cookie's value.
    pub(crate) fn open(
        &self,
        token: Secret,
        now: Instant,
    ) -> Result<String, ring::error::Unspecified> {
        let mut id = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)?;
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
        let mut table = self.lock();
        if table.len() >= MAX_SESSIONS {
            table.retain(|_, s| s.expires > now);
        }
        if table.len() >= MAX_SESSIONS {
            let soonest = table
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(key, _)| *key);
            if let Some(key) = soonest {
                table.remove(&key);
            }
        }
        table.insert(
            key_of(&text),
            Session {
                token,
                expires: now + SESSION_TTL,
            },
        );
        Ok(text)
    }

    /// The identity of session `id` under the tokens in force, if it is open, unexpired and
    /// its token is still configured.
    pub(crate) fn identity(&self, auth: &AdminAuth, id: &str, now: Instant) -> Option<Identity> {
        let key = key_of(id);
        let mut table = self.lock();
        let session = table.get(&key)?;
        let token = (session.expires > now)
            .then(|| auth.token(&session.token))
            .flatten();
        match token {
            Some(token) => Some(Identity {
                name: token.name.clone(),
                role: token.role,
            }),
            None => {
                table.remove(&key);
                None
            }
        }
    }

    /// When session `id` expires, if it is open.
    #[cfg(test)]
    fn expires(&self, id: &str) -> Option<Instant> {
        self.lock().get(&key_of(id)).map(|s| s.expires)
    }

    /// Ends session `id`; whether it was open.
    pub(crate) fn close(&self, id: &str) -> bool {
        self.lock().remove(&key_of(id)).is_some()
    }

    /// How many sessions are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn key_of(id: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// The session id a request's `Cookie` headers carry, if any.
pub(crate) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty() && value.len() <= MAX_COOKIE_VALUE)
}

/// The `Set-Cookie` value that opens session `id` (`secure`: the admin port serves TLS).
pub(crate) fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub(crate) fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}")
}

/// Whether a request may act, as far as its origin goes: refused when a browser says it comes
/// from another site, and, when `cookie_change` (it is authenticated by the cookie and
/// changes something), unless its `Origin` names this host.
pub(crate) fn check_origin(headers: &HeaderMap, cookie_change: bool) -> Result<(), Denied> {
    let fetch_site = headers
        .get("sec-fetch-site")
        .map(|v| v.as_bytes().to_ascii_lowercase());
    if let Some(site) = fetch_site {
        // `none`: typed in the address bar or opened from a bookmark.
        if site != b"same-origin" && site != b"none" {
            return Err(Denied::CrossSite);
        }
    }
    match headers.get(header::ORIGIN) {
        Some(origin) => {
            let host = headers.get(header::HOST).map(|v| v.as_bytes());
            if host.is_some_and(|host| origin_is_host(origin.as_bytes(), host)) {
                Ok(())
            } else {
                Err(Denied::CrossSite)
            }
        }
        None if cookie_change => Err(Denied::CrossSite),
        None => Ok(()),
    }
}

/// Whether `origin` (`scheme://host[:port]`) names `host` (the `Host` header).
fn origin_is_host(origin: &[u8], host: &[u8]) -> bool {
    let authority = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"));
    authority.is_some_and(|a| !a.is_empty() && a.eq_ignore_ascii_case(host))
}

/// Who a request is: its bearer token if it has one, else its session cookie; the origin
/// rules above apply to both. `needed` is the role the request needs.
pub(crate) fn authenticate(
    sessions: &Sessions,
    auth: &AdminAuth,
    headers: &HeaderMap,
    method: &Method,
    needed: Role,
    now: Instant,
) -> Result<Identity, Denied> {
    let changes = !matches!(*method, Method::GET | Method::HEAD);
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        check_origin(headers, false)?;
        let token = crate::auth::bearer(value.as_bytes())
            .map(Secret::digest_of)
            .and_then(|presented| auth.token(&presented))
            .ok_or(Denied::Auth(Refusal::Unauthenticated))?;
        return identity_for(token.name.clone(), token.role, needed);
    }
    let id = cookie(headers).ok_or(Denied::Auth(Refusal::Unauthenticated))?;
    check_origin(headers, changes)?;
    let identity = sessions
        .identity(auth, id, now)
        .ok_or(Denied::Auth(Refusal::Unauthenticated))?;
    identity_for(identity.name, identity.role, needed)
}

/// The identity of a token `name` with `role`, if the role may do what `needed` says.
fn identity_for(name: String, role: Role, needed: Role) -> Result<Identity, Denied> {
    if role < needed {
        return Err(Denied::Auth(Refusal::Forbidden));
    }
    Ok(Identity { name, role })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;
    use crate::auth::Token;

    fn auth() -> AdminAuth {
        AdminAuth {
            tokens: vec![
                Token::from_secret("viewer", Role::Read, "read-secret-0123456789").unwrap(),
                Token::from_secret("ops", Role::Operator, "operator-secret-0123456789").unwrap(),
            ],
            behind_own_auth: false,
        }
    }

    fn digest(secret: &str) -> Secret {
        Secret::digest_of(secret.as_bytes())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn a_session_has_its_tokens_role_until_it_expires() {
        let sessions = Sessions::default();
        let auth = auth();
        let t0 = Instant::now();
        let id = sessions.open(digest("read-secret-0123456789"), t0).unwrap();
        assert_eq!(id.len(), 43, "32 random bytes, base64url");
        let who = sessions.identity(&auth, &id, t0 + Duration::from_secs(60));
        assert_eq!(
            who,
            Some(Identity {
                name: "viewer".into(),
                role: Role::Read
            })
        );
        assert_eq!(sessions.identity(&auth, "not-a-session", t0), None);
        let late = t0 + SESSION_TTL + Duration::from_millis(1);
        assert_eq!(sessions.identity(&auth, &id, late), None);
        assert_eq!(
            sessions.len(),
            0,
            "an expired session is forgotten when seen"
        );
    }

    #[test]
    fn a_rotated_token_ends_its_sessions() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let id = sessions
            .open(digest("operator-secret-0123456789"), t0)
            .unwrap();
        assert!(sessions.identity(&auth(), &id, t0).is_some());
        let rotated = AdminAuth {
            tokens: vec![
                Token::from_secret("ops", Role::Operator, "a-new-secret-0123456789").unwrap(),
            ],
            behind_own_auth: false,
        };
        assert_eq!(sessions.identity(&rotated, &id, t0), None);
        assert_eq!(sessions.identity(&auth(), &id, t0), None, "it stays ended");
    }

    #[test]
    fn sign_out_ends_a_session() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let id = sessions
            .open(digest("operator-secret-0123456789"), t0)
            .unwrap();
        assert!(sessions.close(&id));
        assert!(!sessions.close(&id));
        assert_eq!(sessions.identity(&auth(), &id, t0), None);
    }

    #[test]
    fn a_full_table_drops_the_session_expiring_soonest() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let first = sessions.open(digest("read-secret-0123456789"), t0).unwrap();
        for i in 1..MAX_SESSIONS {
            sessions
                .open(
                    digest("read-secret-0123456789"),
                    t0 + Duration::from_millis(i as u64),
                )
                .unwrap();
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        let last = sessions
            .open(
                digest("read-secret-0123456789"),
                t0 + Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(sessions.expires(&first).is_none(), "the oldest went");
        assert!(sessions.expires(&last).is_some());
    }

    #[test]
    fn the_cookie_is_found_among_others_and_bounded() {
        let h = headers(&[("cookie", "a=1; callgate_session=abc ; b=2")]);
        assert_eq!(cookie(&h), Some("abc"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "callgate_session=xyz")]);
        assert_eq!(cookie(&h), Some("xyz"));
        let long = format!("callgate_session={}", "x".repeat(MAX_COOKIE_VALUE + 1));
        assert_eq!(cookie(&headers(&[("cookie", &long)])), None);
        assert_eq!(cookie(&headers(&[("cookie", "callgate_session=")])), None);
        assert_eq!(
            cookie(&headers(&[("cookie", "xcallgate_session=abc")])),
            None
        );
    }

    #[test]
    fn cookie_attributes_are_strict() {
        let c = set_cookie("abc", false);
        assert!(c.starts_with("callgate_session=abc; "), "{c}");
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
            assert!(c.contains(attribute), "{c}");
        }
        assert!(!c.contains("Secure"), "{c}");
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn changes_by_cookie_need_this_hosts_origin() {
        let sessions = Sessions::default();
        let auth = auth();
        let t0 = Instant::now();
        let id = sessions
            .open(digest("operator-secret-0123456789"), t0)
            .unwrap();
        let cookie = format!("{COOKIE}={id}");
        let host = "127.0.0.1:8081";
        let run = |pairs: &[(&'static str, &str)], method: Method| {
            authenticate(
                &sessions,
                &auth,
                &headers(pairs),
                &method,
                Role::Operator,
                t0,
            )
        };
        let same = [
            ("cookie", cookie.as_str()),
            ("host", host),
            ("origin", "http://127.0.0.1:8081"),
        ];
        assert_eq!(run(&same, Method::POST).map(|i| i.role), Ok(Role::Operator));
        let https = [
            ("cookie", cookie.as_str()),
            ("host", host),
            ("origin", "https://127.0.0.1:8081"),
        ];
        assert!(run(&https, Method::POST).is_ok());
        let none = [("cookie", cookie.as_str()), ("host", host)];
        assert_eq!(run(&none, Method::POST), Err(Denied::CrossSite));
        assert!(run(&none, Method::GET).is_ok(), "a read needs no Origin");
        let other = [
            ("cookie", cookie.as_str()),
            ("host", host),
            ("origin", "http://evil.example"),
        ];
        assert_eq!(run(&other, Method::POST), Err(Denied::CrossSite));
        let port = [
            ("cookie", cookie.as_str()),
            ("host", host),
            ("origin", "http://127.0.0.1:8082"),
        ];
        assert_eq!(run(&port, Method::DELETE), Err(Denied::CrossSite));
        let null = [
            ("cookie", cookie.as_str()),
            ("host", host),
            ("origin", "null"),
        ];
        assert_eq!(run(&null, Method::POST), Err(Denied::CrossSite));
        let fetch = [
            ("cookie", cookie.as_str()),
            ("host", host),
            ("origin", "http://127.0.0.1:8081"),
            ("sec-fetch-site", "cross-site"),
        ];
        assert_eq!(run(&fetch, Method::POST), Err(Denied::CrossSite));
        assert_eq!(run(&fetch, Method::GET), Err(Denied::CrossSite));
        let nothing = [("host", host), ("origin", "http://127.0.0.1:8081")];
        assert_eq!(
            run(&nothing, Method::POST),
            Err(Denied::Auth(Refusal::Unauthenticated))
        );
    }

    #[test]
    fn a_read_session_may_not_act() {
        let sessions = Sessions::default();
        let auth = auth();
        let t0 = Instant::now();
        let id = sessions.open(digest("read-secret-0123456789"), t0).unwrap();
        let cookie = format!("{COOKIE}={id}");
        let h = headers(&[
            ("cookie", &cookie),
            ("host", "h:1"),
            ("origin", "http://h:1"),
        ]);
        assert_eq!(
            authenticate(&sessions, &auth, &h, &Method::POST, Role::Operator, t0),
            Err(Denied::Auth(Refusal::Forbidden))
        );
        assert_eq!(
            authenticate(&sessions, &auth, &h, &Method::GET, Role::Read, t0).map(|i| i.role),
            Ok(Role::Read)
        );
    }

    #[test]
    fn bearer_tokens_need_no_origin_but_cross_site_browsers_are_refused() {
        let sessions = Sessions::default();
        let auth = auth();
        let t0 = Instant::now();
        let bearer = "Bearer operator-secret-0123456789";
        let h = headers(&[("authorization", bearer)]);
        let who = authenticate(&sessions, &auth, &h, &Method::POST, Role::Operator, t0);
        assert_eq!(who.map(|i| i.name), Ok("ops".to_owned()));
        let h = headers(&[
            ("authorization", bearer),
            ("host", "h:1"),
            ("origin", "http://evil"),
        ]);
        assert_eq!(
            authenticate(&sessions, &auth, &h, &Method::POST, Role::Operator, t0),
            Err(Denied::CrossSite)
        );
        let h = headers(&[("authorization", "Bearer read-secret-0123456789")]);
        assert_eq!(
            authenticate(&sessions, &auth, &h, &Method::GET, Role::Read, t0).map(|i| i.role),
            Ok(Role::Read)
        );
    }
}
