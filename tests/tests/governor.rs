//! Acceptance scenario of the load monitor and interval governor: the read
//! interval widens when the host's CPUs are saturated, returns to the base
//! interval when the load is gone, and billing does not depend on it.
//!
//! One test in its own binary: cargo runs test binaries one after another,
//! so the CPU hogs it starts slow down no other test of this crate.
//!
//! Every connection comes from a client address of its own, so each is a
//! viewing session of its own and its charge can be compared size by size.
//!
//! Beside what meterd reports, the test reads the host's own CPU pressure
//! (`/proc/pressure/cpu`), so that a slow widening says whether the host
//! was not saturated or meterd misjudged a saturated host.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use meterd_tests::{
    AgentConfig, CloseOrder, Setup, Source, TcpClient, TestEnv, http,
    ledger::{SessionRecord, checked_sessions},
    metrics::{Exposition, whole},
    port,
    process::wait_until,
    stress::{Stress, online_cpus},
    tariff::{Direction, Rounding, Service, Tariff},
    traffic_bin,
    wire::{ClientSummary, ConnLog},
};

/// The base interval.
const BASE: Duration = Duration::from_secs(1);

/// The base interval in ms, as readings state intervals.
const BASE_MS: u64 = 1000;

/// How long the CPUs stay saturated.
const STRESS: Duration = Duration::from_secs(15);

/// How often the test reads `/metrics`.
const POLL: Duration = Duration::from_millis(250);

/// Where in a base interval the saturation starts: this long after a
/// billing cycle ended. The requirement holds at every phase; this one is
/// its hardest case, so the test is deterministic: the trailing base
/// interval of the next cycle holds only 0.35 s of saturation (below the
/// 0.5 high-water mark), so it is the cycle after that, the second one,
/// that must widen.
const PHASE: Duration = Duration::from_millis(650);

/// How long the interval may take to return to the base after the load
/// ends: with the default hold of 5 calm samples per step, 16 s -> 1 s is
/// four steps, 20 s; the rest is margin for a host still busy with the
/// last of the hogs.
const NARROW_TIMEOUT: Duration = Duration::from_secs(60);

/// meterd's `governor.high_water` default: CPU pressure at which a cycle
/// widens the interval.
const HIGH_WATER: f64 = 0.5;

/// One reading of `/metrics`, with the host's CPU stall total beside it.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    /// `meterd_read_interval_seconds`, in ms.
    interval_ms: u64,
    overruns: u64,
    cycles: u64,
    widen: u64,
    narrow: u64,
    /// `meterd_cpu_pressure_ratio`: the pressure the last cycle decided on.
    pressure: Option<f64>,
    /// The host's PSI cpu `some` total (µs) when the reading was taken.
    host_stall_us: Option<u64>,
}

/// The host's cumulative CPU stall time, µs: PSI cpu `some ... total=`.
fn host_stall_us() -> Option<u64> {
    let psi = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    psi.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The host's CPU pressure between two readings: stalled share of the
/// wall time between them.
fn host_pressure(from: &Reading, to: &Reading) -> Option<f64> {
    let stalled = to.host_stall_us?.checked_sub(from.host_stall_us?)?;
    let wall = to.at.checked_duration_since(from.at)?.as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a ratio, not an amount")]
    (wall > 0.0).then(|| stalled as f64 / 1e6 / wall)
}

impl Reading {
    fn of(at: Instant, m: &Exposition) -> Reading {
        let get = |name: &str| {
            m.value(name, &[])
                .unwrap_or_else(|| panic!("no {name} in /metrics"))
        };
        Reading {
            at,
            interval_ms: whole((get("meterd_read_interval_seconds") * 1000.0).round()),
            overruns: whole(get("meterd_cycle_overruns_total")),
            cycles: whole(get("meterd_cycle_duration_seconds_count")),
            widen: whole(m.sum("meterd_interval_changes_total", &[("direction", "widen")])),
            narrow: whole(m.sum("meterd_interval_changes_total", &[("direction", "narrow")])),
            pressure: m.value("meterd_cpu_pressure_ratio", &[]),
            host_stall_us: host_stall_us(),
        }
    }
}

/// Reads `/metrics` every [`POLL`] in a thread of its own (the test's
/// main thread is busy running traffic).
struct Poller {
    readings: Arc<Mutex<Vec<Reading>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn start(addr: SocketAddr) -> Poller {
        let readings = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (readings, stop) = (Arc::clone(&readings), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    // A failed scrape under load is a gap, not a verdict.
                    if let Ok(r) = http::get(addr, "/metrics")
                        && r.status == 200
                        && let Ok(m) = Exposition::parse(&r.body)
                    {
                        readings.lock().unwrap().push(Reading::of(at, &m));
                    }
                    thread::sleep(POLL.saturating_sub(at.elapsed()));
                }
            })
        };
        Poller {
            readings,
            stop,
            thread: Some(thread),
        }
    }

    fn readings(&self) -> Vec<Reading> {
        self.readings.lock().unwrap().clone()
    }

    fn last(&self) -> Reading {
        self.readings().last().cloned().expect("no reading yet")
    }

    /// Waits up to `timeout` for a reading taken after `after` that
    /// satisfies `want`; returns it.
    fn wait_for(
        &self,
        after: Instant,
        timeout: Duration,
        want: impl Fn(&Reading) -> bool,
    ) -> Option<Reading> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .readings()
                .into_iter()
                .find(|r| r.at >= after && want(r));
            found.is_some()
        });
        found
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// One group of connections, each a viewer of its own; the loaded and the
/// unloaded run use the same.
fn group(at: SocketAddr) -> Vec<TcpClient> {
    let mut clients: Vec<TcpClient> = [2_500_000, 7_200_000, 1_000_001]
        .into_iter()
        .map(|size| TcpClient {
            source: Source::Distinct,
            ..TcpClient::new(at, size, 0)
        })
        .collect();
    // Spans several cycles: 12.5 MB in 1 MB steps 250 ms apart.
    clients.push(TcpClient {
        chunk: 1_000_000,
        pause_ms: 250,
        close: CloseOrder::Client,
        source: Source::Distinct,
        ..TcpClient::new(at, 12_500_000, 0)
    });
    clients
}

/// Whose fault a slow widening is, from the readings between the
/// saturation and the widening: the host's CPU pressure over that span
/// against the pressure meterd's cycles decided on.
fn pressure_verdict(readings: &[Reading]) -> String {
    let (Some(first), Some(last)) = (readings.first(), readings.last()) else {
        return "no readings to judge the pressure by".to_owned();
    };
    let Some(host) = host_pressure(first, last) else {
        return "the host's /proc/pressure/cpu could not be read: no verdict on the load"
            .to_owned();
    };
    // A cycle's pressure shows from the reading after it; the last reading
    // is the widening cycle's own.
    let judged: Vec<f64> = readings[..readings.len() - 1]
        .iter()
        .filter_map(|r| r.pressure)
        .collect();
    let highest = judged.iter().copied().fold(0.0_f64, f64::max);
    if host < HIGH_WATER {
        format!(
            "the host itself was not saturated: its CPU pressure over the span was {host:.3}, \
             below the high-water mark {HIGH_WATER}: the load, not meterd, is the problem"
        )
    } else if highest < HIGH_WATER {
        format!(
            "meterd misjudged the load: the host's CPU pressure over the span was {host:.3}, \
             but no cycle before the widening decided on more than {highest:.3} \
             (meterd_cpu_pressure_ratio). A cycle's pressure is measured since the load \
             monitor's previous sample; when the periodic load sample runs just before the \
             cycle, that window is a few ms, under one jiffy, where PSI reports no stall"
        )
    } else {
        format!(
            "the host's CPU pressure over the span was {host:.3} and a cycle decided on \
             {highest:.3}, above the high-water mark {HIGH_WATER}, yet did not widen"
        )
    }
}

/// Server-logged connections of the summaries.
fn conns_of<'a>(truth: &'a [ConnLog], summaries: &[ClientSummary]) -> Vec<&'a ConnLog> {
    summaries
        .iter()
        .flat_map(|s| &s.connections)
        .map(|c| {
            truth
                .iter()
                .find(|t| {
                    t.client_addr.to_canonical() == c.client_addr.to_canonical()
                        && t.client_port == c.client_port
                        && t.server_port == c.server_port
                })
                .unwrap()
        })
        .collect()
}

/// Steady traffic, then every CPU saturated for 15 s: the interval widens
/// within two base cycles of the saturation, no cycle overruns after that,
/// the interval returns to the base after the load ends, and the same
/// downloads cost the same loaded and unloaded: what the test computes
/// from the server-logged bytes.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn interval_widens_under_cpu_saturation_and_billing_is_unchanged() {
    let Some(mut env) = TestEnv::new("governor", traffic_bin!(), Setup::default()) else {
        return;
    };
    let at = loopback4(port(0, 0));
    let tariff = Tariff::volume(
        5,
        ("1MB", 1_000_000),
        Direction::Egress,
        Rounding::PerStartedUnit,
    );
    let services = vec![Service::tcp("vod", &[at.port()], tariff.clone())];
    env.start_agent(AgentConfig {
        services: services.clone(),
        interval: BASE,
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[at]);
    let poller = Poller::start(env.agent().ready().metrics);

    // The host must be calm first: another process's load may have widened
    // the interval already, and this test needs to see its own widening.
    let calm = wait_until(Duration::from_secs(60), || {
        let r = poller.readings();
        let recent: Vec<_> = r
            .iter()
            .rev()
            .take_while(|x| x.at.elapsed() < Duration::from_secs(3))
            .collect();
        recent.len() >= 10 && recent.iter().all(|x| x.interval_ms == BASE_MS)
    });
    assert!(
        calm,
        "the interval did not stay at the base {BASE:?} for 3 s before the test's load: \
         the host is too busy to test the governor; readings: {:?}",
        poller.readings().iter().rev().take(10).collect::<Vec<_>>()
    );

    // Steady traffic through the whole test: 40.5 MB, 1 MB every 600 ms.
    let steady = env.spawn_tcp_client(&TcpClient {
        chunk: 1_000_000,
        pause_ms: 600,
        source: Source::Distinct,
        ..TcpClient::new(at, 40_500_000, 0)
    });
    let unloaded = env.run_tcp_clients(&group(at));
    let before = poller.last();
    assert_eq!(
        before.interval_ms, BASE_MS,
        "widened before the test's load: {before:?}"
    );

    // Find the end of a cycle (the cycle counter moves), to start the load
    // at PHASE after it.
    let addr = env.agent().ready().metrics;
    let cycles = || {
        whole(
            Exposition::parse(&http::get(addr, "/metrics").unwrap().body)
                .unwrap()
                .value("meterd_cycle_duration_seconds_count", &[])
                .unwrap(),
        )
    };
    let count = cycles();
    let mut cycle_end = Instant::now();
    assert!(
        wait_until(BASE * 3, || {
            cycle_end = Instant::now();
            cycles() > count
        }),
        "no billing cycle in {:?}",
        BASE * 3
    );
    let cycles_before = cycles();
    thread::sleep(PHASE.saturating_sub(cycle_end.elapsed()));
    let workers = 2 * online_cpus();
    let name = format!("{}-stress", env.unique());
    let (mut stress, saturated) =
        Stress::cpu(&name, &env.dir().join("stress.log"), workers, STRESS);
    let phase = saturated - cycle_end;
    assert_eq!(
        cycles(),
        cycles_before,
        "a cycle ran between the phase reference and the saturation ({phase:.2?})"
    );
    // The same connections again, under load.
    let loaded = env.run_tcp_clients(&group(at));
    assert!(
        stress.running(),
        "the loaded group outlasted the {STRESS:?} of load: it did not run loaded"
    );

    let widened = poller
        .wait_for(saturated, STRESS, |r| r.interval_ms > BASE_MS)
        .unwrap_or_else(|| {
            panic!(
                "the interval never widened during {STRESS:?} of {workers} CPU hogs on {} \
                 CPUs; agent log:\n{}",
                online_cpus(),
                env.agent().log_tail(30)
            )
        });
    let latency = widened.at - saturated;
    // The reading that shows the wider interval is the snapshot of the
    // cycle that widened (the next cycle is an interval of 2 s away, and
    // readings come every 250 ms): its cycle count says which cycle it was.
    let cycles_to_widen = widened.cycles - cycles_before;
    eprintln!(
        "governor: {workers} hogs from {phase:.2?} after a cycle; widened to {} ms {latency:.2?} \
         after saturation, at the {cycles_to_widen}. cycle after it",
        widened.interval_ms
    );
    // Judged at the end, so that a slow widening does not hide whether the
    // rest (narrowing, billing) works.
    let slow_widening = (cycles_to_widen > 2 || latency > 2 * BASE + POLL).then(|| {
        let readings: Vec<Reading> = poller
            .readings()
            .into_iter()
            .filter(|r| r.at + POLL >= saturated && r.at <= widened.at)
            .collect();
        format!(
            "the interval widened at the {cycles_to_widen}. billing cycle after the CPUs were \
             saturated ({latency:.2?}, read every {POLL:?}; saturation began {phase:.2?} after a \
             cycle): not within two base cycles.\n{}\nreadings (since saturation, interval ms, \
             cycles, meterd_cpu_pressure_ratio, host PSI since the previous reading): {:?}\n\
             agent log:\n{}",
            pressure_verdict(&readings),
            readings
                .windows(2)
                .map(|w| (
                    format!("{:.2?}", w[1].at.saturating_duration_since(saturated)),
                    w[1].interval_ms,
                    w[1].cycles,
                    w[1].pressure.map(|p| format!("{p:.3}")),
                    host_pressure(&w[0], &w[1]).map(|p| format!("{p:.3}")),
                ))
                .collect::<Vec<_>>(),
            env.agent().log_tail(5)
        )
    });

    stress.wait(STRESS + Duration::from_secs(30));
    let load_ended = Instant::now();
    assert!(
        stress.wait_gone(Duration::from_secs(10)),
        "stress-ng workers left"
    );
    let back = poller
        .wait_for(load_ended, NARROW_TIMEOUT, |r| r.interval_ms == BASE_MS)
        .unwrap_or_else(|| {
            // Narrowing needs calm samples: say whether the host was calm.
            let after: Vec<Reading> = poller
                .readings()
                .into_iter()
                .filter(|r| r.at >= load_ended)
                .collect();
            let last_10s: Vec<&Reading> = after
                .iter()
                .filter(|r| r.at.elapsed() <= Duration::from_secs(10))
                .collect();
            let host = |from: Option<&Reading>, to: Option<&Reading>| {
                from.zip(to)
                    .and_then(|(a, b)| host_pressure(a, b))
                    .map_or_else(|| "unknown".to_owned(), |p| format!("{p:.3}"))
            };
            panic!(
                "the interval did not return to {BASE:?} within {NARROW_TIMEOUT:?} of the end of \
                 the load; the host's own CPU pressure since the load ended was {}, over the \
                 last 10 s {} (meterd narrows only after samples below 0.2: above that, \
                 another process kept the host busy); last reading {:?}; agent log:\n{}",
                host(after.first(), after.last()),
                host(last_10s.first().copied(), last_10s.last().copied()),
                poller.last(),
                env.agent().log_tail(30)
            )
        });
    let widest = poller
        .readings()
        .iter()
        .map(|r| r.interval_ms)
        .max()
        .unwrap_or_default();
    eprintln!(
        "governor: widest interval {widest} ms; back to the base {:.1?} after the load ended",
        back.at - load_ended
    );
    assert!(
        back.overruns == widened.overruns,
        "cycles overran after the interval widened: meterd_cycle_overruns_total {} -> {}",
        widened.overruns,
        back.overruns
    );
    assert!(
        back.widen > before.widen && back.narrow > before.narrow,
        "meterd_interval_changes_total: widen {} -> {}, narrow {} -> {}",
        before.widen,
        back.widen,
        before.narrow,
        back.narrow
    );
    let log = env.agent().log();
    assert!(
        log.contains("interval widen from_ms=1000 to_ms=2000")
            && log.contains(&format!(
                "interval narrow from_ms=2000 to_ms={}",
                BASE.as_millis()
            )),
        "no widen and narrow lines in the agent log:\n{}",
        env.agent().log_tail(30)
    );

    // Billing: exact records, a session per connection, and each charge is
    // the tariff applied to the bytes the server sent; the same sizes cost
    // the same, loaded or not.
    let steady = steady.finish(Duration::from_secs(120));
    let mut all: Vec<&ClientSummary> = unloaded.iter().chain(&loaded).collect();
    all.push(&steady);
    let truth = env.tcp_truth(&server, &all);
    let ledger = env.wait_for_exact_ledger(&truth, &|_| "vod".to_owned());
    let sessions = checked_sessions(&ledger, &truth, &services, env.agent_config().session_idle);
    assert_eq!(sessions.len(), truth.len(), "a session per connection");
    let charges = |summaries: &[ClientSummary]| -> BTreeMap<u64, u64> {
        conns_of(&truth, summaries)
            .into_iter()
            .map(|conn| {
                let rec: &SessionRecord = ledger.session_of(conn);
                let (want, _) = tariff.expected_charge(conn.bytes_sent, conn.bytes_received, 0);
                assert_eq!(
                    rec.charge_minor, want,
                    "{} bytes sent: meterd charged {}, the tariff says {want}",
                    conn.bytes_sent, rec.charge_minor
                );
                (conn.bytes_sent, rec.charge_minor)
            })
            .collect()
    };
    let (calm_charges, loaded_charges) = (charges(&unloaded), charges(&loaded));
    let steady_charge = charges(std::slice::from_ref(&steady));
    eprintln!(
        "governor: charges per size unloaded {calm_charges:?}, loaded {loaded_charges:?}, \
         steady {steady_charge:?}"
    );
    assert_eq!(
        calm_charges, loaded_charges,
        "the same downloads cost differently under load"
    );
    assert_eq!(calm_charges.len(), group(at).len());
    env.agent().assert_running();
    if let Some(message) = slow_widening {
        panic!("{message}");
    }
}
