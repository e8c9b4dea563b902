//! The Isthmus proxy library: the pieces every proxy of the mesh is built from.
//!
//! The east-west gateway is built from these same pieces; the sidecar binary adds the
//! workload's identity (`tls`) and mutual TLS on every hop.

pub mod access_log;
pub mod ads;
pub mod app_http;
pub mod authz;
pub mod balance;
pub mod body;
pub mod capture;
pub mod client_hello;
pub mod cluster;
pub mod coalesce;
pub mod destinations;
pub mod drain;
pub mod filter_chain;
pub mod first_read;
pub mod heap;
pub mod http;
pub mod http_endpoint;
pub mod inbound;
pub mod json;
pub mod metered;
pub mod otlp;
pub mod outbound;
pub mod outlier;
pub mod park;
mod pass_writes;
pub mod peer_authentication;
pub mod pool;
pub mod priority;
pub mod rewind;
pub mod route;
pub mod run;
pub mod settle;
pub mod socket;
pub mod splice;
pub mod synthetic;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod virtual_inbound;
pub mod xds;
