//! CDS and EDS for DestinationRules: a service port's cluster carries the rule's
//! policy, and each subset gets a cluster of its own, `outbound|PORT|SUBSET|HOST`,
//! with its merged policy, the subset's mTLS SNI and the endpoints that carry all
//! of its labels (federated like the service's, [`federation::subset_view_for`]). Pure.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use mesh_vocab::SpiffeId;

use super::policy;
use crate::federation;
use crate::model::ServiceKey;
use crate::networking::destination_rule::effective_policy;
use crate::routing::Routing;

/// Every Envoy cluster of service port `key` — its own, then one per subset —
/// each with its effective traffic policy.
pub fn clusters(key: &ServiceKey, routing: &Routing, identities: &[SpiffeId]) -> Vec<Cluster> {
    let protocol = routing.protocol(key);
    let mut base = super::cluster(key, None, identities);
    let Some((_, dr)) = routing.destination_rule(&key.host) else {
        policy::set_upstream_protocol(&mut base, protocol);
        return vec![base];
    };
    policy::apply(&mut base, &effective_policy(dr, None, key.port), protocol);
    policy::set_upstream_protocol(&mut base, protocol);
    let mut out = vec![base];
    for s in &dr.subsets {
        let mut c = super::cluster(key, Some(&s.name), identities);
        policy::apply(&mut c, &effective_policy(dr, Some(&s.name), key.port), protocol);
        policy::set_upstream_protocol(&mut c, protocol);
        out.push(c);
    }
    out
}

/// The subset clusters' names and endpoints, for a proxy whose view is `view`.
pub fn load_assignments(
    view: &federation::SubsetView,
) -> impl Iterator<
    Item = (
        &federation::SubsetKey,
        envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
    ),
> {
    view.iter().map(|(k, eps)| {
        (
            k,
            super::load_assignment(super::subset_cluster_name(&k.service, &k.subset), eps),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterModel, Instance, Locality, Traffic};
    use crate::networking::DestinationRule;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
    use mesh_vocab::{ClusterId, Hostname, NetworkId};
    use std::sync::Arc;

    fn reviews() -> ServiceKey {
        ServiceKey {
            host: Hostname::parse("reviews.default.svc.cluster.local").unwrap(),
            port: 9080,
        }
    }

    fn model() -> ClusterModel {
        let dr: DestinationRule = serde_saphyr::from_str(
            r#"
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
"#,
        )
        .unwrap();
        let instance = |ip: u8, version: &str| Instance {
            service: reviews(),
            address: [10, 241, 0, ip].into(),
            target_port: 9080,
            network: NetworkId::new("n1"),
            locality: Locality::default(),
            mtls: true,
            labels: [("version".to_owned(), version.to_owned())].into(),
            service_account: None,
            weight: 1,
        };
        ClusterModel {
            exposure: Default::default(),
            cluster: ClusterId::new("c1"),
            instances: vec![instance(1, "v1"), instance(2, "v2"), instance(3, "v2")],
            named: vec![],
            vips: vec![],
            gateways: vec![],
            security: Default::default(),
            traffic: Arc::new(Traffic {
                destination_rules: vec![dr],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn each_subset_is_a_cluster_with_its_policy_sni_and_labelled_endpoints() {
        let m = model();
        let routing = Routing::merge([&m], "cluster.local");
        let cs = clusters(&reviews(), &routing, &[]);
        let names: Vec<&str> = cs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "outbound|9080||reviews.default.svc.cluster.local",
                "outbound|9080|v1|reviews.default.svc.cluster.local",
                "outbound|9080|v2|reviews.default.svc.cluster.local",
            ]
        );
        let lb: Vec<i32> = cs.iter().map(|c| c.lb_policy).collect();
        assert_eq!(
            lb,
            [
                LbPolicy::Random as i32,
                LbPolicy::Random as i32,
                LbPolicy::LeastRequest as i32
            ],
            "the subset's policy overrides the rule's"
        );
        assert_eq!(
            cs[2].eds_cluster_config.as_ref().unwrap().service_name,
            "outbound|9080|v2|reviews.default.svc.cluster.local"
        );
        let subsets = routing.subsets([&reviews()]);
        let view = federation::subset_view_for(
            &NetworkId::new("n1"),
            &[(&m, false)],
            &Default::default(),
            &Default::default(),
            &subsets,
        );
        let counts: Vec<(String, usize)> = load_assignments(&view)
            .map(|(_, cla)| {
                (
                    cla.cluster_name,
                    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum(),
                )
            })
            .collect();
        assert_eq!(
            counts,
            [
                ("outbound|9080|v1|reviews.default.svc.cluster.local".to_owned(), 1),
                ("outbound|9080|v2|reviews.default.svc.cluster.local".to_owned(), 2),
            ]
        );
        let mut none = routing.subsets([&reviews()]);
        none[0].1.insert("version".into(), "v9".into());
        let view = federation::subset_view_for(
            &NetworkId::new("n1"),
            &[(&m, false)],
            &Default::default(),
            &Default::default(),
            &none,
        );
        assert_eq!(
            view.values().map(Vec::len).collect::<Vec<_>>(),
            [0, 2],
            "a subset nothing matches is there, empty"
        );
    }
}
