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
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
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
        /// connection's local port, so a test can name it to meterd's API.
        #[arg(long)]
        started_file: Option<PathBuf>,
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
        } => {
            let plan = ClientPlan {
                connect,
                down,
                up,
                close,
                pause: Duration::from_millis(pause_ms),
                chunk: chunk.max(1),
                hold: Duration::from_millis(hold_ms),
                started_file,
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
        } => udp_client(connect, &sizes, repeat, get, get_size.max(1), get_rounds),
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

/// A stream that counts what its `read` and `write` calls returned.
struct Counted {
    stream: TcpStream,
    sent: u64,
    received: u64,
}

impl Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    self.received += n as u64;
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

fn serve(stream: TcpStream, log: &LogFile) {
    let (accepted, accepted_wall) = (Instant::now(), SystemTime::now());
    let peer = stream.peer_addr();
    let local = stream.local_addr();
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut conn = Counted {
        stream,
        sent: 0,
        received: 0,
    };
    let mut close = None;
    let outcome = serve_request(&mut conn, &mut close);
    // Close before logging: the log line means "this connection is over",
    // and its duration ends with the close.
    let Counted {
        stream,
        sent,
        received,
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
                    match client_connection(plan, close, &started) {
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

fn client_connection(
    plan: &ClientPlan,
    close: CloseBy,
    started: &AtomicBool,
) -> Result<ClientConn, String> {
    let mut stream =
        TcpStream::connect(plan.connect).map_err(|e| format!("connect {}: {e}", plan.connect))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let client_port = stream.local_addr().map_err(|e| e.to_string())?.port();
    let ctx = |what: &str, e: io::Error| format!("port {client_port}: {what}: {e}");
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
        let n = read_retrying(&mut stream, &mut buf[..want]).map_err(|e| ctx("read", e))?;
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
        mark_started(plan, started, client_port);
        since_pause += n as u64;
        if since_pause >= plan.chunk && got < plan.down {
            since_pause = 0;
            thread::sleep(plan.pause);
        }
    }
    mark_started(plan, started, client_port);

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
    Ok(ClientConn {
        client_port,
        server_port: plan.connect.port(),
        bytes_received: got,
        bytes_sent,
        close,
    })
}

fn read_retrying(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn mark_started(plan: &ClientPlan, started: &AtomicBool, client_port: u16) {
    if let Some(path) = &plan.started_file
        && !started.swap(true, Ordering::Relaxed)
        && let Err(e) = write_atomically(path, &client_port.to_string())
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
        });
    };
    loop {
        if TERMINATED.load(Ordering::SeqCst) {
            for (peer, totals) in &clients {
                flush(*peer, totals);
            }
            return Ok(());
        }
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let totals = clients.entry(peer).or_insert(UdpTotals {
                    sent: 0,
                    received: 0,
                    last: Instant::now(),
                });
                totals.received += n as u64;
                totals.last = Instant::now();
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
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("recv_from"),
        }
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

fn udp_client(
    connect: SocketAddr,
    sizes: &[usize],
    repeat: usize,
    get: u64,
    get_size: usize,
    get_rounds: usize,
) -> Result<()> {
    let any: SocketAddr = if connect.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(any)?;
    enlarge_buffers(&socket);
    socket.connect(connect)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let pattern = pattern_buffer();
    let mut summary = UdpClientSummary {
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
    for round in 0..get_rounds {
        let request = udp_get(get, get_size);
        summary.bytes_sent += socket.send(request.as_bytes())? as u64;
        summary.datagrams_sent += 1;
        let mut got = 0;
        while got < get {
            let n = socket
                .recv(&mut buf)
                .with_context(|| format!("round {round}: received {got} of {get} bytes"))?;
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
