//! An HLS video on demand and the players that watch it.
//!
//! - [`Vod::cached`]: a 24 s VOD in 2 s MPEG-TS segments, made once by
//!   Debian's ffmpeg (x264 test pattern and a sine tone) and kept under
//!   `target/`, so every test serves the same bytes.
//! - [`Audience`]: ffmpeg players (`ffmpeg -re -i URL -c copy -f null -`,
//!   a real HLS client at real-time pace), each in a cgroup of its own and
//!   each from its own loopback source address. Debian 12's ffmpeg (5.1)
//!   has no `local_addr` option for its tcp/http protocols, so the test's
//!   network namespace rewrites the source instead: an nftables rule in the
//!   output hook marks the packets of sockets in the player's cgroup
//!   (`socket cgroupv2`, which the kernel refuses in postrouting) and a NAT
//!   rule in postrouting rewrites marked connections to the player's
//!   127.0.0.x. nginx (in the metered
//!   cgroup, in the same namespace) sees that address as the peer, as
//!   meterd does. The players' cgroups are siblings of the metered one, so
//!   their own sockets are not metered.
//! - [`ScriptedViewer`]: a minimal HLS client in a thread of the test
//!   process (moved into the test's namespace), for what ffmpeg cannot do:
//!   tell the test its connections' client ports before the first request,
//!   so the test can attribute them through meterd's API before any payload
//!   moves. It fetches the playlist and the segments at real-time pace, one
//!   segment ahead, like ffmpeg.
//!
//! What the players fetched is never taken from the players: the truth is
//! nginx's access log (`nginx`).
//!
//! Does not own: the server (`nginx`) or the comparison (`viewing`).

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::{Mutex, PoisonError},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    TestEnv,
    cgroup::{Cgroup, v2_root},
    netns::run_ok,
    nginx::{AccessEntry, Nginx},
    process::Proc,
};

/// The VOD's playlist name.
pub const PLAYLIST: &str = "index.m3u8";

/// Length of the VOD.
const VOD_SECONDS: u32 = 24;

/// `EXTINF` of every segment.
const SEGMENT_SECONDS: u32 = 2;

/// Where the VOD is kept; the name changes with what it is made of.
const VOD_DIR: &str = "meterd-tests/hls-vod-24s-2s-v1";

/// How long a player may take to make its first request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// After the request a leaving viewer leaves after, how long it waits
/// before it is killed: long enough that the response is delivered and
/// acknowledged (so nginx's count is what the client got), far shorter than
/// the 2 s until its next request.
const LEAVE_DELAY: Duration = Duration::from_millis(300);

/// One segment of the VOD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Its URI in the playlist (relative: `seg003.ts`).
    pub uri: String,
    /// Its `EXTINF`, in ms.
    pub duration_ms: u64,
    /// Its size.
    pub bytes: u64,
}

/// The VOD: a directory nginx serves, with the playlist and segments.
#[derive(Clone, Debug)]
pub struct Vod {
    /// The directory (nginx's `root`).
    pub dir: PathBuf,
    /// The segments, in order.
    pub segments: Vec<Segment>,
}

/// Serialises the threads of one test process that look for the VOD.
static MAKING: Mutex<()> = Mutex::new(());

impl Vod {
    /// The VOD under `target/`, made by ffmpeg if it is not there yet. A
    /// new one is made in a directory of its own and renamed into place,
    /// so test processes running at once never see half of one.
    pub fn cached() -> Vod {
        let _guard = MAKING.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(VOD_DIR);
        if let Ok(vod) = Vod::read(&dir) {
            return vod;
        }
        let _ = fs::remove_dir_all(&dir);
        let making = dir.with_extension(format!("making-{}", std::process::id()));
        let _ = fs::remove_dir_all(&making);
        fs::create_dir_all(&making)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", making.display()));
        let out = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args(["-t", &VOD_SECONDS.to_string()])
            // A key frame exactly every 2 s, so every segment is 2 s.
            .args(["-c:v", "libx264", "-preset", "veryfast", "-g", "50"])
            .args(["-keyint_min", "50", "-sc_threshold", "0"])
            .args(["-c:a", "aac", "-b:a", "64k"])
            .args(["-f", "hls", "-hls_time", &SEGMENT_SECONDS.to_string()])
            .args(["-hls_playlist_type", "vod", "-hls_segment_filename"])
            .arg(making.join("seg%03d.ts"))
            .arg(making.join(PLAYLIST))
            .output()
            .unwrap_or_else(|e| panic!("cannot run ffmpeg (Debian package ffmpeg): {e}"));
        assert!(
            out.status.success(),
            "ffmpeg could not make the HLS VOD ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Another test process may have won the race: then use its VOD.
        if fs::rename(&making, &dir).is_err() {
            let _ = fs::remove_dir_all(&making);
        }
        Vod::read(&dir).unwrap_or_else(|e| panic!("the VOD ffmpeg made is not usable: {e}"))
    }

    /// Reads and checks a VOD directory: at least 20 s in segments of
    /// [`SEGMENT_SECONDS`], each file present.
    fn read(dir: &Path) -> Result<Vod, String> {
        let playlist = fs::read_to_string(dir.join(PLAYLIST))
            .map_err(|e| format!("{}: {e}", dir.join(PLAYLIST).display()))?;
        let mut segments = Vec::new();
        for (uri, duration_ms) in parse_playlist(&playlist)? {
            let bytes = fs::metadata(dir.join(&uri))
                .map_err(|e| format!("{uri}: {e}"))?
                .len();
            segments.push(Segment {
                uri,
                duration_ms,
                bytes,
            });
        }
        let total: u64 = segments.iter().map(|s| s.duration_ms).sum();
        if total < 20_000
            || segments
                .iter()
                .any(|s| s.duration_ms != u64::from(SEGMENT_SECONDS) * 1000)
        {
            return Err(format!(
                "want >= 20 s in {SEGMENT_SECONDS} s segments: {segments:?}"
            ));
        }
        Ok(Vod {
            dir: dir.to_owned(),
            segments,
        })
    }

    /// The request path of segment `index`.
    pub fn segment_path(&self, index: usize) -> String {
        format!("/{}", self.segments[index].uri)
    }
}

/// The (URI, duration in ms) of a media playlist's segments; an error
/// unless it is a complete VOD playlist.
pub fn parse_playlist(text: &str) -> Result<Vec<(String, u64)>, String> {
    if !text.starts_with("#EXTM3U") || !text.contains("#EXT-X-ENDLIST") {
        return Err(format!("not a complete VOD playlist: {text:?}"));
    }
    let mut segments = Vec::new();
    let mut duration = None;
    for line in text.lines().map(str::trim) {
        if let Some(extinf) = line.strip_prefix("#EXTINF:") {
            let secs = extinf.split(',').next().unwrap_or("");
            let secs: f64 = secs.parse().map_err(|e| format!("EXTINF {secs:?}: {e}"))?;
            // EXTINF has microseconds at most; whole ms are exact enough.
            #[expect(clippy::cast_sign_loss, reason = "checked non-negative just before")]
            let ms = if secs >= 0.0 {
                (secs * 1000.0).round() as u64
            } else {
                return Err(format!("negative EXTINF {secs}"));
            };
            duration = Some(ms);
        } else if !line.is_empty() && !line.starts_with('#') {
            let ms = duration
                .take()
                .ok_or_else(|| format!("segment {line} without EXTINF"))?;
            segments.push((line.to_owned(), ms));
        }
    }
    Ok(segments)
}

/// What an ffmpeg player does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Watches to the end over persistent connections (ffmpeg's default:
    /// one for the playlist and, with `http_multiple`, two for segments).
    KeepAlive,
    /// Watches to the end with a new connection per segment
    /// (`-http_persistent 0`).
    PerSegment,
    /// Keep-alive; killed (SIGKILL) once the request for segment `after`
    /// is done: a viewer who leaves early.
    Leaver {
        /// The last segment it fetches.
        after: usize,
    },
    /// Keep-alive; stopped (SIGSTOP) once the request for segment `after`
    /// is done and continued (SIGCONT) `pause` later, its connections open
    /// all along. ffmpeg's `-re` then catches up with the wall clock in a
    /// burst, so it ends when it would have without the pause.
    Pauser {
        /// The last segment before the pause.
        after: usize,
        /// How long it is stopped.
        pause: Duration,
    },
}

/// Where an ffmpeg player is in its [`Role`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Not yet at its cue.
    Playing,
    /// Stopped since then.
    Paused(Instant),
    /// Cue seen at that time; to be killed [`LEAVE_DELAY`] later.
    Leaving(Instant),
    /// After its cue: plays to the end.
    Resumed,
    /// Exited (or killed as its role says).
    Done,
}

/// An ffmpeg player; killed on drop.
#[derive(Debug)]
pub struct FfmpegPlayer {
    /// A name for messages.
    pub name: String,
    /// The address nginx sees it come from.
    pub source: Ipv4Addr,
    /// What it does.
    pub role: Role,
    proc: Proc,
    stage: Stage,
    started: Instant,
    /// Kept until the player is gone: its processes live there.
    _cgroup: Cgroup,
}

impl FfmpegPlayer {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The last lines ffmpeg wrote.
    pub fn output_tail(&self, lines: usize) -> String {
        self.proc.output_tail(lines)
    }
}

/// A process of [`Audience::spawn`]; killed on drop.
#[derive(Debug)]
pub struct SourcedProcess {
    /// The process.
    pub proc: Proc,
    /// The address its connections come from.
    pub source: Ipv4Addr,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Kept until the process is gone: it lives there.
    _cgroup: Cgroup,
}

/// Players of one test: ffmpeg players from their own source addresses,
/// and the nftables table in the test's namespace that gives them those.
#[derive(Debug)]
pub struct Audience {
    netns: String,
    unique: String,
    dir: PathBuf,
    /// The cgroup v2 mount relative to /sys/fs/cgroup, where nft 1.0
    /// resolves `socket cgroupv2` paths ("" or "unified/").
    cgroup_prefix: String,
    players: u32,
}

/// The nft table in the test's namespace.
const NFT_TABLE: &str = "meterd_players";

impl Audience {
    /// Creates the nftables table that gives players their addresses, in
    /// `env`'s network namespace (the test must have one: the rules must
    /// not touch the host's network).
    pub fn new(env: &TestEnv) -> Audience {
        let netns = env
            .netns()
            .expect("players need the test's own network namespace (Setup { netns: true, .. })")
            .name()
            .to_owned();
        let root = v2_root().expect("no cgroup v2 mount");
        let cgroup_prefix = match root.strip_prefix("/sys/fs/cgroup") {
            Ok(rel) if rel.as_os_str().is_empty() => String::new(),
            Ok(rel) => format!("{}/", rel.display()),
            Err(e) => panic!(
                "the cgroup v2 mount is at {} ({e}); nft 1.0 resolves `socket cgroupv2` paths \
                 under /sys/fs/cgroup only, so players cannot be given their own addresses here",
                root.display()
            ),
        };
        let audience = Audience {
            netns,
            unique: env.unique().to_owned(),
            dir: env.dir().to_owned(),
            cgroup_prefix,
            players: 0,
        };
        // The mark is set where `socket cgroupv2` may be used (output); the
        // source is rewritten in postrouting, for a connection's first
        // packet (NAT applies the same mapping to the rest).
        audience.nft(
            "table",
            &format!(
                "table ip {NFT_TABLE} {{\n\
                 \tchain player_mark {{\n\t\ttype filter hook output priority filter; policy accept;\n\t}}\n\
                 \tchain player_source {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t}}\n\
                 }}\n"
            ),
        );
        audience
    }

    /// Runs an nft script (kept in the test's directory) in the namespace.
    /// `nsenter` enters only the network namespace; `ip netns exec` would
    /// remount /sys, where nft looks up cgroup paths.
    fn nft(&self, name: &str, script: &str) {
        let file = self.dir.join(format!("nft-{name}.nft"));
        fs::write(&file, script).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        run_ok(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", self.netns))
                .args(["nft", "-f"])
                .arg(&file),
        );
    }

    /// The namespace's nftables ruleset, for failure messages.
    pub fn ruleset(&self) -> String {
        run_ok(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", self.netns))
                .args(["nft", "list", "ruleset"]),
        )
    }

    /// Starts an ffmpeg player of `url` (inside the namespace) that nginx
    /// sees coming from `source` (127.0.0.1: no rewriting).
    pub fn ffmpeg(&mut self, name: &str, source: Ipv4Addr, url: &str, role: Role) -> FfmpegPlayer {
        let cgroup = self.sourced_cgroup(name, source);
        let mut cmd = Self::in_cgroup(&cgroup, &self.netns, "ffmpeg");
        cmd.args(["-hide_banner", "-nostdin", "-nostats", "-loglevel", "info"]);
        if role == Role::PerSegment {
            cmd.args(["-http_persistent", "0"]);
        }
        cmd.args(["-re", "-i", url, "-c", "copy", "-f", "null", "-"]);
        let proc = Proc::spawn(
            &format!("ffmpeg {name}"),
            &mut cmd,
            &self.dir.join(format!("ffmpeg-{name}.log")),
        );
        FfmpegPlayer {
            name: name.to_owned(),
            source,
            role,
            proc,
            stage: Stage::Playing,
            started: Instant::now(),
            _cgroup: cgroup,
        }
    }

    /// Starts `program args...` (inside the namespace, in a cgroup of its
    /// own) whose connections come from `source`, as a player's do: any
    /// client the test wants from an address of its own (an RTMP publisher
    /// or player). Its output goes to `<test dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        source: Ipv4Addr,
        program: &str,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> SourcedProcess {
        let cgroup = self.sourced_cgroup(name, source);
        let mut cmd = Self::in_cgroup(&cgroup, &self.netns, program);
        cmd.args(args);
        let log = self.dir.join(format!("{name}.log"));
        let proc = Proc::spawn(name, &mut cmd, &log);
        SourcedProcess {
            proc,
            source,
            log,
            _cgroup: cgroup,
        }
    }

    /// `program`, started in `cgroup` and then in network namespace `netns`.
    fn in_cgroup(cgroup: &Cgroup, netns: &str, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(cgroup.procs_file())
            .args(["ip", "netns", "exec", netns, program]);
        cmd
    }

    /// A new cgroup whose sockets' connections the namespace rewrites to
    /// come from `source` (127.0.0.1: no rewriting).
    fn sourced_cgroup(&mut self, name: &str, source: Ipv4Addr) -> Cgroup {
        assert!(source.is_loopback(), "{source} is not a loopback address");
        self.players += 1;
        let cgroup = Cgroup::create(&format!("{}-p{}", self.unique, self.players));
        if source != Ipv4Addr::LOCALHOST {
            let cgroup_name = cgroup
                .path()
                .file_name()
                .expect("cgroup has a name")
                .to_string_lossy()
                .into_owned();
            // The cgroup is directly under the v2 root: level 1.
            let mark = 0x6d00_0000_u32 | self.players;
            self.nft(
                name,
                &format!(
                    "add rule ip {NFT_TABLE} player_mark socket cgroupv2 level 1 \"{prefix}{cgroup_name}\" \
                     meta mark set {mark:#x}\n\
                     add rule ip {NFT_TABLE} player_source meta mark {mark:#x} snat to {source}\n",
                    prefix = self.cgroup_prefix
                ),
            );
        }
        cgroup
    }

    /// Plays every role out: watches nginx's access log every 50 ms and
    /// stops, continues or kills each player at its cue; returns once
    /// every player has exited (with success, unless killed as its role
    /// says). Panics (with the player's output) if one fails, makes no
    /// request within 20 s (its source address would not be its own),
    /// or `timeout` passes.
    pub fn direct(
        &self,
        players: &mut [FfmpegPlayer],
        nginx: &Nginx,
        vod: &Vod,
        timeout: Duration,
    ) {
        let started = Instant::now();
        loop {
            let log = nginx.entries();
            for player in players.iter_mut() {
                self.direct_one(player, &log, vod);
            }
            if players.iter().all(|p| p.stage == Stage::Done) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "players still running after {timeout:?}: {:?}",
                players
                    .iter()
                    .map(|p| (&p.name, p.stage))
                    .collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn direct_one(&self, player: &mut FfmpegPlayer, log: &[AccessEntry], vod: &Vod) {
        if player.stage == Stage::Done {
            return;
        }
        let mine: Vec<&AccessEntry> = log
            .iter()
            .filter(|e| e.remote_addr == player.source)
            .collect();
        let fetched = |index: usize| {
            let path = vod.segment_path(index);
            mine.iter().any(|e| e.path() == path)
        };
        if let Some(status) = player.proc.try_wait() {
            let killed_as_told =
                matches!(player.role, Role::Leaver { .. }) && player.stage == Stage::Resumed;
            assert!(
                status.success() || killed_as_told,
                "ffmpeg {} exited with {status} in stage {:?}; its output:\n{}",
                player.name,
                player.stage,
                player.output_tail(30)
            );
            assert!(
                player.stage == Stage::Resumed
                    || matches!(player.role, Role::KeepAlive | Role::PerSegment),
                "ffmpeg {} ended before its cue ({:?}); its output:\n{}",
                player.name,
                player.role,
                player.output_tail(30)
            );
            player.stage = Stage::Done;
            return;
        }
        assert!(
            !mine.is_empty() || player.started.elapsed() < FIRST_REQUEST_TIMEOUT,
            "nginx logged no request from {} ({}) within {FIRST_REQUEST_TIMEOUT:?}: the source \
             address rule did not apply, or ffmpeg failed. Its output:\n{}\nnft ruleset:\n{}",
            player.source,
            player.name,
            player.output_tail(20),
            self.ruleset()
        );
        match (player.role, player.stage) {
            (Role::Pauser { after, .. }, Stage::Playing) if fetched(after) => {
                player.proc.signal(libc::SIGSTOP);
                player.stage = Stage::Paused(Instant::now());
            }
            (Role::Pauser { pause, .. }, Stage::Paused(since)) if since.elapsed() >= pause => {
                player.proc.signal(libc::SIGCONT);
                player.stage = Stage::Resumed;
            }
            (Role::Leaver { after }, Stage::Playing) if fetched(after) => {
                player.stage = Stage::Leaving(Instant::now());
            }
            (Role::Leaver { .. }, Stage::Leaving(since)) if since.elapsed() >= LEAVE_DELAY => {
                let _: ExitStatus = player.proc.kill();
                player.stage = Stage::Resumed;
            }
            _ => {}
        }
    }
}

/// The current time in Unix ms.
pub fn unix_ms_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis(),
    )
    .expect("ms fit i64")
}

/// A connection a [`ScriptedViewer`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScriptedConn {
    /// Its client side.
    pub local: SocketAddr,
    /// When `connect` returned (Unix ms): the connection was established,
    /// no payload had moved yet.
    pub connected_unix_ms: i64,
}

/// A minimal HLS player in the test process (see the module docs).
#[derive(Clone, Debug)]
pub struct ScriptedViewer {
    /// nginx's address (inside the test's namespace).
    pub server: SocketAddr,
    /// The test's namespace, entered by the player's thread.
    pub netns: String,
    /// A connection per segment (all opened before the first request, each
    /// closed after its segment) instead of one keep-alive connection.
    pub connection_per_segment: bool,
    /// How many segments it watches (from the first).
    pub segments: usize,
}

impl ScriptedViewer {
    /// Plays in a thread of its own. `on_connect` runs for each of its
    /// connections after it is established and before anything is sent on
    /// it (the test attributes it there). The thread returns the
    /// connections it made.
    pub fn spawn(
        self,
        on_connect: impl FnMut(SocketAddr) + Send + 'static,
    ) -> JoinHandle<Vec<ScriptedConn>> {
        thread::spawn(move || self.play(on_connect))
    }

    fn play(self, mut on_connect: impl FnMut(SocketAddr)) -> Vec<ScriptedConn> {
        enter_netns(&self.netns);
        // Every connection is opened up front (a per-segment player's as a
        // pool, one used and closed per segment), and only then handed to
        // `on_connect`: attributing them waits for the agent to see them,
        // once for all, and never delays a request mid-play.
        let count = if self.connection_per_segment {
            self.segments
        } else {
            1
        };
        let mut conns = Vec::new();
        let mut pool: Vec<TcpStream> = (0..count)
            .map(|_| {
                let stream = TcpStream::connect(self.server)
                    .unwrap_or_else(|e| panic!("scripted viewer: connect {}: {e}", self.server));
                stream
                    .set_read_timeout(Some(Duration::from_secs(15)))
                    .expect("set read timeout");
                conns.push(ScriptedConn {
                    local: stream.local_addr().expect("local address"),
                    connected_unix_ms: unix_ms_now(),
                });
                stream
            })
            .collect();
        for c in &conns {
            on_connect(c.local);
        }
        pool.reverse();
        let mut stream = pool.pop().expect("a connection");
        let start = Instant::now();
        let playlist = get(&mut stream, self.server, &format!("/{PLAYLIST}"));
        let playlist = String::from_utf8(playlist).expect("playlist is UTF-8");
        let segments =
            parse_playlist(&playlist).unwrap_or_else(|e| panic!("scripted viewer: playlist: {e}"));
        assert!(
            segments.len() >= self.segments,
            "the playlist has {} segments, the viewer wants {}",
            segments.len(),
            self.segments
        );
        for (k, (uri, _)) in segments.iter().take(self.segments).enumerate() {
            // Segment k is due when segment k - 1 starts playing: one
            // segment ahead, as ffmpeg fetches them.
            let due = Duration::from_millis(
                segments[..k.saturating_sub(1)]
                    .iter()
                    .map(|(_, ms)| ms)
                    .sum(),
            );
            sleep_until(start + due);
            if self.connection_per_segment && k > 0 {
                stream = pool.pop().expect("a connection per segment");
            }
            let body = get(&mut stream, self.server, &format!("/{uri}"));
            assert!(!body.is_empty(), "segment {uri} is empty");
        }
        // Plays what it has buffered (the last segment) before it closes:
        // an idle tail shorter than session_idle, which must not count.
        if let Some((_, last)) = segments.get(self.segments.saturating_sub(1)) {
            thread::sleep(Duration::from_millis(*last));
        }
        drop(stream);
        conns
    }
}

/// Moves the calling thread into network namespace `name` (`ip netns`).
pub fn enter_netns(name: &str) {
    let path = format!("/var/run/netns/{name}");
    let ns = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: setns(2) with a namespace fd that stays open for the call;
    // CLONE_NEWNET changes only the calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
}

/// `GET path` on a keep-alive connection; the body, after checking the
/// status is 200. Reads exactly the response (its `Content-Length`), so the
/// connection can carry the next request.
fn get(stream: &mut TcpStream, server: SocketAddr, path: &str) -> Vec<u8> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: meterd-tests\r\nAccept: */*\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("scripted viewer: send GET {path}: {e}"));
    let mut raw = Vec::new();
    let mut buf = [0_u8; 16384];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("scripted viewer: GET {path}: {e}"));
        assert!(
            n > 0,
            "scripted viewer: GET {path}: connection closed in the headers"
        );
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 200 "),
        "scripted viewer: GET {path}: {head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("scripted viewer: GET {path}: no Content-Length: {head}"));
    let mut body = raw.split_off(head_end);
    while body.len() < length {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("scripted viewer: GET {path} body: {e}"));
        assert!(
            n > 0,
            "scripted viewer: GET {path}: connection closed in the body"
        );
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        body.len(),
        length,
        "scripted viewer: GET {path}: more than the body"
    );
    body
}

#[cfg(test)]
mod tests {
    use super::parse_playlist;

    #[test]
    fn vod_playlists_are_parsed() {
        let text = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.000000,\n\
                    seg000.ts\n#EXTINF:1.5,\nseg001.ts\n#EXT-X-ENDLIST\n";
        assert_eq!(
            parse_playlist(text).unwrap(),
            vec![
                ("seg000.ts".to_owned(), 2000),
                ("seg001.ts".to_owned(), 1500)
            ]
        );
        assert!(parse_playlist("#EXTM3U\n#EXTINF:2,\nseg000.ts\n").is_err());
        assert!(parse_playlist("#EXTM3U\nseg000.ts\n#EXT-X-ENDLIST\n").is_err());
    }
}
