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
    /// Run with explicit addresses and certificate files (no capture, no control plane).
    Run(RunArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let Command::Run(args) = Cli::parse().command;
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
