//! A lab that is up: its state file and the plan it was built from, for the commands that
//! work on a running lab (`lab traffic`, `lab status`, `drill failover`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, bail};

use crate::plan::{ClusterPlan, Plan, PodPlan, ServicePlan};
use crate::state::{ProcessRecord, StateFile};
use crate::topologies;

/// A running lab.
#[derive(Debug)]
pub struct Running {
    pub state: StateFile,
    pub plan: Plan,
}

impl Running {
    /// The lab recorded in `dir`; fails when there is none or it is not completely up.
    pub fn open(dir: &Path) -> anyhow::Result<Running> {
        let Some(state) = StateFile::open(dir)? else {
            bail!(
                "no lab recorded in {} (`isthmus lab up` first, or pass --state-dir)",
                dir.display()
            );
        };
        if !state.state.complete {
            bail!(
                "the lab in {} is not completely up (`lab up` failed or still runs)",
                dir.display()
            );
        }
        let source = (!state.state.source.is_empty()).then_some(state.state.source.as_str());
        let topology = topologies::resolve(source).context("the lab's topology")?;
        if topology.name != state.state.topology {
            bail!(
                "the lab's topology `{}` now reads as `{}`: the file changed since `lab up`",
                state.state.topology,
                topology.name
            );
        }
        let plan = if state.state.loopback {
            Plan::loopback(&topology, &state.state.prefix)?
        } else {
            Plan::new(&topology, &state.state.prefix)?
        };
        Ok(Running { state, plan })
    }

    /// The cluster named `name`, or an error naming the ones there are.
    pub fn cluster(&self, name: &str) -> anyhow::Result<&ClusterPlan> {
        self.plan.cluster_named(name).ok_or_else(|| {
            anyhow::anyhow!(
                "no cluster `{name}` in lab `{}` (clusters: {})",
                self.plan.topology.name,
                self.plan
                    .clusters
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The latest record of the process named `name` (a restarted process has a newer one).
    pub fn process(&self, name: &str) -> Option<&ProcessRecord> {
        self.state.state.processes.iter().rev().find(|p| p.name == name)
    }
}

/// A client pod of `cluster` and the address of `service` there (its ClusterIP).
pub fn client_and_service<'a>(
    cluster: &'a ClusterPlan,
    service: &str,
) -> anyhow::Result<(&'a PodPlan, &'a ServicePlan, SocketAddr)> {
    let client = cluster
        .pods
        .iter()
        .find(|p| p.role == mesh_vocab::topology::WorkloadRole::Client)
        .ok_or_else(|| anyhow::anyhow!("cluster {} has no client pod", cluster.name))?;
    let svc = cluster.services.iter().find(|s| s.name == service).ok_or_else(|| {
        anyhow::anyhow!(
            "no service `{service}` in {} (services: {})",
            cluster.name,
            cluster
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok((client, svc, SocketAddr::new(IpAddr::V4(svc.vip), svc.port)))
}
