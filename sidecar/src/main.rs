//! `sidecar`: see `--help`.

use clap::{Parser, Subcommand};
use sidecar::run::{RunArgs, Sidecar};
use tokio::signal::unix::{SignalKind, signal};

/// The Isthmus sidecar: mutual TLS on SPIFFE identities on every hop of the mesh.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy: explicit addresses (`--outbound`/`--inbound`), or `--capture` with
    /// routes from the controller's xDS.
    Run(Box<RunArgs>),
    /// Print (or `--apply`) the iptables rules that redirect this network namespace's TCP to
    /// the sidecar, as Istio's `istio-iptables` does.
    Init {
        /// Install the rules (`iptables-restore`) instead of printing them.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        rules: sidecar::capture::Rules,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = match Cli::parse().command {
        Command::Run(args) => *args,
        Command::Init { apply: false, rules } => {
            print!("{}", rules.restore_text());
            return Ok(());
        }
        Command::Init { apply: true, rules } => {
            rules.apply()?;
            eprintln!(
                "capture rules installed: outbound -> {}, inbound -> {}",
                rules.outbound_port, rules.inbound_port
            );
            return Ok(());
        }
    };
    let sidecar = Sidecar::start(args)?;
    let b = sidecar.bound;
    let show = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
    // One line a script or test can read to learn the bound ports.
    println!(
        "ready outbound={} inbound={} metrics={} id={}",
        show(b.outbound),
        show(b.inbound),
        show(b.metrics),
        sidecar.svid.current().id()
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let left = sidecar.drain().await;
        if left > 0 {
            tracing::warn!(cut = left, "drain timeout: closing connections still open");
        }
        anyhow::Ok(())
    })
}
