//! Starting a pod's sidecar, the one place that knows the sidecar's command line:
//! `sidecar init --apply` installs the iptables capture in the pod's namespace (outbound to
//! 15001, inbound to 15006, the sidecar's own marked traffic exempt), then
//! `sidecar run --capture …` gets its SVID from the controller's CA with a bootstrap token
//! (`federation-controller ca token`) and its config over xDS.

use std::fs;
use std::path::Path;

use anyhow::Context as _;

use crate::netns;
use crate::plan::{ClusterPlan, METRICS_PORT, PodPlan, SECURE_PORT, XDS_PORT};
use crate::process;

/// The sidecar's outbound capture port; it listens there once it runs.
pub const OUTBOUND_PORT: u16 = 15001;

/// The lab's sidecars' `--connect-timeout`.
pub const CONNECT_TIMEOUT: &str = "1s";

/// What a sidecar needs to know about its pod.
pub struct Context<'a> {
    pub bin_dir: &'a Path,
    pub state_dir: &'a Path,
    /// The CA directory of the controller serving the pod's cluster.
    pub ca_dir: &'a Path,
    pub cluster: &'a ClusterPlan,
    pub pod: &'a PodPlan,
}

/// Mints the pod's token and installs its capture rules; returns the process name and the
/// `sidecar run` arguments to start it with.
pub fn prepare(ctx: &Context) -> anyhow::Result<(String, Vec<String>)> {
    let (c, p) = (ctx.cluster, ctx.pod);
    let identity = format!(
        "spiffe://{}/ns/{}/sa/{}",
        c.trust_domain, p.namespace, p.service_account
    );
    let controller = process::binary(ctx.bin_dir, "federation-controller")?;
    let token = netns::run(
        &controller.display().to_string(),
        &[
            "ca",
            "token",
            "--ca-dir",
            &ctx.ca_dir.display().to_string(),
            "--identity",
            &identity,
        ],
    )?;
    let token_file = ctx
        .state_dir
        .join("tokens")
        .join(format!("{}-{}.token", c.name, p.name));
    fs::create_dir_all(token_file.parent().expect("has a parent"))?;
    fs::write(&token_file, token.trim()).with_context(|| format!("writing {}", token_file.display()))?;
    let sidecar = process::binary(ctx.bin_dir, "sidecar")?.display().to_string();
    netns::exec(&p.host.netns, &sidecar, &["init", "--apply"])?;
    let root = ctx
        .ca_dir
        .parent()
        .map(|d| d.join("root-cert.pem"))
        .expect("a cluster CA lies inside its mesh's directory");
    let protocol = match p.protocol {
        mesh_vocab::topology::Protocol::Http => "http",
        mesh_vocab::topology::Protocol::Tcp => "tcp",
    };
    let args = [
        "run",
        "--capture",
        "--xds",
        &format!("http://{}:{XDS_PORT}", c.xds),
        "--ca-address",
        &format!("https://{}:{SECURE_PORT}", c.xds),
        "--token-file",
        &token_file.display().to_string(),
        "--identity",
        &identity,
        "--ca",
        &root.display().to_string(),
        "--network",
        c.network.as_str(),
        "--cluster",
        c.name.as_str(),
        "--pod-ip",
        &p.host.ip.to_string(),
        "--protocol",
        protocol,
        "--service",
        &format!("{}.{}.svc.cluster.local", p.app, p.namespace),
        "--mtls",
        "STRICT",
        "--metrics",
        &format!("0.0.0.0:{METRICS_PORT}"),
        // A lab choice, for the drills: a connect to a dead endpoint whose packets are
        // dropped costs 1 s before the next endpoint is tried (the sidecar's default is 5 s).
        "--connect-timeout",
        CONNECT_TIMEOUT,
    ]
    .map(String::from)
    .into();
    // What the controller selects policy and routes by (Istio's LABELS and locality), the
    // same labels the pod carries in the cluster's manifests.
    let mut args: Vec<String> = args;
    for (k, v) in [("app", p.app.as_str()), ("version", p.version.as_str())] {
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    args.extend(["--locality".into(), format!("{}/{}", c.region, c.zone)]);
    Ok((format!("{} {} sidecar", c.name, p.name), args))
}
