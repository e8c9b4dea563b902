//! The `isthmus` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lab::plan::Plan;
use lab::{DEFAULT_STATE_DIR, demo_app, down, topologies, up};

#[derive(Parser)]
#[command(
    name = "isthmus",
    about = "Isthmus: multi-cluster service mesh federation, and its lab",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The lab: a topology's clusters built from network namespaces on this machine
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// The demo workload: answers every HTTP request with its cluster, version and caller
    DemoApp {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        version: String,
        /// Where to listen (port 0 picks one; the bound address is printed)
        #[arg(long, default_value = "0.0.0.0:9080")]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Builds a topology: namespaces, bridges, routes, controllers, gateways and workloads
    Up {
        /// A built-in topology (single-primary, primary-remote, multi-primary,
        /// multi-primary-gateways) or a topology file [default: multi-primary-gateways]
        topology: Option<String>,
        /// Where the record of what was made is kept
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Prefix of every namespace the lab makes
        #[arg(long, default_value = "isl")]
        prefix: String,
        /// Where federation-controller, eastwest-gateway and sidecar are [default: beside this executable]
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Pods without sidecars: plaintext straight to the pods, only the network plumbing
        /// (flat networks reach each other; separate networks do not, there is no mTLS to cross
        /// a gateway with)
        #[arg(long)]
        no_sidecars: bool,
    },
    /// Removes every namespace, link and process the lab made, from its state file
    Down {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::DemoApp {
            cluster,
            version,
            listen,
        } => demo_app::run(listen, demo_app::Identity { cluster, version }),
        Command::Lab {
            command:
                LabCommand::Up {
                    topology,
                    state_dir,
                    prefix,
                    bin_dir,
                    no_sidecars,
                },
        } => lab_up(topology, state_dir, prefix, bin_dir, !no_sidecars),
        Command::Lab {
            command: LabCommand::Down { state_dir },
        } => down::down(&state_dir, &mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn lab_up(
    topology: Option<String>,
    state_dir: PathBuf,
    prefix: String,
    bin_dir: Option<PathBuf>,
    sidecars: bool,
) -> anyhow::Result<()> {
    let topology = topologies::resolve(topology.as_deref())?;
    let plan = Plan::new(&topology, &prefix)?;
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let opts = up::UpOptions {
        plan,
        state_dir,
        bin_dir,
        sidecars,
    };
    up::up(&opts, &mut std::io::stdout())
}
