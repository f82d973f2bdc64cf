//! TLS for an agent's own outgoing connections (`wss://` to a bot or to a speech-to-speech
//! service): the platform's trusted roots, or only the authorities in the route's `ca_file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;

/// Why the client's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The platform's trusted certificate authorities cannot be loaded.
    #[error("{0}")]
    PlatformRoots(#[source] rustls::Error),
    /// The `ca_file` cannot be used.
    #[error("{}: {problem}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, in the PEM reader's or rustls's words.
        problem: String,
    },
}

/// The client configuration for `wss://`: the platform's trusted roots, or (with `ca_file`)
/// only the authorities in that PEM file, which must hold at least one certificate.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    // Installed once per process; a second install (another agent, another route) is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match ca_file {
        None => {
            use rustls_platform_verifier::ConfigVerifierExt;
            rustls::ClientConfig::with_platform_verifier().map_err(TlsError::PlatformRoots)?
        }
        Some(path) => {
            let bad = |problem: String| TlsError::CaFile {
                path: path.to_owned(),
                problem,
            };
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate in it".to_owned()));
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_cannot_be_used_is_a_typed_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("callgate-kit-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = client_config(Some(&empty)).unwrap_err();
        assert!(
            matches!(
                &error,
                TlsError::CaFile { path, problem }
                    if *path == empty && problem == "no certificate in it"
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{}: no certificate in it", empty.display())
        );
        let missing = dir.join("missing.pem");
        assert!(matches!(
            client_config(Some(&missing)),
            Err(TlsError::CaFile { path, .. }) if path == missing
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_platform_roots_or_a_good_ca_file_make_a_config() {
        assert!(client_config(None).is_ok());
    }
}
