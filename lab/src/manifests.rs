//! Each lab cluster's Kubernetes objects, as the controller's manifest source reads them
//! (`DIR/<cluster>/*.yaml`): Namespaces labelled with the cluster's network, a Node with
//! its region and zone, a Service per workload with a ClusterIP from the service CIDR, an
//! EndpointSlice with the pods' addresses, the Pods (labels `app`, `version`,
//! `security.istio.io/tlsMode: istio`, `topology.istio.io/network`), and the east-west
//! gateway's Service (labelled with the network, port 15443, its transit address as
//! external IP and load balancer ingress).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

use mesh_vocab::topology::Protocol;
use serde_json::{Value, json};

use crate::plan::{ClusterPlan, GATEWAY_PORT, HEALTH_PORT, Plan, SECURE_PORT};

/// Istio's network label.
const NETWORK_LABEL: &str = "topology.istio.io/network";

/// Writes every cluster's objects to `dir/<cluster>/objects.yaml`; returns how many.
pub fn write(plan: &Plan, dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for c in &plan.clusters {
        let objects = cluster_objects(c);
        n += objects.len();
        let mut text = String::new();
        for o in &objects {
            text.push_str("---\n");
            text.push_str(&serde_saphyr::to_string(o).map_err(io::Error::other)?);
        }
        let cdir = dir.join(c.name.as_str());
        fs::create_dir_all(&cdir)?;
        fs::write(cdir.join("objects.yaml"), text)?;
    }
    Ok(n)
}

fn port_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http => "http",
        Protocol::Tcp => "tcp",
    }
}

/// One cluster's objects, in the order `kubectl apply` would want them.
pub fn cluster_objects(c: &ClusterPlan) -> Vec<Value> {
    let network = c.network.as_str();
    let node = c.node_name();
    let mut namespaces: BTreeSet<&str> = c.services.iter().map(|s| s.namespace.as_str()).collect();
    namespaces.insert("istio-system");
    let mut out: Vec<Value> = namespaces
        .iter()
        .map(|ns| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": {NETWORK_LABEL: network}}})
        })
        .collect();
    out.push(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {
        "topology.kubernetes.io/region": c.region, "topology.kubernetes.io/zone": c.zone,
        "kubernetes.io/hostname": node}}}),
    );
    for s in &c.services {
        let name = port_name(s.protocol);
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.namespace, "labels": {"app": s.name}},
            "spec": {"type": "ClusterIP", "clusterIP": s.vip, "clusterIPs": [s.vip], "selector": {"app": s.name},
                     "ports": [{"name": name, "port": s.port, "targetPort": s.port, "protocol": "TCP"}]}}));
        let pods: Vec<_> = c
            .pods
            .iter()
            .filter(|p| p.app == s.name && p.namespace == s.namespace)
            .collect();
        if pods.is_empty() {
            continue;
        }
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|p| {
                json!({"addresses": [p.host.ip], "conditions": {"ready": true}, "nodeName": node,
                       "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}})
            })
            .collect();
        out.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-lab", s.name), "namespace": s.namespace,
                         "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "ports": [{"name": name, "port": s.port, "protocol": "TCP"}],
            "endpoints": endpoints}));
    }
    for p in &c.pods {
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": {
                "app": p.app, "version": p.version, "security.istio.io/tlsMode": "istio", NETWORK_LABEL: network}},
            "spec": {"nodeName": node, "serviceAccountName": p.service_account,
                     "containers": [{"name": p.app, "ports": [{"containerPort": p.port}]}]},
            "status": {"phase": "Running", "podIP": p.host.ip, "podIPs": [{"ip": p.host.ip}]}}));
    }
    if let Some(gw) = &c.gateway {
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system",
                         // Our gateway: it routes endpoint-pinned names, so the sidecars
                         // balance over and eject the pods behind it one by one.
                         "labels": {"app": "istio-eastwestgateway", NETWORK_LABEL: network,
                                    "networking.isthmus.io/endpoint-pinning": "true"}},
            "spec": {"type": "LoadBalancer", "externalIPs": [gw.transit_ip], "ports": [
                {"name": "status-port", "port": HEALTH_PORT, "targetPort": HEALTH_PORT},
                {"name": "tls", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT},
                {"name": "tls-istiod", "port": SECURE_PORT, "targetPort": SECURE_PORT}]},
            "status": {"loadBalancer": {"ingress": [{"ip": gw.transit_ip}]}}}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topologies;

    #[test]
    fn objects_carry_what_the_controller_reads() {
        let plan = Plan::new(&topologies::default_topology(), "isl").unwrap();
        let objs = cluster_objects(plan.cluster(3));
        let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "Namespace",
                "Node",
                "Service",
                "EndpointSlice",
                "Service",
                "EndpointSlice",
                "Pod",
                "Pod",
                "Pod",
                "Service"
            ]
        );
        let slice = &objs[4];
        let addrs: Vec<&str> = slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["addresses"][0].as_str().unwrap())
            .collect();
        assert_eq!(addrs, ["10.243.1.1", "10.243.1.2"]);
        assert_eq!(objs[3]["spec"]["clusterIP"], "10.243.255.1");
        let v2 = &objs[8];
        assert_eq!(v2["metadata"]["labels"]["version"], "v2");
        assert_eq!(v2["metadata"]["labels"]["topology.istio.io/network"], "network3");
        assert_eq!(v2["spec"]["serviceAccountName"], "bookinfo-reviews");
        let gw = objs.last().unwrap();
        assert_eq!(gw["status"]["loadBalancer"]["ingress"][0]["ip"], "100.64.0.3");
        assert_eq!(
            objs[2]["metadata"]["labels"]["topology.kubernetes.io/region"],
            "eu-west"
        );
    }
}
