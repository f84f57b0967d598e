//! `meterd-traffic`: the independent truth of meterd's end-to-end tests.
//!
//! A TCP and a UDP client/server pair whose servers log, per connection or
//! per client, exactly the byte counts their own socket calls returned, and
//! whose clients check they received exactly what they asked for. meterd's
//! closed-connection records are compared against these logs.
//!
//! Owns: sockets, the request protocol (see `meterd_tests::wire`), pacing.
//! Does not own: cgroups, namespaces or meterd (the harness places the
//! processes).

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use meterd_tests::wire::{
    ClientConn, ClientSummary, CloseBy, ConnLog, PATTERN_WINDOW, Protocol, Request,
    UdpClientSummary, parse_udp_get, pattern_buffer, pattern_mismatch, pattern_slice, udp_get,
};

/// A connection that stalls this long is broken: fail instead of hanging a test.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Socket buffers for UDP: large enough that no datagram of a test is
/// dropped on loopback, so what one side sent is what the other received.
const UDP_BUFFER: libc::c_int = 16 << 20;

#[derive(Parser)]
#[command(about = "Traffic with exact byte accounting, for meterd's end-to-end tests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve `GET <down> <up> <server|client>` connections; log each one.
    TcpServer {
        /// Address to listen on; repeat to listen on several ports.
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// JSON lines, one per finished connection.
        #[arg(long)]
        log: PathBuf,
        /// Created once every listener is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Run connections against a tcp-server; print a JSON summary.
    TcpClient {
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes the server sends on each connection.
        #[arg(long)]
        down: u64,
        /// Bytes the client sends on each connection, after the download.
        #[arg(long)]
        up: u64,
        /// Number of connections.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Connections running at the same time.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Who closes first; `alternate` switches per connection.
        #[arg(long, value_enum, default_value_t = CloseMode::Server)]
        close: CloseMode,
        /// Sleep this long after every `--chunk` bytes read or written.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Pacing unit for `--pause-ms`.
        #[arg(long, default_value_t = 65536)]
        chunk: u64,
        /// Keep each connection open this long after its transfers, before
        /// closing it (a connection of known duration, for time tariffs).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Created once the first connection has received its first bytes
        /// (or, without a download, has sent its request); holds that
        /// connection's local address and port (`127.1.0.5:40312`), so a
        /// test can name it to meterd's API.
        #[arg(long)]
        started_file: Option<PathBuf>,
        /// Bind every connection to this local address before connecting
        /// (any of 127.0.0.0/8 works on `lo` without configuration).
        #[arg(long)]
        source: Option<IpAddr>,
        /// Connection `i` (0-based, in the order they start) binds to
        /// `--source` + `i` instead: one client address per connection.
        /// IPv4 only, and the addresses must stay inside 127.0.0.0/8.
        #[arg(long, requires = "source")]
        distinct_sources: bool,
        /// A download that the server side ends early (meterd cut it off:
        /// a reset or an early EOF) is not a failure: the connection's
        /// summary says how much arrived.
        #[arg(long)]
        until_cut: bool,
    },
    /// Count datagrams per client; answer `GET <bytes> <size>` datagrams.
    UdpServer {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// JSON lines, one per client once it has been idle for `--idle-ms`
        /// (or at SIGTERM).
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        idle_ms: u64,
    },
    /// Send datagrams of known sizes, request bytes back; print totals.
    UdpClient {
        #[arg(long)]
        connect: SocketAddr,
        /// Payload sizes of the datagrams to send, in order.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// How often to send the `--sizes` list.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Bytes to request back per round.
        #[arg(long, default_value_t = 0)]
        get: u64,
        /// Payload size of the datagrams sent back.
        #[arg(long, default_value_t = 1200)]
        get_size: usize,
        /// Number of `GET` rounds.
        #[arg(long, default_value_t = 1)]
        get_rounds: usize,
        /// Local address to bind to (default: the wildcard address).
        #[arg(long)]
        source: Option<IpAddr>,
        /// Local port to bind to (default: any), so a test can name the
        /// flow to meterd before it starts.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Sleep this long between `GET` rounds: a flow of known length.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// A round that gets no answer for 2 s (meterd cut the flow off)
        /// ends the client without failing: its totals say what arrived.
        #[arg(long)]
        until_cut: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CloseMode {
    Server,
    Client,
    /// Even connections: server first; odd: client first.
    Alternate,
}

impl CloseMode {
    fn for_connection(self, index: usize) -> CloseBy {
        match self {
            CloseMode::Alternate if index.is_multiple_of(2) => CloseBy::Server,
            CloseMode::Server => CloseBy::Server,
            CloseMode::Client | CloseMode::Alternate => CloseBy::Client,
        }
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::TcpServer {
            listen,
            log,
            ready_file,
        } => tcp_server(&listen, &log, ready_file.as_deref()),
        Command::TcpClient {
            connect,
            down,
            up,
            count,
            parallel,
            close,
            pause_ms,
            chunk,
            hold_ms,
            started_file,
            source,
            distinct_sources,
            until_cut,
        } => {
            let sources = Sources::new(source, distinct_sources, connect, count)?;
            let plan = ClientPlan {
                connect,
                down,
                up,
                close,
                pause: Duration::from_millis(pause_ms),
                chunk: chunk.max(1),
                hold: Duration::from_millis(hold_ms),
                started_file,
                sources,
                until_cut,
            };
            tcp_client(&plan, count, parallel.max(1))
        }
        Command::UdpServer {
            listen,
            log,
            ready_file,
            idle_ms,
        } => udp_server(
            &listen,
            &log,
            ready_file.as_deref(),
            Duration::from_millis(idle_ms),
        ),
        Command::UdpClient {
            connect,
            sizes,
            repeat,
            get,
            get_size,
            get_rounds,
            source,
            port,
            pause_ms,
            until_cut,
        } => udp_client(
            connect,
            source,
            &sizes,
            &UdpPlan {
                repeat,
                get,
                get_size: get_size.max(1),
                get_rounds,
                port,
                pause: Duration::from_millis(pause_ms),
                until_cut,
            },
        ),
    }
}

/// Appends one JSON line per call with a single `write`, so lines of
/// concurrent connections never interleave and each is on disk at once.
#[derive(Clone)]
struct LogFile(Arc<Mutex<File>>);

impl LogFile {
    fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open log {}", path.display()))?;
        Ok(LogFile(Arc::new(Mutex::new(file))))
    }

    fn append(&self, entry: &ConnLog) {
        let mut line = serde_json::to_string(entry).expect("a ConnLog always serialises");
        line.push('\n');
        let mut file = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            eprintln!("meterd-traffic: cannot write log line {line:?}: {e}");
        }
    }
}

fn create_ready_file(path: Option<&Path>) -> Result<()> {
    if let Some(path) = path {
        fs::write(path, b"").with_context(|| format!("create {}", path.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- TCP server

fn tcp_server(listen: &[SocketAddr], log: &Path, ready_file: Option<&Path>) -> Result<()> {
    let log = LogFile::open(log)?;
    let listeners = listen
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}")))
        .collect::<Result<Vec<_>>>()?;
    create_ready_file(ready_file)?;
    let accepters: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let log = log.clone();
            thread::spawn(move || accept_loop(&listener, &log))
        })
        .collect();
    for accepter in accepters {
        accepter.join().expect("accept loop panicked");
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, log: &LogFile) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let log = log.clone();
                thread::spawn(move || serve(stream, &log));
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                eprintln!("meterd-traffic: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A stream that counts what its `read` and `write` calls returned, and
/// when payload moved (see [`ConnLog::last_payload_unix_us`]).
struct Counted {
    stream: TcpStream,
    sent: u64,
    received: u64,
    first_payload: Option<SystemTime>,
    last_payload: Option<SystemTime>,
}

impl Counted {
    fn payload_moved(&mut self) {
        let now = SystemTime::now();
        self.first_payload.get_or_insert(now);
        self.last_payload = Some(now);
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    self.received += n as u64;
                    if n > 0 {
                        self.payload_moved();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream.write(buf) {
                Ok(n) => {
                    self.sent += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the peer has acknowledged everything written (the send
    /// queue is empty), and dates the last payload then: that is when the
    /// kernel's count of acknowledged bytes last moved.
    fn wait_acked(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: a valid TCP socket fd and a pointer to a c_int that
            // lives for the call, which is what SIOCOUTQ writes.
            let rc =
                unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            if queued == 0 {
                self.payload_moved();
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    format!("{queued} bytes still unacknowledged"),
                ));
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Reads until EOF; returns how many bytes came before it.
    fn drain(&mut self) -> io::Result<u64> {
        let mut buf = [0u8; 4096];
        let mut extra = 0;
        loop {
            match self.read(&mut buf)? {
                0 => return Ok(extra),
                n => extra += n as u64,
            }
        }
    }
}

/// Wall-clock µs since the Unix epoch.
fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// When the bytes already waiting on a just-accepted connection arrived,
/// if they have waited at least a jiffy: the client sends its request line
/// on connect, and a busy server may accept (or start serving) it only
/// later, while the kernel counted it on arrival. `TCP_INFO`'s
/// `tcpi_last_data_recv` says how long ago the last data segment came, in
/// ms at jiffy resolution (0: within this jiffy, and the first `read` dates
/// it better); before the server answers, the request line is all the
/// client has sent, so that is its arrival.
fn queued_since(stream: &TcpStream, now: SystemTime) -> Option<SystemTime> {
    let fd = stream.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: a valid TCP socket fd and a pointer to a c_int that lives for
    // the call, which is what SIOCINQ (FIONREAD) writes.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut queued) } != 0 || queued == 0 {
        return None;
    }
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `info` and `len` live for the call and `len` is its size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && info.tcpi_last_data_recv > 0)
        .then(|| now - Duration::from_millis(u64::from(info.tcpi_last_data_recv)))
}

fn serve(stream: TcpStream, log: &LogFile) {
    let (accepted, accepted_wall) = (Instant::now(), SystemTime::now());
    let peer = stream.peer_addr();
    let local = stream.local_addr();
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let request_arrived = queued_since(&stream, accepted_wall);
    let mut conn = Counted {
        stream,
        sent: 0,
        received: 0,
        first_payload: None,
        last_payload: None,
    };
    let mut close = None;
    let outcome = serve_request(&mut conn, &mut close);
    // Close before logging: the log line means "this connection is over",
    // and its duration ends with the close.
    let Counted {
        stream,
        sent,
        received,
        first_payload,
        last_payload,
    } = conn;
    drop(stream);
    let duration = accepted.elapsed();
    let closed_wall = SystemTime::now();
    let (Ok(peer), Ok(local)) = (peer, local) else {
        eprintln!("meterd-traffic: connection without addresses, not logged");
        return;
    };
    log.append(&ConnLog {
        protocol: Protocol::Tcp,
        client_addr: peer.ip(),
        client_port: peer.port(),
        server_addr: local.ip(),
        server_port: local.port(),
        bytes_sent: sent,
        bytes_received: received,
        close,
        error: outcome.err(),
        accepted_unix_us: Some(unix_us(accepted_wall)),
        closed_unix_us: Some(unix_us(closed_wall)),
        duration_us: Some(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)),
        first_payload_unix_us: first_payload.map(unix_us),
        last_payload_unix_us: last_payload.map(unix_us),
        request_arrived_unix_us: request_arrived.map(unix_us),
    });
}

fn serve_request(conn: &mut Counted, close: &mut Option<CloseBy>) -> Result<(), String> {
    let line = read_request_line(conn)?;
    let request = Request::parse(&line)?;
    *close = Some(request.close);

    let pattern = pattern_buffer();
    let mut offset = 0;
    while offset < request.down {
        let len = usize::try_from(request.down - offset).unwrap_or(usize::MAX);
        let n = conn
            .write(pattern_slice(&pattern, offset, len))
            .map_err(|e| format!("write at {offset} of {}: {e}", request.down))?;
        offset += n as u64;
    }
    if request.down > 0 {
        conn.wait_acked()
            .map_err(|e| format!("waiting for the download to be acknowledged: {e}"))?;
    }

    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    while got < request.up {
        let want = usize::try_from(request.up - got).map_or(buf.len(), |w| w.min(buf.len()));
        let n = conn
            .read(&mut buf[..want])
            .map_err(|e| format!("read at {got} of {}: {e}", request.up))?;
        if n == 0 {
            return Err(format!("EOF after {got} of {} upload bytes", request.up));
        }
        if let Some(i) = pattern_mismatch(&buf[..n], got) {
            return Err(format!("upload byte {} is not the pattern", got + i as u64));
        }
        got += n as u64;
    }

    if request.close == CloseBy::Server {
        conn.stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
    }
    // Either way, wait for the client's FIN: with `server` it follows ours,
    // with `client` it comes first and our close (on drop) answers it.
    let extra = conn.drain().map_err(|e| format!("waiting for EOF: {e}"))?;
    if extra > 0 {
        return Err(format!("client sent {extra} bytes more than announced"));
    }
    Ok(())
}

/// Reads the request line byte by byte, so no upload byte is consumed with it.
fn read_request_line(conn: &mut Counted) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        match conn.read(&mut byte) {
            Ok(0) => return Err(format!("EOF inside request line {line:?}")),
            Ok(_) if byte[0] == b'\n' => {
                return String::from_utf8(line).map_err(|e| format!("request line: {e}"));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("reading request line: {e}")),
        }
    }
    Err("request line longer than 128 bytes".to_owned())
}

// ---------------------------------------------------------------- TCP client

/// What every connection of one `tcp-client` run does.
struct ClientPlan {
    connect: SocketAddr,
    down: u64,
    up: u64,
    close: CloseMode,
    pause: Duration,
    chunk: u64,
    hold: Duration,
    started_file: Option<PathBuf>,
    sources: Sources,
    until_cut: bool,
}

/// Which local address each connection binds to.
enum Sources {
    /// The kernel picks (127.0.0.1 or ::1 on loopback).
    Any,
    /// Every connection binds to this address.
    One(IpAddr),
    /// Connection `i` binds to the base address + `i`.
    Distinct(Ipv4Addr),
}

impl Sources {
    fn new(
        source: Option<IpAddr>,
        distinct: bool,
        connect: SocketAddr,
        count: usize,
    ) -> Result<Sources> {
        let Some(source) = source else {
            return Ok(Sources::Any);
        };
        if source.is_ipv4() != connect.is_ipv4() {
            bail!("--source {source} and --connect {connect} are of different families");
        }
        if !distinct {
            return Ok(Sources::One(source));
        }
        let IpAddr::V4(base) = source else {
            bail!("--distinct-sources needs an IPv4 --source: IPv6 loopback has only ::1");
        };
        let last = u32::from(base)
            .checked_add(u32::try_from(count.saturating_sub(1))?)
            .map(Ipv4Addr::from);
        match last {
            Some(last) if base.is_loopback() && last.is_loopback() => Ok(Sources::Distinct(base)),
            _ => bail!("--distinct-sources from {base} for {count} connections leaves 127.0.0.0/8"),
        }
    }

    fn of(&self, index: usize) -> Option<IpAddr> {
        match *self {
            Sources::Any => None,
            Sources::One(addr) => Some(addr),
            Sources::Distinct(base) => Some(IpAddr::V4(Ipv4Addr::from(
                u32::from(base) + u32::try_from(index).expect("checked in Sources::new"),
            ))),
        }
    }
}

/// `addr` as the `sockaddr` the socket calls take.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Connects to `to`, first binding to `source` if given. For IPv4 the port
/// is left to `connect` (`IP_BIND_ADDRESS_NO_PORT`), so a storm of
/// connections from one address does not run out of ports at `bind`.
fn connect_from(source: Option<IpAddr>, to: SocketAddr) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(to);
    };
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned at once below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if to.is_ipv4() {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option value with its size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    let (local, local_len) = sockaddr(SocketAddr::new(source, 0));
    // SAFETY: a valid socket fd and a sockaddr of the given length.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), local_len) })
        .map_err(|e| io::Error::new(e.kind(), format!("bind {source}: {e}")))?;
    let (remote, remote_len) = sockaddr(to);
    // SAFETY: as above.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), remote_len) })?;
    Ok(TcpStream::from(fd))
}

fn tcp_client(plan: &ClientPlan, count: usize, parallel: usize) -> Result<()> {
    let next = AtomicUsize::new(0);
    let started = AtomicBool::new(false);
    let done = Mutex::new(Vec::with_capacity(count));
    let failed = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..parallel.min(count.max(1)) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        break;
                    }
                    let close = plan.close.for_connection(index);
                    match client_connection(plan, plan.sources.of(index), close, &started) {
                        Ok(conn) => done.lock().unwrap().push(conn),
                        Err(e) => failed
                            .lock()
                            .unwrap()
                            .push(format!("connection {index}: {e}")),
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    if !failed.is_empty() {
        for line in failed.iter().take(20) {
            eprintln!("meterd-traffic: {line}");
        }
        bail!("{} of {count} connections failed", failed.len());
    }
    let summary = ClientSummary {
        connections: done.into_inner().unwrap(),
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[expect(
    clippy::too_many_lines,
    reason = "one connection's exchange, read top to bottom"
)]
fn client_connection(
    plan: &ClientPlan,
    source: Option<IpAddr>,
    close: CloseBy,
    started: &AtomicBool,
) -> Result<ClientConn, String> {
    let mut stream = connect_from(source, plan.connect).map_err(|e| {
        format!(
            "connect {}{}: {e}",
            plan.connect,
            source.map_or(String::new(), |s| format!(" from {s}"))
        )
    })?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let client_port = local.port();
    let ctx = |what: &str, e: io::Error| format!("port {client_port}: {what}: {e}");
    let summary = |bytes_received, bytes_sent| ClientConn {
        client_addr: local.ip(),
        client_port,
        server_port: plan.connect.port(),
        bytes_received,
        bytes_sent,
        close,
    };
    let request = Request {
        down: plan.down,
        up: plan.up,
        close,
    };
    let line = request.line();
    stream
        .write_all(line.as_bytes())
        .map_err(|e| ctx("send request", e))?;
    let mut bytes_sent = line.len() as u64;

    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    let mut since_pause = 0u64;
    while got < plan.down {
        let want = usize::try_from(plan.down - got).map_or(buf.len(), |w| w.min(buf.len()));
        let n = match read_retrying(&mut stream, &mut buf[..want]) {
            Ok(0) | Err(_) if plan.until_cut => return Ok(summary(got, bytes_sent)),
            r => r.map_err(|e| ctx("read", e))?,
        };
        if n == 0 {
            return Err(format!(
                "port {client_port}: EOF after {got} of {} bytes",
                plan.down
            ));
        }
        if let Some(i) = pattern_mismatch(&buf[..n], got) {
            return Err(format!(
                "port {client_port}: byte {} is not the pattern",
                got + i as u64
            ));
        }
        got += n as u64;
        mark_started(plan, started, local);
        since_pause += n as u64;
        if since_pause >= plan.chunk && got < plan.down {
            since_pause = 0;
            thread::sleep(plan.pause);
        }
    }
    mark_started(plan, started, local);

    let pattern = pattern_buffer();
    let mut offset = 0u64;
    since_pause = 0;
    while offset < plan.up {
        let len = (plan.up - offset).min(plan.chunk - since_pause) as usize;
        let slice = pattern_slice(&pattern, offset, len.min(PATTERN_WINDOW));
        stream.write_all(slice).map_err(|e| ctx("write", e))?;
        offset += slice.len() as u64;
        bytes_sent += slice.len() as u64;
        since_pause += slice.len() as u64;
        if since_pause >= plan.chunk {
            since_pause = 0;
            if offset < plan.up {
                thread::sleep(plan.pause);
            }
        }
    }

    if !plan.hold.is_zero() {
        thread::sleep(plan.hold);
    }
    if close == CloseBy::Client {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| ctx("shutdown", e))?;
    }
    let mut extra = 0u64;
    loop {
        match read_retrying(&mut stream, &mut buf).map_err(|e| ctx("waiting for EOF", e))? {
            0 => break,
            n => extra += n as u64,
        }
    }
    if extra > 0 {
        return Err(format!(
            "port {client_port}: server sent {extra} bytes more than {}",
            plan.down
        ));
    }
    Ok(summary(got, bytes_sent))
}

fn read_retrying(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn mark_started(plan: &ClientPlan, started: &AtomicBool, local: SocketAddr) {
    if let Some(path) = &plan.started_file
        && !started.swap(true, Ordering::Relaxed)
        && let Err(e) = write_atomically(path, &local.to_string())
    {
        eprintln!("meterd-traffic: cannot create {}: {e}", path.display());
    }
}

/// Writes `text` to a temporary file and renames it over `path`: whoever
/// sees `path` sees all of it.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

// ---------------------------------------------------------------- UDP

/// Set by SIGTERM: the UDP server logs every client it still holds and exits.
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_signal: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

/// Makes a UDP socket's buffers big enough that loopback never drops one of
/// the test's datagrams (the `FORCE` variants need CAP_NET_ADMIN, and
/// ignore `net.core.rmem_max`; without it the plain ones are the best try).
fn enlarge_buffers(socket: &UdpSocket) {
    let fd = socket.as_raw_fd();
    let size = UDP_BUFFER;
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for option in [forced, plain] {
            // SAFETY: a valid socket fd and a pointer to a c_int that lives
            // for the call, with its size.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

/// Totals of one UDP client, as the server's own calls returned them.
struct UdpTotals {
    sent: u64,
    received: u64,
    last: Instant,
    /// Wall clock of the first datagram received.
    first_payload: SystemTime,
    /// Wall clock of the latest datagram received or sent.
    last_payload: SystemTime,
}

fn udp_server(
    listen: &[SocketAddr],
    log: &Path,
    ready_file: Option<&Path>,
    idle: Duration,
) -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let log = LogFile::open(log)?;
    let sockets = listen
        .iter()
        .map(|addr| {
            let socket = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            enlarge_buffers(&socket);
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(socket)
        })
        .collect::<Result<Vec<_>>>()?;
    create_ready_file(ready_file)?;
    let servers: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let log = log.clone();
            thread::spawn(move || udp_serve(&socket, &log, idle))
        })
        .collect();
    for server in servers {
        server.join().expect("udp server thread panicked")?;
    }
    Ok(())
}

fn udp_serve(socket: &UdpSocket, log: &LogFile, idle: Duration) -> Result<()> {
    let local = socket.local_addr()?;
    let mut clients: HashMap<SocketAddr, UdpTotals> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let pattern = pattern_buffer();
    let flush = |peer: SocketAddr, totals: &UdpTotals| {
        log.append(&ConnLog {
            protocol: Protocol::Udp,
            client_addr: peer.ip(),
            client_port: peer.port(),
            server_addr: local.ip(),
            server_port: local.port(),
            bytes_sent: totals.sent,
            bytes_received: totals.received,
            close: None,
            error: None,
            accepted_unix_us: None,
            closed_unix_us: None,
            duration_us: None,
            first_payload_unix_us: Some(unix_us(totals.first_payload)),
            last_payload_unix_us: Some(unix_us(totals.last_payload)),
            request_arrived_unix_us: None,
        });
    };
    // Idle clients are swept at most every 100 ms, not per datagram: with
    // tens of thousands of (spoofed) clients a per-datagram sweep would
    // leave the real ones unanswered.
    let mut swept = Instant::now();
    loop {
        if TERMINATED.load(Ordering::SeqCst) {
            for (peer, totals) in &clients {
                flush(*peer, totals);
            }
            return Ok(());
        }
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let now = SystemTime::now();
                let totals = clients.entry(peer).or_insert(UdpTotals {
                    sent: 0,
                    received: 0,
                    last: Instant::now(),
                    first_payload: now,
                    last_payload: now,
                });
                totals.received += n as u64;
                totals.last = Instant::now();
                totals.last_payload = now;
                if let Some((bytes, size)) = parse_udp_get(&buf[..n]) {
                    let mut left = bytes;
                    while left > 0 {
                        let len = usize::try_from(left).map_or(size, |l| l.min(size));
                        let sent = socket
                            .send_to(&pattern_bytes(&pattern, len), peer)
                            .with_context(|| format!("send to {peer}"))?;
                        totals.sent += sent as u64;
                        left -= sent as u64;
                    }
                    // On loopback a datagram is through the stack (and the
                    // meter) when send_to returns.
                    totals.last_payload = SystemTime::now();
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("recv_from"),
        }
        if swept.elapsed() < Duration::from_millis(100) {
            continue;
        }
        swept = Instant::now();
        clients.retain(|peer, totals| {
            let keep = totals.last.elapsed() < idle;
            if !keep {
                flush(*peer, totals);
            }
            keep
        });
    }
}

/// A datagram payload of `len` pattern bytes (datagrams can exceed the
/// pattern window, so this copies).
fn pattern_bytes(pattern: &[u8], len: usize) -> Vec<u8> {
    if len <= PATTERN_WINDOW {
        pattern_slice(pattern, 0, len).to_vec()
    } else {
        (0..len as u64)
            .map(meterd_tests::wire::pattern_byte)
            .collect()
    }
}

/// What a `udp-client` run sends after its `--sizes` list.
struct UdpPlan {
    repeat: usize,
    get: u64,
    get_size: usize,
    get_rounds: usize,
    port: u16,
    pause: Duration,
    until_cut: bool,
}

fn udp_client(
    connect: SocketAddr,
    source: Option<IpAddr>,
    sizes: &[usize],
    plan: &UdpPlan,
) -> Result<()> {
    let &UdpPlan {
        repeat,
        get,
        get_size,
        get_rounds,
        port,
        pause,
        until_cut,
    } = plan;
    let local: SocketAddr = match source {
        Some(source) => SocketAddr::new(source, port),
        None if connect.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], port)),
        None => SocketAddr::from(([0u16; 8], port)),
    };
    let socket = UdpSocket::bind(local).with_context(|| format!("bind udp {local}"))?;
    enlarge_buffers(&socket);
    socket.connect(connect)?;
    socket.set_read_timeout(Some(Duration::from_secs(if until_cut { 2 } else { 5 })))?;
    let pattern = pattern_buffer();
    let mut summary = UdpClientSummary {
        client_addr: socket.local_addr()?.ip(),
        client_port: socket.local_addr()?.port(),
        server_port: connect.port(),
        bytes_sent: 0,
        bytes_received: 0,
        datagrams_sent: 0,
        datagrams_received: 0,
    };
    for _ in 0..repeat {
        for &size in sizes {
            let sent = socket.send(&pattern_bytes(&pattern, size))?;
            if sent != size {
                bail!("sent {sent} of a {size}-byte datagram");
            }
            summary.bytes_sent += sent as u64;
            summary.datagrams_sent += 1;
        }
    }
    let mut buf = vec![0u8; 65536];
    'rounds: for round in 0..get_rounds {
        if round > 0 && !pause.is_zero() {
            thread::sleep(pause);
        }
        let request = udp_get(get, get_size);
        summary.bytes_sent += socket.send(request.as_bytes())? as u64;
        summary.datagrams_sent += 1;
        let mut got = 0;
        while got < get {
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(_) if until_cut => break 'rounds,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("round {round}: received {got} of {get} bytes"));
                }
            };
            got += n as u64;
            summary.bytes_received += n as u64;
            summary.datagrams_received += 1;
        }
    }
    // Anything beyond what was asked for would be a server bug; count it.
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    while let Ok(n) = socket.recv(&mut buf) {
        summary.bytes_received += n as u64;
        summary.datagrams_received += 1;
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
