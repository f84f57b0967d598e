//! Many open TCP connections to a metered port, held idle or streaming.
//!
//! Pairs of helper processes, both this xtask binary re-run with a hidden
//! subcommand (`cargo xtask bench-helper serve|connect`), one pair per
//! server port, since one process may hold only `RLIMIT_NOFILE` sockets:
//! - the server runs inside the metered cgroup (so meterd meters the sockets
//!   it accepts), listens on `0.0.0.0:PORT` and holds every accepted socket.
//!   A line `rate B` on its stdin (answered `rate B`) makes it write B bytes
//!   per second to every accepted socket, one write per socket per second,
//!   the sockets' writes spread evenly over the second (a paced stream, as
//!   a server sends a live stream's segments; `rate 0` stops); a line
//!   `written` is answered `written N`, the bytes it wrote so far;
//! - the client runs outside it, opens connections on command (a line `N` on
//!   its stdin: "have N open"), answers `open N` when done, and spreads them
//!   over destinations 127.0.0.1..127.0.0.8. Each connection has a source
//!   address of its own (127.<1 + shard>.x.y), so that once it moves payload
//!   it is a viewing session of its own (meterd keys unattributed sessions
//!   by client address), and no shard is ever short of ephemeral ports. A
//!   line `send B` writes B bytes on every open connection (answered `sent
//!   N`): the connections stay open but are then viewing sessions. A line
//!   `close` resets every connection (answered `open 0`).
//!
//!   The client reads and discards whatever the server sends (an epoll
//!   thread), so a streaming connection's receive window never closes.
//!
//! Both raise their own open-file limit to the hard limit, and exit when their stdin
//! closes (so they die with the bench); the client's sockets linger 0, so
//! its exit resets every connection instead of leaving TIME_WAITs behind.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use super::host::{self, Cgroup, Proc};

/// Destination addresses the client spreads its connections over.
const DESTINATIONS: u8 = 8;
/// Most connections one shard (server port, server and client process)
/// holds; fewer where the open-file limit is lower.
const PER_SHARD: usize = 15_000;

/// The hidden helper processes.
#[derive(Subcommand)]
pub enum Helper {
    /// Accept and hold every connection to PORT (run inside the cgroup).
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Open connections to PORT on command from stdin.
    Connect {
        #[arg(long)]
        port: u16,
        /// This client's shard: its source addresses are 127.<1 + shard>.x.y.
        #[arg(long, default_value_t = 0)]
        shard: u8,
    },
}

pub fn helper(cmd: &Helper) -> Result<()> {
    host::raise_nofile()?;
    match cmd {
        Helper::Serve { port } => serve(*port),
        // Reads its commands from stdin and returns at EOF.
        Helper::Connect { port, shard } => connect(*port, *shard),
    }
}

/// The server's pacing: bytes per second per socket, and bytes written.
#[derive(Default)]
struct Pace {
    rate: AtomicU64,
    written: AtomicU64,
}

/// Slots per second of the pacer: each socket is written in one of them.
const PACE_SLOTS: usize = 20;

fn serve(port: u16) -> Result<()> {
    let listener = listen(port)?;
    let pace = Arc::new(Pace::default());
    let (accepted, streams) = mpsc::channel::<TcpStream>();
    {
        let pace = Arc::clone(&pace);
        thread::spawn(move || pacer(&pace, &streams));
    }
    println!("ready");
    std::io::stdout().flush()?;
    {
        let pace = Arc::clone(&pace);
        // The bench exits or drops its pipe: so does the server.
        thread::spawn(move || {
            let _ = serve_commands(&pace);
            std::process::exit(0);
        });
    }
    let mut accepted_count = 0usize;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // The pacer owns the socket; nothing else writes to it.
                if accepted.send(stream).is_err() {
                    bail!("the pacer thread ended");
                }
                accepted_count += 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                bail!("out of file descriptors after {accepted_count} connections");
            }
            Err(_) => {}
        }
    }
}

/// `rate B` and `written` from the bench, until its pipe closes.
fn serve_commands(pace: &Pace) -> Result<()> {
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim();
        if let Some(rate) = line.strip_prefix("rate ") {
            let rate: u64 = rate.parse().context("expected bytes per second")?;
            pace.rate.store(rate, Ordering::Relaxed);
            writeln!(out, "rate {rate}")?;
        } else if line == "written" {
            writeln!(out, "written {}", pace.written.load(Ordering::Relaxed))?;
        } else {
            writeln!(out, "error unknown command {line:?}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// Holds the accepted sockets and, at a rate above 0, writes `rate` bytes
/// to each once per second: socket `i` in slot `i % PACE_SLOTS` of the
/// second, so the writes (and meterd's per-packet work) are spread evenly.
/// A write that does not fit the send buffer is cut short, never waited
/// for: the bytes written are what is counted.
fn pacer(pace: &Pace, streams: &mpsc::Receiver<TcpStream>) {
    let mut held: Vec<TcpStream> = Vec::new();
    let mut payload = Vec::new();
    let slot = Duration::from_secs(1) / u32::try_from(PACE_SLOTS).unwrap_or(1);
    let mut next = Instant::now();
    let mut n = 0usize;
    loop {
        held.extend(streams.try_iter().inspect(|s| {
            let _ = s.set_nonblocking(true);
        }));
        let rate = usize::try_from(pace.rate.load(Ordering::Relaxed)).unwrap_or(0);
        if rate > 0 {
            payload.resize(rate, b'x');
            let mut written = 0u64;
            for stream in held.iter_mut().skip(n % PACE_SLOTS).step_by(PACE_SLOTS) {
                if let Ok(k) = stream.write(&payload) {
                    written += k as u64;
                }
            }
            pace.written.fetch_add(written, Ordering::Relaxed);
        }
        n += 1;
        next += slot;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            // Fell behind (a loaded machine): skip ahead, never burst.
            next = now;
        }
    }
}

/// A listener with the largest backlog the kernel allows (std's is 128,
/// too small for tens of thousands of connects in a burst).
fn listen(port: u16) -> Result<TcpListener> {
    // SAFETY: plain socket syscalls on an fd we own until from_raw_fd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            bail!("bind 0.0.0.0:{port}: {}", std::io::Error::last_os_error());
        }
        if libc::listen(fd, 65_535) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

fn connect(port: u16, shard: u8) -> Result<()> {
    let mut held: Vec<TcpStream> = Vec::new();
    let drain = Drain::start()?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim() == "close" {
            // Linger 0: each close resets its connection at once.
            held.clear();
            writeln!(out, "open 0")?;
            out.flush()?;
            continue;
        }
        if let Some(bytes) = line.trim().strip_prefix("send ") {
            let bytes: usize = bytes.parse().context("expected a byte count")?;
            let payload = vec![b'x'; bytes];
            // A few bytes into an empty send buffer: never blocks.
            let mut sent = 0;
            for stream in &mut held {
                if stream.write_all(&payload).is_ok() {
                    sent += 1;
                }
            }
            writeln!(out, "sent {sent}")?;
            out.flush()?;
            continue;
        }
        let want: usize = line.trim().parse().context("expected a connection count")?;
        let mut error = None;
        while held.len() < want {
            let i = held.len();
            let dest = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(DESTINATIONS)) as u8);
            // 250 per /24, from .1: PER_SHARD fits in 127.<1 + shard>.0-59.
            let source = Ipv4Addr::new(
                127,
                shard.saturating_add(1),
                (i / 250) as u8,
                1 + (i % 250) as u8,
            );
            match connect_from(source, SocketAddrV4::new(dest, port)) {
                Ok(stream) => {
                    linger_zero(&stream);
                    drain.add(&stream)?;
                    held.push(stream);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        match error {
            None => writeln!(out, "open {}", held.len())?,
            Some(e) => writeln!(out, "open {} error {e}", held.len())?,
        }
        out.flush()?;
    }
    Ok(())
}

/// An epoll thread that reads and discards what arrives on the client's
/// sockets (nonblocking; the main thread's few-byte `send` writes fit an
/// empty send buffer).
struct Drain {
    epoll: i32,
}

impl Drain {
    fn start() -> Result<Drain> {
        // SAFETY: epoll_create1 has no memory-safety preconditions.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        thread::spawn(move || drain(epoll));
        Ok(Drain { epoll })
    }

    fn add(&self, stream: &TcpStream) -> Result<()> {
        stream.set_nonblocking(true)?;
        let fd = stream.as_raw_fd();
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: u64::try_from(fd).unwrap_or(0),
        };
        // SAFETY: valid epoll and socket fds, and an event struct.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &raw mut event) } != 0 {
            bail!("epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Reads every readable socket of `epoll` until it would block, forever
/// (the process exits at the end of its commands).
fn drain(epoll: i32) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `events` has room for the count passed.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 1024, 1000) };
        for e in events.iter().take(usize::try_from(n).unwrap_or(0)) {
            let fd = i32::try_from(e.u64).unwrap_or(-1);
            loop {
                // SAFETY: reads into our buffer; a closed fd just fails.
                let k = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if k > 0 {
                    continue;
                }
                let again =
                    k < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
                if !again {
                    // Closed or reset: level-triggered, it would wake us forever.
                    // SAFETY: removing an fd from our epoll set.
                    unsafe {
                        libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
                    }
                }
                break;
            }
        }
    }
}

/// A TCP connection to `dest` from `source` (any port): every 127/8
/// address is local, so each connection can have its own.
fn connect_from(source: Ipv4Addr, dest: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket syscalls on an fd owned by the TcpStream from
    // from_raw_fd on (which closes it on every error path below).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let from = sockaddr(SocketAddrV4::new(source, 0));
        if libc::bind(fd, (&raw const from).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let to = sockaddr(dest);
        if libc::connect(fd, (&raw const to).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Close with RST: no TIME_WAIT left holding ports after the bench.
fn linger_zero(stream: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// One server port with its server and client process.
struct Shard {
    port: u16,
    open: usize,
    // Dropped in declaration order: the client first (its exit resets the
    // connections), then the server.
    client_in: ChildStdin,
    client_out: BufReader<ChildStdout>,
    _client: Proc,
    server_in: ChildStdin,
    server_out: BufReader<ChildStdout>,
    _server: Proc,
}

impl Shard {
    fn start(exe: &Path, cgroup: &Cgroup, port: u16, shard: u8) -> Result<Shard> {
        let mut server = Proc::spawn(
            format!("bench-helper serve --port {port}"),
            cgroup
                .command(exe)
                .args(["bench-helper", "serve", "--port", &port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let server_in = server.take_stdin().context("server stdin")?;
        let mut server_out = BufReader::new(server.take_stdout().context("server stdout")?);
        let line = host::read_line(&mut server_out, Duration::from_secs(10))?;
        if line != "ready" {
            bail!("the connection server on port {port} said {line:?}");
        }
        let mut client = Proc::spawn(
            format!("bench-helper connect --port {port}"),
            Command::new(exe)
                .args(["bench-helper", "connect", "--port", &port.to_string()])
                .args(["--shard", &shard.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        Ok(Shard {
            port,
            open: 0,
            client_in: client.take_stdin().context("client stdin")?,
            client_out: BufReader::new(client.take_stdout().context("client stdout")?),
            _client: client,
            server_in,
            server_out,
            _server: server,
        })
    }
}

/// The helpers, seen from the bench: one server port per shard, because a
/// process may hold only so many sockets (`RLIMIT_NOFILE`'s hard limit,
/// which root cannot raise without CAP_SYS_RESOURCE, as in this sandbox).
pub struct Fleet {
    shards: Vec<Shard>,
    /// Connections open now, over all shards.
    pub open: usize,
    /// Most connections one helper process can hold.
    pub per_process: usize,
}

impl Fleet {
    /// Picks enough free ports for `capacity` connections, and starts a
    /// server for each in `cgroup` and a client for each outside it.
    pub fn start(cgroup: &Cgroup, capacity: usize) -> Result<Fleet> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        // Room for the process's own fds (stdio, pipes, the listener).
        let per_process = usize::try_from(host::nofile_hard_limit().saturating_sub(256))
            .unwrap_or(usize::MAX)
            .clamp(1, PER_SHARD);
        let count = capacity.div_ceil(per_process).max(1);
        let mut ports: Vec<u16> = Vec::new();
        let mut shards = Vec::new();
        for i in 0..count {
            let port = host::free_port(&ports)?;
            ports.push(port);
            let shard = u8::try_from(i).context("more than 255 connection shards")?;
            shards.push(Shard::start(&exe, cgroup, port, shard)?);
        }
        Ok(Fleet {
            shards,
            open: 0,
            per_process,
        })
    }

    /// The metered server ports.
    pub fn ports(&self) -> Vec<u16> {
        self.shards.iter().map(|s| s.port).collect()
    }

    /// An `ss` filter matching the server side of every connection.
    pub fn ss_filter(&self) -> String {
        let ports: Vec<String> = self
            .shards
            .iter()
            .map(|s| format!("sport = :{}", s.port))
            .collect();
        format!("( {} )", ports.join(" or "))
    }

    /// Has `n` connections open (opens more, never closes), spread evenly
    /// over the shards, whose clients connect in parallel; returns how many
    /// are open and what stopped it short, if something did.
    pub fn open(&mut self, n: usize) -> Result<(usize, Option<String>)> {
        let started = Instant::now();
        let count = self.shards.len();
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let want = n / count + usize::from(i < n % count);
            host::send_line(&mut shard.client_in, &want.to_string())?;
        }
        // ~20 µs per connect on loopback; allow for a slow machine.
        let timeout = Duration::from_secs(60) + Duration::from_millis(n as u64 / 100);
        let mut errors = Vec::new();
        for shard in &mut self.shards {
            let line = host::read_line(&mut shard.client_out, timeout)?;
            let mut words = line.split_whitespace();
            if words.next() != Some("open") {
                bail!(
                    "the connection client for port {} said {line:?}",
                    shard.port
                );
            }
            shard.open = words
                .next()
                .and_then(|w| w.parse().ok())
                .context("the connection client's count")?;
            if let Some((_, e)) = line.split_once(" error ") {
                errors.push(format!("port {}: {e}", shard.port));
            }
        }
        self.open = self.shards.iter().map(|s| s.open).sum();
        super::progress(format!(
            "{} connections open to {} server ports ({:.1} s)",
            self.open,
            count,
            started.elapsed().as_secs_f64()
        ));
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        Ok((self.open, error))
    }

    /// Resets every open connection from the client side (the servers'
    /// sockets see the RST and close).
    pub fn close(&mut self) -> Result<()> {
        for shard in &mut self.shards {
            host::send_line(&mut shard.client_in, "close")?;
        }
        for shard in &mut self.shards {
            let line = host::read_line(&mut shard.client_out, Duration::from_secs(60))?;
            if line != "open 0" {
                bail!(
                    "the connection client for port {} said {line:?}",
                    shard.port
                );
            }
            shard.open = 0;
        }
        self.open = 0;
        Ok(())
    }

    /// Has every server write `bytes_per_s` bytes per second to each of its
    /// accepted sockets (server to client, the metered direction), once per
    /// second per socket; 0 stops.
    pub fn set_rate(&mut self, bytes_per_s: u64) -> Result<()> {
        for shard in &mut self.shards {
            host::send_line(&mut shard.server_in, &format!("rate {bytes_per_s}"))?;
        }
        for shard in &mut self.shards {
            let line = host::read_line(&mut shard.server_out, Duration::from_secs(10))?;
            if line != format!("rate {bytes_per_s}") {
                bail!("the connection server on port {} said {line:?}", shard.port);
            }
        }
        Ok(())
    }

    /// Bytes the servers have written to their sockets so far.
    pub fn written(&mut self) -> Result<u64> {
        let mut total = 0;
        for shard in &mut self.shards {
            host::send_line(&mut shard.server_in, "written")?;
            let line = host::read_line(&mut shard.server_out, Duration::from_secs(10))?;
            total += line
                .strip_prefix("written ")
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| {
                    format!("the connection server on port {} said {line:?}", shard.port)
                })?;
        }
        Ok(total)
    }

    /// Writes `bytes` bytes on every open connection (client to server), so
    /// that each becomes a viewing session; returns on how many it wrote.
    pub fn send(&mut self, bytes: usize) -> Result<usize> {
        for shard in &mut self.shards {
            host::send_line(&mut shard.client_in, &format!("send {bytes}"))?;
        }
        let mut sent = 0;
        for shard in &mut self.shards {
            let line = host::read_line(&mut shard.client_out, Duration::from_secs(60))?;
            sent += line
                .strip_prefix("sent ")
                .and_then(|n| n.parse::<usize>().ok())
                .with_context(|| {
                    format!(
                        "the connection client for port {} said {line:?}",
                        shard.port
                    )
                })?;
        }
        Ok(sent)
    }
}
