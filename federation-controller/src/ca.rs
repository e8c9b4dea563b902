//! The mesh's certificate authority: issues X.509 SVIDs to workloads that prove who they
//! are, from a root made here or plugged in from Istio's file names.
//!
//! - `store`: the CA's key material on disk — created once, never lost on restart.
//! - `signer`: turns a checked CSR into an SVID chain.
//! - `bootstrap`: lab-mode credentials that prove a workload's identity.
//! - `service`: Istio's `CreateCertificate` gRPC method.

pub mod bootstrap;
pub mod service;
pub mod signer;
pub mod store;

pub use signer::{CsrRefusal, Signer};
pub use store::{Authority, CaError, Origin};
