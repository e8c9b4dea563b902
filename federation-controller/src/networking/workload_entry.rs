//! Istio's `WorkloadEntry`: a workload that is no pod (a VM, a bare-metal host), with
//! its address, labels, ports, network, locality and identity. The same message is the
//! `endpoints` of a ServiceEntry; as a kind of its own it becomes an endpoint of every
//! Kubernetes Service whose selector matches its labels, and of every ServiceEntry
//! whose `workloadSelector` does (see [`crate::model`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_vocab::Hostname;
use serde::{Deserialize, Serialize};

use super::{ValidationError, port_in_range};

/// A `WorkloadEntry` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
}

/// What a WorkloadEntry says (Istio's `WorkloadEntry` message, also a ServiceEntry endpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadEntrySpec {
    /// An IP, a host name (DNS resolution), or `unix://PATH` / `unix://@NAME`.
    pub address: Option<String>,
    /// Port name → the port the workload listens on.
    pub ports: BTreeMap<String, i64>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    /// `region/zone/subzone`.
    pub locality: Option<String>,
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

/// How a workload's address reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Ip(IpAddr),
    /// A name to resolve (a ServiceEntry of DNS resolution).
    Name(String),
    /// A Unix domain socket: nothing a remote proxy can reach.
    Unix(String),
    /// None given: the workload is reached through its network's gateway only.
    None,
}

const UNIX_PREFIX: &str = "unix://";

impl WorkloadEntry {
    /// Checks the object as Istio's webhook does.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.spec.validate("spec")
    }
}

impl WorkloadEntrySpec {
    /// Checks the message as Istio does; `at` is the field path it sits at
    /// (`spec`, or `spec.endpoints[2]` in a ServiceEntry).
    pub fn validate(&self, at: &str) -> Result<(), ValidationError> {
        let address = self.address.as_deref().unwrap_or_default();
        if address.is_empty() && self.network.is_none() {
            return Err(ValidationError::new(at, "Address is required"));
        }
        if let Some(path) = address.strip_prefix(UNIX_PREFIX) {
            let field = format!("{at}.address");
            if !path.starts_with('@') && !path.starts_with('/') {
                return Err(ValidationError::new(
                    field,
                    "UDS must be an absolute path or abstract socket",
                ));
            }
            if path.ends_with('/') {
                return Err(ValidationError::new(field, "UDS may not be a dir"));
            }
            if !self.ports.is_empty() {
                return Err(ValidationError::new(format!("{at}.ports"), "UDS may not include ports"));
            }
        } else if !address.is_empty() && address.parse::<IpAddr>().is_err() && Hostname::parse(address).is_err() {
            return Err(ValidationError::new(
                format!("{at}.address"),
                format!("Invalid value: endpoint address {address:?} is not a valid FQDN or an IP address"),
            ));
        }
        for (name, port) in &self.ports {
            if !is_port_name(name) {
                return Err(ValidationError::new(
                    format!("{at}.ports"),
                    format!("Invalid value: port name {name:?} must be a DNS-1123 label"),
                ));
            }
            port_in_range(&format!("{at}.ports.{name}"), *port)?;
        }
        if let Some(locality) = &self.locality
            && locality.split('/').count() > 3
        {
            return Err(ValidationError::new(
                format!("{at}.locality"),
                "Invalid value: a locality is region/zone/subzone",
            ));
        }
        Ok(())
    }

    /// The address as a proxy can use it.
    pub fn address(&self) -> Address {
        match self.address.as_deref() {
            None | Some("") => Address::None,
            Some(a) if a.starts_with(UNIX_PREFIX) => Address::Unix(a.to_owned()),
            Some(a) => match a.parse() {
                Ok(ip) => Address::Ip(ip),
                Err(_) => Address::Name(a.to_owned()),
            },
        }
    }

    /// Istio's TLS mode of a workload entry: its `security.istio.io/tlsMode` label, else
    /// mesh mTLS when it names a service account (a sidecar's identity), else plaintext.
    pub fn speaks_mtls(&self) -> bool {
        match self.labels.get(crate::model::TLS_MODE_LABEL) {
            Some(mode) => mode == "istio",
            None => self.service_account.as_deref().is_some_and(|sa| !sa.is_empty()),
        }
    }

    /// The port the workload listens on for a service port named `name`, if it maps it.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.get(name).and_then(|p| u16::try_from(*p).ok())
    }
}

/// A Kubernetes port name: a DNS-1123 label (lower case, digits, `-`, at most 63).
pub(super) fn is_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> WorkloadEntrySpec {
        crate::networking::from_yaml(yaml)
    }

    #[test]
    fn addresses_read_as_ip_name_socket_or_none() {
        assert_eq!(spec("address: 10.0.0.1").address(), Address::Ip([10, 0, 0, 1].into()));
        assert_eq!(
            spec("address: vm.example.com").address(),
            Address::Name("vm.example.com".into())
        );
        assert_eq!(
            spec("address: unix:///run/x").address(),
            Address::Unix("unix:///run/x".into())
        );
        assert_eq!(spec("network: net1").address(), Address::None);
    }

    #[test]
    fn tls_mode_follows_the_label_then_the_service_account() {
        assert!(spec("{address: 1.1.1.1, serviceAccount: vm}").speaks_mtls());
        assert!(!spec("{address: 1.1.1.1}").speaks_mtls());
        assert!(
            !spec("{address: 1.1.1.1, serviceAccount: vm, labels: {security.istio.io/tlsMode: disabled}}")
                .speaks_mtls()
        );
        assert!(spec("{address: 1.1.1.1, labels: {security.istio.io/tlsMode: istio}}").speaks_mtls());
    }

    #[test]
    fn refusals_name_the_field_at_its_place() {
        let e = spec("{address: 'not an address!'}")
            .validate("spec.endpoints[1]")
            .unwrap_err();
        assert_eq!(e.field, "spec.endpoints[1].address");
        let e = spec("{address: 1.1.1.1, ports: {http: 0}}")
            .validate("spec")
            .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("spec.ports.http", "port must be between 1-65535")
        );
        assert!(spec("{address: 1.1.1.1, locality: a/b/c}").validate("spec").is_ok());
        assert!(spec("{address: 1.1.1.1, locality: a/b/c/d}").validate("spec").is_err());
    }
}
