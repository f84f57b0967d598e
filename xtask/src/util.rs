//! Running commands so the operator sees what happens and why.
//!
//! Every step xtask takes is announced on one `xtask: ...` line before it
//! runs, and the command's own output goes straight to the terminal (stdio is
//! inherited, never captured) so long builds show progress. Only the quick
//! presence checks (`dpkg-query`, `rustup ... list`) capture their output.
//!
//! This module also owns the workspace paths and the environment scrubbing for
//! nested `cargo` calls; it does not know which steps exist (see `setup`,
//! `ebpf`, `test`, `run`).

use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Announces a step: what xtask is about to do and why it needs doing.
pub fn step(what: impl Display, why: impl Display) {
    println!("xtask: {what} ({why})");
}

/// Prints a note that is not a step (a check that passed, a skip, a warning).
pub fn note(what: impl Display) {
    println!("xtask: {what}");
}

/// Runs `cmd` with inherited stdio and fails if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("xtask:   $ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}` (is it installed and on PATH?)"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a quick check and returns its stdout, or `None` when the command is
/// missing or exits non-zero (both mean "not there" to the callers).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`probe`] but keeps stdout even when the command exits non-zero:
/// `dpkg-query` does so when any one of several packages is unknown.
pub fn probe_any_status(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line as the operator would type it.
pub fn display(cmd: &Command) -> String {
    // PATH and LD_LIBRARY_PATH are plumbing (see `scrub`), not something the
    // operator needs to retype.
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        (key != "PATH" && key != "LD_LIBRARY_PATH")
            .then(|| format!("{}={}", key.display(), value.display()))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| w.to_string_lossy().into_owned());
    let line = envs.chain(words).collect::<Vec<_>>().join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", dir.display()),
        None => line,
    }
}

/// Whether xtask runs with effective uid 0 (apt, mounts, BPF and cgroups need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The workspace root: xtask always lives in `<root>/xtask`, and is always
/// built from there, so its compile-time manifest dir is reliable.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
        .to_path_buf()
}

/// The userspace target dir: `CARGO_TARGET_DIR` if the operator set one,
/// else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        // Cargo resolves a relative CARGO_TARGET_DIR against the cwd.
        Some(dir) if !dir.is_empty() => {
            std::env::current_dir().map_or_else(|_| PathBuf::from(&dir), |cwd| cwd.join(&dir))
        }
        _ => workspace_root().join("target"),
    }
}

/// `~/.cargo/bin` (or `$CARGO_HOME/bin`): where rustup's proxies and
/// `cargo install`ed tools such as bpf-linker live.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// Environment that `cargo run` gives xtask about xtask itself, or that
/// rustup sets to pin xtask's toolchain. Leaking these into a nested cargo
/// would make it build with the wrong toolchain or think it is xtask.
const OUTER_CARGO_VARS: &[&str] = &[
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
];

/// A `cargo` command in `dir`, through rustup's proxy so the
/// `rust-toolchain.toml` that governs `dir` picks the toolchain.
pub fn cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir);
    scrub(&mut cmd);
    cmd
}

/// Removes from `cmd`'s environment what the outer `cargo run` set for xtask
/// (see [`OUTER_CARGO_VARS`], `CARGO_PKG_*`, its `LD_LIBRARY_PATH` entries)
/// and puts `~/.cargo/bin` on `PATH`, where rustup's proxies and bpf-linker
/// live even when the operator's shell does not list it.
pub fn scrub(cmd: &mut Command) {
    for var in OUTER_CARGO_VARS {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PKG_") {
            cmd.env_remove(key);
        }
    }
    scrub_library_path(cmd);
    if let Some(path) = path_with_cargo_bin() {
        cmd.env("PATH", path);
    }
}

/// `PATH` with the cargo bin dir in front, or `None` if it is already there.
pub fn path_with_cargo_bin() -> Option<OsString> {
    let bin = cargo_bin_dir()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return None;
    }
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path))).ok()
}

/// `cargo run` prepends xtask's toolchain libs and target dirs to
/// `LD_LIBRARY_PATH`; a nested build with another toolchain must not load
/// them, so drop exactly those entries and keep the operator's own.
fn scrub_library_path(cmd: &mut Command) {
    let Some(value) = std::env::var_os("LD_LIBRARY_PATH") else {
        return;
    };
    let rustup_home = std::env::var_os("RUSTUP_HOME").map(PathBuf::from);
    let target = target_dir();
    let kept: Vec<PathBuf> = std::env::split_paths(&value)
        .filter(|p| {
            !p.starts_with(&target)
                && !rustup_home
                    .as_ref()
                    .is_some_and(|home| p.starts_with(home.join("toolchains")))
        })
        .collect();
    if kept.is_empty() {
        cmd.env_remove("LD_LIBRARY_PATH");
    } else if let Ok(joined) = std::env::join_paths(kept) {
        cmd.env("LD_LIBRARY_PATH", joined);
    }
}
