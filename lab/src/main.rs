//! The `isthmus` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lab::plan::Plan;
use std::time::Duration;

use lab::{apply, demo_app, down, drill, impair, status, topologies, traffic, up};

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
    /// Failure drills on a running lab
    Drill {
        #[command(subcommand)]
        command: DrillCommand,
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
        /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
        #[arg(long, default_value_os_t = lab::default_state_dir(), hide_default_value = true)]
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
        /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
        #[arg(long, default_value_os_t = lab::default_state_dir(), hide_default_value = true)]
        state_dir: PathBuf,
    },
    /// Drives requests from a client pod, through its sidecar, to a service's ClusterIP, and
    /// shows where they landed, their latency and failures
    Traffic {
        /// The client's cluster [default: the first]
        #[arg(long)]
        from: Option<String>,
        /// The service
        #[arg(long, default_value = "reviews")]
        to: String,
        /// How many requests
        #[arg(short = 'n', default_value_t = 100)]
        requests: usize,
        /// How many at a time
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Per request
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        /// For the whole run: what is not sent by then is not sent
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        deadline: Duration,
        /// One JSON object instead of the table
        #[arg(long)]
        json: bool,
        /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
        #[arg(long, default_value_os_t = lab::default_state_dir(), hide_default_value = true)]
        state_dir: PathBuf,
    },
    /// Adds or updates objects (Istio config, Services, …) in the lab's clusters, as
    /// `kubectl apply -f` does, and waits until the controllers serve them
    Apply(ObjectsArgs),
    /// Removes the objects of a file that `lab apply` added
    Delete(ObjectsArgs),
    /// Delay, jitter or loss on a cluster's transit leg, toward its east-west gateway (tc
    /// netem where the kernel has it, else the lab's userspace WAN emulator)
    Impair {
        /// The cluster whose gateway's leg suffers
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        delay: Duration,
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        jitter: Duration,
        /// The share of frames lost, e.g. 1% (100%: the leg is cut)
        #[arg(long, default_value = "0%", value_parser = impair::parse_loss)]
        loss: f64,
        /// Take the impairment off instead
        #[arg(long, conflicts_with_all = ["delay", "jitter", "loss"])]
        clear: bool,
        /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
        #[arg(long, default_value_os_t = lab::default_state_dir(), hide_default_value = true)]
        state_dir: PathBuf,
    },
    /// The WAN emulator itself, as `lab impair` and the drills start it in the transit
    /// namespace: relays frames between two links, those toward the gateway impaired
    #[command(hide = true)]
    WanRelay(impair::RelayArgs),
    /// Clusters, controllers and their sync state, gateways, endpoints, sidecars' SVIDs
    Status {
        /// One JSON object instead of the tables
        #[arg(long)]
        json: bool,
        /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
        #[arg(long, default_value_os_t = lab::default_state_dir(), hide_default_value = true)]
        state_dir: PathBuf,
    },
}

/// The objects `lab apply` and `lab delete` work on.
#[derive(clap::Args)]
struct ObjectsArgs {
    /// A multi-document YAML file, `-` for standard input (repeatable)
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// The cluster to work in (repeatable) [default: every primary cluster]
    #[arg(long)]
    cluster: Vec<String>,
    /// [default: /run/isthmus/lab as root, else $TMPDIR/isthmus-lab-UID]
    #[arg(long, default_value_os_t = lab::default_state_dir(), hide_default_value = true)]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum DrillCommand {
    /// Injects a failure under load, heals it, and measures detection, reroute and recovery
    Failover(drill::DrillArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    drill::parse_duration(s)
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
        Command::Lab {
            command:
                LabCommand::Traffic {
                    from,
                    to,
                    requests,
                    concurrency,
                    timeout,
                    deadline,
                    json,
                    state_dir,
                },
        } => {
            let opts = traffic::TrafficOptions {
                from,
                to,
                requests,
                concurrency,
                timeout,
                deadline,
            };
            traffic::run(&state_dir, &opts).and_then(|r| {
                let mut out = std::io::stdout();
                if json {
                    serde_json::to_writer_pretty(&mut out, &r)?;
                    println!();
                } else {
                    traffic::print(&r, &mut out)?;
                }
                if r.failed > 0 {
                    anyhow::bail!("{} of {} requests failed", r.failed, r.sent);
                }
                Ok(())
            })
        }
        Command::Lab {
            command: LabCommand::Apply(a),
        } => apply::run(&a.state_dir, &a.files, &a.cluster, false, &mut std::io::stdout()),
        Command::Lab {
            command: LabCommand::Delete(a),
        } => apply::run(&a.state_dir, &a.files, &a.cluster, true, &mut std::io::stdout()),
        Command::Lab {
            command: LabCommand::Status { json, state_dir },
        } => status::status(&state_dir).and_then(|s| {
            let mut out = std::io::stdout();
            if json {
                serde_json::to_writer_pretty(&mut out, &s)?;
                println!();
            } else {
                status::print(&s, &mut out)?;
            }
            Ok(())
        }),
        Command::Lab {
            command:
                LabCommand::Impair {
                    cluster,
                    delay,
                    jitter,
                    loss,
                    clear,
                    state_dir,
                },
        } => impair::on_lab(
            &state_dir,
            &cluster,
            (!clear).then_some(impair::Impairment { delay, jitter, loss }),
            &mut std::io::stdout(),
        ),
        Command::Lab {
            command: LabCommand::WanRelay(args),
        } => impair::relay(&args),
        Command::Drill {
            command: DrillCommand::Failover(args),
        } => match drill::failover(&args, &mut std::io::stdout(), &mut std::io::stderr()) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(2),
            Err(e) => Err(e),
        },
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
    let topology_arg = topology.clone();
    let topology = topologies::resolve(topology.as_deref())?;
    let source = topologies::source_of(topology_arg.as_deref());
    // Without root there are no namespaces to build: the same clusters on loopback.
    let plan = if up::is_root() {
        Plan::new(&topology, &prefix)?
    } else {
        Plan::loopback(&topology, &prefix)?
    };
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
        source,
    };
    up::up(&opts, &mut std::io::stdout())
}
