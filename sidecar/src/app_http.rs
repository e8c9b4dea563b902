//! Which HTTP the application behind the inbound side speaks, per port: what Istio writes
//! in a workload's inbound clusters, `inbound|PORT||`. A port named `http2` or `grpc` (or
//! with that `appProtocol`) is served by an application that takes HTTP/2 only, in
//! cleartext with prior knowledge, so its inbound cluster says HTTP/2 in its
//! `HttpProtocolOptions` and every request goes to it so, whatever the caller spoke;
//! other HTTP ports get HTTP/1.1, Envoy's default. A gRPC request goes in HTTP/2 to any
//! port: it means nothing in HTTP/1.1 (see [`crate::http::needs_http2`]).
//!
//! The sidecar reaches its application by address (capture's original destination, or
//! `--inbound`'s target), so of these clusters it reads only the protocol; they are not
//! upstreams (original-destination clusters never are, see [`crate::destinations`]).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;

use crate::cluster::UpstreamHttp;
use crate::destinations::BadResource;

/// The prefix of Istio's inbound cluster names.
const INBOUND_PREFIX: &str = "inbound|";

/// The application's HTTP per port, with a default for the ports no cluster names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppHttp {
    ports: BTreeMap<u16, bool>,
    /// HTTP/2 to ports no cluster names (`--protocol http2`).
    http2: bool,
}

impl AppHttp {
    /// Every port HTTP/2 (`http2`) or HTTP/1.1.
    pub fn uniform(http2: bool) -> Self {
        Self {
            ports: BTreeMap::new(),
            http2,
        }
    }

    /// Reads the inbound clusters among `clusters`; None when there are none (the flags
    /// keep deciding). Another port-less inbound cluster (`inbound|http|…`) is not a port's.
    pub fn from_clusters(clusters: &[Cluster]) -> Result<Option<Self>, BadResource> {
        let mut ports = BTreeMap::new();
        for c in clusters.iter().filter(|c| c.name.starts_with(INBOUND_PREFIX)) {
            let Some(port) = c.name[INBOUND_PREFIX.len()..]
                .split('|')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let http = UpstreamHttp::of(c).map_err(|problem| BadResource {
                resource: c.name.clone(),
                problem,
            })?;
            ports.insert(port, http == UpstreamHttp::Http2);
        }
        Ok((!ports.is_empty()).then_some(Self { ports, http2: false }))
    }

    /// Whether the application on `port` is spoken to in HTTP/2 only.
    pub fn http2(&self, port: u16) -> bool {
        self.ports.get(&port).copied().unwrap_or(self.http2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn named(name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            ..Default::default()
        }
    }

    // HTTP/2 from the options is end to end in tests/app_protocol.rs.
    #[test]
    fn the_port_is_the_inbound_clusters_and_other_clusters_are_not_read() {
        let outbound = named("outbound|9080||reviews.default.svc.cluster.local");
        let app = AppHttp::from_clusters(&[outbound.clone(), named("inbound|9000||")])
            .unwrap()
            .unwrap();
        assert_eq!(app.ports.keys().collect::<Vec<_>>(), [&9000]);
        assert!(!app.http2(9000), "no options: HTTP/1.1, Envoy's default");
        assert_eq!(AppHttp::from_clusters(&[outbound]).unwrap(), None);
        assert_eq!(AppHttp::from_clusters(&[named("inbound|http|9080")]).unwrap(), None);
        assert!(AppHttp::uniform(true).http2(7000), "the flag's, for every port");
    }

    #[test]
    fn an_inbound_cluster_with_unusable_options_is_refused_by_name() {
        let mut c = named("inbound|9000||");
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            Any {
                type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                value: vec![0xff],
            },
        );
        assert_eq!(AppHttp::from_clusters(&[c]).unwrap_err().resource, "inbound|9000||");
    }
}
