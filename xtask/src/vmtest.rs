//! `cargo xtask vmtest`: a subset of the privileged end-to-end tests inside
//! VMs that boot the kernels meterd's users run (Debian 12's 6.1 and its
//! 6.12 line), as aya's CI runs its integration tests on several kernels.
//!
//! The host builds everything; the VM (virtme-ng's `vng`, under qemu's TCG
//! since nested KVM does not work on these machines) shares the host's root
//! fs read-only, mounts what the tests need (cgroup v2, bpffs) and runs the
//! test binaries directly, one test per run, as root. What the VM runs is a
//! snapshot of the host's build, which the guest copies into a tmpfs over
//! the target's `debug/` (where the test binaries look for the traffic
//! tool), so a concurrent `cargo build` on the host cannot change it
//! mid-run.
//!
//! The kernels are Debian's packages, downloaded and extracted under
//! `target/vmtest/kernels/`, not installed: installing a `linux-image` on
//! the host pulls in udev and initramfs-tools and upgrades systemd, for a
//! kernel the host never boots. virtme-ng comes from PyPI into a venv under
//! `target/vmtest/venv` (Debian 12's Python refuses a system-wide `pip
//! install`, and a venv leaves the system untouched).
//!
//! Results come back through a directory the guest may write
//! (`target/vmtest/<kernel>/`): `started` (the kernel release, once the
//! guest runs its script), `results` (a line per test) and `status`. vng's
//! own exit status carries the guest's only where udev names the
//! virtio-serial ports in the guest (`/dev/virtio-ports/virtme.ret`);
//! without udev on the host, vng exits 255 whatever the tests did, so the
//! status file is the verdict and vng's code is only cross-checked.
//!
//! Does not own: the tests themselves (`tests/`), the host's packages
//! (`setup`, `Scope::Vm`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::setup::{self, Scope};
use crate::{ebpf, test, util};

/// `--kernel`: which of [`KERNELS`] to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's stock kernel.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's newer kernel line.
    #[value(name = "6.12")]
    V6_12,
    /// Both, one after the other.
    All,
}

/// Options of `cargo xtask vmtest`.
pub struct Options {
    /// Which kernels to boot.
    pub kernels: KernelChoice,
    /// A VM that cannot boot on this machine (qemu or vng unusable) is
    /// SKIPPED with its reason instead of failing. Tests that fail inside a
    /// booted VM fail regardless.
    pub allow_skip: bool,
    /// Only the VM tests whose name contains this.
    pub filter: Option<String>,
}

/// A kernel to test on.
struct Kernel {
    /// What `--kernel` and the output call it.
    label: &'static str,
    /// Debian's package; a meta-package is resolved to the image it
    /// depends on (the newest of its line in the package lists).
    package: &'static str,
    why: &'static str,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        label: "6.1",
        package: "linux-image-6.1.0-50-amd64",
        why: "Debian 12's stock kernel",
    },
    Kernel {
        label: "6.12",
        package: "linux-image-6.12-amd64",
        why: "Debian 12's newer kernel line",
    },
];

/// A test the VMs run: `name` in the integration-test binary `target`.
struct VmTest {
    target: &'static str,
    name: &'static str,
    why: &'static str,
}

/// The subset: every kernel-counting test (each hook and map meterd
/// loads, on both address families, through loss, storms, UDP and a
/// crash). Together about 2.5 minutes per kernel under TCG with 2 vCPUs.
/// Left out: tests of userspace logic that does not depend on the kernel
/// (tariffs, API, exporter), and the ones that need the host's speed
/// (the governor under `stress-ng`, real players and Prometheus), which
/// would take tens of minutes under TCG and test nothing kernel-specific.
const VM_TESTS: &[VmTest] = &[
    VmTest {
        target: "kernel_counting",
        name: "long_lived_download_and_upload_ipv4",
        why: "live reads of TCP counts over IPv4 (sock_ops, cgroup_skb, the mapped LIVE array)",
    },
    VmTest {
        target: "kernel_counting",
        name: "long_lived_download_and_upload_ipv6",
        why: "the same over IPv6",
    },
    VmTest {
        target: "kernel_counting",
        name: "connection_storm_within_one_interval",
        why: "1100 short connections: close records through the ring buffer",
    },
    VmTest {
        target: "kernel_counting",
        name: "random_packet_loss_is_not_counted_twice",
        why: "retransmissions in a network namespace with nftables loss",
    },
    VmTest {
        target: "kernel_counting",
        name: "unmetered_port_in_the_same_cgroup_is_not_counted",
        why: "the port filter in the kernel",
    },
    VmTest {
        target: "kernel_counting",
        name: "udp_flow_payload_is_exact",
        why: "UDP flows: BPF_CMPXCHG (5.12) and lookup-and-delete (5.14)",
    },
    VmTest {
        target: "kernel_counting",
        name: "agent_kill9_and_restart_mid_transfer",
        why: "pinned maps and links across kill -9",
    },
    // Not billing's kill9_during_traffic_charges_exactly_once: under TCG its
    // host-speed timing (a 10 s transfer outlasting four ~5 s restarts, no
    // pause over session_idle inside a connection) does not hold.
];

/// The guest's limits: 2 vCPUs (the host has 2 cores) and 2 GiB.
const VM_CPUS: &str = "2";
const VM_MEMORY: &str = "2G";
/// Kernel arguments: `edd=off` skips the BIOS disk probe at boot (the VM has
/// no disk), the setting 6.1 was first seen to boot with here; `loglevel=4`
/// keeps the kernel's info messages off the console the test output shares.
const VM_APPEND: &[&str] = &["edd=off", "loglevel=4"];
/// One test's limit inside the guest; the slowest took ~35 s under TCG
/// (~65 s with the host's build read over 9p and other tests on the host).
const TEST_TIMEOUT_SECS: u64 = 180;
/// One VM's limit, boot included (~15 s): the subset takes ~2.5 minutes, so
/// this only ends a VM that hangs, within CI's budget.
const VM_DEADLINE: Duration = Duration::from_mins(15);

/// virtme-ng from PyPI, pinned so every machine boots its VMs the same way.
const VIRTME_NG_VERSION: &str = "1.42";
/// Debian's Python (from `python3-venv`), not whatever `python3` is first on
/// `PATH`.
const PYTHON: &str = "/usr/bin/python3";

/// What one kernel's run came to.
#[derive(Debug)]
pub struct KernelReport {
    /// The kernel's name in [`KERNELS`] (`6.1`, `6.12`).
    pub label: &'static str,
    /// The release the guest reported (`uname -r`), once it booted.
    pub release: Option<String>,
    pub outcome: Outcome,
    /// `(test, passed, seconds)` for the tests that ran.
    pub tests: Vec<(String, bool, u64)>,
    /// From starting vng to its exit.
    pub wall: Duration,
    /// From starting vng to the guest's script running.
    pub boot: Option<Duration>,
}

/// A kernel's verdict.
#[derive(Debug)]
pub enum Outcome {
    /// Every test passed, and the guest said so.
    Passed,
    /// Tests failed or the VM died mid-run: always a failure.
    Failed(String),
    /// The VM could not be set up or booted on this machine.
    Unbootable(String),
}

/// `cargo xtask vmtest`.
pub fn command(opts: &Options) -> Result<()> {
    for r in run(opts)? {
        if let Outcome::Unbootable(why) = &r.outcome {
            util::note(format!("SKIPPED: vmtest {}: {why}", r.label));
        }
    }
    Ok(())
}

/// Runs the VM tests; `Ok` with the per-kernel reports when nothing failed
/// (skipped kernels, with `allow_skip`, are in the reports), `Err` naming
/// what failed otherwise.
pub fn run(opts: &Options) -> Result<Vec<KernelReport>> {
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| match opts.kernels {
            KernelChoice::V6_1 => k.label == "6.1",
            KernelChoice::V6_12 => k.label == "6.12",
            KernelChoice::All => true,
        })
        .collect();
    let tests: Vec<&VmTest> = VM_TESTS
        .iter()
        .filter(|t| {
            opts.filter
                .as_ref()
                .is_none_or(|f| t.name.contains(f.as_str()))
        })
        .collect();
    if tests.is_empty() {
        util::note("vmtest: no VM test matches the filter; not booting any VM");
        return Ok(Vec::new());
    }
    let reports: Vec<KernelReport> = match prepare(&kernels) {
        Err(e) => kernels
            .iter()
            .map(|k| KernelReport::unbootable(k.label, format!("{e:#}")))
            .collect(),
        Ok((vng, images)) => {
            let snapshot = build(&tests)?;
            announce(&tests);
            images
                .into_iter()
                .zip(&kernels)
                .map(|(image, kernel)| match image {
                    Ok(image) => boot(kernel, &image, &vng, &snapshot, &tests),
                    Err(e) => KernelReport::unbootable(kernel.label, format!("{e:#}")),
                })
                .collect()
        }
    };
    summarize(&reports, opts.allow_skip)?;
    Ok(reports)
}

/// Installs what booting needs; per kernel, its image (or why not).
fn prepare(kernels: &[&Kernel]) -> Result<(PathBuf, Vec<Result<Image>>)> {
    setup::run(Scope::Vm)?;
    let qemu = "qemu-system-x86_64";
    if util::probe(Command::new(qemu).arg("--version")).is_none() {
        bail!("`{qemu} --version` does not run, though qemu-system-x86 was installed");
    }
    let vng = virtme_ng()?;
    let images = kernels.iter().map(|k| kernel_image(k)).collect();
    Ok((vng, images))
}

/// `target/vmtest/...`.
fn dir() -> PathBuf {
    util::target_dir().join("vmtest")
}

/// The venv's `vng`, installing virtme-ng if it is missing.
fn virtme_ng() -> Result<PathBuf> {
    let venv = dir().join("venv");
    let vng = venv.join("bin/vng");
    let version = util::probe(Command::new(&vng).arg("--version"));
    if let Some(version) =
        version.filter(|v| v.split_whitespace().nth(1) == Some(VIRTME_NG_VERSION))
    {
        util::note(format!("{}: present in {}", version.trim(), venv.display()));
        return Ok(vng);
    }
    util::step(
        format!(
            "installing virtme-ng {VIRTME_NG_VERSION} from PyPI into {}",
            venv.display()
        ),
        "it boots the kernels under qemu; a venv keeps it out of the system's Python",
    );
    util::run(
        Command::new(PYTHON)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )?;
    util::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--disable-pip-version-check", "--no-input"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )?;
    Ok(vng)
}

/// An extracted kernel package.
struct Image {
    /// `uname -r` of the kernel, e.g. `6.1.0-50-amd64`.
    release: String,
    /// `<root>/boot/vmlinuz-<release>`; its modules are in
    /// `<root>/lib/modules/<release>`, where virtme-ng looks for them.
    vmlinuz: PathBuf,
}

/// The kernel's image, downloading and extracting its package if missing.
fn kernel_image(kernel: &Kernel) -> Result<Image> {
    let package = concrete_package(kernel.package)?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("{package} is not a linux-image package"))?
        .to_owned();
    let root = dir().join("kernels").join(&release);
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if vmlinuz.is_file() {
        util::note(format!("kernel {release}: present in {}", root.display()));
        return Ok(Image { release, vmlinuz });
    }
    util::step(
        format!(
            "downloading {package} and extracting it into {}",
            root.display()
        ),
        format!(
            "the {} VM boots {}; installing it on the host would pull in udev and \
             initramfs-tools and upgrade systemd, for a kernel the host never boots",
            kernel.label, kernel.why
        ),
    );
    let debs = dir().join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let mut download = Command::new("apt-get");
    download.current_dir(&debs).arg("download");
    if util::is_root() {
        // apt's download sandbox user cannot write into target/.
        download.args(["-o", "APT::Sandbox::User=root"]);
    }
    util::run(download.arg(&package))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                debs.display()
            )
        })?;
    // Extract beside, then rename: an interrupted extraction never looks
    // like a present kernel.
    let partial = root.with_file_name(format!("{release}.partial"));
    let _ = fs::remove_dir_all(&partial);
    // dpkg-deb -x creates the directory but not its parent (a fresh clone
    // has no target/vmtest/kernels yet).
    if let Some(parent) = partial.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &root).with_context(|| format!("renaming into {}", root.display()))?;
    let _ = fs::remove_file(&deb);
    if !vmlinuz.is_file() {
        bail!("{package} has no boot/vmlinuz-{release}");
    }
    Ok(Image { release, vmlinuz })
}

/// `package`, or for a meta-package such as `linux-image-6.12-amd64` the
/// `linux-image-*` it depends on, from the package lists (updated first if
/// they do not know the package, as on a fresh image).
fn concrete_package(package: &str) -> Result<String> {
    let depends = || util::probe(Command::new("apt-cache").args(["depends", package]));
    let out = if let Some(out) = depends() {
        out
    } else {
        util::step(
            "updating the apt package lists",
            format!("they do not list {package}"),
        );
        util::run(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        depends().with_context(|| format!("apt knows no package {package}"))?
    };
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with("linux-image-"))
        .unwrap_or(package)
        .to_owned())
}

/// The host's build, as the VM sees it: a copy of the agent, the traffic
/// tool and the test binaries, which the guest copies into a tmpfs over
/// the target's `debug/` (where the test binaries look for the traffic tool).
struct Snapshot {
    /// The copy, on the host.
    dir: PathBuf,
    /// The target's `debug/`, where the guest puts the copy.
    guest_dir: PathBuf,
    /// Test binary per integration-test target, as the guest names it.
    binaries: HashMap<String, PathBuf>,
}

/// Builds the agent and the test binaries on the host and snapshots them.
fn build(tests: &[&VmTest]) -> Result<Snapshot> {
    let workspace = util::workspace_root();
    ebpf::build(false)?;
    util::step(
        "building the agent (debug)",
        "the VMs run the host's build of it",
    );
    util::run(util::cargo(&workspace).args(["build", "--locked", "--package", "meterd"]))?;

    let mut targets: Vec<&str> = tests.iter().map(|t| t.target).collect();
    targets.sort_unstable();
    targets.dedup();
    util::step(
        format!("building the test binaries {}", targets.join(", ")),
        "the VMs run them directly, without cargo",
    );
    let mut cmd = util::cargo(&workspace);
    cmd.args([
        "test",
        "--locked",
        "--package",
        test::E2E_PACKAGE,
        "--no-run",
    ])
    .arg("--message-format=json-render-diagnostics");
    for target in &targets {
        cmd.args(["--test", target]);
    }
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("could not start cargo")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let built = test_executables(&String::from_utf8_lossy(&out.stdout));

    let target_debug = util::target_dir().join("debug");
    let dir = dir().join("bin");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    util::note(format!(
        "copying the build into {} (the VMs see it at {})",
        dir.display(),
        target_debug.display()
    ));
    for name in ["meterd", "meterd-traffic"] {
        copy(&target_debug.join(name), &dir.join(name))?;
    }
    let mut binaries = HashMap::new();
    for target in targets {
        let exe = built
            .get(target)
            .with_context(|| format!("cargo reported no executable for the test {target}"))?;
        let name = exe
            .file_name()
            .context("a test executable without a name")?;
        copy(exe, &dir.join(name))?;
        binaries.insert(target.to_owned(), target_debug.join(name));
    }
    Ok(Snapshot {
        dir,
        guest_dir: target_debug,
        binaries,
    })
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Integration-test executables by target name, from cargo's JSON messages.
fn test_executables(json: &str) -> HashMap<String, PathBuf> {
    json.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_owned();
            let exe = PathBuf::from(m["executable"].as_str()?);
            Some((name, exe))
        })
        .collect()
}

/// Says which tests the VMs run and why.
fn announce(tests: &[&VmTest]) {
    util::note(format!(
        "vmtest: {} test(s) per kernel, each alone, under TCG with {VM_CPUS} vCPUs and {VM_MEMORY} \
         (the kernel-counting tests; the rest test userspace or \
         need the host's speed):",
        tests.len()
    ));
    for t in tests {
        util::note(format!("  {}::{}: {}", t.target, t.name, t.why));
    }
}

impl KernelReport {
    fn unbootable(label: &'static str, why: String) -> KernelReport {
        KernelReport {
            label,
            release: None,
            outcome: Outcome::Unbootable(why),
            tests: Vec::new(),
            wall: Duration::ZERO,
            boot: None,
        }
    }
}

/// Boots `image` with vng and runs `tests` in it.
fn boot(
    kernel: &Kernel,
    image: &Image,
    vng: &Path,
    snapshot: &Snapshot,
    tests: &[&VmTest],
) -> KernelReport {
    let label = kernel.label;
    let out = dir().join(label);
    let mut report = KernelReport::unbootable(label, String::new());
    if let Err(e) = fresh_dir(&out).and_then(|()| {
        let script = guest_script(&out, snapshot, tests)?;
        fs::write(out.join("run.sh"), script).context("writing the guest script")
    }) {
        report.outcome = Outcome::Unbootable(format!("{e:#}"));
        return report;
    }
    util::step(
        format!(
            "booting {} ({}) in a VM and running the tests there",
            image.release, kernel.why
        ),
        "meterd must work on the kernels its users run",
    );
    let mut cmd = Command::new(vng);
    let venv_bin = vng.parent().unwrap_or(Path::new("."));
    // vng runs virtme-run from its own venv.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(venv_bin.to_path_buf()).chain(std::env::split_paths(&path)),
    )
    .unwrap_or(path);
    cmd.env("PATH", path)
        .arg("--run")
        .arg(&image.vmlinuz)
        // Nested KVM fails on these machines (an MSR error at boot).
        .arg("--disable-kvm")
        .args(["--cpus", VM_CPUS, "--memory", VM_MEMORY, "--user", "root"])
        .args(["--name", &format!("meterd-vmtest-{label}")]);
    for arg in VM_APPEND {
        cmd.args(["--append", arg]);
    }
    // Without udev on the host, the guest's script output reaches only the
    // console, which vng shows with --verbose.
    cmd.arg("--verbose")
        .arg(format!("--rwdir={}", out.display()))
        .args(["--exec", &format!("bash {}/run.sh", out.display())]);

    let started_at = SystemTime::now();
    let clock = Instant::now();
    let status = run_until(&mut cmd, VM_DEADLINE, &out.join("console.log"));
    report.wall = clock.elapsed();

    let started = fs::read_to_string(out.join("started")).ok();
    report.boot = fs::metadata(out.join("started"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(started_at).ok());
    report.release = started.as_deref().map(|r| r.trim().to_owned());
    report.tests = read_results(&out.join("results"));
    let status_file = fs::read_to_string(out.join("status"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    report.outcome = verdict(image, tests, &report, &status, status_file, &out);
    report
}

/// What a run came to, from the guest's files and vng's exit status.
fn verdict(
    image: &Image,
    tests: &[&VmTest],
    report: &KernelReport,
    vng: &Result<ExitStatus>,
    status: Option<i32>,
    out: &Path,
) -> Outcome {
    let vng_said = match vng {
        Ok(s) => s.to_string(),
        Err(e) => format!("{e:#}"),
    };
    let Some(release) = &report.release else {
        return Outcome::Unbootable(format!(
            "the VM did not reach its script (vng: {vng_said}); see vng's output above"
        ));
    };
    if *release != image.release {
        return Outcome::Failed(format!("the VM booted {release}, not {}", image.release));
    }
    let Some(status) = status else {
        return Outcome::Failed(format!(
            "the VM stopped before its tests finished (vng: {vng_said}; a kernel panic, or \
             the deadline); {} of {} tests reported",
            report.tests.len(),
            tests.len()
        ));
    };
    let kept = if out.join("kept").is_dir() {
        format!(
            "; failed tests' directories are in {}",
            out.join("kept").display()
        )
    } else {
        String::new()
    };
    let failed: Vec<&str> = report
        .tests
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, _)| name.as_str())
        .collect();
    if status != 0 || !failed.is_empty() {
        return Outcome::Failed(format!(
            "{}{kept}",
            if failed.is_empty() {
                format!("the guest script exited {status}")
            } else {
                format!("{} failed", failed.join(", "))
            }
        ));
    }
    if report.tests.len() != tests.len() {
        return Outcome::Failed(format!(
            "{} of {} tests reported a result",
            report.tests.len(),
            tests.len()
        ));
    }
    // vng exits with the guest's status when it can read it, and 255 when
    // the guest had no port to write it to (no udev on the host).
    match vng {
        Ok(s) if s.success() || s.code() == Some(255) => Outcome::Passed,
        _ => Outcome::Failed(format!(
            "the tests passed but vng did not exit cleanly ({vng_said})"
        )),
    }
}

fn fresh_dir(dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// `results` lines: `<test> <exit code> <seconds>`.
fn read_results(path: &Path) -> Vec<(String, bool, u64)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let name = f.next()?.to_owned();
            let code: i32 = f.next()?.parse().ok()?;
            let secs: u64 = f.next()?.parse().ok()?;
            Some((name, code == 0, secs))
        })
        .collect()
}

/// The script the guest runs as root: mount what the tests need, run each
/// test alone, and leave the results in `out`.
fn guest_script(out: &Path, snapshot: &Snapshot, tests: &[&VmTest]) -> Result<String> {
    let quote = |p: &Path| -> Result<String> {
        let s = p.to_str().context("a non-UTF-8 path")?;
        if s.contains('\'') {
            bail!("a path with a single quote: {s}");
        }
        Ok(format!("'{s}'"))
    };
    let mut runs = String::new();
    for t in tests {
        let bin = snapshot
            .binaries
            .get(t.target)
            .with_context(|| format!("no test binary for {}", t.target))?;
        writeln!(runs, "run {} {}", quote(bin)?, t.name)?;
    }
    Ok(GUEST_SCRIPT
        .replace("@OUT@", &quote(out)?)
        .replace("@DEBUG@", &quote(&snapshot.guest_dir)?)
        .replace("@SNAPSHOT@", &quote(&snapshot.dir)?)
        .replace("@TIMEOUT@", &TEST_TIMEOUT_SECS.to_string())
        .replace("@RUNS@", &runs))
}

/// See [`guest_script`]. A skip inside the VM would hide a missing kernel
/// feature, so `METERD_ALLOW_SKIP` is unset there whatever the host says.
const GUEST_SCRIPT: &str = r#"#!/bin/bash
# Written by `cargo xtask vmtest` (xtask/src/vmtest.rs); runs as root in the VM.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
out=@OUT@
say() { echo "vmtest[$(uname -r)]: $*"; }
fail() { say "$*"; echo 1 > "$out/status"; exit 1; }
uname -r > "$out/started"
say "booted: $(nproc) vCPUs, $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) MiB"

# cgroup v2: virtme-ng mounts one at /sys/fs/cgroup; a hybrid layout would
# have v1 there, so v2 goes to unified/.
if ! awk '$3 == "cgroup2" {f = 1} END {exit !f}' /proc/mounts; then
    dir=/sys/fs/cgroup
    if mountpoint -q "$dir"; then dir=/sys/fs/cgroup/unified; mkdir -p "$dir"; fi
    mount -t cgroup2 cgroup2 "$dir" || fail "cannot mount cgroup2 on $dir"
fi
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {f = 1} END {exit !f}' /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf || fail "cannot mount bpffs on /sys/fs/bpf"
fi
say "cgroup2 at $(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts), bpffs at /sys/fs/bpf"

# A temporary directory of the guest's own (the host's /tmp, under an
# overlay, holds other runs' test directories), as TMPDIR: not a tmpfs over
# /tmp itself, which would hide the workspace when it lives under /tmp.
# The build goes to RAM as well, where the test binaries look for it:
# executables read over 9p made each agent start take ~15 s.
guest_tmp=/run/meterd-vmtest
mkdir -p "$guest_tmp" && mount -t tmpfs -o mode=1777 tmpfs "$guest_tmp" \
    || fail "cannot mount a tmpfs on $guest_tmp"
export TMPDIR="$guest_tmp"
mount -t tmpfs tmpfs @DEBUG@ || fail "cannot mount a tmpfs on @DEBUG@"
cp -a @SNAPSHOT@/. @DEBUG@/ || fail "cannot copy the build into the guest"

export METERD_BIN=@DEBUG@/meterd RUST_BACKTRACE=1
unset METERD_ALLOW_SKIP METERD_TEST_KEEP
cd "$guest_tmp" || fail "no $guest_tmp"
failed=0
run() {
    local bin=$1 name=$2 start=$SECONDS rc
    say "running $name"
    timeout -k 10 @TIMEOUT@ "$bin" --exact "$name" --test-threads 1 --color never
    rc=$?
    [ "$rc" -eq 124 ] && say "$name: timed out after @TIMEOUT@ s"
    say "$name: exit $rc after $((SECONDS - start)) s"
    echo "$name $rc $((SECONDS - start))" >> "$out/results"
    [ "$rc" -eq 0 ] || failed=1
}
@RUNS@
dmesg > "$out/dmesg.txt" 2>&1
if [ "$failed" -ne 0 ]; then
    mkdir -p "$out/kept"
    cp -a "$guest_tmp"/meterd-test-* "$out/kept/" 2>/dev/null
fi
echo "$failed" > "$out/status"
sync
exit "$failed"
"#;

/// Runs `cmd` until it exits or `limit` passes; then kills it and
/// everything it started (vng forks qemu). Its output goes to ours and to
/// `log`, through pipes: qemu reopens its stdout and stderr by
/// `/proc/self/fd/N`, which on a regular file gets an offset of its own
/// and overwrites what was written through the other.
fn run_until(cmd: &mut Command, limit: Duration, log: &Path) -> Result<ExitStatus> {
    println!("xtask:   $ {}", util::display(cmd));
    let log = Arc::new(Mutex::new(
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
    ));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start vng")?;
    let copies = [
        child
            .stdout
            .take()
            .map(|out| tee(out, io::stdout, Arc::clone(&log))),
        child
            .stderr
            .take()
            .map(|err| tee(err, io::stderr, Arc::clone(&log))),
    ];
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Ok(status);
        }
        if start.elapsed() > limit {
            util::note(format!(
                "the VM is still running after {} s: killing it",
                limit.as_secs()
            ));
            kill_tree(&mut child);
            break Err(anyhow::anyhow!("killed after {} s", limit.as_secs()));
        }
        thread::sleep(Duration::from_millis(500));
    };
    for copy in copies.into_iter().flatten() {
        let _ = copy.join();
    }
    status
}

/// Copies `from` to the terminal stream `to` and to `log` until it closes.
fn tee<R, W>(mut from: R, to: fn() -> W, log: Arc<Mutex<fs::File>>) -> thread::JoinHandle<()>
where
    R: Read + Send + 'static,
    W: Write + 'static,
{
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut out = to();
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            if let Ok(mut log) = log.lock() {
                let _ = log.write_all(&buf[..n]);
            }
        }
    })
}

/// SIGKILLs `child`'s descendants (found in /proc), then `child`.
fn kill_tree(child: &mut Child) {
    let mut pids = vec![child.id()];
    let mut i = 0;
    while i < pids.len() {
        let pid = pids[i];
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    for pid in pids.iter().skip(1).rev() {
        if let Ok(pid) = libc::pid_t::try_from(*pid) {
            // SAFETY: kill has no memory-safety preconditions; these are
            // processes this xtask started (vng's children).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Prints each kernel's results; `Err` if any failed, or could not boot
/// and skipping was not allowed.
fn summarize(reports: &[KernelReport], allow_skip: bool) -> Result<()> {
    let mut failed = Vec::new();
    for r in reports {
        let release = r.release.as_deref().unwrap_or("not booted");
        let took = match r.boot {
            Some(boot) => format!(
                "{} test(s) in {} s, booted in {} s",
                r.tests.len(),
                r.wall.as_secs(),
                boot.as_secs()
            ),
            None => format!("{} s", r.wall.as_secs()),
        };
        let line = match &r.outcome {
            Outcome::Passed => format!("vmtest {} ({release}): passed, {took}", r.label),
            Outcome::Failed(why) => {
                failed.push(format!("{}: {why}", r.label));
                format!("vmtest {} ({release}): FAILED ({took}): {why}", r.label)
            }
            // The caller reports the skip (`cargo xtask test` in its list).
            Outcome::Unbootable(why) if allow_skip => {
                format!("vmtest {}: the VM cannot boot here: {why}", r.label)
            }
            Outcome::Unbootable(why) => {
                failed.push(format!("{}: the VM cannot boot here: {why}", r.label));
                format!(
                    "vmtest {}: FAILED: the VM cannot boot here: {why} (`--allow-skip` \
                     reports this as SKIPPED)",
                    r.label
                )
            }
        };
        util::note(line);
        for (name, ok, secs) in &r.tests {
            let result = if *ok { "ok" } else { "FAILED" };
            util::note(format!("  {result:<6} {secs:>4} s  {name}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("vmtest failed: {}", failed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    const TEST: VmTest = VmTest {
        target: "kernel_counting",
        name: "udp_flow_payload_is_exact",
        why: "",
    };

    fn image() -> Image {
        Image {
            release: "6.1.0-50-amd64".to_owned(),
            vmlinuz: PathBuf::from("/nonexistent"),
        }
    }

    fn report(release: Option<&str>, tests: &[(&str, bool)]) -> KernelReport {
        KernelReport {
            release: release.map(str::to_owned),
            tests: tests.iter().map(|&(n, ok)| (n.to_owned(), ok, 1)).collect(),
            ..KernelReport::unbootable("6.1", String::new())
        }
    }

    /// vng's exit status for `code` (`waitpid`'s encoding), as `run_until`
    /// returns it.
    #[expect(clippy::unnecessary_wraps, reason = "the shape verdict takes")]
    fn exit(code: i32) -> Result<ExitStatus> {
        Ok(ExitStatus::from_raw(code << 8))
    }

    fn verdict_of(report: &KernelReport, vng: &Result<ExitStatus>, status: Option<i32>) -> Outcome {
        verdict(
            &image(),
            &[&TEST],
            report,
            vng,
            status,
            Path::new("/nonexistent"),
        )
    }

    #[test]
    fn a_vm_that_never_ran_its_script_is_unbootable() {
        let outcome = verdict_of(&report(None, &[]), &exit(255), None);
        assert!(matches!(outcome, Outcome::Unbootable(_)), "{outcome:?}");
    }

    #[test]
    fn a_vm_that_died_mid_run_failed() {
        let r = report(Some("6.1.0-50-amd64"), &[]);
        assert!(matches!(
            verdict_of(&r, &exit(255), None),
            Outcome::Failed(_)
        ));
        let killed = Err(anyhow::anyhow!("killed after 600 s"));
        assert!(matches!(verdict_of(&r, &killed, None), Outcome::Failed(_)));
    }

    #[test]
    fn the_status_file_decides_and_vng_is_cross_checked() {
        let passed = report(Some("6.1.0-50-amd64"), &[(TEST.name, true)]);
        // No udev on the host: vng cannot read the guest's status.
        assert!(matches!(
            verdict_of(&passed, &exit(255), Some(0)),
            Outcome::Passed
        ));
        assert!(matches!(
            verdict_of(&passed, &exit(0), Some(0)),
            Outcome::Passed
        ));
        assert!(matches!(
            verdict_of(&passed, &exit(1), Some(0)),
            Outcome::Failed(_)
        ));
        let failed = report(Some("6.1.0-50-amd64"), &[(TEST.name, false)]);
        assert!(matches!(
            verdict_of(&failed, &exit(255), Some(1)),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            verdict_of(&failed, &exit(0), Some(0)),
            Outcome::Failed(_)
        ));
        let missing = report(Some("6.1.0-50-amd64"), &[]);
        assert!(matches!(
            verdict_of(&missing, &exit(0), Some(0)),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn another_kernel_than_asked_for_fails() {
        let r = report(Some("6.18.44"), &[(TEST.name, true)]);
        assert!(matches!(
            verdict_of(&r, &exit(0), Some(0)),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn results_and_cargo_messages_parse() {
        let dir = std::env::temp_dir().join(format!("xtask-vmtest-{}", std::process::id()));
        fresh_dir(&dir).unwrap();
        fs::write(dir.join("results"), "a 0 12\nb 101 30\ntruncated 0\n").unwrap();
        assert_eq!(
            read_results(&dir.join("results")),
            vec![("a".to_owned(), true, 12), ("b".to_owned(), false, 30)]
        );
        fs::remove_dir_all(&dir).unwrap();

        let json = r#"{"reason":"compiler-artifact","target":{"name":"billing","kind":["test"]},"executable":"/t/debug/deps/billing-1"}
{"reason":"compiler-artifact","target":{"name":"meterd-traffic","kind":["bin"]},"executable":"/t/debug/meterd-traffic"}
{"reason":"compiler-artifact","target":{"name":"meterd_tests","kind":["lib"]},"executable":null}
{"reason":"build-finished","success":true}"#;
        let built = test_executables(json);
        assert_eq!(built.len(), 1);
        assert_eq!(built["billing"], PathBuf::from("/t/debug/deps/billing-1"));
    }
}
