//! The mesh's Istio traffic config, merged across the live clusters, with the
//! lookups xDS translation needs: which VirtualService routes a host, which
//! DestinationRule applies to it, what each service port speaks, and which
//! subsets exist.
//!
//! Several clusters often hold the same object (config applied everywhere):
//! an object is known by namespace and name, and the first cluster (in cluster
//! order) that has it wins, so every controller chooses alike. Pure.
//!
//! Gateway API HTTPRoutes attached to a Service ([`gamma`]) route that Service's
//! host; where a VirtualService names the same host too, the HTTPRoutes win, as in
//! Istio, whose GAMMA routes for a Service take precedence over VirtualServices.

pub mod gamma;

use std::collections::BTreeMap;

use mesh_vocab::Hostname;

use crate::federation::{SubsetKey, SubsetLabels};
use crate::model::{ClusterModel, Protocol, ServiceKey};
use crate::networking::destination_rule::DestinationRuleSpec;
use crate::networking::virtual_service::{HttpRoute, VirtualServiceSpec};
use crate::networking::{self, DestinationRule, VirtualService};

/// Istio's name for the sidecars as a VirtualService's gateway.
pub const MESH_GATEWAY: &str = "mesh";

/// The routing config of the mesh, as of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// By (namespace, name).
    virtual_services: BTreeMap<(String, String), VirtualService>,
    destination_rules: BTreeMap<(String, String), DestinationRule>,
    protocols: BTreeMap<ServiceKey, Protocol>,
    sni_only: std::collections::BTreeSet<ServiceKey>,
    host_only: std::collections::BTreeSet<ServiceKey>,
    /// The HTTPRoutes' rules, by Service host; in VirtualService form.
    gamma: BTreeMap<String, gamma::HostRoutes>,
    domain: String,
}

impl Routing {
    /// Merges the config of `models` (in cluster order; the first holder of a name wins).
    pub fn merge<'a>(models: impl IntoIterator<Item = &'a ClusterModel>, domain: &str) -> Self {
        let mut out = Routing {
            domain: domain.to_owned(),
            ..Default::default()
        };
        let (mut http_routes, mut grants) = (BTreeMap::new(), BTreeMap::new());
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (
                networking::namespace_of(m).to_owned(),
                m.name.clone().unwrap_or_default(),
            )
        };
        for m in models {
            for vs in &m.traffic.virtual_services {
                out.virtual_services
                    .entry(key(&vs.metadata))
                    .or_insert_with(|| vs.clone());
            }
            for dr in &m.traffic.destination_rules {
                out.destination_rules
                    .entry(key(&dr.metadata))
                    .or_insert_with(|| dr.clone());
            }
            for (k, p) in &m.traffic.protocols {
                out.protocols.entry(k.clone()).or_insert(*p);
            }
            out.sni_only.extend(m.traffic.sni_only.iter().cloned());
            out.host_only.extend(m.traffic.host_only.iter().cloned());
            for r in &m.traffic.http_routes {
                http_routes.entry(key(&r.metadata)).or_insert(r);
            }
            for g in &m.traffic.reference_grants {
                grants.entry(key(&g.metadata)).or_insert(g);
            }
        }
        let protocols = &out.protocols;
        let known = |host: &str, port: u16| {
            Hostname::parse(host).is_ok_and(|host| protocols.contains_key(&ServiceKey { host, port }))
        };
        let grants: Vec<_> = grants.into_values().collect();
        out.gamma = gamma::translate(http_routes.into_values(), domain, known, &grants);
        out
    }

    /// What `key` speaks (TCP when no cluster has its Service).
    pub fn protocol(&self, key: &ServiceKey) -> Protocol {
        self.protocols.get(key).copied().unwrap_or(Protocol::Tcp)
    }

    /// The TLS ports of ServiceEntry hosts without addresses, found by SNI on their
    /// port's wildcard listener.
    pub fn sni_only(&self) -> &std::collections::BTreeSet<ServiceKey> {
        &self.sni_only
    }

    /// The HTTP ports of ServiceEntry hosts without addresses, found by `Host` on their
    /// port's wildcard listener.
    pub fn host_only(&self) -> &std::collections::BTreeSet<ServiceKey> {
        &self.host_only
    }

    /// The service ports that speak HTTP, which get route configurations.
    pub fn http_ports(&self) -> impl Iterator<Item = &ServiceKey> {
        self.protocols.iter().filter(|(_, p)| p.is_http()).map(|(k, _)| k)
    }

    /// The fully qualified name of `host` written in config of `namespace`.
    pub fn fqdn(&self, host: &str, namespace: &str) -> String {
        networking::fqdn(host, namespace, &self.domain)
    }

    /// The VirtualService that routes sidecars' requests to `host` (and its
    /// namespace): the first, by namespace and name, that names the host and
    /// applies to the mesh, as istiod picks one when several claim a host.
    pub fn virtual_service(&self, host: &Hostname) -> Option<(&str, &VirtualServiceSpec)> {
        self.virtual_services.iter().find_map(|((ns, _), vs)| {
            let for_mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == MESH_GATEWAY);
            let names = vs.spec.hosts.iter().any(|h| self.fqdn(h, ns) == host.as_str());
            (for_mesh && names).then_some((ns.as_str(), &vs.spec))
        })
    }

    /// The DestinationRule for `host` (and its namespace): one naming it exactly,
    /// else the one whose wildcard (`*.example.com`) covers it most narrowly.
    pub fn destination_rule(&self, host: &Hostname) -> Option<(&str, &DestinationRuleSpec)> {
        let mut best: Option<(usize, &str, &DestinationRuleSpec)> = None;
        for ((ns, _), dr) in &self.destination_rules {
            let name = self.fqdn(&dr.spec.host, ns);
            let score = if name == host.as_str() {
                usize::MAX
            } else if let Some(suffix) = name.strip_prefix('*') {
                if host.as_str().ends_with(suffix) {
                    suffix.len()
                } else {
                    continue;
                }
            } else {
                continue;
            };
            if best.is_none_or(|(s, _, _)| score > s) {
                best = Some((score, ns, &dr.spec));
            }
        }
        best.map(|(_, ns, spec)| (ns, spec))
    }

    /// The HTTP rules sidecars in `namespace` follow to `host`, and the namespace
    /// their short names are resolved in: the HTTPRoutes attached to its Service
    /// (the consumer routes of `namespace` if any, else the producer routes),
    /// else its VirtualService's `http` rules.
    pub fn http_rules(&self, host: &Hostname, namespace: Option<&str>) -> Option<(&str, &[HttpRoute])> {
        if let Some(g) = self.gamma.get(host.as_str()) {
            let consumer = namespace.and_then(|ns| g.consumers.get_key_value(ns));
            match consumer {
                Some((ns, rules)) => return Some((ns.as_str(), rules)),
                // Destinations are fully qualified: the namespace is never read.
                None if !g.producer.is_empty() => return Some(("", &g.producer)),
                None => {}
            }
        }
        // A VirtualService of only TCP/TLS routes leaves HTTP to the default route.
        self.virtual_service(host)
            .filter(|(_, vs)| !vs.http.is_empty())
            .map(|(ns, vs)| (ns, &vs.http[..]))
    }

    /// Whether any route depends on who asks (`sourceLabels`, `sourceNamespace`,
    /// a consumer HTTPRoute), so route configurations must be made per proxy rather than shared.
    pub fn depends_on_source(&self) -> bool {
        self.gamma.values().any(|g| !g.consumers.is_empty())
            || self.virtual_services.values().any(|vs| {
                vs.spec
                    .http
                    .iter()
                    .flat_map(|r| &r.r#match)
                    .any(|m| !m.source_labels.is_empty() || m.source_namespace.is_some())
            })
    }

    /// Whether a VirtualService's TCP or TLS route depends on who asks, so outbound
    /// listeners must be made per proxy.
    pub fn l4_depends_on_source(&self) -> bool {
        self.virtual_services.values().any(|vs| {
            vs.spec
                .tcp
                .iter()
                .chain(&vs.spec.tls)
                .flat_map(|r| &r.r#match)
                .any(|m| !m.source_labels.is_empty() || m.source_namespace.is_some())
        })
    }

    /// Whether some DestinationRule makes balancing locality-aware (outlier
    /// detection anywhere in it), so endpoints must be made per proxy locality.
    pub fn locality_aware(&self) -> bool {
        self.destination_rules.values().any(|dr| {
            let policies = dr
                .spec
                .traffic_policy
                .iter()
                .chain(dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
            policies.into_iter().any(|p| {
                p.outlier_detection.is_some() || p.port_level_settings.iter().any(|pl| pl.outlier_detection.is_some())
            })
        })
    }

    /// The subsets of the service ports `keys`, with the labels their endpoints carry.
    pub fn subsets<'a>(&self, keys: impl IntoIterator<Item = &'a ServiceKey>) -> Vec<SubsetLabels> {
        let mut out = Vec::new();
        for key in keys {
            let Some((_, dr)) = self.destination_rule(&key.host) else {
                continue;
            };
            for s in &dr.subsets {
                out.push((
                    SubsetKey {
                        service: key.clone(),
                        subset: s.name.clone(),
                    },
                    s.labels.clone(),
                ));
            }
        }
        out
    }
}
