//! TLS this sidecar originates to a server outside the mesh: a DestinationRule's
//! `tls.mode: SIMPLE` or `MUTUAL`, as CDS carries it (Envoy's `UpstreamTlsContext` with
//! certificates given as files, inline, or as istio-agent's `file-root:`/`file-cert:`
//! SDS names, which name files too). The application speaks plaintext to us; the server
//! sees an ordinary TLS client.
//!
//! Verified as Envoy verifies: the chain against the context's trusted CA and, when SAN
//! matchers are given, the leaf for one of those DNS names; no validation context means
//! no verification (Istio's `insecureSkipVerify`). Certificates are read when the
//! cluster arrives; a file that cannot be read refuses the cluster, as Envoy does.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SdsSecretConfig, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The SDS secret names of the mesh's own mTLS (istio-agent's): a context naming them is
/// the mesh hop, not origination.
pub const MESH_SECRETS: [&str; 2] = ["default", "ROOTCA"];

/// The most of one certificate or key file read: a bundle of every public root is ~220 KiB.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// How to reach one upstream in TLS of its own.
#[derive(Debug)]
pub struct Origination {
    pub sni: ServerName<'static>,
    /// With the context's own ALPN, for bytes carried as they are.
    pub tcp: Arc<ClientConfig>,
    /// Offering `http/1.1`, and `h2`: for requests sent in that HTTP.
    pub http11: Arc<ClientConfig>,
    pub h2: Arc<ClientConfig>,
    /// Tells this origination from another with other settings or certificates: a hash of
    /// the context and of every byte of certificate and key it read, never 0.
    pub fingerprint: u64,
}

/// Whether `ctx` is the mesh's own mTLS rather than origination: it names istio-agent's
/// `default` or `ROOTCA` secrets (as istiod and our controller send for `ISTIO_MUTUAL`),
/// or it verifies the server without roots of its own (SPIFFE IDs checked under the
/// mesh's bundles, as the explicit mode's clusters do). A context with roots of its own,
/// or with no verification at all, is origination.
pub fn is_mesh(ctx: &UpstreamTlsContext) -> bool {
    let Some(common) = ctx.common_tls_context.as_ref() else {
        return false;
    };
    let mesh = |s: &SdsSecretConfig| MESH_SECRETS.contains(&s.name.as_str());
    let (context, sds) = validation_parts(&common.validation_context_type).unwrap_or_default();
    if common.tls_certificate_sds_secret_configs.iter().any(mesh) || sds.is_some_and(mesh) {
        return true;
    }
    let own_roots = context.is_some_and(|c| c.trusted_ca.is_some()) || sds.is_some();
    (context.is_some() || sds.is_some()) && !own_roots
}

impl Origination {
    /// The origination `ctx` describes; `host` is the SNI when it names none.
    pub fn of(ctx: &UpstreamTlsContext, host: &str) -> Result<Origination, String> {
        use prost::Message;
        use std::hash::{Hash, Hasher};
        let mut hash = std::hash::DefaultHasher::new();
        (ctx.encode_to_vec(), host).hash(&mut hash);
        let common = ctx.common_tls_context.clone().unwrap_or_default();
        let sni = if ctx.sni.is_empty() { host } else { &ctx.sni };
        let sni = ServerName::try_from(sni.to_owned()).map_err(|e| format!("SNI {sni:?}: {e}"))?;
        let verifier = match validation(&common.validation_context_type)? {
            None => Verifier {
                roots: None,
                names: Vec::new(),
            },
            Some((roots, names)) => {
                let mut store = RootCertStore::empty();
                let roots = certificates(&roots)?;
                roots.hash(&mut hash);
                let (added, _) = store.add_parsable_certificates(roots);
                if added == 0 {
                    return Err("the trusted CA holds no certificate".into());
                }
                let roots = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
                    .build()
                    .map_err(|e| format!("trusted CA: {e}"))?;
                Verifier {
                    roots: Some(roots),
                    names,
                }
            }
        };
        let verifier: Arc<dyn ServerCertVerifier> = Arc::new(verifier);
        let client = client_certificate(&common)?;
        if let Some((chain, key)) = &client {
            (chain, key.secret_der()).hash(&mut hash);
        }
        let config = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, String> {
            let builder = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone());
            let mut config = match &client {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|e| format!("client certificate: {e}"))?,
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = alpn;
            Ok(Arc::new(config))
        };
        let own: Vec<Vec<u8>> = common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Origination {
            sni,
            tcp: config(own)?,
            http11: config(vec![b"http/1.1".to_vec()])?,
            h2: config(vec![b"h2".to_vec()])?,
            fingerprint: hash.finish().max(1),
        })
    }
}

/// What to verify the server against: the trusted CA's source and the DNS names the
/// leaf must carry one of (none: the SNI, as rustls checks it). None: nothing.
fn validation(v: &Option<common_tls_context::ValidationContextType>) -> Result<Option<(Source, Vec<String>)>, String> {
    let (context, sds) = validation_parts(v)?;
    let roots = match (context.and_then(|c| c.trusted_ca.as_ref()), sds) {
        (Some(ca), _) => Source::Data(ca.clone()),
        // istio-agent's name for a CA file on the proxy's machine.
        (None, Some(s)) => match s.name.strip_prefix("file-root:") {
            Some(path) => Source::File(path.to_owned()),
            None => return Err(format!("SDS secret {:?} is not served here", s.name)),
        },
        (None, None) => return Ok(None),
    };
    let mut names = Vec::new();
    for m in context
        .map(|c| c.match_typed_subject_alt_names.as_slice())
        .unwrap_or_default()
    {
        if m.san_type != subject_alt_name_matcher::SanType::Dns as i32 {
            return Err("only DNS SAN matches are supported for TLS origination".into());
        }
        match m.matcher.as_ref().and_then(|s| s.match_pattern.as_ref()) {
            Some(string_matcher::MatchPattern::Exact(name)) => names.push(name.clone()),
            _ => return Err("only exact SAN matches are supported".into()),
        }
    }
    Ok(Some((roots, names)))
}

/// A validation context's inline part and its SDS secret, either of which may be absent.
type ValidationParts<'a> = (Option<&'a CertificateValidationContext>, Option<&'a SdsSecretConfig>);

/// The parts of a validation context of a kind this sidecar reads.
fn validation_parts(v: &Option<common_tls_context::ValidationContextType>) -> Result<ValidationParts<'_>, String> {
    use common_tls_context::ValidationContextType as V;
    Ok(match v {
        None => (None, None),
        Some(V::ValidationContext(c)) => (Some(c), None),
        Some(V::CombinedValidationContext(c)) => (
            c.default_validation_context.as_ref(),
            c.validation_context_sds_secret_config.as_ref(),
        ),
        Some(V::ValidationContextSdsSecretConfig(s)) => (None, Some(s)),
        Some(other) => return Err(format!("validation context {other:?} is not supported")),
    })
}

/// The client certificate and key, if the context presents one.
fn client_certificate(
    common: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let (chain, key) = if let Some(c) = common.tls_certificates.first() {
        let chain = c
            .certificate_chain
            .clone()
            .ok_or("a client certificate without its chain")?;
        let key = c.private_key.clone().ok_or("a client certificate without its key")?;
        (Source::Data(chain), Source::Data(key))
    } else if let Some(s) = common.tls_certificate_sds_secret_configs.first() {
        // istio-agent's name for a certificate and key file: `file-cert:CHAIN~KEY`.
        let files = s.name.strip_prefix("file-cert:").and_then(|f| f.split_once('~'));
        let Some((chain, key)) = files else {
            return Err(format!("SDS secret {:?} is not served here", s.name));
        };
        (Source::File(chain.to_owned()), Source::File(key.to_owned()))
    } else {
        return Ok(None);
    };
    let chain = certificates(&chain)?;
    if chain.is_empty() {
        return Err("the client certificate chain holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&bytes(&key)?).map_err(|e| format!("client key: {e}"))?;
    Ok(Some((chain, key)))
}

/// Where PEM comes from.
enum Source {
    Data(DataSource),
    File(String),
}

fn bytes(source: &Source) -> Result<Vec<u8>, String> {
    let read = |path: &str| -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut out = Vec::new();
        let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
        // A FIFO or a device named by xDS would block the reader, or never end.
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(format!("{path}: not a regular file"));
        }
        file.take(MAX_FILE + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("{path}: {e}"))?;
        if out.len() as u64 > MAX_FILE {
            return Err(format!("{path}: larger than {MAX_FILE} bytes"));
        }
        Ok(out)
    };
    match source {
        Source::File(path) => read(path),
        Source::Data(d) => match &d.specifier {
            Some(data_source::Specifier::Filename(path)) => read(path),
            Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
            Some(data_source::Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
            Some(data_source::Specifier::EnvironmentVariable(v)) => {
                Err(format!("a data source from ${v} is not supported"))
            }
            None => Err("an empty data source".into()),
        },
    }
}

fn certificates(source: &Source) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(&bytes(source)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificates: {e}"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The chain under the trusted CA and the leaf for one of `names` (else for the SNI);
/// without a CA (`insecureSkipVerify`) any certificate, though the handshake's
/// signatures must still hold.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<WebPkiServerVerifier>>,
    names: Vec<String>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        if self.names.is_empty() {
            return roots.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let mut last = rustls::Error::General("no subject alt name to verify".into());
        for name in &self.names {
            let Ok(name) = ServerName::try_from(name.as_str()) else {
                continue;
            };
            match roots.verify_server_cert(end_entity, intermediates, &name, ocsp, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, super::verify::algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, super::verify::algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::verify::algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, SubjectAltNameMatcher, common_tls_context::CombinedCertificateValidationContext,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;

    fn ctx(validation: Option<common_tls_context::ValidationContextType>, sds: &[&str]) -> UpstreamTlsContext {
        UpstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: sds
                    .iter()
                    .map(|n| SdsSecretConfig {
                        name: (*n).into(),
                        ..Default::default()
                    })
                    .collect(),
                validation_context_type: validation,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn trusting(
        ca: DataSource,
        sans: &[(subject_alt_name_matcher::SanType, &str)],
    ) -> common_tls_context::ValidationContextType {
        common_tls_context::ValidationContextType::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(ca),
            match_typed_subject_alt_names: sans
                .iter()
                .map(|(t, v)| SubjectAltNameMatcher {
                    san_type: *t as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact((*v).into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pem_of_a_ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn inline(pem: &str) -> DataSource {
        DataSource {
            specifier: Some(data_source::Specifier::InlineString(pem.into())),
            ..Default::default()
        }
    }

    #[test]
    fn the_mesh_hop_and_origination_are_told_apart() {
        let mesh_sds = common_tls_context::ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                validation_context_sds_secret_config: Some(SdsSecretConfig {
                    name: "ROOTCA".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert!(is_mesh(&ctx(Some(mesh_sds), &["default"])), "istiod's ISTIO_MUTUAL");
        let spiffe_only = common_tls_context::ValidationContextType::ValidationContext(Default::default());
        assert!(
            is_mesh(&ctx(Some(spiffe_only), &[])),
            "the explicit mode's: the mesh's bundles"
        );
        let own = trusting(inline(&pem_of_a_ca()), &[]);
        assert!(!is_mesh(&ctx(Some(own), &[])), "roots of its own");
        assert!(!is_mesh(&ctx(None, &[])), "no verification: insecureSkipVerify");
        assert!(!is_mesh(&UpstreamTlsContext::default()));
    }

    #[test]
    fn an_origination_reads_its_certificates_and_refuses_what_it_cannot_use() {
        let pem = pem_of_a_ca();
        let dns = subject_alt_name_matcher::SanType::Dns;
        let a = Origination::of(
            &ctx(Some(trusting(inline(&pem), &[(dns, "api.example.com")])), &[]),
            "h.example",
        )
        .unwrap();
        assert_eq!(
            a.sni,
            ServerName::try_from("h.example").unwrap(),
            "the host without an SNI"
        );
        assert!(a.http11.alpn_protocols == [b"http/1.1".to_vec()] && a.h2.alpn_protocols == [b"h2".to_vec()]);
        let b = Origination::of(&ctx(Some(trusting(inline(&pem_of_a_ca()), &[])), &[]), "h.example").unwrap();
        assert_ne!(a.fingerprint, b.fingerprint, "another CA, another pool");
        let again = Origination::of(
            &ctx(Some(trusting(inline(&pem), &[(dns, "api.example.com")])), &[]),
            "h.example",
        )
        .unwrap();
        assert_eq!(a.fingerprint, again.fingerprint);

        let missing = DataSource {
            specifier: Some(data_source::Specifier::Filename("/nonexistent/ca.pem".into())),
            ..Default::default()
        };
        let e = Origination::of(&ctx(Some(trusting(missing, &[])), &[]), "h").unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let device = DataSource {
            specifier: Some(data_source::Specifier::Filename("/dev/zero".into())),
            ..Default::default()
        };
        let e = Origination::of(&ctx(Some(trusting(device, &[])), &[]), "h").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Origination::of(&ctx(Some(trusting(inline("not pem"), &[])), &[]), "h").unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let uri = subject_alt_name_matcher::SanType::Uri;
        let e = Origination::of(&ctx(Some(trusting(inline(&pem), &[(uri, "spiffe://x/y")])), &[]), "h").unwrap_err();
        assert!(e.contains("DNS SAN"), "{e}");
        let e = Origination::of(&ctx(None, &["kubernetes://api-cert"]), "h").unwrap_err();
        assert!(e.contains("not served here"), "{e}");

        // istio-agent's file names for the rule's files.
        let dir = std::env::temp_dir().join(format!("isthmus-origination-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (ca, chain, key_file) = (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&ca, &pem).unwrap();
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let by_sds = common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(SdsSecretConfig {
            name: format!("file-root:{}", ca.display()),
            ..Default::default()
        });
        let cert_name = format!("file-cert:{}~{}", chain.display(), key_file.display());
        let o = Origination::of(&ctx(Some(by_sds), &[cert_name.as_str()]), "h.example").unwrap();
        assert!(o.tcp.client_auth_cert_resolver.has_certs());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
