//! `cargo xtask run`: set up, build and start the agent in the foreground.
//!
//! This is the README's "try it" path, so it builds in release mode and
//! hands the terminal to `meterd` (exec, not a child): Ctrl-C and SIGTERM
//! reach the agent directly, which exits cleanly and keeps its pins.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::setup::{self, Scope};
use crate::{ebpf, util};

/// Builds everything and replaces this process with `meterd run`.
pub fn run(config: Option<PathBuf>, extra: &[OsString]) -> Result<()> {
    if !util::is_root() {
        bail!(
            "meterd loads eBPF programs and attaches them to a cgroup, which needs root: \
             run `cargo xtask run` as root"
        );
    }
    // Checked before the slow steps so a typo fails in a second.
    let config = config.unwrap_or_else(|| util::workspace_root().join("config/meterd.toml"));
    if !config.is_file() {
        bail!(
            "config file {} not found: pass one with `cargo xtask run --config FILE` \
             (see the [agent], [billing] and [[service]] sections in the README)",
            config.display()
        );
    }
    let config = config
        .canonicalize()
        .with_context(|| format!("resolving {}", config.display()))?;

    setup::run(Scope::Full)?;
    let bin = ebpf::build_agent_release("`cargo xtask run` runs the optimised binary")?;
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("--config").arg(&config).args(extra);
    util::scrub(&mut cmd);
    util::step(
        format!(
            "starting {} run --config {}",
            bin.display(),
            config.display()
        ),
        "Ctrl-C stops it; pinned counters keep counting until `meterd unload`",
    );
    // exec only returns on failure.
    let err = cmd.exec();
    Err(err).with_context(|| format!("starting {}", bin.display()))
}
