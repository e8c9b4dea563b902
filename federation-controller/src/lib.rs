//! The federation controller: cluster sources → registry → federation → xDS.
//!
//! [`objects`] holds one cluster's Kubernetes objects as read from a source
//! ([`manifests`] for a directory of YAML, [`kube_source`] for an API server,
//! whose updates [`publisher`] turns into snapshots); [`model`] distils them into what
//! federation needs; [`registry`] keeps the last model of every cluster and when
//! it was last heard from; [`federation`] merges them, purely, into the
//! endpoints a proxy on a given network should see, and [`outbound`] into which
//! service each virtual IP stands for in a given cluster; [`xds`] serves both.
//! Istio's traffic config ([`networking`]: VirtualService, DestinationRule,
//! ServiceEntry, validated as Istio does) is merged across clusters by [`routing`],
//! which xDS translates into routes, subset clusters and policies.
//! On the way, [`resolve`] gives gateways known only by host name their
//! addresses. [`writeback`] writes into each cluster the ServiceEntries and ServiceImports
//! of what other clusters export. Beside that flow, [`ca`] issues the workloads' SVIDs.
//! [`security`] reads Istio's AuthorizationPolicy and PeerAuthentication, which
//! [`xds`] turns into each sidecar's inbound listener.

pub mod ca;
pub mod cluster_clients;
pub mod federation;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod networking;
pub mod objects;
pub mod outbound;
pub mod publisher;
pub mod registry;
pub mod remote_secrets;
pub mod resolve;
pub mod routing;
pub mod security;
pub mod trust;
pub mod writeback;
pub mod xds;
