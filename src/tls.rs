//! TLS for icerelay's connections, both ways.
//!
//! - **As a client** (to catalogs and object stores): the system's roots plus
//!   the certificates of an optional `ca_file` (a private CA), checked by the
//!   platform verifier, the one reqwest uses too, so every client of icerelay
//!   trusts the same roots.
//! - **As a server** (the proxy and admin listeners with `tls_cert_file` and
//!   `tls_key_file`): [`ServerCertificate`] reads the pair at start and again
//!   on SIGHUP or when either file changes (checked every
//!   `tls_reload_interval`, [`DEFAULT_RELOAD_CHECK_INTERVAL`] by default). A handshake takes the certificate current at
//!   that moment, so connections already open keep theirs and none is
//!   dropped. A reload that fails keeps the previous certificate and logs why:
//!   a half-written file during a rotation must not take the listener down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the listener's certificate files are checked for a change, by default.
pub const DEFAULT_RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Why TLS material could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no certificate.
    #[error("{path} holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM block of the file is malformed.
    #[error("{path} is not valid PEM: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// The file holds no private key.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key cannot be used, or does not belong to the certificate.
    #[error("the private key in {key} cannot serve the certificate in {cert}: {reason}")]
    BadKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The roots could not be turned into a verifier.
    #[error("cannot trust the certificates of {path}: {reason}")]
    Roots {
        /// The `ca_file`, or "the system's roots".
        path: String,
        /// What rustls said.
        reason: String,
    },
}

/// The certificates of a PEM file (a CA bundle), at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The `ca_file`'s certificates for a reqwest client (`tls_certs_merge`),
/// none without one.
pub fn reqwest_roots(ca_file: Option<&Path>) -> Result<Vec<reqwest::Certificate>, TlsError> {
    let Some(path) = ca_file else { return Ok(Vec::new()) };
    read_certificates(path)?
        .iter()
        .map(|der| reqwest::Certificate::from_der(der))
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Roots { path: path.display().to_string(), reason: e.to_string() })
}

/// A client configuration trusting the system's roots and the `ca_file`'s.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let roots_error = |reason: String| TlsError::Roots {
        path: ca_file.map_or_else(|| "the system's roots".to_owned(), |p| p.display().to_string()),
        reason,
    };
    let verifier = match ca_file {
        Some(path) => {
            rustls_platform_verifier::Verifier::new_with_extra_roots(read_certificates(path)?, provider.clone())
        }
        None => rustls_platform_verifier::Verifier::new(provider.clone()),
    }
    .map_err(|e| roots_error(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| roots_error(e.to_string()))?
        .dangerous() // a verifier of our choice, not "no verification"
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

// === server side ===

/// A listener's certificate and key, as files that may be replaced while
/// icerelay runs.
#[derive(Debug)]
pub struct ServerCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' bytes this key was made of, to notice a change.
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl ServerCertificate {
    /// Reads and checks the pair (the key must match the certificate).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, TlsError> {
        let loaded = load_pair(cert_file, key_file)?;
        Ok(Arc::new(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(loaded),
        }))
    }

    /// The certificate file, for logs.
    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }

    /// An acceptor serving HTTP/1.1 with the current certificate at each handshake.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Roots { path: self.cert_file.display().to_string(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // The listeners speak HTTP/1.1 only (see proxy::conn).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reads the files again if they changed; `Ok(true)` when the certificate
    /// was replaced. On error the previous certificate stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cert_pem = read(&self.cert_file)?;
        let key_pem = read(&self.key_file)?;
        {
            let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.cert_pem == cert_pem && current.key_pem == key_pem {
                return Ok(false);
            }
        }
        let loaded = certified_key(&self.cert_file, &self.key_file, cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(true)
    }

    /// Reloads on SIGHUP, and on a change of either file found by a check
    /// every `check_every` (`None`: SIGHUP only), until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        listener: &'static str,
        check_every: Option<Duration>,
        stop: CancellationToken,
    ) {
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = check_every.map(|every| {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        // A broken pair is reported once, not at every check.
        let mut last_error: Option<String> = None;
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<Option<()>>();
            let checked = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = checked => {}
                _ = signalled => tracing::info!(listener, "SIGHUP: checking the TLS certificate files"),
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    last_error = None;
                    tracing::info!(listener, cert_file = %self.cert_file.display(), "TLS certificate reloaded; new connections use it")
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    let message = e.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::warn!(listener, error = %message, "cannot reload the TLS certificate; still serving the previous one");
                        last_error = Some(message);
                    }
                }
            }
        }
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).key.clone())
    }
}

fn load_pair(cert_file: &Path, key_file: &Path) -> Result<Loaded, TlsError> {
    certified_key(cert_file, key_file, read(cert_file)?, read(key_file)?)
}

fn certified_key(cert_file: &Path, key_file: &Path, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Loaded, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: cert_file.to_owned(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_file.to_owned() });
    }
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey { path: key_file.to_owned() });
        }
        Err(e) => return Err(TlsError::Pem { path: key_file.to_owned(), reason: e.to_string() }),
    };
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::BadKey {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Loaded { key: Arc::new(key), cert_pem, key_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("certificate");
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn served_der(certificate: &ServerCertificate) -> Vec<u8> {
        certificate.current.read().expect("lock").key.cert[0].to_vec()
    }

    #[test]
    fn a_pair_is_checked_and_mistakes_name_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = self_signed("localhost");
        let (_, other_key) = self_signed("localhost");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let cert_file = write("cert.pem", &cert);
        let key_file = write("key.pem", &key);
        assert!(ServerCertificate::load(&cert_file, &key_file).is_ok());

        let wrong = write("other.pem", &other_key);
        let e = ServerCertificate::load(&cert_file, &wrong).expect_err("a key of another certificate");
        assert!(matches!(e, TlsError::BadKey { .. }), "{e}");
        assert!(e.to_string().contains("other.pem"), "{e}");

        let e = ServerCertificate::load(&key_file, &key_file).expect_err("a key is not a certificate");
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = ServerCertificate::load(&cert_file, &cert_file).expect_err("a certificate is not a key");
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        let e = ServerCertificate::load(&dir.path().join("absent.pem"), &key_file).expect_err("no file");
        assert!(e.to_string().contains("absent.pem"), "{e}");

        assert!(matches!(read_certificates(&key_file), Err(TlsError::NoCertificate { .. })));
        assert_eq!(read_certificates(&cert_file).expect("ca").len(), 1);
        assert!(client_config(Some(&cert_file)).is_ok());
    }

    #[test]
    fn a_changed_pair_replaces_the_certificate_and_a_broken_one_keeps_it() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let (cert, key) = self_signed("one.localhost");
        std::fs::write(&cert_file, cert).expect("write");
        std::fs::write(&key_file, key).expect("write");
        let certificate = ServerCertificate::load(&cert_file, &key_file).expect("load");
        let first = served_der(&certificate);
        assert!(!certificate.reload_if_changed().expect("unchanged"));

        // Mid-rotation: the new certificate is there, its key not yet.
        let (cert, key) = self_signed("two.localhost");
        std::fs::write(&cert_file, &cert).expect("write");
        assert!(certificate.reload_if_changed().is_err());
        assert_eq!(served_der(&certificate), first, "a failed reload keeps the certificate");

        std::fs::write(&key_file, key).expect("write");
        assert!(certificate.reload_if_changed().expect("reloaded"));
        assert_ne!(served_der(&certificate), first);
    }
}
