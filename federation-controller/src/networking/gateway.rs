//! Istio's `Gateway`: the servers (port, protocol, hosts, TLS mode) a set of gateway
//! pods, picked by `selector`, listens with. For a multi-network mesh the one that
//! matters is the east-west gateway's `AUTO_PASSTHROUGH` server on 15443: its
//! `hosts` say which services other networks may reach through that gateway (Istio's
//! `samples/multicluster/expose-services.yaml` exposes `*.local`). Ingress servers
//! (HTTP, HTTPS, TCP) are read and validated, not served: no ingress gateway here.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{ValidationError, port_in_range};

/// A `Gateway` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

/// What a Gateway says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    /// Labels of the gateway pods this applies to.
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

/// One listener of the gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Server {
    pub port: Option<Port>,
    pub bind: Option<String>,
    /// `[namespace/]host`, wildcards allowed (`*.local`, `istio-system/*`).
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
    pub name: Option<String>,
}

/// A server's port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Port {
    pub number: i64,
    pub protocol: String,
    pub name: String,
    pub target_port: Option<i64>,
}

/// A server's TLS settings (the fields validation looks at; the rest is ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerTls {
    pub https_redirect: bool,
    pub mode: Option<TlsMode>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub credential_names: Vec<String>,
}

/// How a server treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

/// Istio's protocols of a server port (case-insensitive).
const PROTOCOLS: [&str; 10] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS",
];

impl Gateway {
    /// Checks the object as Istio's webhook does (its messages).
    pub fn validate(&self) -> Result<(), ValidationError> {
        let servers = &self.spec.servers;
        if servers.is_empty() {
            return Err(ValidationError::new(
                "spec.servers",
                "gateway must have at least one server",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, s) in servers.iter().enumerate() {
            let at = format!("spec.servers[{i}]");
            s.validate(&at)?;
            if let Some(p) = &s.port
                && !names.insert(p.name.as_str())
            {
                return Err(ValidationError::new(
                    format!("{at}.port.name"),
                    format!("port names in servers must be unique: duplicate name {}", p.name),
                ));
            }
        }
        Ok(())
    }

    /// The hosts this Gateway lets other networks reach through the gateways it selects:
    /// those of its `AUTO_PASSTHROUGH` servers on `port`.
    pub fn passthrough_hosts(&self, port: u16) -> impl Iterator<Item = &str> {
        self.spec
            .servers
            .iter()
            .filter(move |s| {
                s.port.as_ref().is_some_and(|p| p.number == i64::from(port))
                    && s.tls.as_ref().and_then(|t| t.mode) == Some(TlsMode::AutoPassthrough)
            })
            .flat_map(|s| s.hosts.iter().map(String::as_str))
    }
}

impl Server {
    fn validate(&self, at: &str) -> Result<(), ValidationError> {
        if self.hosts.is_empty() {
            return Err(ValidationError::new(
                format!("{at}.hosts"),
                "server config must contain at least one host",
            ));
        }
        for (j, h) in self.hosts.iter().enumerate() {
            namespace_slash_host(h).map_err(|reason| ValidationError::new(format!("{at}.hosts[{j}]"), reason))?;
        }
        let Some(port) = &self.port else {
            return Err(ValidationError::new(format!("{at}.port"), "port is required"));
        };
        let protocol = port.protocol.to_ascii_uppercase();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            return Err(ValidationError::new(
                format!("{at}.port.protocol"),
                format!(
                    "invalid protocol {:?}, supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP",
                    port.protocol
                ),
            ));
        }
        let unix_bind = self.bind.as_deref().is_some_and(|b| b.starts_with("unix://"));
        if port.number > 0 || !unix_bind {
            port_in_range(&format!("{at}.port.number"), port.number)?;
        }
        if port.target_port.is_some_and(|t| t > 0) {
            return Err(ValidationError::new(
                format!("{at}.port.targetPort"),
                "targetPort has no impact on Gateways",
            ));
        }
        if port.name.is_empty() {
            return Err(ValidationError::new(format!("{at}.port.name"), "port name must be set"));
        }
        let is_tls = protocol == "HTTPS" || protocol == "TLS";
        match &self.tls {
            None if is_tls => Err(ValidationError::new(
                format!("{at}.tls"),
                "server must have TLS settings for HTTPS/TLS protocols",
            )),
            Some(tls) if !is_tls => {
                let http = ["HTTP", "HTTP2", "GRPC", "GRPC-WEB"].contains(&protocol.as_str());
                // A plain HTTP port may only say "redirect to HTTPS".
                if http && tls.mode.is_none() && tls.credential_name.is_none() && tls.server_certificate.is_none() {
                    Ok(())
                } else if http {
                    Err(ValidationError::new(
                        format!("{at}.tls"),
                        "server cannot have TLS settings for plain text HTTP ports",
                    ))
                } else {
                    Err(ValidationError::new(
                        format!("{at}.tls"),
                        "server cannot have TLS settings for non HTTPS/TLS ports",
                    ))
                }
            }
            Some(tls) => tls.validate(&format!("{at}.tls")),
            None => Ok(()),
        }
    }
}

impl ServerTls {
    fn validate(&self, at: &str) -> Result<(), ValidationError> {
        let has_credential = self.credential_name.is_some() || !self.credential_names.is_empty();
        match self.mode {
            Some(TlsMode::IstioMutual) if has_credential || self.server_certificate.is_some() => {
                Err(ValidationError::new(
                    at,
                    "ISTIO_MUTUAL TLS cannot have associated private key, server certificate, CA certificate or credentialName",
                ))
            }
            Some(mode @ (TlsMode::Simple | TlsMode::Mutual | TlsMode::OptionalMutual)) if !has_credential => {
                let name = match mode {
                    TlsMode::Simple => "SIMPLE",
                    TlsMode::Mutual => "MUTUAL",
                    _ => "OPTIONAL_MUTUAL",
                };
                if self.server_certificate.is_none() {
                    Err(ValidationError::new(
                        at,
                        format!("{name} TLS requires a server certificate"),
                    ))
                } else if self.private_key.is_none() {
                    Err(ValidationError::new(at, format!("{name} TLS requires a private key")))
                } else if mode != TlsMode::Simple && self.ca_certificates.is_none() {
                    Err(ValidationError::new(
                        at,
                        format!("{name} TLS requires a client CA bundle"),
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

/// `[namespace/]host` of a gateway server: the namespace `*`, `.` or a DNS label; the
/// host a domain whose leftmost label may be `*`.
fn namespace_slash_host(h: &str) -> Result<(), String> {
    let (ns, host) = match h.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, h),
    };
    if host.contains('/') {
        return Err(format!("host must be of form namespace/dnsName: {h:?}"));
    }
    if let Some(ns) = ns
        && ns != "*"
        && ns != "."
        && !is_dns_label(ns)
    {
        return Err(format!("invalid namespace value {ns:?} in host {h:?}"));
    }
    wildcard_domain(host).map_err(|why| format!("invalid host {host:?}: {why}"))
}

/// A domain name whose leftmost label may be `*` (and `*` alone).
pub(crate) fn wildcard_domain(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("empty");
    }
    if host.len() > 255 {
        return Err("longer than 255 characters");
    }
    let rest = match host.strip_prefix('*') {
        Some("") => return Ok(()),
        Some(rest) => rest
            .strip_prefix('.')
            .ok_or("a wildcard must be a whole label: *.domain")?,
        None => host,
    };
    // A trailing dot (absolute name) is allowed.
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    if rest.split('.').all(is_dns_label_any_case) {
        Ok(())
    } else {
        Err("labels are letters, digits and '-', 1 to 63 long, not starting or ending with '-'")
    }
}

fn is_dns_label(s: &str) -> bool {
    is_dns_label_any_case(s) && !s.bytes().any(|c| c.is_ascii_uppercase())
}

fn is_dns_label_any_case(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether gateways exposing `patterns` let other networks reach the service `host` of
/// `namespace`; None (no Gateway says what they expose) lets everything through.
pub fn exposes(patterns: Option<&[String]>, host: &str, namespace: &str) -> bool {
    patterns.is_none_or(|ps| ps.iter().any(|p| host_matches(p, host, namespace)))
}

/// Whether a gateway server's host pattern (`[namespace/]host`) admits the service
/// `host` of `namespace`: `*` and `*.suffix` match by suffix, as Istio matches them.
pub fn host_matches(pattern: &str, host: &str, namespace: &str) -> bool {
    let (ns, pat) = match pattern.split_once('/') {
        Some((ns, pat)) => (ns, pat),
        None => ("*", pattern),
    };
    if ns != "*" && ns != "." && ns != namespace {
        return false;
    }
    match pat.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pat.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(yaml: &str) -> Gateway {
        crate::networking::from_yaml(yaml)
    }

    const EXPOSE: &str = "spec: {selector: {istio: eastwestgateway}, servers: [{port: {number: 15443, name: tls, protocol: TLS}, tls: {mode: AUTO_PASSTHROUGH}, hosts: ['*.local']}]}";

    #[test]
    fn the_east_west_sample_exposes_every_local_host_on_15443() {
        let g = gateway(EXPOSE);
        g.validate().unwrap();
        assert_eq!(g.passthrough_hosts(15443).collect::<Vec<_>>(), ["*.local"]);
        assert_eq!(g.passthrough_hosts(443).count(), 0);
        assert!(host_matches("*.local", "reviews.default.svc.cluster.local", "default"));
        assert!(!host_matches("*.local", "payments.example.com", "default"));
        assert!(host_matches(
            "bookinfo/*",
            "reviews.bookinfo.svc.cluster.local",
            "bookinfo"
        ));
        assert!(!host_matches(
            "bookinfo/*",
            "reviews.default.svc.cluster.local",
            "default"
        ));
        assert!(host_matches(
            "reviews.default.svc.cluster.local",
            "reviews.default.svc.cluster.local",
            "default"
        ));
    }

    #[test]
    fn servers_are_refused_with_istios_reasons() {
        let refused = |yaml: &str| gateway(yaml).validate().unwrap_err().to_string();
        assert!(refused("spec: {servers: []}").contains("gateway must have at least one server"));
        assert!(
            refused("spec: {servers: [{port: {number: 80, name: http, protocol: HTTP}}]}")
                .contains("at least one host")
        );
        assert!(refused("spec: {servers: [{hosts: [a.com]}]}").contains("port is required"));
        assert!(
            refused("spec: {servers: [{port: {number: 80, name: x, protocol: QUIC}, hosts: [a.com]}]}")
                .contains("invalid protocol")
        );
        assert!(
            refused("spec: {servers: [{port: {number: 443, name: x, protocol: TLS}, hosts: [a.com]}]}")
                .contains("must have TLS settings")
        );
        assert!(refused("spec: {servers: [{port: {number: 443, name: x, protocol: HTTPS}, hosts: [a.com], tls: {mode: SIMPLE}}]}").contains("SIMPLE TLS requires a server certificate"));
        assert!(
            refused(
                "spec: {servers: [{port: {number: 80, name: x, protocol: TCP}, hosts: [a.com], tls: {mode: SIMPLE}}]}"
            )
            .contains("non HTTPS/TLS ports")
        );
        assert!(
            refused("spec: {servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: ['a/b/c']}]}")
                .contains("namespace/dnsName")
        );
        assert!(
            refused("spec: {servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: ['*foo.com']}]}")
                .contains("whole label")
        );
        assert!(
            refused("spec: {servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: [a.com]}, {port: {number: 81, name: x, protocol: HTTP}, hosts: [b.com]}]}")
                .contains("duplicate name x")
        );
        // An HTTP server may carry only the HTTPS redirect.
        gateway("spec: {servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: [a.com], tls: {httpsRedirect: true}}]}")
            .validate()
            .unwrap();
    }
}
