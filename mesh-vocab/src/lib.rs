//! The vocabulary every Isthmus part speaks, and nothing else.
//!
//! Names on the wire (Istio's cross-network SNI, SPIFFE IDs, the CA protocol), the keys that
//! identify services, clusters and networks, the topology spec, and how a YAML input's errors are
//! located for the user. This crate depends on no other part
//! of Isthmus, so every part may depend on it.

pub mod ca_protocol;
pub mod hostname;
pub mod manifest;
pub mod names;
pub mod sni;
pub mod spiffe;
pub mod topology;

pub use hostname::{Hostname, HostnameError};
pub use manifest::ManifestError;
pub use names::{ClusterId, NetworkId};
pub use sni::{IstioSni, SniError};
pub use spiffe::{SpiffeId, SpiffeIdError};
