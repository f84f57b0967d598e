//! `cargo xtask test`: the whole suite, exactly what CI runs.
//!
//! Formatting, lints, unit tests and the privileged end-to-end tests, for
//! both the workspace and the out-of-workspace eBPF crate, then a subset of
//! the end-to-end tests on Debian 12's kernels in VMs (`vmtest`). A failed check
//! does not stop the suite: every step still runs so one CI run reports all
//! problems, and xtask exits non-zero at the end. Only a failed build stops
//! it, since every later step would fail the same way.
//!
//! The tests themselves live in the crates (`cargo test`); this module only
//! orders them and passes the privileged suite its environment.

use std::path::Path;

use anyhow::{Result, bail};

use crate::setup::{self, Scope};
use crate::toolchain::Toolchain;
use crate::{ebpf, util, vmtest};

/// The privileged end-to-end test crate (outside default-members).
pub const E2E_PACKAGE: &str = "meterd-tests";
/// Each e2e test has its own cgroup, pins and ports, so they can overlap;
/// four keeps the suite short without starving the traffic generators.
const E2E_THREADS: &str = "4";

/// Options of `cargo xtask test`.
pub struct Options {
    /// Let privileged tests report SKIPPED instead of failing without root.
    pub allow_skip: bool,
    /// Only run tests whose name contains this (unit and e2e).
    pub filter: Option<String>,
}

/// Runs the suite; `Err` if any step failed.
pub fn run(opts: &Options) -> Result<()> {
    let root = util::is_root();
    if !root && !opts.allow_skip {
        bail!(
            "the end-to-end tests load eBPF programs and create cgroups and network \
             namespaces, which needs root: run `cargo xtask test` as root, or pass \
             `--allow-skip` to run everything else and have those tests report SKIPPED"
        );
    }
    if root {
        setup::run(Scope::Full)?;
    } else {
        util::note("not root: setting up only what building needs; e2e tests will report SKIPPED");
        setup::run(Scope::Build)?;
    }

    let mut suite = Suite::default();
    let workspace = util::workspace_root();
    let ebpf_tc = Toolchain::ebpf()?;
    // The eBPF nightly's toolchain file asks only for what building needs;
    // checking it also needs rustfmt and clippy of that same nightly (the
    // stable ones cannot parse its build-std config).
    let unavailable = setup::optional_components(
        &ebpf_tc,
        &["rustfmt", "clippy"],
        "checking the eBPF crate needs them",
    );

    util::step(
        "checking formatting of the workspace",
        "CI rejects unformatted code",
    );
    suite.check(
        "cargo fmt (workspace)",
        util::run(util::cargo(&workspace).args(["fmt", "--all", "--", "--check"])),
    );
    if unavailable.iter().any(|c| c == "rustfmt") {
        suite.skip(
            "cargo fmt (ebpf)",
            &format!("rustfmt is not available for {}", ebpf_tc.channel),
        );
    } else {
        util::step(
            "checking formatting of the eBPF crate",
            "it is outside the workspace",
        );
        suite.check(
            "cargo fmt (ebpf)",
            util::run(ebpf::cargo().args(["fmt", "--", "--check"])),
        );
    }

    // Everything after this compiles the agent, which embeds the object.
    ebpf::build(false)?;

    util::step("linting the workspace", "clippy warnings fail CI");
    suite.check(
        "cargo clippy (workspace)",
        util::run(util::cargo(&workspace).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ])),
    );
    if unavailable.iter().any(|c| c == "clippy") {
        suite.skip(
            "cargo clippy (ebpf)",
            &format!("clippy is not available for {}", ebpf_tc.channel),
        );
    } else {
        util::step("linting the eBPF crate", "it is outside the workspace");
        suite.check(
            "cargo clippy (ebpf)",
            util::run(ebpf::cargo().args(["clippy", "--release", "--", "-D", "warnings"])),
        );
    }

    util::step(
        "running unit tests",
        "tariffs, billing cycle, config, governor",
    );
    let mut unit = util::cargo(&workspace);
    // The e2e crate is a workspace member but needs the env set below.
    unit.args(["test", "--workspace", "--exclude", E2E_PACKAGE, "--locked"]);
    if let Some(filter) = &opts.filter {
        unit.args(["--", filter]);
    }
    suite.check("cargo test (unit)", util::run(&mut unit));

    util::step(
        "building the agent (debug)",
        "the end-to-end tests start it as a process",
    );
    util::run(util::cargo(&workspace).args(["build", "--locked", "--package", "meterd"]))?;
    suite.check("cargo test (e2e)", e2e(&workspace, opts));
    vm(&mut suite, opts);

    suite.finish()
}

/// The privileged suite, against the agent binary just built.
fn e2e(workspace: &Path, opts: &Options) -> Result<()> {
    let bin = util::target_dir().join("debug/meterd");
    let why = if opts.allow_skip {
        "real sockets, cgroups and BPF; without root they report SKIPPED"
    } else {
        "real sockets, cgroups and BPF"
    };
    util::step("running end-to-end tests", why);
    let mut cmd = util::cargo(workspace);
    cmd.args(["test", "--package", E2E_PACKAGE, "--locked"])
        .env("METERD_BIN", &bin)
        .args(["--", "--test-threads", E2E_THREADS]);
    if let Some(filter) = &opts.filter {
        cmd.arg(filter);
    }
    // Tests only skip when told to: on CI a missing privilege must fail.
    if opts.allow_skip {
        cmd.env("METERD_ALLOW_SKIP", "1");
    } else {
        cmd.env_remove("METERD_ALLOW_SKIP");
    }
    util::run(&mut cmd)
}

/// The VM tests on Debian 12's kernels, after the host's e2e suite (as
/// aya's CI runs its integration tests on several kernels). A VM that
/// cannot boot here fails the suite unless `--allow-skip`, like the other
/// privileged tests.
fn vm(suite: &mut Suite, opts: &Options) {
    util::step(
        "running the VM tests on Debian 12's kernels 6.1 and 6.12",
        "meterd must work on the kernels its users run, not only on this host's",
    );
    let result = vmtest::run(&vmtest::Options {
        kernels: vmtest::KernelChoice::All,
        allow_skip: opts.allow_skip,
        filter: opts.filter.clone(),
    });
    match result {
        Ok(reports) => {
            for r in reports {
                if let vmtest::Outcome::Unbootable(why) = &r.outcome {
                    suite.skip(&format!("vmtest {}", r.label), why);
                }
            }
        }
        Err(e) => suite.check("cargo xtask vmtest", Err(e)),
    }
}

/// What has failed or been skipped so far.
#[derive(Default)]
struct Suite {
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl Suite {
    /// Records a step's outcome; its output is already on the terminal.
    fn check(&mut self, name: &str, result: Result<()>) {
        if let Err(e) = result {
            util::note(format!("FAILED: {name}: {e:#}"));
            self.failed.push(name.to_owned());
        }
    }

    fn skip(&mut self, name: &str, why: &str) {
        util::note(format!("SKIPPED: {name} ({why})"));
        self.skipped.push(format!("{name} ({why})"));
    }

    fn finish(self) -> Result<()> {
        if !self.skipped.is_empty() {
            util::note(format!("skipped steps: {}", self.skipped.join(", ")));
        }
        if self.failed.is_empty() {
            util::note("all steps passed");
            Ok(())
        } else {
            bail!("failed steps: {}", self.failed.join(", "))
        }
    }
}
