//! The two pinned Rust toolchains, read from their `rust-toolchain.toml`.
//!
//! The userspace crates pin a stable release in `<root>/rust-toolchain.toml`;
//! the eBPF crate pins a nightly in `ebpf/rust-toolchain.toml` (its LLVM must
//! match bpf-linker's). Those files are the only place the channels are
//! written down: xtask reads them rather than repeating the versions. This
//! module only reads and queries; installing is `setup`'s job.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use serde::Deserialize;

use crate::util;

/// One `rust-toolchain.toml`.
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// The channel, e.g. `1.99.1` or `nightly-2026-08-01`.
    pub channel: String,
    /// Components the file asks for on top of the profile.
    pub components: Vec<String>,
    /// The rustup profile to install with (`minimal` if the file says none,
    /// since the components list names everything the build needs).
    pub profile: String,
    /// The file it came from, for messages.
    pub file: PathBuf,
}

#[derive(Deserialize)]
struct File {
    toolchain: Section,
}

#[derive(Deserialize)]
struct Section {
    channel: String,
    #[serde(default)]
    components: Vec<String>,
    profile: Option<String>,
}

impl Toolchain {
    /// The userspace toolchain (`<root>/rust-toolchain.toml`).
    pub fn userspace() -> Result<Self> {
        Self::read(&util::workspace_root().join("rust-toolchain.toml"))
    }

    /// The eBPF toolchain (`<root>/ebpf/rust-toolchain.toml`).
    pub fn ebpf() -> Result<Self> {
        Self::read(&util::workspace_root().join("ebpf/rust-toolchain.toml"))
    }

    fn read(file: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let parsed: File = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid rust-toolchain.toml", file.display()))?;
        Ok(Self {
            channel: parsed.toolchain.channel,
            components: parsed.toolchain.components,
            profile: parsed
                .toolchain
                .profile
                .unwrap_or_else(|| "minimal".to_owned()),
            file: file.to_path_buf(),
        })
    }

    /// The components installed in this toolchain, or `None` if the
    /// toolchain itself is not installed.
    pub fn installed_components(&self) -> Option<Vec<String>> {
        let out = util::probe(
            Command::new("rustup")
                .args(["component", "list", "--installed", "--toolchain"])
                .arg(&self.channel)
                // A query must never turn into a download.
                .env("RUSTUP_AUTO_INSTALL", "0"),
        )?;
        Some(out.lines().map(str::to_owned).collect())
    }
}

/// Whether `component` (e.g. `clippy`) appears in rustup's installed list,
/// whose entries carry a target triple (`clippy-x86_64-unknown-linux-gnu`)
/// except for target-independent ones (`rust-src`).
pub fn has_component(installed: &[String], component: &str) -> bool {
    installed.iter().any(|entry| {
        entry == component
            || entry
                .strip_prefix(component)
                .and_then(|rest| rest.strip_prefix('-'))
                // A triple has at least two dashes; this keeps `rust` from
                // matching `rust-src`.
                .is_some_and(|triple| triple.matches('-').count() >= 2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_matching_needs_a_triple() {
        let installed = vec![
            "clippy-x86_64-unknown-linux-gnu".to_owned(),
            "rust-src".to_owned(),
        ];
        assert!(has_component(&installed, "clippy"));
        assert!(has_component(&installed, "rust-src"));
        assert!(!has_component(&installed, "rust"));
        assert!(!has_component(&installed, "rustfmt"));
    }
}
