//! The Isthmus east-west gateway.
//!
//! Accepts mTLS connections on 15443, reads the ClientHello's SNI
//! (`outbound_.<port>_.<subset>_.<host>`), and splices the still-encrypted bytes to
//! an endpoint of that service on this gateway's network (Istio's AUTO_PASSTHROUGH).
//!
//! Data flows one way: [`config`] (a routes file), [`xds`] (routes from the
//! federation controller) and [`settings`] (the command line) → [`routes`] (an immutable table, swapped whole on reload) → [`proxy`]
//! (per connection). [`metrics`] and [`admin`] report on it; [`app`] wires it up.

pub mod admin;
pub mod app;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod settings;
pub mod xds;
