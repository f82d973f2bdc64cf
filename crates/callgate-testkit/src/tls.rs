//! A test certificate authority made in the test (rcgen, ring), server certificates it signs
//! for `127.0.0.1` and `localhost`, and clients that trust it: to see which certificate a
//! server presents, and to call it over TLS.

use std::path::Path;
use std::sync::Arc;

pub use callgate_phone::conn::Connector;
use callgate_server::tls::Files;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::SupportedProtocolVersion;
use rustls::pki_types::{CertificateDer, ServerName};
pub use rustls::version::{TLS12, TLS13};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A certificate authority for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM (what a client trusts).
    pub pem: String,
}

/// A server certificate signed by a [`TestCa`].
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// The chain: this certificate, PEM.
    pub chain_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// This certificate, DER: what a client sees presented.
    pub der: CertificateDer<'static>,
}

impl TestCa {
    /// A fresh CA called `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("callgate test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `127.0.0.1`, `::1` and `localhost`, called `name`.
    pub fn server_cert(&self, name: &str) -> ServerCert {
        let mut params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("callgate test server {name}"));
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        ServerCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Writes the CA certificate to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write the CA file");
        path
    }

    /// A client that trusts this CA only.
    pub fn connector(&self) -> TlsConnector {
        self.connector_with(&[&TLS13, &TLS12])
    }

    /// A client that trusts this CA only and speaks only `versions`.
    pub fn connector_with(&self, versions: &[&'static SupportedProtocolVersion]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(self.pem.as_bytes())
            .expect("the CA's own PEM");
        roots.add(der).expect("the CA certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("ring has TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl ServerCert {
    /// Writes the chain and key as `dir/{tag}.pem` and `dir/{tag}.key`, each replaced at once
    /// (written aside, then renamed), as a deployment tool would.
    pub fn write(&self, dir: &Path, tag: &str) -> Files {
        let files = Files {
            cert: dir.join(format!("{tag}.pem")),
            key: dir.join(format!("{tag}.key")),
        };
        replace(&files.cert, self.chain_pem.as_bytes());
        replace(&files.key, self.key_pem.as_bytes());
        files
    }

    /// Writes this chain and key over `files` (each replaced at once).
    pub fn write_over(&self, files: &Files) {
        replace(&files.cert, self.chain_pem.as_bytes());
        replace(&files.key, self.key_pem.as_bytes());
    }
}

/// Replaces `path` with `data` at once: written aside, then renamed over it.
pub fn replace(path: &Path, data: &[u8]) {
    let aside = path.with_extension("writing");
    std::fs::write(&aside, data).expect("write aside");
    std::fs::rename(&aside, path).expect("rename into place");
}

/// A TLS connection to `addr` (checked for `127.0.0.1`) through `connector`, or why not.
pub async fn connect(
    addr: std::net::SocketAddr,
    connector: &TlsConnector,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    connector.connect(name, tcp).await
}

/// The certificate the server at `addr` presents to a new connection from a client that
/// trusts `ca` (the handshake bounded by [`crate::phone::WAIT`]).
pub async fn presented(addr: std::net::SocketAddr, ca: &TestCa) -> CertificateDer<'static> {
    let wait = crate::phone::WAIT;
    let stream = tokio::time::timeout(wait, connect(addr, &ca.connector()))
        .await
        .unwrap_or_else(|_| panic!("no TLS handshake with {addr} within {wait:?}"))
        .expect("TLS handshake with a client trusting the test CA");
    let (_, connection) = stream.get_ref();
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
}
