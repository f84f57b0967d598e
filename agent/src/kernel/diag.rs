//! Ending a TCP connection from outside its process: sock_diag
//! `SOCK_DESTROY`, what `ss -K` uses.
//!
//! Owns: the netlink request (an `inet_diag_req_v2` naming the socket by
//! its 4-tuple and cookie) and its acknowledgement, one `NETLINK_SOCK_DIAG`
//! socket per network namespace the metered processes live in, and the
//! startup probe. Does not own: which connections to end (the billing
//! core decides, the run loop calls `Kernel::cut`) or dropping their
//! packets (the eBPF side, through `CUT`).
//!
//! The kernel aborts a destroyed socket as `tcp_abort()` does: the server
//! process gets `ECONNABORTED` on its next call (`EPIPE` after that) and
//! the client a RST, so the player sees its stream end (after the data
//! already in its receive buffer). The request needs `CAP_NET_ADMIN`.
//!
//! A sock_diag socket only sees the sockets of its own network namespace.
//! A connection the agent's namespace does not have is looked for in the
//! namespaces of the processes in the metered cgroup (a containerised
//! server), which needs `CAP_SYS_ADMIN` to enter; the socket cookie in the
//! request makes a look in the wrong namespace harmless.
//!
//! Minimum kernel version: 4.5 (`SOCK_DESTROY`), with
//! `CONFIG_INET_DIAG_DESTROY=y`; socket cookies in the request: 4.1.

use std::{
    fs, io,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use meterd_common::{AF_INET, AF_INET6, IPPROTO_TCP};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h): the query, here for one
/// socket (no `NLM_F_DUMP`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY` (linux/sock_diag.h).
const SOCK_DESTROY: u16 = 21;
/// `NLMSG_ERROR` (linux/netlink.h): the type of an acknowledgement.
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`: an acknowledgement even on success.
const NLM_F_ACK: u16 = 0x4;
/// `INET_DIAG_INFO` (linux/inet_diag.h): the attribute with `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// `sizeof(struct inet_diag_msg)`: what a query's answer starts with.
const INET_DIAG_MSG_LEN: usize = 72;
/// Offset of `tcpi_unacked` (`packets_out`: segments sent and not
/// acknowledged) in `struct tcp_info`.
const TCPI_UNACKED_AT: usize = 24;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR_LEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`: 8 bytes of header, then the 48-byte
/// `inet_diag_sockid`.
const REQ_V2_LEN: usize = 56;
/// A whole `SOCK_DESTROY` request.
pub const REQUEST_LEN: usize = NLMSG_HDR_LEN + REQ_V2_LEN;
/// How long to wait for an acknowledgement. The kernel handles the request
/// inside `sendto`, so the ack is already queued when it returns; this only
/// bounds a kernel that never answers.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Least time between two scans of the cgroup for network namespaces.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// A TCP socket as sock_diag names it, from the socket's own side: for a
/// server's accepted socket, `local` is the server's address and port and
/// `remote` the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockId {
    /// The socket's family as the kernel has it: [`AF_INET6`] for an IPv4
    /// client of a dual-stack server (its addresses are then sent
    /// IPv4-mapped), [`AF_INET`] for an IPv4 socket.
    pub family: u16,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `SO_COOKIE` / `bpf_get_socket_cookie()`: a socket that reuses the
    /// 4-tuple has another one, and is left alone.
    pub cookie: u64,
}

/// What a destroy request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The socket was aborted.
    Destroyed,
    /// No such socket in any namespace that could be searched: it closed
    /// already (or lives where the agent cannot look).
    NotFound,
}

/// Why a destroy request or the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("sock_diag request: {0}")]
    Io(#[source] io::Error),
    #[error("sock_diag gave no acknowledgement for request {seq} within {ACK_TIMEOUT:?}")]
    NoAck { seq: u32 },
    #[error(
        "SOCK_DESTROY is not supported by this kernel: it needs CONFIG_INET_DIAG_DESTROY=y \
         (EOPNOTSUPP)"
    )]
    Unsupported,
    #[error("SOCK_DESTROY was refused (EPERM): the agent needs CAP_NET_ADMIN")]
    Permission,
    #[error("SOCK_DESTROY of {local} -> {remote} (cookie {cookie}): {source}")]
    Kernel {
        local: SocketAddr,
        remote: SocketAddr,
        cookie: u64,
        source: io::Error,
    },
    #[error(
        "socket {local} -> {remote} cannot be named in family {family}: an IPv6 address in an \
         AF_INET socket, or an unknown family"
    )]
    BadAddress {
        family: u16,
        local: SocketAddr,
        remote: SocketAddr,
    },
    #[error("the probe's loopback connection failed: {0}")]
    Loopback(#[source] io::Error),
    #[error("the probe's socket was not destroyed: SOCK_DESTROY reported {0:?}")]
    ProbeNotDestroyed(Outcome),
}

/// Encodes a `SOCK_DESTROY` request for `id` with sequence number `seq`:
/// `struct nlmsghdr` then `struct inet_diag_req_v2`, native byte order
/// except the ports and addresses, which are in network order.
pub fn encode_destroy(seq: u32, id: &SockId) -> Result<[u8; REQUEST_LEN], DiagError> {
    encode(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 0, seq, id)
}

/// Encodes a query for one socket's `struct tcp_info` (the
/// `INET_DIAG_INFO` extension), named as for [`encode_destroy`].
pub fn encode_get_info(seq: u32, id: &SockId) -> Result<[u8; REQUEST_LEN], DiagError> {
    encode(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        1 << (INET_DIAG_INFO - 1),
        seq,
        id,
    )
}

fn encode(
    kind: u16,
    flags: u16,
    ext: u8,
    seq: u32,
    id: &SockId,
) -> Result<[u8; REQUEST_LEN], DiagError> {
    let bad = || DiagError::BadAddress {
        family: id.family,
        local: id.local,
        remote: id.remote,
    };
    let (local, remote) = match id.family {
        AF_INET => (
            v4_words(id.local.ip()).ok_or_else(bad)?,
            v4_words(id.remote.ip()).ok_or_else(bad)?,
        ),
        AF_INET6 => (v6_octets(id.local.ip()), v6_octets(id.remote.ip())),
        _ => return Err(bad()),
    };
    let mut buf = [0u8; REQUEST_LEN];
    // struct nlmsghdr
    buf[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    buf[4..6].copy_from_slice(&kind.to_ne_bytes());
    buf[6..8].copy_from_slice(&flags.to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: to the kernel.
    // struct inet_diag_req_v2
    let req = &mut buf[NLMSG_HDR_LEN..];
    req[0] = id.family as u8; // sdiag_family
    req[1] = IPPROTO_TCP as u8; // sdiag_protocol
    req[2] = ext; // idiag_ext; pad stays 0.
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any
    // struct inet_diag_sockid
    req[8..10].copy_from_slice(&id.local.port().to_be_bytes()); // idiag_sport
    req[10..12].copy_from_slice(&id.remote.port().to_be_bytes()); // idiag_dport
    req[12..28].copy_from_slice(&local); // idiag_src
    req[28..44].copy_from_slice(&remote); // idiag_dst
    // idiag_if 0: any interface.
    // idiag_cookie[2]: the low half first, as sock_diag_check_cookie()
    // compares them.
    req[48..52].copy_from_slice(&(id.cookie as u32).to_ne_bytes());
    req[52..56].copy_from_slice(&((id.cookie >> 32) as u32).to_ne_bytes());
    Ok(buf)
}

/// An IPv4 address (plain or IPv4-mapped) as the 16 bytes of an AF_INET
/// `idiag_src`/`idiag_dst`: the address in word 0, the rest zero.
fn v4_words(ip: IpAddr) -> Option<[u8; 16]> {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
    };
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&v4.octets());
    Some(out)
}

/// An address as the 16 bytes of an AF_INET6 `idiag_src`/`idiag_dst`:
/// IPv4 as `::ffff:a.b.c.d`, which the kernel looks up in the IPv4 tables.
fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The kernel's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An acknowledgement: 0 (done) or the errno.
    Errno(i32),
    /// The socket a query named: its `tcpi_unacked`, if the answer had
    /// `struct tcp_info`.
    Info { unacked: Option<u32> },
}

/// The answer to request `seq` in `buf`, or `None` if `buf` holds none.
pub fn parse_answer(buf: &[u8], seq: u32) -> Option<Answer> {
    let mut at = 0;
    while buf.len() >= at + NLMSG_HDR_LEN {
        let len = ne_u32(buf, at) as usize;
        if len < NLMSG_HDR_LEN || at + len > buf.len() {
            return None;
        }
        let msg = &buf[at..at + len];
        let kind = ne_u16(msg, 4);
        if ne_u32(msg, 8) == seq {
            // struct nlmsgerr: the negative errno, then the request's header.
            if kind == NLMSG_ERROR && len >= NLMSG_HDR_LEN + 4 {
                return Some(Answer::Errno(
                    ne_u32(msg, NLMSG_HDR_LEN).cast_signed().saturating_neg(),
                ));
            }
            if kind == SOCK_DIAG_BY_FAMILY && len >= NLMSG_HDR_LEN + INET_DIAG_MSG_LEN {
                return Some(Answer::Info {
                    unacked: unacked_attr(&msg[NLMSG_HDR_LEN + INET_DIAG_MSG_LEN..]),
                });
            }
        }
        at += align4(len);
    }
    None
}

/// `tcpi_unacked` from the `INET_DIAG_INFO` attribute among `attrs`
/// (`struct rtattr`s: u16 length with header, u16 type, 4-byte aligned).
fn unacked_attr(attrs: &[u8]) -> Option<u32> {
    let mut at = 0;
    while attrs.len() >= at + 4 {
        let len = usize::from(ne_u16(attrs, at));
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if ne_u16(attrs, at + 2) == INET_DIAG_INFO && len >= 4 + TCPI_UNACKED_AT + 4 {
            return Some(ne_u32(attrs, at + 4 + TCPI_UNACKED_AT));
        }
        at += align4(len);
    }
    None
}

/// NLMSG_ALIGN / RTA_ALIGN: messages and attributes start on 4-byte
/// boundaries.
fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn ne_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn ne_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

/// One `NETLINK_SOCK_DIAG` socket: it sees the sockets of the network
/// namespace it was created in.
#[derive(Debug)]
struct NlSocket {
    fd: OwnedFd,
}

impl NlSocket {
    fn open() -> Result<Self, DiagError> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(DiagError::Open(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: ACK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout,
        )
        .map_err(DiagError::Open)?;
        Ok(Self { fd })
    }

    /// Sends `request` (sequence number `seq`) and returns the kernel's
    /// answer.
    fn request(&self, request: &[u8], seq: u32) -> Result<Answer, DiagError> {
        // SAFETY: an all-zero sockaddr_nl is valid; pid 0 is the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buffer and address are valid for their lengths.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(DiagError::Io(io::Error::last_os_error()));
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: the buffer is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        Err(DiagError::NoAck { seq })
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(DiagError::Io(e)),
                };
            }
            // Answers to earlier requests that timed out are skipped.
            if let Some(answer) = parse_answer(&buf[..n.cast_unsigned()], seq) {
                return Ok(answer);
            }
        }
    }
}

fn setsockopt<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` is valid for its size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A network namespace, by the device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Netns {
    dev: u64,
    ino: u64,
}

impl Netns {
    fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Destroys TCP sockets by 4-tuple and cookie, in the agent's network
/// namespace and in those of the processes in the metered cgroup.
#[derive(Debug)]
pub struct Diag {
    /// The agent's own namespace first, then those of the metered
    /// processes found at the last scan. A socket keeps its namespace
    /// alive, so namespaces no process of the cgroup has any more are let
    /// go at the next scan.
    sockets: Vec<(Netns, NlSocket)>,
    /// The metered cgroup, whose processes' namespaces are searched when
    /// the known ones do not have a socket.
    cgroup: PathBuf,
    /// Namespaces that could not be entered (no `CAP_SYS_ADMIN`): warned
    /// about once, not tried again while they exist.
    unreachable: Vec<Netns>,
    last_scan: Option<Instant>,
    seq: u32,
}

impl Diag {
    /// A sock_diag socket in the agent's namespace; `cgroup` is where the
    /// metered processes are.
    pub fn new(cgroup: &Path) -> Result<Self, DiagError> {
        let own = Netns::of(Path::new("/proc/thread-self/ns/net")).map_err(DiagError::Open)?;
        Ok(Self {
            sockets: vec![(own, NlSocket::open()?)],
            cgroup: cgroup.to_owned(),
            unreachable: Vec::new(),
            last_scan: None,
            seq: 0,
        })
    }

    /// Where the socket `id` is, and its `tcpi_unacked`; `None` if no
    /// namespace that can be searched has it. Looks in the known
    /// namespaces, then (at most once a second) scans the cgroup for new
    /// ones.
    pub fn find(&mut self, id: &SockId) -> Result<Option<(Netns, u32)>, DiagError> {
        let mut tried = Vec::new();
        loop {
            let untried: Vec<Netns> = self
                .sockets
                .iter()
                .map(|&(ns, _)| ns)
                .filter(|ns| !tried.contains(ns))
                .collect();
            if untried.is_empty() {
                if self.scan() {
                    continue;
                }
                return Ok(None);
            }
            for ns in untried {
                if let Some(unacked) = self.unacked_in(ns, id)? {
                    return Ok(Some((ns, unacked)));
                }
                tried.push(ns);
            }
        }
    }

    /// The socket's `tcpi_unacked` (segments sent and not acknowledged) in
    /// namespace `ns`; `None` if it is not there (or `ns` was let go).
    pub fn unacked_in(&mut self, ns: Netns, id: &SockId) -> Result<Option<u32>, DiagError> {
        match self.request(ns, encode_get_info(0, id)?)? {
            // No tcp_info (not expected for TCP): nothing to wait for.
            Some(Answer::Info { unacked }) => Ok(Some(unacked.unwrap_or(0))),
            None | Some(Answer::Errno(libc::ENOENT | libc::ESTALE)) => Ok(None),
            Some(Answer::Errno(errno)) => Err(kernel_error(errno, id)),
        }
    }

    /// Destroys the socket `id`, searched for as by [`Diag::find`].
    pub fn destroy(&mut self, id: &SockId) -> Result<Outcome, DiagError> {
        match self.find(id)? {
            Some((ns, _)) => self.destroy_in(ns, id),
            None => Ok(Outcome::NotFound),
        }
    }

    /// Destroys the socket `id` in namespace `ns`.
    pub fn destroy_in(&mut self, ns: Netns, id: &SockId) -> Result<Outcome, DiagError> {
        match self.request(ns, encode_destroy(0, id)?)? {
            Some(Answer::Errno(0)) => Ok(Outcome::Destroyed),
            // ESTALE: the 4-tuple is another socket's now (the cookie
            // differs), so ours is gone.
            None | Some(Answer::Errno(libc::ENOENT | libc::ESTALE)) => Ok(Outcome::NotFound),
            Some(Answer::Errno(errno)) => Err(kernel_error(errno, id)),
            Some(Answer::Info { .. }) => Err(DiagError::Io(io::Error::other(
                "SOCK_DESTROY answered with socket information",
            ))),
        }
    }

    /// Sends `request` (its sequence number set here) in namespace `ns`;
    /// `None` if there is no socket for `ns` any more.
    fn request(
        &mut self,
        ns: Netns,
        mut request: [u8; REQUEST_LEN],
    ) -> Result<Option<Answer>, DiagError> {
        let Some((_, socket)) = self.sockets.iter().find(|(n, _)| *n == ns) else {
            return Ok(None);
        };
        self.seq = self.seq.wrapping_add(1);
        request[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        socket.request(&request, self.seq).map(Some)
    }

    /// Brings the namespaces up to those of the cgroup's processes (the
    /// agent's own always stays): opens a socket in each new one, lets go
    /// of those no process has any more. False if nothing new was found,
    /// or the last scan was less than [`RESCAN_EVERY`] ago.
    fn scan(&mut self) -> bool {
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN_EVERY) {
            return false;
        }
        self.last_scan = Some(Instant::now());
        let mut pids = Vec::new();
        cgroup_pids(&self.cgroup, &mut pids);
        let mut present = Vec::new();
        let mut found = false;
        for pid in pids {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let Ok(ns) = Netns::of(&path) else { continue };
            if present.contains(&ns) {
                continue;
            }
            present.push(ns);
            if self.sockets.iter().any(|(n, _)| *n == ns) || self.unreachable.contains(&ns) {
                continue;
            }
            match open_in(&path) {
                Ok(socket) => {
                    tracing::info!(
                        pid,
                        "cut-off: also destroying sockets in the network namespace of pid {pid}"
                    );
                    self.sockets.push((ns, socket));
                    found = true;
                }
                Err(e) => {
                    tracing::warn!(pid, error = %e, "cut-off: cannot enter the network namespace of pid {pid}: its sockets are only dropped, not destroyed");
                    self.unreachable.push(ns);
                }
            }
        }
        let own = self.sockets[0].0;
        self.sockets
            .retain(|(ns, _)| *ns == own || present.contains(ns));
        self.unreachable.retain(|ns| present.contains(ns));
        found
    }
}

/// The pids in `cgroup` and its descendants (unreadable parts skipped).
fn cgroup_pids(cgroup: &Path, out: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

/// A sock_diag socket in the network namespace at `ns_path`, made by a
/// short-lived thread that enters it (`setns` changes only the calling
/// thread; a socket stays in the namespace it was created in).
fn open_in(ns_path: &Path) -> Result<NlSocket, DiagError> {
    let ns = fs::File::open(ns_path).map_err(DiagError::Open)?;
    std::thread::spawn(move || {
        // SAFETY: plain syscall on an open nsfs fd; it affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(DiagError::Open(io::Error::last_os_error()));
        }
        NlSocket::open()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(DiagError::Open(io::Error::other(
            "namespace thread panicked",
        )))
    })
}

/// The error for an unexpected errno from a request about `id`.
fn kernel_error(errno: i32, id: &SockId) -> DiagError {
    match errno {
        libc::EOPNOTSUPP => DiagError::Unsupported,
        libc::EPERM => DiagError::Permission,
        _ => DiagError::Kernel {
            local: id.local,
            remote: id.remote,
            cookie: id.cookie,
            source: io::Error::from_raw_os_error(errno),
        },
    }
}

/// Whether `SOCK_DESTROY` works on this host, and why not.
#[derive(Debug)]
pub enum Probe {
    /// A loopback connection made for the probe was destroyed.
    Supported,
    /// The kernel lacks `CONFIG_INET_DIAG_DESTROY`.
    Unsupported,
    /// Something else failed (privileges, no netlink): the reason.
    Failed(DiagError),
}

/// Checks that `SOCK_DESTROY` works: connects to a listener of its own on
/// loopback and destroys the accepted socket, by the same request
/// `Diag::destroy` sends (its 4-tuple and cookie). Where loopback cannot
/// be used it destroys a socket that cannot exist instead, which tells a
/// kernel without `CONFIG_INET_DIAG_DESTROY` (EOPNOTSUPP) from one with it
/// (ENOENT), but not the privileges.
pub fn probe() -> Probe {
    let socket = match NlSocket::open() {
        Ok(s) => s,
        Err(e) => return Probe::Failed(e),
    };
    let outcome = match loopback_pair() {
        Ok((server, client)) => destroy_probe_socket(&socket, &server, &client),
        Err(e) => {
            tracing::debug!(error = %e, "SOCK_DESTROY probe: no loopback, probing with a socket that cannot exist");
            nonexistent_probe(&socket)
        }
    };
    match outcome {
        Ok(()) => Probe::Supported,
        Err(DiagError::Unsupported) => Probe::Unsupported,
        Err(e) => Probe::Failed(e),
    }
}

/// A connected pair on 127.0.0.1: (the accepted socket, the client).
fn loopback_pair() -> Result<(TcpStream, TcpStream), DiagError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(DiagError::Loopback)?;
    let client = TcpStream::connect(listener.local_addr().map_err(DiagError::Loopback)?)
        .map_err(DiagError::Loopback)?;
    let (server, _) = listener.accept().map_err(DiagError::Loopback)?;
    Ok((server, client))
}

fn destroy_probe_socket(
    socket: &NlSocket,
    server: &TcpStream,
    client: &TcpStream,
) -> Result<(), DiagError> {
    let id = SockId {
        family: AF_INET,
        local: server.local_addr().map_err(DiagError::Loopback)?,
        remote: server.peer_addr().map_err(DiagError::Loopback)?,
        cookie: socket_cookie(server.as_raw_fd()).map_err(DiagError::Loopback)?,
    };
    let outcome = match socket.request(&encode_destroy(1, &id)?, 1)? {
        Answer::Errno(0) => Outcome::Destroyed,
        Answer::Errno(libc::ENOENT | libc::ESTALE) => Outcome::NotFound,
        Answer::Errno(errno) => return Err(kernel_error(errno, &id)),
        Answer::Info { .. } => return Err(DiagError::ProbeNotDestroyed(Outcome::NotFound)),
    };
    if outcome != Outcome::Destroyed {
        return Err(DiagError::ProbeNotDestroyed(outcome));
    }
    // What a cut connection's server and client will see: ECONNABORTED on
    // the destroyed socket, a RST at the peer. Only logged: the kernel's
    // answer above is what the cut-off relies on.
    let server_error = server.take_error();
    let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
    let client_read = io::Read::read(&mut &*client, &mut [0u8; 1]);
    tracing::debug!(
        ?server_error,
        ?client_read,
        "SOCK_DESTROY probe: what the two ends saw"
    );
    Ok(())
}

fn nonexistent_probe(socket: &NlSocket) -> Result<(), DiagError> {
    // Port 0 to port 0 on the unspecified address: no socket has that.
    let nowhere = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
    let id = SockId {
        family: AF_INET6,
        local: nowhere,
        remote: nowhere,
        cookie: 0,
    };
    match socket.request(&encode_destroy(1, &id)?, 1)? {
        Answer::Errno(libc::ENOENT | libc::ESTALE) => Ok(()),
        Answer::Errno(errno) => Err(kernel_error(errno, &id)),
        Answer::Info { .. } => Err(DiagError::ProbeNotDestroyed(Outcome::NotFound)),
    }
}

/// `SO_COOKIE` of a socket (kernel >= 4.12).
fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of their sizes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    /// The request for a server socket 192.0.2.1:443 <- 198.51.100.7:51234,
    /// cookie 0x1122334455667788, sequence 7, written out byte by byte
    /// from linux/netlink.h and linux/inet_diag.h (x86_64: little endian).
    #[test]
    #[cfg(target_endian = "little")]
    fn destroy_request_ipv4_layout() {
        let id = SockId {
            family: AF_INET,
            local: "192.0.2.1:443".parse().unwrap(),
            remote: "198.51.100.7:51234".parse().unwrap(),
            cookie: 0x1122_3344_5566_7788,
        };
        let mut expected = Vec::new();
        // nlmsghdr: len 72, type 21 (SOCK_DESTROY), flags 5, seq 7, pid 0
        expected.extend([72, 0, 0, 0, 21, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        // family AF_INET, IPPROTO_TCP, ext 0, pad 0, states 0xffffffff
        expected.extend([2, 6, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        // sport 443 (0x01bb), dport 51234 (0xc822), big endian
        expected.extend([0x01, 0xbb, 0xc8, 0x22]);
        // src 192.0.2.1, then 12 zero bytes
        expected.extend([192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // dst 198.51.100.7
        expected.extend([198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // if 0
        expected.extend([0, 0, 0, 0]);
        // cookie[0] = low half, cookie[1] = high half, each native order
        expected.extend([0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(
            encode_destroy(7, &id).unwrap().as_slice(),
            expected.as_slice()
        );
    }

    #[test]
    fn destroy_request_ipv6_and_mapped() {
        let id = SockId {
            family: AF_INET6,
            local: "[2001:db8::1]:8443".parse().unwrap(),
            remote: "[2001:db8::2]:40000".parse().unwrap(),
            cookie: 1,
        };
        let buf = encode_destroy(1, &id).unwrap();
        assert_eq!(buf[16], 10);
        assert_eq!(&buf[24..26], &8443u16.to_be_bytes());
        assert_eq!(&buf[26..28], &40000u16.to_be_bytes());
        let local: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(&buf[28..44], &local.octets());
        assert_eq!(&buf[64..72], &[1, 0, 0, 0, 0, 0, 0, 0]);

        // An IPv4 client of a dual-stack socket: sent IPv4-mapped, whether
        // the agent holds it as IPv4 or as ::ffff:a.b.c.d.
        let plain = SockId {
            family: AF_INET6,
            local: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80)),
            remote: "10.0.0.2:5000".parse().unwrap(),
            cookie: 9,
        };
        let mapped = SockId {
            local: "[::ffff:10.0.0.1]:80".parse().unwrap(),
            remote: "[::ffff:10.0.0.2]:5000".parse().unwrap(),
            ..plain
        };
        let a = encode_destroy(3, &plain).unwrap();
        assert_eq!(a, encode_destroy(3, &mapped).unwrap());
        assert_eq!(
            &a[28..44],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
        );
    }

    #[test]
    fn ipv4_socket_takes_mapped_but_not_ipv6() {
        let mapped = SockId {
            family: AF_INET,
            local: "[::ffff:10.0.0.1]:80".parse().unwrap(),
            remote: "10.0.0.2:5000".parse().unwrap(),
            cookie: 9,
        };
        let buf = encode_destroy(3, &mapped).unwrap();
        assert_eq!(
            &buf[28..44],
            &[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let v6 = SockId {
            local: "[2001:db8::1]:80".parse().unwrap(),
            ..mapped
        };
        assert!(matches!(
            encode_destroy(3, &v6),
            Err(DiagError::BadAddress { .. })
        ));
        let unknown = SockId {
            family: 1,
            ..mapped
        };
        assert!(matches!(
            encode_destroy(3, &unknown),
            Err(DiagError::BadAddress { .. })
        ));
    }

    /// An acknowledgement as the kernel writes it: nlmsghdr (type
    /// NLMSG_ERROR) and nlmsgerr (errno, then the request's header).
    fn ack(seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(36u32.to_ne_bytes());
        m.extend(2u16.to_ne_bytes());
        m.extend(0x100u16.to_ne_bytes()); // NLM_F_CAPPED
        m.extend(seq.to_ne_bytes());
        m.extend(4242u32.to_ne_bytes());
        m.extend(error.to_ne_bytes());
        m.extend([72, 0, 0, 0, 21, 0, 5, 0]);
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m
    }

    #[test]
    fn parses_acks() {
        let errno = |e| Some(Answer::Errno(e));
        assert_eq!(parse_answer(&ack(5, 0), 5), errno(0));
        assert_eq!(parse_answer(&ack(5, -libc::ENOENT), 5), errno(libc::ENOENT));
        assert_eq!(
            parse_answer(&ack(5, -libc::EOPNOTSUPP), 5),
            errno(libc::EOPNOTSUPP)
        );
        // A late ack of an earlier request, then ours, in one datagram.
        let mut two = ack(4, -libc::ENOENT);
        two.extend(ack(5, 0));
        assert_eq!(parse_answer(&two, 5), errno(0));
        assert_eq!(parse_answer(&ack(4, 0), 5), None);
        // Truncated or nonsense lengths are not answers.
        assert_eq!(parse_answer(&ack(5, 0)[..20], 5), None);
        let mut zero_len = ack(5, 0);
        zero_len[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_answer(&zero_len, 5), None);
    }

    /// The query differs from the destroy request only in type, flags and
    /// the INET_DIAG_INFO extension bit.
    #[test]
    fn info_query_layout() {
        let id = SockId {
            family: AF_INET,
            local: "192.0.2.1:443".parse().unwrap(),
            remote: "198.51.100.7:51234".parse().unwrap(),
            cookie: 0x1122_3344_5566_7788,
        };
        let destroy = encode_destroy(7, &id).unwrap();
        let query = encode_get_info(7, &id).unwrap();
        // type 20 (SOCK_DIAG_BY_FAMILY), flags 1 (NLM_F_REQUEST, no dump)
        assert_eq!(&query[4..8], &[20, 0, 1, 0]);
        // idiag_ext = 1 << (INET_DIAG_INFO - 1)
        assert_eq!(query[18], 2);
        let mut same = query;
        same[4..8].copy_from_slice(&destroy[4..8]);
        same[18] = 0;
        assert_eq!(same, destroy);
    }

    /// An answer to the query: nlmsghdr, a 72-byte inet_diag_msg, then an
    /// unrelated attribute and INET_DIAG_INFO with tcpi_unacked = 17.
    #[test]
    fn parses_info() {
        let mut attrs = Vec::new();
        // INET_DIAG_MEMINFO-like attribute of 5 bytes payload: padded to 12.
        attrs.extend(9u16.to_ne_bytes());
        attrs.extend(1u16.to_ne_bytes());
        attrs.extend([1, 2, 3, 4, 5, 0, 0, 0]);
        let mut info = vec![0u8; 232];
        info[24..28].copy_from_slice(&17u32.to_ne_bytes());
        attrs.extend(((4 + info.len()) as u16).to_ne_bytes());
        attrs.extend(2u16.to_ne_bytes());
        attrs.extend(&info);
        let mut m = Vec::new();
        m.extend(((16 + 72 + attrs.len()) as u32).to_ne_bytes());
        m.extend(20u16.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(9u32.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend([0u8; 72]);
        m.extend(&attrs);
        assert_eq!(
            parse_answer(&m, 9),
            Some(Answer::Info { unacked: Some(17) })
        );
        assert_eq!(parse_answer(&m, 8), None);
        // Without the attribute.
        let mut bare = m[..16 + 72].to_vec();
        bare[..4].copy_from_slice(&88u32.to_ne_bytes());
        assert_eq!(parse_answer(&bare, 9), Some(Answer::Info { unacked: None }));
    }
}
