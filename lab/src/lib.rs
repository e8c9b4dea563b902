//! `isthmus`: the mesh's topologies built for real on one machine.
//!
//! A topology file (`mesh_vocab::topology`) becomes a [`plan`] of namespaces, addresses and
//! routes; [`up`] builds it with [`netns`], writes each cluster's [`manifests`], starts the
//! real controller, gateway, each pod's [`sidecar`] and the [`demo_app`] workloads as
//! [`process`]es, recording all of it in the [`state`] file that
//! [`down`] takes apart. [`probe`]s run from inside the lab's namespaces. Without root the
//! same plan runs on [`loopback`] addresses, unseparated, each client's routes explicit.
//!
//! On a [`running`] lab: [`apply`] adds and removes objects (Istio config) as `kubectl` would,
//! [`traffic`] drives requests from a client pod ([`load`]),
//! [`status`] asks every part how it is, and [`drill`] injects a failure under load and
//! measures what it cost, with an HTML [`report`]; the transit scenarios run under a
//! [`drill_policy`] and [`impair`] the transit link (netem, or the lab's WAN emulator).

pub mod apply;
pub mod demo_app;
pub mod down;
pub mod drill;
pub mod drill_policy;
pub mod impair;
pub mod load;
pub mod loopback;
pub mod manifests;
pub mod netns;
pub mod plan;
pub mod probe;
pub mod process;
pub mod report;
pub mod running;
pub mod sidecar;
pub mod state;
pub mod status;
pub mod topologies;
pub mod traffic;
pub mod up;
pub mod xfcc;

/// Where `lab up` and `lab down` keep the state when not told otherwise, as root.
pub const DEFAULT_STATE_DIR: &str = "/run/isthmus/lab";

/// Where the lab's state is kept when not told otherwise: [`DEFAULT_STATE_DIR`] as root,
/// else `$TMPDIR/isthmus-lab-<uid>` (a loopback lab).
pub fn default_state_dir() -> std::path::PathBuf {
    if up::is_root() {
        DEFAULT_STATE_DIR.into()
    } else {
        // SAFETY: getuid(2) has no preconditions and cannot fail.
        std::env::temp_dir().join(format!("isthmus-lab-{}", unsafe { libc::getuid() }))
    }
}
