//! Admission, attribution and accounts (issue 10): the shipped nginx
//! configs of `packaging/nginx/` running for real, and the clients and
//! receivers that judge what meterd did with them.
//!
//! - [`Origin`]: one test's world. Its agent (with `[api] group =
//!   "www-data"` and, when asked, a `billing.limit_webhook`), and Debian's
//!   nginx with `user www-data;`, serving the shipped
//!   `hls-secure-link.conf` with the shipped `meterd.conf` snippet, and
//!   optionally the shipped `rtmp.conf` (Debian's `libnginx-mod-rtmp`) and
//!   its callback relay. The shipped text is used as it is; only what names
//!   this machine changes (ports, the media directory, the agent's socket,
//!   where the snippet is), each replacement checked to match exactly
//!   once, so a changed file fails here instead of being tested half.
//! - Signed URLs ([`signed_path`]): nginx's `secure_link_md5` scheme of
//!   `hls-secure-link.conf`, computed here ([`md5`], [`base64url`]).
//! - nginx's own records, the truth: the harness's access log (`nginx`),
//!   an admission log per request ([`AdmissionEntry`]: what nginx passed to
//!   meterd as the account, meterd's refusal reason, whether the response
//!   completed), nginx-rtmp's access log per RTMP session ([`RtmpEntry`]:
//!   its bytes sent and received on the connection) and the relay's log of
//!   every callback with meterd's answer ([`RelayEntry`]).
//! - Clients: curl from a chosen source address ([`Origin::curl`]), a
//!   progressive reader that records when it received each byte
//!   ([`read_stream`]), a webhook receiver that fails or goes down on cue
//!   ([`WebhookReceiver`]), curl on the API socket as another user
//!   ([`curl_unix_as`]), and a flood of attributions ([`flood_pending`]).
//!
//! Does not own: the agent's lifecycle (`agent`), the HLS players (`hls`),
//! nginx's process (`nginx`), or the viewing-session comparison
//! (`viewing`).

use std::{
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    Agent, AgentConfig, Setup, TestEnv,
    hls::{Audience, PLAYLIST, Vod, enter_netns, unix_ms_now},
    http,
    ledger::sqlite,
    nginx::{Nginx, NginxConfig, NginxExtra},
    port, privilege,
    process::{read_lossy, wait_until},
};

/// The stream (a directory of the media root) every test serves.
pub const STREAM: &str = "movie";

/// The secret of `hls-secure-link.conf`'s `secure_link_md5`.
pub const SECRET: &str = "secret-of-the-origin";

/// Where Debian's `libnginx-mod-rtmp` puts the module.
pub const RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

/// The user and group nginx's workers run as on Debian.
pub const WWW_DATA: (u32, u32) = (33, 33);

/// `nobody`/`nogroup`: a user outside the API's group.
pub const NOBODY: (u32, u32) = (65_534, 65_534);

/// The format of the admission log ([`AdmissionEntry`]).
const ADMISSION_FORMAT: &str = "$remote_addr $remote_port $connection $connection_requests \
                                $status $bytes_sent $request_completion $meterd_account \
                                $meterd_reason $msec \"$request\"";

/// The format of nginx-rtmp's access log ([`RtmpEntry`]).
const RTMP_FORMAT: &str = "$connection $remote_addr $command $app $name \"$args\" \
                           $bytes_received $bytes_sent $msec";

/// The format of the callback relay's log ([`RelayEntry`]).
const RELAY_FORMAT: &str = "$msec $status \"$request_body\"";

/// MD5's per-round shift amounts (RFC 1321).
const MD5_SHIFT: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9,
    14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15,
    21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];
/// MD5's constants: floor(abs(sin(i + 1)) * 2^32) (RFC 1321).
const MD5_K: [u32; 64] = [
    0xd76a_a478,
    0xe8c7_b756,
    0x2420_70db,
    0xc1bd_ceee,
    0xf57c_0faf,
    0x4787_c62a,
    0xa830_4613,
    0xfd46_9501,
    0x6980_98d8,
    0x8b44_f7af,
    0xffff_5bb1,
    0x895c_d7be,
    0x6b90_1122,
    0xfd98_7193,
    0xa679_438e,
    0x49b4_0821,
    0xf61e_2562,
    0xc040_b340,
    0x265e_5a51,
    0xe9b6_c7aa,
    0xd62f_105d,
    0x0244_1453,
    0xd8a1_e681,
    0xe7d3_fbc8,
    0x21e1_cde6,
    0xc337_07d6,
    0xf4d5_0d87,
    0x455a_14ed,
    0xa9e3_e905,
    0xfcef_a3f8,
    0x676f_02d9,
    0x8d2a_4c8a,
    0xfffa_3942,
    0x8771_f681,
    0x6d9d_6122,
    0xfde5_380c,
    0xa4be_ea44,
    0x4bde_cfa9,
    0xf6bb_4b60,
    0xbebf_bc70,
    0x289b_7ec6,
    0xeaa1_27fa,
    0xd4ef_3085,
    0x0488_1d05,
    0xd9d4_d039,
    0xe6db_99e5,
    0x1fa2_7cf8,
    0xc4ac_5665,
    0xf429_2244,
    0x432a_ff97,
    0xab94_23a7,
    0xfc93_a039,
    0x655b_59c3,
    0x8f0c_cc92,
    0xffef_f47d,
    0x8584_5dd1,
    0x6fa8_7e4f,
    0xfe2c_e6e0,
    0xa301_4314,
    0x4e08_11a1,
    0xf753_7e82,
    0xbd3a_f235,
    0x2ad7_d2bb,
    0xeb86_d391,
];
/// MD5 (RFC 1321), for `secure_link_md5` signatures.
#[expect(
    clippy::many_single_char_names,
    reason = "RFC 1321's names, so the code reads against it"
)]
pub fn md5(data: &[u8]) -> [u8; 16] {
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut message = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bits.to_le_bytes());
    for block in message.as_chunks::<64>().0 {
        let mut m = [0_u32; 16];
        for (word, bytes) in m.iter_mut().zip(block.as_chunks::<4>().0) {
            *word = u32::from_le_bytes(*bytes);
        }
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(MD5_K[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(MD5_SHIFT[i]));
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }
    let mut out = [0_u8; 16];
    for (chunk, s) in out.as_chunks_mut::<4>().0.iter_mut().zip(state) {
        chunk.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// Base64 with the URL alphabet and no padding, as `secure_link` wants it.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0_u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The signed path of `file` of [`STREAM`] for `account`, valid until
/// `expires` (Unix seconds), by `hls-secure-link.conf`'s scheme:
/// `/hls/<account>/<expires>/<md5>/<stream>/<file>` with
/// `<md5> = base64url(md5("<expires><account>/<stream> <secret>"))`.
pub fn signed_path(account: &str, expires: u64, file: &str) -> String {
    let signature = base64url(&md5(
        format!("{expires}{account}/{STREAM} {SECRET}").as_bytes()
    ));
    format!("/hls/{account}/{expires}/{signature}/{STREAM}/{file}")
}

/// Now in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A shipped file of `packaging/nginx/`.
pub fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/nginx")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `text` with `from` replaced by `to`; panics unless `from` occurs exactly
/// `times` times (the shipped file is not what this test knows).
fn replace(text: &str, from: &str, to: &str, times: usize, file: &str) -> String {
    let found = text.matches(from).count();
    assert_eq!(
        found, times,
        "packaging/nginx/{file}: {from:?} occurs {found} times, the test expects {times}: the \
         shipped file changed, update the test with it"
    );
    text.replace(from, to)
}

/// The shipped `meterd.conf` snippet, asking the agent at `api` instead of
/// `/run/meterd/meterd.sock`.
pub fn snippet(api: &Path) -> String {
    replace(
        &shipped("meterd.conf"),
        "proxy_pass http://unix:/run/meterd/meterd.sock:/v1/authorize;",
        &format!("proxy_pass http://unix:{}:/v1/authorize;", api.display()),
        1,
        "meterd.conf",
    )
}

/// The shipped `hls-secure-link.conf` server on 127.0.0.1:`port`, serving
/// `media`, including the snippet at `snippet`.
pub fn hls_server(port: u16, media: &Path, snippet: &Path) -> String {
    const FILE: &str = "hls-secure-link.conf";
    let text = shipped(FILE);
    // The scheme [`signed_path`] computes, unchanged.
    let scheme = format!("secure_link_md5 \"$expires$account/$stream {SECRET}\";");
    let text = replace(&text, &scheme, &scheme, 1, FILE);
    let text = replace(
        &text,
        "    listen 8080;",
        &format!("    listen 127.0.0.1:{port};"),
        1,
        FILE,
    );
    let text = replace(
        &text,
        "alias /var/www/media/$stream/$file;",
        &format!("alias {}/$stream/$file;", media.display()),
        1,
        FILE,
    );
    replace(
        &text,
        "include /usr/share/meterd/nginx/meterd.conf;",
        &format!("include {};", snippet.display()),
        1,
        FILE,
    )
}

/// The shipped `rtmp.conf`'s `rtmp {}` block on 127.0.0.1:`port`, its
/// callbacks to the relay on `relay`, with an access log at `log`.
pub fn rtmp_block(port: u16, relay: u16, log: &Path) -> String {
    const FILE: &str = "rtmp.conf";
    let text = shipped(FILE);
    let start = text
        .find("rtmp {\n")
        .expect("rtmp.conf has an rtmp {} block");
    let end = start
        + text[start..]
            .find("\n}\n")
            .expect("rtmp.conf's rtmp {} block ends")
        + 3;
    let block = &text[start..end];
    let block = replace(
        block,
        "        listen 1935;",
        &format!("        listen 127.0.0.1:{port};"),
        1,
        FILE,
    );
    let block = replace(
        &block,
        "http://127.0.0.1:8936/v1/rtmp",
        &format!("http://127.0.0.1:{relay}/v1/rtmp"),
        4,
        FILE,
    );
    replace(
        &block,
        "rtmp {\n",
        &format!(
            "rtmp {{\n    log_format meterd '{RTMP_FORMAT}';\n    access_log {} meterd;\n",
            log.display()
        ),
        1,
        FILE,
    )
}

/// The relay `server {}` of `rtmp.conf`'s closing comment (`# Inside http
/// { }:`), uncommented, on 127.0.0.1:`relay`, to the agent at `api`,
/// logging every callback and meterd's answer to `log`.
pub fn rtmp_relay(relay: u16, api: &Path, log: &Path) -> String {
    const FILE: &str = "rtmp.conf";
    let text = shipped(FILE);
    let (_, comment) = text
        .split_once("# Inside http { }:\n")
        .expect("rtmp.conf names the relay server for http { }");
    let mut server = String::new();
    for line in comment.lines() {
        let line = line
            .strip_prefix("#   ")
            .unwrap_or_else(|| panic!("{FILE}: {line:?} is not part of the commented relay"));
        let _ = writeln!(server, "    {line}");
    }
    let server = replace(
        &server,
        "listen 127.0.0.1:8936;",
        &format!(
            "listen 127.0.0.1:{relay};\n        access_log {} relay;",
            log.display()
        ),
        1,
        FILE,
    );
    replace(
        &server,
        "proxy_pass http://unix:/run/meterd/meterd.sock:/v1/rtmp;",
        &format!("proxy_pass http://unix:{}:/v1/rtmp;", api.display()),
        1,
        FILE,
    )
}

/// The ports of one test (slot): the HLS server, nginx-rtmp, its callback
/// relay, a webhook receiver, and one more.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// `hls-secure-link.conf`'s server.
    pub hls: u16,
    /// nginx-rtmp.
    pub rtmp: u16,
    /// nginx-rtmp's callback relay (not metered).
    pub relay: u16,
    /// The test's webhook receiver (in the host's namespace, where the
    /// agent runs).
    pub webhook: u16,
    /// For anything else (a traffic server).
    pub other: u16,
}

impl Ports {
    /// The ports of `slot` ([`port`]).
    pub fn of_slot(slot: u16) -> Ports {
        Ports {
            hls: port(slot, 0),
            rtmp: port(slot, 1),
            relay: port(slot, 2),
            webhook: port(slot, 3),
            other: port(slot, 4),
        }
    }
}

/// What a test wants of its [`Origin`].
#[derive(Clone, Debug, Default)]
pub struct OriginOptions {
    /// The agent's config; `[api] group = "www-data"` is added.
    pub agent: AgentConfig,
    /// `billing.limit_webhook`.
    pub webhook: Option<String>,
    /// More of `http {}` (e.g. `limit_rate`), before the servers.
    pub http: String,
    /// Also nginx-rtmp (`rtmp.conf`) and its relay.
    pub rtmp: bool,
    /// Files of pseudo-random bytes added to the stream: (name, size).
    pub files: Vec<(String, u64)>,
}

/// One request of the admission log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionEntry {
    /// `$remote_addr:$remote_port`.
    pub client: SocketAddr,
    /// `$connection`.
    pub connection: u64,
    /// `$connection_requests`.
    pub connection_requests: u64,
    /// `$status`.
    pub status: u16,
    /// `$bytes_sent`.
    pub bytes_sent: u64,
    /// `$request_completion` is `OK`: the whole response was written.
    pub completed: bool,
    /// `$meterd_account`: what nginx passed to meterd (`None`: not set,
    /// meterd was not asked).
    pub account: Option<String>,
    /// `$meterd_reason`: meterd's `X-Meterd-Reason`.
    pub reason: Option<String>,
    /// `$msec` in ms: when the request ended.
    pub end_ms: i64,
    /// `$request`.
    pub request: String,
}

impl AdmissionEntry {
    /// The request's path.
    pub fn path(&self) -> &str {
        self.request.split_whitespace().nth(1).unwrap_or("")
    }
}

/// One RTMP session of nginx-rtmp's access log, written when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtmpEntry {
    /// `$connection`.
    pub connection: u64,
    /// `$remote_addr`.
    pub remote_addr: Ipv4Addr,
    /// `$command`: `PLAY`, `PUBLISH`, ...
    pub command: String,
    /// `$name`: the stream.
    pub name: String,
    /// `$args`: the URL's query.
    pub args: String,
    /// `$bytes_received` on the connection.
    pub bytes_received: u64,
    /// `$bytes_sent` on the connection.
    pub bytes_sent: u64,
    /// `$msec` in ms: when the session ended.
    pub end_ms: i64,
}

/// One nginx-rtmp callback through the relay, with meterd's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEntry {
    /// `$msec` in ms.
    pub at_ms: i64,
    /// meterd's status.
    pub status: u16,
    /// `call=` of the form.
    pub call: String,
    /// `addr=` of the form.
    pub addr: String,
    /// `account=` of the form, if any.
    pub account: Option<String>,
}

/// `"1796117677.074"` as ms.
fn msec(text: &str) -> Option<i64> {
    let (s, ms) = text.split_once('.')?;
    if ms.len() != 3 {
        return None;
    }
    Some(s.parse::<i64>().ok()? * 1000 + ms.parse::<i64>().ok()?)
}

/// `-` (nginx's empty value) as `None`.
fn dash(text: &str) -> Option<String> {
    (text != "-" && !text.is_empty()).then(|| text.to_owned())
}

/// Complete lines of a log that nginx appends to.
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().filter(|l| !l.trim().is_empty())
}

/// Parses the admission log ([`ADMISSION_FORMAT`]).
pub fn parse_admission_log(text: &str) -> Result<Vec<AdmissionEntry>, String> {
    complete_lines(text)
        .map(|line| {
            let bad = |what: &str| format!("{what}: {line}");
            let (fields, request) = line.split_once(" \"").ok_or_else(|| bad("no request"))?;
            let request = request
                .strip_suffix('"')
                .ok_or_else(|| bad("unterminated request"))?;
            let f: Vec<&str> = fields.split(' ').collect();
            if f.len() != 10 {
                return Err(bad("want 10 fields before the request"));
            }
            let num = |i: usize| f[i].parse::<u64>().map_err(|_| bad(f[i]));
            Ok(AdmissionEntry {
                client: SocketAddr::new(
                    f[0].parse().map_err(|_| bad(f[0]))?,
                    f[1].parse().map_err(|_| bad(f[1]))?,
                ),
                connection: num(2)?,
                connection_requests: num(3)?,
                status: f[4].parse().map_err(|_| bad(f[4]))?,
                bytes_sent: num(5)?,
                completed: f[6] == "OK",
                account: dash(f[7]),
                reason: dash(f[8]),
                end_ms: msec(f[9]).ok_or_else(|| bad(f[9]))?,
                request: request.to_owned(),
            })
        })
        .collect()
}

/// Parses nginx-rtmp's access log ([`RTMP_FORMAT`]).
pub fn parse_rtmp_log(text: &str) -> Result<Vec<RtmpEntry>, String> {
    complete_lines(text)
        .map(|line| {
            let bad = |what: &str| format!("{what}: {line}");
            let (head, rest) = line.split_once(" \"").ok_or_else(|| bad("no args"))?;
            let (args, tail) = rest
                .split_once("\" ")
                .ok_or_else(|| bad("no end of args"))?;
            let h: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            if h.len() != 5 || t.len() != 3 {
                return Err(bad("want 5 fields, args, 3 fields"));
            }
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad(s));
            Ok(RtmpEntry {
                connection: num(h[0])?,
                remote_addr: h[1].parse().map_err(|_| bad(h[1]))?,
                command: h[2].to_owned(),
                name: h[4].to_owned(),
                args: args.to_owned(),
                bytes_received: num(t[0])?,
                bytes_sent: num(t[1])?,
                end_ms: msec(t[2]).ok_or_else(|| bad(t[2]))?,
            })
        })
        .collect()
}

/// Parses the relay's log ([`RELAY_FORMAT`]).
pub fn parse_relay_log(text: &str) -> Result<Vec<RelayEntry>, String> {
    complete_lines(text)
        .map(|line| {
            let bad = |what: &str| format!("{what}: {line}");
            let mut parts = line.splitn(3, ' ');
            let at_ms = parts.next().and_then(msec).ok_or_else(|| bad("msec"))?;
            let status = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("status"))?;
            let body = parts
                .next()
                .and_then(|b| b.strip_prefix('"')?.strip_suffix('"'))
                .ok_or_else(|| bad("body"))?;
            let field = |name: &str| {
                body.split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            Ok(RelayEntry {
                at_ms,
                status,
                call: field("call").ok_or_else(|| bad("no call="))?,
                addr: field("addr").ok_or_else(|| bad("no addr="))?,
                account: field("account"),
            })
        })
        .collect()
}

/// What curl got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// HTTP status (0: none).
    pub status: u16,
    /// Body bytes received.
    pub size: u64,
    /// The connection's client side, as nginx sees it.
    pub client: SocketAddr,
}

/// Pseudo-random bytes (xorshift), so no compression or cache can shrink
/// them.
fn noise(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// One test's world (module docs). Dropped in field order: players, nginx,
/// the agent, then the environment.
#[derive(Debug)]
pub struct Origin {
    /// Clients from addresses of their own (`hls::Audience`).
    pub audience: Audience,
    /// Debian's nginx with the shipped configs.
    pub nginx: Nginx,
    /// The agent.
    pub agent: Agent,
    /// Cgroup, namespace, directory.
    pub env: TestEnv,
    /// The test's ports.
    pub ports: Ports,
    /// The VOD, as served from the stream's directory.
    pub vod: Vod,
    admission_log: PathBuf,
    rtmp_log: PathBuf,
    relay_log: PathBuf,
}

impl Origin {
    /// Sets up the world `name` (module docs); `None` where the machine
    /// cannot run it and skipping is allowed. `traffic` is
    /// [`crate::traffic_bin!`].
    pub fn start(
        name: &str,
        traffic: &str,
        ports: Ports,
        options: &OriginOptions,
    ) -> Option<Origin> {
        let env = TestEnv::new(
            name,
            traffic,
            Setup {
                netns: true,
                nft: true,
            },
        )?;
        assert!(
            !options.rtmp || Path::new(RTMP_MODULE).is_file(),
            "{RTMP_MODULE} is missing: install Debian's libnginx-mod-rtmp (cargo xtask setup does)"
        );
        let media = env.dir().join("media");
        let vod = copy_vod(&media.join(STREAM));
        for (i, (file, size)) in options.files.iter().enumerate() {
            let path = media.join(STREAM).join(file);
            fs::write(&path, noise(*size, 0x9e37_79b9 + i as u64))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        let agent = start_agent(&env, &options.agent, "", options.webhook.as_deref());
        let api = PathBuf::from(agent.ready().api);

        let conf = env.dir().join("conf");
        fs::create_dir_all(&conf)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", conf.display()));
        let snippet_path = conf.join("meterd.conf");
        fs::write(&snippet_path, snippet(&api))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", snippet_path.display()));
        let admission_log = env.dir().join("admission.log");
        let rtmp_log = env.dir().join("rtmp.log");
        let relay_log = env.dir().join("relay.log");
        let mut http = format!(
            "    log_format admission '{ADMISSION_FORMAT}';\n    access_log {} admission;\n\
             {}\n{}\n",
            admission_log.display(),
            options.http,
            hls_server(ports.hls, &media, &snippet_path)
        );
        let mut main = String::new();
        if options.rtmp {
            let _ = writeln!(main, "load_module {RTMP_MODULE};");
            main.push_str(&rtmp_block(ports.rtmp, ports.relay, &rtmp_log));
            let _ = write!(
                http,
                "    log_format relay '{RELAY_FORMAT}';\n{}",
                rtmp_relay(ports.relay, &api, &relay_log)
            );
        }
        let nginx = Nginx::start_with(
            &env,
            "nginx",
            &NginxConfig {
                listen: Vec::new(),
                root: media.clone(),
                keepalive_timeout: Duration::from_secs(30),
            },
            &NginxExtra {
                user: Some("www-data".to_owned()),
                main,
                http,
            },
        );
        let audience = Audience::new(&env);
        Some(Origin {
            audience,
            nginx,
            agent,
            env,
            ports,
            vod,
            admission_log,
            rtmp_log,
            relay_log,
        })
    }

    /// The agent's API socket.
    pub fn api(&self) -> PathBuf {
        PathBuf::from(self.agent.ready().api)
    }

    /// `http://127.0.0.1:<hls port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.hls)
    }

    /// The HLS server's address (inside the namespace).
    pub fn server(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.hls))
    }

    /// The network namespace's name.
    pub fn netns(&self) -> &str {
        self.env.netns().expect("an origin has a namespace").name()
    }

    /// The signed path of `file` for `account`, valid for an hour.
    pub fn signed(&self, account: &str, file: &str) -> String {
        signed_path(account, unix_now() + 3600, file)
    }

    /// The signed playlist URL for `account`.
    pub fn playlist_url(&self, account: &str) -> String {
        self.url(&self.signed(account, PLAYLIST))
    }

    /// Every request of the admission log so far.
    pub fn admission_entries(&self) -> Vec<AdmissionEntry> {
        parse_admission_log(&read_lossy(&self.admission_log))
            .unwrap_or_else(|e| panic!("the admission log is malformed: {e}"))
    }

    /// Every ended RTMP session so far.
    pub fn rtmp_entries(&self) -> Vec<RtmpEntry> {
        parse_rtmp_log(&read_lossy(&self.rtmp_log))
            .unwrap_or_else(|e| panic!("nginx-rtmp's access log is malformed: {e}"))
    }

    /// Every RTMP callback so far.
    pub fn relay_entries(&self) -> Vec<RelayEntry> {
        parse_relay_log(&read_lossy(&self.relay_log))
            .unwrap_or_else(|e| panic!("the relay's log is malformed: {e}"))
    }

    /// `GET path` with curl (inside the namespace) from `source`, on a
    /// connection of its own.
    pub fn curl(&self, source: Ipv4Addr, path: &str) -> Fetch {
        let url = self.url(path);
        let out = self
            .env
            .command(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "20",
                    "--interface",
                    &source.to_string(),
                    "-w",
                    "%{http_code} %{size_download} %{local_ip} %{local_port}",
                    &url,
                ],
            )
            .output()
            .unwrap_or_else(|e| panic!("cannot run curl (Debian package curl): {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let f: Vec<&str> = text.split_whitespace().collect();
        let parsed = (f.len() == 4)
            .then(|| {
                Some(Fetch {
                    status: f[0].parse().ok()?,
                    size: f[1].parse().ok()?,
                    client: SocketAddr::new(f[2].parse().ok()?, f[3].parse().ok()?),
                })
            })
            .flatten();
        parsed.unwrap_or_else(|| {
            panic!(
                "curl {url} from {source}: {} {text:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// `POST /v1/accounts/<account>/credit`; the status and the JSON answer
    /// (`Null` if it is not JSON).
    pub fn credit(
        &self,
        account: &str,
        credit_id: &str,
        amount_minor: u64,
    ) -> (u16, serde_json::Value) {
        let body =
            serde_json::json!({ "credit_id": credit_id, "amount_minor": amount_minor }).to_string();
        let r = http::post_json_unix(
            &self.api(),
            &format!("/v1/accounts/{account}/credit"),
            &body,
        )
        .unwrap_or_else(|e| panic!("POST /v1/accounts/{account}/credit: {e}"));
        (
            r.status,
            serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The ledger's events of `kind`: (event id, at ms, detail).
    pub fn events(&self, kind: &str) -> Vec<(String, i64, serde_json::Value)> {
        ledger_events(self.agent.ledger_path(), kind)
    }

    /// The uids of nginx's processes: (master, workers).
    pub fn nginx_uids(&self) -> Vec<(u32, u32)> {
        self.env
            .cgroup()
            .pids()
            .into_iter()
            .filter_map(|pid| Some((pid, uid_of(pid)?)))
            .collect()
    }
}

/// The VOD, copied into `dir` (nginx's workers, as www-data, read it
/// there; the cached one stays untouched).
fn copy_vod(dir: &Path) -> Vod {
    let cached = Vod::cached();
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for name in
        std::iter::once(PLAYLIST.to_owned()).chain(cached.segments.iter().map(|s| s.uri.clone()))
    {
        fs::copy(cached.dir.join(&name), dir.join(&name))
            .unwrap_or_else(|e| panic!("cannot copy {name} into {}: {e}", dir.display()));
    }
    Vod {
        dir: dir.to_owned(),
        segments: cached.segments,
    }
}

/// The real uid of process `pid`.
pub fn uid_of(pid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The agent for `env` with `config`, an `[api]` table of `group =
/// "www-data"` and `api` (more of its settings, e.g. `max_pending = 10`)
/// and, if given, `billing.limit_webhook = webhook`, started.
pub fn start_agent(env: &TestEnv, config: &AgentConfig, api: &str, webhook: Option<&str>) -> Agent {
    let pin_dir = Path::new(privilege::BPFFS).join(env.unique());
    let mut config = config.clone();
    let _ = write!(config.extra_toml, "\n[api]\ngroup = \"www-data\"\n{api}\n");
    let mut agent = Agent::new(env.dir(), env.cgroup().path(), &pin_dir, config);
    if let Some(url) = webhook {
        // The harness's config has no webhook setting; it goes into its
        // [billing] table.
        let path = agent.config_path().to_owned();
        let text = read_lossy(&path);
        let text = replace(
            &text,
            "[billing]\n",
            &format!("[billing]\nlimit_webhook = \"{url}\"\n"),
            1,
            "(the harness's meterd.toml)",
        );
        fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    agent.start();
    agent
}

/// The ledger's events of `kind`: (event id, at ms, detail).
pub fn ledger_events(ledger: &Path, kind: &str) -> Vec<(String, i64, serde_json::Value)> {
    sqlite(
        ledger,
        &format!(
            "SELECT event_id, at_ms, detail FROM ledger_events WHERE kind = '{kind}' \
             ORDER BY at_ms, event_id"
        ),
    )
    .into_iter()
    .map(|row| {
        let [id, at, detail] =
            <[String; 3]>::try_from(row).unwrap_or_else(|row| panic!("ledger_events row {row:?}"));
        (
            id,
            at.parse().unwrap_or_else(|e| panic!("at_ms {at:?}: {e}")),
            serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
        )
    })
    .collect()
}

/// What a progressive reader received.
#[derive(Clone, Debug)]
pub struct Reading {
    /// Its connection's client side.
    pub local: SocketAddr,
    /// The response's status line.
    pub status_line: String,
    /// After every read: when, and the bytes received in all (headers
    /// included: the TCP payload the server sent).
    pub samples: Vec<(Instant, u64)>,
    /// How it ended: `eof`, `error: ...`, or `stopped` (by the test).
    pub end: String,
    /// When it ended.
    pub ended: Instant,
}

impl Reading {
    /// Bytes received in all.
    pub fn total(&self) -> u64 {
        self.samples.last().map_or(0, |s| s.1)
    }

    /// The first time it had received at least `bytes`.
    pub fn when(&self, bytes: u64) -> Option<Instant> {
        self.samples.iter().find(|s| s.1 >= bytes).map(|s| s.0)
    }

    /// Bytes received by `at`.
    pub fn by(&self, at: Instant) -> u64 {
        self.samples
            .iter()
            .take_while(|s| s.0 <= at)
            .last()
            .map_or(0, |s| s.1)
    }

    /// When the last byte arrived.
    pub fn last_byte(&self) -> Option<Instant> {
        self.samples.last().map(|s| s.0)
    }
}

/// How a [`read_stream`] reader takes the response in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// As fast as it arrives.
    Free,
    /// At this many bytes per second, like a player consuming its stream,
    /// with a small receive buffer ([`PACED_RCVBUF`]), so TCP's flow
    /// control makes the server send at the same steady rate (nginx's own
    /// `limit_rate` sends in bursts, once a second).
    Rate(u64),
}

/// `SO_RCVBUF` of a paced reader (the kernel doubles it).
pub const PACED_RCVBUF: u32 = 64 << 10;

/// A TCP connection to `server` whose receive buffer is `rcvbuf` bytes,
/// set before connecting (so the window scale follows it).
fn connect_with_rcvbuf(server: SocketAddr, rcvbuf: u32) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = server else {
        return Err(io::Error::other("IPv4 only"));
    };
    // SAFETY: plain socket(2), setsockopt(2) and connect(2) calls on a
    // socket this function owns, with pointers to values that outlive each
    // call; the fd is handed to TcpStream (which closes it) or closed here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let ok = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::connect(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) == 0;
        if !ok {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// `GET path` from `server` (inside `netns`), read to the end at `pace`
/// in a thread of its own, recording when each byte arrived; stops early
/// when `stop` is set.
pub fn read_stream(
    netns: &str,
    server: SocketAddr,
    path: &str,
    pace: Pace,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Reading> {
    let (netns, path) = (netns.to_owned(), path.to_owned());
    thread::spawn(move || {
        enter_netns(&netns);
        let mut stream = match pace {
            Pace::Free => TcpStream::connect(server),
            Pace::Rate(_) => connect_with_rcvbuf(server, PACED_RCVBUF),
        }
        .unwrap_or_else(|e| panic!("reader: connect {server}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set read timeout");
        let local = stream.local_addr().expect("local address");
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: meterd-tests\r\n\
                     Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap_or_else(|e| panic!("reader: send GET {path}: {e}"));
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut head = Vec::new();
        let mut total = 0_u64;
        let mut buf = vec![0_u8; 65_536];
        let end = loop {
            if stop.load(Ordering::Relaxed) {
                break "stopped".to_owned();
            }
            let mut want = buf.len();
            if let Pace::Rate(rate) = pace {
                // What it may have taken by now; at most 4 ms' worth more
                // per read, so it takes the stream in evenly.
                let due =
                    u64::try_from(started.elapsed().as_micros() * u128::from(rate) / 1_000_000)
                        .unwrap_or(u64::MAX);
                if total >= due {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                }
                want = usize::try_from(due - total)
                    .unwrap_or(usize::MAX)
                    .clamp(1, (rate / 250).max(1) as usize)
                    .min(buf.len());
            }
            match stream.read(&mut buf[..want]) {
                Ok(0) => break "eof".to_owned(),
                Ok(n) => {
                    total += n as u64;
                    samples.push((Instant::now(), total));
                    if head.len() < 4096 {
                        head.extend_from_slice(&buf[..n.min(4096)]);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => break format!("error: {e}"),
            }
        };
        let status_line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        Reading {
            local,
            status_line,
            samples,
            end,
            ended: Instant::now(),
        }
    })
}

/// One request the webhook receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    /// When.
    pub at: Instant,
    /// `X-Meterd-Event-Id`.
    pub header_id: Option<String>,
    /// The JSON body (`Null` if it is not JSON).
    pub body: serde_json::Value,
    /// What the receiver answered.
    pub status: u16,
}

#[derive(Debug, Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Deliveries still to answer with 500.
    fail: usize,
    /// Close the listener once `fail` reaches 0 from above (down).
    down_after_failing: bool,
    down: bool,
}

/// A webhook receiver on a loopback address (module docs): answers 500 to
/// the first deliveries it is told to fail, can go down (its listener
/// closed, so connections are refused) and come up again on the same
/// address.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookReceiver {
    /// Listens on `addr`; fails the first `fail` deliveries with 500 and,
    /// if `then_down`, goes down right after the last of them.
    pub fn start(addr: SocketAddr, fail: usize, then_down: bool) -> WebhookReceiver {
        let mut receiver = WebhookReceiver {
            addr,
            state: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        {
            let mut s = receiver.lock();
            s.fail = fail;
            s.down_after_failing = then_down && fail > 0;
        }
        receiver.up();
        receiver
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReceiverState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the listener again (answering 200 from now on).
    pub fn up(&mut self) {
        assert!(
            self.thread.as_ref().is_none_or(JoinHandle::is_finished),
            "the webhook receiver is up already"
        );
        {
            let mut s = self.lock();
            s.down = false;
        }
        let listener = TcpListener::bind(self.addr)
            .unwrap_or_else(|e| panic!("webhook receiver: bind {}: {e}", self.addr));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let (state, stop) = (Arc::clone(&self.state), Arc::clone(&self.stop));
        self.thread = Some(thread::spawn(move || {
            serve_webhook(&listener, &state, &stop);
        }));
    }

    /// Whether it went down after its failures.
    pub fn is_down(&self) -> bool {
        self.lock().down && self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_webhook(listener: &TcpListener, state: &Mutex<ReceiverState>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => panic!("webhook receiver: accept: {e}"),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let Some((head, body)) = read_request(&mut stream) else {
            continue;
        };
        let header_id = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-meterd-event-id")
                .then(|| v.trim().to_owned())
        });
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        let status = if s.fail > 0 {
            s.fail -= 1;
            500
        } else {
            200
        };
        s.received.push(Received {
            at: Instant::now(),
            header_id,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            status,
        });
        let down = status == 500 && s.fail == 0 && s.down_after_failing;
        drop(s);
        let _ = stream.write_all(
            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        drop(stream);
        if down {
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            s.down = true;
            s.down_after_failing = false;
            // Returning drops the listener: from now on connections are
            // refused.
            return;
        }
    }
}

/// Reads one HTTP request: its head and its `Content-Length` body.
fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0_u8; 4096];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let length = content_length(&head).unwrap_or(0);
    let mut body = raw.split_off(head_end);
    while body.len() < length {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some((head, body))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// What curl on the API socket as another user got.
#[derive(Clone, Debug)]
pub struct UnixCurl {
    /// curl's exit code (7: could not connect).
    pub code: i32,
    /// The HTTP status (0 when none).
    pub status: u16,
    /// curl's `-v` output.
    pub stderr: String,
}

impl UnixCurl {
    /// Whether connecting to the socket failed with EACCES.
    pub fn permission_denied(&self) -> bool {
        self.code == 7 && self.stderr.contains("Permission denied")
    }
}

/// `curl --unix-socket socket http://meterd<path>` (with `args`) as user
/// `uid`, group `gid` and no supplementary groups (`setpriv`).
pub fn curl_unix_as(uid: u32, gid: u32, socket: &Path, path: &str, args: &[&str]) -> UnixCurl {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["curl", "-sS", "-v", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--max-time", "10", "--unix-socket"])
        .arg(socket)
        .args(args)
        .arg(format!("http://meterd{path}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run setpriv (util-linux) and curl: {e}"));
    UnixCurl {
        code: out.status.code().unwrap_or(-1),
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What a flood of attributions got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flood {
    /// `{"status":"pending"}`.
    pub pending: usize,
    /// `{"status":"applied"}`.
    pub applied: usize,
    /// 503: refused.
    pub refused: usize,
    /// Anything else (the first few).
    pub other: Vec<String>,
    /// Anything else, counted.
    pub other_count: usize,
}

/// `POST /v1/attribute` of `count` distinct tuples that no connection has
/// (clients in 10.0.0.0/8, to `server_port`), from `threads` keep-alive
/// connections at once.
pub fn flood_pending(api: &Path, count: u32, threads: u32, server_port: u16) -> Flood {
    let handles: Vec<JoinHandle<Flood>> = (0..threads)
        .map(|t| {
            let api = api.to_owned();
            thread::spawn(move || {
                let mut flood = Flood::default();
                let mut conn: Option<UnixStream> = None;
                for i in (t..count).step_by(threads as usize) {
                    let client = Ipv4Addr::from(0x0a00_0000 | (i >> 4));
                    let port = 40_000 + (i & 15) as u16;
                    let body = format!(
                        "{{\"client_addr\":\"{client}\",\"client_port\":{port},\
                         \"server_port\":{server_port},\"account\":\"bogus-{i}\"}}"
                    );
                    let answer = post_keep_alive(&mut conn, &api, "/v1/attribute", &body);
                    match answer {
                        Ok((200, b)) if b.contains("\"pending\"") => flood.pending += 1,
                        Ok((200, b)) if b.contains("\"applied\"") => flood.applied += 1,
                        Ok((503, _)) => flood.refused += 1,
                        other => {
                            flood.other_count += 1;
                            if flood.other.len() < 5 {
                                flood.other.push(format!("{other:?}"));
                            }
                        }
                    }
                }
                flood
            })
        })
        .collect();
    let mut all = Flood::default();
    for h in handles {
        let f = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        all.pending += f.pending;
        all.applied += f.applied;
        all.refused += f.refused;
        all.other_count += f.other_count;
        all.other.extend(f.other);
    }
    all
}

/// A POST on a kept-alive unix connection (opened again when the server
/// closed it); the status and body.
fn post_keep_alive(
    conn: &mut Option<UnixStream>,
    api: &Path,
    path: &str,
    body: &str,
) -> io::Result<(u16, String)> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: meterd\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for attempt in 0..2 {
        if conn.is_none() {
            let s = UnixStream::connect(api)?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            *conn = Some(s);
        }
        let stream = conn.as_mut().expect("connected");
        let result = stream
            .write_all(request.as_bytes())
            .and_then(|()| read_response(stream));
        match result {
            Ok(r) => return Ok(r),
            Err(e) if attempt == 0 => {
                let _ = e;
                *conn = None;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("two attempts return")
}

fn read_response(stream: &mut UnixStream) -> io::Result<(u16, String)> {
    let mut raw = Vec::new();
    let mut buf = [0_u8; 4096];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the response",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status: {head:?}")))?;
    let length = content_length(&head)
        .ok_or_else(|| io::Error::other(format!("no Content-Length: {head:?}")))?;
    let mut body = raw.split_off(head_end);
    while body.len() < length {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
        }
        body.extend_from_slice(&buf[..n]);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The pid of the agent running on `agent`'s config (from /proc).
pub fn agent_pid(agent: &Agent) -> u32 {
    let config = agent.config_path().to_string_lossy().into_owned();
    let mut found = None;
    let ok = wait_until(Duration::from_secs(5), || {
        found = fs::read_dir("/proc").ok().and_then(|dir| {
            dir.filter_map(Result::ok).find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmdline = fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<String> = cmdline
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                (args.get(1).map(String::as_str) == Some("run") && args.contains(&config))
                    .then_some(pid)
            })
        });
        found.is_some()
    });
    assert!(ok, "no `meterd run --config {config}` process in /proc");
    found.expect("found")
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The socket's mode bits and group.
pub fn socket_mode_and_group(socket: &Path) -> (u32, u32) {
    let meta = fs::metadata(socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    (meta.mode() & 0o7777, meta.gid())
}

/// Unix ms now (`hls::unix_ms_now`), for comparing with nginx's logs.
pub fn now_ms() -> i64 {
    unix_ms_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    #[test]
    fn md5_of_rfc_1321_vectors() {
        for (input, want) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            (
                "The quick brown fox jumps over the lazy dog",
                "9e107d9d372bb6826bd81d3542a419d6",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            assert_eq!(hex(&md5(input.as_bytes())), want, "md5({input:?})");
        }
    }

    #[test]
    fn base64url_without_padding() {
        assert_eq!(base64url(&md5(b"")), "1B2M2Y8AsgTpgAmY7PhCfg");
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn shipped_configs_are_rendered_for_the_test() {
        let server = hls_server(28_000, Path::new("/m"), Path::new("/c/meterd.conf"));
        assert!(server.contains("listen 127.0.0.1:28000;"), "{server}");
        assert!(server.contains("alias /m/$stream/$file;"), "{server}");
        assert!(server.contains("include /c/meterd.conf;"), "{server}");
        let relay = rtmp_relay(28_002, Path::new("/run/x.sock"), Path::new("/l"));
        assert!(
            relay.contains("proxy_pass http://unix:/run/x.sock:/v1/rtmp;"),
            "{relay}"
        );
        let block = rtmp_block(28_001, 28_002, Path::new("/l"));
        assert!(
            block.starts_with("rtmp {\n") && block.ends_with("}\n"),
            "{block}"
        );
        assert_eq!(block.matches("http://127.0.0.1:28002/v1/rtmp").count(), 4);
    }

    #[test]
    fn logs_are_parsed() {
        let a = parse_admission_log(
            "127.0.0.5 40112 3 2 200 37431 OK alice - 1796117679.003 \"GET /hls/a HTTP/1.1\"\n\
             127.0.0.9 40113 4 1 403 300 - - limit_reached 1796117679.010 \"GET / HTTP/1.1\"\n",
        )
        .unwrap();
        assert_eq!(a[0].account.as_deref(), Some("alice"));
        assert!(a[0].completed && !a[1].completed);
        assert_eq!(a[1].reason.as_deref(), Some("limit_reached"));
        assert_eq!(a[1].end_ms, 1_796_117_679_010);
        let r = parse_rtmp_log(
            "8 127.0.0.30 PLAY live stream \"account=alice\" 443 93999 1796120207.321\n",
        )
        .unwrap();
        assert_eq!((r[0].bytes_received, r[0].bytes_sent), (443, 93_999));
        assert_eq!(r[0].args, "account=alice");
        let l = parse_relay_log(
            "1796120203.309 403 \"app=live&addr=127.0.0.31&clientid=8&call=update_play&time=2\
             &name=stream&account=dave\"\n",
        )
        .unwrap();
        assert_eq!(l[0].status, 403);
        assert_eq!(l[0].call, "update_play");
        assert_eq!(l[0].account.as_deref(), Some("dave"));
    }
}
