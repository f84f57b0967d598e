//! The truth checks itself: `meterd-traffic` servers and clients, placed by
//! the harness (cgroup, namespace) but without meterd, must agree on every
//! byte of every connection, come from the client addresses the test asked
//! for, and date their payload plausibly. If these fail, a kernel-counting
//! or billing failure would say nothing about meterd.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
};

use meterd_tests::{
    CloseOrder, Setup, Source, TcpClient, TestEnv, UdpClient, port, traffic_bin,
    wire::{CloseBy, ConnLog, Protocol},
};

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn loopback6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

/// The server's times of one TCP connection are in order: accepted, first
/// payload, last payload, closed; a request line that waited for the server
/// arrived before the server's first read returned it, and the kernel's
/// first payload is the earlier of the two.
fn assert_times_in_order(c: &ConnLog) {
    let times = [
        c.accepted_unix_us,
        c.first_payload_unix_us,
        c.last_payload_unix_us,
        c.closed_unix_us,
    ];
    assert!(
        times.iter().all(Option::is_some) && times.is_sorted(),
        "accepted, first payload, last payload, closed out of order or missing: {c:?}"
    );
    if let Some(arrived) = c.request_arrived_unix_us {
        assert!(
            Some(arrived) <= c.first_payload_unix_us,
            "the request line arrived after the server read it: {c:?}"
        );
    }
    let kernel_first = c.kernel_first_payload_unix_us();
    assert_eq!(
        kernel_first,
        c.request_arrived_unix_us.or(c.first_payload_unix_us),
        "{c:?}"
    );
}

#[test]
fn tcp_client_and_server_agree_in_both_close_orders_v4_and_v6() {
    let Some(mut env) = TestEnv::new("tool-tcp", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (v4, v6) = (loopback4(port(10, 0)), loopback6(port(10, 1)));
    let server = env.tcp_server(&[v4, v6]);
    let clients = [
        TcpClient {
            count: 200,
            parallel: 8,
            close: CloseOrder::Alternate,
            ..TcpClient::new(v4, 3000, 500)
        },
        TcpClient {
            count: 50,
            parallel: 4,
            close: CloseOrder::Client,
            ..TcpClient::new(v6, 0, 0)
        },
        TcpClient::new(v6, 4 << 20, 1 << 20),
        TcpClient {
            close: CloseOrder::Client,
            ..TcpClient::new(v4, 1 << 20, 4 << 20)
        },
    ];
    let summaries = env.run_tcp_clients(&clients);
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    assert_eq!(truth.len(), 252);
    for close in [CloseBy::Server, CloseBy::Client] {
        assert!(
            truth.iter().any(|c| c.close == Some(close)),
            "no connection closed by {close} first"
        );
    }
    // The request line is part of what the server received.
    let empty = truth.iter().find(|c| c.bytes_sent == 0).unwrap();
    assert_eq!(empty.bytes_received, "GET 0 0 client\n".len() as u64);
    assert!(truth.iter().any(|c| c.client_addr.is_ipv6()));
    assert!(truth.iter().any(|c| c.client_addr.is_ipv4()));
    truth.iter().for_each(assert_times_in_order);
}

/// `Source::Distinct` gives every connection a client address of its own,
/// `Source::Addr` one for all, and the server logs what the clients used;
/// a paced upload's payload spans its pauses and not the idle hold that
/// follows it.
#[test]
fn client_addresses_and_payload_times() {
    let Some(mut env) = TestEnv::new("tool-sources", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (tcp, udp) = (loopback4(port(13, 0)), loopback4(port(13, 1)));
    let server = env.tcp_server(&[tcp]);
    let shared = env.fresh_source();
    let clients = [
        TcpClient {
            count: 40,
            parallel: 8,
            close: CloseOrder::Alternate,
            source: Source::Distinct,
            ..TcpClient::new(tcp, 3000, 100)
        },
        TcpClient {
            count: 5,
            parallel: 2,
            source: Source::Addr(shared),
            ..TcpClient::new(tcp, 1000, 0)
        },
        // 6 chunks of 1000 bytes up, 200 ms apart: 1 s of payload, then
        // 700 ms idle before the close.
        TcpClient {
            chunk: 1000,
            pause_ms: 200,
            hold_ms: 700,
            close: CloseOrder::Client,
            source: Source::Distinct,
            ..TcpClient::new(tcp, 20_000, 6000)
        },
    ];
    let summaries = env.run_tcp_clients(&clients);
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    assert_eq!(truth.len(), 46);
    truth.iter().for_each(assert_times_in_order);

    let addrs = |i: usize| -> Vec<IpAddr> {
        summaries[i]
            .connections
            .iter()
            .map(|c| c.client_addr)
            .collect()
    };
    let distinct: BTreeSet<IpAddr> = addrs(0).into_iter().collect();
    assert_eq!(distinct.len(), 40, "Source::Distinct: {distinct:?}");
    assert!(!distinct.contains(&shared) && !distinct.contains(&IpAddr::from(Ipv4Addr::LOCALHOST)));
    assert!(addrs(1).iter().all(|&a| a == shared), "{:?}", addrs(1));
    // What the clients used is what the server saw (tcp_truth matched
    // every connection by address and port).
    let logged: BTreeSet<IpAddr> = truth.iter().map(|c| c.client_addr).collect();
    assert_eq!(logged.len(), 40 + 1 + 1, "{logged:?}");

    let paced = truth.iter().find(|c| c.client_addr == addrs(2)[0]).unwrap();
    let span = paced.payload_span_ms().unwrap();
    assert!(
        (1000..1150).contains(&span),
        "6 chunks 200 ms apart: payload over {span} ms, want ~1000: {paced:?}"
    );
    let idle_tail =
        i64::try_from((paced.closed_unix_us.unwrap() - paced.last_payload_unix_us.unwrap()) / 1000)
            .unwrap();
    assert!(
        idle_tail >= 650,
        "held 700 ms after the last payload, but the server logged it {idle_tail} ms before the \
         close: {paced:?}"
    );

    // UDP: one fresh address for the flow.
    let udp_server = env.udp_server(&[udp]);
    let flow = env.run_udp_client(&UdpClient {
        connect: udp,
        sizes: vec![100, 200],
        repeat: 3,
        get: 5000,
        get_size: 1000,
        get_rounds: 1,
        source: Source::Distinct,
    });
    let udp_truth = env.udp_truth(&udp_server, &[&flow]);
    assert!(
        udp_truth[0]
            .client_addr
            .to_canonical()
            .to_string()
            .starts_with("127.1."),
        "{udp_truth:?}"
    );
    assert_eq!(udp_truth[0].client_addr, flow.client_addr);
}

#[test]
fn servers_run_in_the_cgroup_and_namespace_clients_do_not_leave_it() {
    let setup = Setup {
        netns: true,
        ..Setup::default()
    };
    let Some(mut env) = TestEnv::new("tool-netns", traffic_bin!(), setup) else {
        return;
    };
    let listen = loopback4(port(11, 0));
    let server = env.tcp_server(&[listen]);
    // The server is in the test's cgroup (`tcp_server` asserts that) and its
    // socket lives in the namespace: from the host's loopback it is not there.
    assert!(
        TcpStream::connect(listen).is_err(),
        "server in the namespace is reachable from the host namespace"
    );
    let summary = env.run_tcp_client(&TcpClient {
        count: 20,
        parallel: 4,
        close: CloseOrder::Alternate,
        ..TcpClient::new(listen, 100_000, 20_000)
    });
    let truth = env.tcp_truth(&server, &[&summary]);
    assert_eq!(truth.len(), 20);
    // Its own loopback works, and the namespace's counters are its own.
    let ns = env.netns().unwrap();
    assert!(ns.tcp_counter("ActiveOpens") >= 20);
}

#[test]
fn udp_client_and_server_agree() {
    let Some(mut env) = TestEnv::new("tool-udp", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (v4, v6) = (loopback4(port(12, 0)), loopback6(port(12, 1)));
    let server = env.udp_server(&[v4, v6]);
    let client = |connect| UdpClient {
        connect,
        sizes: vec![0, 1, 100, 1400, 9000],
        repeat: 20,
        get: 300_000,
        get_size: 1200,
        get_rounds: 2,
        source: Source::Kernel,
    };
    let a = env.run_udp_client(&client(v4));
    let b = env.run_udp_client(&client(v6));
    let sent = 20 * (1 + 100 + 1400 + 9000) + 2 * "GET 300000 1200".len() as u64;
    assert_eq!(a.bytes_sent, sent);
    assert_eq!(a.bytes_received, 600_000);
    assert_eq!(a.datagrams_sent, 102);
    let truth = env.udp_truth(&server, &[&a, &b]);
    assert_eq!(truth.len(), 2);
    assert!(truth.iter().all(|c| c.protocol == Protocol::Udp));
}
