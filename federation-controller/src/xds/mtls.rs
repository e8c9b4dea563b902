//! Istio's auto-mTLS, in CDS and EDS: every cluster carries two transport
//! sockets, and each endpoint's metadata picks one. An endpoint that speaks mesh
//! mTLS (a sidecar'd pod, or a gateway standing for another network) is marked
//! `tlsMode: istio` and is reached over TLS with the workload's SVID, checking
//! that the server is one of the service's identities; any other endpoint
//! falls through to the plaintext socket, whose match is empty.
//!
//! Certificates come over SDS from the proxy's local agent, as Istio's
//! bootstrap names it (`sds-grpc`): `default` is the workload's own SVID,
//! `ROOTCA` the roots of its trust domain.

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, ConfigSource, GrpcService, TransportSocket, api_config_source, config_source,
    grpc_service, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use mesh_vocab::SpiffeId;

use super::any;
use crate::model::ServiceKey;

/// The endpoint metadata key Envoy matches transport sockets against.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// The bootstrap cluster of the local SDS server (istio-agent's).
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The SDS name of the workload's own certificate.
pub const WORKLOAD_SECRET: &str = "default";
/// The SDS name of the trust domain's roots.
pub const ROOT_SECRET: &str = crate::trust::ROOTCA;
/// The ALPN the mesh's mTLS speaks.
pub const MTLS_ALPN: &str = "istio";

pub(super) const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
pub(super) const TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const RAW_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
const RAW_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// `{tlsMode: istio}`: the metadata of an mTLS endpoint, and the match of the TLS socket.
pub fn tls_mode_istio() -> Struct {
    Struct {
        fields: [(
            "tlsMode".to_owned(),
            Value {
                kind: Some(Kind::StringValue("istio".into())),
            },
        )]
        .into(),
    }
}

/// Where secrets come from: the local agent's SDS, over gRPC.
pub fn sds_config() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
            api_type: api_config_source::ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            grpc_services: vec![GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                    cluster_name: SDS_CLUSTER.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(sds_config()),
    }
}

/// The mTLS client context for `key` (and `subset`): SNI `outbound_.<port>_.<subset>_.<host>`
/// (which an east-west gateway routes on; no subset is an empty field), the
/// workload's SVID, and a server that must present one of `identities` under the
/// trust domain's roots.
pub fn upstream_tls(key: &ServiceKey, subset: Option<&str>, identities: &[SpiffeId]) -> UpstreamTlsContext {
    let sans = identities
        .iter()
        .map(|id| exact_san(subject_alt_name_matcher::SanType::Uri, id.to_string()))
        .collect();
    UpstreamTlsContext {
        sni: format!("outbound_.{}_.{}_.{}", key.port, subset.unwrap_or_default(), key.host),
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec![MTLS_ALPN.into()],
            tls_certificate_sds_secret_configs: vec![sds_secret(WORKLOAD_SECRET)],
            validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds_secret(ROOT_SECRET)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A SAN matcher: a SAN of `san_type` equal to `value`.
pub(super) fn exact_san(san_type: subject_alt_name_matcher::SanType, value: String) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: san_type as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(value)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The mTLS server context of a sidecar's inbound side: the workload's SVID, and
/// a client certificate required under the trust domain's roots (who the client
/// is, the RBAC filters decide).
pub fn downstream_tls() -> DownstreamTlsContext {
    DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_secret(WORKLOAD_SECRET)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds_secret(ROOT_SECRET)),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        ..Default::default()
    }
}

/// The name of the transport socket match for `tlsMode: istio` endpoints (Istio's).
pub const ISTIO_MATCH: &str = "tlsMode-istio";

/// The cluster's two transport sockets: mTLS for `tlsMode: istio` endpoints, plaintext for the rest.
pub fn transport_socket_matches(
    key: &ServiceKey,
    subset: Option<&str>,
    identities: &[SpiffeId],
) -> Vec<TransportSocketMatch> {
    let socket = |name: &str, config| TransportSocket {
        name: name.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(config)),
    };
    vec![
        TransportSocketMatch {
            name: ISTIO_MATCH.into(),
            r#match: Some(tls_mode_istio()),
            transport_socket: Some(socket(
                TLS_SOCKET,
                any(TLS_TYPE, &upstream_tls(key, subset, identities)),
            )),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(socket(RAW_SOCKET, any(RAW_TYPE, &RawBuffer {}))),
        },
    ]
}
