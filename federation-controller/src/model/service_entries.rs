//! The hosts of a cluster's ServiceEntries as service ports, like a Service's: each
//! host × port is a [`ServiceKey`] speaking the port's `protocol`, reached at the
//! entry's `addresses` (its VIPs), with the entry's `endpoints` — or, with a
//! `workloadSelector`, the WorkloadEntries of its namespace whose labels it selects —
//! as instances, as istiod makes them EDS endpoints.
//!
//! - Resolution `STATIC`, and `DNS`/`DNS_ROUND_ROBIN` with endpoints: endpoints whose
//!   address is an IP. An endpoint named by DNS (Istio's `STRICT_DNS` cluster), a `DNS`
//!   entry without endpoints and resolution `NONE` have no instances here.
//! - An endpoint's port is its `ports[PORT_NAME]`, else the port's `targetPort`, else its
//!   number; its network its own, else its namespace's; mTLS when its labels say
//!   `security.istio.io/tlsMode: istio`; `weight` is not read.
//! - ServiceEntries this controller wrote back itself (label
//!   `app.kubernetes.io/managed-by: isthmus`) are not read: they stand for what
//!   federation already serves. Pure.

use std::net::IpAddr;

use mesh_vocab::{Hostname, NetworkId};

use super::{Instance, Locality, Protocol, ServiceKey, ServiceVip, TLS_MODE_LABEL};
use crate::networking::service_entry::{Resolution, WorkloadEntry};
use crate::networking::{self, ServiceEntry, WorkloadEntryObject};
use crate::writeback::{ISTHMUS, MANAGED_BY};

/// What a cluster's ServiceEntries add to its model.
#[derive(Debug, Default)]
pub(super) struct Entries {
    pub instances: Vec<Instance>,
    pub vips: Vec<ServiceVip>,
    pub protocols: Vec<(ServiceKey, Protocol)>,
}

/// Reads `entries` (and the `workloads` they select); `network_of(ns)` is a
/// namespace's network.
pub(super) fn read(
    entries: &[ServiceEntry],
    workloads: &[WorkloadEntryObject],
    domain: &str,
    network_of: impl Fn(&str) -> NetworkId,
) -> Entries {
    let mut out = Entries::default();
    for se in entries {
        let labels = se.metadata.labels.clone().unwrap_or_default();
        if labels.get(MANAGED_BY).map(String::as_str) == Some(ISTHMUS) {
            continue;
        }
        let ns = networking::namespace_of(&se.metadata);
        let spec = &se.spec;
        let endpoints: Vec<&WorkloadEntry> =
            match (spec.resolution.unwrap_or(Resolution::None), &spec.workload_selector) {
                (Resolution::None, _) => Vec::new(),
                (_, Some(selector)) => workloads
                    .iter()
                    .filter(|w| networking::namespace_of(&w.metadata) == ns)
                    .filter(|w| {
                        let own = w.metadata.labels.clone().unwrap_or_default();
                        // A WorkloadEntry's labels are its spec's and its metadata's.
                        selector
                            .labels
                            .iter()
                            .all(|(k, v)| w.spec.labels.get(k).or_else(|| own.get(k)) == Some(v))
                    })
                    .map(|w| &w.spec)
                    .collect(),
                (_, None) => spec.endpoints.iter().flatten().collect(),
            };
        let vips: Vec<IpAddr> = spec.addresses.iter().filter_map(|a| a.parse().ok()).collect();
        for host in spec.hosts.iter().filter(|h| !h.contains('*')) {
            let Ok(host) = Hostname::parse(&networking::fqdn(host, ns, domain)) else {
                continue;
            };
            for p in &spec.ports {
                let Ok(port) = u16::try_from(p.number) else { continue };
                let service = ServiceKey {
                    host: host.clone(),
                    port,
                };
                out.protocols
                    .push((service.clone(), Protocol::of_port(None, p.protocol.as_deref())));
                out.vips.extend(vips.iter().map(|vip| ServiceVip {
                    vip: *vip,
                    port,
                    host: host.clone(),
                }));
                for e in &endpoints {
                    let Some(address) = e.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()) else {
                        continue;
                    };
                    let target = e.ports.get(&p.name).copied().or(p.target_port).unwrap_or(p.number);
                    let Ok(target_port) = u16::try_from(target) else {
                        continue;
                    };
                    let mtls = e.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio");
                    out.instances.push(Instance {
                        service: service.clone(),
                        address,
                        target_port,
                        network: e.network.clone().map(NetworkId::new).unwrap_or_else(|| network_of(ns)),
                        locality: locality(e.locality.as_deref()),
                        mtls,
                        labels: e.labels.clone(),
                        service_account: mtls.then(|| e.service_account.clone().unwrap_or_else(|| "default".into())),
                    });
                }
            }
        }
    }
    out
}

/// Istio's `region/zone/subzone`.
fn locality(text: Option<&str>) -> Locality {
    let mut parts = text.unwrap_or_default().splitn(3, '/').map(str::to_owned);
    Locality {
        region: parts.next().unwrap_or_default(),
        zone: parts.next().unwrap_or_default(),
        subzone: parts.next().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ClusterObjects;

    #[test]
    fn static_endpoints_and_selected_workload_entries_are_the_hosts_instances() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: web}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.1]
  ports: [{number: 443, name: https, protocol: TLS}, {number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, ports: {https: 8443}, locality: eu/eu-1, labels: {version: v1}}
  - {address: api-2.example.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: web}
spec:
  hosts: [vm]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: web}
spec: {address: 10.2.0.1, labels: {app: vm, security.istio.io/tlsMode: istio}, serviceAccount: vm, network: net-vm}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: web}
spec: {address: 10.2.0.2, labels: {app: other}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: written-back, namespace: web, labels: {app.kubernetes.io/managed-by: isthmus}}
spec: {hosts: [ours.example.com], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 10.3.0.1}]}
"#;
        let mut o = ClusterObjects::default();
        o.add_yaml(std::path::Path::new("c1/se.yaml"), yaml).unwrap();
        assert!(o.refused.is_empty(), "{:?}", o.refused);
        let e = read(&o.service_entries, &o.workload_entries, "cluster.local", |_| {
            NetworkId::new("net1")
        });
        let got: Vec<String> = e
            .instances
            .iter()
            .map(|i| {
                format!(
                    "{} {}:{} {} {} {:?}",
                    i.service, i.address, i.target_port, i.network, i.locality.zone, i.service_account
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "api.example.com:443 10.1.0.1:8443 net1 eu-1 None",
                "api.example.com:80 10.1.0.1:8080 net1 eu-1 None",
                "vm.web.svc.cluster.local:9080 10.2.0.1:9080 net-vm  Some(\"vm\")",
            ],
            "the DNS-named endpoint, the unselected WorkloadEntry and our own entry are left out"
        );
        assert!(e.instances[2].mtls);
        let vips: Vec<String> = e
            .vips
            .iter()
            .map(|v| format!("{}:{} {}", v.vip, v.port, v.host))
            .collect();
        assert_eq!(vips, ["240.0.0.1:443 api.example.com", "240.0.0.1:80 api.example.com"]);
        let protocols: Vec<(String, Protocol)> = e.protocols.iter().map(|(k, p)| (k.to_string(), *p)).collect();
        assert_eq!(protocols[0], ("api.example.com:443".to_owned(), Protocol::Tcp));
        assert_eq!(protocols[1], ("api.example.com:80".to_owned(), Protocol::Http));
    }
}
