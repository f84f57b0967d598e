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
//!
//! Cut-off ([`Kernel::cut`]): a connection of an account that ran out is
//! put into the `CUT` map, whose mark the eBPF side copies into the
//! socket's storage so that its packets are dropped, then its socket is
//! destroyed with sock_diag ([`diag`]) where the kernel supports it.

pub mod diag;
mod record;
mod ring;
pub mod slots;
pub mod sys;
pub mod system;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
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
    AF_INET6, CONN_CLOSED, CUT_MARK, CUT_SLOTS, CUT_STAT_SLOTS, Closed, ConnInfo, Counts,
    PORT_SLOTS, SERVICE_SLOTS, STAT_SLOTS, UDP_STAT_SLOTS, UdpFlow, UdpFlowKey, map_names,
};
use sha2::{Digest as _, Sha256};

pub use self::{
    record::{Closes, Record},
    system::SystemError,
};
use self::{slots::Slots, sys::BatchReader};
use crate::{config::Config, ledger::Committed};

/// The eBPF object built by `cargo xtask build-ebpf` (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("METERD_BPF_OBJECT"));

/// The directory `open` makes in `pin_dir` once it has filled `FREE_SLOTS`
/// of maps it created (bpffs holds only pins and directories). Without it,
/// the queue is filled (again) before any program is attached.
const SLOTS_FILLED: &str = "slots-filled";

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
    #[error(
        "{pin_dir}: the maps are pinned and attached but {SLOTS_FILLED} is missing, so the \
         free-slot queue (FREE_SLOTS) cannot be trusted (pinned by an older meterd, or the \
         marker was removed): run `meterd unload` first"
    )]
    SlotsUnknown { pin_dir: PathBuf },
    #[error(
        "map {name} is full ({capacity} connections or flows cut off and still open): \
         nothing more can be cut until some close, are removed (`uncut`) or the account is \
         topped up"
    )]
    CutFull { name: &'static str, capacity: u32 },
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
    /// `LIVE` mapped, and `FREE_SLOTS`: shared with the ring's records,
    /// whose release returns slots.
    slots: Arc<Slots>,
    info: MapData,
    udp_flows: MapData,
    tcp_ports: Array<MapData, u32>,
    udp_ports: Array<MapData, u32>,
    service_idle: Array<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    /// `UDP_STATS`: what UDP probation did (`meterd_common::UdpStat`).
    udp_stats: PerCpuArray<MapData, u64>,
    /// Taken by the closed-record drain (`take_closed`).
    closed: Option<Closes>,
    /// Read-only view of the ring buffer's positions, for its fill level.
    ring_positions: Option<ring::Positions>,
    udp_reader: BatchReader<UdpFlowKey, UdpFlow>,
    /// `CUT`: cookies of cut TCP connections, written by [`Kernel::cut`].
    cut: MapData,
    /// `CUT_FLOWS`: keys of cut UDP flows, written by [`Kernel::cut_udp`].
    cut_flows: MapData,
    /// `CUT_STATS`: what the kernel dropped for the cut-off.
    cut_stats: PerCpuArray<MapData, u64>,
    /// `SOCK_DESTROY` for cut connections; `None` where the probe at open
    /// found it missing (cut-off then only drops packets).
    diag: Option<diag::Diag>,
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
/// A TCP connection to cut off: its cookie and 4-tuple, as `INFO` has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutTarget {
    /// The socket cookie (the `LIVE`/`INFO` key).
    pub cookie: u64,
    /// The server socket's family ([`ConnInfo::family`]): `AF_INET6` for
    /// an IPv4 client of a dual-stack server, whose addresses may be given
    /// as IPv4 or IPv4-mapped.
    pub family: u16,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl CutTarget {
    /// The target for a connection as `INFO` describes it.
    pub fn from_info(cookie: u64, info: &ConnInfo) -> Self {
        let addr = |words: [u32; 4], port: u16| {
            let ip = if info.family == AF_INET6 {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.as_chunks_mut::<4>().0.iter_mut().zip(words) {
                    // The words hold network-order bytes.
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
            };
            SocketAddr::new(ip, port)
        };
        Self {
            cookie,
            family: info.family,
            client: addr(info.remote_addr, info.remote_port),
            server: addr(info.local_addr, info.local_port),
        }
    }

    fn sock_id(&self) -> diag::SockId {
        diag::SockId {
            family: self.family,
            local: self.server,
            remote: self.client,
            cookie: self.cookie,
        }
    }
}

/// What [`Kernel::cut`] did. Every target is either `marked` or `gone`;
/// of the marked, `destroyed` sockets were aborted and `failed` ones could
/// not be (their packets are dropped all the same). Without
/// `SOCK_DESTROY` ([`Kernel::destroy_supported`]) both stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Open connections now in `CUT`: their packets are dropped (within
    /// the egress refresh period, 100 ms, of a busy socket).
    pub marked: usize,
    /// Of `marked`, sockets destroyed with `SOCK_DESTROY`.
    pub destroyed: usize,
    /// Connections that had closed already: nothing was left in `CUT`.
    pub gone: usize,
    /// Of `marked`, sockets `SOCK_DESTROY` failed on or could not find
    /// (logged): they stay cut in the kernel until they close.
    pub failed: usize,
    /// Of `destroyed`, sockets that still had data unacknowledged at
    /// [`CUT_DRAIN`]: a segment lost before the cut (whose retransmissions
    /// are dropped; the client's application has exactly what it
    /// acknowledged, so the count is still exact), or an RTT longer than
    /// the wait (what the client received and had not acknowledged yet is
    /// not billed).
    pub destroyed_in_flight: usize,
    /// How long the call took (the wait for in-flight data included).
    pub waited: Duration,
}

/// How long after the `CUT` mark [`Kernel::cut`] waits before it destroys
/// a socket: from then on every packet of the socket is dropped. The
/// egress fast path is taken only within 25 jiffies (100 ms at HZ=250,
/// plus a jiffy of rounding) of the socket's last slow path, and every
/// slow path after the mark sets the flag. On a kernel with HZ=100 the
/// window is 250 ms: a segment sent in it after the destroy's check can be
/// delivered and not billed.
pub const CUT_SETTLE: Duration = Duration::from_millis(110);

/// The longest [`Kernel::cut`] waits for a marked socket's in-flight data
/// to be acknowledged before it destroys the socket anyway: [`CUT_SETTLE`]
/// plus ~200 ms for the last ACKs.
pub const CUT_DRAIN: Duration = Duration::from_millis(300);

/// How often [`Kernel::cut`] asks sock_diag whether a socket has drained.
const CUT_POLL: Duration = Duration::from_millis(2);

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
        let fresh_slots = fill_new_slots(config, &pin_dir, &mut ebpf)?;
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
        let slots = Arc::new(match fresh_slots {
            Some(s) => s,
            None => Slots::new(
                maps.any_data(map_names::LIVE)?,
                maps.any_data(map_names::FREE_SLOTS)?,
            )
            .map_err(io_err("LIVE"))?,
        });
        let diag = open_diag(&cgroup_path);
        let mut kernel = Self {
            cut: maps.data(map_names::CUT)?,
            cut_flows: maps.data(map_names::CUT_FLOWS)?,
            cut_stats: PerCpuArray::try_from(maps.map(map_names::CUT_STATS)?)
                .map_err(map_err("CUT_STATS"))?,
            diag,
            info: maps.data(map_names::INFO)?,
            udp_flows: maps.data(map_names::UDP_FLOWS)?,
            tcp_ports: Array::try_from(maps.map(map_names::TCP_PORTS)?)
                .map_err(map_err("TCP_PORTS"))?,
            udp_ports: Array::try_from(maps.map(map_names::UDP_PORTS)?)
                .map_err(map_err("UDP_PORTS"))?,
            service_idle: Array::try_from(maps.map(map_names::SERVICE_IDLE)?)
                .map_err(map_err("SERVICE_IDLE"))?,
            stats: PerCpuArray::try_from(maps.map(map_names::STATS)?).map_err(map_err("STATS"))?,
            udp_stats: PerCpuArray::try_from(maps.map(map_names::UDP_STATS)?)
                .map_err(map_err("UDP_STATS"))?,
            closed: Some(Closes::new(closed, Arc::clone(&slots))),
            slots,
            ring_positions,
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
        // Logged once the programs are attached: from here on, every new
        // connection in the cgroup is metered (the tests wait for this).
        tracing::warn!(
            cgroup = %self.cgroup_path.display(),
            "the metered cgroup was recreated: meterd's programs are attached to the new one"
        );
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

    /// Reads every live TCP connection's counts into `out`, from the
    /// mapped `LIVE` array: no syscall (see [`slots`]).
    pub fn read_live(&mut self, out: &mut Vec<(u64, Counts)>) {
        self.slots.read(out);
    }

    /// `LIVE` slots held by connections now, and how many there are.
    pub fn slots_in_use(&self) -> (usize, usize) {
        (self.slots.in_use(), self.slots.capacity())
    }

    /// Slots this agent could not return to `FREE_SLOTS` (logged each).
    pub fn slot_leaks(&self) -> u64 {
        self.slots.leaks()
    }

    /// Who a live connection is; `None` if it is gone.
    pub fn info(&self, cookie: u64) -> Result<Option<ConnInfo>, KernelError> {
        sys::lookup(self.info.fd().as_fd(), &cookie).map_err(io_err("INFO"))
    }

    /// Current counts of one connection (its `INFO` entry names its
    /// slot); `None` if it is gone or untracked.
    pub fn live_counts(&self, cookie: u64) -> Result<Option<Counts>, KernelError> {
        Ok(self
            .info(cookie)?
            .and_then(|info| self.slots.counts(info.slot, cookie)))
    }

    /// The final counts of a connection that closed while the ring buffer
    /// was full (`info` flagged [`CONN_CLOSED`]): read fresh from its slot,
    /// which the close wrote last.
    pub fn closed_counts(&self, cookie: u64, info: &ConnInfo) -> Option<Counts> {
        self.slots.counts(info.slot, cookie)
    }

    /// Removes a connection that closed while the ring buffer was full,
    /// once its final counts are committed: returns its slot (as
    /// [`Record::release`] does for a close record), then deletes its
    /// `INFO` entry. In that order: a crash between the two leaves an
    /// `INFO` entry flagged closed and no slot, which costs one `INFO`
    /// entry; the other order would leave the slot held for good, read
    /// every cycle.
    pub fn forget(&self, closed: &Closed, committed: &Committed) -> Result<(), KernelError> {
        if let Err(e) = self
            .slots
            .release(closed.info.slot, closed.cookie, committed)
        {
            tracing::error!(
                cookie = closed.cookie,
                slot = closed.info.slot,
                error = %e,
                "cannot return a closed connection's slot to FREE_SLOTS: one live slot fewer"
            );
            self.slots.leaked();
        }
        sys::delete(self.info.fd().as_fd(), &closed.cookie).map_err(io_err("INFO"))
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
    pub fn take_closed(&mut self) -> Option<Closes> {
        self.closed.take()
    }

    /// Unread bytes in the ring buffer and its size.
    pub fn ring_fill(&self) -> Option<(u64, u64)> {
        self.ring_positions.as_ref().map(ring::Positions::fill)
    }

    /// Run time and count of meterd's programs, when the kernel keeps them
    /// (`kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> Vec<(String, Duration, u64)> {
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

    /// Whether cut connections' sockets are destroyed (`SOCK_DESTROY`
    /// worked when the kernel was opened); false: cut-off drops packets
    /// only, and the server and player notice only by their timeouts.
    pub fn destroy_supported(&self) -> bool {
        self.diag.is_some()
    }

    /// Cuts off TCP connections, exactly billed: puts each into `CUT`, so
    /// that its packets are dropped from its next egress slow path on (at
    /// once for a quiet socket, within 100 ms for a busy one), then, where
    /// `SOCK_DESTROY` works, destroys its socket (server: `ECONNABORTED`;
    /// client: a RST after its buffered data) once the drop is certainly in
    /// effect ([`CUT_SETTLE`]) and nothing the socket sent is still
    /// unacknowledged, or at [`CUT_DRAIN`]. Blocks that long: 110 ms, up
    /// to 300 ms for a socket whose last ACKs are slow to come.
    ///
    /// Why wait: the billed quantity is what the client acknowledged. A
    /// socket destroyed with data in flight never sees the ACKs of what
    /// the client did receive, so that part (up to a congestion window)
    /// would be delivered but not billed. [`CUT_SETTLE`] after the mark,
    /// every packet of the socket meets the flag (the fast path is taken
    /// only within 100 ms of a slow path, and each slow path after the mark
    /// sets the flag), so nothing new leaves; once the in-flight ACKs are
    /// in, the close record is exactly what the client received. Without
    /// `SOCK_DESTROY` nothing waits, and the count is exact too (a dropped
    /// segment is never acknowledged).
    ///
    /// A connection that closes later deletes its own `CUT` entry
    /// (sock_ops); one that had closed already is counted `gone` and left
    /// out of `CUT`. Connections that open later for the same account are
    /// not affected: cut them when they appear.
    pub fn cut(&mut self, targets: &[CutTarget]) -> Result<CutReport, KernelError> {
        let started = Instant::now();
        let mut report = CutReport::default();
        // Marked and found by sock_diag: (target, its namespace).
        let mut pending = Vec::new();
        for target in targets {
            self.mark(target.cookie)?;
            let marked_at = Instant::now();
            if !self.still_open(target.cookie)? {
                // Closed before the mark: sock_ops has already deleted
                // whatever it would (INFO goes before CUT at a close), so
                // the mark would stay forever.
                sys::delete(self.cut.fd().as_fd(), &target.cookie).map_err(io_err("CUT"))?;
                report.gone += 1;
                continue;
            }
            report.marked += 1;
            let Some(diag) = &mut self.diag else {
                continue;
            };
            match diag.find(&target.sock_id()) {
                Ok(Some((ns, _))) => pending.push((target, ns, marked_at)),
                Ok(None) => self.not_found(target, &mut report)?,
                Err(e) => {
                    tracing::warn!(cookie = target.cookie, error = %e, "cut-off: sock_diag failed; the connection's packets are dropped");
                    report.failed += 1;
                }
            }
        }
        while !pending.is_empty() {
            let now = Instant::now();
            let mut waiting = Vec::with_capacity(pending.len());
            for (target, ns, marked_at) in pending {
                let Some(diag) = &mut self.diag else { break };
                if now < marked_at + CUT_SETTLE {
                    waiting.push((target, ns, marked_at));
                    continue;
                }
                let late = now >= marked_at + CUT_DRAIN;
                let id = target.sock_id();
                let outcome = match diag.unacked_in(ns, &id) {
                    Ok(Some(0)) => diag.destroy_in(ns, &id),
                    Ok(Some(_)) if late => {
                        report.destroyed_in_flight += 1;
                        diag.destroy_in(ns, &id)
                    }
                    Ok(Some(_)) => {
                        waiting.push((target, ns, marked_at));
                        continue;
                    }
                    Ok(None) => Ok(diag::Outcome::NotFound),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(diag::Outcome::Destroyed) => report.destroyed += 1,
                    Ok(diag::Outcome::NotFound) => self.not_found(target, &mut report)?,
                    Err(e) => {
                        tracing::warn!(cookie = target.cookie, error = %e, "cut-off: SOCK_DESTROY failed; the connection's packets are dropped");
                        report.failed += 1;
                    }
                }
            }
            pending = waiting;
            // Until the first socket settles, then at the poll interval.
            if let Some(first) = pending.iter().map(|&(_, _, at)| at + CUT_SETTLE).min() {
                std::thread::sleep(
                    first
                        .saturating_duration_since(Instant::now())
                        .max(CUT_POLL),
                );
            }
        }
        report.waited = started.elapsed();
        Ok(report)
    }

    /// Books a marked connection that sock_diag does not find: closed
    /// meanwhile (its close took the `CUT` entry), or open where meterd
    /// cannot look.
    fn not_found(&self, target: &CutTarget, report: &mut CutReport) -> Result<(), KernelError> {
        if self.still_open(target.cookie)? {
            tracing::warn!(
                cookie = target.cookie,
                client = %target.client,
                server = %target.server,
                "cut-off: the socket is open but in no network namespace meterd can search; \
                 its packets are dropped, the socket is not destroyed"
            );
            report.failed += 1;
        } else {
            report.marked -= 1;
            report.gone += 1;
        }
        Ok(())
    }

    /// Takes connections out of `CUT` (a topped-up account). A socket that
    /// is still open (drop-only, or its destroy failed) sends again from
    /// its next egress slow path; a destroyed one stays closed. In
    /// drop-only mode TCP may have backed its retransmissions off by then
    /// (up to 2 min). Absent cookies are not an error.
    pub fn uncut(&mut self, cookies: &[u64]) -> Result<(), KernelError> {
        for cookie in cookies {
            sys::delete(self.cut.fd().as_fd(), cookie).map_err(io_err("CUT"))?;
        }
        Ok(())
    }

    /// Cuts off UDP flows: their datagrams are dropped both ways, and not
    /// counted, within ~134 ms (`FLOW_CUT_CHECK_SHIFT`), and a datagram of a
    /// key in `CUT_FLOWS` creates no new flow. The kernel never deletes
    /// these entries (a UDP flow has no close): [`Kernel::uncut_udp`] them
    /// at a top-up, and when the flow is taken with [`Kernel::take_udp`]
    /// unless the 4-tuple should stay blocked. Returns how many were new.
    pub fn cut_udp(&mut self, keys: &[UdpFlowKey]) -> Result<usize, KernelError> {
        let mut new = 0;
        for key in keys {
            if sys::lookup::<UdpFlowKey, u32>(self.cut_flows.fd().as_fd(), key)
                .map_err(io_err("CUT_FLOWS"))?
                .is_none()
            {
                new += 1;
            }
            match sys::update(self.cut_flows.fd().as_fd(), key, &CUT_MARK) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                    return Err(KernelError::CutFull {
                        name: map_names::CUT_FLOWS,
                        capacity: CUT_SLOTS,
                    });
                }
                Err(e) => return Err(io_err("CUT_FLOWS")(e)),
            }
        }
        Ok(new)
    }

    /// Takes UDP flows out of `CUT_FLOWS`: their datagrams pass (and are
    /// counted) again within ~134 ms.
    pub fn uncut_udp(&mut self, keys: &[UdpFlowKey]) -> Result<(), KernelError> {
        for key in keys {
            sys::delete(self.cut_flows.fd().as_fd(), key).map_err(io_err("CUT_FLOWS"))?;
        }
        Ok(())
    }

    /// The cookies in `CUT` and the keys in `CUT_FLOWS`: what is cut off
    /// now, also by an agent before a restart (the maps are pinned), so a
    /// restarted agent can uncut accounts that were topped up meanwhile.
    pub fn cut_entries(&self) -> Result<(Vec<u64>, Vec<UdpFlowKey>), KernelError> {
        let mut tcp = Vec::new();
        BatchReader::<u64, u32>::new(4096)
            .read_all(self.cut.fd().as_fd(), &mut tcp)
            .map_err(io_err("CUT"))?;
        let mut udp = Vec::new();
        BatchReader::<UdpFlowKey, u32>::new(4096)
            .read_all(self.cut_flows.fd().as_fd(), &mut udp)
            .map_err(io_err("CUT_FLOWS"))?;
        Ok((
            tcp.into_iter().map(|(k, _)| k).collect(),
            udp.into_iter().map(|(k, _)| k).collect(),
        ))
    }

    /// Sum over CPUs of each `CUT_STATS` slot (`meterd_common::CutStat`):
    /// TCP packets and UDP datagrams dropped, RSTs let out.
    pub fn cut_stats(&self) -> Result<[u64; CUT_STAT_SLOTS as usize], KernelError> {
        let mut out = [0u64; CUT_STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .cut_stats
                .get(&(i as u32), 0)
                .map_err(map_err("CUT_STATS"))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Puts `cookie` into `CUT`. A full map is first swept of entries whose
    /// connection closed (possible only if a close raced an earlier mark).
    fn mark(&mut self, cookie: u64) -> Result<(), KernelError> {
        for attempt in 0..2 {
            match sys::update(self.cut.fd().as_fd(), &cookie, &CUT_MARK) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) && attempt == 0 => {
                    let swept = self.sweep_cut()?;
                    tracing::info!(
                        swept,
                        "cut-off: CUT was full; removed entries of closed connections"
                    );
                }
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) => break,
                Err(e) => return Err(io_err("CUT")(e)),
            }
        }
        Err(KernelError::CutFull {
            name: map_names::CUT,
            capacity: CUT_SLOTS,
        })
    }

    /// Whether the connection is still open as far as the kernel side
    /// knows: it has an `INFO` entry not marked closed.
    fn still_open(&self, cookie: u64) -> Result<bool, KernelError> {
        Ok(self
            .info(cookie)?
            .is_some_and(|info| info.flags & CONN_CLOSED == 0))
    }

    /// Removes `CUT` entries of connections that are not open.
    fn sweep_cut(&mut self) -> Result<usize, KernelError> {
        let (cookies, _) = self.cut_entries()?;
        let mut swept = 0;
        for cookie in cookies {
            if !self.still_open(cookie)? {
                sys::delete(self.cut.fd().as_fd(), &cookie).map_err(io_err("CUT"))?;
                swept += 1;
            }
        }
        Ok(swept)
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

    /// Sum over CPUs of each `UDP_STATS` slot (`meterd_common::UdpStat`):
    /// flows put on probation, promoted, promoted without a probation
    /// entry, and probation inserts that failed.
    pub fn udp_stats(&self) -> Result<[u64; UDP_STAT_SLOTS as usize], KernelError> {
        let mut out = [0u64; UDP_STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .udp_stats
                .get(&(i as u32), 0)
                .map_err(map_err("UDP_STATS"))?;
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
        if let Ok(data) = MapData::from_pin(pin_dir.join(map_names::LIVE))
            && let Ok(live) = slots::LiveMap::new(&data)
        {
            report.live_dropped = live.in_use();
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
            let ours_dir = (name.starts_with("object-") || name == SLOTS_FILLED) && path.is_dir();
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

    /// An array or queue map's data.
    fn any_data(&mut self, name: &'static str) -> Result<MapData, KernelError> {
        into_data(self.map(name)?).ok_or(KernelError::MissingMap(name))
    }
}

/// The data of an array or queue map.
fn into_data(map: Map) -> Option<MapData> {
    match map {
        Map::Array(data) | Map::Queue(data) => Some(data),
        _ => None,
    }
}

/// Takes an array or queue map out of a loaded object.
fn take_data(bpf: &mut Ebpf, name: &'static str) -> Result<MapData, KernelError> {
    bpf.take_map(name)
        .and_then(into_data)
        .ok_or(KernelError::MissingMap(name))
}

/// Probes `SOCK_DESTROY` and says what cut-off will do; `None`: drop only.
fn open_diag(cgroup: &Path) -> Option<diag::Diag> {
    match diag::probe() {
        diag::Probe::Supported => match diag::Diag::new(cgroup) {
            Ok(d) => {
                tracing::info!("cut-off: sockets are destroyed with SOCK_DESTROY");
                Some(d)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cut-off drops packets only");
                None
            }
        },
        diag::Probe::Unsupported => {
            tracing::warn!("CONFIG_INET_DIAG_DESTROY missing: cut-off drops packets only");
            None
        }
        diag::Probe::Failed(e) => {
            tracing::warn!(error = %e, "SOCK_DESTROY does not work here: cut-off drops packets only");
            None
        }
    }
}

/// Fills `FREE_SLOTS` once, at the start that created the maps, before any
/// program can take a slot: a restarted or upgraded agent finds the
/// [`SLOTS_FILLED`] marker and pushes nothing (slots in the queue stay
/// there, slots in use come back with their close records). A fill cut
/// short (no marker, nothing attached yet) is redone from an empty queue.
/// Loads the object into `ebpf` to do it; the slots if it filled them.
fn fill_new_slots(
    config: &Config,
    pin_dir: &Path,
    ebpf: &mut Option<Ebpf>,
) -> Result<Option<Slots>, KernelError> {
    let marker = pin_dir.join(SLOTS_FILLED);
    if marker.is_dir() {
        return Ok(None);
    }
    if PROGRAMS.iter().any(|p| pin_dir.join(p.link_pin()).exists()) {
        return Err(KernelError::SlotsUnknown {
            pin_dir: pin_dir.to_owned(),
        });
    }
    let bpf = match ebpf {
        Some(bpf) => bpf,
        None => ebpf.insert(load(config)?),
    };
    let slots = Slots::new(
        take_data(bpf, map_names::LIVE)?,
        take_data(bpf, map_names::FREE_SLOTS)?,
    )
    .map_err(io_err("LIVE"))?;
    let n = slots.fill().map_err(io_err("FREE_SLOTS"))?;
    fs::create_dir(&marker).map_err(|e| pin_err(&marker)(e.to_string()))?;
    tracing::info!(slots = n, "live slots created: FREE_SLOTS filled");
    Ok(Some(slots))
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
        .map_max_entries(map_names::FREE_SLOTS, n)
        .map_max_entries(map_names::INFO, n)
        .map_max_entries(map_names::UDP_FLOWS, config.agent.max_udp_flows)
        .map_max_entries(map_names::UDP_PROBATION, config.agent.max_udp_probation)
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
