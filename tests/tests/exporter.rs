//! Acceptance scenarios of the Prometheus exporter: a real Prometheus
//! scraping the agent sees exactly what the ledger settled (bytes, charges,
//! viewing sessions) and the servers logged (closed connections), the
//! exposition passes `promtool check metrics`, and no counter goes back
//! when the agent restarts (SIGTERM or kill -9) in the middle of traffic.
//!
//! Here many connections come from one client address (127.0.0.1) and are
//! billed as one viewing session per service while their traffic goes on;
//! the sessions and their charges are checked against the grouping and the
//! tariff worked out from the servers' logs (`ledger::checked_sessions`).

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use meterd_tests::{
    AgentConfig, CloseOrder, Setup, Source, TcpClient, TestEnv,
    ledger::{Ledger, SessionRecord, checked_sessions},
    metrics::{Exposition, whole},
    port,
    process::wait_until,
    prometheus::Prometheus,
    tariff::{Direction, Rounding, Service, Tariff, service_of_port},
    traffic_bin,
    wire::{ClientSummary, ConnLog},
};

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// `vod` (5 per started MB out) and `live` (10 per started second of
/// watching time).
fn services(vod: u16, live: u16) -> Vec<Service> {
    vec![
        Service::tcp(
            "vod",
            &[vod],
            Tariff::volume(
                5,
                ("1MB", 1_000_000),
                Direction::Egress,
                Rounding::PerStartedUnit,
            ),
        ),
        Service::tcp(
            "live",
            &[live],
            Tariff::time(10_000_000, 1, Rounding::PerStartedUnit),
        ),
    ]
}

/// Sums over the ledger export and the truth.
#[derive(Debug, Default, PartialEq, Clone, Copy)]
struct Sums {
    bytes_out: u64,
    bytes_in: u64,
    charge_minor: u64,
    /// Settled viewing sessions.
    sessions: u64,
    /// Closed connections: the servers' count, not meterd's.
    connections: u64,
}

/// The sums over `sessions`, with the number of connections of the truth
/// that `truth_connections` counted.
fn sums<'a>(
    sessions: impl IntoIterator<Item = &'a SessionRecord>,
    truth_connections: usize,
) -> Sums {
    sessions.into_iter().fold(
        Sums {
            connections: truth_connections as u64,
            ..Sums::default()
        },
        |s, r| Sums {
            bytes_out: s.bytes_out + r.bytes_out,
            bytes_in: s.bytes_in + r.bytes_in,
            charge_minor: s.charge_minor + r.charge_minor,
            sessions: s.sessions + 1,
            ..s
        },
    )
}

/// The same sums as `/metrics` states them.
fn metric_sums(m: &Exposition, service: Option<&str>) -> Sums {
    let labels = |direction: Option<&'static str>| -> Vec<(&str, &str)> {
        service
            .map(|s| ("service", s))
            .into_iter()
            .chain(direction.map(|d| ("direction", d)))
            .collect()
    };
    Sums {
        bytes_out: whole(m.sum("meterd_payload_bytes_total", &labels(Some("egress")))),
        bytes_in: whole(m.sum("meterd_payload_bytes_total", &labels(Some("ingress")))),
        charge_minor: whole(m.sum("meterd_charged_minor_total", &labels(None))),
        sessions: whole(m.sum("meterd_viewer_sessions_settled_total", &labels(None))),
        connections: whole(m.sum("meterd_connections_closed_total", &labels(None))),
    }
}

/// The ledger's sessions are the ones the truth makes, each charged the
/// tariff once (see `ledger::checked_sessions`); returns them.
fn check_sessions<'a>(
    env: &TestEnv,
    ledger: &'a Ledger,
    truth: &'a [ConnLog],
    services: &[Service],
) -> Vec<&'a SessionRecord> {
    checked_sessions(ledger, truth, services, env.agent_config().session_idle)
        .into_iter()
        .map(|(_, rec)| rec)
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits until the agent's own `/metrics` has caught up with the ledger:
/// every viewing session settled, none live and no connection open (its
/// snapshot is published at the end of a cycle). Returns the scrape.
fn wait_metrics_settled(env: &mut TestEnv, settled: u64) -> Exposition {
    let live = |m: &Exposition| {
        (
            m.sum("meterd_viewer_sessions_live", &[]),
            m.sum("meterd_connections_live", &[]),
        )
    };
    let mut last = None;
    let done = wait_until(Duration::from_secs(30), || {
        let m = env.agent().scrape();
        let ok = metric_sums(&m, None).sessions == settled && live(&m) == (0.0, 0.0);
        last = Some(m);
        ok
    });
    let last = last.unwrap();
    assert!(
        done,
        "/metrics did not reach {settled} settled and 0 live viewer sessions and 0 live \
         connections: {:?}, live (sessions, connections) {:?}",
        metric_sums(&last, None),
        live(&last)
    );
    last
}

/// A real Prometheus scrapes the agent every second while sessions of a
/// volume and a time tariff run and settle; after the last one settled and
/// one more scrape, what Prometheus stored equals the sums over
/// `meterd ledger export` exactly, and its closed connections are the
/// servers' count. And `promtool check metrics` passes.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn prometheus_sees_what_the_ledger_settled() {
    let Some(mut env) = TestEnv::new("exp-prom", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (vod, live) = (loopback4(port(0, 0)), loopback4(port(0, 1)));
    let services = services(vod.port(), live.port());
    env.start_agent(AgentConfig {
        services: services.clone(),
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[vod, live]);
    let metrics_at = env.agent().ready().metrics;
    let prometheus = Prometheus::start(env.dir(), metrics_at);
    assert!(
        wait_until(Duration::from_secs(30), || prometheus
            .last_scrape()
            .is_some()),
        "prometheus (pid {}) never scraped the agent at {metrics_at}; its log:\n{}",
        prometheus.pid(),
        prometheus.log_tail(20)
    );

    // All from 127.0.0.1 at once, with the paced one running ~3 s: one vod
    // viewing session of 22.5 MB.
    let mut clients: Vec<TcpClient> = [2_500_000, 7_200_000, 1_000_001]
        .into_iter()
        .map(|size| TcpClient::new(vod, size, 0))
        .collect();
    clients.push(TcpClient {
        close: CloseOrder::Client,
        ..TcpClient::new(vod, 300_000, 1_500_000)
    });
    // Live while Prometheus scrapes: 10.5 MB over ~3 s.
    clients.push(TcpClient {
        chunk: 1_000_000,
        pause_ms: 300,
        ..TcpClient::new(vod, 10_500_000, 0)
    });
    // Two time-tariff viewers of their own address, 1.5 s and 2.2 s of
    // watching time (paced uploads; the hold after it is not watched).
    for (chunks, pause_ms) in [(16, 100), (12, 200)] {
        clients.push(TcpClient {
            chunk: 1000,
            pause_ms,
            hold_ms: 500,
            close: CloseOrder::Client,
            source: Source::Distinct,
            ..TcpClient::new(live, 4_000, chunks * 1000)
        });
    }
    let summaries = env.run_tcp_clients(&clients);
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    let service_of = |c: &ConnLog| service_of_port(&services, c.server_port).name.clone();
    let ledger = env.wait_for_exact_ledger(&truth, &service_of);
    let sessions = check_sessions(&env, &ledger, &truth, &services);
    assert_eq!(
        sessions
            .iter()
            .map(|s| s.service.as_str())
            .collect::<Vec<_>>(),
        ["live", "live", "vod"],
        "one vod session of 127.0.0.1, two live viewers: {sessions:#?}"
    );
    let want = sums(sessions.iter().copied(), truth.len());

    let agent_view = wait_metrics_settled(&mut env, want.sessions);
    assert_eq!(
        metric_sums(&agent_view, None),
        want,
        "/metrics against the ledger"
    );
    let settled_at = unix_now();
    assert!(
        wait_until(Duration::from_secs(30), || {
            prometheus.last_scrape().is_some_and(|t| t > settled_at)
        }),
        "prometheus did not scrape again after the sessions settled; its log:\n{}",
        prometheus.log_tail(20)
    );
    let query = |expr: &str| {
        whole(
            prometheus
                .scalar(expr)
                .unwrap_or_else(|| panic!("prometheus has no value for {expr}")),
        )
    };
    let stored = Sums {
        bytes_out: query(r#"sum(meterd_payload_bytes_total{direction="egress"})"#),
        bytes_in: query(r#"sum(meterd_payload_bytes_total{direction="ingress"})"#),
        charge_minor: query("sum(meterd_charged_minor_total)"),
        sessions: query("sum(meterd_viewer_sessions_settled_total)"),
        connections: query("sum(meterd_connections_closed_total)"),
    };
    eprintln!("exp-prom: ledger {want:?}; prometheus {stored:?}");
    assert_eq!(
        stored, want,
        "what Prometheus stored against the ledger export"
    );
    // Per service, too.
    for service in &services {
        let name = &service.name;
        let mine = sessions.iter().copied().filter(|r| &r.service == name);
        let want = sums(
            mine,
            truth.iter().filter(|c| service_of(c) == *name).count(),
        );
        let stored = Sums {
            bytes_out: query(&format!(
                r#"sum(meterd_payload_bytes_total{{service="{name}",direction="egress"}})"#
            )),
            bytes_in: query(&format!(
                r#"sum(meterd_payload_bytes_total{{service="{name}",direction="ingress"}})"#
            )),
            charge_minor: query(&format!(
                r#"sum(meterd_charged_minor_total{{service="{name}",tariff_kind="{}",currency="EUR"}})"#,
                service.tariff.kind()
            )),
            sessions: query(&format!(
                r#"meterd_viewer_sessions_settled_total{{service="{name}"}}"#
            )),
            connections: query(&format!(
                r#"meterd_connections_closed_total{{service="{name}"}}"#
            )),
        };
        assert_eq!(
            stored, want,
            "service {name}: Prometheus against the ledger"
        );
    }

    // promtool lints what curl fetches.
    let curl = Command::new("curl")
        .args(["-sS", "--fail", &format!("http://{metrics_at}/metrics")])
        .output()
        .expect("run curl");
    assert!(
        curl.status.success(),
        "curl /metrics: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(&curl.stdout)
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics failed ({}): {}{}\n/metrics:\n{}",
        lint.status,
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr),
        String::from_utf8_lossy(&curl.stdout)
    );
    env.agent().assert_running();
}

/// Every counter sample of `after` is at least what it was in `before`,
/// and none has disappeared.
fn assert_not_back(what: &str, before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) {
    let back: Vec<String> = before
        .iter()
        .filter_map(|(key, &was)| match after.get(key) {
            Some(&now) if now >= was => None,
            Some(&now) => Some(format!("{key}: {was} -> {now}")),
            None => Some(format!("{key}: {was} -> gone")),
        })
        .collect();
    assert!(
        back.is_empty(),
        "{what}: counters went back:\n{}",
        back.join("\n")
    );
}

/// Counters during traffic, across a SIGTERM restart and a kill -9 restart:
/// none goes back (the metrics address changes, each run's ready file says
/// where), and once the traffic is over, the bytes, charges and viewing
/// sessions of `/metrics` are the ledger's sums and its closed connections
/// the servers' count. The vod traffic of 127.0.0.1 never pauses, so it is
/// one viewing session that spans both restarts.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn counters_never_go_back_across_restarts() {
    let Some(mut env) = TestEnv::new("exp-restart", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (vod, live) = (loopback4(port(1, 0)), loopback4(port(1, 1)));
    let services = services(vod.port(), live.port());
    env.start_agent(AgentConfig {
        services: services.clone(),
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[vod, live]);

    let started = env.dir().join("long.started");
    let long = vec![
        // ~9 s down.
        env.spawn_tcp_client(&TcpClient {
            chunk: 1_000_000,
            pause_ms: 300,
            started_file: Some(started.clone()),
            ..TcpClient::new(vod, 30_500_000, 0)
        }),
        // Uploads count as ingress: 12 MB up in ~6 s.
        env.spawn_tcp_client(&TcpClient {
            chunk: 1_000_000,
            pause_ms: 500,
            close: CloseOrder::Client,
            ..TcpClient::new(vod, 2_000_000, 12_000_000)
        }),
        // 6.5 s of live watching time: 27 1000-byte chunks up, 250 ms
        // apart.
        env.spawn_tcp_client(&TcpClient {
            chunk: 1000,
            pause_ms: 250,
            close: CloseOrder::Client,
            ..TcpClient::new(live, 10_000, 27_000)
        }),
    ];
    assert!(
        wait_until(Duration::from_secs(15), || started.exists()),
        "the long transfer did not start"
    );
    let short = |env: &TestEnv, to| {
        env.spawn_tcp_client(&TcpClient {
            count: 20,
            parallel: 2,
            close: CloseOrder::Alternate,
            ..TcpClient::new(to, 1_200_000, 3_000)
        })
    };
    let mut shorts = vec![short(&env, vod)];
    thread::sleep(Duration::from_millis(1_500));

    let mut scrapes = Vec::new();
    let counters = |env: &mut TestEnv| {
        let m = env.agent().scrape();
        let counters = m.monotonic();
        assert!(
            counters
                .contains_key(r#"meterd_payload_bytes_total{direction="egress",service="vod"}"#),
            "no vod egress counter in {counters:?}"
        );
        counters
    };
    let first_addr = env.agent().ready().metrics;
    let vod_egress = r#"meterd_payload_bytes_total{direction="egress",service="vod"}"#;
    for (restart, kill) in [("SIGTERM", false), ("kill -9", true)] {
        // Over a second into a 30 MB download, after 20 closed connections
        // of 1.2 MB: the counter holds the connections' bytes, settled and
        // live, not only those of settled sessions (a cycle or two late, if
        // the host's load has widened the interval).
        let mut before = counters(&mut env);
        wait_until(Duration::from_secs(10), || {
            before = counters(&mut env);
            before[vod_egress] >= 1_200_000.0
        });
        assert!(
            before[vod_egress] >= 1_200_000.0,
            "before the {restart} restart, {vod_egress} is {}: the bytes of closed and live \
             connections are missing",
            before[vod_egress]
        );
        if kill {
            env.agent().kill9();
        } else {
            env.agent().stop();
        }
        // Connections while no agent runs.
        shorts.push(short(&env, if kill { live } else { vod }));
        thread::sleep(Duration::from_millis(700));
        env.agent().start();
        let after = counters(&mut env);
        assert_not_back(&format!("restart after {restart}"), &before, &after);
        scrapes.push((restart, before, after));
        thread::sleep(Duration::from_millis(1_200));
    }
    let new_addr = env.agent().ready().metrics;
    eprintln!(
        "exp-restart: metrics at {first_addr}, then {new_addr}; egress before/after each \
         restart: {:?}",
        scrapes
            .iter()
            .map(|(r, b, a)| (*r, b[vod_egress], a[vod_egress]))
            .collect::<Vec<_>>()
    );

    let summaries: Vec<ClientSummary> = long
        .into_iter()
        .chain(shorts)
        .map(|c| c.finish(Duration::from_secs(120)))
        .collect();
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    let service_of = |c: &ConnLog| service_of_port(&services, c.server_port).name.clone();
    let ledger = env.wait_for_exact_ledger(&truth, &service_of);
    let sessions = check_sessions(&env, &ledger, &truth, &services);
    assert_eq!(
        sessions.len(),
        2,
        "the traffic of 127.0.0.1 never paused: one session per service, across both \
         restarts: {sessions:#?}"
    );
    let want = sums(sessions.iter().copied(), truth.len());
    let last_before = &scrapes.last().unwrap().2;
    let end = wait_metrics_settled(&mut env, want.sessions);
    assert_not_back("to the end of the traffic", last_before, &end.monotonic());
    eprintln!("exp-restart: ledger {want:?}");
    assert_eq!(
        metric_sums(&end, None),
        want,
        "/metrics against the ledger export"
    );
    for service in &services {
        let mine = sessions
            .iter()
            .copied()
            .filter(|r| r.service == service.name);
        let conns = truth
            .iter()
            .filter(|c| service_of(c) == service.name)
            .count();
        assert_eq!(
            metric_sums(&end, Some(&service.name)),
            sums(mine, conns),
            "service {}: /metrics against the ledger export",
            service.name
        );
    }
    env.agent().assert_running();
}
