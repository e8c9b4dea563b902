//! Istio's cross-network SNI: `outbound_.<port>_.<subset>_.<fqdn>`.
//!
//! A sidecar calling a service on another network opens mTLS to that network's
//! east-west gateway with this name as SNI; the gateway routes on it without
//! terminating TLS. No subset is an empty field:
//! `outbound_.9080_._.reviews.default.svc.cluster.local`.
//!
//! Isthmus adds one form of its own, [`pin`]: an extra first label that asks the gateway
//! for one endpoint of the service (`ep-10-1-2-3.outbound_.9080_._.reviews…`). Istio
//! collapses a remote network into its gateway (istio/istio#52435), so its sidecars cannot
//! eject one bad pod behind a gateway; with a pinned name, a sidecar balances over, and
//! ejects, the remote endpoints themselves. Only our gateways accept it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::hostname::{Hostname, HostnameError};

/// A parsed cross-network SNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IstioSni {
    port: u16,
    subset: Option<String>,
    host: Hostname,
}

/// Why a server name is not an Istio cross-network SNI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("SNI does not start with \"outbound_.\"")]
    NotOutbound,
    #[error("SNI has fewer than four \"_.\"-separated fields")]
    MissingField,
    #[error("SNI port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    #[error("SNI subset {0:?} is not a DNS label")]
    BadSubset(String),
    #[error("SNI host: {0}")]
    BadHost(#[from] HostnameError),
}

impl IstioSni {
    /// Builds the SNI for a service port and optional subset.
    pub fn new(host: Hostname, port: u16, subset: Option<&str>) -> Result<Self, SniError> {
        if port == 0 {
            return Err(SniError::BadPort("0".into()));
        }
        let subset = match subset {
            None | Some("") => None,
            Some(s) => Some(parse_subset(s)?),
        };
        Ok(Self { port, subset, host })
    }

    /// The SNI of Istio's outbound cluster `outbound|PORT|SUBSET|HOST` (an empty subset
    /// field for none), as a sidecar sends it and a gateway routes by it.
    pub fn of_cluster(name: &str) -> Option<Self> {
        let mut parts = name.split('|');
        let (dir, port, subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if dir != "outbound" || parts.next().is_some() {
            return None;
        }
        Self::new(Hostname::parse(host).ok()?, port.parse().ok()?, Some(subset)).ok()
    }

    /// Parses `outbound_.<port>_.<subset>_.<fqdn>`, case-insensitively (SNI is
    /// ASCII case-insensitive), normalising to lower case.
    pub fn parse(sni: &str) -> Result<Self, SniError> {
        let rest = strip_prefix_ignore_case(sni, "outbound_.").ok_or(SniError::NotOutbound)?;
        let mut fields = rest.splitn(3, "_.");
        let port = fields.next().ok_or(SniError::MissingField)?;
        let subset = fields.next().ok_or(SniError::MissingField)?;
        let host = fields.next().ok_or(SniError::MissingField)?;
        let port = parse_port(port)?;
        let subset = if subset.is_empty() {
            None
        } else {
            Some(parse_subset(subset)?)
        };
        Ok(Self {
            port,
            subset,
            host: Hostname::parse(host)?,
        })
    }

    /// The service port the caller asked for.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The DestinationRule subset, if any.
    pub fn subset(&self) -> Option<&str> {
        self.subset.as_deref()
    }

    /// The service host.
    pub fn host(&self) -> &Hostname {
        &self.host
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

fn parse_port(s: &str) -> Result<u16, SniError> {
    // u16::from_str accepts a leading '+' and zeros; a port in a name has one
    // spelling, because routes are looked up by the exact name.
    let digits_only =
        !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && !(s.len() > 1 && s.starts_with('0'));
    match s.parse::<u16>() {
        Ok(p) if digits_only && p != 0 => Ok(p),
        _ => Err(SniError::BadPort(s.to_owned())),
    }
}

/// Istio requires subset names to be DNS-1123 labels.
fn parse_subset(s: &str) -> Result<String, SniError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(SniError::BadSubset(s.to_owned()))
    }
}

impl fmt::Display for IstioSni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound_.{}_.{}_.{}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.host
        )
    }
}

impl std::str::FromStr for IstioSni {
    type Err = SniError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The first label of a pinned name.
const PIN: &str = "ep-";

/// `sni` pinned to the endpoint at `addr` (a pod's address and target port: pods that share
/// an address, on the host network, differ by port): `ep-10-1-2-3-9080.` (IPv4, dots as
/// dashes) or `ep-<32 hex digits>-9080.` (IPv6) before it. Both are DNS labels, so the name
/// is still one a TLS client may send.
pub fn pin(addr: SocketAddr, sni: &str) -> String {
    match addr.ip() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{PIN}{a}-{b}-{c}-{d}-{}.{sni}", addr.port())
        }
        IpAddr::V6(v6) => format!("{PIN}{:032x}-{}.{sni}", u128::from(v6), addr.port()),
    }
}

/// Splits a pinned name into the endpoint it asks for and the name it pins; a name that is
/// not pinned (or whose pin does not spell an address) comes back whole.
pub fn unpin(sni: &str) -> (Option<SocketAddr>, &str) {
    let pinned = sni.split_once('.').and_then(|(label, rest)| {
        let (addr, port) = label.strip_prefix(PIN)?.rsplit_once('-')?;
        let port = parse_port(port).ok()?;
        let ip = if addr.len() == 32 && addr.bytes().all(|b| b.is_ascii_hexdigit()) {
            IpAddr::V6(Ipv6Addr::from(u128::from_str_radix(addr, 16).ok()?))
        } else {
            let octets: Vec<u8> = addr
                .split('-')
                // One spelling per octet, as `pin` prints it: no sign, no leading zero.
                .map(|o| {
                    let canonical =
                        !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()) && !(o.len() > 1 && o.starts_with('0'));
                    canonical.then(|| o.parse().ok()).flatten()
                })
                .collect::<Option<_>>()?;
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(octets).ok()?))
        };
        Some((SocketAddr::new(ip, port), rest))
    });
    match pinned {
        Some((addr, rest)) => (Some(addr), rest),
        None => (None, sni),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pinned_name_carries_one_endpoint_before_the_name_it_pins() {
        use super::{pin, unpin};
        let sni = "outbound_.9080_._.reviews.default.svc.cluster.local";
        for addr in [
            "10.1.2.3:9080",
            "0.0.0.0:1",
            "255.255.255.255:65535",
            "[fd00::1:2]:8080",
            "[::]:80",
        ] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let pinned = pin(addr, sni);
            assert!(pinned.split('.').next().unwrap().len() <= 63, "{pinned}");
            assert_eq!(unpin(&pinned), (Some(addr), sni), "{pinned}");
        }
        assert_eq!(
            pin("10.1.2.3:9080".parse().unwrap(), sni),
            format!("ep-10-1-2-3-9080.{sni}")
        );
        // Not pins: returned whole, so the gateway treats them as any other name.
        for whole in [
            sni,
            "ep-10-1-2-80.x",
            "ep-10-1-2-300-80.x",
            "ep-010-1-2-3-80.x",
            "ep-10-1-2-3-0.x",
            "ep-10-1-2-3.x",
            "ep-.x",
            "ep-10-1-2-3-80",
            "epx-1-2-3-4-80.x",
            "ep-+1-2-3-4-80.x",
        ] {
            assert_eq!(unpin(whole), (None, whole), "{whole}");
        }
    }

    #[test]
    fn istio_cluster_names_become_snis() {
        use super::IstioSni;
        let s = IstioSni::of_cluster("outbound|9080||reviews.default.svc.cluster.local").unwrap();
        assert_eq!(s.to_string(), "outbound_.9080_._.reviews.default.svc.cluster.local");
        let s = IstioSni::of_cluster("outbound|9080|v2|reviews.default.svc.cluster.local").unwrap();
        assert_eq!(s.subset(), Some("v2"));
        for bad in [
            "inbound|9080||a.b",
            "outbound|x||a.b",
            "outbound|9080||",
            "xds-grpc",
            "outbound|1||a.b|c",
        ] {
            assert!(IstioSni::of_cluster(bad).is_none(), "{bad}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_istio_forms() {
        let s = IstioSni::parse("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(s.port(), 9080);
        assert_eq!(s.subset(), None);
        assert_eq!(s.host().as_str(), "reviews.default.svc.cluster.local");

        let s = IstioSni::parse("OUTBOUND_.443_.V2_.Reviews.default.svc.cluster.local").unwrap();
        assert_eq!((s.port(), s.subset()), (443, Some("v2")));
        assert_eq!(s.to_string(), "outbound_.443_.v2_.reviews.default.svc.cluster.local");
    }

    #[test]
    fn refuses_what_istio_would_not_send() {
        use SniError::*;
        let bad = [
            ("reviews.default.svc.cluster.local", NotOutbound),
            ("inbound_.9080_._.reviews", NotOutbound),
            ("outbound_.9080_._", MissingField),
            ("outbound_.0_._.a", BadPort("0".into())),
            ("outbound_.+80_._.a", BadPort("+80".into())),
            ("outbound_.65536_._.a", BadPort("65536".into())),
            ("outbound_.05_._.a", BadPort("05".into())),
            ("outbound_._._.a", BadPort("".into())),
            ("outbound_.80_.v_1_.a", BadSubset("v_1".into())),
            ("outbound_.80_.-v_.a", BadSubset("-v".into())),
        ];
        for (name, err) in bad {
            assert_eq!(IstioSni::parse(name), Err(err), "{name}");
        }
        assert!(matches!(IstioSni::parse("outbound_.80_._."), Err(BadHost(_))));
        assert!(matches!(IstioSni::parse("outbound_.80_._.a_.b"), Err(BadHost(_))));
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(
            port in 1u16..,
            subset in proptest::option::of("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"),
            labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..6),
        ) {
            let host = Hostname::parse(&labels.join(".")).unwrap();
            let sni = IstioSni::new(host, port, subset.as_deref()).unwrap();
            prop_assert_eq!(IstioSni::parse(&sni.to_string()).unwrap(), sni);
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = IstioSni::parse(&s);
        }
    }
}
