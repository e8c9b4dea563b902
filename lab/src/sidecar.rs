//! Starting a pod's sidecar, the one place that knows the sidecar's command line:
//! `sidecar init --apply` installs the iptables capture in the pod's namespace (outbound to
//! 15001, inbound to 15006, the sidecar's own marked traffic exempt), then
//! `sidecar run --capture …` gets its SVID from the controller's CA with a bootstrap token
//! (`federation-controller ca token`) and its config over xDS. On a loopback lab there is no
//! capture: a server pod's sidecar takes callers on the pod's address (`--inbound`), and a
//! client pod gets one sidecar per [`Route`] (`--outbound`).

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::Context as _;

use crate::loopback::Route;
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

/// How the sidecar takes the pod's traffic.
pub enum Mode<'a> {
    /// iptables capture, routed by original destination over the controller's xDS.
    Capture,
    /// Loopback lab, a server pod: callers on the pod's address and port, handed to the
    /// application at `app`.
    Inbound { app: SocketAddr },
    /// Loopback lab, a client pod: one explicit route.
    Outbound(&'a Route),
}

/// Mints the pod's token and, under capture, installs its capture rules; returns the
/// process name and the `sidecar run` arguments to start it with.
pub fn prepare(ctx: &Context, mode: Mode) -> anyhow::Result<(String, Vec<String>)> {
    let (c, p) = (ctx.cluster, ctx.pod);
    let identity = p.spiffe_id(&c.trust_domain);
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
    if let Mode::Capture = mode {
        netns::exec(&p.host.netns, &sidecar, &["init", "--apply"])?;
    }
    let root = ctx
        .ca_dir
        .parent()
        .map(|d| d.join("root-cert.pem"))
        .expect("a cluster CA lies inside its mesh's directory");
    let protocol = match p.protocol {
        mesh_vocab::topology::Protocol::Http => "http",
        mesh_vocab::topology::Protocol::Tcp => "tcp",
    };
    let (traffic, metrics): (Vec<String>, SocketAddr) = match mode {
        Mode::Capture => (vec!["--capture".into()], SocketAddr::from(([0, 0, 0, 0], METRICS_PORT))),
        Mode::Inbound { app } => (
            vec![
                "--inbound".into(),
                format!("{}={app}", SocketAddr::new(IpAddr::V4(p.host.ip), p.port)),
            ],
            SocketAddr::new(IpAddr::V4(p.host.ip), METRICS_PORT),
        ),
        Mode::Outbound(r) => (
            vec![
                "--outbound".into(),
                format!("{}={}", r.listen, r.target),
                "--sni".into(),
                r.sni(),
                "--peer-id".into(),
                r.peer_id(),
            ],
            r.metrics,
        ),
    };
    let service = match mode {
        Mode::Outbound(r) => format!("{}.{}.svc.cluster.local", r.service, r.namespace),
        _ => format!("{}.{}.svc.cluster.local", p.app, p.namespace),
    };
    let args = [
        "run",
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
        &service,
        "--mtls",
        "STRICT",
        "--metrics",
        &metrics.to_string(),
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
    args.extend(traffic);
    for (k, v) in [("app", p.app.as_str()), ("version", p.version.as_str())] {
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    args.extend(["--locality".into(), format!("{}/{}", c.region, c.zone)]);
    Ok((format!("{} {} sidecar", c.name, p.name), args))
}
