//! Names of clusters and networks.

use std::fmt;
use std::sync::Arc;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a name; names are opaque labels chosen by the operator.
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }
            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A cluster's ID (Istio's `CLUSTER_ID`), e.g. `cluster1`.
    ClusterId
);
name_type!(
    /// A network's name (Istio's `topology.istio.io/network`), e.g. `network1`.
    /// Endpoints on one network reach each other directly; between networks only
    /// through east-west gateways.
    NetworkId
);
