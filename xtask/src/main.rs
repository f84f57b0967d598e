//! `cargo xtask`: meterd's developer and CI entry point.
//!
//! `cargo xtask run` and `cargo xtask test` are the two commands the README
//! promises work on a fresh Debian 12 machine: each installs what is missing
//! (saying what and why, one line per step) and then builds and runs. This
//! file only parses the command line; the steps live in their modules.

mod bench;
mod deb;
mod demo;
mod ebpf;
mod run;
mod setup;
mod test;
mod toolchain;
mod util;
mod vmtest;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test meterd",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building, running and testing need (apt packages, Rust
    /// toolchains, bpf-linker, bpffs mount); checks first, so reruns are fast.
    Setup,
    /// Build the eBPF programs into target/bpf/meterd.bpf.o.
    BuildEbpf {
        /// Build the eBPF crate's dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build (release) and start `meterd run` in the foreground.
    Run {
        /// Agent config [default: config/meterd.toml in the repository].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Extra arguments for `meterd run`, after `--`
        /// (e.g. `-- --closed-log /tmp/closed.jsonl`).
        #[arg(last = true)]
        extra: Vec<OsString>,
    },
    /// Run the whole suite CI runs: fmt, clippy, unit and end-to-end tests,
    /// then the VM tests on Debian 12's kernels (see `vmtest`).
    Test {
        /// Without root, run the end-to-end tests anyway and let them report
        /// SKIPPED instead of failing the suite.
        #[arg(long)]
        allow_skip: bool,
        /// Only run unit and end-to-end tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run the kernel-counting and billing crash tests inside VMs that boot
    /// Debian 12's kernels (6.1, 6.12) with virtme-ng under qemu (root;
    /// installs qemu, virtme-ng and the kernels first, under target/vmtest).
    Vmtest {
        /// Which kernel to boot.
        #[arg(long, value_enum, default_value = "all")]
        kernel: vmtest::KernelChoice,
        /// Where a VM cannot boot on this machine, report SKIPPED instead of
        /// failing; tests that fail inside a VM fail regardless.
        #[arg(long)]
        allow_skip: bool,
        /// Only run VM tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Measure meterd's costs against baselines taken in the same run (root):
    /// writes target/bench/results.{json,md} and SVG plots.
    Bench {
        /// Run only these benches, comma-separated.
        #[arg(long, value_delimiter = ',', value_enum)]
        only: Vec<bench::Bench>,
        /// Fast smoke run (about 2 minutes): fewer, shorter samples, smaller sizes.
        #[arg(long)]
        quick: bool,
        /// Results directory [default: target/bench].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Viewer counts for `active`, comma-separated, e.g. 10000,50000
        /// [default: 1000,10000,50000,100000; with --quick 1000,5000].
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Data-path pairs with idle CPUs polling, the judged ones, about
        /// 4 s each; more pairs narrow the 95% interval (800 keep it within
        /// about ±1.5% on this project's noisy host) [default: 800, about
        /// an hour; with --quick 8].
        #[arg(long, value_parser = clap::value_parser!(u32).range(4..))]
        pairs: Option<u32>,
        /// Data path: also run pairs with the host's default idle, half as
        /// many as the judged ones and interleaved with them, reported and
        /// not judged (where idle CPUs halt in a VM, loopback pays the
        /// wakeups); --quick always runs a few.
        #[arg(long)]
        default_idle: bool,
    },
    /// See meterd bill a live HLS stream to eight real players in about two
    /// minutes (root): nginx, ffmpeg and meterd in a network namespace and
    /// cgroups of their own, `meterd status --watch` live, then a report
    /// and a timeline in target/demo/. Leaves nothing behind.
    Demo,
    /// Build a Debian package (binary, systemd unit, sample config) into
    /// target/debian/ with cargo-deb.
    Deb,
    /// Processes the benchmarks start (holding connections open); not for
    /// direct use.
    #[command(hide = true)]
    BenchHelper {
        #[command(subcommand)]
        helper: bench::Helper,
    },
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Setup => setup::run(setup::Scope::Full),
        Cmd::BuildEbpf { debug } => {
            setup::run(setup::Scope::Build)?;
            ebpf::build(debug)
        }
        Cmd::Run { config, extra } => run::run(config, &extra),
        Cmd::Test { allow_skip, filter } => test::run(&test::Options { allow_skip, filter }),
        Cmd::Vmtest {
            kernel,
            allow_skip,
            filter,
        } => vmtest::command(&vmtest::Options {
            kernels: kernel,
            allow_skip,
            filter,
        }),
        Cmd::Bench {
            only,
            quick,
            out,
            sizes,
            pairs,
            default_idle,
        } => bench::run(&bench::Options {
            only,
            quick,
            out,
            sizes,
            pairs,
            default_idle,
        }),
        Cmd::BenchHelper { helper } => bench::helper(&helper),
        Cmd::Demo => demo::run(),
        Cmd::Deb => deb::run(),
    }
}
