//! What federation needs from one cluster, distilled from its Kubernetes objects:
//! the ready instances of every service port, with their network, locality,
//! service account and whether they speak the mesh's mTLS; the virtual IPs
//! (ClusterIPs) of every service port, where captured traffic to it is headed;
//! and the east-west gateways of the cluster. Istio's ServiceEntries and
//! WorkloadEntries add instances and VIPs of their own ([`entries`]).
//!
//! Pure: objects in, model out, so it is tested without any cluster.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use mesh_vocab::{ClusterId, Hostname, NetworkId};

use crate::networking::{DestinationRule, VirtualService};
use crate::objects::ClusterObjects;

mod entries;

/// Istio's label naming a pod's, namespace's or gateway Service's network.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Istio's label marking a pod whose proxy terminates mesh mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The east-west gateway port (AUTO_PASSTHROUGH).
pub const GATEWAY_PORT: u16 = 15443;
/// On a gateway Service: `"true"` says it is our own east-west gateway, which routes an
/// endpoint-pinned SNI (`mesh_vocab::sni::pin`) to exactly that endpoint, so the
/// endpoints behind it may be listed one by one (docs/l7-xds.md).
pub const ENDPOINT_PINNING_LABEL: &str = "networking.isthmus.io/endpoint-pinning";

/// The mesh-wide settings federation needs.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The cluster DNS domain, `cluster.local` by default.
    pub domain: String,
    /// Istio's meshNetworks fallback: the network of a cluster whose pods and
    /// namespaces say nothing.
    pub cluster_networks: BTreeMap<ClusterId, NetworkId>,
    /// Gateway addresses configured by hand, per network (besides gateway Services).
    pub gateways: BTreeMap<NetworkId, Vec<GatewayAddress>>,
    /// The trust domain of the workloads' SPIFFE IDs, `cluster.local` by default.
    pub trust_domain: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            domain: "cluster.local".into(),
            cluster_networks: BTreeMap::new(),
            gateways: BTreeMap::new(),
            trust_domain: "cluster.local".into(),
        }
    }
}

/// A service port, the unit of routing: `reviews.default.svc.cluster.local:9080`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub host: Hostname,
    pub port: u16,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Region / zone / subzone, as Kubernetes and Istio label nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// One ready endpoint of one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: ServiceKey,
    pub address: IpAddr,
    pub target_port: u16,
    pub network: NetworkId,
    pub locality: Locality,
    /// Its proxy terminates mesh mTLS, so it may be reached through a gateway.
    pub mtls: bool,
    pub labels: BTreeMap<String, String>,
    /// The pod's service account (`default` when it names none); None when the
    /// endpoint is not a known pod.
    pub service_account: Option<String>,
    /// Its load-balancing weight (a WorkloadEntry's or ServiceEntry endpoint's `weight`;
    /// 1 otherwise), at least 1. Behind a gateway, the gateway's weight is the sum.
    pub weight: u32,
}

/// An endpoint known by a DNS name: a ServiceEntry's of `resolution: DNS` (or
/// `DNS_ROUND_ROBIN`), an endpoint's `address` or, without endpoints, the entry's host
/// itself. It stands for one instance per address the name resolves to
/// ([`ClusterModel::with_names_resolved`]); [`crate::resolve`] does the resolving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedInstance {
    pub hostname: String,
    /// Everything but the address, which is unspecified until resolved.
    pub instance: Instance,
}

/// One virtual IP of one service port: a sidecar that captures a connection to
/// `vip:port` sends it to `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceVip {
    pub vip: IpAddr,
    pub port: u16,
    pub host: Hostname,
}

/// Where an east-west gateway can be reached from other networks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayAddress {
    Ip(IpAddr),
    /// A load balancer that only has a name; [`crate::resolve`] resolves it.
    Hostname(String),
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayAddress::Ip(ip) => write!(f, "{ip}"),
            GatewayAddress::Hostname(h) => f.write_str(h),
        }
    }
}

/// An east-west gateway of a network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gateway {
    pub network: NetworkId,
    pub address: GatewayAddress,
    pub port: u16,
    /// It routes endpoint-pinned SNIs ([`ENDPOINT_PINNING_LABEL`]).
    pub pins_endpoints: bool,
}

/// One cluster, distilled.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterModel {
    pub cluster: ClusterId,
    /// Sorted by service, address and target port.
    pub instances: Vec<Instance>,
    /// Endpoints to resolve by name before they are instances, sorted.
    pub named: Vec<NamedInstance>,
    /// The ClusterIPs of every TCP service port, sorted.
    pub vips: Vec<ServiceVip>,
    pub gateways: Vec<Gateway>,
    /// For each network whose gateway Services here run pods an Istio `Gateway` gives an
    /// `AUTO_PASSTHROUGH` server on the gateway port: the host patterns it exposes
    /// (`*.local`, `ns/host`). A network not listed exposes every mTLS service.
    pub exposure: BTreeMap<NetworkId, Vec<String>>,
    /// Security policies and workloads, for inbound listeners.
    pub security: crate::security::ClusterSecurity,
    /// What L7 routing needs from the cluster.
    pub traffic: Arc<Traffic>,
}

/// What a service port speaks, by Istio's rule: its `appProtocol` if set, else its
/// name's prefix before `-` (`http-web` is HTTP); anything else, unnamed included, is TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    /// HTTP/2 with prior knowledge (`http2`, `h2c`, `kubernetes.io/h2c`).
    Http2,
    Grpc,
    GrpcWeb,
    /// Everything not HTTP: carried as bytes.
    Tcp,
}

impl Protocol {
    /// The protocol of a port named `name` with `app_protocol`.
    pub fn of_port(name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
        let word = match app_protocol.filter(|a| !a.is_empty()) {
            Some(a) => a.to_ascii_lowercase(),
            None => name
                .unwrap_or_default()
                .split('-')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        };
        match word.as_str() {
            "http" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            _ => Protocol::Tcp,
        }
    }

    /// Whether the port is routed per request (an HTTP connection manager) rather than per connection.
    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }

    /// Whether its servers speak HTTP/2 only, so that proxies speak HTTP/2 to them
    /// whatever their callers spoke (Istio's `IsHTTP2`: HTTP/2 and gRPC, not gRPC-Web).
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

/// A cluster's L7 routing input: what each service port speaks, and the Istio
/// traffic config (VirtualServices, DestinationRules) it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub protocols: BTreeMap<ServiceKey, Protocol>,
    /// The TLS ports of ServiceEntry hosts without addresses: reached by the SNI the
    /// application sends, on the port's wildcard listener, as Istio's `0.0.0.0_PORT`.
    pub sni_only: std::collections::BTreeSet<ServiceKey>,
    /// The HTTP ports of ServiceEntry hosts without addresses: reached by the `Host` the
    /// application sends, on the port's wildcard listener (Istio's route `PORT`).
    pub host_only: std::collections::BTreeSet<ServiceKey>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    /// Gateway API HTTPRoutes; those with Service parents route like VirtualServices.
    pub http_routes: Vec<crate::networking::HttpRoute>,
    /// Gateway API ReferenceGrants, which let HTTPRoutes reach other namespaces' Services.
    pub reference_grants: Vec<crate::networking::ReferenceGrant>,
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// A pod's service account: the API server fills in `default`; manifests often leave it out.
fn service_account_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The hosts Istio `Gateway`s expose through a gateway Service's pods on `port`: those
/// of every `AUTO_PASSTHROUGH` server on that port of a Gateway whose selector the
/// Service's own selector (its pods' labels) satisfies. None when no Gateway says.
fn passthrough_hosts(
    gateways: &[crate::networking::Gateway],
    pod_labels: Option<&BTreeMap<String, String>>,
    port: u16,
) -> Option<Vec<String>> {
    let pod_labels = pod_labels?;
    let mut hosts = None::<Vec<String>>;
    for g in gateways {
        let selector = &g.spec.selector;
        if !entries::selects(selector, pod_labels) {
            continue;
        }
        let mut servers = g.passthrough_hosts(port).peekable();
        if servers.peek().is_some() {
            hosts.get_or_insert_default().extend(servers.map(str::to_owned));
        }
    }
    hosts
}

impl ClusterModel {
    /// Distils a cluster's objects.
    pub fn build(cluster: &ClusterId, objects: &ClusterObjects, mesh: &MeshConfig) -> ClusterModel {
        let key = |ns: &Option<String>, name: &Option<String>| {
            (
                ns.clone().unwrap_or_else(|| "default".into()),
                name.clone().unwrap_or_default(),
            )
        };
        let namespaces: HashMap<String, &Namespace> = objects
            .namespaces
            .iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect();
        let pods: HashMap<(String, String), &Pod> = objects
            .pods
            .iter()
            .map(|p| (key(&p.metadata.namespace, &p.metadata.name), p))
            .collect();
        let services: HashMap<(String, String), &Service> = objects
            .services
            .iter()
            .map(|s| (key(&s.metadata.namespace, &s.metadata.name), s))
            .collect();
        let nodes: HashMap<String, &Node> = objects
            .nodes
            .iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect();
        let cluster_network = mesh
            .cluster_networks
            .get(cluster)
            .cloned()
            .unwrap_or_else(|| NetworkId::new(""));

        // Network: the pod's label, else its namespace's, else the cluster's (Istio's order).
        let network_of = |ns: &str, pod: Option<&Pod>| -> NetworkId {
            pod.and_then(|p| labels_of(&p.metadata).get(NETWORK_LABEL).cloned())
                .or_else(|| {
                    namespaces
                        .get(ns)
                        .and_then(|n| labels_of(&n.metadata).get(NETWORK_LABEL).cloned())
                })
                .map(NetworkId::new)
                .unwrap_or_else(|| cluster_network.clone())
        };
        let locality_of = |node: Option<&str>| -> Locality {
            let Some(labels) = node.and_then(|n| nodes.get(n)).map(|n| labels_of(&n.metadata)) else {
                return Locality::default();
            };
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            Locality {
                region: get("topology.kubernetes.io/region"),
                zone: get("topology.kubernetes.io/zone"),
                subzone: get("topology.istio.io/subzone"),
            }
        };

        let mut instances = Vec::new();
        for slice in &objects.endpoint_slices {
            let ns = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let Some(svc_name) = labels_of(&slice.metadata).get("kubernetes.io/service-name").cloned() else {
                continue;
            };
            let Some(svc) = services.get(&(ns.clone(), svc_name.clone())) else {
                continue;
            };
            let Ok(host) = Hostname::parse(&format!("{svc_name}.{ns}.svc.{}", mesh.domain)) else {
                continue;
            };
            let svc_ports = svc.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
            for slice_port in slice.ports.clone().unwrap_or_default() {
                let Some(target) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                // A slice port answers the service port of the same name (both unnamed when single).
                let Some(sp) = svc_ports.iter().find(|p| p.name == slice_port.name) else {
                    continue;
                };
                // A TCP proxy cannot carry UDP or SCTP (as for the VIPs below).
                if sp.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                    continue;
                }
                let Ok(port) = u16::try_from(sp.port) else { continue };
                let service = ServiceKey {
                    host: host.clone(),
                    port,
                };
                for ep in &slice.endpoints {
                    if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    let pod = ep
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| pods.get(&(ns.clone(), r.name.clone().unwrap_or_default())).copied());
                    let node = ep
                        .node_name
                        .clone()
                        .or_else(|| pod.and_then(|p| p.spec.as_ref()?.node_name.clone()));
                    let labels = pod.map(|p| labels_of(&p.metadata)).unwrap_or_default();
                    for addr in &ep.addresses {
                        let Ok(address) = addr.parse::<IpAddr>() else { continue };
                        instances.push(Instance {
                            service: service.clone(),
                            address,
                            target_port: target,
                            network: network_of(&ns, pod),
                            locality: locality_of(node.as_deref()),
                            mtls: labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio"),
                            labels: labels.clone(),
                            service_account: pod.map(service_account_of),
                            weight: 1,
                        });
                    }
                }
            }
        }

        let (entry_instances, mut named) = entries::instances(
            objects,
            &entries::Context {
                domain: &mesh.domain,
                network_of: &network_of,
                locality_of: &locality_of,
            },
        );
        instances.extend(entry_instances);

        let mut vips = Vec::new();
        let mut protocols = BTreeMap::new();
        for svc in &objects.services {
            let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let name = svc.metadata.name.clone().unwrap_or_default();
            let Ok(host) = Hostname::parse(&format!("{name}.{ns}.svc.{}", mesh.domain)) else {
                continue;
            };
            let Some(spec) = &svc.spec else { continue };
            // `clusterIPs` (dual stack) holds `clusterIP` first; older objects have only the latter.
            let ips = match &spec.cluster_ips {
                Some(ips) if !ips.is_empty() => ips.clone(),
                _ => spec.cluster_ip.clone().into_iter().collect(),
            };
            // "None" (headless) and "" (not yet allocated, or ExternalName) are not addresses.
            let ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            for p in spec.ports.iter().flatten() {
                // A TCP proxy cannot carry UDP or SCTP.
                if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                    continue;
                }
                let Ok(port) = u16::try_from(p.port) else { continue };
                let key = ServiceKey {
                    host: host.clone(),
                    port,
                };
                protocols.insert(key, Protocol::of_port(p.name.as_deref(), p.app_protocol.as_deref()));
                for vip in &ips {
                    vips.push(ServiceVip {
                        vip: *vip,
                        port,
                        host: host.clone(),
                    });
                }
            }
        }
        let (mut sni_only, mut host_only) = Default::default();
        entries::vips_and_protocols(
            objects,
            &mesh.domain,
            &mut vips,
            &mut protocols,
            (&mut sni_only, &mut host_only),
        );
        vips.sort();
        vips.dedup();

        let mut gateways = Vec::new();
        let mut exposure: BTreeMap<NetworkId, Vec<String>> = BTreeMap::new();
        for svc in &objects.services {
            let Some(network) = labels_of(&svc.metadata).get(NETWORK_LABEL).cloned() else {
                continue;
            };
            let spec = svc.spec.clone().unwrap_or_default();
            let Some(port) = spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .find(|p| p.port == i32::from(GATEWAY_PORT))
            else {
                continue;
            };
            let port = u16::try_from(port.port).unwrap_or(GATEWAY_PORT);
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref()?.ingress.clone())
                .unwrap_or_default();
            let mut addrs: Vec<GatewayAddress> = ingress
                .into_iter()
                .filter_map(|i| match (i.ip, i.hostname) {
                    (Some(ip), _) => ip.parse().ok().map(GatewayAddress::Ip),
                    (None, Some(h)) => Some(GatewayAddress::Hostname(h)),
                    (None, None) => None,
                })
                .collect();
            addrs.extend(
                spec.external_ips
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|ip| ip.parse().ok())
                    .map(GatewayAddress::Ip),
            );
            let pins_endpoints = labels_of(&svc.metadata)
                .get(ENDPOINT_PINNING_LABEL)
                .is_some_and(|v| v == "true");
            if let Some(hosts) = passthrough_hosts(&objects.gateways, spec.selector.as_ref(), port) {
                exposure.entry(NetworkId::new(&network)).or_default().extend(hosts);
            }
            for address in addrs {
                gateways.push(Gateway {
                    network: NetworkId::new(&network),
                    address,
                    port,
                    pins_endpoints,
                });
            }
        }
        sort_instances(&mut instances);
        named.sort_by(|a, b| {
            (&a.instance.service, &a.hostname, a.instance.target_port).cmp(&(
                &b.instance.service,
                &b.hostname,
                b.instance.target_port,
            ))
        });
        gateways.sort();
        gateways.dedup();
        for hosts in exposure.values_mut() {
            hosts.sort();
            hosts.dedup();
        }
        let security = crate::security::ClusterSecurity::build(objects, &instances);
        ClusterModel {
            cluster: cluster.clone(),
            instances,
            named,
            vips,
            gateways,
            exposure,
            security,
            traffic: Arc::new(Traffic {
                protocols,
                sni_only,
                host_only,
                virtual_services: objects.virtual_services.clone(),
                destination_rules: objects.destination_rules.clone(),
                http_routes: objects.http_routes.clone(),
                reference_grants: objects.reference_grants.clone(),
            }),
        }
    }
}

/// Instances in the model's order: by service, address and target port.
fn sort_instances(instances: &mut [Instance]) {
    instances.sort_by(|a, b| (&a.service, a.address, a.target_port).cmp(&(&b.service, b.address, b.target_port)));
}

impl ClusterModel {
    /// The host names of the endpoints known by name, sorted and distinct.
    pub fn endpoint_hostnames(&self) -> impl Iterator<Item = &str> {
        let mut names: Vec<&str> = self.named.iter().map(|n| n.hostname.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter()
    }

    /// This model with every named instance replaced by one instance per address its
    /// name has in `resolved`, none while it has none. `named` is emptied, so doing it
    /// again adds nothing.
    pub fn with_names_resolved(&self, resolved: &BTreeMap<String, Vec<IpAddr>>) -> ClusterModel {
        let mut instances = self.instances.clone();
        for n in &self.named {
            for address in resolved.get(&n.hostname).into_iter().flatten() {
                instances.push(Instance {
                    address: *address,
                    ..n.instance.clone()
                });
            }
        }
        sort_instances(&mut instances);
        // Two names (or a name and an address) may give the same endpoint: once is enough.
        instances.dedup();
        ClusterModel {
            cluster: self.cluster.clone(),
            instances,
            named: Vec::new(),
            vips: self.vips.clone(),
            gateways: self.gateways.clone(),
            exposure: self.exposure.clone(),
            security: self.security.clone(),
            traffic: self.traffic.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {topology.istio.io/network: net-ns}}
---
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12, "fd00::12"]
  ports: [{name: http, port: 9080, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {clusterIP: 10.96.0.13, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {version: v1, security.istio.io/tlsMode: istio, topology.istio.io/network: net-pod}}
spec: {nodeName: n1, serviceAccountName: bookinfo-reviews, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {version: v2}}
spec: {containers: [{name: app}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-abc, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.241.0.5], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v1}}
  - {addresses: [10.241.0.6], targetRef: {kind: Pod, name: reviews-v2}}
  - {addresses: [10.241.0.7], conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: istio-eastwestgateway, namespace: istio-system, labels: {topology.istio.io/network: net-pod}}
spec: {type: LoadBalancer, ports: [{name: tls, port: 15443}], externalIPs: [100.64.0.1]}
status: {loadBalancer: {ingress: [{hostname: gw.example.com}]}}
"#;

    #[test]
    fn distils_instances_networks_localities_and_gateways() {
        let mut o = ClusterObjects::default();
        o.add_yaml(Path::new("c1.yaml"), CLUSTER).unwrap();
        let m = ClusterModel::build(&ClusterId::new("c1"), &o, &MeshConfig::default());
        assert_eq!(m.instances.len(), 2, "the unready endpoint is left out");
        let v1 = &m.instances[0];
        assert_eq!(v1.service.to_string(), "reviews.default.svc.cluster.local:9080");
        assert_eq!((v1.address.to_string(), v1.target_port), ("10.241.0.5".into(), 8080));
        assert_eq!(v1.network.as_str(), "net-pod", "the pod's label wins");
        assert_eq!((v1.locality.region.as_str(), v1.locality.zone.as_str()), ("eu", "eu-1"));
        assert!(v1.mtls);
        assert_eq!(v1.service_account.as_deref(), Some("bookinfo-reviews"));
        let v2 = &m.instances[1];
        assert_eq!(v2.network.as_str(), "net-ns", "then the namespace's");
        assert!(!v2.mtls);
        assert_eq!(v2.service_account.as_deref(), Some("default"), "Kubernetes' default");
        let vips: Vec<String> = m
            .vips
            .iter()
            .map(|v| format!("{}:{} {}", v.vip, v.port, v.host))
            .collect();
        assert_eq!(
            vips,
            [
                "10.96.0.12:9080 reviews.default.svc.cluster.local",
                "10.96.0.13:9080 ratings.default.svc.cluster.local",
                "fd00::12:9080 reviews.default.svc.cluster.local",
            ],
            "every ClusterIP of every TCP port; headless and UDP left out"
        );
        let gws: Vec<String> = m
            .gateways
            .iter()
            .map(|g| format!("{} {}:{}", g.network, g.address, g.port))
            .collect();
        assert_eq!(gws, ["net-pod 100.64.0.1:15443", "net-pod gw.example.com:15443"]);
        let protocols: Vec<String> = m.traffic.protocols.iter().map(|(k, p)| format!("{k} {p:?}")).collect();
        assert_eq!(
            protocols,
            [
                "db.default.svc.cluster.local:5432 Tcp",
                "istio-eastwestgateway.istio-system.svc.cluster.local:15443 Tcp",
                "ratings.default.svc.cluster.local:9080 Tcp",
                "reviews.default.svc.cluster.local:9080 Http",
            ],
            "the port name decides; unnamed is TCP"
        );
    }

    #[test]
    fn a_ports_protocol_is_its_app_protocol_else_its_name_prefix() {
        assert_eq!(Protocol::of_port(Some("http-web"), None), Protocol::Http);
        assert_eq!(Protocol::of_port(Some("grpc"), None), Protocol::Grpc);
        assert_eq!(
            Protocol::of_port(Some("tcp-db"), Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
        assert_eq!(
            Protocol::of_port(Some("http"), Some("tcp")),
            Protocol::Tcp,
            "appProtocol wins"
        );
        assert_eq!(Protocol::of_port(Some("grpc-web"), Some("grpc-web")), Protocol::GrpcWeb);
        assert_eq!(Protocol::of_port(Some("web"), None), Protocol::Tcp);
        assert_eq!(Protocol::of_port(None, None), Protocol::Tcp);
    }
}

#[cfg(test)]
mod exposure_tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn an_auto_passthrough_gateway_names_what_its_network_exposes() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: istio-eastwestgateway, namespace: istio-system, labels: {topology.istio.io/network: net1}}
spec: {selector: {istio: eastwestgateway, app: gw}, ports: [{name: tls, port: 15443}], externalIPs: [100.64.0.1]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: cross-network-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
    - {port: {number: 15443, name: tls, protocol: TLS}, tls: {mode: AUTO_PASSTHROUGH}, hosts: ["*.svc.cluster.local"]}
    - {port: {number: 15012, name: tls-istiod, protocol: TLS}, tls: {mode: PASSTHROUGH}, hosts: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: other-pods, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 15443, name: tls, protocol: TLS}, tls: {mode: AUTO_PASSTHROUGH}, hosts: ["*"]}]
"#;
        let mut o = ClusterObjects::default();
        o.add_yaml(Path::new("c1/gw.yaml"), yaml).unwrap();
        assert!(o.refused.is_empty(), "{:?}", o.refused);
        let m = ClusterModel::build(&ClusterId::new("c1"), &o, &MeshConfig::default());
        assert_eq!(
            m.exposure.get(&NetworkId::new("net1")).map(Vec::as_slice),
            Some(&["*.svc.cluster.local".to_owned()][..]),
            "only the AUTO_PASSTHROUGH server on the gateway port, of the Gateway selecting its pods"
        );
        let net1 = NetworkId::new("net1");
        let exposes = |m: &ClusterModel, net: &NetworkId, host: &str| {
            crate::networking::gateway::exposes(m.exposure.get(net).map(Vec::as_slice), host, "default")
        };
        assert!(exposes(&m, &net1, "reviews.default.svc.cluster.local"));
        assert!(!exposes(&m, &net1, "payments.example.com"));
        assert!(
            exposes(&m, &NetworkId::new("net2"), "payments.example.com"),
            "no Gateway says for net2"
        );

        // Without the Gateway, the network exposes everything (our lab's default).
        o.gateways.clear();
        let m = ClusterModel::build(&ClusterId::new("c1"), &o, &MeshConfig::default());
        assert!(m.exposure.is_empty());
        assert!(exposes(&m, &net1, "payments.example.com"));
    }
}
