//! `eastwest-gateway`: see `--help`.

use clap::Parser;
use eastwest_gateway::app::Gateway;
use eastwest_gateway::settings::{Args, Settings};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let env_workers = std::env::var("TOKIO_WORKER_THREADS").ok();
    let settings = Settings::from_args(Args::parse(), env_workers.as_deref()).map_err(anyhow::Error::msg)?;
    let gateway = Gateway::start(settings)?;
    let b = gateway.bound;
    // One line a script or test can read to learn the bound ports.
    println!(
        "ready listen={} health={} metrics={} admin={}",
        b.listen, b.health, b.metrics, b.admin
    );
    tracing::info!(listen = %b.listen, "east-west gateway serving");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the routes file");
                    gateway.reload();
                }
            }
        }
        tracing::info!(open = gateway.open_connections(), "draining: no new connections");
        let left = gateway.drain().await;
        if left > 0 {
            tracing::warn!(cut = left, "drain timeout: closing connections still open");
        } else {
            tracing::info!("drained");
        }
        anyhow::Ok(())
    })
}
