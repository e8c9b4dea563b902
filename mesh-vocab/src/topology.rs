//! A topology: the clusters of a mesh, their networks, control planes, east-west gateways,
//! trust domains and localities, and the demo workloads they run. One YAML file per
//! topology (`topologies/*.yaml`); the lab builds exactly what it says and the end-to-end
//! tests use the same files.
//!
//! Address plan (`design.md`): cluster k's pods live in `10.24k.0.0/16`. Inside a cluster's
//! pod CIDR the first /24 holds the cluster's infrastructure (its node, controller and
//! east-west gateway), pods take addresses from the second /24 on, and the service VIPs
//! (ClusterIPs) come from `serviceCidr`, a block inside the pod CIDR outside those two /24s
//! (`10.24k.255.0/24` in our files). VIPs are never routed: only a proxy that captured a
//! connection to one knows what it means. East-west gateways meet on the transit network
//! [`TRANSIT_CIDR`], which no pod CIDR may overlap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use crate::manifest::{self, ManifestError};
use crate::{ClusterId, NetworkId, SpiffeId};

/// The transit network between east-west gateways, `100.64.0.0/24`.
pub const TRANSIT_CIDR: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(100, 64, 0, 0),
    len: 24,
};

/// The most clusters a topology may have: the address plan numbers them 1 to 9.
pub const MAX_CLUSTERS: usize = 9;

/// An IPv4 block such as `10.241.0.0/16`, its host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    len: u8,
}

/// Why a string is not an IPv4 CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("expected an IPv4 block such as 10.241.0.0/16")]
    Syntax,
    #[error("prefix length must be 0 to 32")]
    Length,
    #[error("host bits are set: the block starting at {0} was probably meant")]
    HostBits(Ipv4Cidr),
}

impl Ipv4Cidr {
    /// The block of `len` bits at `addr`, refusing set host bits.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, CidrError> {
        if len > 32 {
            return Err(CidrError::Length);
        }
        let cidr = Ipv4Cidr { addr, len };
        let network = Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & cidr.mask()),
            len,
        };
        if network != cidr {
            return Err(CidrError::HostBits(network));
        }
        Ok(cidr)
    }

    /// The first address (the network address).
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// How many addresses the block spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// The address `offset` places after the network address, if inside the block.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        (offset < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + offset as u32))
    }

    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// Whether `other` lies wholly inside this block.
    pub fn covers(&self, other: &Ipv4Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, len) = s.split_once('/').ok_or(CidrError::Syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| CidrError::Syntax)?;
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Syntax);
        }
        Ipv4Cidr::new(addr, len.parse().map_err(|_| CidrError::Syntax)?)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A whole topology, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    /// The topology's name, e.g. `multi-primary-gateways`.
    pub name: String,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// The clusters, in address-plan order.
    pub clusters: Vec<ClusterSpec>,
    /// The demo workloads and where they run.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
}

/// One cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// Its cluster ID (`CLUSTER_ID`).
    pub name: ClusterId,
    /// Its network (`topology.istio.io/network`); clusters on one network reach each
    /// other's pods directly.
    pub network: NetworkId,
    /// The trust domain of its workloads' SPIFFE IDs.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Where its pods' addresses come from; see the module's address plan.
    pub pod_cidr: Ipv4Cidr,
    /// Where its services' ClusterIPs come from, inside `pod_cidr`.
    pub service_cidr: Ipv4Cidr,
    /// Whether it runs its own controller or is served by another cluster's.
    pub control_plane: ControlPlane,
    /// Whether it has an east-west gateway (only meaningful when networks differ).
    #[serde(default)]
    pub east_west_gateway: bool,
    /// Where its node is, as `topology.kubernetes.io/region|zone` say.
    #[serde(default)]
    pub locality: LocalitySpec,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

/// A cluster's control plane role.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "role", rename_all = "camelCase", deny_unknown_fields)]
pub enum ControlPlane {
    /// Runs a controller that reads every cluster of the mesh.
    Primary,
    /// Its proxies are served by `primary`'s controller.
    Remote {
        /// The primary cluster whose controller serves this one.
        primary: ClusterId,
    },
}

/// Region and zone of a cluster's node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalitySpec {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
}

/// A demo workload (bookinfo's `reviews`, `productpage`): a service, and which versions
/// of it run in which clusters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The service's name and the pods' `app` label.
    pub name: String,
    /// Its Kubernetes namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The pods' service account, the last part of their SPIFFE ID.
    pub service_account: String,
    /// The service port (the pods listen on the same port).
    pub port: u16,
    /// What the port speaks.
    #[serde(default)]
    pub protocol: Protocol,
    /// A server answers on its port; a client only calls others.
    #[serde(default)]
    pub role: WorkloadRole,
    /// The versions and the clusters each runs in (one pod per version and cluster).
    pub versions: Vec<VersionSpec>,
}

fn default_namespace() -> String {
    "default".into()
}

/// The protocol of a workload's port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

/// Whether a workload serves or only calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadRole {
    #[default]
    Server,
    Client,
}

/// One version of a workload and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VersionSpec {
    /// The pods' `version` label, e.g. `v1`.
    pub version: String,
    /// The clusters with one pod of this version each.
    pub clusters: Vec<ClusterId>,
}

impl Topology {
    /// Reads a topology file.
    pub fn load(file: &Path) -> Result<Topology, ManifestError> {
        let text = std::fs::read_to_string(file).map_err(|e| ManifestError::file(file, format!("cannot read: {e}")))?;
        Topology::from_yaml(file, &text)
    }

    /// Parses and validates a topology; `file` names it in errors.
    pub fn from_yaml(file: &Path, text: &str) -> Result<Topology, ManifestError> {
        let mut docs = manifest::documents(file, text)?;
        if docs.len() != 1 {
            return Err(ManifestError::file(
                file,
                format!("a topology file holds exactly one YAML document, found {}", docs.len()),
            ));
        }
        let (n, value) = docs.remove(0);
        let topology: Topology = manifest::typed(file, n, "", value)?;
        topology
            .validate()
            .map_err(|(field, message)| ManifestError::field(file, n, field, message))?;
        Ok(topology)
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &ClusterId) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| &c.name == name)
    }

    /// The networks, each with its clusters in file order.
    pub fn networks(&self) -> BTreeMap<&NetworkId, Vec<&ClusterSpec>> {
        let mut out: BTreeMap<&NetworkId, Vec<&ClusterSpec>> = BTreeMap::new();
        for c in &self.clusters {
            out.entry(&c.network).or_default().push(c);
        }
        out
    }

    /// The primary cluster whose controller serves `cluster` (itself if a primary).
    pub fn controller_of<'a>(&'a self, cluster: &'a ClusterSpec) -> &'a ClusterSpec {
        match &cluster.control_plane {
            ControlPlane::Primary => cluster,
            ControlPlane::Remote { primary } => self.cluster(primary).unwrap_or(cluster),
        }
    }

    /// Every check a topology must pass; the error is (field path, message).
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: String, msg: String| Err((field, msg));
        if let Err(m) = label(&self.name, 40) {
            return err("name".into(), m);
        }
        if self.clusters.is_empty() {
            return err("clusters".into(), "a topology needs at least one cluster".into());
        }
        if self.clusters.len() > MAX_CLUSTERS {
            return err(
                "clusters".into(),
                format!("at most {MAX_CLUSTERS} clusters (the address plan numbers them 1 to 9)"),
            );
        }
        let mut names = BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let at = |f: &str| format!("clusters[{i}].{f}");
            if let Err(m) = label(c.name.as_str(), 20) {
                return err(at("name"), m);
            }
            if !names.insert(&c.name) {
                return err(at("name"), format!("cluster `{}` is named twice", c.name));
            }
            if let Err(m) = label(c.network.as_str(), 40) {
                return err(at("network"), m);
            }
            if let Err(e) = SpiffeId::parse(&format!("spiffe://{}", c.trust_domain)) {
                return err(
                    at("trustDomain"),
                    format!("`{}` is not a trust domain: {e}", c.trust_domain),
                );
            }
            if !(8..=22).contains(&c.pod_cidr.prefix_len()) {
                return err(
                    at("podCidr"),
                    format!(
                        "{} must be a /8 to /22 block (pods start at its second /24)",
                        c.pod_cidr
                    ),
                );
            }
            if c.pod_cidr.overlaps(&TRANSIT_CIDR) {
                return err(
                    at("podCidr"),
                    format!("{} overlaps the gateways' transit network {TRANSIT_CIDR}", c.pod_cidr),
                );
            }
            if let Some((j, other)) = self.clusters[..i]
                .iter()
                .enumerate()
                .find(|(_, o)| o.pod_cidr.overlaps(&c.pod_cidr))
            {
                return err(
                    at("podCidr"),
                    format!(
                        "{} overlaps {} of cluster `{}` (clusters[{j}])",
                        c.pod_cidr, other.pod_cidr, other.name
                    ),
                );
            }
            let reserved = Ipv4Cidr::new(c.pod_cidr.network(), 23).expect("a /8../22 network address is /23-aligned");
            if !c.pod_cidr.covers(&c.service_cidr)
                || c.service_cidr.overlaps(&reserved)
                || c.service_cidr.prefix_len() > 30
            {
                return err(
                    at("serviceCidr"),
                    format!(
                        "{} must be a block of at least 4 addresses inside the pod CIDR {} and outside its first two /24s ({reserved}: infrastructure and the first pods)",
                        c.service_cidr, c.pod_cidr
                    ),
                );
            }
        }
        let networks = self.networks();
        for (i, c) in self.clusters.iter().enumerate() {
            let at = |f: &str| format!("clusters[{i}].{f}");
            if let ControlPlane::Remote { primary } = &c.control_plane {
                let field = at("controlPlane.primary");
                let Some(p) = self.cluster(primary) else {
                    return err(field, format!("no cluster `{primary}` in this topology"));
                };
                if p.name == c.name {
                    return err(field, "a remote cluster cannot be its own primary".into());
                }
                if p.control_plane != ControlPlane::Primary {
                    return err(
                        field,
                        format!("`{primary}` is itself a remote; a remote's primary must be a primary"),
                    );
                }
                if p.trust_domain != c.trust_domain {
                    return err(
                        at("trustDomain"),
                        format!(
                            "`{}` differs from its primary `{primary}`'s `{}`: one controller's CA issues both",
                            c.trust_domain, p.trust_domain
                        ),
                    );
                }
                if p.network != c.network && !p.east_west_gateway {
                    return err(
                        field,
                        format!(
                            "`{primary}` is on another network and has no east-west gateway to expose its controller through"
                        ),
                    );
                }
            }
            if c.east_west_gateway && networks.len() == 1 {
                return err(
                    at("eastWestGateway"),
                    format!(
                        "every cluster is on network `{}`: a gateway joins networks, and here there is only one",
                        c.network
                    ),
                );
            }
        }
        if networks.len() > 1
            && let Some((net, _)) = networks.iter().find(|(_, cs)| !cs.iter().any(|c| c.east_west_gateway))
        {
            let i = self.clusters.iter().position(|c| &c.network == *net).unwrap_or(0);
            return err(
                format!("clusters[{i}].eastWestGateway"),
                format!("network `{net}` has no east-west gateway: the other networks could never reach it"),
            );
        }

        let mut workloads = BTreeSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |f: &str| format!("workloads[{i}].{f}");
            if let Err(m) = label(&w.name, 40) {
                return err(at("name"), m);
            }
            if let Err(m) = label(&w.namespace, 40) {
                return err(at("namespace"), m);
            }
            if !workloads.insert((&w.namespace, &w.name)) {
                return err(
                    at("name"),
                    format!(
                        "workload `{}` in namespace `{}` is described twice",
                        w.name, w.namespace
                    ),
                );
            }
            if let Err(m) = label(&w.service_account, 40) {
                return err(at("serviceAccount"), m);
            }
            if w.port == 0 {
                return err(at("port"), "port 0 cannot be served".into());
            }
            if w.versions.is_empty() {
                return err(at("versions"), "a workload needs at least one version".into());
            }
            let mut versions = BTreeSet::new();
            for (j, v) in w.versions.iter().enumerate() {
                let at = |f: &str| format!("workloads[{i}].versions[{j}].{f}");
                if let Err(m) = label(&v.version, 20) {
                    return err(at("version"), m);
                }
                if !versions.insert(&v.version) {
                    return err(at("version"), format!("version `{}` is listed twice", v.version));
                }
                if v.clusters.is_empty() {
                    return err(at("clusters"), "a version must run in at least one cluster".into());
                }
                let mut seen = BTreeSet::new();
                for (k, c) in v.clusters.iter().enumerate() {
                    if self.cluster(c).is_none() {
                        return err(
                            format!("{}[{k}]", at("clusters")),
                            format!("no cluster `{c}` in this topology"),
                        );
                    }
                    if !seen.insert(c) {
                        return err(
                            format!("{}[{k}]", at("clusters")),
                            format!("cluster `{c}` is listed twice"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// A name that can stand in a DNS label, a Kubernetes name and a network namespace name.
fn label(s: &str, max: usize) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` must be 1 to {max} lowercase letters, digits and '-', not starting or ending with '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: two
clusters:
  - name: cluster1
    network: network1
    podCidr: 10.241.0.0/16
    serviceCidr: 10.241.255.0/24
    controlPlane: {role: primary}
    eastWestGateway: true
    locality: {region: us-east, zone: us-east-1a}
  - name: cluster2
    network: network2
    podCidr: 10.242.0.0/16
    serviceCidr: 10.242.255.0/24
    controlPlane: {role: remote, primary: cluster1}
    eastWestGateway: true
workloads:
  - name: reviews
    serviceAccount: bookinfo-reviews
    port: 9080
    versions:
      - {version: v1, clusters: [cluster1, cluster2]}
      - {version: v2, clusters: [cluster2]}
"#;

    fn load(text: &str) -> Result<Topology, String> {
        Topology::from_yaml(Path::new("t.yaml"), text).map_err(|e| e.to_string())
    }

    /// `GOOD` with `from` replaced by `to` (once), which must be refused at `field`
    /// with a message containing `says`.
    #[track_caller]
    fn refused(from: &str, to: &str, field: &str, says: &str) {
        assert!(GOOD.contains(from), "test bug: {from:?} not in GOOD");
        let e = load(&GOOD.replacen(from, to, 1)).unwrap_err();
        assert!(e.starts_with(&format!("t.yaml: document 1: field `{field}`: ")), "{e}");
        assert!(e.contains(says), "{e}");
    }

    #[test]
    fn loads_a_good_topology_with_defaults() {
        let t = load(GOOD).unwrap();
        assert_eq!(t.clusters[0].trust_domain, "cluster.local");
        assert_eq!(t.workloads[0].namespace, "default");
        assert_eq!(t.workloads[0].protocol, Protocol::Http);
        assert_eq!(t.workloads[0].role, WorkloadRole::Server);
        assert_eq!(t.clusters[0].locality.zone, "us-east-1a");
        assert_eq!(t.controller_of(&t.clusters[1]).name.as_str(), "cluster1");
        assert_eq!(t.networks().len(), 2);
    }

    #[test]
    fn cidrs_parse_strictly() {
        let c: Ipv4Cidr = "10.241.0.0/16".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 241, 3, 4)));
        assert!(!c.contains(Ipv4Addr::new(10, 242, 0, 1)));
        assert_eq!(c.nth(257), Some(Ipv4Addr::new(10, 241, 1, 1)));
        assert_eq!(c.nth(1 << 16), None);
        assert!(c.covers(&"10.241.255.0/24".parse().unwrap()));
        assert!(!"10.241.255.0/24".parse::<Ipv4Cidr>().unwrap().covers(&c));
        assert_eq!(
            "10.241.0.1/16".parse::<Ipv4Cidr>().unwrap_err().to_string(),
            "host bits are set: the block starting at 10.241.0.0/16 was probably meant"
        );
        for bad in [
            "10.241.0.0",
            "10.241.0.0/",
            "10.241.0.0/33",
            "10.241.0/16",
            "::1/128",
            "10.241.0.0/+8",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_unknown_fields_and_bad_values_by_field() {
        refused(
            "eastWestGateway: true\n    locality",
            "eastWestGateways: true\n    locality",
            "clusters[0].eastWestGateways",
            "unknown field",
        );
        refused(
            "podCidr: 10.242.0.0/16",
            "podCidr: 10.242.0.1/16",
            "clusters[1].podCidr",
            "host bits",
        );
        refused("port: 9080", "port: 90800", "workloads[0].port", "");
        refused(
            "{role: primary}",
            "{role: leader}",
            "clusters[0].controlPlane.role",
            "unknown variant",
        );
    }

    #[test]
    fn refuses_bad_names_and_duplicates() {
        refused("name: two", "name: Two", "name", "lowercase");
        refused(
            "- name: cluster2",
            "- name: cluster1",
            "clusters[1].name",
            "named twice",
        );
        refused(
            "network: network2",
            "network: net_2",
            "clusters[1].network",
            "lowercase",
        );
        refused(
            "network: network1",
            "network: network1\n    trustDomain: Bad.Domain",
            "clusters[0].trustDomain",
            "not a trust domain",
        );
        refused(
            "serviceAccount: bookinfo-reviews",
            "serviceAccount: ''",
            "workloads[0].serviceAccount",
            "1 to 40",
        );
    }

    #[test]
    fn refuses_overlapping_or_misplaced_cidrs() {
        refused(
            "podCidr: 10.242.0.0/16",
            "podCidr: 10.241.128.0/17",
            "clusters[1].podCidr",
            "overlaps 10.241.0.0/16 of cluster `cluster1`",
        );
        refused(
            "podCidr: 10.242.0.0/16",
            "podCidr: 100.0.0.0/8",
            "clusters[1].podCidr",
            "transit",
        );
        refused(
            "podCidr: 10.242.0.0/16",
            "podCidr: 10.242.0.0/24",
            "clusters[1].podCidr",
            "/8 to /22",
        );
        refused(
            "serviceCidr: 10.242.255.0/24",
            "serviceCidr: 10.243.255.0/24",
            "clusters[1].serviceCidr",
            "inside the pod CIDR",
        );
        refused(
            "serviceCidr: 10.242.255.0/24",
            "serviceCidr: 10.242.1.0/24",
            "clusters[1].serviceCidr",
            "first two /24s",
        );
        refused(
            "serviceCidr: 10.242.255.0/24",
            "serviceCidr: 10.242.255.0/31",
            "clusters[1].serviceCidr",
            "at least 4",
        );
    }

    #[test]
    fn refuses_control_planes_that_cannot_work() {
        let remote = "{role: remote, primary: cluster1}";
        refused(
            remote,
            "{role: remote, primary: cluster9}",
            "clusters[1].controlPlane.primary",
            "no cluster `cluster9`",
        );
        refused(
            remote,
            "{role: remote, primary: cluster2}",
            "clusters[1].controlPlane.primary",
            "its own primary",
        );
        refused(
            "{role: primary}",
            "{role: remote, primary: cluster2}",
            "clusters[0].controlPlane.primary",
            "itself a remote",
        );
        refused(
            "network: network2\n    podCidr",
            "network: network2\n    trustDomain: other.td\n    podCidr",
            "clusters[1].trustDomain",
            "differs from its primary",
        );
        refused(
            "eastWestGateway: true\n    locality",
            "eastWestGateway: false\n    locality",
            "clusters[1].controlPlane.primary",
            "no east-west gateway to expose its controller",
        );
    }

    #[test]
    fn refuses_gateways_where_networks_do_not_differ_and_networks_without_one() {
        refused(
            "network: network2",
            "network: network1",
            "clusters[0].eastWestGateway",
            "only one",
        );
        let no_gw2 = GOOD.replacen(
            "{role: remote, primary: cluster1}\n    eastWestGateway: true",
            "{role: primary}",
            1,
        );
        let e = load(&no_gw2).unwrap_err();
        assert!(
            e.contains("field `clusters[1].eastWestGateway`: network `network2` has no east-west gateway"),
            "{e}"
        );
    }

    #[test]
    fn refuses_workloads_that_name_nothing_real() {
        refused(
            "[cluster1, cluster2]",
            "[cluster1, cluster7]",
            "workloads[0].versions[0].clusters[1]",
            "no cluster `cluster7`",
        );
        refused(
            "[cluster1, cluster2]",
            "[cluster1, cluster1]",
            "workloads[0].versions[0].clusters[1]",
            "listed twice",
        );
        refused(
            "{version: v2,",
            "{version: v1,",
            "workloads[0].versions[1].version",
            "listed twice",
        );
        refused(
            "[cluster2]}",
            "[]}",
            "workloads[0].versions[1].clusters",
            "at least one cluster",
        );
        refused("port: 9080", "port: 0", "workloads[0].port", "port 0");
        let twice = GOOD.to_string()
            + "  - name: reviews\n    serviceAccount: x\n    port: 1\n    versions: [{version: v1, clusters: [cluster1]}]\n";
        let e = load(&twice).unwrap_err();
        assert!(
            e.contains("field `workloads[1].name`: workload `reviews` in namespace `default` is described twice"),
            "{e}"
        );
    }

    #[test]
    fn refuses_empty_and_multi_document_files() {
        assert!(
            load("name: x\nclusters: []\n")
                .unwrap_err()
                .contains("field `clusters`: a topology needs at least one cluster")
        );
        assert!(load("").unwrap_err().contains("exactly one YAML document, found 0"));
        assert!(load(&format!("{GOOD}---\n{GOOD}")).unwrap_err().contains("found 2"));
        let all_remote = GOOD.replacen("{role: primary}", "{role: remote, primary: cluster1}", 1);
        // cluster1 names itself: that refusal comes first, naming the field.
        assert!(
            load(&all_remote)
                .unwrap_err()
                .contains("clusters[0].controlPlane.primary")
        );
    }

    #[test]
    fn refuses_more_clusters_than_the_address_plan_has() {
        let mut t = String::from("name: many\nclusters:\n");
        for k in 1..=10 {
            t += &format!(
                "  - {{name: c{k}, network: net, podCidr: 10.{k}.0.0/16, serviceCidr: 10.{k}.255.0/24, controlPlane: {{role: primary}}}}\n"
            );
        }
        let e = load(&t).unwrap_err();
        assert!(e.contains("field `clusters`: at most 9 clusters"), "{e}");
    }
}
