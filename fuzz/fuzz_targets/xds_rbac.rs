//! Inbound policy from the controller, as the sidecar enforces it: arbitrary bytes are read
//! as a `virtualInbound` listener (compiled by `InboundPolicy::from_listeners`), as an
//! `envoy.config.rbac.v3.RBAC` (the authz compiler) and as an HTTP RBAC filter config
//! (rules and shadow rules); what compiles is checked against a few connections and
//! requests, with and without a caller identity. Checks: no panic; a port's PeerAuthentication
//! mode admits exactly the transports that find a chain there.

#![no_main]

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use hyper::{HeaderMap, Method, Uri};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sidecar::authz::{Attributes, Chain, Filter, HttpAttributes, Rules};
use sidecar::peer_authentication::MtlsMode;
use sidecar::virtual_inbound::{InboundPolicy, Transport, VIRTUAL_INBOUND};

/// Checks `chain` with a caller of our trust domain and without one, on a connection and
/// on a request.
fn check(chain: &Chain, port: u16) {
    let mut headers = HeaderMap::new();
    headers.insert("host", "reviews:9080".parse().unwrap());
    headers.insert("x-user", "jason".parse().unwrap());
    let uri: Uri = "/reviews/1?x=y".parse().unwrap();
    let http = HttpAttributes {
        method: &Method::GET,
        uri: &uri,
        headers: &headers,
    };
    for principal in [Some("spiffe://cluster.local/ns/default/sa/productpage"), None] {
        for http in [None, Some(http)] {
            let a = Attributes {
                principal,
                remote: [10, 0, 0, 1].into(),
                destination: ([10, 0, 0, 2], port).into(),
                server_name: Some("outbound_.9080_._.reviews.default.svc.cluster.local"),
                http,
            };
            let verdict = chain.check(&a);
            assert_eq!(verdict.allowed(), verdict.denied_by.is_none());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(mut l) = Listener::decode(data) {
        l.name = VIRTUAL_INBOUND.into();
        if let Ok(Some(policy)) = InboundPolicy::from_listeners(&[l.clone()]) {
            let ports = l
                .filter_chains
                .iter()
                .filter_map(|c| c.filter_chain_match.as_ref()?.destination_port.as_ref())
                .filter_map(|p| u16::try_from(p.value).ok())
                .take(8);
            for port in ports.chain([1, 9080]) {
                let mode = policy.mode_for(port);
                for (transport, admitted) in [
                    (Transport::MutualTls, [MtlsMode::Strict, MtlsMode::Permissive]),
                    (Transport::Plaintext, [MtlsMode::Disable, MtlsMode::Permissive]),
                ] {
                    let authorization = policy.authorization(port, transport);
                    let admits = mode.is_some_and(|m| admitted.contains(&m));
                    assert_eq!(
                        authorization.is_some(),
                        admits,
                        "port {port}, {transport:?}, mode {mode:?}"
                    );
                    if let Some(a) = authorization {
                        check(&a.connection, port);
                        check(&a.request, port);
                    }
                }
            }
        }
    }
    if let Ok(rbac) = Rbac::decode(data)
        && let Ok(rules) = Rules::compile(&rbac)
    {
        let filter = Filter {
            rules: Some(rules),
            shadow: None,
        };
        check(&Chain { filters: vec![filter] }, 9080);
    }
    if let Ok(http) = HttpRbac::decode(data)
        && let Ok(filter) = Filter::compile(http.rules.as_ref(), http.shadow_rules.as_ref())
    {
        check(&Chain { filters: vec![filter] }, 9080);
    }
});
