//! Mutual TLS on SPIFFE identities: the workload's own SVID, the trust bundles of every
//! trust domain it trusts, and the rustls verifiers that tie a peer to exactly one of them.
//!
//! rustls checks DNS names, not URI SANs, so peers are verified here: the chain against
//! the bundle of the peer's *own* trust domain (bundles are never merged), then the
//! peer's SPIFFE ID against what the control plane said it should be.

pub mod bundle;
pub mod config;
pub mod csr;
pub mod origination;
pub mod sds;
pub mod svid;
pub mod verify;

pub use bundle::TrustBundles;
pub use config::{Alpn, client_config, proven_identity, server_config, verifying_client_config};
pub use svid::{Svid, SvidError, SvidSlot};
pub use verify::{ExpectedPeer, PeerRefusal, peer_identity, refusal_in, refusal_of};
