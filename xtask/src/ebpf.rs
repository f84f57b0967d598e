//! `cargo xtask build-ebpf`: compile the eBPF crate and put the object where
//! the agent's build embeds it.
//!
//! The eBPF crate lives outside the workspace with its own nightly
//! (`ebpf/rust-toolchain.toml`) and target (`ebpf/.cargo/config.toml`), so
//! it is built by a nested `cargo` run from `ebpf/`. This module does not
//! install that toolchain or bpf-linker (`setup` does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context as _, Result};

use crate::toolchain::Toolchain;
use crate::util;

/// The eBPF crate's binary name (its `[[bin]]` in ebpf/Cargo.toml).
const BPF_BIN: &str = "meterd";
/// The target ebpf/.cargo/config.toml builds for.
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Environment that configures a build for the host toolchain. xtask may
/// inherit it from the outer cargo or the operator's shell; in the nested
/// eBPF build it would swap in the stable rustc, wrap it, add host-only
/// flags, or move the output away from where `build` looks for it.
const HOST_BUILD_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
];

/// A `cargo` command for the eBPF crate: run in ebpf/ so rustup picks the
/// nightly from its `rust-toolchain.toml`, with the host build env removed.
pub fn cargo() -> Command {
    let mut cmd = util::cargo(&dir());
    for var in HOST_BUILD_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// `<root>/ebpf`.
pub fn dir() -> PathBuf {
    util::workspace_root().join("ebpf")
}

/// Where the agent's build script expects the object (see CONTRACT: the
/// workspace target dir's `bpf/meterd.bpf.o`).
pub fn object_path() -> PathBuf {
    util::workspace_root().join("target/bpf/meterd.bpf.o")
}

/// Builds the eBPF crate (`release` unless `debug`) and copies the object to
/// [`object_path`].
pub fn build(debug: bool) -> Result<()> {
    let tc = Toolchain::ebpf()?;
    let profile = if debug { "debug" } else { "release" };
    util::step(
        format!(
            "building the eBPF programs ({profile}, toolchain {})",
            tc.channel
        ),
        "the agent embeds the object; the eBPF crate has its own nightly and target",
    );
    let mut cmd = cargo();
    cmd.arg("build");
    if !debug {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;

    let built = dir()
        .join("target")
        .join(BPF_TARGET)
        .join(profile)
        .join(BPF_BIN);
    let dest = object_path();
    if up_to_date(&built, &dest) {
        util::note(format!("eBPF object: {} (unchanged)", dest.display()));
        return Ok(());
    }
    let parent = dest.parent().expect("object path has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    std::fs::copy(&built, &dest).with_context(|| {
        format!(
            "copying {} to {} (did the eBPF build produce it?)",
            built.display(),
            dest.display()
        )
    })?;
    util::note(format!("eBPF object: {}", dest.display()));
    Ok(())
}

/// What agent/build.rs compares the object's mtime against (keep in sync):
/// it refuses to build when any of these is newer than the object.
const WATCHED_SOURCES: &[&str] = &[
    "ebpf/src",
    "ebpf/Cargo.toml",
    "ebpf/Cargo.lock",
    "common/src",
    "common/Cargo.toml",
];

/// Whether `dest` already holds `built` and is newer than both `built` and
/// every source agent/build.rs watches. Copying anyway would bump its mtime
/// and rebuild the agent on every `cargo xtask` run; skipping when a watched
/// file is newer (e.g. an edit cargo did not need to recompile for) would
/// leave agent/build.rs reporting a stale object that rebuilding cannot fix.
fn up_to_date(built: &Path, dest: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (Some(built_at), Some(dest_at)) = (modified(built), modified(dest)) else {
        return false;
    };
    let root = util::workspace_root();
    let newest_source = WATCHED_SOURCES
        .iter()
        .filter_map(|p| newest_mtime(&root.join(p)))
        .max();
    dest_at >= built_at
        && newest_source.is_none_or(|t| dest_at >= t)
        && matches!(
            (std::fs::read(built), std::fs::read(dest)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The newest mtime of `path` or, for a directory, of any file below it.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|entry| newest_mtime(&entry.path()))
        .max()
}

/// Builds the eBPF object, then the agent in release mode (which embeds
/// it); returns the agent binary. `why` is said with the step.
pub fn build_agent_release(why: &str) -> Result<PathBuf> {
    build(false)?;
    util::step("building the agent (release)", why);
    util::run(util::cargo(&util::workspace_root()).args([
        "build",
        "--release",
        "--locked",
        "--package",
        "meterd",
    ]))?;
    Ok(util::target_dir().join("release/meterd"))
}
