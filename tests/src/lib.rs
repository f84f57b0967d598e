//! Harness for meterd's privileged end-to-end tests.
//!
//! Owns: the skip policy ([`privilege`]), cgroup v2 groups ([`cgroup`]),
//! network namespaces ([`netns`]), child processes that die with the test
//! ([`process`]), running the agent ([`agent`]), reading and comparing its
//! closed-connection log ([`records`]) and its ledger export ([`ledger`]),
//! the charging rules written out on the test side ([`tariff`]), reading
//! `/metrics` ([`metrics`], over [`http`]), a NATS JetStream cluster for
//! the fleet tests ([`nats`]), a test's own Prometheus
//! ([`prometheus`]), CPU saturation ([`stress`]), a sock_ops program
//! standing for another program on the metered cgroup ([`sockops_probe`]),
//! and a per-test environment that puts all of these together and tears
//! them down on drop, panics included ([`env`]). The truth the tests compare against comes from the
//! `meterd-traffic` binary of this crate, whose wire format is [`wire`],
//! or, for viewing sessions, from Debian's nginx ([`nginx`]) serving an HLS
//! stream to ffmpeg players ([`hls`]), whose access log [`viewing`] turns
//! into the sessions meterd must bill.
//!
//! Does not own: the agent or its eBPF programs; nothing here works around
//! their behaviour.

pub mod admission;
pub mod agent;
pub mod cgroup;
pub mod env;
pub mod hls;
pub mod http;
pub mod ledger;
pub mod live_map;
pub mod metrics;
pub mod nats;
pub mod netns;
pub mod nginx;
pub mod privilege;
pub mod process;
pub mod prometheus;
pub mod records;
pub mod sockops_probe;
pub mod stress;
pub mod tariff;
pub mod viewing;
pub mod wire;

pub use agent::{Agent, AgentConfig, Ready};
pub use env::{
    CloseOrder, RunningClient, Server, Setup, Source, TcpClient, TestEnv, UdpClient, port,
    read_started,
};
pub use records::ClosedRecord;

/// Path of this crate's `meterd-traffic` binary. Only integration tests of
/// this crate get it from cargo, so it is a macro expanded there.
#[macro_export]
macro_rules! traffic_bin {
    () => {
        env!("CARGO_BIN_EXE_meterd-traffic")
    };
}
