//! Signing workload CSRs into X.509 SVIDs.
//!
//! Nothing in the CSR but its public key reaches the certificate: the SPIFFE ID is the one
//! the caller proved, the lifetime is the CA's to decide. The CSR is still read closely, so
//! a caller asking for more than it proved is refused, and counted, rather than quietly
//! given less.

use std::time::{Duration, SystemTime};

use mesh_vocab::spiffe::SpiffeId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::store::Authority;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrRefusal {
    #[error("the CSR is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the CSR is not a PEM CERTIFICATE REQUEST: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify")]
    BadSignature,
    #[error("the CSR asks for {asked}, but the caller proved {proven}")]
    IdentityMismatch { asked: String, proven: String },
    #[error("the CSR asks for names besides the SPIFFE ID: {0}")]
    ExtraSans(String),
    #[error("the CA certificate has expired")]
    CaExpiring,
}

impl CsrRefusal {
    /// The metric label for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::ExtraSans(_) => "extra_sans",
            Self::CaExpiring => "ca_expiring",
        }
    }
}

/// A CSR is a few hundred bytes; anything near this bound is not one.
const MAX_CSR: usize = 16 * 1024;

/// The signing side of the CA.
#[derive(Debug)]
pub struct Signer {
    pub authority: Authority,
    /// Lifetime when the caller asks for none (Istio: 24 h).
    pub default_ttl: Duration,
    /// The longest lifetime granted whatever the caller asks.
    pub max_ttl: Duration,
}

impl Signer {
    /// Signs `csr_pem` for `identity`, which the caller has proven. Returns the chain in
    /// Istio's order: leaf, intermediates, root.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Vec<String>, CsrRefusal> {
        if csr_pem.len() > MAX_CSR {
            return Err(CsrRefusal::TooLarge(MAX_CSR));
        }
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CsrRefusal::Malformed(e.to_string()))?;
        check_names(&der, identity)?;
        let csr = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => CsrRefusal::BadSignature,
            other => CsrRefusal::Malformed(other.to_string()),
        })?;

        let now = SystemTime::now();
        let ttl = requested
            .filter(|d| !d.is_zero())
            .unwrap_or(self.default_ttl)
            .min(self.max_ttl);
        let not_after = (now + ttl).min(self.authority.not_after());
        if not_after <= now {
            return Err(CsrRefusal::CaExpiring);
        }
        let mut params = CertificateParams::default();
        // An SVID's subject is empty; the identity lives in the one URI SAN.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.as_str().try_into().expect("a SPIFFE ID is an IA5 string"),
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // A little slack for clocks that run behind ours.
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = not_after.into();
        params.serial_number = Some(rand_serial());
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(self.authority.issuer())
        .map_err(|e| CsrRefusal::Malformed(e.to_string()))?;
        let mut chain = vec![signed.pem()];
        chain.extend(self.authority.chain_pem().iter().cloned());
        chain.push(self.authority.root_pem().to_owned());
        Ok(chain)
    }
}

impl Signer {
    /// A certificate for the controller's own TLS port (15012): the DNS names and addresses
    /// clients dial, plus the controller's SPIFFE ID. Returns (chain PEM, key PEM).
    pub fn serving_certificate(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String), rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params
            .subject_alt_names
            .push(SanType::URI(identity.as_str().try_into()?));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + self.max_ttl).min(self.authority.not_after()).into();
        params.serial_number = Some(rand_serial());
        let cert = params.signed_by(&key, self.authority.issuer())?;
        let mut chain = cert.pem();
        for c in self.authority.chain_pem() {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn rand_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
    bytes[0] &= 0x7f; // positive, as RFC 5280 requires
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The CSR may name at most the proven identity, as its only subject alternative name.
fn check_names(der: &CertificateSigningRequestDer<'_>, identity: &SpiffeId) -> Result<(), CsrRefusal> {
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| CsrRefusal::Malformed(e.to_string()))?;
    let mut extra = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) if *uri == identity.as_str() => {}
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                        return Err(CsrRefusal::IdentityMismatch {
                            asked: (*uri).to_owned(),
                            proven: identity.to_string(),
                        });
                    }
                    other => extra.push(other.to_string()),
                }
            }
        }
    }
    if extra.is_empty() {
        Ok(())
    } else {
        Err(CsrRefusal::ExtraSans(extra.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(name: &str) -> Signer {
        let dir = std::env::temp_dir().join(format!("isthmus-signer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (authority, _) = Authority::load_or_create(&dir, "cluster.local").unwrap();
        Signer {
            authority,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
        }
    }

    fn csr(sans: Vec<SanType>) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    const ME: &str = "spiffe://cluster.local/ns/default/sa/reviews";

    #[test]
    fn the_svid_has_only_the_proven_id_and_a_capped_lifetime() {
        let s = signer("ok");
        // No SAN in the CSR is fine: the identity comes from the proof, not the CSR.
        for sans in [vec![SanType::URI(ME.try_into().unwrap())], vec![]] {
            let chain = s
                .sign(&csr(sans), &id(ME), Some(Duration::from_secs(30 * 86_400)))
                .unwrap();
            assert_eq!(chain.len(), 2, "leaf and root");
            let der = rustls_pki_types::CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let san = cert.subject_alternative_name().unwrap().unwrap();
            assert_eq!(san.value.general_names.len(), 1);
            assert!(matches!(san.value.general_names[0], GeneralName::URI(u) if u == ME));
            assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
            assert_eq!(cert.subject().iter().count(), 0, "an SVID's subject is empty");
            let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
            assert_eq!(life, 7200 + 60, "capped at max_ttl (plus the clock-skew slack)");
        }
    }

    #[test]
    fn extra_names_other_identities_and_garbage_are_refused() {
        let s = signer("refuse");
        let extra = csr(vec![
            SanType::URI(ME.try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ]);
        assert!(matches!(s.sign(&extra, &id(ME), None), Err(CsrRefusal::ExtraSans(n)) if n.contains("evil.example")));
        let other = csr(vec![SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap(),
        )]);
        assert!(matches!(
            s.sign(&other, &id(ME), None),
            Err(CsrRefusal::IdentityMismatch { .. })
        ));
        assert!(matches!(s.sign("hello", &id(ME), None), Err(CsrRefusal::Malformed(_))));
        assert!(matches!(
            s.sign(&"x".repeat(MAX_CSR + 1), &id(ME), None),
            Err(CsrRefusal::TooLarge(_))
        ));
        // A CSR whose signature does not match its key: flip a byte inside the signature.
        let good = csr(vec![SanType::URI(ME.try_into().unwrap())]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 3;
        der[last] ^= 0x55;
        let b64 = pem_of(&der);
        assert_eq!(s.sign(&b64, &id(ME), None), Err(CsrRefusal::BadSignature));
    }

    fn pem_of(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
    }
}
