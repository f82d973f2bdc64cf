//! Native TLS: `wss://` on the call port (`[tls]`) and `https://` on the admin API
//! (`[admin.tls]`), with rustls on the ring provider, TLS 1.3 and 1.2.
//!
//! Each TLS port has a `Certificate`: the PEM chain and key in force, read from two files.
//! The port's rustls configuration asks it for the current one at every handshake (it is the
//! configuration's [`ResolvesServerCert`]), so putting a new one in force changes what *new*
//! handshakes present while established connections, live calls included, carry on untouched.
//! The files are re-read on SIGHUP ([`Certificates::reload`]) and when they change (`watch`
//! polls them; a change is acted on once two polls in a row have seen the same contents, so a
//! chain and key being rewritten one after the other are not taken half-way). A file that
//! does not load keeps the certificate in force: the reason is logged at error and counted
//! (`callgate_tls_reloads_total{result="error"}`).
//!
//! Handshakes hold no more than any connection that is not a request or a call yet: on the
//! call port the handshake runs in the connection's own task, inside the pending budget and
//! under the one handshake deadline (`call::admission`, `call::accept`); on the admin port
//! `AdminListener` runs at most [`MAX_ADMIN_HANDSHAKES`] at once, each under the handshake
//! deadline, and a new connection evicts the oldest handshake when that many are running.

use std::collections::VecDeque;
use std::fmt;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Metrics;
use crate::pii::Escaped;
use crate::tasks::Tasks;

/// The largest certificate or key file read (a chain is a few KiB): a bigger file is refused
/// rather than read into memory.
pub const MAX_FILE: u64 = 1024 * 1024;
/// How many TLS handshakes the admin port runs at once; a new connection beyond that evicts
/// the oldest handshake.
pub const MAX_ADMIN_HANDSHAKES: usize = 64;

/// A call-port connection: plain TCP, or TLS over it (boxed: a rustls connection is large and
/// plain connections should not pay for it).
pub(crate) type CallStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Where a TLS port's certificate chain and private key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// PEM certificate chain: the server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM private key of the first certificate (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
}

/// Which listener a certificate is for (the `port` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The call port (`listen`, `[tls]`).
    Call,
    /// The admin API (`admin_listen`, `[admin.tls]`).
    Admin,
}

impl Port {
    /// The metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a certificate chain and key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {detail}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A file is larger than [`MAX_FILE`].
    #[error("{} is larger than {MAX_FILE} bytes: not a PEM certificate chain or key", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A file is not valid PEM.
    #[error("{}: invalid PEM: {detail}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The certificate file holds no certificate.
    #[error("{}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error(
        "{}: no private key in it (expected PEM: -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key cannot sign (an algorithm ring does not support, or a corrupt key).
    #[error("{}: unusable private key: {detail}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The first certificate of the chain cannot be parsed.
    #[error("{}: the first certificate cannot be used: {detail}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The key is not the key of the chain's first certificate.
    #[error(
        "the private key in {} does not belong to the first certificate of {} (the chain must start with the server's own certificate)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// Reads and checks a chain and its key, as `serve` would load them (for `config check`).
pub fn check(files: &Files) -> Result<CheckedChain, Error> {
    let (cert, key) = read_both(files)?;
    let certified = parse(files, &cert, &key)?;
    Ok(CheckedChain {
        certificates: certified.cert.len(),
    })
}

/// What [`check`] found in a valid chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckedChain {
    /// Certificates in the chain (the server's own and its intermediates).
    pub certificates: usize,
}

/// A file's contents, at most [`MAX_FILE`] bytes.
fn read(path: &Path) -> Result<Vec<u8>, Error> {
    let failed = |e: std::io::Error| Error::Read {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut data = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut data)
        .map_err(failed)?;
    if data.len() as u64 > MAX_FILE {
        return Err(Error::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(data)
}

fn read_both(files: &Files) -> Result<(Vec<u8>, Vec<u8>), Error> {
    Ok((read(&files.cert)?, read(&files.key)?))
}

/// The chain and key from the files' contents, checked against each other.
fn parse(files: &Files, cert: &[u8], key: &[u8]) -> Result<CertifiedKey, Error> {
    let bad_pem = |path: &Path, e: pem::Error| Error::Pem {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(&files.cert, e))?;
    if chain.is_empty() {
        return Err(Error::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_der = match PrivateKeyDer::from_pem_slice(key) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(Error::NoKey {
                path: files.key.clone(),
            });
        }
        Err(e) => return Err(bad_pem(&files.key, e)),
    };
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| Error::Key {
            path: files.key.clone(),
            detail: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // ring can always give the public key, so `Unknown` does not happen; if it did, the
        // handshake itself would still fail for a wrong key.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(Error::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(e) => Err(Error::Certificate {
            path: files.cert.clone(),
            detail: e.to_string(),
        }),
    }
}

/// A digest of what a read of the files found (their contents, or the error), to tell whether
/// they changed since the last look.
fn digest_of(read: &Result<(Vec<u8>, Vec<u8>), Error>) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    match read {
        Ok((cert, key)) => {
            context.update(b"ok");
            context.update(&(cert.len() as u64).to_be_bytes());
            context.update(cert);
            context.update(key);
        }
        Err(e) => {
            context.update(b"error");
            context.update(e.to_string().as_bytes());
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP (or the embedder): read and apply now, whatever the files hold.
    Now,
    /// The periodic look at the files: apply only a change, once it has settled.
    Poll,
}

/// The certificate one TLS port presents, replaceable while the port serves.
pub(crate) struct Certificate {
    port: Port,
    files: Files,
    current: RwLock<Arc<CertifiedKey>>,
    watch: Mutex<Watch>,
}

/// What the periodic look at the files has seen.
#[derive(Debug)]
struct Watch {
    /// The files as last acted on (loaded, or refused and logged).
    acted: [u8; 32],
    /// A change seen by the last poll and not acted on yet: acted on when the next poll sees
    /// the same, so that files still being written are not read half-way.
    settling: Option<[u8; 32]>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("port", &self.port)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl Certificate {
    /// Loads the port's files (at start: an error stops the server).
    pub(crate) fn load(port: Port, files: Files) -> Result<Self, Error> {
        let read = read_both(&files);
        let acted = digest_of(&read);
        let (cert, key) = read?;
        let certified = parse(&files, &cert, &key)?;
        Ok(Self {
            port,
            files,
            current: RwLock::new(Arc::new(certified)),
            watch: Mutex::new(Watch {
                acted,
                settling: None,
            }),
        })
    }

    /// The chain and key new handshakes get.
    fn current(&self) -> Arc<CertifiedKey> {
        // Replacing an Arc cannot leave the lock's value invalid, even if a holder panicked.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The rustls configuration of the port: TLS 1.3 and 1.2 on ring, no client
    /// certificates, this certificate resolved at every handshake.
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }

    /// Re-reads the files (blocking: run it on the blocking pool) and puts what loads in
    /// force; what does not is logged and counted in `metrics`, and the certificate in force
    /// stays. `None`: a poll found nothing to do.
    fn reload(&self, trigger: Trigger, metrics: &Metrics) -> Option<Result<(), Error>> {
        let read = read_both(&self.files);
        let digest = digest_of(&read);
        {
            let mut watch = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
            if trigger == Trigger::Poll {
                if watch.acted == digest {
                    watch.settling = None;
                    return None;
                }
                if watch.settling != Some(digest) {
                    watch.settling = Some(digest);
                    return None;
                }
            }
            watch.acted = digest;
            watch.settling = None;
        }
        let port = self.port.as_str();
        let why = match trigger {
            Trigger::Now => "reload",
            Trigger::Poll => "files_changed",
        };
        match read.and_then(|(cert, key)| parse(&self.files, &cert, &key)) {
            Ok(certified) => {
                let chain = certified.cert.len();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
                metrics
                    .tls_reloads
                    .get_or_create(&[("port", port), ("result", "ok")])
                    .inc();
                info!(
                    port,
                    trigger = why,
                    cert = %self.files.cert.display(),
                    chain,
                    "Reloaded the TLS certificate; new connections get it."
                );
                Some(Ok(()))
            }
            Err(e) => {
                metrics
                    .tls_reloads
                    .get_or_create(&[("port", port), ("result", "error")])
                    .inc();
                error!(
                    port,
                    trigger = why,
                    error = %e,
                    "Cannot reload the TLS certificate; keeping the one in force."
                );
                Some(Err(e))
            }
        }
    }
}

/// The certificates of a server's TLS ports, to re-read them (SIGHUP).
#[derive(Debug, Clone)]
pub struct Certificates {
    ports: Vec<Arc<Certificate>>,
    tasks: Tasks,
    metrics: Arc<Metrics>,
}

impl Certificates {
    pub(crate) fn new(ports: Vec<Arc<Certificate>>, tasks: Tasks, metrics: Arc<Metrics>) -> Self {
        Self {
            ports,
            tasks,
            metrics,
        }
    }

    /// Whether no port speaks TLS.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Re-reads every TLS port's files now. What loads is put in force for new connections
    /// (live ones keep going); what does not is logged at error, counted, and the
    /// certificate in force stays. Returns each port's outcome.
    pub async fn reload(&self) -> Vec<(Port, Result<(), Error>)> {
        let mut outcomes = Vec::with_capacity(self.ports.len());
        for cert in &self.ports {
            let port = cert.port;
            let (cert, metrics) = (cert.clone(), self.metrics.clone());
            match self
                .tasks
                .spawn_blocking(move || cert.reload(Trigger::Now, &metrics))
                .await
            {
                Ok(Some(outcome)) => outcomes.push((port, outcome)),
                // `Trigger::Now` always acts.
                Ok(None) => {}
                Err(error) => warn!(%error, %port, "The certificate reload did not finish."),
            }
        }
        outcomes
    }

    /// Looks at every port's files; what changed (and has settled) is reloaded.
    async fn poll(&self) {
        for cert in &self.ports {
            let (cert, metrics) = (cert.clone(), self.metrics.clone());
            if let Err(error) = self
                .tasks
                .spawn_blocking(move || cert.reload(Trigger::Poll, &metrics))
                .await
            {
                warn!(%error, "The look at the TLS files did not finish.");
            }
        }
    }
}

/// Looks at the certificate files every `every` until `cancel`, reloading what changed.
pub(crate) async fn watch(certificates: Certificates, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the files were read at start.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => certificates.poll().await,
        }
    }
}

/// One admin-port handshake in flight: its connection, or nothing (failed, timed out, evicted).
type Handshake = Pin<Box<dyn Future<Output = Option<(TlsStream<TcpStream>, SocketAddr)>> + Send>>;

/// The admin API's listener when it speaks TLS: accepts TCP connections and runs their
/// handshakes concurrently (at most [`MAX_ADMIN_HANDSHAKES`], the oldest evicted for a new
/// one, each bounded by the handshake deadline), handing axum only finished ones. A slow or
/// idle client never delays another's handshake.
pub(crate) struct AdminListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    deadline: Duration,
    handshakes: FuturesUnordered<Handshake>,
    /// The eviction token of each handshake, oldest first; a token is cancelled when its
    /// handshake ends or is evicted (such entries are skipped, and swept when they pile up).
    order: VecDeque<CancellationToken>,
    metrics: Arc<Metrics>,
}

impl AdminListener {
    pub(crate) fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            deadline,
            handshakes: FuturesUnordered::new(),
            order: VecDeque::new(),
            metrics,
        }
    }

    /// Starts the handshake of a connection just accepted, evicting the oldest one in flight
    /// if [`MAX_ADMIN_HANDSHAKES`] are. Evicted handshakes count until they have been polled
    /// out; at twice the limit a new connection is dropped at once.
    fn start(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.handshakes.len() >= 2 * MAX_ADMIN_HANDSHAKES {
            drop(stream);
            self.metrics
                .tls_handshakes_failed
                .get_or_create(&[("port", Port::Admin.as_str())])
                .inc();
            debug!(%peer, "Admin TLS handshake refused: too many in progress.");
            return;
        }
        if self.handshakes.len() >= MAX_ADMIN_HANDSHAKES {
            while let Some(oldest) = self.order.pop_front() {
                if !oldest.is_cancelled() {
                    oldest.cancel();
                    break;
                }
            }
        }
        if self.order.len() > 2 * MAX_ADMIN_HANDSHAKES {
            self.order.retain(|t| !t.is_cancelled());
        }
        let evicted = CancellationToken::new();
        self.order.push_back(evicted.clone());
        let accept = self.acceptor.accept(stream);
        let deadline = self.deadline;
        let metrics = self.metrics.clone();
        self.handshakes.push(Box::pin(async move {
            let outcome = tokio::select! {
                _ = evicted.cancelled() => Err("evicted by a newer connection".to_owned()),
                done = tokio::time::timeout(deadline, accept) => match done {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("not finished within {deadline:?}")),
                },
            };
            evicted.cancel();
            match outcome {
                Ok(stream) => Some((stream, peer)),
                Err(error) => {
                    metrics
                        .tls_handshakes_failed
                        .get_or_create(&[("port", Port::Admin.as_str())])
                        .inc();
                    debug!(%peer, error = %Escaped(&error), "Admin TLS handshake failed.");
                    None
                }
            }
        }));
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => self.start(stream, peer),
                    Err(error) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!(%error, "Admin accept failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                // An empty set yields `None` at once: the branch is then off for this turn.
                Some(done) = self.handshakes.next() => {
                    if let Some(connection) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// On a TLS port (`tls`), the TLS handshake, under the connection's handshake deadline; the
/// connection holds only its pending place meanwhile. A failed or late handshake is dropped.
pub(crate) async fn call_handshake(
    tls: Option<&TlsAcceptor>,
    metrics: &Metrics,
    stream: TcpStream,
    deadline: tokio::time::Instant,
) -> Option<CallStream> {
    let Some(acceptor) = tls else {
        return Some(CallStream::Left(stream));
    };
    let failed = || {
        metrics
            .connections_refused
            .get_or_create(&[("reason", "tls_handshake")])
            .inc();
        metrics
            .tls_handshakes_failed
            .get_or_create(&[("port", Port::Call.as_str())])
            .inc();
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(CallStream::Right(Box::new(tls))),
        Ok(Err(error)) => {
            debug!(error = %Escaped(&error.to_string()), "TLS handshake failed.");
            failed();
            None
        }
        Err(_) => {
            debug!("TLS handshake timed out.");
            failed();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("callgate-tls-unit-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unreadable_empty_and_oversized_files_are_named() {
        let dir = temp("files");
        let files = Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        assert!(matches!(check(&files), Err(Error::Read { path, .. }) if path == files.cert));
        std::fs::write(&files.cert, "").unwrap();
        std::fs::write(&files.key, "").unwrap();
        assert_eq!(
            check(&files),
            Err(Error::NoCertificate {
                path: files.cert.clone()
            })
        );
        std::fs::write(&files.cert, vec![b'x'; MAX_FILE as usize + 1]).unwrap();
        assert_eq!(
            check(&files),
            Err(Error::TooLarge {
                path: files.cert.clone()
            })
        );
        std::fs::write(
            &files.cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert_eq!(check(&files), Err(Error::NoKey { path: files.key }));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_read_digest_tells_contents_and_errors_apart() {
        let a = digest_of(&Ok((b"ab".to_vec(), b"c".to_vec())));
        let b = digest_of(&Ok((b"a".to_vec(), b"bc".to_vec())));
        let e = digest_of(&Err(Error::NoKey { path: "k".into() }));
        assert_ne!(a, b);
        assert_ne!(a, e);
        assert_eq!(a, digest_of(&Ok((b"ab".to_vec(), b"c".to_vec()))));
    }
}
