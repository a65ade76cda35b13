//! The `detour` binary: the node agent (`detour agent`), the controller (`detour
//! controller`), the node-local CLI that asks a running agent what it is doing (`detour
//! services`, `detour endpoints`, `detour explain`, `detour events`), and `detour dns
//! coredns`, which prints the CoreDNS configuration for FailoverService hostnames.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use detour_agent::api::{self, Request, Response};
use detour_agent::cli;

mod runtime;

#[derive(Parser)]
#[command(
    name = "detour",
    version,
    about = "Node-level failover for Kubernetes services, in eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the eBPF programs and keep the maps in step with
    /// the configuration and the health checks.
    Agent(Box<runtime::AgentArgs>),
    /// Run the controller: mirror remote clusters' endpoints into this one, give each
    /// FailoverService its VIP and write its status.
    Controller(detour_agent::controller::ControllerArgs),
    /// Show each service port: VIPs, active tier, healthy endpoints, connects.
    Services {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show endpoints (of one service, or all): active health (HEALTH), passive health
    /// (OUTLIER), locality, tier, in-table, connects, failures and ejections.
    Endpoints {
        service: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Stream ejections, restorations, tier and health changes and failed connects as
    /// they happen, until interrupted.
    Events {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Say, for each endpoint of a service port, why it is or is not in the kernel's
    /// table: its tier and whether that tier is active, active health, ejection, share of
    /// new connects, panic.
    Explain {
        /// The service as `detour services` names it, optionally with its port
        /// (`mydb:80`); the port is needed when the service has several.
        service: String,
        /// The port, instead of `SERVICE:PORT`.
        #[arg(long)]
        port: Option<u16>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show the DNS names endpoints are given by (`resolution: DNS`): what each resolved
    /// to, its state, when it is asked again, and the last error.
    Names {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Probe what this node's kernel offers detour (needs root): the version against
    /// the minimum, each BPF piece, socket destruction, linear SYN timeouts, and what
    /// the agent would refuse or turn off here. Exits 1 where the agent would refuse.
    Kernel {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print DNS server configuration that resolves FailoverService hostnames.
    Dns {
        #[command(subcommand)]
        server: DnsServer,
    },
}

#[derive(Subcommand)]
enum DnsServer {
    /// The CoreDNS Corefile snippet that makes each FailoverService's `spec.hostname`
    /// resolve to its virtual IP (paste it into the `coredns` ConfigMap).
    Coredns(detour_agent::dns::CorednsArgs),
}

/// `SERVICE` or `SERVICE:PORT`; service names never contain `:`.
fn service_and_port(arg: &str, port: Option<u16>) -> anyhow::Result<(String, Option<u16>)> {
    match arg.rsplit_once(':') {
        None => Ok((arg.to_owned(), port)),
        Some((service, number)) => {
            let number: u16 = number
                .parse()
                .map_err(|_| anyhow::anyhow!("{arg:?}: {number:?} is not a port number"))?;
            if let Some(other) = port.filter(|&p| p != number) {
                anyhow::bail!("{arg:?} and --port {other} name different ports");
            }
            Ok((service.to_owned(), Some(number)))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detour: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => runtime::run(*args).await,
            Command::Controller(args) => Ok(detour_agent::controller::run(args).await?),
            Command::Services { output, socket } => query(&socket, Request::Services, output).await,
            Command::Endpoints {
                service,
                output,
                socket,
            } => query(&socket, Request::Endpoints { service }, output).await,
            Command::Events { output, socket } => events(&socket, output).await,
            Command::Names { output, socket } => query(&socket, Request::Names, output).await,
            Command::Explain {
                service,
                port,
                output,
                socket,
            } => {
                let (service, port) = service_and_port(&service, port)?;
                query(&socket, Request::Explain { service, port }, output).await
            }
            Command::Kernel { output } => {
                let kernel = detour_agent::dataplane::features::probe();
                match output {
                    Output::Table => print!("{}", cli::kernel_table(&kernel)),
                    Output::Json => println!("{}", serde_json::to_string_pretty(&kernel)?),
                }
                let verdict = detour_agent::dataplane::features::verdict(&kernel);
                anyhow::ensure!(
                    verdict.refusals.is_empty(),
                    "the agent would refuse to run here: {verdict}"
                );
                Ok(())
            }
            Command::Dns {
                server: DnsServer::Coredns(args),
            } => {
                let snippet = detour_agent::dns::coredns(&args).await?;
                for warning in &snippet.warnings {
                    eprintln!("detour: {warning}");
                }
                print!("{}", snippet.text);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("detour: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn query(socket: &std::path::Path, request: Request, output: Output) -> anyhow::Result<()> {
    let response = api::call(socket, &request).await?;
    let text = match (&response, output) {
        (Response::Error(e), _) => anyhow::bail!("{e}"),
        (Response::Services(s), Output::Json) => serde_json::to_string_pretty(s)? + "\n",
        (Response::Endpoints(e), Output::Json) => serde_json::to_string_pretty(e)? + "\n",
        (Response::Services(s), Output::Table) => cli::services_table(s),
        (Response::Endpoints(e), Output::Table) => cli::endpoints_table(e),
        (Response::Explain(x), Output::Json) => serde_json::to_string_pretty(x)? + "\n",
        (Response::Explain(x), Output::Table) => cli::explain_table(x),
        (Response::Names(n), Output::Json) => serde_json::to_string_pretty(n)? + "\n",
        (Response::Names(n), Output::Table) => cli::names_table(n),
        (Response::Event(_), _) => anyhow::bail!("the agent answered with an event"),
    };
    print!("{text}");
    Ok(())
}

async fn events(socket: &std::path::Path, output: Output) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout();
    api::stream_events(socket, |event| {
        let line = match output {
            Output::Json => serde_json::to_string(&event).map_err(std::io::Error::other)? + "\n",
            Output::Table => cli::event_line(&event),
        };
        // Flushed per line: the point of a stream is to see each event as it happens.
        stdout.write_all(line.as_bytes())?;
        stdout.flush()
    })
    .await?;
    Ok(())
}
