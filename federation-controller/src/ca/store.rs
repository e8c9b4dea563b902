//! The CA's key material on disk, under Istio's file names so a user can plug in the CA
//! they already have (`cacerts`): `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
//! `root-cert.pem`. With none of them present a self-signed root is made and written with
//! owner-only permissions; with all of them present they are used as they are; anything in
//! between is an error that names what is missing, never a silent new root.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why the CA cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{dir}: has {present} but not {missing}; give all of ca-cert.pem and ca-key.pem (and, for an intermediate, cert-chain.pem and root-cert.pem), or none to make a new root"
    )]
    Partial {
        dir: PathBuf,
        present: String,
        missing: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Where the CA's material came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A self-signed root made on this start and written to the directory.
    Created,
    /// A root this controller made earlier.
    SelfSigned,
    /// An intermediate (or root) plugged in by the user.
    Plugged,
}

/// A CA able to sign: its issuer, the chain above it and the root of the trust domain.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// PEM certificates from the signing certificate up to, not including, the root.
    chain: Vec<String>,
    /// PEM of the root our chain hangs from.
    root: String,
    /// PEM of every root in `root-cert.pem`: during a root rotation the old and the new,
    /// both trusted, while clusters move from one to the other.
    roots: Vec<String>,
    not_after: SystemTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
const ROOT_CERT: &str = "root-cert.pem";

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> CaError {
    CaError::Invalid {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so a crash never
/// leaves half a key; `mode` applies from the first byte.
pub(crate) fn write_private(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Creates `dir` readable by its owner only (it holds keys).
pub(crate) fn private_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Parameters of a CA certificate for `trust_domain`.
pub(crate) fn ca_params(
    trust_domain: &str,
    common_name: &str,
    lifetime: Duration,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + lifetime).into();
    params
}

/// Ten years, as Istio's self-signed root.
pub(crate) const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

fn pem_certs(path: &Path, text: &str) -> Result<Vec<String>, CaError> {
    let ders = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, e))?;
    if ders.is_empty() {
        return Err(invalid(path, "no PEM CERTIFICATE found"));
    }
    // Keep each block as the user wrote it; the DER parse above proved they are certificates.
    let blocks: Vec<String> = text
        .split_inclusive("-----END CERTIFICATE-----")
        .filter_map(|chunk| {
            chunk
                .find("-----BEGIN CERTIFICATE-----")
                .map(|at| format!("{}\n", &chunk[at..]))
        })
        .collect();
    if blocks.len() != ders.len() {
        return Err(invalid(path, "PEM blocks other than CERTIFICATE are mixed in"));
    }
    Ok(blocks)
}

/// The root in `roots` that issued `cert` (PEM): by key identifier where both carry one
/// (a renewed root may keep its old name), else by name.
fn issuing_root(cert: &str, roots: &[String]) -> Option<String> {
    use x509_parser::extensions::ParsedExtension;
    let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).ok();
    let cert_der = der(cert)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).ok()?;
    let authority_key = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    roots
        .iter()
        .find(|r| {
            let Some(root_der) = der(r) else { return false };
            let Ok((_, root)) = x509_parser::parse_x509_certificate(&root_der) else {
                return false;
            };
            let subject_key = root.extensions().iter().find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
                _ => None,
            });
            match (&authority_key, subject_key) {
                (Some(aki), Some(ski)) => *aki == ski,
                _ => root.subject() == cert.issuer(),
            }
        })
        .cloned()
}

impl Authority {
    /// Loads the CA from `dir`, or makes a self-signed root for `trust_domain` there when
    /// the directory holds no CA files at all.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<(Authority, Origin), CaError> {
        let has = |name: &str| dir.join(name).exists();
        match (has(CA_CERT), has(CA_KEY)) {
            (false, false) => {
                if let Some(stray) = [CERT_CHAIN, ROOT_CERT].into_iter().find(|n| has(n)) {
                    return Err(CaError::Partial {
                        dir: dir.to_owned(),
                        present: stray.into(),
                        missing: format!("{CA_CERT} and {CA_KEY}"),
                    });
                }
                private_dir(dir)?;
                let key = KeyPair::generate()?;
                let cert = ca_params(trust_domain, "Isthmus root CA", ROOT_LIFETIME, None).self_signed(&key)?;
                // The key first: a crash between the two writes leaves a key without a
                // certificate, which the next start reports instead of replacing.
                write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
                write_private(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
                write_private(&dir.join(ROOT_CERT), cert.pem().as_bytes(), 0o644)?;
                let authority = Self::load(dir)?;
                Ok((authority, Origin::Created))
            }
            (true, true) => {
                let plugged = has(CERT_CHAIN);
                let authority = Self::load(dir)?;
                Ok((authority, if plugged { Origin::Plugged } else { Origin::SelfSigned }))
            }
            (cert, _) => Err(CaError::Partial {
                dir: dir.to_owned(),
                present: if cert { CA_CERT } else { CA_KEY }.into(),
                missing: if cert { CA_KEY } else { CA_CERT }.into(),
            }),
        }
    }

    fn load(dir: &Path) -> Result<Authority, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| invalid(&key_path, e))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| invalid(&cert_path, e))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| invalid(&cert_path, e))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(
                &key_path,
                format!("this key does not belong to the certificate in {CA_CERT}"),
            ));
        }
        match parsed.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => {
                return Err(invalid(
                    &cert_path,
                    "not a CA certificate (basicConstraints CA:TRUE is missing)",
                ));
            }
        }
        if !parsed.validity().is_valid() {
            return Err(invalid(&cert_path, "the CA certificate is expired or not valid yet"));
        }
        let not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let self_signed = parsed.subject() == parsed.issuer();
        let root_path = dir.join(ROOT_CERT);
        let roots = if root_path.exists() {
            pem_certs(&root_path, &read(&root_path)?)?
        } else if self_signed {
            pem_certs(&cert_path, &cert_pem)?
        } else {
            return Err(CaError::Partial {
                dir: dir.to_owned(),
                present: CA_CERT.into(),
                missing: ROOT_CERT.into(),
            });
        };
        // cert-chain.pem is Istio's chain from the signing certificate up to the root;
        // keep everything below the roots.
        let chain_path = dir.join(CERT_CHAIN);
        let mut chain = if chain_path.exists() {
            pem_certs(&chain_path, &read(&chain_path)?)?
        } else {
            pem_certs(&cert_path, &cert_pem)?
        };
        chain.retain(|c| !roots.contains(c));
        let top = chain.last().map_or(cert_pem.as_str(), String::as_str);
        let root = issuing_root(top, &roots).ok_or_else(|| {
            invalid(
                &root_path,
                format!("holds no root that issued the top of the chain in {CERT_CHAIN} (or {CA_CERT})"),
            )
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(&cert_path, e))?;
        Ok(Authority {
            issuer,
            chain,
            root,
            roots,
            not_after,
        })
    }

    /// The root this CA's chain hangs from, PEM: the end of every chain it signs.
    pub fn root_pem(&self) -> &str {
        &self.root
    }

    /// Every root of the trust domain, PEM: what peers must trust (two during a rotation).
    pub fn trust_roots_pem(&self) -> String {
        self.roots.concat()
    }

    /// Certificates between a leaf and the root, PEM, nearest first.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// When the signing certificate expires; no SVID outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// `ca init-mesh`: one shared root and an intermediate per cluster, each cluster's
/// directory in Istio's `cacerts` layout, as Istio's `Makefile.selfsigned.mk` makes them.
/// An existing root is reused and existing cluster directories are left alone, so running
/// it again to add a cluster loses no key.
pub fn init_mesh(out: &Path, trust_domain: &str, clusters: &[String]) -> Result<Vec<PathBuf>, CaError> {
    private_dir(out)?;
    let root_key_path = out.join("root-key.pem");
    let root_cert_path = out.join(ROOT_CERT);
    let (root_issuer, root_pem) = if root_key_path.exists() {
        let pem = read(&root_cert_path)?;
        let key = KeyPair::from_pem(&read(&root_key_path)?).map_err(|e| invalid(&root_key_path, e))?;
        (
            Issuer::from_ca_cert_pem(&pem, key).map_err(|e| invalid(&root_cert_path, e))?,
            pem,
        )
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params(trust_domain, "Isthmus mesh root CA", ROOT_LIFETIME, None);
        let cert = params.self_signed(&key)?;
        write_private(&root_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_private(&root_cert_path, cert.pem().as_bytes(), 0o644)?;
        (Issuer::new(params, key), cert.pem())
    };
    let mut made = Vec::new();
    for cluster in clusters {
        let dir = out.join(cluster);
        if dir.join(CA_KEY).exists() {
            continue;
        }
        private_dir(&dir)?;
        let key = KeyPair::generate()?;
        let params = ca_params(
            trust_domain,
            &format!("Isthmus intermediate CA {cluster}"),
            ROOT_LIFETIME / 5,
            Some(0),
        );
        let cert = params.signed_by(&key, &root_issuer)?;
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_private(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        write_private(
            &dir.join(CERT_CHAIN),
            format!("{}{}", cert.pem(), root_pem).as_bytes(),
            0o644,
        )?;
        write_private(&dir.join(ROOT_CERT), root_pem.as_bytes(), 0o644)?;
        made.push(dir);
    }
    Ok(made)
}
