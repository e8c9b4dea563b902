//! CDS: a DestinationRule's traffic policy on an Envoy cluster, as
//! docs/l7-xds.md maps it — balancing (`lb_policy`), outlier detection (and
//! `minHealthPercent` as the panic threshold), connection-pool limits as circuit
//! breakers, and `maxRequestsPerConnection` in the upstream HTTP options. Pure.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{CommonLbConfig, LbPolicy};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, OutlierDetection, circuit_breakers};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CommonHttpOptions,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig, explicit_http_config,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::any;
use super::routes::proto_duration;
use crate::model::Protocol;
use crate::networking::destination_rule::{H2UpgradePolicy, SimpleLb, TlsMode, TrafficPolicy};

/// Where Envoy reads a cluster's upstream HTTP options.
pub const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_OPTIONS_TYPE: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Istio's enforcement of a set outlier condition: every detected outlier is ejected.
const ENFORCE: UInt32Value = UInt32Value { value: 100 };

/// Istio's circuit-breaker thresholds of every outbound cluster: no limit on connections,
/// pending requests, requests or retries. Envoy's own defaults (1,024, and 3 retries in
/// flight) turn pod churn and failover into 503s before new endpoints arrive, which is
/// why istiod raises them (`getDefaultCircuitBreakerThresholds`).
pub fn default_circuit_breakers() -> CircuitBreakers {
    CircuitBreakers {
        thresholds: vec![default_thresholds()],
        ..Default::default()
    }
}

fn default_thresholds() -> circuit_breakers::Thresholds {
    let max = || Some(UInt32Value { value: u32::MAX });
    circuit_breakers::Thresholds {
        max_connections: max(),
        max_pending_requests: max(),
        max_requests: max(),
        max_retries: max(),
        track_remaining: true,
        ..Default::default()
    }
}

/// Applies `policy` to `cluster`, whose port speaks `protocol`.
pub fn apply(cluster: &mut Cluster, policy: &TrafficPolicy, protocol: Protocol) {
    let u32v = |v: u32| Some(UInt32Value { value: v });
    // Istio's client TLS modes over auto mTLS (mTLS where the endpoint is labelled
    // `tlsMode: istio`): ISTIO_MUTUAL is the mesh's mTLS to every endpoint, DISABLE
    // plaintext to every endpoint, SIMPLE and MUTUAL TLS originated with the user's
    // certificates to every endpoint ([`super::origination`]).
    match policy.tls.as_ref().and_then(|t| t.mode) {
        Some(TlsMode::IstioMutual) => {
            if let Some(m) = cluster
                .transport_socket_matches
                .iter()
                .find(|m| m.name == super::mtls::ISTIO_MATCH)
            {
                cluster.transport_socket = m.transport_socket.clone();
            }
            cluster.transport_socket_matches.clear();
        }
        Some(TlsMode::Disable) => {
            cluster.transport_socket = None;
            cluster.transport_socket_matches.clear();
        }
        Some(TlsMode::Simple | TlsMode::Mutual) => {
            // The service's host, the last field of `outbound|PORT|SUBSET|HOST`.
            let host = cluster.name.rsplit('|').next().unwrap_or_default().to_owned();
            let tls = policy.tls.as_ref().expect("a TLS mode has its settings");
            cluster.transport_socket = super::origination::transport_socket(tls, &host, protocol);
            cluster.transport_socket_matches.clear();
        }
        None => {}
    }
    if let Some(lb) = &policy.load_balancer {
        cluster.lb_policy = match (lb.simple, &lb.consistent_hash) {
            (_, Some(_)) => LbPolicy::RingHash,
            (Some(SimpleLb::LeastConn | SimpleLb::LeastRequest), None) => LbPolicy::LeastRequest,
            (Some(SimpleLb::Random), None) => LbPolicy::Random,
            _ => LbPolicy::RoundRobin,
        } as i32;
    }
    if let Some(o) = &policy.outlier_detection {
        // Istio's deprecated `consecutiveErrors` counted gateway errors.
        let gateway = o.consecutive_gateway_errors.or(o.consecutive_errors);
        let enforce = |v: Option<u32>| {
            Some(if v.is_some_and(|v| v > 0) {
                ENFORCE
            } else {
                UInt32Value { value: 0 }
            })
        };
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx_errors.map(|v| UInt32Value { value: v }),
            enforcing_consecutive_5xx: enforce(o.consecutive_5xx_errors),
            consecutive_gateway_failure: gateway.map(|v| UInt32Value { value: v }),
            enforcing_consecutive_gateway_failure: enforce(gateway),
            split_external_local_origin_errors: o.split_external_local_origin_errors,
            consecutive_local_origin_failure: o.consecutive_local_origin_failures.map(|v| UInt32Value { value: v }),
            enforcing_consecutive_local_origin_failure: enforce(o.consecutive_local_origin_failures),
            interval: o.interval.map(|d| proto_duration(d.0)),
            base_ejection_time: o.base_ejection_time.map(|d| proto_duration(d.0)),
            max_ejection_percent: o.max_ejection_percent.map(|v| UInt32Value { value: v }),
            // Istio turns success-rate ejection off: only the consecutive counts eject.
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            ..Default::default()
        });
        if let Some(p) = o.min_health_percent {
            cluster.common_lb_config = Some(CommonLbConfig {
                healthy_panic_threshold: Some(Percent { value: f64::from(p) }),
                ..Default::default()
            });
        }
    }
    if let Some(pool) = &policy.connection_pool {
        let tcp = pool.tcp.as_ref();
        let http = pool.http.as_ref();
        // What the rule leaves unset keeps Istio's default (no limit), not Envoy's.
        let mut t = default_thresholds();
        let set = |field: &mut Option<UInt32Value>, v: Option<UInt32Value>| {
            if v.is_some() {
                *field = v;
            }
        };
        set(
            &mut t.max_connections,
            tcp.and_then(|t| t.max_connections).and_then(u32v),
        );
        set(
            &mut t.max_pending_requests,
            http.and_then(|h| h.http1_max_pending_requests).and_then(u32v),
        );
        set(
            &mut t.max_requests,
            http.and_then(|h| h.http2_max_requests).and_then(u32v),
        );
        set(&mut t.max_retries, http.and_then(|h| h.max_retries).and_then(u32v));
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![t],
            ..Default::default()
        });
        if let Some(t) = tcp.and_then(|t| t.connect_timeout) {
            cluster.connect_timeout = Some(proto_duration(t.0));
        }
        let per_connection = http.and_then(|h| h.max_requests_per_connection);
        let idle = http.and_then(|h| h.idle_timeout);
        let upgrade = http
            .and_then(|h| h.h2_upgrade_policy)
            .filter(|u| *u != H2UpgradePolicy::Default);
        if protocol.is_http() && (per_connection.is_some() || idle.is_some() || upgrade.is_some()) {
            // The options need the upstream protocol too. A gRPC or HTTP/2 port is
            // HTTP/2; an HTTP port takes what its rule says (Istio's
            // `h2UpgradePolicy`) and, left at DEFAULT, the downstream's protocol, so
            // the mesh-wide choice (our sidecars' `--h2-upgrade`, Istio's
            // DO_NOT_UPGRADE) still holds when only a pool limit is set.
            let upstream = match (protocol, upgrade) {
                (Protocol::Http, Some(H2UpgradePolicy::DoNotUpgrade)) => explicit(
                    explicit_http_config::ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default()),
                ),
                (Protocol::Http, None) => {
                    UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
                        http_protocol_options: Some(Http1ProtocolOptions::default()),
                        http2_protocol_options: Some(Http2ProtocolOptions::default()),
                        ..Default::default()
                    })
                }
                _ => explicit_http2(),
            };
            let options = HttpProtocolOptions {
                common_http_protocol_options: Some(CommonHttpOptions {
                    max_requests_per_connection: per_connection.and_then(u32v),
                    idle_timeout: idle.map(|d| proto_duration(d.0)),
                    ..Default::default()
                }),
                upstream_protocol_options: Some(upstream),
                ..Default::default()
            };
            cluster.typed_extension_protocol_options =
                HashMap::from([(HTTP_OPTIONS.to_owned(), any(HTTP_OPTIONS_TYPE, &options))]);
        }
    }
}

/// Istio's upstream protocol of a port (`setUpstreamProtocol`): the cluster of an HTTP/2
/// or gRPC port speaks HTTP/2 to its endpoints whatever its callers spoke — Envoy's
/// default is HTTP/1.1, which such servers do not take. A cluster whose rule wrote its
/// HTTP options already ([`apply`]) has its protocol in them.
pub fn set_upstream_protocol(c: &mut Cluster, protocol: Protocol) {
    if protocol.is_http2() && !c.typed_extension_protocol_options.contains_key(HTTP_OPTIONS) {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(explicit_http2()),
            ..Default::default()
        };
        c.typed_extension_protocol_options
            .insert(HTTP_OPTIONS.to_owned(), any(HTTP_OPTIONS_TYPE, &options));
    }
}

/// Upstream HTTP options that say which HTTP, whatever the downstream spoke.
fn explicit(config: explicit_http_config::ProtocolConfig) -> UpstreamProtocolOptions {
    UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
        protocol_config: Some(config),
    })
}

fn explicit_http2() -> UpstreamProtocolOptions {
    explicit(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
        Http2ProtocolOptions::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networking::DestinationRule;
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source, transport_socket};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{UpstreamTlsContext, common_tls_context};
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
    use prost::Message;

    fn policy(yaml: &str) -> TrafficPolicy {
        let dr: DestinationRule = serde_saphyr::from_str(yaml).unwrap();
        dr.validate().unwrap();
        dr.spec.traffic_policy.unwrap()
    }

    #[test]
    fn thresholds_a_rule_leaves_unset_keep_istios_no_limit() {
        let p = policy("spec: {host: reviews, trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 1}}}}");
        let mut c = Cluster {
            circuit_breakers: Some(default_circuit_breakers()),
            ..Default::default()
        };
        let defaults = c.circuit_breakers.clone().unwrap().thresholds[0];
        assert_eq!(
            defaults.max_retries,
            Some(UInt32Value { value: u32::MAX }),
            "not Envoy's 3"
        );
        apply(&mut c, &p, Protocol::Http);
        let t = &c.circuit_breakers.unwrap().thresholds[0];
        assert_eq!(t.max_pending_requests, Some(UInt32Value { value: 1 }));
        assert_eq!(
            (&t.max_connections, &t.max_requests, &t.max_retries),
            (&defaults.max_connections, &defaults.max_requests, &defaults.max_retries)
        );
    }

    #[test]
    fn a_traffic_policy_becomes_balancing_outlier_detection_and_circuit_breakers() {
        let p = policy(
            r#"
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 5, maxRetries: 3}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m, maxEjectionPercent: 50, minHealthPercent: 30}
"#,
        );
        let mut c = Cluster::default();
        apply(&mut c, &p, Protocol::Http);
        assert_eq!(c.lb_policy, LbPolicy::LeastRequest as i32);
        let o = c.outlier_detection.unwrap();
        assert_eq!(o.consecutive_5xx, Some(UInt32Value { value: 7 }));
        assert_eq!(o.enforcing_consecutive_5xx, Some(ENFORCE));
        assert_eq!(o.enforcing_consecutive_gateway_failure, Some(UInt32Value { value: 0 }));
        assert_eq!(o.interval.unwrap().seconds, 300);
        assert_eq!(o.base_ejection_time.unwrap().seconds, 900);
        assert_eq!(o.max_ejection_percent, Some(UInt32Value { value: 50 }));
        assert_eq!(
            c.common_lb_config.unwrap().healthy_panic_threshold,
            Some(Percent { value: 30.0 })
        );
        let t = &c.circuit_breakers.unwrap().thresholds[0];
        let v = |x: Option<UInt32Value>| x.map(|v| v.value);
        assert_eq!(
            (
                v(t.max_connections),
                v(t.max_pending_requests),
                v(t.max_requests),
                v(t.max_retries)
            ),
            (Some(100), Some(10), Some(1000), Some(3))
        );
        assert!(t.track_remaining);
        let opts = &c.typed_extension_protocol_options[HTTP_OPTIONS];
        let opts = HttpProtocolOptions::decode(opts.value.as_slice()).unwrap();
        assert_eq!(
            opts.common_http_protocol_options.unwrap().max_requests_per_connection,
            Some(UInt32Value { value: 5 })
        );
    }

    #[test]
    fn h2_upgrade_policy_chooses_the_upstream_http_of_an_http_port() {
        let upstream = |yaml: &str, protocol: Protocol| {
            let mut c = Cluster::default();
            apply(&mut c, &policy(yaml), protocol);
            let opts = c.typed_extension_protocol_options.get(HTTP_OPTIONS)?;
            let opts = HttpProtocolOptions::decode(opts.value.as_slice()).unwrap();
            match opts.upstream_protocol_options {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => e.protocol_config,
                other => panic!("{other:?}"),
            }
        };
        let rule = |p: &str| {
            format!("spec: {{host: r, trafficPolicy: {{connectionPool: {{http: {{h2UpgradePolicy: {p}}}}}}}}}")
        };
        assert!(matches!(
            upstream(&rule("UPGRADE"), Protocol::Http),
            Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_))
        ));
        assert!(matches!(
            upstream(&rule("DO_NOT_UPGRADE"), Protocol::Http),
            Some(explicit_http_config::ProtocolConfig::HttpProtocolOptions(_))
        ));
        // The mesh's default leaves the cluster as it was; a gRPC port is HTTP/2 whatever.
        assert!(upstream(&rule("DEFAULT"), Protocol::Http).is_none());
        // A pool limit alone keeps the mesh's choice: the downstream's protocol.
        let mut c = Cluster::default();
        let limit = "spec: {host: r, trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 2}}}}";
        apply(&mut c, &policy(limit), Protocol::Http);
        let opts =
            HttpProtocolOptions::decode(c.typed_extension_protocol_options[HTTP_OPTIONS].value.as_slice()).unwrap();
        assert!(matches!(
            opts.upstream_protocol_options,
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                UseDownstreamHttpConfig {
                    http_protocol_options: Some(_),
                    http2_protocol_options: Some(_),
                    ..
                }
            ))
        ));
        assert!(matches!(
            upstream(&rule("DO_NOT_UPGRADE"), Protocol::Grpc),
            Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_))
        ));
        let bad: Result<DestinationRule, _> = serde_saphyr::from_str(&rule("SOMETIMES"));
        assert!(bad.is_err());
    }

    #[test]
    fn an_http2_or_grpc_port_speaks_http2_upstream_with_or_without_a_rule() {
        let explicit = |c: &Cluster| {
            let opts = c.typed_extension_protocol_options.get(HTTP_OPTIONS)?;
            match HttpProtocolOptions::decode(opts.value.as_slice())
                .unwrap()
                .upstream_protocol_options
            {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => e.protocol_config,
                other => panic!("{other:?}"),
            }
        };
        for (protocol, h2) in [
            (Protocol::Grpc, true),
            (Protocol::Http2, true),
            (Protocol::Http, false),
            (Protocol::GrpcWeb, false),
            (Protocol::Tcp, false),
        ] {
            let mut c = Cluster::default();
            set_upstream_protocol(&mut c, protocol);
            assert_eq!(
                matches!(
                    explicit(&c),
                    Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_))
                ),
                h2,
                "{protocol:?}"
            );
            assert_eq!(c.typed_extension_protocol_options.is_empty(), !h2, "{protocol:?}");
        }
        // A rule's own options (here a pool limit, which wrote HTTP/2 for the gRPC port) stay.
        let mut c = Cluster::default();
        let limit = "spec: {host: r, trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 2}}}}";
        apply(&mut c, &policy(limit), Protocol::Grpc);
        let before = c.typed_extension_protocol_options.clone();
        set_upstream_protocol(&mut c, Protocol::Grpc);
        assert_eq!(c.typed_extension_protocol_options, before);
    }

    #[test]
    fn istio_mutual_is_mtls_to_every_endpoint_and_disable_to_none() {
        let key = crate::model::ServiceKey {
            host: mesh_vocab::Hostname::parse("reviews.default.svc.cluster.local").unwrap(),
            port: 9080,
        };
        let auto = || Cluster {
            transport_socket_matches: super::super::mtls::transport_socket_matches(&key, None, &[]),
            ..Default::default()
        };
        let rule = |mode: &str| policy(&format!("spec: {{host: r, trafficPolicy: {{tls: {{mode: {mode}}}}}}}"));
        let mut c = auto();
        apply(&mut c, &rule("ISTIO_MUTUAL"), Protocol::Http);
        assert!(c.transport_socket_matches.is_empty());
        assert_eq!(
            c.transport_socket.map(|t| t.name).as_deref(),
            Some("envoy.transport_sockets.tls"),
            "the mTLS socket, for every endpoint"
        );
        let mut c = auto();
        apply(&mut c, &rule("DISABLE"), Protocol::Http);
        assert!(
            c.transport_socket_matches.is_empty() && c.transport_socket.is_none(),
            "plaintext"
        );
    }

    /// What a SIMPLE or MUTUAL rule originates, decoded from the cluster's socket.
    fn originated(tls: &str, protocol: Protocol) -> UpstreamTlsContext {
        let mut c = Cluster {
            name: "outbound|443||api.example.com".into(),
            ..Default::default()
        };
        apply(
            &mut c,
            &policy(&format!("spec: {{host: r, trafficPolicy: {{tls: {tls}}}}}")),
            protocol,
        );
        assert!(c.transport_socket_matches.is_empty());
        let socket = c.transport_socket.expect("a TLS socket");
        let Some(transport_socket::ConfigType::TypedConfig(any)) = socket.config_type else {
            panic!("typed")
        };
        UpstreamTlsContext::decode(any.value.as_slice()).unwrap()
    }

    fn validation(ctx: &UpstreamTlsContext) -> Option<(String, Vec<String>)> {
        let common = ctx.common_tls_context.as_ref().unwrap();
        let Some(common_tls_context::ValidationContextType::ValidationContext(v)) = &common.validation_context_type
        else {
            return None;
        };
        let Some(data_source::Specifier::Filename(ca)) = v.trusted_ca.as_ref().unwrap().specifier.clone() else {
            panic!("a file")
        };
        let sans = v
            .match_typed_subject_alt_names
            .iter()
            .map(|m| match m.matcher.as_ref().unwrap().match_pattern.as_ref().unwrap() {
                string_matcher::MatchPattern::Exact(s) => s.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        Some((ca, sans))
    }

    #[test]
    fn simple_and_mutual_originate_tls_with_the_rules_files() {
        let simple = originated("{mode: SIMPLE}", Protocol::Http);
        assert_eq!(simple.sni, "api.example.com", "the host when no sni");
        assert_eq!(
            validation(&simple),
            Some((
                super::super::origination::SYSTEM_ROOTS.into(),
                vec!["api.example.com".into()]
            )),
            "the system's roots, for the SNI"
        );
        let common = simple.common_tls_context.as_ref().unwrap();
        assert_eq!(common.alpn_protocols, ["http/1.1"]);
        assert!(common.tls_certificates.is_empty());

        let mutual = originated(
            "{mode: MUTUAL, clientCertificate: /etc/certs/c.pem, privateKey: /etc/certs/k.pem,              caCertificates: /etc/certs/ca.pem, sni: my.api, subjectAltNames: [a.api, b.api]}",
            Protocol::Grpc,
        );
        assert_eq!(mutual.sni, "my.api");
        assert_eq!(
            validation(&mutual),
            Some(("/etc/certs/ca.pem".into(), vec!["a.api".into(), "b.api".into()]))
        );
        let common = mutual.common_tls_context.as_ref().unwrap();
        assert_eq!(common.alpn_protocols, ["h2"]);
        let file = |d: &Option<DataSource>| match d.as_ref().unwrap().specifier.clone() {
            Some(data_source::Specifier::Filename(f)) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(file(&common.tls_certificates[0].certificate_chain), "/etc/certs/c.pem");
        assert_eq!(file(&common.tls_certificates[0].private_key), "/etc/certs/k.pem");

        let insecure = originated("{mode: SIMPLE, insecureSkipVerify: true}", Protocol::Tcp);
        assert_eq!(validation(&insecure), None, "nothing verified");
        assert!(insecure.common_tls_context.unwrap().alpn_protocols.is_empty());

        let refused = |tls: &str| {
            let yaml = format!(
                "spec: {{host: r, trafficPolicy: {{portLevelSettings: [{{port: {{number: 443}}, tls: {tls}}}]}}}}"
            );
            let dr: DestinationRule = serde_saphyr::from_str(&yaml).unwrap();
            dr.validate().map_err(|e| e.to_string()).unwrap_err()
        };
        let no_cert = refused("{mode: MUTUAL, privateKey: /k.pem}");
        assert!(
            no_cert.contains("client certificate required for mutual tls"),
            "{no_cert}"
        );
        assert!(
            no_cert.contains("portLevelSettings[0].tls.clientCertificate"),
            "{no_cert}"
        );
        let no_key = refused("{mode: MUTUAL, clientCertificate: /c.pem}");
        assert!(no_key.contains("private key required for mutual tls"), "{no_key}");
        originated("{mode: MUTUAL, credentialName: api-client}", Protocol::Http);
    }

    #[test]
    fn consistent_hash_balances_on_a_ring() {
        let p = policy("spec: {host: r, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}}");
        let mut c = Cluster::default();
        apply(&mut c, &p, Protocol::Http);
        assert_eq!(c.lb_policy, LbPolicy::RingHash as i32);
    }
}
