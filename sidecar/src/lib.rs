//! The Isthmus proxy library: the pieces every proxy of the mesh is built from.
//!
//! The east-west gateway is built from these same pieces; the sidecar binary
//! (outbound/inbound capture, mTLS) arrives with the identity issue.

pub mod balance;
pub mod client_hello;
pub mod drain;
pub mod http_endpoint;
pub mod outlier;
pub mod splice;
