//! Admission latency: `GET /v1/authorize` on the agent's unix socket, the
//! way nginx's `auth_request` asks it (`proxy_pass http://unix:...` without
//! `keepalive`: a new connection per request), paced at 1000 requests/s,
//! with N live viewing sessions (10k; 1k with `--quick`) and with none.
//!
//! The baseline is the same client against a trivial server in this
//! process (one thread, std `UnixListener`) that answers 204 at once: what
//! the client, the kernel's unix sockets and this machine cost by
//! themselves, so the ratio is meterd's own cost. The two take turns in
//! 1 s slices, so that both see the same load on this shared machine.
//!
//! The connections are [`Population`]'s, started afresh (the 0-session
//! window needs an agent with nothing open). Each connection has a source
//! address of its own and writes a few bytes before a window, so each is a
//! viewing session of its own that is playing during the window (it moves
//! no more payload while the requests run: the cycles bill N live sessions
//! whose counts did not change).
//!
//! Owns the client, the trivial server and the rows; the connections and
//! the agent are `scale`'s and `fleet`'s.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;
use serde_json::json;

use super::agent::{Agent, Scrape};
use super::host;
use super::report::{Measure, num};
use super::scale::Population;
use super::{Ctx, progress};

/// Requests per second, as the issue states the load.
const RATE: u64 = 1000;
/// Client threads: a request that waits (during a billing cycle) must not
/// hold back the ones scheduled after it, or the client would measure
/// fewer slow requests than nginx's workers would see (coordinated
/// omission). 32 in flight at 1000/s is a 32 ms stall before the schedule
/// slips, and slips are measured.
const CLIENT_THREADS: usize = 32;
/// Accounts the requests name, `acct-0` .. `acct-99`.
const ACCOUNTS: usize = 100;
/// Bytes each connection writes before a window: enough to be payload.
const PAYLOAD: usize = 16;
/// The target, in milliseconds.
const TARGET_MS: f64 = 1.0;

/// One request's outcome.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Scheduled start, from the window's start, in seconds.
    at_s: f64,
    /// How late it started against its schedule, µs.
    lag_us: f64,
    /// Connect to complete response, µs.
    latency_us: f64,
    /// HTTP status; 0 when the request failed.
    status: u16,
    /// The first request naming its tuple (later ones repeat an
    /// attribution, which the agent answers without a ledger commit).
    first: bool,
}

/// What one window measured.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub name: String,
    pub requests: usize,
    pub ok: usize,
    pub statuses: BTreeMap<String, usize>,
    pub errors: Vec<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Completed requests per second, first start to last completion
    /// (summed over the window's slices).
    pub rate: f64,
    /// Seconds the window's requests ran (its slices, first start to last
    /// completion each), within the span the load was measured over.
    pub active_s: f64,
    /// Start lag against the schedule: p99 and max, ms.
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// Requests over the target, and the bursts they came in (requests
    /// scheduled within 20 ms of the previous slow one share a burst).
    pub over_target: usize,
    pub bursts: usize,
    pub longest_burst_ms: f64,
    /// Median time between the starts of two bursts, ms.
    pub burst_spacing_ms: Option<f64>,
    /// p99 of the requests that named their tuple first, and of repeats.
    pub first_p99_ms: f64,
    pub repeat_p99_ms: Option<f64>,
    /// Latency quantiles 0, 0.1 .. 0.9, 0.95, 0.99, 0.995, 0.999, 1 (ms).
    pub quantiles: Vec<(f64, f64)>,
    /// The slowest requests: (scheduled at, s; latency, ms), at most 50.
    pub slowest: Vec<(f64, f64)>,
    pub load: Load,
    /// The agent during the window, when it was the server.
    pub agent: Option<AgentWindow>,
}

/// The machine during a window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Load {
    pub wall_s: f64,
    /// Busy share of all CPUs (/proc/stat), 0..1.
    pub machine_busy: f64,
    /// CPU seconds per wall second of this process (the client and the
    /// trivial server) and of the agent.
    pub client_cores: f64,
    pub agent_cores: f64,
    /// Everything else on the machine (other tests, VMs), in cores.
    pub other_cores: f64,
    /// PSI cpu `some` stall share over the window; None without PSI.
    pub cpu_pressure: Option<f64>,
    /// /proc/loadavg at the end, 1 minute.
    pub loadavg1: f64,
}

/// The agent's billing cycles during a window.
#[derive(Debug, Clone, Serialize)]
pub struct AgentWindow {
    pub connections: f64,
    pub viewer_sessions: f64,
    pub cycles: f64,
    pub mean_cycle_ms: f64,
    /// Upper bound of the histogram bucket of the longest cycle, ms.
    pub longest_cycle_le_ms: Option<f64>,
    /// Cycles per histogram bucket (upper bound in ms, count).
    pub cycle_buckets: Vec<(f64, f64)>,
    pub interval_s: f64,
    pub overruns: f64,
    /// fsync + fdatasync calls of the agent in the window (`perf stat` on
    /// the syscall tracepoints); None without perf.
    pub fsyncs: Option<u64>,
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let n: usize = if ctx.quick { 1_000 } else { 10_000 };
    let secs: u64 = if ctx.quick { 5 } else { 10 };
    let dir = ctx.work.join("authorize");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // A fresh agent with nothing open: the 0-session window needs it, and a
    // population left by the other benches may hold 100k connections.
    if let Some(old) = ctx.population.take() {
        progress("stopping the other benches' connections: this bench starts with none");
        old.stop()?;
    }
    ctx.population = Some(Population::start(ctx, n)?);
    let pop = ctx.population.as_mut().expect("set just above");
    let socket = api_socket(&pop.agent)?;
    let ports = pop.fleet.ports();
    progress(format!(
        "agent API at {}; {RATE} requests/s for {secs} s per window, a connection per \
         request, {CLIENT_THREADS} client threads",
        socket.display()
    ));

    // Client ports that no connection has (below the ephemeral range):
    // the attribution waits as pending, as for a connection not seen yet.
    let unknown = unknown_tuples(ports[0], RATE as usize * secs as usize);
    let on_agent = |name: String, tuples| Target {
        name,
        socket: &socket,
        tuples,
        agent: true,
    };
    let zero = one(measure(
        &[on_agent(
            "0 sessions, unknown client ports".into(),
            &unknown,
        )],
        secs,
        Some(&pop.agent),
    )?);

    let (open, error) = pop.grow(n)?;
    if let Some(e) = &error {
        progress(format!("only {open} of {n} connections opened: {e}"));
    }
    let live = live_tuples(&pop.fleet.ss_filter())?;
    ensure!(
        live.len() >= open * 9 / 10,
        "ss lists {} of the {open} connections",
        live.len()
    );

    make_sessions(pop, open)?;
    let busy = one(measure(
        &[on_agent(
            format!("{open} sessions, unknown client ports"),
            &unknown,
        )],
        secs,
        Some(&pop.agent),
    )?);

    make_sessions(pop, open)?;
    let trivial = Trivial::start(&dir.join("trivial.sock"))?;
    let mut pair = measure(
        &[
            Target {
                name: "trivial 204 server".into(),
                socket: trivial.path(),
                tuples: &live,
                agent: false,
            },
            on_agent(format!("{open} sessions, their own connections"), &live),
        ],
        secs,
        Some(&pop.agent),
    )?;
    drop(trivial);
    let headline = pair.pop().context("two windows")?;
    let baseline = pair.pop().context("two windows")?;

    let windows = [&baseline, &zero, &busy, &headline];
    for w in windows {
        ensure!(
            w.ok * 100 >= w.requests * 99,
            "{}: only {} of {} requests answered ({:?}; {})",
            w.name,
            w.ok,
            w.requests,
            w.statuses,
            w.errors.join("; ")
        );
    }
    ctx.results
        .measures
        .push(latency_row(&headline, &baseline, open, ctx.quick));
    ctx.results
        .measures
        .push(sessions_row(&busy, &zero, &headline, open));
    ctx.results.details.insert(
        "authorize".into(),
        json!({
            "sessions": open,
            "shortfall": error,
            "rate": RATE,
            "window_s": secs,
            "client_threads": CLIENT_THREADS,
            "windows": windows,
        }),
    );
    Ok(())
}

/// The agent's API socket, from its ready file (`api=`).
fn api_socket(agent: &Agent) -> Result<PathBuf> {
    let ready = agent.log.with_file_name("ready");
    let text =
        fs::read_to_string(&ready).with_context(|| format!("reading {}", ready.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("api="))
        .map(|p| PathBuf::from(p.trim()))
        .with_context(|| format!("no api= in {}", ready.display()))
}

fn one(mut windows: Vec<Window>) -> Window {
    windows.pop().expect("one target, one window")
}

/// Writes a few bytes on every connection and waits until the agent bills
/// each as a viewing session, plus two cycles for that work to pass.
fn make_sessions(pop: &mut Population, open: usize) -> Result<()> {
    let sent = pop.fleet.send(PAYLOAD)?;
    #[expect(
        clippy::cast_precision_loss,
        reason = "connection counts are far below 2^52"
    )]
    let want = (open * 99 / 100) as f64;
    let s = pop.agent.wait_for(
        Duration::from_secs(60),
        "a viewing session per connection",
        |s| s.viewer_sessions() >= want,
    )?;
    pop.agent.cycles(2.0, Duration::from_secs(60))?;
    progress(format!(
        "{sent} connections wrote {PAYLOAD} bytes: {} viewing sessions, {} connections live",
        s.viewer_sessions(),
        s.live()
    ));
    Ok(())
}

/// (client, server port) of every connection open on the metered ports.
fn live_tuples(filter: &str) -> Result<Vec<(SocketAddr, u16)>> {
    let listing = host::output(Command::new("ss").args(["-Htn", "state", "established", filter]))?;
    let tuples: Vec<(SocketAddr, u16)> = listing
        .lines()
        .filter_map(|line| {
            let mut addrs = line
                .split_whitespace()
                .filter_map(|f| f.parse::<SocketAddr>().ok());
            let local = addrs.next()?;
            let peer = addrs.next()?;
            Some((peer, local.port()))
        })
        .collect();
    ensure!(!tuples.is_empty(), "ss lists no connection for {filter}");
    Ok(tuples)
}

/// `count` client tuples on 127.0.0.1 with ports below the kernel's
/// ephemeral range (32768..), which no live connection can have.
fn unknown_tuples(server_port: u16, count: usize) -> Vec<(SocketAddr, u16)> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let port = 1024 + (state % (32_768 - 1024)) as u16;
            (SocketAddr::from(([127, 0, 0, 1], port)), server_port)
        })
        .collect()
}

/// Where one window's requests go.
struct Target<'a> {
    name: String,
    socket: &'a Path,
    tuples: &'a [(SocketAddr, u16)],
    /// Whether the socket is the agent's (its cycles go with the window).
    agent: bool,
}

/// Windows of `RATE` requests per second for `secs` each, request `i` of a
/// window naming `tuples[i % len]` and account `acct-<i % 100>`. Two
/// targets take turns in 1 s slices, so that both see the same load on
/// this shared machine. The machine's load and the agent's cycles are
/// measured over the whole span.
fn measure(targets: &[Target<'_>], secs: u64, agent: Option<&Agent>) -> Result<Vec<Window>> {
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    progress(format!(
        "window: {}{}",
        names.join(" | "),
        if targets.len() > 1 {
            " (taking turns, 1 s each)"
        } else {
            ""
        }
    ));
    let before = agent.map(Agent::scrape).transpose()?;
    let agent_cpu0 = agent.map(|a| host::process_cpu(a.pid())).transpose()?;
    let fsyncs = agent.and_then(|a| Fsyncs::start(a.pid()));
    let probe = LoadProbe::start();
    let span = Instant::now();
    let slices = if targets.len() > 1 { secs.max(1) } else { 1 };
    let per_slice = usize::try_from(RATE * secs / slices).unwrap_or(usize::MAX);
    let mut runs: Vec<Run> = targets.iter().map(|_| Run::default()).collect();
    for k in 0..usize::try_from(slices).unwrap_or(1) {
        for (t, run) in targets.iter().zip(&mut runs) {
            let range = k * per_slice..(k + 1) * per_slice;
            run.add(client(t.socket, t.tuples, range, span));
        }
    }
    let mut load = probe.finish();
    let fsyncs = fsyncs.and_then(Fsyncs::finish);
    let after = agent.map(Agent::scrape).transpose()?;
    if let (Some(a), Some(c0)) = (agent, agent_cpu0) {
        let busy = host::process_cpu(a.pid())?.saturating_sub(c0).as_secs_f64();
        load.agent_cores = busy / load.wall_s;
        load.other_cores = (load.other_cores - load.agent_cores).max(0.0);
    }
    let agent_window = match (&before, &after) {
        (Some(b), Some(a)) => Some(AgentWindow {
            fsyncs,
            ..agent_window(b, a)
        }),
        _ => None,
    };
    let mut windows = Vec::new();
    for (t, run) in targets.iter().zip(runs) {
        let w = summarise(
            &t.name,
            &run.samples,
            run.errors,
            run.active_s,
            load.clone(),
            agent_window.clone().filter(|_| t.agent),
        );
        progress(format!(
            "  {}: p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms; {:.0} requests/s; {} over \
             {TARGET_MS} ms in {} bursts; machine {:.0}% busy (others {:.2} cores){}",
            t.name,
            num(w.p50_ms),
            num(w.p99_ms),
            num(w.p999_ms),
            num(w.max_ms),
            w.rate,
            w.over_target,
            w.bursts,
            w.load.machine_busy * 100.0,
            w.load.other_cores,
            w.agent.as_ref().map_or_else(String::new, |a| format!(
                "; {} cycles, mean {} ms, longest <= {} ms, {} fsyncs",
                a.cycles,
                num(a.mean_cycle_ms),
                a.longest_cycle_le_ms.map_or_else(|| "-".into(), num),
                a.fsyncs.map_or_else(|| "?".into(), |n| n.to_string())
            ))
        ));
        windows.push(w);
    }
    Ok(windows)
}

/// One target's slices, gathered.
#[derive(Default)]
struct Run {
    samples: Vec<Sample>,
    errors: Vec<String>,
    /// Sum over the slices of first start to last completion, s.
    active_s: f64,
}

impl Run {
    fn add(&mut self, (samples, errors): (Vec<Sample>, Vec<String>)) {
        let first = samples
            .iter()
            .map(|s| s.at_s + s.lag_us / 1e6)
            .fold(f64::INFINITY, f64::min);
        let last = samples
            .iter()
            .map(|s| s.at_s + (s.lag_us + s.latency_us) / 1e6)
            .fold(f64::NEG_INFINITY, f64::max);
        if last > first {
            self.active_s += last - first;
        }
        self.samples.extend(samples);
        for e in errors {
            if !self.errors.contains(&e) {
                self.errors.push(e);
            }
        }
    }
}

/// Runs requests `range` on the schedule one every 1/`RATE` s from now,
/// spread over the client threads; returns the samples (times from
/// `span`) and the distinct errors.
fn client(
    socket: &Path,
    tuples: &[(SocketAddr, u16)],
    range: std::ops::Range<usize>,
    span: Instant,
) -> (Vec<Sample>, Vec<String>) {
    let next = AtomicUsize::new(range.start);
    let total = range.len();
    let period = Duration::from_secs(1) / u32::try_from(RATE).unwrap_or(1000);
    let start = Instant::now() + Duration::from_millis(50);
    let per_thread: Vec<(Vec<Sample>, Vec<String>)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENT_THREADS)
            .map(|_| {
                scope.spawn(|| {
                    let mut samples = Vec::with_capacity(total / CLIENT_THREADS + 1);
                    let mut errors = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= range.end {
                            break;
                        }
                        let nth = u32::try_from(i - range.start).unwrap_or(u32::MAX);
                        let due = start + period * nth;
                        let now = Instant::now();
                        if due > now {
                            thread::sleep(due - now);
                        }
                        let (client, server_port) = tuples[i % tuples.len()];
                        let head = format!(
                            "GET /v1/authorize HTTP/1.0\r\nHost: meterd\r\n\
                             X-Meterd-Client: {client}\r\nX-Meterd-Server-Port: {server_port}\r\n\
                             X-Meterd-Account: acct-{}\r\nConnection: close\r\n\r\n",
                            i % ACCOUNTS
                        );
                        let t = Instant::now();
                        let status = request(socket, head.as_bytes());
                        let latency = t.elapsed();
                        let status = status.unwrap_or_else(|e| {
                            if errors.len() < 5 {
                                errors.push(e.to_string());
                            }
                            0
                        });
                        samples.push(Sample {
                            at_s: due.duration_since(span).as_secs_f64(),
                            lag_us: t.saturating_duration_since(due).as_secs_f64() * 1e6,
                            latency_us: latency.as_secs_f64() * 1e6,
                            status,
                            first: i < tuples.len(),
                        });
                    }
                    (samples, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut samples = Vec::with_capacity(total);
    let mut errors = Vec::new();
    for (s, e) in per_thread {
        samples.extend(s);
        for e in e {
            if !errors.contains(&e) {
                errors.push(e);
            }
        }
    }
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    (samples, errors)
}

/// One request on a new connection: connect, write, read the response
/// head and its body (`Content-Length`); returns the status.
fn request(socket: &Path, head: &[u8]) -> std::io::Result<u16> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(head)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]);
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("bad status line: {text:.60}")))?;
            let length: usize = text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Ok(status);
            }
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a complete response",
            ));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn summarise(
    name: &str,
    samples: &[Sample],
    errors: Vec<String>,
    active_s: f64,
    load: Load,
    agent: Option<AgentWindow>,
) -> Window {
    let mut statuses = BTreeMap::new();
    for s in samples {
        *statuses.entry(s.status.to_string()).or_insert(0) += 1;
    }
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.status == 204).collect();
    let latencies: Vec<f64> = ok.iter().map(|s| s.latency_us / 1e3).collect();
    let lag: Vec<f64> = samples.iter().map(|s| s.lag_us / 1e3).collect();
    let slow: Vec<&&Sample> = ok
        .iter()
        .filter(|s| s.latency_us / 1e3 > TARGET_MS)
        .collect();
    let (mut bursts, mut longest, mut burst_start, mut prev) = (0, 0.0_f64, 0.0, f64::NEG_INFINITY);
    let mut starts = Vec::new();
    for s in &slow {
        if s.at_s - prev > 0.020 {
            bursts += 1;
            burst_start = s.at_s;
            starts.push(s.at_s);
        }
        prev = s.at_s;
        longest = longest.max(s.at_s - burst_start + s.latency_us / 1e6);
    }
    let gaps: Vec<f64> = starts.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect();
    let of = |first: bool| -> Vec<f64> {
        ok.iter()
            .filter(|s| s.first == first)
            .map(|s| s.latency_us / 1e3)
            .collect()
    };
    let repeats = of(false);
    let mut slowest: Vec<(f64, f64)> = ok.iter().map(|s| (s.at_s, s.latency_us / 1e3)).collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    slowest.truncate(50);
    let qs = [
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0,
    ];
    Window {
        name: name.to_owned(),
        requests: samples.len(),
        ok: ok.len(),
        statuses,
        errors,
        p50_ms: host::quantile(&latencies, 0.5),
        p99_ms: host::quantile(&latencies, 0.99),
        p999_ms: host::quantile(&latencies, 0.999),
        max_ms: host::quantile(&latencies, 1.0),
        mean_ms: host::mean(&latencies),
        rate: ok.len() as f64 / active_s.max(1e-9),
        active_s,
        lag_p99_ms: host::quantile(&lag, 0.99),
        lag_max_ms: host::quantile(&lag, 1.0),
        over_target: slow.len(),
        bursts,
        longest_burst_ms: longest * 1e3,
        burst_spacing_ms: (!gaps.is_empty()).then(|| host::median(&gaps)),
        first_p99_ms: host::quantile(&of(true), 0.99),
        repeat_p99_ms: (!repeats.is_empty()).then(|| host::quantile(&repeats, 0.99)),
        quantiles: qs
            .iter()
            .map(|&q| (q, host::quantile(&latencies, q)))
            .collect(),
        slowest,
        load,
        agent,
    }
}

fn agent_window(before: &Scrape, after: &Scrape) -> AgentWindow {
    let cycles = after.cycles() - before.cycles();
    let prefix = "meterd_cycle_duration_seconds_bucket{le=\"";
    // Cumulative bucket counts, by upper bound.
    let mut cumulative: Vec<(f64, f64)> = after
        .samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let was = before.samples.get(k).copied().unwrap_or(0.0);
            Some((bound * 1e3, v - was))
        })
        .collect();
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut buckets = Vec::new();
    let mut below = 0.0;
    for &(bound, count) in &cumulative {
        buckets.push((bound, count - below));
        below = count;
    }
    let longest = buckets
        .iter()
        .rev()
        .find(|(_, c)| *c > 0.0)
        .map(|&(bound, _)| bound);
    AgentWindow {
        connections: after.live(),
        viewer_sessions: after.viewer_sessions(),
        cycles,
        mean_cycle_ms: super::agent::mean_cycle(before, after).unwrap_or(f64::NAN) * 1e3,
        longest_cycle_le_ms: longest,
        cycle_buckets: buckets.into_iter().filter(|(_, c)| *c > 0.0).collect(),
        interval_s: after.interval(),
        overruns: after.overruns() - before.overruns(),
        fsyncs: None,
    }
}

/// Counts a process's fsync and fdatasync calls while it lives: `perf
/// stat` on the syscall tracepoints (counting only, no per-event cost to
/// speak of). In WAL mode with `synchronous = NORMAL`, SQLite syncs only
/// when it checkpoints.
pub(super) struct Fsyncs {
    perf: Option<std::process::Child>,
}

impl Fsyncs {
    pub(super) fn start(pid: u32) -> Option<Fsyncs> {
        let perf = Command::new("perf")
            .args(["stat", "-x,", "-e"])
            .arg("syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync")
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        // perf attaches within a few ms; a window is seconds.
        thread::sleep(Duration::from_millis(100));
        Some(Fsyncs { perf: Some(perf) })
    }

    /// Stops perf (SIGINT makes it print its counts) and sums them.
    pub(super) fn finish(mut self) -> Option<u64> {
        let perf = self.perf.take()?;
        host::signal(perf.id(), libc::SIGINT);
        let out = perf.wait_with_output().ok()?;
        let counts: Vec<u64> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("syscalls:sys_enter_"))
            .filter_map(|l| l.split(',').next()?.trim().parse().ok())
            .collect();
        (counts.len() == 2).then(|| counts.iter().sum())
    }
}

impl Drop for Fsyncs {
    fn drop(&mut self) {
        if let Some(mut perf) = self.perf.take() {
            let _ = perf.kill();
            let _ = perf.wait();
        }
    }
}

/// The machine's CPU and pressure over a span.
struct LoadProbe {
    t0: Instant,
    machine0: (u64, u64),
    self0: Duration,
    psi0: Option<u64>,
}

impl LoadProbe {
    fn start() -> LoadProbe {
        LoadProbe {
            t0: Instant::now(),
            machine0: host::machine_cpu().unwrap_or((0, 0)),
            self0: self_cpu(),
            psi0: host::psi_cpu_some_us(),
        }
    }

    /// The load so far; `other_cores` still includes the agent's share,
    /// which the caller takes out when it knows it.
    fn finish(self) -> Load {
        let wall = self.t0.elapsed().as_secs_f64();
        let (busy1, total1) = host::machine_cpu().unwrap_or((0, 0));
        let busy = busy1.saturating_sub(self.machine0.0);
        let total = total1.saturating_sub(self.machine0.1).max(1);
        let machine_cores = host::ticks_to_secs(busy) / wall;
        let client_cores = self_cpu().saturating_sub(self.self0).as_secs_f64() / wall;
        let cpu_pressure = match (self.psi0, host::psi_cpu_some_us()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6 / wall),
            _ => None,
        };
        let loadavg1 = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN);
        Load {
            wall_s: wall,
            machine_busy: busy as f64 / total as f64,
            client_cores,
            agent_cores: 0.0,
            other_cores: (machine_cores - client_cores).max(0.0),
            cpu_pressure,
            loadavg1,
        }
    }
}

/// CPU time (user + system) of this process, all threads.
fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.try_into().unwrap_or(0))
            + Duration::from_micros(t.tv_usec.try_into().unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The baseline server: one thread, a unix socket, 204 to every request,
/// a connection per request (it closes after answering).
struct Trivial {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Trivial {
    fn start(path: &Path) -> Result<Trivial> {
        let _ = fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("trivial-204".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(mut stream) = stream {
                        let _ = answer_204(&mut stream);
                    }
                }
            })
            .context("starting the trivial server")?;
        Ok(Trivial {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Trivial {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads a request head and answers 204.
fn answer_204(stream: &mut UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while find(&buf, b"\r\n\r\n").is_none() {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail_io("request head cut short")?;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
}

fn bail_io(what: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what))
}

/// How the load and the cycles read, for a row's note.
fn load_note(w: &Window) -> String {
    let l = &w.load;
    format!(
        "machine {:.0}% busy over {:.0} s (client {:.2}, agent {:.2}, everything else {:.2} \
         cores of {}; CPU pressure {}; loadavg {:.2})",
        l.machine_busy * 100.0,
        l.wall_s,
        l.client_cores,
        l.agent_cores,
        l.other_cores,
        host::cpus(),
        l.cpu_pressure
            .map_or_else(|| "n/a".into(), |p| format!("{:.0}%", p * 100.0)),
        l.loadavg1
    )
}

fn cycles_note(w: &Window) -> String {
    w.agent.as_ref().map_or_else(String::new, |a| {
        format!(
            "{} billing cycles in the window (interval {} s, {} overruns), mean {} ms, longest \
             <= {} ms (histogram bucket); {} fsync/fdatasync calls by the agent",
            a.cycles,
            num(a.interval_s),
            a.overruns,
            num(a.mean_cycle_ms),
            a.longest_cycle_le_ms.map_or_else(|| "-".into(), num),
            a.fsyncs
                .map_or_else(|| "n/a (no perf)".into(), |n| n.to_string())
        )
    })
}

fn bursts_note(w: &Window) -> String {
    format!(
        "{} over {TARGET_MS} ms in {} bursts{}",
        w.over_target,
        w.bursts,
        w.burst_spacing_ms
            .map(|g| format!(", one every {} ms (median)", num(g)))
            .unwrap_or_default()
    )
}

/// Requests that arrived during a billing cycle (one per 1/`RATE` s, in
/// the share of the span that the window's requests ran): the most that
/// the cycles can hold back. Also that share.
fn held_by_cycles(w: &Window) -> (f64, f64) {
    let share = (w.active_s / w.load.wall_s).clamp(0.0, 1.0);
    let held = w.agent.as_ref().map_or(0.0, |a| {
        a.cycles * share * a.mean_cycle_ms * RATE as f64 / 1e3
    });
    (held, share)
}

/// What the cycles do to the percentiles, for a window of the agent.
fn cycle_share_note(w: &Window) -> String {
    let (held, _) = held_by_cycles(w);
    let pct = held / w.requests.max(1) as f64 * 100.0;
    format!(
        "~{held:.0} requests ({pct:.1}%) arrived during a cycle{}",
        if pct >= 1.5 {
            ", so p99 falls inside the cycles' wait"
        } else if pct >= 0.5 {
            ": about 1%, so p99 sits at the edge of the cycles' wait and swings with the \
             cycle's length from run to run"
        } else if pct >= 0.1 {
            ", so the cycles show in p99.9, not p99"
        } else {
            ""
        }
    )
}

/// What bounds a missed p99, from what the window measured.
fn bound_note(w: &Window, baseline: &Window, sessions: usize) -> String {
    let Some(a) = &w.agent else {
        return String::new();
    };
    let (by_cycles, share) = held_by_cycles(w);
    let mut why = Vec::new();
    // The trivial server answers nothing but 204, from the same client in
    // the same run: when it is itself near the target, the machine (other
    // work on its cores) bounds the figure, not meterd's request path.
    if baseline.p99_ms >= 0.8 * TARGET_MS {
        why.push(format!(
            "the trivial server, from the same client in the same run, has p99 {} ms itself: \
             the machine bounds the figure (other work took {:.2} of its {} cores, CPU \
             pressure {}), and meterd adds {} ms to it",
            num(baseline.p99_ms),
            w.load.other_cores,
            host::cpus(),
            w.load
                .cpu_pressure
                .map_or_else(|| "n/a".into(), |p| format!("{:.0}%", p * 100.0)),
            num((w.p99_ms - baseline.p99_ms).max(0.0))
        ));
    }
    if let Some(r) = w.repeat_p99_ms
        && r <= TARGET_MS
        && w.first_p99_ms > TARGET_MS
    {
        why.push(format!(
            "only the first request for a connection is slow (p99 {} ms; repeats, which \
             change nothing and commit nothing, p99 {} ms)",
            num(w.first_p99_ms),
            num(r)
        ));
    }
    if (w.over_target as f64) > 2.0 * by_cycles.max(1.0) {
        why.push(format!(
            "the billing cycles explain at most ~{by_cycles:.0} of the {} slow requests \
             ({} cycles of {} ms at {sessions} sessions in the span, {:.0}% of which had \
             requests at {RATE}/s): the rest wait for the run loop's own commits",
            w.over_target,
            a.cycles,
            num(a.mean_cycle_ms),
            share * 100.0
        ));
        if let (Some(f), Some(g)) = (a.fsyncs, w.burst_spacing_ms)
            && f > 0
        {
            why.push(format!(
                "the agent called fsync/fdatasync {f} times in the window and the slow requests \
                 come in bursts every {} ms: in WAL mode with synchronous = NORMAL, SQLite syncs \
                 only when it checkpoints the WAL (by default every 1000 pages), and each \
                 first-time attribution is a commit that grows the WAL, so a checkpoint every \
                 so many commits stalls the loop, and the requests behind it, for the fsyncs",
                num(g)
            ));
        }
    } else {
        why.push(format!(
            "the billing cycles ({} of {} ms at {sessions} sessions, {:.0}% of them while \
             requests ran) overlap ~{by_cycles:.0} requests, about the {} slow ones: \
             admissions do not wait for the run loop, but a cycle takes one of the {} cores \
             from the API's thread and the client",
            a.cycles,
            num(a.mean_cycle_ms),
            share * 100.0,
            w.over_target,
            host::cpus()
        ));
    }
    why.join("; ")
}

fn latency_row(w: &Window, baseline: &Window, sessions: usize, quick: bool) -> Measure {
    let met = w.p99_ms <= TARGET_MS;
    let bound = if met {
        String::new()
    } else {
        format!(
            " Missed by {} ms ({:.1}x the target): {}.",
            num(w.p99_ms - TARGET_MS),
            w.p99_ms / TARGET_MS,
            bound_note(w, baseline, sessions)
        )
    };
    Measure {
        bench: "authorize",
        name: format!(
            "`/v1/authorize` latency at 1k req/s, {}k live sessions",
            sessions as f64 / 1000.0
        ),
        value: w.p99_ms,
        unit: "ms p99".into(),
        baseline_name: "trivial 204 server on a unix socket, same client".into(),
        baseline: Some(baseline.p99_ms),
        ratio: Some(w.p99_ms / baseline.p99_ms),
        ratio_meaning: "meterd / trivial".into(),
        target: "p99 <= 1 ms".into(),
        met: Some(met),
        note: format!(
            "{} requests in {:.0} s paced at {RATE}/s ({:.0}/s achieved, start lag p99 {} ms, \
             max {} ms), each on a new unix-socket connection (as nginx's auth_request without \
             keepalive), naming one of the {sessions} live connections by its tuple and account \
             acct-<i % 100>, timed from connect to complete response: p50 {} ms, p99 {} ms, \
             p99.9 {} ms, max {} ms (statuses {:?}); {}. Each request attributes its connection \
             (the first time, a ledger commit: p99 {} ms{}). Trivial server, taking turns with \
             meterd in 1 s slices: p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms. The sessions: every connection wrote {PAYLOAD} bytes \
             before the window (each from its own source address, so each is its own viewing \
             session, playing), none during it; the bytes went client to server, so the egress \
             tariff charges nothing and the cycles write no charge rows. {}; {}; {}.{bound}",
            w.requests,
            w.load.wall_s,
            w.rate,
            num(w.lag_p99_ms),
            num(w.lag_max_ms),
            num(w.p50_ms),
            num(w.p99_ms),
            num(w.p999_ms),
            num(w.max_ms),
            w.statuses,
            bursts_note(w),
            num(w.first_p99_ms),
            match w.repeat_p99_ms {
                Some(r) if quick => format!(
                    "; with --quick each connection is named {} times, and the repeats, which \
                     change nothing, p99 {} ms",
                    w.requests / sessions.max(1),
                    num(r)
                ),
                Some(r) => format!("; repeats p99 {} ms", num(r)),
                None => String::new(),
            },
            num(baseline.p50_ms),
            num(baseline.p99_ms),
            num(baseline.p999_ms),
            num(baseline.max_ms),
            cycles_note(w),
            cycle_share_note(w),
            load_note(w),
        ),
    }
}

fn sessions_row(busy: &Window, zero: &Window, headline: &Window, sessions: usize) -> Measure {
    Measure {
        bench: "authorize",
        name: format!(
            "`/v1/authorize` p99 with {}k live sessions vs none",
            sessions as f64 / 1000.0
        ),
        value: busy.p99_ms,
        unit: "ms p99".into(),
        baseline_name: "agent with no connection".into(),
        baseline: Some(zero.p99_ms),
        ratio: Some(busy.p99_ms / zero.p99_ms),
        ratio_meaning: format!("{}k sessions / none", sessions as f64 / 1000.0),
        target: "-".into(),
        met: None,
        note: format!(
            "Both windows name client ports no connection has (the attribution waits as \
             pending), so the request's own work is the same and the difference is what \
             {sessions} sessions add to the run loop: its billing cycles, during which requests \
             wait. With {sessions}: p50 {} ms, p99.9 {} ms, max {} ms, {}; {}; {}; {}. With \
             none: p50 {} ms, p99.9 {} ms, max {} ms, {}; {}; {}. (Naming the sessions' own \
             connections, as in the row above: p99 {} ms.)",
            num(busy.p50_ms),
            num(busy.p999_ms),
            num(busy.max_ms),
            bursts_note(busy),
            cycles_note(busy),
            cycle_share_note(busy),
            load_note(busy),
            num(zero.p50_ms),
            num(zero.p999_ms),
            num(zero.max_ms),
            bursts_note(zero),
            cycles_note(zero),
            load_note(zero),
            num(headline.p99_ms),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_tuples_are_below_the_ephemeral_range() {
        let t = unknown_tuples(30_001, 10_000);
        assert_eq!(t.len(), 10_000);
        assert!(t.iter().all(|(c, p)| c.port() < 32_768 && *p == 30_001));
    }

    #[test]
    fn trivial_server_answers_204_to_a_request() {
        let dir = std::env::temp_dir().join(format!("meterd-authorize-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let server = Trivial::start(&dir.join("t.sock")).unwrap();
        let status = request(server.path(), b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(status, 204);
        drop(server);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bursts_group_nearby_slow_requests() {
        let s = |at_s, ms| Sample {
            at_s,
            lag_us: 0.0,
            latency_us: ms * 1e3,
            status: 204,
            first: true,
        };
        let samples = [s(0.0, 0.2), s(1.0, 3.0), s(1.001, 2.0), s(2.0, 4.0)];
        let w = summarise("t", &samples, Vec::new(), 2.0, Load::default(), None);
        assert_eq!(w.over_target, 3);
        assert_eq!(w.bursts, 2);
        assert_eq!(w.burst_spacing_ms, Some(1000.0));
        assert_eq!(w.ok, 4);
        assert_eq!(w.rate, 2.0);
    }
}
