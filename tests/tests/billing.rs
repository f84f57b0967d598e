//! Acceptance scenarios of the billing engine: what `meterd ledger export`
//! says each viewing session cost, against what the test computes itself
//! with the contract's rules as `meterd_tests::tariff` writes them out:
//! from the bytes the server logged (volume tariffs), or from the exported
//! watching time, which must be the servers' first-to-last payload span
//! (time tariffs). Which connections make one session is worked out here
//! too, from the client addresses and the servers' payload times
//! (`ledger::expected_sessions`). Also: attribution and account limits
//! through the API and the limit hook, and exactly-once charging across
//! kill -9 of the agent, checked in the SQLite ledger itself.
//!
//! A connection that is to be billed on its own gets a client address of
//! its own (`Source::Addr` of a fresh address, or `Source::Distinct`):
//! meterd bills every connection of one client address to one service as
//! one session while payload keeps moving.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use meterd_tests::{
    AgentConfig, CloseOrder, Setup, Source, TcpClient, TestEnv, http,
    ledger::{self, CONNECTION_COLUMNS, Ledger, SESSION_COLUMNS, checked_sessions, sqlite},
    port,
    process::{read_lossy, wait_until},
    read_started,
    tariff::{Direction, Rounding, Service, Tariff, service_of_port},
    traffic_bin,
    wire::{ClientSummary, ConnLog},
};

/// The contract's "1MB": 10^6 bytes.
const MB: (&str, u64) = ("1MB", 1_000_000);

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn unix_ms_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// `vod`: 5 minor units per started MB delivered to the client.
fn vod(ports: &[u16]) -> Service {
    Service::tcp(
        "vod",
        ports,
        Tariff::volume(5, MB, Direction::Egress, Rounding::PerStartedUnit),
    )
}

/// `live`: 10 minor units per started second of watching time.
fn live(ports: &[u16]) -> Service {
    Service::tcp(
        "live",
        ports,
        Tariff::time(10_000_000, 1, Rounding::PerStartedUnit),
    )
}

/// A closure naming each connection's service by its server port.
fn service_names(services: &[Service]) -> impl Fn(&ConnLog) -> String + '_ {
    move |c: &ConnLog| service_of_port(services, c.server_port).name.clone()
}

/// The CSV exports: the contract's columns in order, the same records with
/// the same values as the JSON lines, at both levels.
fn check_csv(env: &TestEnv, ledger: &Ledger) {
    let agent = env.agent_ref();
    let csv = agent.export("csv");
    let header: Vec<&str> = csv.lines().next().unwrap_or_default().split(',').collect();
    assert_eq!(header, SESSION_COLUMNS, "session CSV header");
    let rows = ledger::parse_csv(&csv).unwrap_or_else(|e| panic!("CSV export: {e}\n{csv}"));
    let by_id: BTreeMap<String, BTreeMap<String, String>> = rows
        .into_iter()
        .map(|row| (row["session_id"].clone(), row))
        .collect();
    assert_eq!(by_id.len(), ledger.sessions.len(), "CSV rows:\n{csv}");
    for rec in &ledger.sessions {
        assert_eq!(
            by_id.get(&rec.session_id),
            Some(&rec.csv_fields()),
            "CSV row of session {}",
            rec.session_id
        );
    }

    let csv = agent.export_connections("csv");
    let header: Vec<&str> = csv.lines().next().unwrap_or_default().split(',').collect();
    assert_eq!(header, CONNECTION_COLUMNS, "connection CSV header");
    let rows = ledger::parse_csv(&csv).unwrap_or_else(|e| panic!("CSV export: {e}\n{csv}"));
    let mut got: Vec<BTreeMap<String, String>> = rows;
    let mut want: Vec<BTreeMap<String, String>> = ledger
        .connections
        .iter()
        .map(ledger::ConnectionRecord::csv_fields)
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "connection CSV rows against the JSON lines");
}

/// One group of the tariffs test: its client address, what it runs, and
/// what each of its sessions must cost, worked out by hand, in order.
struct Case {
    what: &'static str,
    addr: IpAddr,
    client: TcpClient,
    charges: Vec<u64>,
}

/// Volume and time tariffs end to end, three services: downloads of sizes
/// on and off unit boundaries, each its own viewer; two connections of one
/// viewer billed as one session (rounded once); one viewer who comes back
/// after more than `session_idle` (two sessions); watching time made by
/// paced uploads, one with an idle tail that must not be billed, and two
/// short connections of one viewer whose watching time adds up.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn volume_and_time_tariffs_end_to_end() {
    let Some(mut env) = TestEnv::new("bill-tariffs", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (vod_at, live_at, radio_at) = (
        loopback4(port(0, 0)),
        loopback4(port(0, 1)),
        loopback4(port(0, 2)),
    );
    let services = vec![
        vod(&[vod_at.port()]),
        live(&[live_at.port()]),
        // 2.5 minor units per second, pro rata: a price with a fraction.
        Service::tcp(
            "radio",
            &[radio_at.port()],
            Tariff::time(2_500_000, 1, Rounding::ProRata),
        ),
    ];
    env.start_agent(AgentConfig {
        services: services.clone(),
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[vod_at, live_at, radio_at]);

    let mut cases = Vec::new();
    let mut case = |what, client: TcpClient, charges: Vec<u64>| {
        let addr = env.fresh_source();
        cases.push(Case {
            what,
            addr,
            client: TcpClient {
                source: Source::Addr(addr),
                ..client
            },
            charges,
        });
    };
    // (bytes down, bytes up, what vod must charge, worked out by hand).
    let downloads: [(u64, u64, u64); 6] = [
        (2_500_000, 0, 15),
        (7_200_000, 0, 40),
        (1_000_000, 0, 5),
        (1_000_001, 0, 10),
        // Uploads are not egress: only the 2.5 MB down count.
        (2_500_000, 3_000_000, 15),
        (0, 0, 0),
    ];
    for (i, &(down, up, charge)) in downloads.iter().enumerate() {
        case(
            "a download of its own",
            TcpClient {
                close: if i % 2 == 0 {
                    CloseOrder::Server
                } else {
                    CloseOrder::Client
                },
                ..TcpClient::new(vod_at, down, up)
            },
            vec![charge],
        );
    }
    // One viewer, two connections one after the other: 0.8 MB in one
    // session is one started MB, 5 (a session per connection would be 10).
    case(
        "two downloads of one viewer",
        TcpClient {
            count: 2,
            ..TcpClient::new(vod_at, 400_000, 0)
        },
        vec![5],
    );
    // Watching time: uploads of 1000-byte chunks, n chunks `pause` apart
    // make (n - 1) * pause of payload. Spans in the middle of their
    // rounding steps: whole seconds (live), 0.4 s (radio: 2.5 per second,
    // half-up).
    let paced = |at, chunks: u64, pause_ms, hold_ms| TcpClient {
        chunk: 1000,
        pause_ms,
        hold_ms,
        close: CloseOrder::Client,
        ..TcpClient::new(at, 20_000, chunks * 1000)
    };
    case("2.5 s of live", paced(live_at, 11, 250, 0), vec![30]);
    // 1.5 s of payload, then 1.5 s open and idle: the idle tail is not
    // watching time, 20 (30 if it were).
    case(
        "1.5 s of live and an idle tail",
        paced(live_at, 16, 100, 1_500),
        vec![20],
    );
    case("1.6 s of radio", paced(radio_at, 17, 100, 0), vec![4]); // 4.0 -> 4
    case("3.2 s of radio", paced(radio_at, 17, 200, 0), vec![8]); // 8.0 -> 8
    // One viewer, two 0.3 s connections one after the other: 0.6 s of
    // watching time, one started second, 10 (20 per connection).
    case(
        "two short live connections of one viewer",
        TcpClient {
            count: 2,
            ..paced(live_at, 4, 100, 0)
        },
        vec![10],
    );
    // A viewer who comes back after more than session_idle: two sessions,
    // each rounded on its own (10 and 10; one session would be 15).
    let comeback = env.fresh_source();
    let comeback_client = TcpClient {
        source: Source::Addr(comeback),
        ..TcpClient::new(vod_at, 1_500_000, 0)
    };
    let idle = env.agent_config().session_idle;

    let batch = Instant::now();
    let mut clients: Vec<TcpClient> = cases.iter().map(|c| c.client.clone()).collect();
    clients.push(comeback_client.clone());
    let mut summaries = env.run_tcp_clients(&clients);
    // The batch took over 3 s (the 3.2 s of radio); the viewer's first
    // download was over within its first milliseconds.
    thread::sleep((idle + Duration::from_millis(1_500)).saturating_sub(batch.elapsed()));
    summaries.push(env.run_tcp_client(&comeback_client));
    cases.push(Case {
        what: "a viewer who comes back after session_idle",
        addr: comeback,
        client: comeback_client,
        charges: vec![10, 10],
    });

    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    // The downloads, two of one viewer, four paced, two short live ones,
    // and the viewer who came back.
    assert_eq!(truth.len(), downloads.len() + 2 + 4 + 2 + 2);
    let ledger = env.wait_for_exact_ledger(&truth, &service_names(&services));
    let sessions = checked_sessions(&ledger, &truth, &services, idle);
    for case in &cases {
        let charges: Vec<u64> = sessions
            .iter()
            .filter(|(want, _)| want.client_addr == case.addr)
            .map(|(_, rec)| rec.charge_minor)
            .collect();
        assert_eq!(
            charges, case.charges,
            "{} ({}): meterd's charges per session against the ones worked out by hand; \
             sessions: {:#?}",
            case.what, case.addr, sessions
        );
    }
    assert_eq!(
        sessions.len(),
        cases.iter().map(|c| c.charges.len()).sum::<usize>()
    );
    eprintln!(
        "bill-tariffs: {} sessions of {} connections, charges {:?}",
        sessions.len(),
        truth.len(),
        sessions
            .iter()
            .map(|(_, r)| (
                r.service.as_str(),
                r.connections,
                r.bytes_out,
                r.duration_ms,
                r.charge_minor
            ))
            .collect::<Vec<_>>()
    );
    check_csv(&env, &ledger);
    env.agent().assert_running();
}

/// A response sent whole within the kernel's first 100 ms refresh window
/// after the handshake (20 kB: the socket buffers take it at once), then
/// a connection left open and idle until the client closes it (a
/// keep-alive player between segments). The idle tail is not watching
/// time, and nothing moved after the response: on the time tariff a few
/// ms of payload are one started second, 10 (20 if the 1.5 s tail
/// counted); on the volume tariff, a tail longer than `session_idle` is
/// still one session of the 20 kB, 5 (a second session would hold the
/// request line, dated at the close).
#[test]
fn a_quick_response_and_an_idle_tail_is_one_short_session() {
    let Some(mut env) = TestEnv::new("bill-tail", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (vod_at, live_at) = (loopback4(port(3, 0)), loopback4(port(3, 1)));
    let services = vec![vod(&[vod_at.port()]), live(&[live_at.port()])];
    env.start_agent(AgentConfig {
        services: services.clone(),
        ..AgentConfig::default()
    });
    let idle = env.agent_config().session_idle;
    let server = env.tcp_server(&[vod_at, live_at]);
    let quick = |at, hold: Duration| TcpClient {
        close: CloseOrder::Client,
        hold_ms: u64::try_from(hold.as_millis()).unwrap(),
        source: Source::Addr(env.fresh_source()),
        ..TcpClient::new(at, 20_000, 0)
    };
    let clients = [
        quick(live_at, idle * 3 / 4),
        quick(vod_at, idle + ledger::GAP_MARGIN * 2),
    ];
    let summaries = env.run_tcp_clients(&clients);
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    assert_eq!(truth.len(), 2);
    for c in &truth {
        assert!(
            c.payload_span_ms().is_some_and(|ms| ms < 100),
            "the response took 100 ms or more: the test needs it within the kernel's first \
             refresh window: {c:?}"
        );
    }
    let ledger = env.wait_for_exact_ledger(&truth, &service_names(&services));
    let sessions = checked_sessions(&ledger, &truth, &services, idle);
    let charges: Vec<(&str, u64)> = sessions
        .iter()
        .map(|(want, rec)| (want.service.as_str(), rec.charge_minor))
        .collect();
    assert_eq!(
        charges,
        [("live", 10), ("vod", 5)],
        "one session each, charged for what moved: {sessions:#?}"
    );
    env.agent().assert_running();
}

/// A limit hook that appends its METERD_* environment to `log`.
fn write_hook(dir: &Path, log: &Path) -> std::path::PathBuf {
    let hook = dir.join("limit-hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\n{{ echo '---'; env | grep '^METERD_' | sort; }} >> '{}'\n",
            log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    hook
}

/// The hook runs recorded in its log: one map of METERD_* per run.
fn hook_runs(log: &Path) -> Vec<HashMap<String, String>> {
    read_lossy(log)
        .split("---\n")
        .filter(|run| !run.trim().is_empty())
        .map(|run| {
            run.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// Attribution through the API and a prepaid account running out. Alice's
/// connection is attributed while it runs: its bytes from then on are
/// billed to alice's session for its content, the ones before stay in the
/// session of its client address. Another viewer's download is its own
/// session. The limit hook runs exactly once (also after a restart), and
/// the agent logs it.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn attribution_and_prepaid_limit() {
    let Some(mut env) = TestEnv::new("bill-limit", traffic_bin!(), Setup::default()) else {
        return;
    };
    let at = loopback4(port(1, 0));
    let services = vec![vod(&[at.port()])];
    let tariff = services[0].tariff.clone();
    let hook_log = env.dir().join("hook.log");
    let hook = write_hook(env.dir(), &hook_log);
    env.start_agent(AgentConfig {
        services: services.clone(),
        accounts: vec![("alice".to_owned(), 10), ("bob".to_owned(), 1000)],
        // What this test checks is the event and its hook; `cut` (the
        // default) would also end alice's download, whose bytes the truth
        // holds in full.
        on_limit: Some("notify".to_owned()),
        limit_hook: Some(hook),
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[at]);

    // 12.5 MB in 1 MB steps 200 ms apart: ~2.5 s, several cycles, 65 minor
    // units in all, far beyond alice's 10.
    let started = env.dir().join("alice.started");
    let (alice_addr, other_addr) = (env.fresh_source(), env.fresh_source());
    let paced = TcpClient {
        chunk: 1_000_000,
        pause_ms: 200,
        ..TcpClient::new(at, 12_500_000, 0)
    };
    let alice = env.spawn_tcp_client(&TcpClient {
        started_file: Some(started.clone()),
        source: Source::Addr(alice_addr),
        ..paced.clone()
    });
    let other = env.spawn_tcp_client(&TcpClient {
        source: Source::Addr(other_addr),
        ..paced.clone()
    });
    assert!(
        wait_until(Duration::from_secs(15), || started.exists()),
        "alice's download did not start"
    );
    let alice_local = read_started(&started);
    assert_eq!(alice_local.ip(), alice_addr);
    let body = format!(
        r#"{{"client_addr":"{alice_addr}","client_port":{},"server_port":{},"account":"alice","content":"movie-1"}}"#,
        alice_local.port(),
        at.port()
    );
    let api = env.agent().ready().api;
    let response = http::post_json_unix(Path::new(&api), "/v1/attribute", &body)
        .unwrap_or_else(|e| panic!("POST /v1/attribute on {api}: {e}"));
    assert_eq!(response.status, 200, "{}\n{}", response.head, response.body);
    let reply: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    assert!(
        reply["status"] == "applied" || reply["status"] == "pending",
        "attribution reply: {}",
        response.body
    );
    eprintln!("bill-limit: attributed {alice_local}: {}", response.body);

    let alice = alice.finish(Duration::from_secs(60));
    let other = other.finish(Duration::from_secs(60));
    assert_eq!(alice.connections[0].client_port, alice_local.port());
    let truth = env.tcp_truth(&server, &[&alice, &other]);
    let service_of = service_names(&services);
    let ledger = env.wait_for_exact_ledger(&truth, &service_of);

    // The other viewer: one session of its own, the tariff once, 65.
    let (alice_conn, other_conn): (Vec<&ConnLog>, Vec<&ConnLog>) =
        truth.iter().partition(|c| c.client_addr == alice_addr);
    let (alices, rest) = ledger.split_off(&alice_conn);
    let other_truth: Vec<ConnLog> = other_conn.into_iter().cloned().collect();
    let others = checked_sessions(
        &rest,
        &other_truth,
        &services,
        env.agent_config().session_idle,
    );
    assert_eq!(others.len(), 1, "{others:#?}");
    assert_eq!(
        others[0].1.charge_minor, 65,
        "12.5 MB at 5 per started MB: {:?}",
        others[0].1
    );

    // Alice's connection: the part before the attribution (if it moved
    // any bytes) in the session of her address, the rest in alice's
    // session for movie-1; each charged the tariff on its own bytes.
    let alice_conn = alice_conn[0];
    let sessions = alices.sessions_of(alice_conn);
    assert_eq!(
        alices.sessions.len(),
        sessions.len(),
        "sessions holding alice's connection hold only it: {alices:#?}"
    );
    let (attributed, before) = sessions.split_last().unwrap_or_else(|| {
        panic!("alice's connection is in no session: {alices:#?}");
    });
    assert_eq!(
        (attributed.account.as_str(), attributed.content.as_str()),
        ("alice", "movie-1"),
        "the last part of alice's connection is billed to her: {sessions:#?}"
    );
    assert!(
        before.len() <= 1
            && before
                .iter()
                .all(|s| s.is_unattributed() && s.client_addr == alice_addr),
        "before the attribution, alice's bytes are billed to her address: {sessions:#?}"
    );
    for s in &sessions {
        let (want, _) = tariff.expected_charge(s.bytes_out, s.bytes_in, 0);
        assert_eq!(
            s.charge_minor, want,
            "{} bytes out at 5 per started MB: {s:?}",
            s.bytes_out
        );
        assert_eq!(s.connections, 1, "{s:?}");
    }
    assert!(
        attributed.charge_minor > 10,
        "the attribution came late: alice's session has only {} of her 12.5 MB, {} minor \
         units, not beyond her limit of 10: {sessions:#?}",
        attributed.bytes_out,
        attributed.charge_minor
    );
    eprintln!(
        "bill-limit: alice's 12.5 MB: {:?}",
        sessions
            .iter()
            .map(|s| (s.account.as_str(), s.bytes_out, s.charge_minor))
            .collect::<Vec<_>>()
    );

    let runs = || hook_runs(&hook_log);
    assert!(
        wait_until(Duration::from_secs(30), || !runs().is_empty()),
        "the limit hook never ran; agent log:\n{}",
        env.agent().log_tail(40)
    );
    // More cycles, a restart: still once.
    thread::sleep(Duration::from_secs(3));
    env.agent().stop();
    env.agent().start();
    thread::sleep(Duration::from_secs(3));
    let runs = runs();
    assert_eq!(
        runs.len(),
        1,
        "the limit hook ran {} times: {runs:?}",
        runs.len()
    );
    let run = &runs[0];
    let var = |k: &str| run.get(k).map(String::as_str);
    assert_eq!(var("METERD_EVENT"), Some("limit_reached"), "{run:?}");
    assert_eq!(var("METERD_ACCOUNT"), Some("alice"), "{run:?}");
    assert_eq!(var("METERD_LIMIT_MINOR"), Some("10"), "{run:?}");
    assert_eq!(var("METERD_CURRENCY"), Some("EUR"), "{run:?}");
    let spent: u64 = var("METERD_SPENT_MINOR")
        .unwrap_or("")
        .parse()
        .unwrap_or_else(|e| {
            panic!("METERD_SPENT_MINOR: {e}: {run:?}");
        });
    assert!(
        (10..=attributed.charge_minor).contains(&spent),
        "alice spent {spent}: at least her limit, at most her session's {}: {run:?}",
        attributed.charge_minor
    );

    // The event's own line, `<level> <target>: limit_reached account=...`;
    // its deliveries log `limit event delivered event_id=limit_reached:...`.
    let log = env.agent().log();
    let reached: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(": limit_reached "))
        .collect();
    assert_eq!(
        reached.len(),
        1,
        "want one limit_reached log line, found {reached:#?}"
    );
    assert!(
        reached[0].contains("WARN")
            && reached[0].contains("account=alice")
            && reached[0].contains("policy=Notify"),
        "{}",
        reached[0]
    );
    let limit_total = env
        .agent()
        .scrape()
        .value("meterd_limit_reached_total", &[]);
    assert_eq!(limit_total, Some(1.0), "meterd_limit_reached_total");
    env.agent().assert_running();
}

/// kill -9 of the agent four times while long transfers run (charged by
/// cycles before each kill) and short connections come and go, some of
/// them while no agent runs. Every connection is a viewer of its own. At
/// the end every connection has exactly its bytes in the ledger, in a
/// session of its own with the right charge, and in the SQLite ledger each
/// session's charges (cycles and settlement) add up to its charge, with no
/// charge recorded twice or left over.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn kill9_during_traffic_charges_exactly_once() {
    let Some(mut env) = TestEnv::new("bill-crash", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (vod_at, live_at) = (loopback4(port(2, 0)), loopback4(port(2, 1)));
    let services = vec![vod(&[vod_at.port()]), live(&[live_at.port()])];
    env.start_agent(AgentConfig {
        services: services.clone(),
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[vod_at, live_at]);

    let started = env.dir().join("long.started");
    let mut long = vec![
        // ~10 s: 30.5 MB in 1 MB steps 300 ms apart.
        env.spawn_tcp_client(&TcpClient {
            chunk: 1_000_000,
            pause_ms: 300,
            close: CloseOrder::Client,
            started_file: Some(started.clone()),
            source: Source::Distinct,
            ..TcpClient::new(vod_at, 30_500_000, 0)
        }),
        // ~8 s: 20.3 MB down and 2 MB up in 512 KiB steps.
        env.spawn_tcp_client(&TcpClient {
            chunk: 512 * 1024,
            pause_ms: 180,
            source: Source::Distinct,
            ..TcpClient::new(vod_at, 20_300_000, 2_000_000)
        }),
        // Time tariff across the kills: 7.25 s of watching time, 30
        // 1000-byte chunks up, 250 ms apart.
        env.spawn_tcp_client(&TcpClient {
            chunk: 1000,
            pause_ms: 250,
            close: CloseOrder::Client,
            source: Source::Distinct,
            ..TcpClient::new(live_at, 50_000, 30_000)
        }),
    ];
    assert!(
        wait_until(Duration::from_secs(15), || started.exists()),
        "the long transfer did not start"
    );
    let mut short = Vec::new();
    let mut kills = Vec::new();
    // (run before the kill, time without agent) per kill, spread out.
    let steps = [(900, 400), (1_300, 800), (700, 300), (1_100, 600)];
    for (k, &(run_ms, down_ms)) in steps.iter().enumerate() {
        let size = [1_500_000, 250_000, 3_100_000, 999_999][k];
        short.push(env.spawn_tcp_client(&TcpClient {
            count: 30,
            parallel: 2,
            close: CloseOrder::Alternate,
            chunk: 256 * 1024,
            pause_ms: 15,
            source: Source::Distinct,
            ..TcpClient::new(vod_at, size, 1000)
        }));
        thread::sleep(Duration::from_millis(run_ms));
        env.agent().kill9();
        kills.push(unix_ms_now());
        // Connections that open and close while no agent runs.
        short.push(env.spawn_tcp_client(&TcpClient {
            count: 10,
            parallel: 2,
            close: CloseOrder::Alternate,
            source: Source::Distinct,
            ..TcpClient::new(if k % 2 == 0 { vod_at } else { live_at }, 400_000, 0)
        }));
        thread::sleep(Duration::from_millis(down_ms));
        env.agent().start();
    }
    assert!(
        !long[0].finished(),
        "the 30 MB transfer ended before the last restart: it did not span the kills; make \
         it longer"
    );

    let mut summaries: Vec<ClientSummary> = long
        .drain(..)
        .map(|c| c.finish(Duration::from_secs(120)))
        .collect();
    summaries.extend(
        short
            .into_iter()
            .map(|c| c.finish(Duration::from_secs(120))),
    );
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    assert_eq!(truth.len(), 3 + 4 * 30 + 4 * 10);
    let ledger = env.wait_for_exact_ledger(&truth, &service_names(&services));
    let sessions = checked_sessions(&ledger, &truth, &services, env.agent_config().session_idle);
    assert_eq!(sessions.len(), truth.len(), "a session per viewer");
    // The agent's last run stops the contract's way, so the SQLite file is
    // quiet while it is read.
    env.agent().stop();

    let db = env.agent().ledger_path().to_owned();
    let q = |sql: &str| sqlite(&db, sql);
    // Sessions, open and settled, are rows of `viewer_sessions` with a
    // `state`; connection segments are rows of `connections`.
    let open = q("SELECT session_id FROM viewer_sessions WHERE state <> 'settled'");
    assert!(
        open.is_empty(),
        "sessions left open after every session settled: {open:?}"
    );
    let open = q("SELECT connection_id FROM connections WHERE state <> 'ended'");
    assert!(
        open.is_empty(),
        "connection segments left open after every connection closed: {open:?}"
    );
    let settled = q("SELECT count(*) FROM viewer_sessions WHERE state = 'settled'");
    assert_eq!(
        settled[0][0],
        ledger.sessions.len().to_string(),
        "settled sessions in the ledger file against the export"
    );

    // A session's charges are its row: the cycles' accrual, updated in
    // place, plus the settlement's adjustment.
    let rows = q(
        "SELECT session_id, cycles_micro, adjustment_micro, started_ms, ended_ms \
         FROM viewer_sessions WHERE state = 'settled'",
    );
    let by_id: HashMap<&str, &Vec<String>> = rows.iter().map(|r| (r[0].as_str(), r)).collect();
    let mut spanning_kills = 0;
    for rec in &ledger.sessions {
        let row = by_id[rec.session_id.as_str()];
        let num = |i: usize| row[i].parse::<i64>().unwrap();
        let (cycles, adjustment) = (num(1), num(2));
        assert_eq!(
            i128::from(cycles) + i128::from(adjustment),
            i128::from(rec.charge_minor) * 1_000_000,
            "session {}: its cycles {cycles} and settlement {adjustment} micro against its \
             charge of {} minor",
            rec.session_id,
            rec.charge_minor
        );
        // A session that was watched across a kill, charged by cycles:
        // what the crashes were meant to hit.
        let (started, ended) = (num(3), num(4));
        if cycles > 0 && kills.iter().any(|&k| started < k && k < ended) {
            spanning_kills += 1;
        }
    }
    eprintln!(
        "bill-crash: {} sessions, {spanning_kills} charged by cycles and watched across a \
         kill, total {} minor",
        ledger.sessions.len(),
        ledger.sessions.iter().map(|r| r.charge_minor).sum::<u64>()
    );
    assert!(
        spanning_kills >= 2,
        "only {spanning_kills} sessions charged by cycles were watched across a kill: the \
         crashes did not hit charged sessions"
    );
    let started_runs = env.agent().log().matches("=== ").count();
    assert_eq!(started_runs, 5, "agent runs in the log");
}
