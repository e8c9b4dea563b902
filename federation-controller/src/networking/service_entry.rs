//! Istio's `ServiceEntry`: hosts added to the mesh's registry that are no
//! Kubernetes Service (external APIs, VMs); and `WorkloadEntry`, a workload that is
//! no pod, which a ServiceEntry's `workloadSelector` makes one of its endpoints.
//! [`crate::model`] turns their endpoints into the hosts' instances.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{ValidationError, port_in_range};

/// A `ServiceEntry` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
}

/// What a ServiceEntry says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDRs of the hosts.
    #[serde(deserialize_with = "addresses")]
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub location: Option<Location>,
    pub resolution: Option<Resolution>,
    /// Set (even empty) or not: Istio tells the two apart.
    pub endpoints: Option<Vec<WorkloadEntry>>,
    pub workload_selector: Option<WorkloadSelector>,
    pub export_to: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

/// A port of the hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePort {
    pub number: i64,
    pub protocol: Option<String>,
    pub name: String,
    pub target_port: Option<i64>,
}

/// Inside or outside the mesh (whether its endpoints speak mesh mTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

/// How the hosts' endpoints are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// One endpoint of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadEntry {
    pub address: Option<String>,
    /// Port name → the endpoint's port number.
    pub ports: BTreeMap<String, i64>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub locality: Option<String>,
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

/// A `WorkloadEntry` object: one workload outside Kubernetes (a VM), as a ServiceEntry
/// endpoint is, with labels a ServiceEntry's `workloadSelector` selects it by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadEntryObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntry,
}

impl WorkloadEntryObject {
    /// Istio's rules for a WorkloadEntry: an address, unless a network says it is
    /// reached through that network's gateway; ports in range.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let e = &self.spec;
        if e.address.as_deref().is_none_or(str::is_empty) && e.network.is_none() {
            return Err(ValidationError::new("spec.address", "address is required"));
        }
        for (name, port) in &e.ports {
            port_in_range(&format!("spec.ports.{name}"), *port)?;
        }
        Ok(())
    }
}

/// The pods (or WorkloadEntries) that are the hosts' endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkloadSelector {
    pub labels: BTreeMap<String, String>,
}

/// Reads `addresses`. An IPv6 address ending in `::` inside a flow sequence
/// (`[1.2.3.4, 2001:db8::]`) is a one-entry map to YAML 1.2 readers (`{"2001:db8:": null}`),
/// though Kubernetes' YAML reader takes it as the string users meant: take it so too.
fn addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let values = Vec::<serde_json::Value>::deserialize(d)?;
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Object(m) if m.len() == 1 => match m.into_iter().next() {
                Some((k, serde_json::Value::Null)) if k.ends_with(':') => Ok(format!("{k}:")),
                _ => Err(serde::de::Error::custom("an address must be a string")),
            },
            _ => Err(serde::de::Error::custom("an address must be a string")),
        })
        .collect()
}

impl ServiceEntry {
    /// Istio's rules for a ServiceEntry (CRD schema, CEL and webhook), with Istio's messages.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let spec = &self.spec;
        if spec.hosts.is_empty() {
            return Err(ValidationError::new("spec.hosts", "Required value"));
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if h == "*" {
                return Err(ValidationError::new(
                    format!("spec.hosts[{i}]"),
                    "hostname cannot be wildcard",
                ));
            }
        }
        if let Some(sel) = &spec.workload_selector {
            for (k, v) in &sel.labels {
                if v.contains('*') {
                    return Err(ValidationError::new(
                        format!("spec.workloadSelector.labels.{k}"),
                        "wildcard is not supported in selector",
                    ));
                }
            }
            if spec.endpoints.is_some() {
                return Err(ValidationError::new(
                    "spec",
                    "only one of WorkloadSelector or Endpoints can be set",
                ));
            }
        }
        let resolution = spec.resolution.unwrap_or(Resolution::None);
        for (i, a) in spec.addresses.iter().enumerate() {
            if a.contains('/') && !matches!(resolution, Resolution::None | Resolution::Static) {
                return Err(ValidationError::new(
                    format!("spec.addresses[{i}]"),
                    "CIDR addresses are allowed only for NONE/STATIC resolution types",
                ));
            }
        }
        let (mut names, mut numbers) = (BTreeSet::new(), BTreeSet::new());
        for (i, p) in spec.ports.iter().enumerate() {
            let f = format!("spec.ports[{i}]");
            if !names.insert(&p.name) {
                return Err(ValidationError::new(
                    &f,
                    format!("Duplicate value: {{\"name\":\"{}\"}}", p.name),
                ));
            }
            if !numbers.insert(p.number) {
                return Err(ValidationError::new("spec.ports", "port number cannot be duplicated"));
            }
            port_in_range(&format!("{f}.number"), p.number)?;
            if let Some(t) = p.target_port {
                port_in_range(&format!("{f}.targetPort"), t)?;
            }
        }
        let endpoints = spec.endpoints.as_deref().unwrap_or_default();
        if resolution == Resolution::None && !endpoints.is_empty() {
            return Err(ValidationError::new("spec.endpoints", "NONE mode cannot set endpoints"));
        }
        if resolution == Resolution::DnsRoundRobin && endpoints.len() > 1 {
            return Err(ValidationError::new(
                "spec.endpoints",
                "DNS_ROUND_ROBIN mode cannot have multiple endpoints",
            ));
        }
        for (i, e) in endpoints.iter().enumerate() {
            if e.address.is_none() && e.network.is_none() {
                return Err(ValidationError::new(
                    format!("spec.endpoints[{i}]"),
                    "Address is required",
                ));
            }
            for (name, port) in &e.ports {
                port_in_range(&format!("spec.endpoints[{i}].ports.{name}"), *port)?;
            }
        }
        Ok(())
    }
}
