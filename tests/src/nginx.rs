//! Debian's nginx as a test's streaming server, and its access log as the
//! truth of what it served.
//!
//! [`Nginx::start`] writes a config into the test's directory (its own
//! pid file, error log, temp paths and access log, listening on the test's
//! ports), starts `nginx` in the test's cgroup (so meterd meters the
//! sockets its worker accepts) and, when the test has one, inside its
//! network namespace. The access log has one line per request, written by
//! nginx when the request is done:
//!
//! `$remote_addr $remote_port $server_port $connection $connection_requests
//! $status $bytes_sent $request_length $msec $request_time "$request"`
//!
//! `$bytes_sent` is everything nginx wrote for the request, status line and
//! headers included, and `$request_length` everything it read (request
//! line, headers, body): TCP payload, which is what meterd counts.
//! `$msec` is when the request ended and `$request_time` how long it took
//! since nginx read its first byte, both in milliseconds.
//!
//! [`Nginx::start_with`] adds what a test needs beyond that ([`NginxExtra`]):
//! the workers' `user`, top-level directives (`load_module`, an `rtmp {}`
//! block) and more of `http {}` (servers of its own, such as the shipped
//! examples of `packaging/nginx/`); with no `listen` of its own, the
//! harness's server is left out.
//!
//! Does not own: what is served (`hls`), or judging meterd (`viewing`).

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    TestEnv,
    process::{Proc, read_lossy, wait_until},
};

/// How long nginx may take to bind its ports and start its worker.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The access log's `log_format`, parsed by [`parse_access_log`].
const LOG_FORMAT: &str = "$remote_addr $remote_port $server_port $connection \
                          $connection_requests $status $bytes_sent $request_length $msec \
                          $request_time \"$request\"";

/// What a test chooses of nginx's config.
#[derive(Clone, Debug)]
pub struct NginxConfig {
    /// `listen` addresses (inside the test's namespace, if it has one).
    pub listen: Vec<SocketAddr>,
    /// The document root.
    pub root: PathBuf,
    /// `keepalive_timeout`: how long nginx keeps an idle keep-alive
    /// connection open before it closes it.
    pub keepalive_timeout: Duration,
}

/// What a test adds to nginx's config ([`Nginx::start_with`]); all empty by
/// default.
#[derive(Clone, Debug, Default)]
pub struct NginxExtra {
    /// `user` of the worker processes (e.g. `www-data`, as Debian's nginx
    /// runs them); `None`: root.
    pub user: Option<String>,
    /// Top-level directives, before `events` (`load_module`, `rtmp {}`).
    pub main: String,
    /// Directives inside `http {}`, after the harness's own (`log_format`,
    /// `server` blocks).
    pub http: String,
}

/// One line of the access log: one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    /// `$remote_addr`: the client address as nginx's socket has it.
    pub remote_addr: IpAddr,
    /// `$remote_port`.
    pub remote_port: u16,
    /// `$server_port`: which listening port, so which service.
    pub server_port: u16,
    /// `$connection`: nginx's serial number of the connection.
    pub connection: u64,
    /// `$connection_requests`: the request's number on its connection.
    pub connection_requests: u64,
    /// `$status`.
    pub status: u16,
    /// `$bytes_sent`: bytes written to the client, headers included.
    pub bytes_sent: u64,
    /// `$request_length`: bytes read from the client.
    pub request_length: u64,
    /// `$msec` in ms: when the request ended (its last byte was written).
    pub end_ms: i64,
    /// `$request_time` in ms.
    pub request_time_ms: i64,
    /// `$request`: the request line.
    pub request: String,
}

impl AccessEntry {
    /// When nginx read the request's first byte (Unix ms).
    pub fn start_ms(&self) -> i64 {
        self.end_ms - self.request_time_ms
    }

    /// The request's path, from its request line.
    pub fn path(&self) -> &str {
        self.request.split_whitespace().nth(1).unwrap_or("")
    }

    /// The client side of the connection.
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(self.remote_addr, self.remote_port)
    }
}

/// A running nginx; stopped on drop.
#[derive(Debug)]
pub struct Nginx {
    proc: Proc,
    access_log: PathBuf,
    error_log: PathBuf,
}

impl Nginx {
    /// Writes the config into `<test dir>/<name>/` and starts nginx (master
    /// and one worker) in the test's cgroup and namespace; returns once its
    /// ports are bound and its worker runs, both in the cgroup.
    pub fn start(env: &TestEnv, name: &str, config: &NginxConfig) -> Nginx {
        Nginx::start_with(env, name, config, &NginxExtra::default())
    }

    /// [`Nginx::start`] with more config ([`NginxExtra`]). An empty
    /// `config.listen` leaves out the harness's own server.
    pub fn start_with(
        env: &TestEnv,
        name: &str,
        config: &NginxConfig,
        extra: &NginxExtra,
    ) -> Nginx {
        let dir = env.dir().join(name);
        fs::create_dir_all(dir.join("tmp"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let conf = dir.join("nginx.conf");
        let pid_file = dir.join("nginx.pid");
        let access_log = dir.join("access.log");
        let error_log = dir.join("error.log");
        fs::write(
            &conf,
            render_config(config, extra, &dir, &pid_file, &access_log, &error_log),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));

        // Join the cgroup first, then enter the namespace (as `env` does for
        // its servers): `ip netns exec` remounts /sys.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(env.cgroup().procs_file());
        if let Some(ns) = env.netns() {
            cmd.args(["ip", "netns", "exec", ns.name()]);
        }
        cmd.arg("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log);
        let mut proc = Proc::spawn("nginx", &mut cmd, &dir.join("nginx.out"));

        // nginx writes its pid file after binding the listening sockets;
        // the worker is forked after that, into the master's cgroup.
        let mut exited = None;
        let up = wait_until(START_TIMEOUT, || {
            exited = proc.try_wait();
            exited.is_some() || (pid_file.exists() && env.cgroup().pids().len() >= 2)
        });
        assert!(
            up && exited.is_none(),
            "nginx did not start ({exited:?}); its output:\n{}\nerror log:\n{}",
            proc.output_tail(30),
            read_lossy(&error_log)
        );
        let master: u32 = read_lossy(&pid_file).trim().parse().unwrap_or(0);
        assert_eq!(
            master,
            proc.pid(),
            "nginx's pid file says {master}, the process started is {}",
            proc.pid()
        );
        for pid in env.cgroup().pids() {
            assert!(
                env.cgroup().contains(pid),
                "nginx process {pid} is not in {}",
                env.cgroup().path().display()
            );
        }
        Nginx {
            proc,
            access_log,
            error_log,
        }
    }

    /// Every request logged so far.
    pub fn entries(&self) -> Vec<AccessEntry> {
        parse_access_log(&read_lossy(&self.access_log)).unwrap_or_else(|e| {
            panic!(
                "nginx's access log {} is malformed: {e}",
                self.access_log.display()
            )
        })
    }

    /// The access log's path.
    pub fn access_log(&self) -> &Path {
        &self.access_log
    }

    /// The end of nginx's error log, for failure messages.
    pub fn error_log_tail(&self, lines: usize) -> String {
        crate::process::tail(&read_lossy(&self.error_log), lines)
    }

    /// Panics with the error log unless nginx still runs.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.try_wait() {
            panic!(
                "nginx exited ({status}); error log:\n{}",
                self.error_log_tail(30)
            );
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful shutdown, the worker finishes and exits with
        // the master (SIGKILL of the master alone would leave the worker).
        self.proc.signal(libc::SIGQUIT);
        if self.proc.wait_timeout(Duration::from_secs(5)).is_none() {
            eprintln!("nginx did not exit within 5 s of SIGQUIT; killing it");
        }
    }
}

fn render_config(
    config: &NginxConfig,
    extra: &NginxExtra,
    dir: &Path,
    pid_file: &Path,
    access_log: &Path,
    error_log: &Path,
) -> String {
    let tmp = dir.join("tmp");
    let mut listen = String::new();
    for addr in &config.listen {
        let _ = writeln!(listen, "        listen {addr};");
    }
    let server = if config.listen.is_empty() {
        String::new()
    } else {
        format!(
            "    server {{\n{listen}        root {root};\n    }}\n",
            root = config.root.display()
        )
    };
    // Root reads the test's files wherever they are; a test that means
    // the workers to run as another user says so.
    format!(
        r"daemon off;
master_process on;
worker_processes 1;
user {user};
pid {pid};
error_log {error} notice;
{main}
events {{
    worker_connections 512;
}}

http {{
    types {{
        application/vnd.apple.mpegurl m3u8;
        video/mp2t ts;
    }}
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format truth '{format}';
    access_log {access} truth;
    keepalive_timeout {keepalive}s;
    sendfile on;

{server}{http}
}}
",
        user = extra.user.as_deref().unwrap_or("root"),
        main = extra.main,
        http = extra.http,
        pid = pid_file.display(),
        error = error_log.display(),
        tmp = tmp.display(),
        format = LOG_FORMAT,
        access = access_log.display(),
        keepalive = config.keepalive_timeout.as_secs(),
    )
}

/// Parses the access log ([`LOG_FORMAT`]). A last line without its newline
/// is still being written and is left out; any other malformed line is an
/// error.
pub fn parse_access_log(text: &str) -> Result<Vec<AccessEntry>, String> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| parse_line(line).map_err(|e| format!("line {}: {e}: {line}", n + 1)))
        .collect()
}

fn parse_line(line: &str) -> Result<AccessEntry, String> {
    let (fields, request) = line.split_once(" \"").ok_or("no quoted request line")?;
    let request = request.strip_suffix('"').ok_or("unterminated request")?;
    let f: Vec<&str> = fields.split(' ').collect();
    if f.len() != 10 {
        return Err(format!("{} fields before the request, want 10", f.len()));
    }
    let num = |i: usize| -> Result<u64, String> {
        f[i].parse()
            .map_err(|e| format!("field {} {:?}: {e}", i + 1, f[i]))
    };
    let port = |i: usize| -> Result<u16, String> {
        f[i].parse()
            .map_err(|e| format!("field {} {:?}: {e}", i + 1, f[i]))
    };
    Ok(AccessEntry {
        remote_addr: f[0]
            .parse()
            .map_err(|e| format!("address {:?}: {e}", f[0]))?,
        remote_port: port(1)?,
        server_port: port(2)?,
        connection: num(3)?,
        connection_requests: num(4)?,
        status: u16::try_from(num(5)?).map_err(|e| e.to_string())?,
        bytes_sent: num(6)?,
        request_length: num(7)?,
        end_ms: seconds_ms(f[8])?,
        request_time_ms: seconds_ms(f[9])?,
        request: request.to_owned(),
    })
}

/// `"1796117677.074"` (seconds with exactly three decimals, nginx's `$msec`
/// and `$request_time`) as milliseconds.
fn seconds_ms(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?} is not seconds with three decimals");
    let (secs, millis) = text.split_once('.').ok_or_else(bad)?;
    if millis.len() != 3 {
        return Err(bad());
    }
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    let millis: i64 = millis.parse().map_err(|_| bad())?;
    Ok(secs * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_parsed() {
        let log = "127.0.0.2 39462 28001 7 2 206 37117 149 1796117679.003 0.012 \
                   \"GET /seg002.ts HTTP/1.1\"\n127.0.0.2 1 2 3";
        let entries = parse_access_log(log).unwrap();
        assert_eq!(entries.len(), 1, "the unfinished last line is left out");
        let e = &entries[0];
        assert_eq!(e.remote_addr.to_string(), "127.0.0.2");
        assert_eq!((e.remote_port, e.server_port), (39462, 28001));
        assert_eq!((e.connection, e.connection_requests), (7, 2));
        assert_eq!(
            (e.status, e.bytes_sent, e.request_length),
            (206, 37117, 149)
        );
        assert_eq!((e.end_ms, e.request_time_ms), (1_796_117_679_003, 12));
        assert_eq!(e.start_ms(), 1_796_117_678_991);
        assert_eq!(e.path(), "/seg002.ts");
        assert!(parse_access_log("x 1 2 3 4 5 6 7 8 9 \"GET / HTTP/1.1\"\n").is_err());
        assert!(seconds_ms("12.5").is_err());
    }
}
