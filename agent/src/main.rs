//! `meterd`: the command line. Parses arguments, sets up logging, and calls
//! into the library; no logic of its own.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meterd::{
    agent::{self, RunOptions},
    config::Config,
    kernel::Kernel,
    ledger::{ExportFormat, Ledger},
};

/// Per-connection metering and billing for streaming hosts.
///
/// meterd counts the payload bytes of every connection of the services you
/// configure, in the kernel (eBPF attached to a cgroup v2), and settles each
/// session when its connection closes. Counting goes on while the agent is
/// stopped: a restarted agent bills what happened meanwhile, exactly once.
#[derive(Parser)]
#[command(
    version,
    propagate_version = true,
    after_long_help = "\
Examples:
  meterd check-config /etc/meterd/meterd.toml      validate, print the effective config
  meterd run --config /etc/meterd/meterd.toml      meter (as root or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)
  meterd status                                    open viewing sessions, interval and load of the running agent
  meterd ledger export --format csv --since 24h    viewing sessions settled in the last day
  meterd ledger export --connections               the connections they were made of
  meterd unload                                    detach and remove the pins (stop the agent first)

Attribute a connection to an account (from the streaming server, when it starts serving):
  curl --unix-socket /run/meterd/meterd.sock -H 'content-type: application/json' \\
       -d '{\"client_addr\":\"203.0.113.7\",\"client_port\":51234,\"server_port\":443,\"account\":\"alice\",\"content\":\"movie-42\"}' \\
       http://meterd/v1/attribute

Logs go to stderr; METERD_LOG sets the level (e.g. METERD_LOG=debug, or meterd::settled=warn)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`, shared by the subcommands that read the config file.
#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (TOML); config/meterd.toml in the source tree documents
    /// every setting. Default: /etc/meterd/meterd.toml; for `status`,
    /// `ledger export` and `unload`, when that file does not exist, the
    /// config of the one agent running on this host.
    #[arg(short = 'c', long = "config", env = "METERD_CONFIG")]
    path: Option<PathBuf>,
}

/// The packaged config.
const DEFAULT_CONFIG: &str = "/etc/meterd/meterd.toml";

impl ConfigArg {
    /// The config for `meterd run`.
    fn for_run(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }

    /// The config for a client command: as given, else the packaged one,
    /// else the running agent's.
    fn for_client(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.path {
            return Ok(p.clone());
        }
        if std::path::Path::new(DEFAULT_CONFIG).exists() {
            return Ok(PathBuf::from(DEFAULT_CONFIG));
        }
        let running = meterd::runtime::running();
        match running.as_slice() {
            [one] => Ok(one.config.clone()),
            [] => anyhow::bail!(
                "no --config given, {DEFAULT_CONFIG} does not exist, and no meterd is running: \
                 start one (`cargo xtask run`, or `meterd run --config FILE`) or pass --config FILE"
            ),
            many => anyhow::bail!(
                "no --config given and {} agents are running ({}): pass --config FILE",
                many.len(),
                many.iter()
                    .map(|r| r.config.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the streaming server's cgroup and meter until stopped
    /// (SIGTERM/SIGINT: finish, keep counting in the kernel, exit 0).
    ///
    /// Needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN).
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Append one JSON line per settled session to this file.
        #[arg(long)]
        closed_log: Option<PathBuf>,
        /// Create this file once metering has started (for scripts and tests).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate a config file and print it with every default filled in.
    CheckConfig {
        /// Config file (TOML).
        config: PathBuf,
    },
    /// Show the running agent's open viewing sessions, interval and load.
    ///
    /// Asks GET /v1/status on the agent's API: its unix socket (api.socket),
    /// or api.listen with api.token. The status lists accounts and clients,
    /// so it is not on the metrics port.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Ask this unix socket instead.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the JSON as the API returns it.
        #[arg(long)]
        json: bool,
        /// Refresh every second, in place on a terminal (like top), or one
        /// table per interval when the output is not a terminal. Ctrl-C stops.
        #[arg(long)]
        watch: bool,
        /// Sort sessions by: rate (bytes/s since the last refresh), bytes,
        /// time (watching time), account.
        #[arg(long, value_enum, default_value = "rate")]
        sort: meterd::status::SortBy,
        /// Only sessions of this account.
        #[arg(long)]
        account: Option<String>,
    },
    /// Read the ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// The fleet's records in NATS JetStream (needs `[fleet]` in the config).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Detach meterd from the kernel and remove its pins.
    ///
    /// Counts of connections still open are dropped: settle them first by
    /// stopping the streaming server, or accept the loss.
    Unload {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Write one record per settled viewing session, oldest first, to stdout.
    ///
    /// A viewing session is what is billed: all of a viewer's connections
    /// until it goes idle for the service's session_idle. Fields:
    /// session_id, service, account, content, client_addr, started_at,
    /// ended_at (RFC 3339 UTC), duration_ms (billed watching time),
    /// bytes_out, bytes_in, connections, charge_minor, currency.
    ///
    /// With --connections: one record per ended connection segment (the
    /// part of a connection that fed one session), for audit and disputes:
    /// connection_id, session_id, service, account, content, protocol,
    /// client_addr, client_port, server_addr, server_port, started_at,
    /// ended_at, bytes_out, bytes_in, duration_ms.
    ///
    /// Safe to run next to a running agent.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// Read this ledger file instead of the config's.
        #[arg(long)]
        ledger: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Only sessions settled at or after this time: RFC 3339
        /// ("2026-11-22T10:00:00Z") or an age ("24h", "30m").
        #[arg(long, value_parser = parse_since)]
        since: Option<SystemTime>,
        /// Write connection segments instead of viewing sessions.
        #[arg(long)]
        connections: bool,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Write every host's settled viewing sessions, read from the stream,
    /// each once, to stdout.
    ///
    /// The fields of `meterd ledger export`, then `host`. A record the
    /// stream holds twice (re-published after its duplicate window, or a
    /// replayed ledger) is written once: records are told apart by their
    /// id, not by the stream's deduplication. Ordered by end time, session
    /// id, host.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Only sessions settled at or after this time: RFC 3339 or an age.
        #[arg(long, value_parser = parse_since)]
        since: Option<SystemTime>,
    },
    /// Publish this host's records again, to rebuild a stream from the
    /// ledgers.
    ///
    /// Every record in the outbox is marked unshipped (the
    /// running agent sends them at once), and the next start of the agent
    /// stages every settled session of the ledger again, including those
    /// pruned from the outbox (shipped records are kept 7 days). Consumers
    /// deduplicate by record id, so this never counts twice.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    let age = meterd::config::duration_str::parse(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time nor an age such as 24h"))?;
    SystemTime::now()
        .checked_sub(age)
        .ok_or_else(|| format!("{text:?} is before the epoch"))
}

fn main() -> ExitCode {
    init_logging();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meterd: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: module errors already name their
/// cause in their message, contexts added at the edge do not.
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            config,
            closed_log,
            ready_file,
        } => {
            let config_path = config.for_run();
            let config = Config::load(&config_path)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(agent::run(
                config,
                RunOptions {
                    closed_log,
                    ready_file,
                    config_path: Some(config_path),
                },
                shutdown_signal(),
            ))?;
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            print!("{config}");
        }
        Command::Ledger {
            command:
                LedgerCommand::Export {
                    config,
                    ledger,
                    format,
                    since,
                    connections,
                },
        } => {
            let path = match ledger {
                Some(path) => path,
                None => Config::load(&config.for_client()?)?.billing.ledger,
            };
            if !path.exists() {
                anyhow::bail!(
                    "no ledger at {}: meterd has not run with this config yet, or billing.ledger points elsewhere",
                    path.display()
                );
            }
            let ledger = Ledger::open_read_only(&path)?;
            let mut out = std::io::stdout().lock();
            let n = ledger.export(since, format, connections, &mut out)?;
            let what = if connections {
                "connections"
            } else {
                "sessions"
            };
            eprintln!("meterd: exported {n} {what} from {}", path.display());
        }
        Command::Fleet { command } => fleet(command)?,
        Command::Status {
            config,
            socket,
            json,
            watch,
            sort,
            account,
        } => status(&config, socket, json, watch, sort, account)?,
        Command::Unload { config } => {
            let config = Config::load(&config.for_client()?)?;
            // Refuse while an agent runs on these pins: it would lose its maps.
            let _lock = agent::lock_instance(&config.agent.pin_dir)?;
            let report = Kernel::unload(&config.agent.pin_dir)?;
            println!(
                "meterd: unloaded {}: {} links detached, {} maps removed, {} open connections no longer metered",
                config.agent.pin_dir.display(),
                report.links,
                report.maps,
                report.live_dropped
            );
            if !report.left.is_empty() {
                println!(
                    "meterd: left {} entries meterd did not make in {}: {}",
                    report.left.len(),
                    config.agent.pin_dir.display(),
                    report.left.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `meterd fleet ...`.
fn fleet(command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Export {
            config,
            format,
            since,
        } => {
            let path = config.for_client()?;
            let config = Config::load(&path)?;
            let Some(fleet) = config.fleet else {
                anyhow::bail!(
                    "{} has no [fleet] section: add one with nats_url to read the fleet's stream",
                    path.display()
                );
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let tty = std::io::stderr().is_terminal();
            let sessions = runtime.block_on(meterd::fleet::export::sessions(
                &fleet,
                since,
                &mut |read, total| {
                    if tty && (read % 1000 == 0 || read == total) {
                        eprint!("\rmeterd: read {read} of {total} records");
                    }
                },
            ))?;
            if tty {
                eprintln!();
            }
            let mut out = std::io::stdout().lock();
            let n = meterd::fleet::export::write(&sessions, format, &mut out)?;
            eprintln!("meterd: exported {n} sessions from stream {}", fleet.stream);
        }
        FleetCommand::Replay { config } => {
            let config = Config::load(&config.for_client()?)?;
            if config.fleet.is_none() {
                anyhow::bail!("the config has no [fleet] section: nothing to replay to");
            }
            let mut outbox = meterd::fleet::outbox::Outbox::open(&config.billing.ledger)
                .with_context(|| {
                    format!("opening the ledger {}", config.billing.ledger.display())
                })?;
            let n = outbox.replay_all()?;
            println!(
                "meterd: {n} records wait to be published again; restart the agent to stage every settled session of the ledger too"
            );
        }
    }
    Ok(())
}

/// A GET on loopback; returns the body of a 200 response.
/// `meterd status`.
fn status(
    config: &ConfigArg,
    socket: Option<PathBuf>,
    json: bool,
    watch: bool,
    sort: meterd::status::SortBy,
    account: Option<String>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let target = if let Some(path) = socket {
        ApiTarget::Socket(path)
    } else {
        let config = Config::load(&config.for_client()?)?;
        match config.api.socket_path(&config.agent) {
            Some(path) => ApiTarget::Socket(path),
            None => ApiTarget::Tcp(
                config.api.listen.expect("validated: socket or listen"),
                config.api.token.clone().unwrap_or_default(),
            ),
        }
    };
    let fetch = || -> anyhow::Result<(String, meterd::status::StatusReport)> {
        let body = api_get(&target, "/v1/status").with_context(|| {
            format!("asking the agent at {target} (is `meterd run` running with this config?)")
        })?;
        let report = serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
        Ok((body, report))
    };
    if !watch {
        let (body, report) = fetch()?;
        if json {
            println!("{body}");
        } else {
            let view = meterd::status::View::new(sort, account.clone());
            print!("{}", view.render(&report, None));
        }
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let view = meterd::status::View::new(sort, account);
    let mut previous: Option<(std::time::Instant, meterd::status::StatusReport)> = None;
    loop {
        let (_, report) = fetch()?;
        let now = std::time::Instant::now();
        let text = view.render(&report, previous.as_ref().map(|(t, r)| (now - *t, r)));
        if tty {
            // Home and clear, then the table: refreshed in place.
            print!("\x1b[H\x1b[2J{text}");
        } else {
            println!("{text}");
        }
        std::io::stdout().flush()?;
        previous = Some((now, report));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Where the agent's API listens.
enum ApiTarget {
    Socket(PathBuf),
    Tcp(std::net::SocketAddr, String),
}

impl std::fmt::Display for ApiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "{}", p.display()),
            Self::Tcp(a, _) => write!(f, "{a}"),
        }
    }
}

/// A GET on the API; the body of a 200.
fn api_get(target: &ApiTarget, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let timeout = Some(std::time::Duration::from_secs(10));
    let (mut stream, auth): (Box<dyn ReadWrite>, String) = match target {
        ApiTarget::Socket(p) => {
            let s = std::os::unix::net::UnixStream::connect(p)?;
            s.set_read_timeout(timeout)?;
            (Box::new(s), String::new())
        }
        ApiTarget::Tcp(addr, token) => {
            let s = std::net::TcpStream::connect_timeout(addr, std::time::Duration::from_secs(5))?;
            s.set_read_timeout(timeout)?;
            (Box::new(s), format!("Authorization: Bearer {token}\r\n"))
        }
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: meterd\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        anyhow::bail!("HTTP {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
}

/// Human-readable with colours on a terminal; plain lines without
/// timestamps under systemd (the journal stamps them).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("METERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
