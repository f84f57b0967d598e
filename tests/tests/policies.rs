//! Account policies end to end, asked the way a streaming server asks:
//! `GET /v1/authorize` on the agent's unix socket with nginx's headers
//! (no nginx here: the admission tests run the real one), and a UDP flow of
//! a prepaid account cut off in the kernel.
//!
//! The truths: the traffic tool's own counts (bytes each client received,
//! what the server logged) and the charges computed here from the tariff.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    thread,
    time::Duration,
};

use meterd_tests::{
    AgentConfig, Setup, Source, TcpClient, TestEnv, UdpClient, http,
    ledger::sqlite,
    port,
    process::wait_until,
    read_started,
    tariff::{Direction, Rounding, Service, Tariff},
    traffic_bin,
};

/// 5 minor units per started MB (10^6 bytes) delivered.
fn vod(tcp: &[u16], udp: &[u16]) -> Service {
    Service {
        udp_ports: udp.to_vec(),
        ..Service::tcp(
            "vod",
            tcp,
            Tariff::volume(
                5,
                ("1MB", 1_000_000),
                Direction::Egress,
                Rounding::PerStartedUnit,
            ),
        )
    }
}

/// `GET /v1/authorize` as nginx's `auth_request` sends it: (status,
/// `X-Meterd-Reason`).
fn authorize(socket: &Path, client: SocketAddr, server_port: u16, account: &str) -> (u16, String) {
    let r = http::get_unix(
        socket,
        "/v1/authorize",
        &[
            format!("X-Meterd-Client: {client}"),
            format!("X-Meterd-Server-Port: {server_port}"),
            format!("X-Meterd-Account: {account}"),
        ],
    )
    .unwrap_or_else(|e| panic!("GET /v1/authorize on {}: {e}", socket.display()));
    (
        r.status,
        r.header("x-meterd-reason").unwrap_or_default().to_owned(),
    )
}

/// A download of `size` bytes in 1 MB steps `pause_ms` apart that may be
/// cut off; returns it running and its client address and port.
fn download(
    env: &TestEnv,
    at: SocketAddr,
    size: u64,
    pause_ms: u64,
    name: &str,
) -> (meterd_tests::RunningClient, SocketAddr) {
    let started = env.dir().join(format!("{name}.started"));
    let c = env.spawn_tcp_client(&TcpClient {
        chunk: 1_000_000,
        pause_ms,
        started_file: Some(started.clone()),
        source: Source::Addr(env.fresh_source()),
        until_cut: true,
        ..TcpClient::new(at, size, 0)
    });
    assert!(
        wait_until(Duration::from_secs(15), || started.exists()),
        "{name}'s download did not start"
    );
    (c, read_started(&started))
}

/// `blocked = true` is refused with reason `blocked` from the first
/// request and bills nobody; `on_limit = "deny"` lets the request that
/// crossed the limit finish (no cut) and refuses the next with
/// `limit_reached`; an account in good standing is admitted.
#[test]
fn blocked_and_deny_accounts_are_refused() {
    let Some(mut env) = TestEnv::new("pol-deny", traffic_bin!(), Setup::default()) else {
        return;
    };
    let at = SocketAddr::from((Ipv4Addr::LOCALHOST, port(0, 0)));
    env.start_agent(AgentConfig {
        services: vec![Service {
            // Only what /v1/authorize admitted is billed: a refused
            // request's bytes bill nobody, not its client address.
            bill_unattributed: Some(false),
            ..vod(&[at.port()], &[])
        }],
        extra_toml: "\n[[account]]\nid = \"mallory\"\nprepaid_minor = 1000\nblocked = true\n\
                     \n[[account]]\nid = \"dave\"\nprepaid_minor = 10\non_limit = \"deny\"\n\
                     \n[[account]]\nid = \"erin\"\nprepaid_minor = 1000\n"
            .to_owned(),
        ..AgentConfig::default()
    });
    let server = env.tcp_server(&[at]);
    let socket = env.agent().ready().api;
    let socket = Path::new(&socket).to_owned();

    let (mallory, m_addr) = download(&env, at, 2_000_000, 100, "mallory");
    assert_eq!(
        authorize(&socket, m_addr, at.port(), "mallory"),
        (403, "blocked".to_owned())
    );
    let (erin, e_addr) = download(&env, at, 2_000_000, 100, "erin");
    assert_eq!(authorize(&socket, e_addr, at.port(), "erin").0, 204);
    // dave: 4 MB at 5 a MB is 20, over his 10; deny lets it finish.
    let (dave, d_addr) = download(&env, at, 4_000_000, 200, "dave");
    assert_eq!(authorize(&socket, d_addr, at.port(), "dave").0, 204);
    let dave = dave.finish(Duration::from_secs(60));
    assert_eq!(
        dave.connections[0].bytes_received, 4_000_000,
        "deny must not cut the request that crossed the limit"
    );
    let reached = wait_until(Duration::from_secs(15), || {
        !sqlite(
            env.agent_ref().ledger_path(),
            "SELECT 1 FROM ledger_events WHERE kind = 'limit_reached' AND account = 'dave'",
        )
        .is_empty()
    });
    assert!(reached, "dave's limit_reached event");
    let (next, n_addr) = download(&env, at, 100_000, 0, "dave-next");
    assert_eq!(
        authorize(&socket, n_addr, at.port(), "dave"),
        (403, "limit_reached".to_owned())
    );
    let mallory = mallory.finish(Duration::from_secs(60));
    let erin = erin.finish(Duration::from_secs(60));
    let next = next.finish(Duration::from_secs(60));
    let truth = env.tcp_truth(&server, &[&mallory, &erin, &dave, &next]);
    assert_eq!(truth.len(), 4);
    // Settled: erin's and dave's first sessions, exactly; nothing for
    // mallory or dave's refused request, under any name.
    let ledger = wait_until(Duration::from_secs(20), || {
        env.agent_ref().ledger_records().len() >= 2
    });
    assert!(ledger, "sessions did not settle");
    thread::sleep(Duration::from_secs(3));
    let sessions = env.agent_ref().ledger_records();
    let mut billed: Vec<(String, u64, u64)> = sessions
        .iter()
        .map(|s| (s.account.clone(), s.bytes_out, s.charge_minor))
        .collect();
    billed.sort();
    let sent = |addr: SocketAddr| {
        truth
            .iter()
            .find(|c| c.client_addr == addr.ip() && c.client_port == addr.port())
            .map(|c| c.bytes_sent)
            .expect("the server logged it")
    };
    let charge = |bytes: u64| 5 * bytes.div_ceil(1_000_000);
    assert_eq!(
        billed,
        vec![
            ("dave".to_owned(), sent(d_addr), charge(sent(d_addr))),
            ("erin".to_owned(), sent(e_addr), charge(sent(e_addr))),
        ],
        "only what was admitted is billed, to its account"
    );
}

/// A prepaid account's UDP flow: attributed before it starts, charged as
/// it streams, and once over the limit (`cut`, the default) dropped in the
/// kernel: the client stops receiving, the flow is settled, and the cut is
/// recorded.
#[test]
fn a_prepaid_udp_flow_is_cut_in_the_kernel() {
    let Some(mut env) = TestEnv::new("pol-udp", traffic_bin!(), Setup::default()) else {
        return;
    };
    let at = SocketAddr::from((Ipv4Addr::LOCALHOST, port(1, 0)));
    env.start_agent(AgentConfig {
        services: vec![vod(&[], &[at.port()])],
        udp_idle_timeout: Duration::from_secs(3),
        extra_toml: "\n[[account]]\nid = \"ursula\"\nprepaid_minor = 20\n".to_owned(),
        ..AgentConfig::default()
    });
    let server = env.udp_server(&[at]);
    let socket = env.agent().ready().api;
    let source = env.fresh_source();
    let client_port = UdpSocket::bind((source, 0))
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port();
    // Named before the flow starts: pending until its first datagram.
    let body = format!(
        r#"{{"client_addr":"{source}","client_port":{client_port},"server_port":{},"account":"ursula"}}"#,
        at.port()
    );
    let r = http::post_json_unix(Path::new(&socket), "/v1/attribute", &body).expect("attribute");
    assert_eq!(r.status, 200, "{}", r.body);
    // 40 rounds of 250 kB, 250 ms apart: 10 MB over 10 s, 50 minor units
    // in all; ursula's 20 run out after about 4 MB.
    let flow = env.run_udp_until_cut(
        &UdpClient {
            connect: at,
            sizes: vec![64],
            repeat: 1,
            get: 250_000,
            get_size: 1_200,
            get_rounds: 40,
            source: Source::Addr(source),
        },
        client_port,
        250,
    );
    assert!(
        flow.bytes_received < 8_000_000,
        "ursula's flow was not cut: she received {} of 10 MB; agent log:\n{}",
        flow.bytes_received,
        env.agent_ref().log_tail(30)
    );
    assert!(flow.bytes_received >= 3_000_000, "cut too early: {flow:?}");
    let cut = wait_until(Duration::from_secs(20), || {
        !sqlite(
            env.agent_ref().ledger_path(),
            "SELECT 1 FROM ledger_events WHERE kind = 'cut_off' AND account = 'ursula'",
        )
        .is_empty()
    });
    assert!(cut, "no cut_off event for ursula");
    let settled = wait_until(Duration::from_secs(30), || {
        env.agent_ref()
            .ledger_records()
            .iter()
            .any(|s| s.account == "ursula")
    });
    assert!(settled, "ursula's flow never settled");
    // Not `udp_truth`: after the cut the two sides disagree by design (the
    // client's requests were dropped on the way in). The server's own log.
    env.stop_server(&server);
    let truth: Vec<_> = env
        .server_log(&server)
        .into_iter()
        .filter(|c| c.client_port == client_port)
        .collect();
    assert_eq!(truth.len(), 1, "the server logged {truth:?}");
    assert!(
        truth[0].bytes_received < flow.bytes_sent,
        "the client's datagrams after the cut reached the server: {truth:?} against {flow:?}"
    );
    let s: Vec<_> = env
        .agent_ref()
        .ledger_records()
        .into_iter()
        .filter(|s| s.account == "ursula")
        .collect();
    assert_eq!(s.len(), 1, "one session: {s:?}");
    // Billed at least what reached her, at most what the server sent
    // (its datagrams after the cut were dropped on the way out).
    assert!(
        s[0].bytes_out >= flow.bytes_received && s[0].bytes_out <= truth[0].bytes_sent,
        "ursula billed {} bytes; she received {}, the server sent {}",
        s[0].bytes_out,
        flow.bytes_received,
        truth[0].bytes_sent
    );
    assert_eq!(s[0].charge_minor, 5 * s[0].bytes_out.div_ceil(1_000_000));
    assert!(s[0].charge_minor >= 20, "cut before her 20 ran out: {s:?}");
}
