//! `cargo xtask deb`: a Debian package of the agent (binary, systemd unit,
//! sample config as /etc/meterd/meterd.toml), built with cargo-deb from the
//! `[package.metadata.deb]` section of agent/Cargo.toml.

use anyhow::Result;

use crate::setup::{self, Scope};
use crate::{ebpf, util};

/// Builds target/debian/meterd_<version>_<arch>.deb.
pub fn run() -> Result<()> {
    setup::run(Scope::Build)?;
    let has_cargo_deb =
        util::probe(util::cargo(&util::workspace_root()).args(["deb", "--version"])).is_some();
    if !has_cargo_deb {
        util::step(
            "installing cargo-deb from crates.io",
            "it builds the .deb from agent/Cargo.toml's [package.metadata.deb]",
        );
        util::run(util::cargo(&util::workspace_root()).args(["install", "cargo-deb", "--locked"]))?;
    }
    ebpf::build_agent_release("the package ships the optimised binary")?;
    util::step("packaging", "binary, systemd unit and sample config");
    util::run(util::cargo(&util::workspace_root()).args([
        "deb",
        "--package",
        "meterd",
        "--no-build",
    ]))?;
    util::note(format!(
        "package in {}: install it with `apt install ./target/debian/meterd_*.deb`",
        util::target_dir().join("debian").display()
    ));
    Ok(())
}
