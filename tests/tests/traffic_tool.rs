//! The truth checks itself: `meterd-traffic` servers and clients, placed by
//! the harness (cgroup, namespace) but without meterd, must agree on every
//! byte of every connection. If these fail, a kernel-counting failure would
//! say nothing about meterd.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};

use meterd_tests::{
    CloseOrder, Setup, TcpClient, TestEnv, UdpClient, port, traffic_bin,
    wire::{CloseBy, Protocol},
};

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn loopback6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
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
