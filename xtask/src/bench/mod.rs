//! `cargo xtask bench`: meterd's benchmark suite.
//!
//! Measures what the table asks for, each against a baseline taken
//! in the same run: data-path overhead and BPF CPU per GB (`datapath`), the
//! full read of the live map (`mapread`), cycle cost against `ss -tin`,
//! agent CPU and memory with many open connections (`connections`), the
//! governor under overload (`overload`), its timeline during a load ramp
//! (`governor`), admission latency (`authorize`) and the fleet outbox's
//! throughput to NATS JetStream (`outbox`), the billing cycle, agent CPU,
//! charge rows and fsyncs with every session streaming (`active`), the
//! ledger's bytes per viewer (`ledger`), and the governor when billing
//! itself overloads the agent (`billing-overload`). Writes `results.json`,
//! `results.md` and SVG plots to `target/bench/`, and prints progress as it
//! goes.
//!
//! Performance is measured here only, never in tests. Every bench uses real
//! processes on loopback: iperf3, stress-ng and `ss` from Debian, and this
//! binary's hidden `bench-helper` subcommands to hold connections open.
//! This module parses options, builds, orders the benches and writes the
//! results; the measurements live in the submodules.

// Statistics over sample counts, byte totals and nanoseconds: all far below
// 2^52, where f64 is exact, and never negative when cast back.
#![expect(
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    reason = "benchmark statistics: counts and totals far below 2^52"
)]

mod active;
mod agent;
mod authorize;
mod billing_overload;
mod datapath;
mod fleet;
mod governor;
mod host;
mod mapread;
mod outbox;
mod plot;
mod report;
mod scale;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use serde_json::json;

pub use self::fleet::{Helper, helper};
use self::report::Results;
use crate::setup::{self, Scope};
use crate::{ebpf, util};

/// The benches, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Bench {
    /// Full read of the live map: batch lookup vs per-key iteration.
    Mapread,
    /// Loopback throughput with meterd's programs attached vs not; BPF CPU per GB.
    Datapath,
    /// 1k..100k open connections: cycle cost vs `ss -tin`, agent CPU and memory.
    Connections,
    /// All cores saturated: cycles until overruns stop.
    Overload,
    /// Timeline of load, interval and cycle time during a load ramp.
    Governor,
    /// `/v1/authorize` latency at 1k requests/s with 10k live sessions.
    Authorize,
    /// Fleet outbox throughput to NATS JetStream (R1 and R3).
    Outbox,
    /// 1k..100k sessions streaming 16 kbit/s each: cycle, CPU, charge rows, fsyncs.
    Active,
    /// Ledger bytes per viewer-hour (10k streaming) and per settled session.
    Ledger,
    /// Streaming sessions raised until billing alone widens the 1 s interval; billed total.
    BillingOverload,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Self::Mapread => "mapread",
            Self::Datapath => "datapath",
            Self::Connections => "connections",
            Self::Overload => "overload",
            Self::Governor => "governor",
            Self::Authorize => "authorize",
            Self::Outbox => "outbox",
            Self::Active => "active",
            Self::Ledger => "ledger",
            Self::BillingOverload => "billing-overload",
        }
    }

    fn run(self, ctx: &mut Ctx) -> Result<()> {
        match self {
            Self::Mapread => mapread::run(ctx),
            Self::Datapath => datapath::run(ctx),
            Self::Connections => scale::run(ctx),
            Self::Overload => governor::overload(ctx),
            Self::Governor => governor::timeline(ctx),
            Self::Authorize => authorize::run(ctx),
            Self::Outbox => outbox::run(ctx),
            Self::Active => active::active(ctx),
            Self::Ledger => active::ledger(ctx),
            Self::BillingOverload => billing_overload::run(ctx),
        }
    }
}

/// Options of `cargo xtask bench`.
pub struct Options {
    /// Benches to run; empty = all.
    pub only: Vec<Bench>,
    /// Smoke run: fewer, shorter samples and smaller sizes.
    pub quick: bool,
    /// Results directory [default: `<target>/bench`].
    pub out: Option<PathBuf>,
    /// Viewer counts for `active`; empty = its defaults.
    pub sizes: Vec<usize>,
    /// Judged data-path pairs; `None` = its default.
    pub pairs: Option<u32>,
    /// Data path: default-idle pairs beside the judged ones.
    pub default_idle: bool,
}

/// What the benches share.
pub struct Ctx {
    pub quick: bool,
    /// Viewer counts for `active`; empty = its defaults.
    pub sizes: Vec<usize>,
    /// Judged data-path pairs; `None` = its default.
    pub pairs: Option<u32>,
    /// Data path: default-idle pairs beside the judged ones.
    pub default_idle: bool,
    /// The release agent binary.
    pub meterd: PathBuf,
    /// The `mapread` bench binary, when a selected bench needs it.
    pub mapread: Option<PathBuf>,
    /// Configs, ledgers and agent logs of the runs.
    pub work: PathBuf,
    /// Where results and plots go.
    pub out: PathBuf,
    /// `<cgroup2>/meterd-bench`: every bench cgroup lives below it.
    pub cgroups: PathBuf,
    pub results: Results,
    /// Open connections with an agent metering them, shared by the
    /// connections, overload and governor benches (set up once: opening
    /// 100k connections takes a while).
    pub population: Option<scale::Population>,
}

static START: OnceLock<Instant> = OnceLock::new();

/// Prints one progress line, with the time since the bench started.
pub fn progress(msg: impl std::fmt::Display) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    println!("bench [{:02}:{:02}] {msg}", t / 60, t % 60);
    let _ = std::io::stdout().flush();
}

/// How long the selected benches take, for the start-up note.
fn estimate(opts: &Options, benches: &[Bench]) -> String {
    match (opts.quick, benches.contains(&Bench::Datapath)) {
        (true, _) => "2 minutes".to_owned(),
        (false, false) => "12 minutes plus building".to_owned(),
        (false, true) => format!(
            "{} minutes for datapath{}, plus building",
            datapath::minutes(opts.pairs, opts.default_idle),
            if benches.len() > 1 {
                ", 12 for the rest"
            } else {
                ""
            }
        ),
    }
}

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!(
            "the benchmarks load eBPF programs, create cgroups, raise sysctls and open 100k \
             sockets, which needs root: run `cargo xtask bench` as root (in a root shell, or \
             `sudo -E env \"PATH=$PATH\" cargo xtask bench`)"
        );
    }
    START.get_or_init(Instant::now);
    let _lock = host::RunLock::take(Path::new("/run/meterd-bench.lock"))?;
    let mut benches: Vec<Bench> = if opts.only.is_empty() {
        Bench::value_variants().to_vec()
    } else {
        opts.only.clone()
    };
    benches.sort_unstable();
    benches.dedup();
    let names: Vec<&str> = benches.iter().map(|b| b.name()).collect();
    util::note(format!(
        "benchmarks: {} ({} mode, about {})",
        names.join(", "),
        if opts.quick { "quick" } else { "full" },
        estimate(opts, &benches)
    ));

    let mapread = build(&benches)?;

    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| util::target_dir().join("bench"));
    let work = out.join("work");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let cgroups = host::cgroup2_root()?.join("meterd-bench");
    host::remove_cgroup(&cgroups);
    fs::create_dir_all(&cgroups).with_context(|| format!("creating {}", cgroups.display()))?;

    let mut ctx = Ctx {
        quick: opts.quick,
        sizes: opts.sizes.clone(),
        pairs: opts.pairs,
        default_idle: opts.default_idle || opts.quick,
        meterd: util::target_dir().join("release/meterd"),
        mapread,
        work,
        out: out.clone(),
        cgroups: cgroups.clone(),
        results: Results {
            command: command_line(),
            started_at: now_utc(),
            git: git_describe(),
            host: host_info(),
            quick: opts.quick,
            benches: names.iter().map(|&n| n.to_owned()).collect(),
            ..Results::default()
        },
        population: None,
    };
    agent::unload_leftover(&ctx.meterd, &ctx.work)?;
    let started = Instant::now();
    for bench in &benches {
        progress(format!("== {} ==", bench.name()));
        let t = Instant::now();
        let result = bench.run(&mut ctx);
        match result {
            Ok(()) => progress(format!(
                "{} done in {:.0} s",
                bench.name(),
                t.elapsed().as_secs_f64()
            )),
            Err(e) => {
                progress(format!("{} FAILED: {e:#}", bench.name()));
                ctx.results.errors.push(format!("{}: {e:#}", bench.name()));
            }
        }
    }
    if let Some(population) = ctx.population.take() {
        progress("stopping the connections' agent and closing the connections");
        population.stop()?;
    }
    host::remove_cgroup(&cgroups);
    ctx.results.duration_s = started.elapsed().as_secs_f64();
    let (json, md) = ctx.results.write(&out)?;
    println!();
    println!("{}", ctx.results.table());
    util::note(format!("results: {} and {}", md.display(), json.display()));
    for p in &ctx.results.plots {
        util::note(format!("plot: {}", out.join(p).display()));
    }
    util::note(format!("reproduce with: {}", ctx.results.command));
    if !ctx.results.errors.is_empty() {
        bail!(
            "{} bench(es) failed: {}",
            ctx.results.errors.len(),
            ctx.results.errors.join("; ")
        );
    }
    Ok(())
}

/// Sets up the machine, builds the agent (and the map read bench binary
/// when a selected bench needs it, whose path is returned).
fn build(benches: &[Bench]) -> Result<Option<PathBuf>> {
    setup::run(Scope::Full)?;
    ebpf::build_agent_release("the benchmarks measure the optimised binary")?;
    if benches
        .iter()
        .any(|b| matches!(b, Bench::Mapread | Bench::Connections))
    {
        build_mapread().map(Some)
    } else {
        Ok(None)
    }
}

/// Builds `agent/benches/mapread.rs` and returns its executable.
fn build_mapread() -> Result<PathBuf> {
    util::step(
        "building the map read benchmark (cargo bench --no-run)",
        "it times the agent's BatchReader against per-key iteration",
    );
    let mut cmd = util::cargo(&util::workspace_root());
    cmd.args([
        "bench",
        "--package",
        "meterd",
        "--bench",
        "mapread",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .stderr(Stdio::inherit());
    let out = cmd.output().context("running cargo bench --no-run")?;
    if !out.status.success() {
        bail!("building the mapread bench failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "mapread")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the mapread bench executable")
}

/// How to run this again, as the operator typed it.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

fn now_utc() -> String {
    host::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn git_describe() -> String {
    let root = util::workspace_root();
    let commit = host::output(Command::new("git").arg("-C").arg(&root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]))
    .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    let dirty = host::output(Command::new("git").arg("-C").arg(&root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_ok_and(|s| !s.trim().is_empty());
    if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    }
}

fn host_info() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    let mem_kb = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    json!({
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": host::cpus(),
        "cpu_model": model,
        "memory_gib": (mem_kb as f64 / 1024.0 / 1024.0).round(),
    })
}
