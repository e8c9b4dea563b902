//! The inbound side's policy as one immutable snapshot: which transports (mutual TLS,
//! plaintext) each application port accepts — PeerAuthentication — and the RBAC filters
//! each accepted connection and request passes — AuthorizationPolicy.
//!
//! With xDS it is compiled from the `virtualInbound` listener the controller serves (see
//! `docs/l7-xds.md`): a filter chain per transport (`tls` always, `raw_buffer` only where
//! plaintext is allowed), `destination_port` on chains for `portLevelMtls`, and the RBAC
//! filters of each chain. Without xDS the `--mtls`/`--port-mtls` flags make the same shape
//! with no RBAC, so both paths are enforced by one piece of code.

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::authz::{self, Chain};
use crate::peer_authentication::{MtlsMode, Policy};

/// The listener the controller serves for a proxy's inbound traffic.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// Why a `virtualInbound` listener cannot be enforced; the update is refused.
#[derive(Debug, thiserror::Error)]
pub enum BadInbound {
    #[error("filter chain {chain:?}: undecodable {type_url}: {problem}")]
    Undecodable {
        chain: String,
        type_url: String,
        problem: String,
    },
    #[error("filter chain {chain:?}: transport_protocol {transport:?} is neither tls nor raw_buffer")]
    Transport { chain: String, transport: String },
    #[error("filter chain {chain:?}: destination_port {port} is not a port")]
    Port { chain: String, port: u32 },
    #[error("filter chain {chain:?}: {source}")]
    Rbac {
        chain: String,
        #[source]
        source: authz::CompileError,
    },
}

/// How a caller's bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    MutualTls,
    Plaintext,
}

/// The RBAC a connection on one chain passes.
#[derive(Debug, Clone, Default)]
pub struct Authorization {
    /// Network RBAC filters: checked once per connection.
    pub connection: Chain,
    /// The HTTP connection manager's RBAC filters: checked per request on HTTP ports, and
    /// per connection (without HTTP attributes) where the port is carried as TCP.
    pub request: Chain,
}

/// One filter chain: what it matches and what it enforces.
#[derive(Debug, Clone)]
struct InboundChain {
    port: Option<u16>,
    /// None: any transport (a chain without `transport_protocol`).
    transport: Option<Transport>,
    authorization: Authorization,
}

/// A complete inbound policy, swapped whole on every update.
#[derive(Debug, Clone)]
pub struct InboundPolicy {
    chains: Vec<InboundChain>,
}

fn chain_for(port: Option<u16>, transport: Transport) -> InboundChain {
    InboundChain {
        port,
        transport: Some(transport),
        authorization: Authorization::default(),
    }
}

/// The transports a mode admits.
fn transports(mode: MtlsMode) -> &'static [Transport] {
    match mode {
        MtlsMode::Strict => &[Transport::MutualTls],
        MtlsMode::Permissive => &[Transport::MutualTls, Transport::Plaintext],
        MtlsMode::Disable => &[Transport::Plaintext],
    }
}

impl InboundPolicy {
    /// The flags-only policy: PeerAuthentication modes and no authorization.
    pub fn from_peer_authentication(policy: &Policy) -> Self {
        let mut chains: Vec<InboundChain> = transports(policy.mode).iter().map(|t| chain_for(None, *t)).collect();
        for (port, mode) in &policy.ports {
            chains.extend(transports(*mode).iter().map(|t| chain_for(Some(*port), *t)));
        }
        Self { chains }
    }

    /// Compiles the `virtualInbound` listener among `listeners`; None when the controller
    /// serves none (the flags keep deciding).
    pub fn from_listeners(listeners: &[Listener]) -> Result<Option<Self>, BadInbound> {
        let Some(l) = listeners.iter().find(|l| l.name == VIRTUAL_INBOUND) else {
            return Ok(None);
        };
        let chains = l.filter_chains.iter().map(compile_chain).collect::<Result<_, _>>()?;
        Ok(Some(Self { chains }))
    }

    /// The chains for `port`: those naming it if any do (Envoy picks the most specific
    /// match first), else those for every port.
    fn chains_for(&self, port: u16) -> impl Iterator<Item = &InboundChain> {
        let specific = self.chains.iter().any(|c| c.port == Some(port));
        let want = if specific { Some(port) } else { None };
        self.chains.iter().filter(move |c| c.port == want)
    }

    /// PeerAuthentication for `port` as the chains say: mutual TLS and plaintext chains ⇒
    /// PERMISSIVE, mutual TLS only ⇒ STRICT, plaintext only ⇒ DISABLE; None when no chain
    /// takes the port at all (the connection is refused).
    pub fn mode_for(&self, port: u16) -> Option<MtlsMode> {
        let (mut tls, mut plain) = (false, false);
        for c in self.chains_for(port) {
            tls |= c.transport != Some(Transport::Plaintext);
            plain |= c.transport != Some(Transport::MutualTls);
        }
        match (tls, plain) {
            (true, true) => Some(MtlsMode::Permissive),
            (true, false) => Some(MtlsMode::Strict),
            (false, true) => Some(MtlsMode::Disable),
            (false, false) => None,
        }
    }

    /// The authorization of the chain a connection to `port` over `transport` lands on.
    pub fn authorization(&self, port: u16, transport: Transport) -> Option<&Authorization> {
        self.chains_for(port)
            .find(|c| c.transport.is_none_or(|t| t == transport))
            .map(|c| &c.authorization)
    }
}

fn decode<M: Message + Default>(chain: &str, any: &Any) -> Result<M, BadInbound> {
    M::decode(any.value.as_slice()).map_err(|e| BadInbound::Undecodable {
        chain: chain.to_owned(),
        type_url: any.type_url.clone(),
        problem: e.to_string(),
    })
}

fn compile_chain(c: &FilterChain) -> Result<InboundChain, BadInbound> {
    let name = c.name.clone();
    let m = c.filter_chain_match.clone().unwrap_or_default();
    let transport = match m.transport_protocol.as_str() {
        "" => None,
        "tls" => Some(Transport::MutualTls),
        "raw_buffer" => Some(Transport::Plaintext),
        other => {
            return Err(BadInbound::Transport {
                chain: name,
                transport: other.to_owned(),
            });
        }
    };
    let port = m
        .destination_port
        .map(|p| {
            u16::try_from(p.value).map_err(|_| BadInbound::Port {
                chain: name.clone(),
                port: p.value,
            })
        })
        .transpose()?;
    let rbac = |source| BadInbound::Rbac {
        chain: name.clone(),
        source,
    };
    let mut authorization = Authorization::default();
    for f in &c.filters {
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        match any.type_url.as_str() {
            NETWORK_RBAC_TYPE => {
                let r: NetworkRbac = decode(&name, any)?;
                let f = authz::Filter::compile(r.rules.as_ref(), r.shadow_rules.as_ref()).map_err(rbac)?;
                authorization.connection.filters.push(f);
            }
            HCM_TYPE => {
                let hcm: HttpConnectionManager = decode(&name, any)?;
                for hf in &hcm.http_filters {
                    let Some(http_filter::ConfigType::TypedConfig(any)) = &hf.config_type else {
                        continue;
                    };
                    if any.type_url == HTTP_RBAC_TYPE {
                        let r: HttpRbac = decode(&name, any)?;
                        let f = authz::Filter::compile(r.rules.as_ref(), r.shadow_rules.as_ref()).map_err(rbac)?;
                        authorization.request.filters.push(f);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(InboundChain {
        port,
        transport,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChainMatch};
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
    use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy as RbacPolicy, Principal};
    use envoy_types::pb::envoy::config::rbac::v3::{Rbac, permission, principal};
    use envoy_types::pb::google::protobuf::UInt32Value;

    /// Istio's empty ALLOW: nothing is admitted.
    fn deny_all() -> Rbac {
        Rbac {
            action: Action::Allow as i32,
            ..Default::default()
        }
    }

    fn any_policy() -> RbacPolicy {
        RbacPolicy {
            permissions: vec![Permission {
                rule: Some(permission::Rule::Any(true)),
            }],
            principals: vec![Principal {
                identifier: Some(principal::Identifier::Any(true)),
            }],
            ..Default::default()
        }
    }

    fn typed(name: &str, type_url: &str, bytes: Vec<u8>) -> Filter {
        Filter {
            name: name.into(),
            config_type: Some(filter::ConfigType::TypedConfig(Any {
                type_url: type_url.into(),
                value: bytes,
            })),
        }
    }

    fn hcm(rules: Rbac) -> Filter {
        crate::synthetic::http_rbac(rules)
    }

    fn network(rules: Rbac) -> Filter {
        let rbac = NetworkRbac {
            rules: Some(rules),
            ..Default::default()
        };
        typed("envoy.filters.network.rbac", NETWORK_RBAC_TYPE, rbac.encode_to_vec())
    }

    fn chain(transport: &str, port: Option<u32>, filters: Vec<Filter>) -> FilterChain {
        FilterChain {
            name: format!("{transport}-{port:?}"),
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: transport.into(),
                destination_port: port.map(|value| UInt32Value { value }),
                ..Default::default()
            }),
            filters,
            ..Default::default()
        }
    }

    fn listener(chains: Vec<FilterChain>) -> Listener {
        Listener {
            name: VIRTUAL_INBOUND.into(),
            filter_chains: chains,
            ..Default::default()
        }
    }

    #[test]
    fn peer_authentication_follows_the_chains_served() {
        let l = listener(vec![
            chain("tls", None, vec![]),
            // portLevelMtls: 9080 PERMISSIVE, 9443 STRICT.
            chain("tls", Some(9080), vec![]),
            chain("raw_buffer", Some(9080), vec![]),
            chain("tls", Some(9443), vec![]),
            chain("raw_buffer", Some(8000), vec![]),
        ]);
        let p = InboundPolicy::from_listeners(&[l]).unwrap().unwrap();
        assert_eq!(p.mode_for(1234), Some(MtlsMode::Strict));
        assert_eq!(p.mode_for(9080), Some(MtlsMode::Permissive));
        assert_eq!(p.mode_for(9443), Some(MtlsMode::Strict));
        assert_eq!(p.mode_for(8000), Some(MtlsMode::Disable));
        assert!(
            InboundPolicy::from_listeners(&[listener(vec![])])
                .unwrap()
                .unwrap()
                .mode_for(1)
                .is_none()
        );
        assert!(InboundPolicy::from_listeners(&[]).unwrap().is_none());
    }

    #[test]
    fn the_flags_make_the_same_shape() {
        let mut flags = Policy::uniform(MtlsMode::Strict);
        flags.ports.insert(9080, MtlsMode::Permissive);
        flags.ports.insert(8000, MtlsMode::Disable);
        let p = InboundPolicy::from_peer_authentication(&flags);
        for port in [1, 9080, 8000] {
            assert_eq!(p.mode_for(port), Some(flags.mode_for(port)), "port {port}");
        }
        assert!(
            p.authorization(9080, Transport::Plaintext)
                .unwrap()
                .request
                .filters
                .is_empty()
        );
        assert!(p.authorization(1, Transport::Plaintext).is_none());
    }

    #[test]
    fn each_chain_carries_its_own_rbac() {
        let mut allow = deny_all();
        allow
            .policies
            .insert("ns[default]-policy[any]-rule[0]".into(), any_policy());
        let l = listener(vec![
            chain("tls", None, vec![hcm(deny_all())]),
            chain("raw_buffer", None, vec![network(allow), hcm(deny_all())]),
        ]);
        let p = InboundPolicy::from_listeners(&[l]).unwrap().unwrap();
        let tls = p.authorization(9080, Transport::MutualTls).unwrap();
        assert_eq!((tls.connection.filters.len(), tls.request.filters.len()), (0, 1));
        let raw = p.authorization(9080, Transport::Plaintext).unwrap();
        assert_eq!((raw.connection.filters.len(), raw.request.filters.len()), (1, 1));
    }

    #[test]
    fn what_cannot_be_enforced_is_refused_naming_the_chain() {
        let e = InboundPolicy::from_listeners(&[listener(vec![chain("quic", None, vec![])])]).unwrap_err();
        assert!(e.to_string().contains("quic"), "{e}");
        let bad = typed("rbac", NETWORK_RBAC_TYPE, vec![0xff, 0xff]);
        let e = InboundPolicy::from_listeners(&[listener(vec![chain("tls", None, vec![bad])])]).unwrap_err();
        assert!(matches!(e, BadInbound::Undecodable { .. }), "{e}");
    }
}
