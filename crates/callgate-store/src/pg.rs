//! The PostgreSQL connection: the parsed `store_url` ([`PgUrl`]), TLS (rustls on ring:
//! `sslmode=disable|require|verify-full`), one connection with its prepared statements
//! ([`Conn`]), and which failures mean "the database is away, try again later". The store
//! ([`crate::postgres`]), the node roster and the webhook outbox each open their own.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postgres::config::{Host, SslMode};
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Socket, Statement};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Error;

/// How long connecting may take. Short: the writer waits for it, and call starts wait for the
/// writer (the server's store timeout is 5 s).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest one statement may run before the server cancels it (a slow database turns
/// into a journaled batch, not a stuck writer). Migrations lift it.
pub(crate) const STATEMENT_TIMEOUT: &str = "2s";
/// How long sent data may stay unacknowledged before the connection counts as dead.
pub(crate) const TCP_USER_TIMEOUT: Duration = Duration::from_secs(3);
/// First and longest wait before trying the database again.
pub(crate) const BACKOFF: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(30));

/// A parsed, checked `store_url` (and CA file). Its `Debug` and `Display` hide the password.
#[derive(Clone)]
pub struct PgUrl {
    config: postgres::Config,
    /// `None`: `sslmode=disable`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The URL with its password hidden, for messages.
    shown: String,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PgUrl").field(&self.shown).finish()
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgUrl {
    /// Parses `postgres://user:password@host:port/db?sslmode=...`. `sslmode` is one of
    /// `disable`, `require` (encrypted, the server's certificate not checked: libpq's meaning)
    /// or `verify-full` (the certificate checked against `ca_file`, a PEM bundle, and the host
    /// name); left out, it is `disable` for a loopback host or a Unix socket, and an error
    /// for any other host. Other parameters are those of libpq that tokio-postgres knows
    /// (`connect_timeout`, `application_name`, `options`...).
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, Error> {
        let bad = |problem: String| Error::StoreUrl { problem };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad(
                "must start with postgres:// (postgres://user:password@host:port/db)".into(),
            ));
        }
        let shown = hide_password(url);
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut mode = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", value)) => mode = Some(value.to_owned()),
                Some(("sslrootcert", _)) => {
                    return Err(bad(
                        "sslrootcert: give the CA file as store_ca_file (--store-ca-file)".into(),
                    ));
                }
                _ => rest.push(pair),
            }
        }
        let rebuilt = match rest.is_empty() {
            true => base.to_owned(),
            false => format!("{base}?{}", rest.join("&")),
        };
        let mut config: postgres::Config = rebuilt.parse().map_err(|e| bad(format!("{e}")))?;
        let hosts = config.get_hosts();
        if hosts.is_empty() {
            return Err(bad("no host".into()));
        }
        let local = hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            #[cfg(unix)]
            Host::Unix(_) => true,
        });
        let tls = match mode.as_deref() {
            Some("disable") => None,
            None if local => None,
            None => {
                return Err(bad(format!(
                    "say how to connect to a host that is not this machine's: add \
                     sslmode=verify-full (with store_ca_file), sslmode=require or \
                     sslmode=disable to {shown}"
                )));
            }
            Some("require") => Some(Arc::new(tls_config(None)?)),
            Some("verify-full") => match ca_file {
                Some(path) => Some(Arc::new(tls_config(Some(path))?)),
                None => {
                    return Err(bad(
                        "sslmode=verify-full needs store_ca_file (--store-ca-file): the PEM \
                         file of the certificate authority that signed the server's certificate"
                            .into(),
                    ));
                }
            },
            Some(other) => {
                return Err(bad(format!(
                    "sslmode={other}: use disable, require or verify-full"
                )));
            }
        };
        if ca_file.is_some() && mode.as_deref() != Some("verify-full") {
            return Err(bad(
                "store_ca_file is used only with sslmode=verify-full in the URL".into(),
            ));
        }
        config.ssl_mode(match tls {
            Some(_) => SslMode::Require,
            None => SslMode::Disable,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
        Ok(Self { config, tls, shown })
    }

    pub(crate) fn connect(&self) -> Result<Conn, postgres::Error> {
        let mut client = match &self.tls {
            None => self.config.connect(NoTls)?,
            Some(tls) => self.config.connect(RustlsConnect(tls.clone()))?,
        };
        client.batch_execute(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }
}

/// `user:password@` → `user:***@`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// rustls on ring: verifying against `ca_file`, or (`None`, `sslmode=require`) accepting
/// any certificate while still checking the handshake's signatures.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::StoreUrl {
            problem: format!("TLS setup: {e}"),
        })?;
    let Some(path) = ca_file else {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth());
    };
    let bad = |problem: String| Error::StoreUrl {
        problem: format!("store_ca_file {}: {problem}", path.display()),
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// `sslmode=require`: encryption without authentication of the server, as libpq does it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres's TLS hook, implemented with tokio-rustls (a few lines instead of another
/// crate with its own rustls features).
#[derive(Clone)]
struct RustlsConnect(Arc<rustls::ClientConfig>);

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, Self::Error> {
        Ok(RustlsConnector {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_owned())?,
        })
    }
}

struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnector {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding: the server then offers plain SCRAM-SHA-256.
        ChannelBinding::none()
    }
}

/// One connection and its prepared statements.
pub(crate) struct Conn {
    pub(crate) client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    pub(crate) fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(crate) fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.execute(&s, params)
    }

    pub(crate) fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.query(&s, params)
    }
}

/// Whether a failure is the database being unreachable, down, overloaded or slow (try again
/// later) rather than the statement being refused.
pub(crate) fn unavailable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: the connection (I/O, a timeout, TLS), not the database's answer.
        None => true,
        Some(code) => {
            let c = code.code();
            // 08: connection exception; 53: insufficient resources; 57P: shutdown, cannot
            // connect now; 57014: statement timeout; 40001/40P01: serialization, deadlock.
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || c == "57014"
                || c == "40001"
                || c == "40P01"
        }
    }
}

/// [`unavailable`] for the store's own errors; [`Error::Unavailable`] is a connection lost
/// inside a batch.
pub(crate) fn is_unavailable(e: &Error) -> bool {
    match e {
        Error::Unavailable => true,
        Error::Postgres(e) => unavailable(e),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        let u = PgUrl::parse("postgres://app:s3cret@127.0.0.1:5432/calls", None).unwrap();
        assert_eq!(u.to_string(), "postgres://app:***@127.0.0.1:5432/calls");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(u.tls.is_none(), "loopback without sslmode: plain");
        let u = PgUrl::parse("postgres://app@db.example:5432/calls?sslmode=require", None);
        assert!(u.unwrap().tls.is_some());
        for (url, says) in [
            ("mysql://x@h/db", "must start with postgres://"),
            (
                "postgres://app:pw@db.example/calls",
                "add sslmode=verify-full",
            ),
            (
                "postgres://app@db.example/calls?sslmode=prefer",
                "sslmode=prefer",
            ),
            (
                "postgres://app@db.example/calls?sslmode=verify-full",
                "needs store_ca_file",
            ),
            ("postgres://app@h/db?sslrootcert=/x", "store_ca_file"),
        ] {
            let e = PgUrl::parse(url, None).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
        let e = PgUrl::parse(
            "postgres://app@127.0.0.1/db?sslmode=disable",
            Some(Path::new("/ca.pem")),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("only with sslmode=verify-full"),
            "{e}"
        );
        let e = PgUrl::parse(
            "postgres://app@db.example/db?sslmode=verify-full",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
