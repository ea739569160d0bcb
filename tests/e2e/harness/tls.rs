//! A certificate authority made by the test, and server certificates it
//! issues for `localhost` and `127.0.0.1`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A private CA with its PEM certificate in a file (the `ca_file` of the tests).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    /// The CA's certificate, PEM.
    pub ca_file: PathBuf,
}

/// A server certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct ServerPair {
    /// Certificate (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
    /// The certificate, DER, to compare with what a server presents.
    pub der: Vec<u8>,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("icerelay test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let dir = tempfile::tempdir().expect("dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, issuer.pem()).expect("write CA");
        Self { issuer, dir, ca_file }
    }

    /// The CA shared by the tests of this binary.
    pub fn shared() -> &'static TestCa {
        static SHARED: OnceLock<TestCa> = OnceLock::new();
        SHARED.get_or_init(|| TestCa::new("shared"))
    }

    /// Issues a certificate for `localhost` and `127.0.0.1`, written to
    /// `<dir>/<name>.crt` and `<dir>/<name>.key` (replacing them).
    pub fn issue(&self, dir: &Path, name: &str) -> ServerPair {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, format!("icerelay test {name}"));
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let pair = ServerPair {
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&pair.cert_file, cert.pem()).expect("write certificate");
        std::fs::write(&pair.key_file, key.serialize_pem()).expect("write key");
        pair
    }

    /// A directory that lives as long as the CA, for its certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA as a reqwest root.
    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.issuer.pem().as_bytes()).expect("CA certificate")
    }
}
