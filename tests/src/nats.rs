//! A NATS JetStream cluster of Debian's `nats-server`, on loopback, for the
//! fleet tests: each node with its own store directory, client port and
//! route port; nodes can be killed (`kill -9`), stopped and started again
//! over their stores. Also reads a stream back in full (duplicates
//! included), the independent view of what the fleet holds.
//!
//! Does not own: meterd's fleet code; nothing here goes through it.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    env::port,
    process::{Proc, wait_until},
};

/// Where Debian installs it.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// The client and route ports of node `node` of the test in `slot`:
/// [`port`]`(slot, 1..=8)`, beside the host's server port (index 0). A port
/// bound and released to find a free one lies in the kernel's ephemeral
/// range, where any client socket of a parallel test can take it before
/// nats-server binds it ("bind: address already in use"); these lie below.
fn node_ports(slot: u16, node: usize) -> (u16, u16) {
    let node = u16::try_from(node).expect("a node index");
    assert!(node < 4, "at most 4 nodes fit in a test's port block");
    (port(slot, 1 + 2 * node), port(slot, 2 + 2 * node))
}

struct Node {
    name: String,
    client_port: u16,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// The cluster; every node is killed on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    /// `nats` or `tls`.
    scheme: &'static str,
}

/// The token of [`Cluster::start_secured`].
pub const TOKEN: &str = "meterd-test-token-5f1e";

/// A test CA and a server certificate for 127.0.0.1 signed by it, made
/// with openssl in `dir`: `(ca.pem, server.pem, server.key)`.
pub fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=meterd-test-ca",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&csr);
    fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("san.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

impl Cluster {
    /// Writes the nodes' configs into `dir` and starts them all; waits
    /// until each answers on its client port. The ports are those of the
    /// test's `slot` (see [`port`]).
    pub fn start(dir: &Path, n: usize, slot: u16) -> Cluster {
        assert!(
            Path::new(NATS_SERVER).exists(),
            "{NATS_SERVER} is missing: install Debian's nats-server (cargo xtask test does)"
        );
        let ports: Vec<(u16, u16)> = (0..n).map(|i| node_ports(slot, i)).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r)| format!("nats-route://127.0.0.1:{r}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, route)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.join(format!("nats-{name}"));
            fs::create_dir_all(&store).expect("nats store dir");
            let config = dir.join(format!("nats-{name}.conf"));
            fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                     cluster {{\n  name: meterd-test\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
                    store = store.display(),
                    routes = routes.join(", "),
                ),
            )
            .expect("nats config");
            nodes.push(Node {
                log: dir.join(format!("nats-{name}.log")),
                name,
                client_port: *client,
                config,
                proc: None,
            });
        }
        let mut cluster = Cluster {
            nodes,
            scheme: "nats",
        };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    /// One node that speaks TLS only (a certificate of [`make_certs`]) and
    /// wants the token [`TOKEN`]: `tls://` URLs.
    pub fn start_secured(dir: &Path, cert: &Path, key: &Path, slot: u16) -> Cluster {
        let (client, _) = node_ports(slot, 0);
        let store = dir.join("nats-tls");
        fs::create_dir_all(&store).expect("nats store dir");
        let config = dir.join("nats-tls.conf");
        fs::write(
            &config,
            format!(
                "server_name: t0\nlisten: 127.0.0.1:{client}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                 tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n}}\n\
                 authorization {{\n  token: \"{TOKEN}\"\n}}\n",
                store = store.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .expect("nats config");
        let mut cluster = Cluster {
            nodes: vec![Node {
                log: dir.join("nats-tls.log"),
                name: "t0".to_owned(),
                client_port: client,
                config,
                proc: None,
            }],
            scheme: "tls",
        };
        cluster.start_node(0);
        cluster
    }

    /// `nats://` URLs of every node, for `fleet.nats_url`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}://127.0.0.1:{}", self.scheme, n.client_port))
            .collect()
    }

    /// The URLs as a TOML array.
    pub fn urls_toml(&self) -> String {
        format!(
            "[{}]",
            self.urls()
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Starts (again) node `i` over its store.
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.proc.is_none(), "{} already runs", node.name);
        let mut cmd = std::process::Command::new(NATS_SERVER);
        cmd.arg("-c").arg(&node.config);
        node.proc = Some(Proc::spawn(
            &format!("nats-server {}", node.name),
            &mut cmd,
            &node.log,
        ));
        let port = node.client_port;
        assert!(
            wait_until(Duration::from_secs(15), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "nats-server {} did not listen on {port}; its log:\n{}",
            node.name,
            crate::process::tail(&crate::process::read_lossy(&node.log), 30)
        );
    }

    /// The index of the node named `name` (`n0`, `n1`, ...).
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `kill -9` of node `i`.
    pub fn kill_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut p) = node.proc.take() {
            p.kill();
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }

    /// Starts every node that is not running.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].proc.is_none() {
                self.start_node(i);
            }
        }
    }
}

/// One message of a stream, as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    pub msg_id: Option<String>,
    pub payload: serde_json::Value,
}

/// Every message of `stream`, in order, duplicates included, read with a
/// plain async-nats client (not meterd's code).
pub fn read_stream(urls: &[String], stream: &str) -> Vec<Stored> {
    runtime().block_on(async {
        let client = async_nats::connect(urls).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream).await.expect("the stream exists");
        let info = s.info().await.expect("stream info").clone();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            let Ok(m) = s.get_raw_message(seq).await else {
                continue;
            };
            out.push(Stored {
                sequence: seq,
                subject: m.subject.to_string(),
                msg_id: m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
                payload: serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null),
            });
        }
        out
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The name of the node leading `stream`, once it has one.
pub fn stream_leader(urls: &[String], stream: &str) -> Option<String> {
    runtime().block_on(async {
        let client = async_nats::connect(urls).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream).await.expect("the stream");
        let info = s.info().await.expect("stream info");
        info.cluster.as_ref().and_then(|c| c.leader.clone())
    })
}

/// Creates an R3 stream the way an operator might before meterd runs,
/// with its own duplicate window.
pub fn create_stream(urls: &[String], stream: &str, subjects: &str, duplicate_window: Duration) {
    runtime().block_on(async {
        let client = async_nats::connect(urls).await.expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        // A fresh cluster elects its JetStream leader within seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let created = js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: stream.to_owned(),
                    subjects: vec![subjects.to_owned()],
                    num_replicas: 3,
                    duplicate_window,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("creating stream {stream}: {e}; again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("creating stream {stream}: {e}"),
            }
        }
    });
}
