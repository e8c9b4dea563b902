//! Endpoints that no EndpointSlice lists, as istiod finds them: WorkloadEntries
//! selected by a Kubernetes Service's selector, and a ServiceEntry's hosts with its
//! `endpoints` or the workloads (pods and WorkloadEntries) its `workloadSelector` picks.
//! Also the entries' virtual IPs and port protocols.
//!
//! With `resolution: DNS` or `DNS_ROUND_ROBIN` an endpoint may be a DNS name, and an entry
//! without endpoints stands for its hosts themselves: these are [`NamedInstance`]s, which
//! the controller resolves ([`crate::resolve`]) where Istio has each Envoy resolve them
//! (`STRICT_DNS`/`LOGICAL_DNS` clusters), so that every proxy, ours, Envoy or proxyless
//! gRPC, gets the same addresses over EDS.
//!
//! Left out, and said where it matters: the ServiceEntries this controller writes back
//! (another cluster's services, federated already), Unix sockets, names under STATIC
//! resolution (nothing resolves them there), and wildcard hosts (nothing to resolve).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_vocab::{Hostname, NetworkId};

use super::{
    Instance, Locality, NamedInstance, Protocol, ServiceKey, ServiceVip, TLS_MODE_LABEL, labels_of, service_account_of,
};
use crate::networking::service_entry::{Location, Resolution, ServiceEntry, ServicePort};
use crate::networking::workload_entry::{Address, WorkloadEntry, WorkloadEntrySpec};
use crate::networking::{fqdn, namespace_of};
use crate::objects::ClusterObjects;

/// What the entries need from the rest of the cluster's distillation.
pub(super) struct Context<'a> {
    pub domain: &'a str,
    /// The network of a workload in a namespace that names none itself (namespace label, else the cluster's).
    pub network_of: &'a dyn Fn(&str, Option<&Pod>) -> NetworkId,
    /// The locality of a node.
    pub locality_of: &'a dyn Fn(Option<&str>) -> Locality,
}

/// What the entries add.
#[derive(Default)]
struct Found {
    instances: Vec<Instance>,
    named: Vec<NamedInstance>,
}

/// Every instance the entries add, and every endpoint they name by DNS name.
pub(super) fn instances(objects: &ClusterObjects, cx: &Context<'_>) -> (Vec<Instance>, Vec<NamedInstance>) {
    let mut out = Found::default();
    for svc in &objects.services {
        selected_by_service(svc, &objects.workload_entries, cx, &mut out);
    }
    for se in objects.service_entries.iter().filter(|se| !written_back(se)) {
        service_entry(se, objects, cx, &mut out);
    }
    (out.instances, out.named)
}

/// A ServiceEntry this controller wrote into the cluster (`managed-by: isthmus`): it
/// stands for another cluster's service, whose endpoints federation already has.
fn written_back(se: &ServiceEntry) -> bool {
    se.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::writeback::MANAGED_BY))
        .is_some_and(|v| v == crate::writeback::ISTHMUS)
}

/// Whether `labels` hold every pair of `selector` (an empty selector selects nothing,
/// as for a Service: a Service without a selector has its endpoints made by hand).
pub(super) fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// WorkloadEntries of the Service's namespace that its selector matches, on each of its TCP ports.
fn selected_by_service(svc: &Service, entries: &[WorkloadEntry], cx: &Context<'_>, out: &mut Found) {
    let ns = namespace_of(&svc.metadata);
    let Some(spec) = &svc.spec else { return };
    let selector = spec.selector.clone().unwrap_or_default();
    // The Service's host exactly as the cluster's model names it (a name with a dot is
    // no FQDN here: Services are always NAME.NAMESPACE.svc.DOMAIN).
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let Ok(host) = Hostname::parse(&format!("{name}.{ns}.svc.{}", cx.domain)) else {
        return;
    };
    for we in entries.iter().filter(|we| namespace_of(&we.metadata) == ns) {
        if !selects(&selector, &we.spec.labels) {
            continue;
        }
        for sp in spec.ports.iter().flatten() {
            if sp.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(port) = u16::try_from(sp.port) else { continue };
            // Istio: a named target port is looked up in the entry's ports; a number is
            // taken as is; either way the service port when nothing else says.
            let target = match &sp.target_port {
                Some(IntOrString::String(name)) => we.spec.port(name),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                None => None,
            }
            .unwrap_or(port);
            let key = ServiceKey {
                host: host.clone(),
                port,
            };
            // Only an address a proxy can dial is an endpoint here.
            if let Address::Ip(address) = we.spec.address() {
                let mtls = we.spec.speaks_mtls();
                out.instances
                    .push(workload(key, address, &we.spec, target, ns, cx, mtls));
            }
        }
    }
}

/// A ServiceEntry's instances: its endpoints, the workloads it selects, or (DNS
/// resolution without either) its hosts.
fn service_entry(se: &ServiceEntry, objects: &ClusterObjects, cx: &Context<'_>, out: &mut Found) {
    let ns = namespace_of(&se.metadata);
    let spec = &se.spec;
    let external = spec.location == Some(Location::MeshExternal);
    let by_dns = matches!(spec.resolution, Some(Resolution::Dns | Resolution::DnsRoundRobin));
    for key_port in keys(se, cx.domain) {
        let (key, port) = key_port;
        match (&spec.endpoints, &spec.workload_selector) {
            // Addresses are taken as they are, names only where DNS resolution says to.
            (Some(endpoints), _) if by_dns || spec.resolution == Some(Resolution::Static) => {
                for ep in endpoints {
                    let target = ep.port(&port.name).unwrap_or_else(|| default_target(port));
                    // Mesh-external endpoints never get mesh mTLS (Istio's MESH_EXTERNAL).
                    let mtls = !external && ep.speaks_mtls();
                    match ep.address() {
                        Address::Ip(address) => {
                            let i = workload(key.clone(), address, ep, target, ns, cx, mtls);
                            out.instances.push(i);
                        }
                        Address::Name(hostname) if by_dns => {
                            let instance = workload(key.clone(), UNRESOLVED, ep, target, ns, cx, mtls);
                            out.named.push(NamedInstance { hostname, instance });
                        }
                        _ => {}
                    }
                }
            }
            // Istio: "the host field will be used as the DNS name of the endpoint".
            (None, None) if by_dns && !key.host.as_str().starts_with('*') => {
                out.named.push(NamedInstance {
                    hostname: key.host.to_string(),
                    instance: Instance {
                        service: key.clone(),
                        address: UNRESOLVED,
                        target_port: default_target(port),
                        network: (cx.network_of)(ns, None),
                        locality: Locality::default(),
                        mtls: false,
                        labels: BTreeMap::new(),
                        service_account: None,
                        weight: 1,
                    },
                });
            }
            (None, Some(selector)) => {
                for we in objects
                    .workload_entries
                    .iter()
                    .filter(|w| namespace_of(&w.metadata) == ns)
                {
                    if let (true, Address::Ip(address)) =
                        (selects(&selector.labels, &we.spec.labels), we.spec.address())
                    {
                        let target = we.spec.port(&port.name).unwrap_or_else(|| default_target(port));
                        let mtls = we.spec.speaks_mtls();
                        out.instances
                            .push(workload(key.clone(), address, &we.spec, target, ns, cx, mtls));
                    }
                }
                for pod in objects.pods.iter().filter(|p| namespace_of(&p.metadata) == ns) {
                    let labels = labels_of(&pod.metadata);
                    let ip = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_deref()?.parse::<IpAddr>().ok());
                    let (true, Some(address)) = (selects(&selector.labels, &labels), ip) else {
                        continue;
                    };
                    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                    out.instances.push(Instance {
                        service: key.clone(),
                        address,
                        target_port: default_target(port),
                        network: (cx.network_of)(ns, Some(pod)),
                        locality: (cx.locality_of)(node),
                        mtls: labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio"),
                        service_account: Some(service_account_of(pod)),
                        labels,
                        weight: 1,
                    });
                }
            }
            _ => {}
        }
    }
}

/// Every (host, port) of an entry, with the port it came from; wildcard hosts have no instances.
fn keys<'a>(se: &'a ServiceEntry, domain: &str) -> Vec<(ServiceKey, &'a ServicePort)> {
    let ns = namespace_of(&se.metadata);
    let mut out = Vec::new();
    for h in &se.spec.hosts {
        let Ok(host) = Hostname::parse(&fqdn(h, ns, domain)) else {
            continue;
        };
        for p in &se.spec.ports {
            if let Ok(port) = u16::try_from(p.number) {
                out.push((
                    ServiceKey {
                        host: host.clone(),
                        port,
                    },
                    p,
                ));
            }
        }
    }
    out
}

fn default_target(port: &ServicePort) -> u16 {
    port.target_port
        .and_then(|t| u16::try_from(t).ok())
        .unwrap_or(port.number as u16)
}

/// The address of a named instance until it is resolved.
const UNRESOLVED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// The instance of a workload entry (or a ServiceEntry's endpoint) at `address`.
fn workload(
    service: ServiceKey,
    address: IpAddr,
    we: &WorkloadEntrySpec,
    target_port: u16,
    ns: &str,
    cx: &Context<'_>,
    mtls: bool,
) -> Instance {
    let network = match we.network.as_deref() {
        Some(n) if !n.is_empty() => NetworkId::new(n),
        _ => (cx.network_of)(ns, None),
    };
    Instance {
        service,
        address,
        target_port,
        network,
        locality: locality(we.locality.as_deref()),
        mtls,
        labels: we.labels.clone(),
        service_account: Some(
            we.service_account
                .clone()
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".into()),
        ),
        // Unset or 0 is Envoy's default, 1.
        weight: we.weight.filter(|w| *w > 0).unwrap_or(1),
    }
}

/// `region/zone/subzone`, any part may be missing.
fn locality(s: Option<&str>) -> Locality {
    let mut parts = s.unwrap_or_default().split('/').map(str::to_owned);
    Locality {
        region: parts.next().unwrap_or_default(),
        zone: parts.next().unwrap_or_default(),
        subzone: parts.next().unwrap_or_default(),
    }
}

/// The entries' virtual IPs (plain addresses; CIDRs match no single VIP) and their
/// ports' protocols, by Istio's rule on the port's `protocol` and name; and the TLS and
/// HTTP ports of entries without addresses that have endpoints, which are found by SNI
/// and by `Host`.
pub(super) fn vips_and_protocols(
    objects: &ClusterObjects,
    domain: &str,
    vips: &mut Vec<ServiceVip>,
    protocols: &mut BTreeMap<ServiceKey, Protocol>,
    (sni_only, host_only): (&mut BTreeSet<ServiceKey>, &mut BTreeSet<ServiceKey>),
) {
    for se in objects.service_entries.iter().filter(|se| !written_back(se)) {
        let ips: Vec<IpAddr> = se.spec.addresses.iter().filter_map(|a| a.parse().ok()).collect();
        // Resolution NONE has no endpoints to send an SNI to: left to pass through.
        let has_endpoints = !matches!(se.spec.resolution, None | Some(Resolution::None));
        for (key, port) in keys(se, domain) {
            let protocol = Protocol::of_port(Some(&port.name), port.protocol.as_deref());
            protocols.entry(key.clone()).or_insert(protocol);
            let tls = port
                .protocol
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case("TLS") || p.eq_ignore_ascii_case("HTTPS"));
            if se.spec.addresses.is_empty() && has_endpoints && tls {
                sni_only.insert(key.clone());
            }
            if se.spec.addresses.is_empty() && has_endpoints && protocol.is_http() {
                host_only.insert(key.clone());
            }
            for vip in &ips {
                vips.push(ServiceVip {
                    vip: *vip,
                    port: key.port,
                    host: key.host.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mesh_vocab::ClusterId;

    use super::super::{ClusterModel, MeshConfig};
    use crate::objects::ClusterObjects;

    const ENTRIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: vms, labels: {topology.istio.io/network: net-vm}}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: vms}
spec:
  selector: {app: ratings}
  ports:
    - {name: http, port: 9080, targetPort: web}
    - {name: tcp-admin, port: 9901, targetPort: 9000}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm1, namespace: vms}
spec: {address: 10.9.0.1, labels: {app: ratings, version: v3}, ports: {web: 8080}, serviceAccount: ratings, locality: eu/eu-1/rack2, weight: 3}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm2, namespace: vms}
spec: {address: 10.9.0.2, labels: {app: ratings}, network: net-other, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-ns, namespace: default}
spec: {address: 10.9.0.3, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: vms}
spec:
  hosts: [payments.example.com]
  addresses: [240.0.0.10, 240.0.1.0/24]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{name: https, number: 443, protocol: TLS}, {name: http, number: 80, protocol: HTTP, targetPort: 8080}]
  endpoints:
    - {address: 192.0.2.7, ports: {https: 8443}, serviceAccount: pay, weight: 2}
    - {address: pay.example.net}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: written-back, namespace: vms, labels: {app.kubernetes.io/managed-by: isthmus}}
spec: {hosts: [ours.example.com], addresses: [240.0.0.99], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 10.3.0.1}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: vms}
spec: {hosts: [db.example.com], ports: [{number: 5432, name: tcp}], resolution: DNS, endpoints: [{address: 192.0.2.50}, {address: db1.example.com, weight: 4, locality: eu/eu-2}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: googleapis, namespace: vms}
spec: {hosts: [www.googleapis.com], location: MESH_EXTERNAL, resolution: DNS, ports: [{number: 443, name: https, protocol: TLS}, {number: 80, name: http, protocol: HTTP, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: round-robin, namespace: vms}
spec: {hosts: [rr.example.com], resolution: DNS_ROUND_ROBIN, ports: [{number: 8000, name: http}], endpoints: [{address: lb.example.net, ports: {http: 9000}}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: vms}
spec:
  hosts: [legacy.vms.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{name: http, number: 9080, protocol: HTTP}]
  workloadSelector: {labels: {version: v3}}
"#;

    fn model() -> ClusterModel {
        let mut o = ClusterObjects::default();
        o.add_yaml(Path::new("c1/entries.yaml"), ENTRIES).unwrap();
        assert!(o.refused.is_empty(), "{:?}", o.refused);
        ClusterModel::build(&ClusterId::new("c1"), &o, &MeshConfig::default())
    }

    fn rows(m: &ClusterModel) -> Vec<String> {
        m.instances
            .iter()
            .map(|i| {
                format!(
                    "{} {}:{} {} w{} mtls={} sa={} {}/{}/{}",
                    i.service,
                    i.address,
                    i.target_port,
                    i.network,
                    i.weight,
                    i.mtls,
                    i.service_account.as_deref().unwrap_or("-"),
                    i.locality.region,
                    i.locality.zone,
                    i.locality.subzone
                )
            })
            .collect()
    }

    #[test]
    fn workload_entries_are_endpoints_of_the_services_that_select_them_and_of_selecting_entries() {
        let m = model();
        assert_eq!(
            rows(&m),
            [
                "db.example.com:5432 192.0.2.50:5432 net-vm w1 mtls=false sa=default //",
                "legacy.vms.svc.cluster.local:9080 10.9.0.1:9080 net-vm w3 mtls=true sa=ratings eu/eu-1/rack2",
                "payments.example.com:80 192.0.2.7:8080 net-vm w2 mtls=false sa=pay //",
                "payments.example.com:443 192.0.2.7:8443 net-vm w2 mtls=false sa=pay //",
                "ratings.vms.svc.cluster.local:9080 10.9.0.1:8080 net-vm w3 mtls=true sa=ratings eu/eu-1/rack2",
                "ratings.vms.svc.cluster.local:9080 10.9.0.2:9080 net-other w1 mtls=false sa=default //",
                "ratings.vms.svc.cluster.local:9901 10.9.0.1:9000 net-vm w3 mtls=true sa=ratings eu/eu-1/rack2",
                "ratings.vms.svc.cluster.local:9901 10.9.0.2:9000 net-other w1 mtls=false sa=default //",
            ],
            "named target ports through the entry's ports (else the service port); the entry's \
             network, else its namespace's; its weight (0 or none is 1); MESH_EXTERNAL never mTLS; \
             a name address, another namespace's entry and our own written-back entry left out"
        );
    }

    fn named_rows(m: &ClusterModel) -> Vec<String> {
        m.named
            .iter()
            .map(|n| {
                let i = &n.instance;
                format!(
                    "{} {}:{} {} w{} mtls={}",
                    i.service, n.hostname, i.target_port, i.network, i.weight, i.mtls
                )
            })
            .collect()
    }

    #[test]
    fn dns_entries_name_their_endpoints_or_else_their_hosts_for_resolving() {
        let m = model();
        assert_eq!(
            named_rows(&m),
            [
                "db.example.com:5432 db1.example.com:5432 net-vm w4 mtls=false",
                "rr.example.com:8000 lb.example.net:9000 net-vm w1 mtls=false",
                "www.googleapis.com:80 www.googleapis.com:8080 net-vm w1 mtls=false",
                "www.googleapis.com:443 www.googleapis.com:443 net-vm w1 mtls=false",
            ],
            "an endpoint's name with its port and weight; without endpoints the host itself at \
             the target port; a name under STATIC resolution is none"
        );
        assert_eq!(
            m.endpoint_hostnames().collect::<Vec<_>>(),
            ["db1.example.com", "lb.example.net", "www.googleapis.com"]
        );
    }

    #[test]
    fn named_endpoints_become_one_instance_per_address_resolved() {
        let m = model();
        let resolved = [
            ("db1.example.com", vec![[192, 0, 2, 50], [192, 0, 2, 51]]),
            ("www.googleapis.com", vec![[203, 0, 113, 5]]),
        ]
        .into_iter()
        .map(|(h, ips)| (h.to_owned(), ips.into_iter().map(std::net::IpAddr::from).collect()))
        .collect();
        let r = m.with_names_resolved(&resolved);
        assert!(r.named.is_empty());
        let db: Vec<String> = rows(&r).into_iter().filter(|l| l.starts_with("db.")).collect();
        assert_eq!(
            db,
            [
                "db.example.com:5432 192.0.2.50:5432 net-vm w1 mtls=false sa=default //",
                "db.example.com:5432 192.0.2.50:5432 net-vm w4 mtls=false sa=default eu/eu-2/",
                "db.example.com:5432 192.0.2.51:5432 net-vm w4 mtls=false sa=default eu/eu-2/",
            ],
            "every address takes the named endpoint's weight and locality"
        );
        let google: Vec<String> = rows(&r).into_iter().filter(|l| l.starts_with("www.")).collect();
        assert_eq!(
            google,
            [
                "www.googleapis.com:80 203.0.113.5:8080 net-vm w1 mtls=false sa=- //",
                "www.googleapis.com:443 203.0.113.5:443 net-vm w1 mtls=false sa=- //",
            ]
        );
        assert!(
            !rows(&r).iter().any(|l| l.starts_with("rr.")),
            "a name not resolved yet is no endpoint"
        );
        assert_eq!(r.with_names_resolved(&resolved), r, "once is enough");
        assert_eq!(m.with_names_resolved(&Default::default()).instances, m.instances);
    }

    /// Found by the `manifests` fuzz target: a Service whose name holds a dot got
    /// instances under another host than the one the model lists its ports under.
    #[test]
    fn a_selected_entry_is_filed_under_the_services_own_host() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: odd.name, namespace: vms}\n\
                    spec: {selector: {app: x}, ports: [{port: 80}]}\n---\n\
                    apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: vms}\n\
                    spec: {address: 10.9.0.1, labels: {app: x}}\n";
        let mut o = ClusterObjects::default();
        o.add_yaml(Path::new("c1/odd.yaml"), yaml).unwrap();
        let m = ClusterModel::build(&ClusterId::new("c1"), &o, &MeshConfig::default());
        assert_eq!(m.instances.len(), 1);
        assert_eq!(m.instances[0].service.to_string(), "odd.name.vms.svc.cluster.local:80");
        assert!(m.traffic.protocols.contains_key(&m.instances[0].service));
    }

    #[test]
    fn a_service_entrys_addresses_are_vips_and_its_port_protocols_count() {
        let m = model();
        let vips: Vec<String> = m
            .vips
            .iter()
            .map(|v| format!("{}:{} {}", v.vip, v.port, v.host))
            .collect();
        assert_eq!(
            vips,
            [
                "240.0.0.10:80 payments.example.com",
                "240.0.0.10:443 payments.example.com"
            ],
            "a CIDR is no single VIP"
        );
        let p = |k: &str| {
            m.traffic
                .protocols
                .iter()
                .find(|(key, _)| key.to_string() == k)
                .map(|(_, p)| format!("{p:?}"))
        };
        assert_eq!(p("payments.example.com:80").as_deref(), Some("Http"));
        assert_eq!(p("payments.example.com:443").as_deref(), Some("Tcp"));
        assert_eq!(p("legacy.vms.svc.cluster.local:9080").as_deref(), Some("Http"));
        let sni: Vec<String> = m.traffic.sni_only.iter().map(ToString::to_string).collect();
        assert_eq!(
            sni,
            ["www.googleapis.com:443"],
            "a TLS port without addresses; not its HTTP port, nor an entry with addresses"
        );
        let by_host: Vec<String> = m.traffic.host_only.iter().map(ToString::to_string).collect();
        assert_eq!(
            by_host,
            [
                "legacy.vms.svc.cluster.local:9080",
                "rr.example.com:8000",
                "www.googleapis.com:80"
            ],
            "HTTP ports of entries without addresses, by selector, endpoints or DNS"
        );
    }
}
