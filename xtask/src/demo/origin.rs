//! The streaming origin of the demo: ffmpeg encoding a live HLS stream on
//! the spot into a directory, Debian's nginx serving it on two ports (one
//! per meterd service) with the shipped auth_request snippet, and nginx's
//! access log read back as the truth of what it served.
//!
//! The account comes from the URL's path (`/<account>/<channel>/...`):
//! HLS players resolve the playlist's segment URIs relative to the
//! playlist's URL, which drops its query, so `?account=` would reach nginx
//! with the playlist only. A real deployment signs that path with
//! `secure_link` (packaging/nginx/hls-secure-link.conf) so that a viewer
//! cannot bill someone else.
//!
//! Does not own: where the processes run (`sandbox`), the agent (`agent`).

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// nginx's port for the volume-tariff service.
pub const VOLUME_PORT: u16 = 8081;
/// nginx's port for the time-tariff service.
pub const TIME_PORT: u16 = 8082;

/// The access log's format: what [`Request`] parses. `$bytes_sent` is
/// what nginx wrote for the request, headers included: TCP payload, as
/// meterd counts it.
const LOG_FORMAT: &str = "$remote_addr $remote_port $server_port $status $bytes_sent \
                          $request_length $msec $meterd_reason \"$request\"";

/// The shipped snippet's socket, replaced by the demo agent's.
const SHIPPED_PROXY_PASS: &str = "proxy_pass http://unix:/run/meterd/meterd.sock:/v1/authorize;";

/// Writes `<dir>/nginx.conf` and the shipped snippet (asking the agent at
/// `api_socket`) as `<dir>/meterd.conf`; returns the config's path.
pub fn write_nginx_config(
    dir: &Path,
    live: &Path,
    api_socket: &Path,
    access_log: &Path,
) -> Result<PathBuf> {
    let shipped_path = crate::util::workspace_root().join("packaging/nginx/meterd.conf");
    let shipped = fs::read_to_string(&shipped_path)
        .with_context(|| format!("reading {}", shipped_path.display()))?;
    if shipped.matches(SHIPPED_PROXY_PASS).count() != 1 {
        bail!(
            "{} no longer has exactly one `{SHIPPED_PROXY_PASS}`: update the demo",
            shipped_path.display()
        );
    }
    let snippet = shipped.replace(
        SHIPPED_PROXY_PASS,
        &format!(
            "proxy_pass http://unix:{}:/v1/authorize;",
            api_socket.display()
        ),
    );
    let snippet_path = dir.join("meterd.conf");
    fs::write(&snippet_path, snippet)
        .with_context(|| format!("writing {}", snippet_path.display()))?;

    let mut servers = String::new();
    for port in [VOLUME_PORT, TIME_PORT] {
        let _ = write!(
            servers,
            r"
    server {{
        listen 127.0.0.1:{port};
        # /<account>/<channel>/<file>: the account meterd bills and the
        # content it keys the viewing session with. Demo only: a real
        # origin takes the account from a path secure_link has verified.
        location ~ ^/(?<account>[a-z]+)/(?<channel>[a-z]+)/(?<file>[a-z0-9]+\.(m3u8|ts))$ {{
            set $meterd_account $account;
            set $meterd_content $channel;
            auth_request /_meterd;
            alias {live}/$file;
            add_header Cache-Control no-cache;
        }}
        location / {{
            return 404;
        }}
        include {snippet};
    }}
",
            live = live.display(),
            snippet = snippet_path.display(),
        );
    }
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let conf = format!(
        r"# Written by `cargo xtask demo`.
daemon off;
master_process on;
worker_processes 1;
user www-data;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;

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
    log_format demo '{LOG_FORMAT}';
    access_log {access} demo;
    keepalive_timeout 30s;
    sendfile on;
{servers}}}
",
        dir = dir.display(),
        tmp = tmp.display(),
        access = access_log.display(),
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// nginx's arguments for `config`: its prefix, config and error log.
pub fn nginx_args(config: &Path) -> Vec<String> {
    let dir = config.parent().unwrap_or(Path::new("/"));
    vec![
        "-p".to_owned(),
        dir.display().to_string(),
        "-c".to_owned(),
        config.display().to_string(),
        "-e".to_owned(),
        dir.join("error.log").display().to_string(),
    ]
}

/// The live encoder: a 320x240 test pattern at 10 frames/s, x264
/// ultrafast at a constant 300 kbit/s (so each viewer's rate, and so the
/// charges, are predictable), cut into 2 s segments of which the playlist
/// lists the last 6; older ones are deleted. Written to temporary names
/// and renamed, so nginx never serves half a segment or playlist.
pub fn encoder_command(live: &Path) -> Command {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(ENCODER_ARGS.split_whitespace())
        .arg("-hls_segment_filename")
        .arg(live.join("seg%05d.ts"))
        .arg(live.join("index.m3u8"));
    cmd
}

/// The encoder's options (see [`encoder_command`]); `-g 20` at 10
/// frames/s: a key frame, so a segment boundary, every 2 s.
const ENCODER_ARGS: &str = "-hide_banner -nostdin -nostats -loglevel warning \
    -re -f lavfi -i testsrc=size=320x240:rate=10 \
    -c:v libx264 -preset ultrafast -tune zerolatency -g 20 -keyint_min 20 -sc_threshold 0 \
    -b:v 300k -minrate 300k -maxrate 300k -bufsize 300k -x264-params nal-hrd=cbr \
    -f hls -hls_time 2 -hls_list_size 6 -hls_flags delete_segments+temp_file";

/// How many segments the live playlist lists now.
pub fn live_segments(live: &Path) -> usize {
    fs::read_to_string(live.join("index.m3u8")).map_or(0, |p| {
        p.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    })
}

/// One line of the access log: one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `$remote_addr`: the viewer's own address (the sandbox's NAT).
    pub addr: Ipv4Addr,
    /// `$server_port`: which service.
    pub server_port: u16,
    /// `$status`.
    pub status: u16,
    /// `$bytes_sent`.
    pub bytes_sent: u64,
    /// `$msec` in ms: when the request ended.
    pub end_ms: i64,
    /// `$meterd_reason`: why meterd refused it (`-`: it did not).
    pub reason: String,
    /// The request line's path.
    pub path: String,
}

impl Request {
    /// Parses one line of [`LOG_FORMAT`].
    fn parse(line: &str) -> Option<Request> {
        let (fields, request) = line.split_once(" \"")?;
        let f: Vec<&str> = fields.split(' ').collect();
        let [
            addr,
            _port,
            server_port,
            status,
            bytes_sent,
            _len,
            msec,
            reason,
        ] = f[..]
        else {
            return None;
        };
        let (secs, millis) = msec.split_once('.')?;
        Some(Request {
            addr: addr.parse().ok()?,
            server_port: server_port.parse().ok()?,
            status: status.parse().ok()?,
            bytes_sent: bytes_sent.parse().ok()?,
            end_ms: secs.parse::<i64>().ok()? * 1000 + millis.parse::<i64>().ok()?,
            reason: reason.to_owned(),
            path: request.split_whitespace().nth(1)?.to_owned(),
        })
    }

    /// Whether it fetched a segment (not the playlist).
    pub fn is_segment(&self) -> bool {
        // The encoder names them seg%05d.ts.
        Path::new(&self.path)
            .extension()
            .is_some_and(|ext| ext == "ts")
    }
}

/// Reads the access log as nginx appends to it.
#[derive(Debug)]
pub struct AccessLog {
    path: PathBuf,
    /// Bytes of complete lines read so far.
    offset: usize,
}

impl AccessLog {
    /// A reader of `path` from its start.
    pub fn new(path: &Path) -> AccessLog {
        AccessLog {
            path: path.to_owned(),
            offset: 0,
        }
    }

    /// The complete lines appended since the last call. A line nginx is
    /// still writing (no newline yet) waits for the next call.
    pub fn poll(&mut self) -> Vec<Request> {
        let Ok(text) = fs::read(&self.path) else {
            return Vec::new();
        };
        let Some(end) = text.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        if end < self.offset {
            return Vec::new();
        }
        let new = String::from_utf8_lossy(&text[self.offset..=end]).into_owned();
        self.offset = end + 1;
        new.lines().filter_map(Request::parse).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_parsed() {
        let r = Request::parse(
            "127.0.0.13 40112 8081 200 80417 160 1796117679.003 - \"GET /bob/sport/seg00004.ts \
             HTTP/1.1\"",
        )
        .unwrap();
        assert_eq!(r.addr, Ipv4Addr::new(127, 0, 0, 13));
        assert_eq!((r.server_port, r.status, r.bytes_sent), (8081, 200, 80_417));
        assert_eq!(r.end_ms, 1_796_117_679_003);
        assert_eq!(r.reason, "-");
        assert!(r.is_segment());
        assert!(Request::parse("127.0.0.1 1 2 3").is_none());
    }
}
