//! A route's `hash_policy` (Istio's DestinationRule `consistentHash`): what of a request
//! keys it to an endpoint of a ring-hash cluster — a header, a cookie, a query parameter
//! or the client's address — combined as Envoy does.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy as EnvoyHashPolicy;
use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
use hyper::http::request::Parts;

use super::Invalid;
use super::matcher::header_value;
use crate::balance::stable_hash;

#[derive(Debug, Clone)]
enum Source {
    Header(String),
    Cookie(String),
    Query(String),
    ClientIp,
}

/// A compiled hash policy: its sources in order, each maybe terminal.
#[derive(Debug, Clone, Default)]
pub struct HashPolicy {
    sources: Vec<(Source, bool)>,
}

/// The value of cookie `name` in the request's `cookie` headers.
fn cookie<'a>(req: &'a Parts, name: &str) -> Option<&'a str> {
    req.headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl HashPolicy {
    /// Compiles a route's hash policies; filter-state keys are refused.
    pub fn compile(policies: &[EnvoyHashPolicy]) -> Result<Self, Invalid> {
        let sources = policies
            .iter()
            .filter_map(|p| {
                let source = match p.policy_specifier.as_ref()? {
                    PolicySpecifier::Header(h) => Source::Header(h.header_name.to_ascii_lowercase()),
                    // A cookie with a TTL would have Envoy mint one; keyed by an existing
                    // cookie only, a request without it is placed at random.
                    PolicySpecifier::Cookie(c) => Source::Cookie(c.name.clone()),
                    PolicySpecifier::QueryParameter(q) => Source::Query(q.name.clone()),
                    PolicySpecifier::ConnectionProperties(c) if c.source_ip => Source::ClientIp,
                    PolicySpecifier::ConnectionProperties(_) => return None,
                    PolicySpecifier::FilterState(f) => {
                        return Some(Err(Invalid(format!("hash policy on filter state {:?}", f.key))));
                    }
                };
                Some(Ok((source, p.terminal)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { sources })
    }

    /// The request's hash, if any source gave a value: Envoy's `rotl(h, 1) ^ next`, up to
    /// the first terminal source that gave one.
    pub fn hash(&self, req: &Parts, client: Option<IpAddr>) -> Option<u64> {
        let mut hash: Option<u64> = None;
        for (source, terminal) in &self.sources {
            let value = match source {
                Source::Header(name) => header_value(req, name),
                Source::Cookie(name) => cookie(req, name).map(str::to_owned),
                Source::Query(name) => req
                    .uri
                    .query()
                    .and_then(|q| {
                        q.split('&')
                            .find_map(|kv| kv.strip_prefix(name.as_str())?.strip_prefix('='))
                    })
                    .map(str::to_owned),
                Source::ClientIp => client.map(|ip| ip.to_string()),
            };
            if let Some(v) = value {
                let h = stable_hash(v.as_bytes());
                hash = Some(hash.map_or(h, |prev| prev.rotate_left(1) ^ h));
                if *terminal {
                    break;
                }
            }
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{ConnectionProperties, Cookie, Header};

    fn policy(spec: PolicySpecifier, terminal: bool) -> EnvoyHashPolicy {
        EnvoyHashPolicy {
            terminal,
            policy_specifier: Some(spec),
        }
    }

    fn req(headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().uri("/p?user=7");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_same_user_hashes_the_same_and_absent_sources_give_none() {
        let by_header = HashPolicy::compile(&[policy(
            PolicySpecifier::Header(Header {
                header_name: "x-user".into(),
                regex_rewrite: None,
            }),
            false,
        )])
        .unwrap();
        let a = by_header.hash(&req(&[("x-user", "jason")]), None);
        assert!(a.is_some());
        assert_eq!(a, by_header.hash(&req(&[("x-user", "jason")]), None));
        assert_ne!(a, by_header.hash(&req(&[("x-user", "kate")]), None));
        assert_eq!(by_header.hash(&req(&[]), None), None);

        let by_cookie = HashPolicy::compile(&[policy(
            PolicySpecifier::Cookie(Cookie {
                name: "session".into(),
                ..Default::default()
            }),
            true,
        )])
        .unwrap();
        assert_eq!(
            by_cookie.hash(&req(&[("cookie", "a=1; session=xyz")]), None),
            Some(stable_hash(b"xyz"))
        );
        let by_ip = HashPolicy::compile(&[policy(
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true }),
            false,
        )])
        .unwrap();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(by_ip.hash(&req(&[]), Some(ip)), Some(stable_hash(b"10.0.0.9")));
    }
}
