//! A cluster's manifests, as the controller reads them from a directory or the API
//! server: arbitrary text is read as multi-document YAML into the cluster's objects
//! (`ClusterObjects::add_yaml`: Kubernetes kinds, Istio's networking and security
//! kinds, each Istio document validated on its own), then distilled into the cluster's
//! model (`ClusterModel::build`: instances from EndpointSlices, WorkloadEntries and
//! ServiceEntries, VIPs, gateways, security). Checks: no panic; a file either fails
//! with an error or yields objects whose every refused document names its kind; every
//! instance the model holds belongs to a service port whose protocol it lists; routing
//! merges the model, and every port it routes per request speaks HTTP.

#![no_main]

use std::path::Path;

use federation_controller::model::{ClusterModel, MeshConfig};
use federation_controller::objects::ClusterObjects;
use federation_controller::routing::Routing;
use libfuzzer_sys::fuzz_target;
use mesh_vocab::ClusterId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut objects = ClusterObjects::default();
    if objects.add_yaml(Path::new("c1/fuzz.yaml"), text).is_err() {
        return;
    }
    for refused in &objects.refused {
        assert!(!refused.to_string().is_empty());
    }
    let model = ClusterModel::build(&ClusterId::new("c1"), &objects, &MeshConfig::default());
    for i in &model.instances {
        assert!(
            model.traffic.protocols.contains_key(&i.service),
            "an instance of {} whose service port the model does not list",
            i.service
        );
    }
    // What routing reads of the model merges without panicking.
    let routing = Routing::merge([&model], "cluster.local");
    for k in routing.http_ports() {
        assert!(routing.protocol(k).is_http());
    }
});
