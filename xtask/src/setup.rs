//! `cargo xtask setup`: make a fresh Debian 12 machine able to build, run and
//! test meterd.
//!
//! Every step checks first and only acts when something is missing, so a
//! second run is quick and prints only what it found. Steps that need root
//! (apt, mounting bpffs) are collected; without root xtask names them and
//! stops, since half a setup would fail later with a less clear error.
//!
//! This module does not build anything of meterd itself (`ebpf`, `run`,
//! `test` do).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::toolchain::{self, Toolchain};
use crate::util;

/// How much of the machine a command needs; each scope includes the
/// packages of the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Compiling only: toolchains, bpf-linker and the LLVM it links against.
    Build,
    /// Also running the agent and the privileged tests: the test tools from
    /// apt, a bpffs to pin to and a cgroup v2 hierarchy to attach to.
    Full,
    /// The privileged tests inside VMs (`cargo xtask vmtest`): Full's test
    /// tools (the VM runs them from the host's root fs) and qemu, without
    /// the host's bpffs and cgroup v2, since the VM mounts its own.
    Vm,
}

/// An apt package xtask needs, and why.
struct AptPackage {
    name: &'static str,
    why: &'static str,
    scope: Scope,
}

const fn apt(name: &'static str, why: &'static str, scope: Scope) -> AptPackage {
    AptPackage { name, why, scope }
}

const LLVM: &str = "bpf-linker links against LLVM 22";

const APT_PACKAGES: &[AptPackage] = &[
    apt("llvm-22-dev", LLVM, Scope::Build),
    apt("libpolly-22-dev", LLVM, Scope::Build),
    apt("libzstd-dev", LLVM, Scope::Build),
    apt("zlib1g-dev", LLVM, Scope::Build),
    apt("iproute2", "tests use network namespaces", Scope::Full),
    apt("nftables", "tests inject packet loss", Scope::Full),
    apt(
        "bpftool",
        "tests inspect loaded programs and pins",
        Scope::Full,
    ),
    apt("iperf3", "tests generate TCP and UDP traffic", Scope::Full),
    apt("nginx", "tests meter a real HTTP server", Scope::Full),
    apt(
        "ffmpeg",
        "tests make an HLS stream and play it with real players",
        Scope::Full,
    ),
    apt(
        "prometheus",
        "promtool checks the /metrics output",
        Scope::Full,
    ),
    apt(
        "stress-ng",
        "tests load the machine to drive the interval governor",
        Scope::Full,
    ),
    apt("wrk", "tests generate HTTP load", Scope::Full),
    apt("sqlite3", "tests read the SQLite ledger", Scope::Full),
    apt(
        "libnginx-mod-rtmp",
        "tests meter nginx-rtmp with the shipped rtmp.conf",
        Scope::Full,
    ),
    apt(
        "curl",
        "tests fetch from nginx and call the API socket as other users",
        Scope::Full,
    ),
    apt(
        "nats-server",
        "fleet tests run a 3-node NATS JetStream cluster",
        Scope::Full,
    ),
    apt(
        "openssl",
        "fleet tests make a CA and a certificate for NATS over TLS",
        Scope::Full,
    ),
    apt(
        "qemu-system-x86",
        "vmtest boots Debian's kernels under qemu",
        Scope::Vm,
    ),
    apt(
        "busybox-static",
        "virtme-ng builds the VM's initramfs with it",
        Scope::Vm,
    ),
    apt(
        "python3-venv",
        "virtme-ng comes from PyPI into a venv under target/",
        Scope::Vm,
    ),
    apt(
        "kmod",
        "virtme-ng indexes the extracted kernels' modules with depmod",
        Scope::Vm,
    ),
];

/// Debian 12's qemu-system-x86 (7.2) and a qemu-utils of 8.0 or later (this
/// machine kind ships 10.0 from backports) break each other, and apt would
/// resolve that by removing qemu-utils. Installing the qemu-utils of
/// qemu-system-x86's own version instead keeps `qemu-img` and `qemu-nbd`.
const QEMU_SYSTEM: &str = "qemu-system-x86";
const QEMU_UTILS: &str = "qemu-utils";

/// bpf-linker's version, pinned so a fresh machine gets the one whose
/// `llvm-22` feature and `Cargo.lock` (for `--locked`) were checked here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where Debian's `llvm-22-dev` puts LLVM; bpf-linker's build finds it via
/// `LLVM_PREFIX`.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// Runs every setup step `scope` needs.
pub fn run(scope: Scope) -> Result<()> {
    let missing_apt = missing_apt_packages(scope);
    let mount_bpffs = scope == Scope::Full && !bpffs_mounted();

    // Decide before changing anything: without root, a half-done setup would
    // only fail later (e.g. building bpf-linker without LLVM) and less clearly.
    if !util::is_root() {
        let mut needs_root = Vec::new();
        if !missing_apt.is_empty() {
            let names: Vec<&str> = missing_apt.iter().map(|p| p.name).collect();
            needs_root.push(format!("installing apt packages {}", names.join(" ")));
        }
        if mount_bpffs {
            needs_root.push(format!("mounting bpffs at {BPFFS}"));
        }
        if !needs_root.is_empty() {
            bail!(
                "setup needs root for: {}. Run the same `cargo xtask` command as root \
                 (in a root shell, or `sudo -E env \"PATH=$PATH\" cargo xtask ...`)",
                needs_root.join("; ")
            );
        }
    }

    apt_install(&missing_apt)?;
    let mut rustup = Rustup::default();
    toolchain(&mut rustup, &Toolchain::userspace()?)?;
    toolchain(&mut rustup, &Toolchain::ebpf()?)?;
    bpf_linker()?;
    if scope == Scope::Full {
        if mount_bpffs {
            util::step(
                format!("mounting bpffs at {BPFFS}"),
                "the agent pins programs and maps there to survive restarts",
            );
            util::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        } else {
            util::note(format!("bpffs: mounted at {BPFFS}"));
        }
        cgroup2()?;
    }
    util::note("setup complete");
    Ok(())
}

/// The apt packages `scope` needs that dpkg does not report installed.
fn missing_apt_packages(scope: Scope) -> Vec<&'static AptPackage> {
    let wanted: Vec<&AptPackage> = APT_PACKAGES.iter().filter(|p| p.scope <= scope).collect();
    let installed = installed_apt_packages(wanted.iter().map(|p| p.name));
    wanted
        .into_iter()
        .filter(|p| !installed.iter().any(|name| name == p.name))
        .collect()
}

/// Installs `missing` (already known to be missing) with apt.
fn apt_install(missing: &[&AptPackage]) -> Result<()> {
    if missing.is_empty() {
        util::note("apt packages: all present");
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    // Reasons grouped so the line stays one line even when all are missing;
    // packages sharing a reason are adjacent in APT_PACKAGES.
    let mut reasons: Vec<&str> = missing.iter().map(|p| p.why).collect();
    reasons.dedup();
    util::step(
        format!("installing apt packages {}", names.join(" ")),
        reasons.join("; "),
    );
    // A fresh image has empty package lists; updating only when something is
    // missing keeps the already-set-up case offline and fast.
    util::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let (vm, host): (Vec<&AptPackage>, Vec<&AptPackage>) =
        missing.iter().partition(|p| p.scope == Scope::Vm);
    let host: Vec<&str> = host.iter().map(|p| p.name).collect();
    let vm: Vec<&str> = vm.iter().map(|p| p.name).collect();
    if !host.is_empty() {
        util::run(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(&host)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if vm.is_empty() {
        return Ok(());
    }
    // Without recommends: qemu-system-x86's would bring a GUI and firmware
    // that a headless TCG guest never uses.
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "--no-install-recommends"]);
    if let Some(pinned) = vm.contains(&QEMU_SYSTEM).then(qemu_utils_pin).flatten() {
        install.args(["--allow-downgrades", &pinned]);
    }
    util::run(install.args(&vm).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `qemu-utils=<version>` when the installed qemu-utils is not of the
/// version of qemu-system-x86 that apt is about to install (see
/// [`QEMU_UTILS`]); announced, since it replaces a package the machine has.
fn qemu_utils_pin() -> Option<String> {
    let installed = util::probe(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status} ${Version}"])
            .arg(QEMU_UTILS),
    )?;
    let installed = installed.strip_prefix("install ok installed ")?.trim();
    let policy = util::probe(Command::new("apt-cache").args(["policy", QEMU_SYSTEM]))?;
    let candidate = policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate: "))?
        .trim();
    if candidate == installed || candidate == "(none)" {
        return None;
    }
    util::step(
        format!("installing {QEMU_UTILS} {candidate} in place of {installed}"),
        format!(
            "{QEMU_SYSTEM} {candidate} cannot be installed beside {QEMU_UTILS} {installed}, and \
             apt would remove it; this keeps qemu-img"
        ),
    );
    Some(format!("{QEMU_UTILS}={candidate}"))
}

/// The subset of `names` dpkg reports as fully installed.
fn installed_apt_packages<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let names: Vec<&str> = names.collect();
    // dpkg-query exits 1 if any name is unknown but still prints the others.
    let Some(out) = util::probe_any_status(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\n"])
            .args(&names),
    ) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| *status == "install ok installed")
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// Remembers whether rustup's self-update has been turned off this run.
#[derive(Default)]
struct Rustup {
    self_update_disabled: bool,
}

impl Rustup {
    /// Called before any rustup install: a self-update in the middle of a
    /// setup would replace the binary that is running the install, and CI
    /// should get the rustup the image has.
    fn before_install(&mut self) -> Result<()> {
        if !self.self_update_disabled {
            util::step(
                "disabling rustup self-update",
                "installs must not replace rustup mid-setup",
            );
            util::run(Command::new("rustup").args(["set", "auto-self-update", "disable"]))?;
            self.self_update_disabled = true;
        }
        Ok(())
    }
}

/// Installs `tc` with the components its file names.
fn toolchain(rustup: &mut Rustup, tc: &Toolchain) -> Result<()> {
    let wanted: Vec<&str> = tc.components.iter().map(String::as_str).collect();
    let Some(installed) = tc.installed_components() else {
        rustup.before_install()?;
        util::step(
            format!("installing Rust toolchain {}", tc.channel),
            format!("pinned by {}", tc.file.display()),
        );
        let mut cmd = Command::new("rustup");
        cmd.args([
            "toolchain",
            "install",
            &tc.channel,
            "--profile",
            &tc.profile,
        ]);
        if !wanted.is_empty() {
            cmd.args(["--component", &wanted.join(",")]);
        }
        return util::run(&mut cmd);
    };
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|c| !toolchain::has_component(&installed, c))
        .collect();
    if missing.is_empty() {
        util::note(format!("Rust toolchain {}: present", tc.channel));
        return Ok(());
    }
    rustup.before_install()?;
    util::step(
        format!(
            "adding components {} to Rust toolchain {}",
            missing.join(" "),
            tc.channel
        ),
        format!("required by {}", tc.file.display()),
    );
    util::run(
        Command::new("rustup")
            .args(["component", "add", "--toolchain", &tc.channel])
            .args(&missing),
    )
}

/// Adds optional components (e.g. clippy to the eBPF nightly) and returns
/// the ones this toolchain cannot provide, for the caller to skip with a
/// reason instead of failing.
pub fn optional_components(tc: &Toolchain, components: &[&str], why: &str) -> Vec<String> {
    let installed = tc.installed_components().unwrap_or_default();
    let mut unavailable = Vec::new();
    let mut rustup = Rustup::default();
    for component in components {
        if toolchain::has_component(&installed, component) {
            continue;
        }
        if rustup.before_install().is_err() {
            unavailable.push((*component).to_owned());
            continue;
        }
        util::step(
            format!(
                "adding component {component} to Rust toolchain {}",
                tc.channel
            ),
            why,
        );
        let added = util::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", &tc.channel])
                .arg(component),
        );
        if let Err(e) = added {
            util::note(format!(
                "{component} is not available for {}: {e:#}",
                tc.channel
            ));
            unavailable.push((*component).to_owned());
        }
    }
    unavailable
}

/// Builds and installs bpf-linker if it is missing. Installing it does not
/// need root (it goes to `~/.cargo/bin`), but its LLVM comes from apt.
fn bpf_linker() -> Result<()> {
    let candidates = [
        Some(PathBuf::from("bpf-linker")),
        util::cargo_bin_dir().map(|d| d.join("bpf-linker")),
    ];
    for candidate in candidates.iter().flatten() {
        if let Some(version) = util::probe(Command::new(candidate).arg("--version")) {
            util::note(format!("{}: present", version.trim()));
            return Ok(());
        }
    }
    let tc = Toolchain::userspace()?;
    util::step(
        format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22, this takes a few minutes"
        ),
        "it links the eBPF object",
    );
    util::run(
        util::cargo(&util::workspace_root())
            .env_remove("CARGO_TARGET_DIR")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .arg(format!("+{}", tc.channel))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
    )
}

/// Whether bpffs is mounted at /sys/fs/bpf: the agent pins its programs and
/// maps there so counting survives a restart, and some machines boot
/// without it.
fn bpffs_mounted() -> bool {
    mounts()
        .iter()
        .any(|m| m.target == Path::new(BPFFS) && m.fstype == "bpf")
}

/// Checks that a cgroup v2 hierarchy is mounted; the agent attaches there.
/// Its place varies (`/sys/fs/cgroup` unified, `/sys/fs/cgroup/unified`
/// hybrid), so it is looked up, never assumed.
fn cgroup2() -> Result<()> {
    match mounts().into_iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => {
            util::note(format!("cgroup v2: mounted at {}", m.target.display()));
            Ok(())
        }
        None => bail!(
            "no cgroup v2 hierarchy is mounted (meterd attaches its programs to one); \
             mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with \
             systemd.unified_cgroup_hierarchy=1"
        ),
    }
}

/// One line of /proc/mounts.
struct Mount {
    target: PathBuf,
    fstype: String,
}

fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some(Mount {
                target: PathBuf::from(target),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}
