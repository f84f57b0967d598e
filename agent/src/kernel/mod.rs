//! The kernel side, seen from the agent: loads meterd's eBPF object, attaches
//! it to the cgroup, pins it, and reads its maps.
//!
//! Owns: program and map lifetimes, pins under `agent.pin_dir`, and the raw
//! reads. Does not own: what the counts mean (the `sessions` module) or
//! money (`billing`).
//!
//! Pins make the counting outlive the agent. A started agent finds one of
//! three situations under `pin_dir`:
//! - nothing: load, attach, pin links and maps;
//! - links pinned by the same build: attach nothing, just open the pinned
//!   maps (counting never stopped, nothing is counted twice);
//! - links pinned by another build: load the new object over the same
//!   pinned maps, attach it, then detach the old links. Both run for a few
//!   microseconds; a close seen by both yields two records with the same
//!   cookie, and the agent keeps the first.
//!
//! The build is recorded as an empty directory `object-<sha256 prefix>` in
//! `pin_dir` (bpffs holds only pins and directories).

mod record;
mod ring;
pub mod sys;
pub mod system;

use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapInfo, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use meterd_common::{
    Closed, ConnInfo, Counts, PORT_SLOTS, SERVICE_SLOTS, STAT_SLOTS, UdpFlow, UdpFlowKey, map_names,
};
use sha2::{Digest as _, Sha256};

use self::sys::BatchReader;
pub use self::{record::Record, system::SystemError};
use crate::{config::Config, ledger::Committed};

/// The eBPF object built by `cargo xtask build-ebpf` (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("METERD_BPF_OBJECT"));

/// The programs in the object, in attach order: sock_ops first, so no
/// connection is established unseen while the others attach.
const PROGRAMS: [Prog; 3] = [Prog::SockOps, Prog::Egress, Prog::Ingress];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    SockOps,
    Egress,
    Ingress,
}

impl Prog {
    /// Function name in the object, also the kernel's program name.
    const fn name(self) -> &'static str {
        match self {
            Self::SockOps => "meterd_sockops",
            Self::Egress => "meterd_egress",
            Self::Ingress => "meterd_ingress",
        }
    }

    const fn link_pin(self) -> &'static str {
        match self {
            Self::SockOps => "link_sockops",
            Self::Egress => "link_egress",
            Self::Ingress => "link_ingress",
        }
    }
}

/// Why the kernel side could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(
        "this kernel cannot load BPF programs ({0}); meterd needs a kernel with CONFIG_BPF_SYSCALL \
         and cgroup BPF (CONFIG_CGROUP_BPF), version 5.14 or later"
    )]
    NoBpf(String),
    #[error(
        "cannot load meterd's eBPF object: {0}; if maps pinned by an older meterd no longer \
         match, run `meterd unload` first"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "the eBPF object has no program {0}: the build is broken, rebuild with `cargo xtask build-ebpf`"
    )]
    MissingProgram(&'static str),
    #[error(
        "the eBPF object has no map {0}: the build is broken, rebuild with `cargo xtask build-ebpf`"
    )]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("map {name}: {source}")]
    MapIo {
        name: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{protocol} port {port} is already metered by another meterd (program id {prog_id}); \
         stop that one (`meterd unload --config ...`) or remove the port from this config"
    )]
    PortTaken {
        protocol: &'static str,
        port: u16,
        prog_id: u32,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    move |e| KernelError::Map {
        name,
        source: Box::new(e),
    }
}

fn io_err(name: &'static str) -> impl FnOnce(std::io::Error) -> KernelError {
    move |source| KernelError::MapIo { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> KernelError {
    move |e| KernelError::Program {
        name,
        source: Box::new(e),
    }
}

fn pin_err(path: &Path) -> impl FnOnce(String) -> KernelError {
    let path = path.to_owned();
    move |reason| KernelError::Pin { path, reason }
}

/// First 16 hex digits of the embedded object's SHA-256.
pub fn object_version() -> String {
    let digest = Sha256::digest(OBJECT);
    digest[..8].iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// How `open` found the pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Nothing was pinned: programs were loaded and attached.
    Fresh,
    /// The same build was pinned: its maps were picked up as they are.
    Resumed,
    /// Another build was pinned: the new programs replaced it over the same maps.
    Upgraded,
}

/// meterd's programs and maps, attached and pinned.
pub struct Kernel {
    pin_dir: PathBuf,
    live: MapData,
    info: MapData,
    udp_flows: MapData,
    tcp_ports: Array<MapData, u32>,
    udp_ports: Array<MapData, u32>,
    service_idle: Array<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    /// Taken by the closed-record drain (`take_closed`).
    closed: Option<RingBuf<MapData>>,
    /// Read-only view of the ring buffer's positions, for its fill level.
    ring_positions: Option<ring::Positions>,
    live_reader: BatchReader<u64, Counts>,
    udp_reader: BatchReader<UdpFlowKey, UdpFlow>,
    /// How this start found the pins.
    pub startup: Startup,
    /// The configured cgroup directory, and the cgroup (inode) that was
    /// there when the programs were attached: systemd recreates a
    /// service's cgroup on every restart of the service.
    cgroup_path: PathBuf,
    cgroup_id: u64,
    /// Whether the cgroup was missing at the last check (logged once).
    cgroup_missing: bool,
}

impl Kernel {
    /// Checks the host, then attaches (or re-uses) the programs and opens the
    /// maps, and writes the config's ports into them.
    pub fn open(config: &Config) -> Result<Self, KernelError> {
        system::check_privileges()?;
        let cgroup_path = system::resolve_cgroup(config.agent.cgroup.as_deref())?;
        let pin_dir = config.agent.pin_dir.clone();
        system::ensure_pin_dir(&pin_dir)?;
        probe_bpf()?;

        let version = object_version();
        let pinned_version = pinned_version(&pin_dir);
        let cgroup_id = cgroup_inode(&cgroup_path)?;
        // "Resumed" only if the pinned links are attached to the cgroup
        // that is at the path now: a recreated cgroup has nothing attached.
        let attached_here = PROGRAMS.iter().all(|p| {
            let link = pin_dir.join(p.link_pin());
            !link.exists() || sys::link_cgroup_id(&link).is_ok_and(|id| id == cgroup_id)
        });
        if !attached_here {
            tracing::warn!(
                cgroup = %cgroup_path.display(),
                "the pinned programs are attached to a cgroup that is no longer at this path \
                 (recreated, e.g. by `systemctl restart`): attaching to the current one"
            );
        }
        let same_build = attached_here && pinned_version.as_deref() == Some(version.as_str());
        let mut ebpf: Option<Ebpf> = None;
        let mut startup = Startup::Resumed;
        for prog in PROGRAMS {
            let wanted = prog != Prog::Ingress || config.meters_udp();
            let link_path = pin_dir.join(prog.link_pin());
            let pinned = link_path.exists();
            if wanted && !(pinned && same_build) {
                if ebpf.is_none() {
                    ebpf = Some(load(config)?);
                }
                let bpf = ebpf.as_mut().expect("loaded just above");
                startup = if pinned {
                    Startup::Upgraded
                } else {
                    Startup::Fresh
                };
                attach_and_pin(bpf, prog, &cgroup_path, &link_path)?;
            } else if !wanted && pinned {
                tracing::info!(program = prog.name(), "no UDP port is metered: detaching");
                unpin_link(&link_path)?;
            }
        }
        record_version(&pin_dir, &version)?;

        let mut maps = MapSource {
            ebpf,
            pin_dir: &pin_dir,
        };
        let closed = RingBuf::try_from(maps.map(map_names::CLOSED)?).map_err(map_err("CLOSED"))?;
        let ring_positions = match ring::Positions::new(closed.as_fd()) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot map the ring buffer positions: its fill level is not reported");
                None
            }
        };
        let mut kernel = Self {
            live: maps.data(map_names::LIVE)?,
            info: maps.data(map_names::INFO)?,
            udp_flows: maps.data(map_names::UDP_FLOWS)?,
            tcp_ports: Array::try_from(maps.map(map_names::TCP_PORTS)?)
                .map_err(map_err("TCP_PORTS"))?,
            udp_ports: Array::try_from(maps.map(map_names::UDP_PORTS)?)
                .map_err(map_err("UDP_PORTS"))?,
            service_idle: Array::try_from(maps.map(map_names::SERVICE_IDLE)?)
                .map_err(map_err("SERVICE_IDLE"))?,
            stats: PerCpuArray::try_from(maps.map(map_names::STATS)?).map_err(map_err("STATS"))?,
            closed: Some(closed),
            ring_positions,
            live_reader: BatchReader::new(16_384),
            udp_reader: BatchReader::new(4096),
            pin_dir,
            startup,
            cgroup_path,
            cgroup_id,
            cgroup_missing: false,
        };
        kernel.check_other_meterds(config)?;
        kernel.write_service_idle(config)?;
        kernel.write_ports(config)?;
        Ok(kernel)
    }

    /// The bpffs directory of the pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Checks that the cgroup at the configured path is still the one the
    /// programs are attached to, and attaches them to the new one if it
    /// was recreated (systemd does this on every restart of the service).
    /// Returns whether it reattached. Called every cycle: a recreated
    /// cgroup is metered again within one interval.
    pub fn check_cgroup(&mut self, config: &Config) -> Result<bool, KernelError> {
        let Ok(id) = cgroup_inode(&self.cgroup_path) else {
            if !self.cgroup_missing {
                tracing::warn!(
                    cgroup = %self.cgroup_path.display(),
                    "the metered cgroup is gone: nothing new is metered until it is back"
                );
                self.cgroup_missing = true;
            }
            return Ok(false);
        };
        self.cgroup_missing = false;
        if id == self.cgroup_id {
            return Ok(false);
        }
        tracing::warn!(
            cgroup = %self.cgroup_path.display(),
            "the metered cgroup was recreated: attaching meterd's programs to the new one"
        );
        let mut bpf = load(config)?;
        for prog in PROGRAMS {
            if prog != Prog::Ingress || config.meters_udp() {
                attach_and_pin(
                    &mut bpf,
                    prog,
                    &self.cgroup_path,
                    &self.pin_dir.join(prog.link_pin()),
                )?;
            }
        }
        self.cgroup_id = id;
        Ok(true)
    }

    /// Refuses ports that another meterd instance (other pins) meters.
    fn check_other_meterds(&self, config: &Config) -> Result<(), KernelError> {
        let ours = [self.tcp_ports.map_data_id()?, self.udp_ports.map_data_id()?];
        for info in aya::programs::loaded_programs().flatten() {
            if info.name_as_str() != Some(Prog::SockOps.name())
                && info.name_as_str() != Some(Prog::Egress.name())
            {
                continue;
            }
            let Ok(Some(map_ids)) = info.map_ids() else {
                continue;
            };
            if map_ids.iter().any(|id| ours.contains(id)) {
                continue;
            }
            for id in map_ids {
                let Ok(map_info) = MapInfo::from_id(id) else {
                    continue;
                };
                let (protocol, ports) = match map_info.name_as_str() {
                    Some(n) if n == map_names::TCP_PORTS => ("tcp", service_ports(config, true)),
                    Some(n) if n == map_names::UDP_PORTS => ("udp", service_ports(config, false)),
                    _ => continue,
                };
                let Ok(data) = MapData::from_id(id) else {
                    continue;
                };
                for port in ports {
                    if let Ok(Some(v)) =
                        sys::lookup::<u32, u32>(data.fd().as_fd(), &u32::from(port))
                        && v != 0
                    {
                        return Err(KernelError::PortTaken {
                            protocol,
                            port,
                            prog_id: info.id(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Tells the kernel each service's `session_idle`, so it can mark gaps
    /// however rarely the agent reads. Written before the ports, so a
    /// service is never metered without it.
    fn write_service_idle(&mut self, config: &Config) -> Result<(), KernelError> {
        for index in 0..SERVICE_SLOTS {
            let idle = config.services.get(index as usize).map_or(0, |s| {
                u64::try_from(s.session_idle.as_nanos()).unwrap_or(u64::MAX)
            });
            let current = self
                .service_idle
                .get(&index, 0)
                .map_err(map_err("SERVICE_IDLE"))?;
            if current != idle {
                self.service_idle
                    .set(index, &idle, 0)
                    .map_err(map_err("SERVICE_IDLE"))?;
            }
        }
        Ok(())
    }

    /// Makes the port maps say exactly what the config says.
    fn write_ports(&mut self, config: &Config) -> Result<(), KernelError> {
        for (tcp, array, name) in [
            (true, &mut self.tcp_ports, "TCP_PORTS"),
            (false, &mut self.udp_ports, "UDP_PORTS"),
        ] {
            let mut wanted = vec![0u32; PORT_SLOTS as usize];
            for (index, service) in config.services.iter().enumerate() {
                let ports = if tcp {
                    &service.tcp_ports
                } else {
                    &service.udp_ports
                };
                for &p in ports {
                    wanted[usize::from(p)] = index as u32 + 1;
                }
            }
            let mut current = Vec::new();
            BatchReader::<u32, u32>::new(PORT_SLOTS as usize)
                .read_all(array.map_data_fd(), &mut current)
                .map_err(io_err(name))?;
            for (port, value) in current {
                let want = wanted[port as usize];
                if value != want {
                    array.set(port, &want, 0).map_err(map_err(name))?;
                }
            }
        }
        Ok(())
    }

    /// Reads every live TCP connection's counts into `out`.
    pub fn read_live(&mut self, out: &mut Vec<(u64, Counts)>) -> Result<(), KernelError> {
        self.live_reader
            .read_all(self.live.fd().as_fd(), out)
            .map_err(io_err("LIVE"))
    }

    /// Who a live connection is; `None` if it is gone.
    pub fn info(&self, cookie: u64) -> Result<Option<ConnInfo>, KernelError> {
        sys::lookup(self.info.fd().as_fd(), &cookie).map_err(io_err("INFO"))
    }

    /// Current counts of one connection; `None` if it is gone.
    pub fn live_counts(&self, cookie: u64) -> Result<Option<Counts>, KernelError> {
        sys::lookup(self.live.fd().as_fd(), &cookie).map_err(io_err("LIVE"))
    }

    /// Removes a connection that closed while the ring buffer was full,
    /// once its final counts are committed.
    pub fn forget(&self, cookie: u64, _committed: &Committed) -> Result<(), KernelError> {
        sys::delete(self.live.fd().as_fd(), &cookie).map_err(io_err("LIVE"))?;
        sys::delete(self.info.fd().as_fd(), &cookie).map_err(io_err("INFO"))
    }

    /// Reads every live UDP flow into `out`.
    pub fn read_udp(&mut self, out: &mut Vec<(UdpFlowKey, UdpFlow)>) -> Result<(), KernelError> {
        self.udp_reader
            .read_all(self.udp_flows.fd().as_fd(), out)
            .map_err(io_err("UDP_FLOWS"))
    }

    /// Current counts of one UDP flow; `None` if it is gone.
    pub fn udp_flow(&self, key: &UdpFlowKey) -> Result<Option<UdpFlow>, KernelError> {
        sys::lookup(self.udp_flows.fd().as_fd(), key).map_err(io_err("UDP_FLOWS"))
    }

    /// Atomically removes an ended UDP flow and returns its final counts.
    pub fn take_udp(&self, key: &UdpFlowKey) -> Result<Option<UdpFlow>, KernelError> {
        sys::lookup_and_delete(self.udp_flows.fd().as_fd(), key).map_err(io_err("UDP_FLOWS"))
    }

    /// The ring buffer of closed connections, for the async drain.
    pub fn take_closed(&mut self) -> Option<RingBuf<MapData>> {
        self.closed.take()
    }

    /// Unread bytes in the ring buffer and its size.
    pub fn ring_fill(&self) -> Option<(u64, u64)> {
        self.ring_positions.as_ref().map(ring::Positions::fill)
    }

    /// Run time and count of meterd's programs, when the kernel keeps them
    /// (`kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        // Checked first: walking the loaded programs costs syscalls per
        // program, every cycle, and the numbers exist only with stats on.
        let enabled =
            fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1");
        if !enabled {
            return Vec::new();
        }
        let Ok(ours) = self.tcp_ports.map_data_id() else {
            return Vec::new();
        };
        aya::programs::loaded_programs()
            .flatten()
            .filter(|p| {
                PROGRAMS
                    .iter()
                    .any(|prog| p.name_as_str() == Some(prog.name()))
                    && p.map_ids()
                        .ok()
                        .flatten()
                        .is_some_and(|ids| ids.contains(&ours))
            })
            .map(|p| {
                (
                    p.name_as_str().unwrap_or_default().to_owned(),
                    p.run_time(),
                    p.run_count(),
                )
            })
            .collect()
    }

    /// Sum over CPUs of each `STATS` slot.
    pub fn stats(&self) -> Result<[u64; STAT_SLOTS as usize], KernelError> {
        let mut out = [0u64; STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.stats.get(&(i as u32), 0).map_err(map_err("STATS"))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Detaches meterd's programs and removes every pin under `pin_dir`.
    /// Counts of connections still open are dropped with the maps.
    pub fn unload(pin_dir: &Path) -> Result<UnloadReport, KernelError> {
        system::check_privileges()?;
        let mut report = UnloadReport::default();
        if !pin_dir.exists() {
            return Ok(report);
        }
        // Never delete outside bpffs: a pin_dir that is an ordinary
        // directory (a typo, a ledger directory) is refused, not emptied.
        if !system::on_bpffs(pin_dir) {
            return Err(SystemError::NotOnBpffs {
                path: pin_dir.to_owned(),
            }
            .into());
        }
        if let Ok(data) = MapData::from_pin(pin_dir.join(map_names::LIVE)) {
            let mut live = Vec::new();
            if BatchReader::<u64, Counts>::new(16_384)
                .read_all(data.fd().as_fd(), &mut live)
                .is_ok()
            {
                report.live_dropped = live.len();
            }
        }
        // Clear the ports first: a detached program lingers until the kernel
        // frees it, and must not look like a meterd still metering them.
        for name in [map_names::TCP_PORTS, map_names::UDP_PORTS] {
            if let Ok(data) = MapData::from_pin(pin_dir.join(name)) {
                let mut ports = Vec::new();
                BatchReader::<u32, u32>::new(PORT_SLOTS as usize)
                    .read_all(data.fd().as_fd(), &mut ports)
                    .map_err(io_err(name))?;
                for (port, value) in ports {
                    if value != 0 {
                        sys::update(data.fd().as_fd(), &port, &0u32).map_err(io_err(name))?;
                    }
                }
            }
        }
        for prog in PROGRAMS {
            let path = pin_dir.join(prog.link_pin());
            if path.exists() {
                unpin_link(&path)?;
                report.links += 1;
            }
        }
        for entry in fs::read_dir(pin_dir).map_err(|e| pin_err(pin_dir)(e.to_string()))? {
            let entry = entry.map_err(|e| pin_err(pin_dir)(e.to_string()))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only what meterd pins itself: its build marker, its links and
            // its maps (all upper-case names from the object).
            let ours_dir = name.starts_with("object-") && path.is_dir();
            let ours_pin = !path.is_dir()
                && (name.starts_with("link_")
                    || (!name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')));
            if !(ours_dir || ours_pin) {
                report.left.push(name);
                continue;
            }
            let result = if ours_dir {
                fs::remove_dir(&path)
            } else {
                report.maps += 1;
                fs::remove_file(&path)
            };
            result.map_err(|e| pin_err(&path)(e.to_string()))?;
        }
        if report.left.is_empty() {
            fs::remove_dir(pin_dir).map_err(|e| pin_err(pin_dir)(e.to_string()))?;
        }
        Ok(report)
    }
}

/// What `unload` removed.
#[derive(Debug, Default)]
pub struct UnloadReport {
    /// Links detached.
    pub links: usize,
    /// Map pins removed.
    pub maps: usize,
    /// Open connections whose counts were dropped.
    pub live_dropped: usize,
    /// Entries of `pin_dir` that meterd did not make, left in place.
    pub left: Vec<String>,
}

/// Fd and id accessors on aya's typed arrays.
trait MapDataExt {
    fn map_data_fd(&self) -> BorrowedFd<'_>;
    fn map_data_id(&self) -> Result<u32, KernelError>;
}

impl MapDataExt for Array<MapData, u32> {
    fn map_data_fd(&self) -> BorrowedFd<'_> {
        use aya::maps::IterableMap as _;
        self.map().fd().as_fd()
    }

    fn map_data_id(&self) -> Result<u32, KernelError> {
        use aya::maps::IterableMap as _;
        Ok(self.map().info().map_err(map_err("ports"))?.id())
    }
}

/// Where maps come from: the freshly loaded object, or the pins.
struct MapSource<'a> {
    ebpf: Option<Ebpf>,
    pin_dir: &'a Path,
}

impl MapSource<'_> {
    fn map(&mut self, name: &'static str) -> Result<Map, KernelError> {
        if let Some(bpf) = &mut self.ebpf {
            bpf.take_map(name).ok_or(KernelError::MissingMap(name))
        } else {
            let data = MapData::from_pin(self.pin_dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        }
    }

    fn data(&mut self, name: &'static str) -> Result<MapData, KernelError> {
        match self.map(name)? {
            Map::HashMap(data) => Ok(data),
            _ => Err(KernelError::MissingMap(name)),
        }
    }
}

fn probe_bpf() -> Result<(), KernelError> {
    use aya::programs::ProgramType;
    for t in [ProgramType::SockOps, ProgramType::CgroupSkb] {
        match aya::sys::is_program_supported(t) {
            Ok(true) => {}
            Ok(false) => {
                return Err(KernelError::NoBpf(format!(
                    "{t:?} programs are not supported"
                )));
            }
            Err(e) => return Err(KernelError::NoBpf(e.to_string())),
        }
    }
    Ok(())
}

fn load(config: &Config) -> Result<Ebpf, KernelError> {
    let n = config.agent.max_connections;
    EbpfLoader::new()
        .default_map_pin_directory(&config.agent.pin_dir)
        .map_max_entries(map_names::LIVE, n)
        .map_max_entries(map_names::INFO, n)
        .load(OBJECT)
        .map_err(|e| KernelError::Load(Box::new(e)))
}

fn attach_and_pin(
    bpf: &mut Ebpf,
    prog: Prog,
    cgroup_path: &Path,
    link_path: &Path,
) -> Result<(), KernelError> {
    let name = prog.name();
    let cgroup = fs::File::open(cgroup_path).map_err(|source| KernelError::Cgroup {
        path: cgroup_path.to_owned(),
        source,
    })?;
    let program = bpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?;
    // aya 0.16 attaches through bpf_link_create; AllowMultiple fails there
    // with EINVAL, while the default mode coexists with other links.
    let link: FdLink = match prog {
        Prog::SockOps => {
            let p: &mut SockOps = program.try_into().map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
            let id = p
                .attach(&cgroup, CgroupAttachMode::default())
                .map_err(prog_err(name))?;
            p.take_link(id).map_err(prog_err(name))?.try_into()
        }
        Prog::Egress | Prog::Ingress => {
            let p: &mut CgroupSkb = program.try_into().map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
            let direction = if prog == Prog::Egress {
                CgroupSkbAttachType::Egress
            } else {
                CgroupSkbAttachType::Ingress
            };
            let id = p
                .attach(&cgroup, direction, CgroupAttachMode::default())
                .map_err(prog_err(name))?;
            p.take_link(id).map_err(prog_err(name))?.try_into()
        }
    }
    .map_err(|e| pin_err(link_path)(format!("not a bpf_link: {e}")))?;
    // Pin the new link beside the old one, then swap: there is no moment
    // without a counting program.
    // bpffs refuses names with a dot.
    let mut fresh = link_path.as_os_str().to_owned();
    fresh.push("_new");
    let fresh = PathBuf::from(fresh);
    let _ = fs::remove_file(&fresh);
    link.pin(&fresh)
        .map_err(|e| pin_err(&fresh)(e.to_string()))?;
    if link_path.exists() {
        unpin_link(link_path)?;
    }
    fs::rename(&fresh, link_path).map_err(|e| pin_err(link_path)(e.to_string()))?;
    tracing::info!(program = name, cgroup = %cgroup_path.display(), "attached");
    Ok(())
}

/// Unpins a link; with no pin and no fd left, the kernel detaches it.
fn unpin_link(path: &Path) -> Result<(), KernelError> {
    let link = PinnedLink::from_pin(path).map_err(|e| pin_err(path)(e.to_string()))?;
    let link = link.unpin().map_err(|e| pin_err(path)(e.to_string()))?;
    drop(link);
    Ok(())
}

/// A cgroup's id: the inode number of its cgroup2 directory.
fn cgroup_inode(path: &Path) -> Result<u64, KernelError> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| KernelError::Cgroup {
            path: path.to_owned(),
            source,
        })
}

fn pinned_version(pin_dir: &Path) -> Option<String> {
    fs::read_dir(pin_dir).ok()?.flatten().find_map(|e| {
        e.file_name()
            .to_str()?
            .strip_prefix("object-")
            .map(str::to_owned)
    })
}

fn record_version(pin_dir: &Path, version: &str) -> Result<(), KernelError> {
    if let Ok(entries) = fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("object-") && name != format!("object-{version}") {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
    let marker = pin_dir.join(format!("object-{version}"));
    match fs::create_dir(&marker) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(pin_err(&marker)(e.to_string()))
        }
        _ => Ok(()),
    }
}

fn service_ports(config: &Config, tcp: bool) -> Vec<u16> {
    config
        .services
        .iter()
        .flat_map(|s| {
            if tcp {
                s.tcp_ports.clone()
            } else {
                s.udp_ports.clone()
            }
        })
        .collect()
}

/// Decodes a `Closed` record from the ring buffer; `None` if it is short.
fn decode_closed(bytes: &[u8]) -> Option<Closed> {
    (bytes.len() >= size_of::<Closed>())
        // SAFETY: length checked; `Closed` is plain integers, any bit pattern is valid.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Closed>()) })
}
