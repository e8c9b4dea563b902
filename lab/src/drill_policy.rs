//! The Istio config a transit drill runs under: the client's requests spread over the
//! clusters of the *other* networks (so that cutting or slowing one network's transit leg
//! hurts, and failing over means crossing to the remaining one), each attempt bounded and
//! retried on another endpoint. Written as a user would write it — a DestinationRule with
//! `localityLbSetting.distribute` from the client's locality to the remote ones (Istio
//! balances by locality only with outlier detection on) and a VirtualService with
//! `retries` — applied with `lab apply` for the drill and deleted after it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_vocab::topology::WorkloadRole;

use crate::apply;
use crate::load;
use crate::netns;
use crate::plan::{ClusterPlan, Plan};
use crate::running::Running;

/// The applied policy; [`DrillPolicy::remove`] deletes it (drop does too, quietly, when a
/// drill fails halfway).
pub struct DrillPolicy {
    state_dir: PathBuf,
    file: PathBuf,
    removed: bool,
}

/// The DestinationRule and VirtualService, named `isthmus-drill-<service>`.
pub fn yaml(plan: &Plan, from: &ClusterPlan, service: &str, per_try: Duration) -> anyhow::Result<String> {
    let svc = from
        .services
        .iter()
        .find(|s| s.name == service)
        .with_context(|| format!("no service `{service}` in {}", from.name))?;
    let remote: Vec<&ClusterPlan> = plan
        .clusters
        .iter()
        .filter(|c| c.network != from.network && c.gateway.is_some())
        .filter(|c| {
            c.pods
                .iter()
                .any(|p| p.app == service && p.role == WorkloadRole::Server)
        })
        .collect();
    if remote.len() < 2 {
        bail!(
            "a transit drill from {} needs {service} in at least two clusters of other networks behind gateways (to fail over between); {} has {}",
            from.name,
            plan.topology.name,
            remote.len()
        );
    }
    let mut targets: Vec<String> = Vec::new();
    for c in &remote {
        if c.region == from.region && c.zone == from.zone {
            bail!(
                "{} shares {}'s locality {}/{}: the drill spreads traffic by locality, and could not leave {} out",
                c.name,
                from.name,
                from.region,
                from.zone,
                from.name
            );
        }
        let t = format!("{}/{}/*", c.region, c.zone);
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    // Istio wants the shares to add up to 100.
    let n = targets.len() as u32;
    let to: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| format!("\"{t}\": {}", 100 / n + u32::from((i as u32) < 100 % n)))
        .collect();
    let host = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
    let name = format!("isthmus-drill-{service}");
    Ok(format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {ns}}}
spec:
  host: {host}
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: \"{region}/*\"
          to: {{{to}}}
    outlierDetection: {{consecutiveGatewayErrors: 1, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 50}}
    # Envoy's default allows 3 retries in flight per cluster, and a slow network keeps more
    # than that waiting out their per-try timeouts (istiod lifts the default; say it here).
    connectionPool: {{http: {{maxRetries: 1000}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{host}]
  http:
  - route:
    - destination: {{host: {host}}}
    retries: {{attempts: 3, perTryTimeout: {per_try}ms, retryOn: \"connect-failure,refused-stream,reset,gateway-error,5xx\"}}
",
        ns = svc.namespace,
        region = from.region,
        to = to.join(", "),
        per_try = per_try.as_millis().max(1),
    ))
}

impl DrillPolicy {
    /// Applies the policy to every primary cluster and waits until the controllers serve it.
    pub fn apply(
        lab: &Running,
        from: &ClusterPlan,
        service: &str,
        per_try: Duration,
        out: &mut dyn Write,
    ) -> anyhow::Result<DrillPolicy> {
        let text = yaml(&lab.plan, from, service, per_try)?;
        let file = lab.state.dir().join(format!("drill-policy-{service}.yaml"));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        let policy = DrillPolicy {
            state_dir: lab.state.dir().to_owned(),
            file,
            removed: false,
        };
        writeln!(
            out,
            "  the drill's policy ({}): {service} spread over the other networks, retried on another endpoint",
            policy.file.display()
        )?;
        policy.run(false, out)?;
        Ok(policy)
    }

    /// Deletes what [`DrillPolicy::apply`] applied.
    pub fn remove(mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        self.removed = true;
        self.run(true, out)?;
        let _ = std::fs::remove_file(&self.file);
        Ok(())
    }

    /// `lab apply` (or `lab delete`) of the policy's file.
    fn run(&self, delete: bool, out: &mut dyn Write) -> anyhow::Result<()> {
        apply::run(
            &self.state_dir,
            std::slice::from_ref(&self.file),
            &[],
            delete,
            &mut Indented(out, true),
        )
    }
}

impl Drop for DrillPolicy {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.run(true, &mut std::io::sink());
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// (The writer, whether the next byte starts a line.)
struct Indented<'a>(&'a mut dyn Write, bool);

impl Write for Indented<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for piece in buf.split_inclusive(|b| *b == b'\n') {
            if self.1 {
                self.0.write_all(b"    ")?;
            }
            self.0.write_all(piece)?;
            self.1 = piece.ends_with(b"\n");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Waits until the client's requests no longer land in its own cluster: the last 20 in a
/// row answered elsewhere (at most 15 s, 300 requests).
pub fn await_remote(from: &ClusterPlan, ns: &str, addr: SocketAddr, out: &mut dyn Write) -> anyhow::Result<()> {
    let own = from.name.to_string();
    let ns = ns.to_owned();
    let (ok, sent, last) = netns::within(&ns, move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut in_a_row, mut sent, mut last) = (0, 0, String::new());
        while in_a_row < 20 && sent < 300 && Instant::now() < deadline {
            let s = load::request(addr, Duration::from_secs(2), 1);
            sent += 1;
            match s.landing() {
                Some(l) if l.cluster != own => in_a_row += 1,
                Some(l) => {
                    in_a_row = 0;
                    last = format!("answered by {} {}", l.cluster, l.version);
                }
                None => {
                    in_a_row = 0;
                    last = format!("{:?}", s.outcome);
                }
            }
        }
        (in_a_row >= 20, sent, last)
    })?;
    if !ok {
        bail!(
            "{}'s requests still do not all cross to other networks after {sent} ({last}): the drill's policy did not reach its sidecar",
            from.name
        );
    }
    writeln!(
        out,
        "  {}'s requests cross to the other networks ({sent} probes)",
        from.name
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topologies;
    use federation_controller::objects::ClusterObjects;

    #[test]
    fn the_policy_sends_cluster1_to_the_other_networks_and_the_controller_accepts_it() {
        let plan = Plan::new(&topologies::default_topology(), "isl").unwrap();
        let text = yaml(&plan, plan.cluster(1), "reviews", Duration::from_millis(150)).unwrap();
        assert!(
            text.contains("from: \"us-east/*\"")
                && text.contains("to: {\"us-west/us-west-1a/*\": 50, \"eu-west/eu-west-1a/*\": 50}"),
            "{text}"
        );
        assert!(text.contains("perTryTimeout: 150ms"), "{text}");
        let mut read = ClusterObjects::default();
        let skipped = read.add_yaml(std::path::Path::new("policy.yaml"), &text).unwrap();
        assert!(
            read.refused.is_empty() && skipped.is_empty(),
            "{:?} {skipped:?}",
            read.refused
        );
        assert_eq!((read.destination_rules.len(), read.virtual_services.len()), (1, 1));
        // On one flat network there is no other network to fail over to.
        let flat = Plan::new(&topologies::by_name("multi-primary").unwrap(), "isl").unwrap();
        let e = yaml(&flat, flat.cluster(1), "reviews", Duration::from_millis(150)).unwrap_err();
        assert!(e.to_string().contains("at least two clusters of other networks"), "{e}");
    }
}
