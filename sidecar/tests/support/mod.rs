//! What the sidecar's end-to-end tests share: a test CA that writes SVIDs to files, a
//! poller that waits for a condition with a deadline, and a mock control plane
//! ([`control_plane`]).

#![allow(dead_code)] // each test file uses its own part

pub mod control_plane;

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

/// A root CA in a scratch directory, removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new root named `name`, in a directory named after `suite` and `name`.
    pub fn new(suite: &str, name: &str) -> Pki {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("isthmus-{suite}-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        std::fs::write(dir.join("root-cert.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    /// The root, PEM.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    /// Writes an SVID for `spiffe://td/ns/default/sa/sa` and returns (cert, key) paths.
    pub fn svid(&self, td: &str, sa: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let id = format!("spiffe://{td}/ns/default/sa/{sa}");
        params
            .subject_alt_names
            .push(SanType::URI(id.as_str().try_into().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{sa}.pem")), self.dir.join(format!("{sa}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it returns `Ok`, for at most `patience`; a failure shows the last `Err`.
pub async fn poll<T, F, Fut>(patience: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "not within {patience:?}: {e}"),
        }
        tick.tick().await;
    }
}
