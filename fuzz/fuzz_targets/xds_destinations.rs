//! xDS from the controller, as the sidecar turns it into its routing table: arbitrary bytes
//! are read as a DiscoveryResponse whose resources are decoded as listeners, clusters and
//! load assignments (by their type URL, or each kind in turn), then built into
//! `Destinations`, and the inbound clusters read for the application's protocols
//! (`AppHttp`). Checks: no panic; a table that builds routes every listener address to
//! a cluster it names, every endpoint it keeps has a weight of at least 1, and no
//! original-destination cluster is an upstream.

#![no_main]

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sidecar::app_http::AppHttp;
use sidecar::destinations::{Destinations, balanced};
use sidecar::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE};

fuzz_target!(|data: &[u8]| {
    let Ok(resp) = DiscoveryResponse::decode(data) else { return };
    let (mut listeners, mut clusters, mut assignments) = (Vec::new(), Vec::new(), HashMap::new());
    for any in &resp.resources {
        let bytes = any.value.as_slice();
        let all = !matches!(any.type_url.as_str(), LISTENER_TYPE | CLUSTER_TYPE | ENDPOINT_TYPE);
        if all || any.type_url == LISTENER_TYPE {
            if let Ok(l) = Listener::decode(bytes) {
                listeners.push(l);
            }
        }
        if all || any.type_url == CLUSTER_TYPE {
            if let Ok(c) = Cluster::decode(bytes) {
                clusters.push(c);
            }
        }
        if all || any.type_url == ENDPOINT_TYPE {
            if let Ok(cla) = ClusterLoadAssignment::decode(bytes) {
                assignments.insert(cla.cluster_name.clone(), cla);
            }
        }
    }
    if let Ok(Some(app)) = AppHttp::from_clusters(&clusters) {
        let _ = app.http2(9080);
    }
    let Ok(table) = Destinations::build(&listeners, &clusters, &assignments) else { return };
    for c in clusters.iter().filter(|c| !balanced(c)) {
        assert!(!table.upstreams.contains_key(&c.name) || clusters.iter().any(|d| d.name == c.name && balanced(d)));
    }
    for (addr, clusters) in &table.listeners {
        assert!(!clusters.weights().is_empty() && clusters.weights().iter().all(|(_, w)| *w >= 1));
        if let Some(up) = table.route(*addr) {
            assert!(clusters.weights().iter().any(|(name, _)| name == &up.name));
        }
    }
    for up in table.upstreams.values() {
        assert!(up.endpoints.iter().all(|e| e.weight >= 1));
        assert_eq!(up.balancer.len(), up.endpoints.len());
    }
});
