//! The mesh's certificate authority: issues X.509 SVIDs to workloads that prove who they
//! are, from a root made here or plugged in from Istio's file names.
//!
//! - `store`: the CA's key material on disk — created once, never lost on restart.
//! - `signer`: turns a checked CSR into an SVID chain.
//! - `authenticate`: who is calling — the identity a caller's credential proves.
//! - `bootstrap`: lab-mode credentials that prove a workload's identity.
//! - `token_review`: Kubernetes-mode credentials, service-account tokens checked with the
//!   caller's API server; `review_cache` remembers recent successful reviews.
//! - `service`: Istio's `CreateCertificate` gRPC method.

pub mod authenticate;
pub mod bootstrap;
pub mod review_cache;
pub mod service;
pub mod signer;
pub mod store;
pub mod token_review;

pub use authenticate::{AuthRefusal, Authenticator};
pub use signer::{CsrRefusal, Signer};
pub use store::{Authority, CaError, Origin};
