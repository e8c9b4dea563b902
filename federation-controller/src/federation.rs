//! Merges every cluster into the endpoints a proxy on one network should see.
//!
//! Namespace sameness: `reviews.default.svc.cluster.local:9080` is one service
//! whichever clusters run it. Endpoints on the proxy's own network are used as
//! they are. Endpoints on another network can only be reached through that
//! network's east-west gateways: they are replaced by the gateways, weighted by
//! how many endpoints stand behind them (split evenly when a network has several
//! gateways), per locality so locality failover still works. Only endpoints
//! whose proxy speaks mesh mTLS cross networks, since the gateway routes on the
//! mTLS SNI. A network without a reachable gateway contributes nothing: its
//! endpoints never leak as unreachable addresses.
//!
//! A gateway known only by a host name (a cloud load balancer) stands for the
//! addresses it resolves to, each a gateway of its own, so the weight behind
//! its network is split across them; until it has been resolved it is no
//! gateway at all. Resolving is not done here ([`crate::resolve`] does it):
//! this is a pure function of the live cluster models, the mesh config and
//! the addresses resolved so far.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use mesh_vocab::{ClusterId, NetworkId};

use crate::model::{ClusterModel, Gateway, GatewayAddress, Locality, MeshConfig, ServiceKey};

/// The addresses each gateway host name resolved to, sorted.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// One load-balancing endpoint as a proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbEndpoint {
    pub address: IpAddr,
    pub port: u16,
    /// For a gateway: the number of endpoints behind it in this locality.
    pub weight: u32,
    pub locality: Locality,
    /// The network the endpoint (or the endpoints behind the gateway) is on.
    pub network: NetworkId,
    /// For a direct endpoint: its cluster. For a gateway: None (it fronts a network).
    pub cluster: Option<ClusterId>,
    /// Reached through an east-west gateway.
    pub via_gateway: bool,
    /// Speaks mesh mTLS: a sidecar'd pod, or a gateway (which only passes mTLS through).
    pub mtls: bool,
    /// Comes from a cluster that has gone silent (kept for a bounded time).
    pub stale: bool,
    /// Behind one of our gateways, one remote endpoint of its own: the pod's address and
    /// target port, which the proxy pins its SNI to (`mesh_vocab::sni::pin`).
    pub pinned: Option<SocketAddr>,
}

/// Per service port, the endpoints for a proxy on one network, sorted.
pub type View = BTreeMap<ServiceKey, Vec<LbEndpoint>>;

/// Every gateway named by a host name, in live clusters or configured: what
/// there is to resolve.
pub fn gateway_hostnames<'a>(clusters: impl IntoIterator<Item = &'a ClusterModel>, mesh: &MeshConfig) -> Vec<String> {
    let mut names: Vec<String> = clusters
        .into_iter()
        .flat_map(|m| m.gateways.iter().map(|g| &g.address))
        .chain(mesh.gateways.values().flatten())
        .filter_map(|a| match a {
            GatewayAddress::Hostname(h) => Some(h.clone()),
            GatewayAddress::Ip(_) => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The gateways of every network, by address: from gateway Services in live
/// clusters, and configured ones, host names replaced by what they resolved to.
pub fn gateways(
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
) -> BTreeMap<NetworkId, Vec<SocketAddr>> {
    let mut out: BTreeMap<NetworkId, Vec<SocketAddr>> = BTreeMap::new();
    let configured = mesh.gateways.iter().flat_map(|(net, addrs)| {
        addrs.iter().map(|a| Gateway {
            network: net.clone(),
            address: a.clone(),
            port: crate::model::GATEWAY_PORT,
            // Configured by address: nothing says what it is, so Istio's behaviour.
            pins_endpoints: false,
        })
    });
    let found = clusters.iter().flat_map(|(m, _)| m.gateways.iter().cloned());
    for g in found.chain(configured) {
        let ips = match &g.address {
            GatewayAddress::Ip(ip) => std::slice::from_ref(ip),
            GatewayAddress::Hostname(h) => resolved.get(h).map(Vec::as_slice).unwrap_or_default(),
        };
        for ip in ips {
            out.entry(g.network.clone())
                .or_default()
                .push(SocketAddr::new(*ip, g.port));
        }
    }
    for gws in out.values_mut() {
        gws.sort();
        gws.dedup();
    }
    out
}

/// The networks whose every gateway is one of ours (pins endpoints): their endpoints are
/// listed one by one behind the gateways instead of collapsed into them. One gateway of
/// another kind (an Istio gateway, or one configured by address) keeps the network
/// collapsed, since it would refuse a pinned name.
fn pinning_networks(clusters: &[(&ClusterModel, bool)], mesh: &MeshConfig) -> std::collections::BTreeSet<NetworkId> {
    let mut all: BTreeMap<&NetworkId, bool> = BTreeMap::new();
    for g in clusters.iter().flat_map(|(m, _)| m.gateways.iter()) {
        *all.entry(&g.network).or_insert(true) &= g.pins_endpoints;
    }
    all.into_iter()
        .filter(|(net, pins)| *pins && !mesh.gateways.contains_key(*net))
        .map(|(net, _)| net.clone())
        .collect()
}

/// The endpoints a proxy on `network` should see. `clusters` are the live
/// models with whether each is stale; `resolved` the gateway host names'
/// addresses.
pub fn view_for(
    network: &NetworkId,
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
) -> View {
    federate(network, clusters, mesh, resolved, |i| vec![i.service.clone()])
}

/// A subset of a service port's instances: those carrying every label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubsetKey {
    pub service: ServiceKey,
    pub subset: String,
}

/// Per subset, the endpoints for a proxy on one network, sorted.
pub type SubsetView = BTreeMap<SubsetKey, Vec<LbEndpoint>>;

/// A subset and the labels its endpoints carry.
pub type SubsetLabels = (SubsetKey, BTreeMap<String, String>);

/// [`view_for`] per subset: `subsets` names each with the labels its instances
/// carry. Another network's gateway stands for as many endpoints as match there,
/// since the gateway sends the subset's SNI to the same subset on its side. Every
/// subset has an entry, empty when nothing matches: a proxy holding the subset's
/// cluster must be told it has no endpoints rather than left waiting for them.
pub fn subset_view_for(
    network: &NetworkId,
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
    subsets: &[SubsetLabels],
) -> SubsetView {
    let mut by_service: BTreeMap<&ServiceKey, Vec<&SubsetLabels>> = BTreeMap::new();
    for s in subsets {
        by_service.entry(&s.0.service).or_default().push(s);
    }
    let mut view = federate(network, clusters, mesh, resolved, |i| {
        by_service
            .get(&i.service)
            .into_iter()
            .flatten()
            .filter(|(_, labels)| labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .map(|(key, _)| key.clone())
            .collect()
    });
    for (key, _) in subsets {
        view.entry(key.clone()).or_default();
    }
    view
}

/// The federation of every instance under each key `keys_of` files it under.
fn federate<K: Ord + Clone>(
    network: &NetworkId,
    clusters: &[(&ClusterModel, bool)],
    mesh: &MeshConfig,
    resolved: &Resolved,
    keys_of: impl Fn(&crate::model::Instance) -> Vec<K>,
) -> BTreeMap<K, Vec<LbEndpoint>> {
    let gateways = gateways(clusters, mesh, resolved);
    let pinning = pinning_networks(clusters, mesh);
    let mut view: BTreeMap<K, Vec<LbEndpoint>> = BTreeMap::new();
    let mut behind: Behind<K> = BTreeMap::new();
    for (m, stale) in clusters {
        for i in &m.instances {
            for key in keys_of(i) {
                if i.network == *network {
                    view.entry(key).or_default().push(LbEndpoint {
                        address: i.address,
                        port: i.target_port,
                        weight: 1,
                        locality: i.locality.clone(),
                        network: i.network.clone(),
                        cluster: Some(m.cluster.clone()),
                        via_gateway: false,
                        mtls: i.mtls,
                        stale: *stale,
                        pinned: None,
                    });
                } else if i.mtls && pinning.contains(&i.network) {
                    // One entry per (endpoint, gateway): the proxy balances and ejects the
                    // remote pods themselves, and may reach each through any gateway.
                    for g in &gateways[&i.network] {
                        view.entry(key.clone()).or_default().push(LbEndpoint {
                            address: g.ip(),
                            port: g.port(),
                            weight: 1,
                            locality: i.locality.clone(),
                            network: i.network.clone(),
                            cluster: Some(m.cluster.clone()),
                            via_gateway: true,
                            mtls: true,
                            stale: *stale,
                            pinned: Some(SocketAddr::new(i.address, i.target_port)),
                        });
                    }
                } else if i.mtls && gateways.contains_key(&i.network) {
                    *behind
                        .entry((key, i.network.clone(), i.locality.clone(), *stale))
                        .or_default() += 1;
                }
            }
        }
    }
    spread_over_gateways(&gateways, behind, &mut view);
    for eps in view.values_mut() {
        eps.sort();
    }
    view
}

/// Endpoints behind other networks' gateways, counted per (key, network, locality, stale).
type Behind<K> = BTreeMap<(K, NetworkId, Locality, bool), u32>;

/// Replaces the endpoints counted behind each network by its gateways, weighted.
fn spread_over_gateways<K: Ord + Clone>(
    gateways: &BTreeMap<NetworkId, Vec<SocketAddr>>,
    behind: Behind<K>,
    view: &mut BTreeMap<K, Vec<LbEndpoint>>,
) {
    // Where the next remainder goes, per network: small groups (one endpoint in a
    // locality) would otherwise all land on a network's first gateway.
    let mut rotate: BTreeMap<NetworkId, u32> = BTreeMap::new();
    for ((service, net, locality, stale), n) in behind {
        let gws = &gateways[&net];
        let k = gws.len() as u32;
        let start = rotate.entry(net.clone()).or_default();
        let first = *start;
        *start = (first + n % k) % k;
        for (j, g) in gws.iter().enumerate() {
            // n endpoints split over k gateways; n % k of them, from `first` on, take one more.
            let extra = (j as u32 + k - first) % k < n % k;
            let weight = n / k + u32::from(extra);
            if weight == 0 {
                continue;
            }
            view.entry(service.clone()).or_default().push(LbEndpoint {
                address: g.ip(),
                port: g.port(),
                weight,
                locality: locality.clone(),
                network: net.clone(),
                cluster: None,
                via_gateway: true,
                mtls: true,
                stale,
                pinned: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Instance;
    use mesh_vocab::Hostname;
    use proptest::prelude::*;

    fn svc(i: u8) -> ServiceKey {
        ServiceKey {
            host: Hostname::parse(&format!("s{i}.default.svc.cluster.local")).unwrap(),
            port: 9080,
        }
    }

    /// A random mesh: clusters on a few networks, instances of a few services,
    /// some without mTLS, some networks with gateways and some without.
    fn mesh_strategy() -> impl Strategy<Value = Vec<ClusterModel>> {
        let instance =
            (0u8..3, 0u8..3, any::<bool>(), 0u8..2, any::<u8>()).prop_map(|(s, net, mtls, zone, host)| Instance {
                service: svc(s),
                address: IpAddr::from([10, 240 + net, zone, host]),
                target_port: 8080,
                network: NetworkId::new(format!("net{net}")),
                locality: Locality {
                    region: "r".into(),
                    zone: format!("z{zone}"),
                    subzone: String::new(),
                },
                mtls,
                labels: BTreeMap::new(),
                service_account: None,
            });
        // Some gateways known by host name only, half of those resolved (see `resolved`).
        let gateway = (0u8..3, 1u8..4, any::<bool>()).prop_map(|(net, host, named)| Gateway {
            network: NetworkId::new(format!("net{net}")),
            address: if named {
                GatewayAddress::Hostname(format!("gw{host}.net{net}.example"))
            } else {
                GatewayAddress::Ip(IpAddr::from([100, 64, net, host]))
            },
            port: 15443,
            pins_endpoints: false,
        });
        proptest::collection::vec(
            (
                proptest::collection::vec(instance, 0..12),
                proptest::collection::vec(gateway, 0..2),
            ),
            1..5,
        )
        .prop_map(|clusters| {
            clusters
                .into_iter()
                .enumerate()
                .map(|(c, (mut instances, gateways))| {
                    // Addresses are unique per cluster in real life (one pod network each).
                    instances.sort_by_key(|i| (i.service.clone(), i.address));
                    instances.dedup_by_key(|i| (i.service.clone(), i.address));
                    for i in &mut instances {
                        if let IpAddr::V4(v4) = i.address {
                            let o = v4.octets();
                            i.address = IpAddr::from([o[0], o[1], o[2] + 10 * c as u8, o[3]]);
                        }
                    }
                    ClusterModel {
                        exposure: Default::default(),
                        traffic: Default::default(),
                        cluster: ClusterId::new(format!("c{c}")),
                        instances,
                        vips: vec![],
                        gateways,
                        security: Default::default(),
                    }
                })
                .collect()
        })
    }

    fn live(models: &[ClusterModel]) -> Vec<(&ClusterModel, bool)> {
        models.iter().map(|m| (m, false)).collect()
    }

    /// What the strategy's gateway names resolved to: `gw1` and `gw3` to two
    /// addresses each, `gw2` not (yet).
    fn resolved(models: &[ClusterModel]) -> Resolved {
        gateway_hostnames(models, &MeshConfig::default())
            .into_iter()
            .filter(|h| !h.starts_with("gw2."))
            .map(|h| {
                let n = h.as_bytes()[2] - b'0';
                let ips = vec![IpAddr::from([100, 65, 0, n]), IpAddr::from([100, 65, 1, n])];
                (h, ips)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Gateway weights add up to the mTLS endpoints behind them, per service,
        /// network and locality; networks without a gateway contribute nothing.
        #[test]
        fn gateway_weights_equal_endpoint_counts(models in mesh_strategy(), me in 0u8..3) {
            let mesh = MeshConfig::default();
            let me = NetworkId::new(format!("net{me}"));
            let view = view_for(&me, &live(&models), &mesh, &resolved(&models));
            let gws = gateways(&live(&models), &mesh, &resolved(&models));
            let mut expected: BTreeMap<(ServiceKey, NetworkId, Locality), u32> = BTreeMap::new();
            for m in &models {
                for i in m.instances.iter().filter(|i| i.network != me && i.mtls && gws.contains_key(&i.network)) {
                    *expected.entry((i.service.clone(), i.network.clone(), i.locality.clone())).or_default() += 1;
                }
            }
            let mut got: BTreeMap<(ServiceKey, NetworkId, Locality), u32> = BTreeMap::new();
            for (s, eps) in &view {
                for e in eps.iter().filter(|e| e.via_gateway) {
                    *got.entry((s.clone(), e.network.clone(), e.locality.clone())).or_default() += e.weight;
                    prop_assert!(e.weight > 0);
                }
            }
            prop_assert_eq!(got, expected);
        }

        /// Nothing on another network is ever handed out as a direct address:
        /// only gateway addresses of that network, and only for mTLS endpoints.
        #[test]
        fn nothing_on_another_network_leaks(models in mesh_strategy(), me in 0u8..3) {
            let mesh = MeshConfig::default();
            let me = NetworkId::new(format!("net{me}"));
            let view = view_for(&me, &live(&models), &mesh, &resolved(&models));
            let gws = gateways(&live(&models), &mesh, &resolved(&models));
            for eps in view.values() {
                for e in eps {
                    if e.via_gateway {
                        prop_assert_ne!(&e.network, &me);
                        let known = gws[&e.network].contains(&SocketAddr::new(e.address, e.port));
                        prop_assert!(known, "{:?} is not a gateway of {}", e.address, e.network);
                    } else {
                        prop_assert_eq!(&e.network, &me);
                    }
                }
            }
        }

        /// Removing cluster X changes only X's direct endpoints and the weight X
        /// added behind gateways (and X's own gateways): every other direct
        /// endpoint is untouched.
        #[test]
        fn removing_a_cluster_touches_only_its_endpoints(models in mesh_strategy(), me in 0u8..3, x in any::<prop::sample::Index>()) {
            let mesh = MeshConfig::default();
            let me = NetworkId::new(format!("net{me}"));
            let x = x.index(models.len());
            let names = resolved(&models);
            let all = view_for(&me, &live(&models), &mesh, &names);
            let rest: Vec<ClusterModel> = models.iter().enumerate().filter(|(i, _)| *i != x).map(|(_, m)| m.clone()).collect();
            let without = view_for(&me, &live(&rest), &mesh, &names);
            let x_id = models[x].cluster.clone();
            let direct = |v: &View, keep_x: bool| -> Vec<(ServiceKey, LbEndpoint)> {
                v.iter()
                    .flat_map(|(s, eps)| eps.iter().map(move |e| (s.clone(), e.clone())))
                    .filter(|(_, e)| !e.via_gateway && (keep_x || e.cluster.as_ref() != Some(&x_id)))
                    .collect()
            };
            prop_assert_eq!(direct(&all, false), direct(&without, true));
            // And the stale flag of a silent cluster never changes which endpoints there are.
            let stale: Vec<(&ClusterModel, bool)> = models.iter().enumerate().map(|(i, m)| (m, i == x)).collect();
            let marked = view_for(&me, &stale, &mesh, &names);
            // Stale and fresh endpoints behind one network are grouped apart, so
            // compare what each network and each direct endpoint carries in all.
            let totals = |v: &View| -> BTreeMap<(ServiceKey, NetworkId, Option<IpAddr>), u32> {
                let mut t = BTreeMap::new();
                for (s, eps) in v {
                    for e in eps {
                        let direct = (!e.via_gateway).then_some(e.address);
                        *t.entry((s.clone(), e.network.clone(), direct)).or_default() += e.weight;
                    }
                }
                t
            };
            prop_assert_eq!(totals(&marked), totals(&all));
        }
    }

    #[test]
    fn a_two_network_example() {
        let inst = |net: &str, ip: [u8; 4], mtls: bool| Instance {
            service: svc(0),
            address: IpAddr::from(ip),
            target_port: 8080,
            network: NetworkId::new(net),
            locality: Locality::default(),
            mtls,
            labels: BTreeMap::new(),
            service_account: None,
        };
        let c1 = ClusterModel {
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c1"),
            instances: vec![inst("n1", [10, 241, 0, 5], true)],
            vips: vec![],
            gateways: vec![Gateway {
                network: NetworkId::new("n1"),
                address: GatewayAddress::Ip([100, 64, 0, 1].into()),
                port: 15443,
                pins_endpoints: false,
            }],
            security: Default::default(),
        };
        let c2 = ClusterModel {
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: vec![
                inst("n2", [10, 242, 0, 5], true),
                inst("n2", [10, 242, 0, 6], true),
                inst("n2", [10, 242, 0, 7], false),
            ],
            vips: vec![],
            gateways: vec![
                Gateway {
                    network: NetworkId::new("n2"),
                    address: GatewayAddress::Ip([100, 64, 0, 2].into()),
                    port: 15443,
                    pins_endpoints: false,
                },
                Gateway {
                    network: NetworkId::new("n2"),
                    address: GatewayAddress::Hostname("gw2.example.com".into()),
                    port: 15443,
                    pins_endpoints: false,
                },
            ],
            security: Default::default(),
        };
        let endpoints = |resolved: &Resolved| -> Vec<String> {
            let v = view_for(
                &NetworkId::new("n1"),
                &[(&c1, false), (&c2, true)],
                &MeshConfig::default(),
                resolved,
            );
            v[&svc(0)]
                .iter()
                .map(|e| {
                    format!(
                        "{}:{} w{} gw={} stale={}",
                        e.address, e.port, e.weight, e.via_gateway, e.stale
                    )
                })
                .collect()
        };
        assert_eq!(
            endpoints(&Resolved::new()),
            [
                "10.241.0.5:8080 w1 gw=false stale=false",
                "100.64.0.2:15443 w2 gw=true stale=true",
            ],
            "a gateway name not resolved yet takes no share"
        );
        let resolved = Resolved::from([(
            "gw2.example.com".to_owned(),
            vec![IpAddr::from([100, 64, 0, 3]), IpAddr::from([100, 64, 0, 2])],
        )]);
        assert_eq!(
            gateways(&[(&c2, false)], &MeshConfig::default(), &resolved)[&NetworkId::new("n2")],
            [
                SocketAddr::from(([100, 64, 0, 2], 15443)),
                SocketAddr::from(([100, 64, 0, 3], 15443))
            ],
            "a resolved name is its addresses, each once"
        );
    }

    #[test]
    fn behind_our_gateways_each_remote_pod_is_an_endpoint_of_its_own_pinned_to_its_address() {
        let inst = |n: u8, mtls: bool| Instance {
            service: svc(0),
            address: IpAddr::from([10, 242, 0, n]),
            target_port: 8080,
            network: NetworkId::new("n2"),
            locality: Locality::default(),
            mtls,
            labels: BTreeMap::new(),
            service_account: None,
        };
        let gateway = |last: u8, pins_endpoints: bool| Gateway {
            network: NetworkId::new("n2"),
            address: GatewayAddress::Ip([100, 64, 0, last].into()),
            port: 15443,
            pins_endpoints,
        };
        let c2 = |gateways: Vec<Gateway>| ClusterModel {
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: vec![inst(5, true), inst(6, true), inst(7, false)],
            vips: vec![],
            gateways,
            security: Default::default(),
        };
        let endpoints = |c: &ClusterModel| -> Vec<String> {
            view_for(
                &NetworkId::new("n1"),
                &[(c, false)],
                &MeshConfig::default(),
                &Resolved::new(),
            )[&svc(0)]
                .iter()
                .map(|e| {
                    let pin = e.pinned.map_or("-".to_owned(), |p| p.to_string());
                    format!("{}:{} w{} {pin} {:?}", e.address, e.port, e.weight, e.cluster)
                })
                .collect()
        };
        // Two of our gateways: every mTLS pod through each, pinned; the plaintext pod stays out.
        let ours = c2(vec![gateway(2, true), gateway(3, true)]);
        assert_eq!(
            endpoints(&ours),
            [
                "100.64.0.2:15443 w1 10.242.0.5:8080 Some(ClusterId(\"c2\"))",
                "100.64.0.2:15443 w1 10.242.0.6:8080 Some(ClusterId(\"c2\"))",
                "100.64.0.3:15443 w1 10.242.0.5:8080 Some(ClusterId(\"c2\"))",
                "100.64.0.3:15443 w1 10.242.0.6:8080 Some(ClusterId(\"c2\"))",
            ]
        );
        // One gateway that is not ours (it would refuse a pinned name): the network is
        // collapsed into its gateways, weighted, as Istio does.
        let mixed = c2(vec![gateway(2, true), gateway(3, false)]);
        assert_eq!(
            endpoints(&mixed),
            ["100.64.0.2:15443 w1 - None", "100.64.0.3:15443 w1 - None"]
        );
    }

    #[test]
    fn a_gateway_name_is_every_address_it_resolved_to_sharing_the_weight() {
        let inst = |n: u8| Instance {
            service: svc(0),
            address: IpAddr::from([10, 242, 0, n]),
            target_port: 8080,
            network: NetworkId::new("n2"),
            locality: Locality::default(),
            mtls: true,
            labels: BTreeMap::new(),
            service_account: None,
        };
        let c2 = ClusterModel {
            exposure: Default::default(),
            traffic: Default::default(),
            cluster: ClusterId::new("c2"),
            instances: (1..=4).map(inst).collect(),
            vips: vec![],
            gateways: vec![Gateway {
                network: NetworkId::new("n2"),
                address: GatewayAddress::Hostname("lb.example.com".into()),
                port: 15443,
                pins_endpoints: false,
            }],
            security: Default::default(),
        };
        let endpoints = |resolved: &Resolved| -> Vec<String> {
            view_for(&NetworkId::new("n1"), &[(&c2, false)], &MeshConfig::default(), resolved)
                .get(&svc(0))
                .into_iter()
                .flatten()
                .map(|e| format!("{}:{} w{}", e.address, e.port, e.weight))
                .collect()
        };
        assert!(
            endpoints(&Resolved::new()).is_empty(),
            "unresolved, the network has no gateway and contributes nothing"
        );
        let ips = |last: &[u8]| -> Resolved {
            let ips = last.iter().map(|n| IpAddr::from([198, 51, 100, *n])).collect();
            Resolved::from([("lb.example.com".to_owned(), ips)])
        };
        assert_eq!(endpoints(&ips(&[7])), ["198.51.100.7:15443 w4"]);
        assert_eq!(
            endpoints(&ips(&[7, 8])),
            ["198.51.100.7:15443 w2", "198.51.100.8:15443 w2"]
        );
    }
}
