//! `isthmus`: the mesh's topologies built for real on one machine.
//!
//! A topology file (`mesh_vocab::topology`) becomes a [`plan`] of namespaces, addresses and
//! routes; [`up`] builds it with [`netns`], writes each cluster's [`manifests`], starts the
//! real controller, gateway, each pod's [`sidecar`] and the [`demo_app`] workloads as
//! [`process`]es, recording all of it in the [`state`] file that
//! [`down`] takes apart. [`probe`]s run from inside the lab's namespaces.

pub mod demo_app;
pub mod down;
pub mod manifests;
pub mod netns;
pub mod plan;
pub mod probe;
pub mod process;
pub mod sidecar;
pub mod state;
pub mod topologies;
pub mod up;
pub mod xfcc;

/// Where `lab up` and `lab down` keep the state when not told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/isthmus/lab";
