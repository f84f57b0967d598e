//! The fleet (issue 11): two hosts, each its own agent, cgroup, pins,
//! ledger and traffic server, sharing a 3-node NATS JetStream cluster of
//! Debian's nats-server on loopback.
//!
//! The truths: each host's ledger (itself checked against its server's
//! byte log), the stream as a plain NATS client reads it back (duplicates
//! included), and `meterd ledger export` of each host. What must hold: the
//! stream holds exactly the union of the ledgers' outbox records, each
//! once, through a node's kill -9 and an outage of every node; the fleet
//! export is the ledger exports merged; a kill of the agent between the
//! stream's acknowledgement and the mark-shipped step duplicates nothing;
//! a replay after the duplicate window counts once for the consumer; and a
//! prepaid account watched on both hosts stops at the fleet's sum.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use meterd_tests::{
    AgentConfig, Server, Setup, Source, TcpClient, TestEnv,
    agent::meterd_bin,
    http,
    ledger::sqlite,
    nats::{self, Cluster},
    port,
    process::wait_until,
    read_started,
    tariff::{Direction, Rounding, Service, Tariff, service_of_port},
    traffic_bin,
    wire::{ClientSummary, ConnLog},
};

/// `vod`: 5 minor units per started MB (10^6 bytes) delivered.
fn vod(port: u16) -> Service {
    Service::tcp(
        "vod",
        &[port],
        Tariff::volume(
            5,
            ("1MB", 1_000_000),
            Direction::Egress,
            Rounding::PerStartedUnit,
        ),
    )
}

/// One host of the fleet: its own environment (cgroup, pins, ledger),
/// agent and traffic server.
struct Host {
    name: &'static str,
    env: TestEnv,
    at: SocketAddr,
    server: Server,
    services: Vec<Service>,
}

/// Where a host's `[fleet]` points: the cluster, the stream (its bucket
/// is `<stream>_spend`), replicas, and any further lines.
struct FleetOf<'a> {
    cluster: &'a Cluster,
    stream: &'a str,
    replicas: usize,
    extra: String,
}

impl<'a> FleetOf<'a> {
    fn new(cluster: &'a Cluster, stream: &'a str) -> Self {
        FleetOf {
            cluster,
            stream,
            replicas: 3,
            extra: String::new(),
        }
    }

    /// The `[fleet]` table of host `host`.
    fn toml(&self, host: &str) -> String {
        format!(
            "\n[fleet]\nnats_url = {}\nhost_id = \"{host}\"\nstream = \"{stream}\"\n\
             bucket = \"{stream}_spend\"\nreplicas = {}\n{}",
            self.cluster.urls_toml(),
            self.replicas,
            self.extra,
            stream = self.stream,
        )
    }
}

/// Starts a host; `None` when privileged tests are skipped.
fn host(
    test: &str,
    name: &'static str,
    slot: u16,
    fleet: &FleetOf<'_>,
    accounts: Vec<(String, u64)>,
    env_vars: &[(&str, &str)],
) -> Option<Host> {
    let mut env = TestEnv::new(&format!("{test}-{name}"), traffic_bin!(), Setup::default())?;
    let at = SocketAddr::from((Ipv4Addr::LOCALHOST, port(slot, 0)));
    let services = vec![vod(at.port())];
    let config = AgentConfig {
        services: services.clone(),
        accounts,
        extra_toml: fleet.toml(name),
        ..AgentConfig::default()
    };
    // Started by hand for the environment variables.
    env.start_agent_with(config, env_vars);
    let server = env.tcp_server(&[at]);
    Some(Host {
        name,
        env,
        at,
        server,
        services,
    })
}

impl Host {
    fn metric(&self, name: &str) -> f64 {
        self.env
            .agent_ref()
            .scrape()
            .value(name, &[])
            .unwrap_or(f64::NAN)
    }

    /// Short downloads, a connection (and session) each from its own
    /// address, `count` of them over a few seconds.
    fn traffic(&self, count: usize, pause_ms: u64) -> meterd_tests::RunningClient {
        self.env.spawn_tcp_client(&TcpClient {
            count,
            parallel: 2,
            chunk: 100_000,
            pause_ms,
            source: Source::Distinct,
            ..TcpClient::new(self.at, 300_000, 2_000)
        })
    }

    /// Waits for the ledger to match the server's log exactly.
    fn settle(&self, summaries: &[&ClientSummary]) -> Vec<ConnLog> {
        let truth = self.env.tcp_truth(&self.server, summaries);
        let services = self.services.clone();
        self.env.wait_for_exact_ledger(&truth, &move |c: &ConnLog| {
            service_of_port(&services, c.server_port).name.clone()
        });
        truth
    }

    /// Waits until the outbox is empty (every record acknowledged).
    fn drained(&self, within: Duration) {
        let agent = self.env.agent_ref();
        assert!(
            wait_until(within, || self.metric("meterd_outbox_pending") < 0.5),
            "{}: the outbox did not drain within {within:?} (pending {}); agent log:\n{}",
            self.name,
            self.metric("meterd_outbox_pending"),
            agent.log_tail(40)
        );
    }

    /// The ids of every record in this host's outbox.
    fn outbox_ids(&self) -> BTreeSet<String> {
        sqlite(
            self.env.agent_ref().ledger_path(),
            "SELECT record_id FROM fleet_outbox",
        )
        .into_iter()
        .map(|row| row[0].clone())
        .collect()
    }

    /// `meterd ledger export` with this host's name added to each line.
    fn export_with_host(&self) -> Vec<serde_json::Value> {
        self.env
            .agent_ref()
            .export("jsonl")
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                v["host"] = self.name.into();
                v
            })
            .collect()
    }
}

/// `meterd fleet export` with a host's config, as JSON values.
fn fleet_export(host: &Host, format: &str) -> String {
    let out = Command::new(meterd_bin())
        .args(["fleet", "export", "--format", format, "--config"])
        .arg(host.env.agent_ref().config_path())
        .output()
        .expect("run meterd fleet export");
    assert!(
        out.status.success(),
        "meterd fleet export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn sorted(mut v: Vec<serde_json::Value>) -> Vec<String> {
    let mut s: Vec<String> = v.drain(..).map(|v| v.to_string()).collect();
    s.sort();
    s
}

/// The checks of every fleet test: the stream holds each ledger record
/// exactly once (`once`; else at least once), and the fleet export is the
/// ledger exports merged.
fn check_fleet(cluster: &Cluster, stream: &str, hosts: &[&Host], once: bool) {
    let mut want = BTreeSet::new();
    for h in hosts {
        let ids = h.outbox_ids();
        let sessions = ids.iter().filter(|id| id.contains(":session:")).count();
        assert_eq!(
            sessions,
            h.env.agent_ref().ledger_records().len(),
            "{}: a session record in the outbox per settled session",
            h.name
        );
        want.extend(ids);
    }
    let stored = nats::read_stream(&cluster.urls(), stream);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in &stored {
        let id = m.payload["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            m.msg_id.as_deref().is_some_and(|mid| mid.starts_with(&id)),
            "message {} has Nats-Msg-Id {:?}, not its record id {id}",
            m.sequence,
            m.msg_id
        );
        *counts.entry(id).or_default() += 1;
    }
    let got: BTreeSet<String> = counts.keys().cloned().collect();
    let missing: Vec<&String> = want.difference(&got).collect();
    let extra: Vec<&String> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the stream against the ledgers: missing {missing:?}, not in any ledger {extra:?}"
    );
    if once {
        let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "records in the stream more than once: {twice:?}"
        );
    }
    let merged: Vec<serde_json::Value> = hosts.iter().flat_map(|h| h.export_with_host()).collect();
    let exported: Vec<serde_json::Value> = fleet_export(hosts[0], "jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        sorted(exported),
        sorted(merged),
        "meterd fleet export against the ledger exports merged"
    );
    let csv = fleet_export(hosts[0], "csv");
    let header = csv.lines().next().unwrap_or_default();
    assert!(header.ends_with(",currency,host"), "CSV header: {header}");
    assert_eq!(
        csv.lines().count() - 1,
        hosts
            .iter()
            .map(|h| h.env.agent_ref().ledger_records().len())
            .sum::<usize>(),
        "CSV rows"
    );
}

fn connected(hosts: &[&Host]) {
    for h in hosts {
        assert!(
            wait_until(Duration::from_secs(30), || h
                .metric("meterd_fleet_connected")
                > 0.5),
            "{}: not connected to NATS; agent log:\n{}",
            h.name,
            h.env.agent_ref().log_tail(40)
        );
    }
}

#[test]
fn records_reach_the_stream_once_through_a_node_kill() {
    let Some(dir) = meterd_tests::env::scratch_dir("fleet-node") else {
        return;
    };
    let mut cluster = Cluster::start(dir.path(), 3, 0);
    let stream = "FLEETNODE";
    let fleet = FleetOf::new(&cluster, stream);
    let Some(a) = host("fleet-node", "host-a", 0, &fleet, vec![], &[]) else {
        return;
    };
    let Some(b) = host("fleet-node", "host-b", 1, &fleet, vec![], &[]) else {
        return;
    };
    connected(&[&a, &b]);
    let (ta, tb) = (a.traffic(40, 60), b.traffic(40, 60));
    thread::sleep(Duration::from_secs(3));
    // The stream's leader, where publishes go: its loss moves the leader.
    let leader = nats::stream_leader(&cluster.urls(), stream).expect("the stream has a leader");
    eprintln!("fleet-node: kill -9 of the stream leader {leader}");
    cluster.kill_node(cluster.index_of(&leader));
    thread::sleep(Duration::from_secs(4));
    cluster.start_node(cluster.index_of(&leader));
    let (sa, sb) = (
        ta.finish(Duration::from_secs(120)),
        tb.finish(Duration::from_secs(120)),
    );
    assert_eq!(a.settle(&[&sa]).len(), 40);
    assert_eq!(b.settle(&[&sb]).len(), 40);
    a.drained(Duration::from_secs(60));
    b.drained(Duration::from_secs(60));
    check_fleet(&cluster, stream, &[&a, &b], true);
}

#[test]
fn an_outage_of_every_node_is_drained_after() {
    let Some(dir) = meterd_tests::env::scratch_dir("fleet-outage") else {
        return;
    };
    let mut cluster = Cluster::start(dir.path(), 3, 2);
    let stream = "FLEETOUT";
    let fleet = FleetOf::new(&cluster, stream);
    let Some(a) = host("fleet-outage", "host-a", 2, &fleet, vec![], &[]) else {
        return;
    };
    let Some(b) = host("fleet-outage", "host-b", 3, &fleet, vec![], &[]) else {
        return;
    };
    connected(&[&a, &b]);
    // ~40 s of short sessions on each host.
    let (ta, tb) = (a.traffic(60, 600), b.traffic(60, 600));
    thread::sleep(Duration::from_secs(3));
    cluster.kill_all();
    let down = Instant::now();
    let settled_before = a.env.agent_ref().ledger_records().len();
    for h in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(15), || h
                .metric("meterd_fleet_connected")
                < 0.5),
            "{}: still says connected with every NATS node down",
            h.name
        );
    }
    assert!(
        wait_until(Duration::from_secs(20), || a
            .metric("meterd_outbox_pending")
            >= 3.0),
        "host-a: the outbox does not grow while NATS is down"
    );
    thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    let settled_during = a.env.agent_ref().ledger_records().len();
    assert!(
        settled_during > settled_before,
        "billing stopped while NATS was down: {settled_before} then {settled_during} sessions"
    );
    assert!(
        a.metric("meterd_fleet_view_age_seconds") >= 10.0,
        "the fleet view's age grows while partitioned"
    );
    cluster.start_all();
    let (sa, sb) = (
        ta.finish(Duration::from_secs(180)),
        tb.finish(Duration::from_secs(180)),
    );
    assert_eq!(a.settle(&[&sa]).len(), 60);
    assert_eq!(b.settle(&[&sb]).len(), 60);
    a.drained(Duration::from_secs(90));
    b.drained(Duration::from_secs(90));
    check_fleet(&cluster, stream, &[&a, &b], true);
}

#[test]
fn a_kill_between_acknowledgement_and_mark_duplicates_nothing() {
    let Some(dir) = meterd_tests::env::scratch_dir("fleet-kill") else {
        return;
    };
    let cluster = Cluster::start(dir.path(), 3, 4);
    let stream = "FLEETKILL";
    let fleet = FleetOf::new(&cluster, stream);
    let held = dir.path().join("held");
    let held_s = held.display().to_string();
    let Some(mut a) = host(
        "fleet-kill",
        "host-a",
        4,
        &fleet,
        vec![],
        &[("METERD_TEST_FLEET_HOLD_AFTER_ACK", held_s.as_str())],
    ) else {
        return;
    };
    connected(&[&a]);
    let t = a.traffic(20, 60);
    assert!(
        wait_until(Duration::from_secs(60), || held.exists()),
        "the agent never reached the window between acknowledgement and mark; log:\n{}",
        a.env.agent_ref().log_tail(40)
    );
    let acked: usize = std::fs::read_to_string(&held)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("fleet-kill: {acked} records acknowledged, not marked; kill -9");
    a.env.agent().kill9();
    a.env
        .agent()
        .set_env("METERD_TEST_FLEET_HOLD_AFTER_ACK", None);
    a.env.agent().start();
    let s = t.finish(Duration::from_secs(120));
    assert_eq!(a.settle(&[&s]).len(), 20);
    a.drained(Duration::from_secs(60));
    assert!(
        a.metric("meterd_outbox_duplicates_total") >= 1.0,
        "the restarted agent did not publish the acknowledged records again (no duplicate acks)"
    );
    check_fleet(&cluster, stream, &[&a], true);
}

#[test]
fn a_replay_after_the_duplicate_window_counts_once() {
    let Some(dir) = meterd_tests::env::scratch_dir("fleet-replay") else {
        return;
    };
    let cluster = Cluster::start(dir.path(), 3, 5);
    let stream = "FLEETREPLAY";
    let fleet = FleetOf::new(&cluster, stream);
    // Made here with a 1 s duplicate window, so a replay 2 s later is
    // past it: the stream stores every record again.
    nats::create_stream(&cluster.urls(), stream, "meterd.>", Duration::from_secs(1));
    let Some(a) = host("fleet-replay", "host-a", 5, &fleet, vec![], &[]) else {
        return;
    };
    connected(&[&a]);
    let s = a.traffic(10, 20).finish(Duration::from_secs(60));
    assert_eq!(a.settle(&[&s]).len(), 10);
    a.drained(Duration::from_secs(60));
    thread::sleep(Duration::from_secs(2));
    let before = a.metric("meterd_outbox_published_total");
    let records = a.outbox_ids().len();
    let out = Command::new(meterd_bin())
        .args(["fleet", "replay", "--config"])
        .arg(a.env.agent_ref().config_path())
        .output()
        .expect("meterd fleet replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[expect(clippy::cast_precision_loss, reason = "a few records")]
    let want = before + records as f64;
    assert!(
        wait_until(Duration::from_secs(60), || a
            .metric("meterd_outbox_published_total")
            >= want),
        "the replayed records were not published again ({} of {want}); log:\n{}",
        a.metric("meterd_outbox_published_total"),
        a.env.agent_ref().log_tail(30)
    );
    a.drained(Duration::from_secs(60));
    let stored = nats::read_stream(&cluster.urls(), stream);
    let sessions = stored
        .iter()
        .filter(|m| m.payload["kind"] == "session")
        .count();
    assert_eq!(
        sessions, 20,
        "the replay stored every session record a second time"
    );
    check_fleet(&cluster, stream, &[&a], false);
}

/// Minor units charged to `account` in a host's ledger.
fn charged(h: &Host, account: &str) -> i64 {
    let rows = sqlite(
        h.env.agent_ref().ledger_path(),
        &format!(
            "SELECT COALESCE(SUM(CASE state WHEN 'open' THEN charged_micro \
             ELSE cycles_micro + adjustment_micro END), 0) FROM viewer_sessions \
             WHERE account = '{account}'"
        ),
    );
    rows[0][0].parse::<i64>().unwrap() / 1_000_000
}

/// Alice's prepaid balance, on both hosts.
const PREPAID: u64 = 100;

#[test]
fn a_prepaid_account_stops_at_the_fleet_sum() {
    let Some(dir) = meterd_tests::env::scratch_dir("fleet-credit") else {
        return;
    };
    let cluster = Cluster::start(dir.path(), 3, 6);
    let stream = "FLEETCREDIT";
    let fleet = FleetOf::new(&cluster, stream);
    let accounts = vec![("alice".to_owned(), PREPAID)];
    let Some(mut a) = host("fleet-credit", "host-a", 6, &fleet, accounts.clone(), &[]) else {
        return;
    };
    let Some(mut b) = host("fleet-credit", "host-b", 7, &fleet, accounts, &[]) else {
        return;
    };
    connected(&[&a, &b]);
    // Alice downloads 30 MB on each host, 1 MB every 500 ms: 10 minor
    // units per second per host, 150 per host in all. Alone, each host
    // would stop her at 100 (200 in all); the fleet stops her at the sum.
    let mut clients = Vec::new();
    for h in [&mut a, &mut b] {
        let started = h.env.dir().join("alice.started");
        let source = h.env.fresh_source();
        let c = h.env.spawn_tcp_client(&TcpClient {
            chunk: 1_000_000,
            pause_ms: 500,
            started_file: Some(started.clone()),
            source: Source::Addr(source),
            until_cut: true,
            ..TcpClient::new(h.at, 30_000_000, 0)
        });
        assert!(wait_until(Duration::from_secs(15), || started.exists()));
        let local = read_started(&started);
        let body = format!(
            r#"{{"client_addr":"{}","client_port":{},"server_port":{},"account":"alice"}}"#,
            local.ip(),
            local.port(),
            h.at.port()
        );
        let api = h.env.agent().ready().api;
        let r = http::post_json_unix(Path::new(&api), "/v1/attribute", &body).expect("attribute");
        assert_eq!(r.status, 200, "{}", r.body);
        clients.push(c);
    }
    let summaries: Vec<ClientSummary> = clients
        .into_iter()
        .map(|c| c.finish(Duration::from_secs(60)))
        .collect();
    let received: Vec<u64> = summaries
        .iter()
        .map(|s| s.connections[0].bytes_received)
        .collect();
    // Both cut off: each got much less than its 30 MB.
    for (h, got) in [&a, &b].iter().zip(&received) {
        assert!(
            *got < 20_000_000,
            "{}: alice received {got} bytes: not cut off at the fleet's limit; log:\n{}",
            h.name,
            h.env.agent_ref().log_tail(30)
        );
    }
    // Settled (the cut ends the sessions), then the fleet's total.
    let mut totals = HashMap::new();
    for h in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(20), || h
                .env
                .agent_ref()
                .ledger_records()
                .iter()
                .any(|s| s.account == "alice")),
            "{}: alice's session never settled",
            h.name
        );
        let events = sqlite(
            h.env.agent_ref().ledger_path(),
            "SELECT kind FROM ledger_events WHERE account = 'alice' ORDER BY kind",
        );
        let kinds: Vec<&str> = events.iter().map(|r| r[0].as_str()).collect();
        assert!(
            kinds.contains(&"limit_reached") && kinds.contains(&"cut_off"),
            "{}: alice's events {kinds:?}",
            h.name
        );
        totals.insert(h.name, charged(h, "alice"));
    }
    let total: i64 = totals.values().sum();
    // The bound (README, Fleet): at most what the other host spent during
    // the fleet view's age (one interval to share, one to apply: 2 s at 10
    // a second) on top of each host's own cycle and cut (1 s each).
    let bound = i64::try_from(PREPAID).unwrap() + 2 * 10 + 2 * 10;
    eprintln!("fleet-credit: charged {totals:?}, {total} in all, limit {PREPAID}, bound {bound}");
    assert!(
        total >= i64::try_from(PREPAID).unwrap(),
        "alice was stopped before her limit: {totals:?}"
    );
    assert!(
        total <= bound,
        "alice spent {total} against a limit of {PREPAID} on the fleet: beyond the bound {bound} ({totals:?})"
    );
}

#[test]
fn tls_and_a_token_to_nats() {
    let Some(dir) = meterd_tests::env::scratch_dir("fleet-tls") else {
        return;
    };
    let (ca, cert, key) = nats::make_certs(dir.path());
    let cluster = Cluster::start_secured(dir.path(), &cert, &key, 8);
    let fleet = FleetOf {
        replicas: 1,
        extra: format!(
            "token = \"{}\"\ntls_ca_file = \"{}\"\n",
            nats::TOKEN,
            ca.display()
        ),
        ..FleetOf::new(&cluster, "FLEETTLS")
    };
    let Some(a) = host("fleet-tls", "host-a", 8, &fleet, vec![], &[]) else {
        return;
    };
    connected(&[&a]);
    let s = a.traffic(5, 20).finish(Duration::from_secs(60));
    assert_eq!(a.settle(&[&s]).len(), 5);
    a.drained(Duration::from_secs(60));
    // The export goes through the same TLS and token (the config's).
    let exported: Vec<serde_json::Value> = fleet_export(&a, "jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        sorted(exported),
        sorted(a.export_with_host()),
        "fleet export over TLS"
    );
}
