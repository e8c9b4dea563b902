//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle, §4): a JWK Set whose
//! `x509-svid` keys each carry one root certificate in `x5c`, plus `spiffe_sequence` and
//! `spiffe_refresh_hint`. This is how trust domains hand each other their roots.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use x509_parser::public_key::PublicKey;

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the bundle is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the bundle is not a JWK Set: {0}")]
    NotJwks(String),
    #[error("key {index}: an x509-svid key must carry exactly one certificate in x5c")]
    X5cCount { index: usize },
    #[error("key {index}: {message}")]
    BadCertificate { index: usize, message: String },
    #[error("key {index}: the JWK's public key does not match its certificate's")]
    KeyMismatch { index: usize },
    #[error("the bundle has no x509-svid key")]
    NoRoots,
    #[error("PEM roots: {0}")]
    Pem(String),
}

/// A bundle endpoint's answer is a few keys; anything near this is not one.
pub const MAX_BUNDLE: usize = 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: String,
    #[serde(default)]
    kty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    x5c: Vec<String>,
}

/// The JWK for a root certificate: its public key's members and the certificate itself.
fn jwk_of(der: &CertificateDer<'_>) -> Result<Jwk, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let mut jwk = Jwk {
        use_: "x509-svid".into(),
        x5c: vec![STANDARD.encode(der)],
        ..Default::default()
    };
    match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve.as_str() {
                "1.2.840.10045.3.1.7" => ("P-256", 32),
                "1.3.132.0.34" => ("P-384", 48),
                "1.3.132.0.35" => ("P-521", 66),
                other => return Err(format!("unsupported EC curve {other}")),
            };
            let raw = point.data();
            if raw.len() != 1 + 2 * len || raw[0] != 4 {
                return Err("EC point is not uncompressed".into());
            }
            jwk.kty = "EC".into();
            jwk.crv = Some(crv.into());
            jwk.x = Some(b64(&raw[1..1 + len]));
            jwk.y = Some(b64(&raw[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| b.iter().position(|&x| x != 0).map_or(Vec::new(), |i| b[i..].to_vec());
            jwk.kty = "RSA".into();
            jwk.n = Some(b64(&strip(rsa.modulus)));
            jwk.e = Some(b64(&strip(rsa.exponent)));
        }
        _ => return Err("only EC and RSA keys can be expressed as JWKs here".into()),
    }
    Ok(jwk)
}

/// Our roots as a SPIFFE bundle document.
pub fn encode(roots_pem: &str, sequence: u64, refresh_hint_secs: u64) -> Result<String, JwksError> {
    let roots = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| JwksError::Pem(e.to_string()))?;
    let keys = roots
        .iter()
        .enumerate()
        .map(|(index, der)| jwk_of(der).map_err(|message| JwksError::BadCertificate { index, message }))
        .collect::<Result<Vec<_>, _>>()?;
    let set = JwkSet {
        keys,
        spiffe_sequence: Some(sequence),
        spiffe_refresh_hint: Some(refresh_hint_secs),
    };
    Ok(serde_json::to_string_pretty(&set).expect("a JWK Set serializes"))
}

/// A bundle received from another trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The roots, PEM.
    pub roots_pem: String,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<u64>,
}

/// Reads a SPIFFE bundle document. Keys of other uses (`jwt-svid`) are skipped, as the
/// spec says; an `x509-svid` key must hold one certificate whose key matches the JWK's.
pub fn decode(document: &[u8]) -> Result<Received, JwksError> {
    if document.len() > MAX_BUNDLE {
        return Err(JwksError::TooLarge(MAX_BUNDLE));
    }
    let set: JwkSet = serde_json::from_slice(document).map_err(|e| JwksError::NotJwks(e.to_string()))?;
    let mut pem = String::new();
    for (index, key) in set.keys.iter().enumerate() {
        if key.use_ != "x509-svid" {
            continue;
        }
        let [cert] = key.x5c.as_slice() else {
            return Err(JwksError::X5cCount { index });
        };
        let der = STANDARD.decode(cert).map_err(|e| JwksError::BadCertificate {
            index,
            message: format!("x5c is not base64: {e}"),
        })?;
        let der = CertificateDer::from(der);
        let expected = jwk_of(&der).map_err(|message| JwksError::BadCertificate { index, message })?;
        let matches = expected.kty == key.kty
            && expected.crv == key.crv
            && expected.x == key.x
            && expected.y == key.y
            && expected.n == key.n
            && expected.e == key.e;
        if !matches {
            return Err(JwksError::KeyMismatch { index });
        }
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in STANDARD.encode(der.as_ref()).as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    if pem.is_empty() {
        return Err(JwksError::NoRoots);
    }
    Ok(Received {
        roots_pem: pem,
        sequence: set.spiffe_sequence,
        refresh_hint: set.spiffe_refresh_hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_pem() -> String {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
    }

    #[test]
    fn a_bundle_survives_the_round_trip_and_says_what_the_spec_asks() {
        let pem = root_pem();
        let doc = encode(&pem, 7, 300).unwrap();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert_eq!(v["keys"][0]["crv"], "P-256");
        let back = decode(doc.as_bytes()).unwrap();
        let der = |p: &str| CertificateDer::from_pem_slice(p.as_bytes()).unwrap();
        assert_eq!(der(&back.roots_pem), der(&pem));
        assert_eq!(back.sequence, Some(7));
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        assert!(matches!(decode(b"not json"), Err(JwksError::NotJwks(_))));
        assert_eq!(decode(br#"{"keys":[]}"#), Err(JwksError::NoRoots));
        // jwt-svid keys are skipped, not an error, but they are not roots either.
        assert_eq!(
            decode(br#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#),
            Err(JwksError::NoRoots)
        );
        assert_eq!(
            decode(br#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":[]}]}"#),
            Err(JwksError::X5cCount { index: 0 })
        );
        // A JWK whose members do not match the certificate's key.
        let mut a: serde_json::Value = serde_json::from_str(&encode(&root_pem(), 1, 60).unwrap()).unwrap();
        let b: serde_json::Value = serde_json::from_str(&encode(&root_pem(), 1, 60).unwrap()).unwrap();
        a["keys"][0]["x"] = b["keys"][0]["x"].clone();
        assert_eq!(
            decode(a.to_string().as_bytes()),
            Err(JwksError::KeyMismatch { index: 0 })
        );
        assert_eq!(
            decode(&vec![b' '; MAX_BUNDLE + 1]),
            Err(JwksError::TooLarge(MAX_BUNDLE))
        );
    }
}
