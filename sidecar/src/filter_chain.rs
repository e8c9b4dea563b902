//! Envoy's filter-chain matching on an outbound listener, for what a captured connection
//! shows: its original destination (`destination_port`, `prefix_ranges`) and, when some
//! chain asks for them, its ClientHello (`server_names`, `transport_protocol`,
//! `application_protocols`).
//!
//! The criteria are taken in Envoy's order. At each one the most specific value a
//! remaining chain names that fits the connection wins: a chain naming that value stays,
//! every other is dropped, and chains naming nothing stay only when no value fits. There
//! is no backtracking: a connection whose SNI fits no chain on the narrowest matching
//! destination range finds no chain, even if a wider range has one for it.
//! - `prefix_ranges`: the longest prefix holding the destination.
//! - `server_names`: the exact name, then `*.suffix` by longest suffix
//!   (`a.b.example.com` tries `*.b.example.com`, then `*.example.com`, then `*.com`).
//! - `transport_protocol`: `tls` when the connection began with a ClientHello,
//!   `raw_buffer` otherwise.
//! - `application_protocols`: the client's ALPN names, in its order.
//!
//! Source criteria (`source_prefix_ranges`, `source_ports`, …) say which application
//! connected; a captured outbound connection's source is always this pod, so a chain
//! that names them is refused rather than guessed at. Pure.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;

use crate::client_hello::ClientHello;
use crate::destinations::BadResource;

/// What one filter chain asks of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainMatch {
    port: Option<u16>,
    ranges: Vec<(IpAddr, u32)>,
    /// Lowercased.
    server_names: Vec<String>,
    /// Empty: any.
    transport: String,
    alpn: Vec<String>,
}

/// A connection as the listener sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub destination: SocketAddr,
    /// Its ClientHello; `None` when it did not begin with one (or nobody looked).
    pub hello: Option<&'a ClientHello>,
}

impl ChainMatch {
    /// The match of a chain of listener `resource`; `None` matches every connection.
    pub fn of(resource: &str, m: Option<&FilterChainMatch>) -> Result<ChainMatch, BadResource> {
        let Some(m) = m else {
            return Ok(ChainMatch::default());
        };
        let refuse = |field: &str| BadResource {
            resource: resource.to_owned(),
            problem: format!(
                "filter_chain_match.{field}: a captured outbound connection's source is this pod, not matched on"
            ),
        };
        if !m.source_prefix_ranges.is_empty() {
            return Err(refuse("source_prefix_ranges"));
        }
        if !m.direct_source_prefix_ranges.is_empty() {
            return Err(refuse("direct_source_prefix_ranges"));
        }
        if !m.source_ports.is_empty() {
            return Err(refuse("source_ports"));
        }
        if m.source_type != 0 {
            return Err(refuse("source_type"));
        }
        let port = match m.destination_port.as_ref().map(|p| p.value) {
            None => None,
            Some(p) => Some(u16::try_from(p).map_err(|_| BadResource {
                resource: resource.to_owned(),
                problem: format!("filter_chain_match.destination_port {p} out of range"),
            })?),
        };
        let mut ranges = Vec::new();
        for r in &m.prefix_ranges {
            let net: IpAddr = r.address_prefix.parse().map_err(|_| BadResource {
                resource: resource.to_owned(),
                problem: format!("filter_chain_match.prefix_ranges: {:?} is not an IP", r.address_prefix),
            })?;
            let len = r.prefix_len.map_or(if net.is_ipv4() { 32 } else { 128 }, |l| l.value);
            ranges.push((net, len));
        }
        Ok(ChainMatch {
            port,
            ranges,
            server_names: m.server_names.iter().map(|s| s.to_ascii_lowercase()).collect(),
            transport: m.transport_protocol.clone(),
            alpn: m.application_protocols.clone(),
        })
    }

    /// Whether choosing this chain takes the connection's ClientHello.
    pub fn needs_hello(&self) -> bool {
        !self.server_names.is_empty() || !self.transport.is_empty() || !self.alpn.is_empty()
    }
}

/// Keeps the candidates scoring highest; a `None` score drops a candidate.
fn narrow(candidates: &mut Vec<usize>, score: impl Fn(usize) -> Option<usize>) {
    let scored: Vec<(usize, usize)> = candidates.iter().filter_map(|&i| Some((i, score(i)?))).collect();
    let best = scored.iter().map(|(_, s)| *s).max();
    *candidates = scored
        .into_iter()
        .filter(|(_, s)| Some(*s) == best)
        .map(|(i, _)| i)
        .collect();
}

/// How specifically `names` take `name`: 0 for no names, the exact name above every
/// wildcard, a longer wildcard suffix above a shorter; `None` when they do not take it.
fn server_name_score(names: &[String], name: Option<&str>) -> Option<usize> {
    if names.is_empty() {
        return Some(0);
    }
    let name = name?;
    names
        .iter()
        .filter_map(|n| {
            if n == name {
                return Some(usize::MAX);
            }
            // `*.example.com` takes any name ending in `.example.com` with something before it.
            let suffix = n.strip_prefix('*')?;
            (suffix.starts_with('.') && name.len() > suffix.len() && name.ends_with(suffix)).then_some(suffix.len())
        })
        .max()
}

/// Whether `ip` lies in `net/len`.
pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u32) -> bool {
    let (ip, net, bits) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)) << 96, u128::from(u32::from(b)) << 96, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if len > bits {
        return false;
    }
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    ip & mask == net & mask
}

/// The chain (index into `chains`) a connection is handed to, as Envoy chooses it; the
/// first of equals, as Envoy refuses duplicate matches anyway.
pub fn select(chains: &[ChainMatch], seen: Seen<'_>) -> Option<usize> {
    let mut candidates: Vec<usize> = (0..chains.len()).collect();
    let port = seen.destination.port();
    narrow(&mut candidates, |i| match chains[i].port {
        None => Some(0),
        Some(p) => (p == port).then_some(1),
    });
    let ip = seen.destination.ip();
    narrow(&mut candidates, |i| {
        let ranges = &chains[i].ranges;
        if ranges.is_empty() {
            return Some(0);
        }
        ranges
            .iter()
            .filter(|(net, len)| in_prefix(ip, *net, *len))
            .map(|(_, len)| *len as usize + 1)
            .max()
    });
    let name = seen.hello.and_then(|h| h.server_name.as_deref());
    narrow(&mut candidates, |i| server_name_score(&chains[i].server_names, name));
    let transport = if seen.hello.is_some() { "tls" } else { "raw_buffer" };
    narrow(&mut candidates, |i| match chains[i].transport.as_str() {
        "" => Some(0),
        t => (t == transport).then_some(1),
    });
    let offered: &[Vec<u8>] = seen.hello.map_or(&[], |h| &h.alpn[..]);
    narrow(&mut candidates, |i| {
        let alpn = &chains[i].alpn;
        if alpn.is_empty() {
            return Some(0);
        }
        // The client's first protocol some chain names is the most specific.
        offered
            .iter()
            .position(|p| alpn.iter().any(|a| a.as_bytes() == p.as_slice()))
            .map(|at| usize::MAX - at)
    });
    candidates.first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn chain(m: FilterChainMatch) -> ChainMatch {
        ChainMatch::of("l", Some(&m)).unwrap()
    }

    fn sni(names: &[&str]) -> ChainMatch {
        chain(FilterChainMatch {
            server_names: names.iter().map(|n| (*n).to_owned()).collect(),
            transport_protocol: "tls".into(),
            ..Default::default()
        })
    }

    fn hello(name: &str) -> ClientHello {
        ClientHello {
            server_name: Some(name.into()),
            alpn: vec![b"h2".to_vec()],
            wire_len: 0,
        }
    }

    fn to(chains: &[ChainMatch], dest: &str, hello: Option<&ClientHello>) -> Option<usize> {
        select(
            chains,
            Seen {
                destination: dest.parse().unwrap(),
                hello,
            },
        )
    }

    #[test]
    fn the_exact_server_name_beats_wildcards_and_a_longer_wildcard_a_shorter() {
        let chains = [
            sni(&["*.com"]),
            sni(&["*.example.com"]),
            sni(&["A.example.com"]),
            ChainMatch::default(),
        ];
        let at = |name: &str| to(&chains, "10.0.0.1:443", Some(&hello(name)));
        assert_eq!(at("a.example.com"), Some(2));
        assert_eq!(at("b.example.com"), Some(1));
        assert_eq!(at("x.b.example.com"), Some(1), "a wildcard covers several labels");
        assert_eq!(at("example.org.com"), Some(0));
        assert_eq!(
            at("example.com"),
            Some(0),
            "`*.example.com` needs a label before the suffix"
        );
        assert_eq!(at("localhost"), Some(3), "no name fits: the chain without names");
        assert_eq!(to(&chains, "10.0.0.1:443", None), Some(3), "not TLS");
        let hello_without_sni = ClientHello {
            server_name: None,
            ..hello("x")
        };
        assert_eq!(to(&chains, "10.0.0.1:443", Some(&hello_without_sni)), Some(3));
        // Without a chain free of names, a name that fits none finds nothing.
        assert_eq!(to(&chains[..3], "10.0.0.1:443", Some(&hello("localhost"))), None);
    }

    #[test]
    fn the_port_and_the_narrowest_range_come_before_the_server_name() {
        let range = |ip: &str, len: u32| CidrRange {
            address_prefix: ip.into(),
            prefix_len: Some(UInt32Value { value: len }),
        };
        let chains = [
            sni(&["a.example.com"]),
            chain(FilterChainMatch {
                destination_port: Some(UInt32Value { value: 8443 }),
                ..Default::default()
            }),
            chain(FilterChainMatch {
                prefix_ranges: vec![range("10.1.0.0", 16)],
                ..Default::default()
            }),
        ];
        let a = hello("a.example.com");
        assert_eq!(to(&chains, "10.0.0.1:443", Some(&a)), Some(0));
        assert_eq!(to(&chains, "10.0.0.1:8443", Some(&a)), Some(1), "the port first");
        // No backtracking: the range is narrower, so the SNI chain is never considered.
        assert_eq!(to(&chains, "10.1.0.1:443", Some(&a)), Some(2));
        assert_eq!(to(&chains, "10.0.0.1:443", None), None, "plaintext fits no chain");
    }

    #[test]
    fn transport_and_alpn_narrow_last_and_source_matches_are_refused() {
        let raw = chain(FilterChainMatch {
            transport_protocol: "raw_buffer".into(),
            ..Default::default()
        });
        let h2 = chain(FilterChainMatch {
            application_protocols: vec!["h2".into()],
            ..Default::default()
        });
        let chains = [raw, h2, ChainMatch::default()];
        assert!(chains[0].needs_hello() && chains[1].needs_hello() && !chains[2].needs_hello());
        assert_eq!(to(&chains, "10.0.0.1:443", None), Some(0));
        assert_eq!(to(&chains, "10.0.0.1:443", Some(&hello("x"))), Some(1));
        let source = FilterChainMatch {
            source_ports: vec![1234],
            ..Default::default()
        };
        let err = ChainMatch::of("l", Some(&source)).unwrap_err();
        assert!(err.problem.contains("source_ports"), "{err}");
    }
}
