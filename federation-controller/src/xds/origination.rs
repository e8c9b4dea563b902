//! CDS for a DestinationRule's `tls.mode: SIMPLE` or `MUTUAL`: the proxy originates
//! TLS to the upstream itself (egress to an HTTPS API from a plaintext client), with the
//! certificates the rule names by file on the proxy's machine, as Istio's sidecars read
//! `caCertificates`, `clientCertificate` and `privateKey`.
//!
//! The server is verified as Istio verifies it (`VERIFY_CERTIFICATE_AT_CLIENT`, on by
//! default): against `caCertificates`, else the system's roots ([`SYSTEM_ROOTS`]), and
//! for one of `subjectAltNames`, else for the SNI. `insecureSkipVerify: true` verifies
//! nothing. The SNI is `sni`, else the service's host (Istio would take the request's
//! `Host` with auto-SNI, which is the host for a client that calls it by name).
//! `credentialName` (a Kubernetes Secret served over SDS) is not carried: the rule's
//! files, or the system roots, are used instead, and the controller says so at startup
//! of each push in `docs/l7-xds.md`'s list of what is left out.

use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, TlsCertificate, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher,
};

use super::any;
use super::mtls::{TLS_SOCKET, TLS_TYPE, exact_san};
use crate::model::Protocol;
use crate::networking::destination_rule::{ClientTlsSettings, TlsMode};

/// The roots a server is verified against when the rule names none: Debian's and
/// Ubuntu's bundle, where Istio's proxy images keep it.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The transport socket originating TLS to `host` as `tls` says, for a port speaking
/// `protocol`; None unless the mode is SIMPLE or MUTUAL.
pub fn transport_socket(tls: &ClientTlsSettings, host: &str, protocol: Protocol) -> Option<TransportSocket> {
    if !matches!(tls.mode, Some(TlsMode::Simple | TlsMode::Mutual)) {
        return None;
    }
    let file = |path: &str| DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_owned())),
        ..Default::default()
    };
    let sni = tls
        .sni
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| host.to_owned());
    let validation = (!tls.insecure_skip_verify.unwrap_or(false)).then(|| {
        let names = match tls.subject_alt_names.is_empty() {
            true => std::slice::from_ref(&sni),
            false => tls.subject_alt_names.as_slice(),
        };
        CertificateValidationContext {
            trusted_ca: Some(file(tls.ca_certificates.as_deref().unwrap_or(SYSTEM_ROOTS))),
            match_typed_subject_alt_names: names
                .iter()
                .map(|name| exact_san(subject_alt_name_matcher::SanType::Dns, name.clone()))
                .collect(),
            ..Default::default()
        }
    });
    let client = match (tls.mode, &tls.client_certificate, &tls.private_key) {
        (Some(TlsMode::Mutual), Some(cert), Some(key)) => vec![TlsCertificate {
            certificate_chain: Some(file(cert)),
            private_key: Some(file(key)),
            ..Default::default()
        }],
        _ => vec![],
    };
    // The application's HTTP is spoken to the upstream in the port's protocol.
    let alpn = match protocol {
        Protocol::Http => vec!["http/1.1".to_owned()],
        Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb => vec!["h2".to_owned()],
        Protocol::Tcp => vec![],
    };
    let context = UpstreamTlsContext {
        sni,
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: alpn,
            tls_certificates: client,
            validation_context_type: validation.map(common_tls_context::ValidationContextType::ValidationContext),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: TLS_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(TLS_TYPE, &context))),
    })
}
