//! Istio's `ServiceEntry`: hosts added to the mesh's registry that are no
//! Kubernetes Service (external APIs, VMs). Read and validated; a STATIC entry's
//! endpoints, and the workloads its `workloadSelector` picks, are its hosts' endpoints
//! ([`crate::model`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::workload_entry::{WorkloadEntrySpec, is_port_name};
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
    pub endpoints: Option<Vec<WorkloadEntrySpec>>,
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

/// Istio's `ValidateFQDN`: at most 255 bytes, a final dot allowed, every label a DNS-1123 label.
fn is_fqdn(host: &str) -> bool {
    host.len() <= 255 && host.strip_suffix('.').unwrap_or(host).split('.').all(is_port_name)
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
        if endpoints.is_empty() && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
            // The hosts are then the names to resolve: a wildcard is none.
            if let Some(i) = spec.hosts.iter().position(|h| !is_fqdn(h)) {
                let mode = if resolution == Resolution::Dns {
                    "DNS"
                } else {
                    "DNS_ROUND_ROBIN"
                };
                return Err(ValidationError::new(
                    format!("spec.hosts[{i}]"),
                    format!("hosts must be FQDN if no endpoints are provided for resolution mode {mode}"),
                ));
            }
        }
        for (i, e) in endpoints.iter().enumerate() {
            e.validate(&format!("spec.endpoints[{i}]"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> ServiceEntry {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn dns_resolution_without_endpoints_needs_hosts_that_can_be_resolved() {
        let base = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\n";
        let refused = entry(&format!(
            "{base}spec: {{hosts: [a.example.com, '*.example.com'], resolution: DNS, ports: [{{number: 443, name: tls, protocol: TLS}}]}}"
        ))
        .validate()
        .unwrap_err()
        .to_string();
        assert!(refused.contains("spec.hosts[1]"), "{refused}");
        assert!(
            refused.contains("hosts must be FQDN if no endpoints are provided for resolution mode DNS"),
            "{refused}"
        );
        let rr = entry(&format!(
            "{base}spec: {{hosts: [Upper.example.com], resolution: DNS_ROUND_ROBIN}}"
        ));
        assert!(
            rr.validate()
                .unwrap_err()
                .to_string()
                .contains("resolution mode DNS_ROUND_ROBIN")
        );
        for ok in [
            "{hosts: [api.example.com.], resolution: DNS}",
            "{hosts: ['*.example.com'], resolution: DNS, endpoints: [{address: lb.example.com}]}",
            "{hosts: ['*.example.com'], resolution: NONE}",
        ] {
            let e = entry(&format!("{base}spec: {ok}"));
            assert!(e.validate().is_ok(), "{ok}: {:?}", e.validate());
        }
    }
}
