//! `cargo xtask demo`: meterd billing a live stream to real players, in
//! about two minutes, on this machine alone.
//!
//! As root, it installs what is missing and builds the agent (release, as
//! `cargo xtask run` does). Then, in a cgroup tree and a network namespace
//! of its own (`sandbox`), all traffic on that namespace's loopback:
//!
//! - ffmpeg encodes a live HLS stream and Debian's nginx serves it on two
//!   ports, asking meterd about every request through the shipped
//!   auth_request snippet (`origin`);
//! - meterd meters nginx's cgroup with a volume-tariff and a time-tariff
//!   service and three accounts, one of which runs out of prepaid credit
//!   during the demo and is cut off (`agent`);
//! - eight ffmpeg players watch ([`PLANS`], `viewer`), each from an
//!   address of its own: mixed accounts, keep-alive or a connection per
//!   segment, one leaving early, one pausing longer than `session_idle`,
//!   three with packet loss;
//! - `meterd status --watch` shows the live table, with the demo's events
//!   under it (`play`).
//!
//! After [`WATCH`] (or Ctrl-C) the viewers stop, the last viewing sessions
//! settle, and the demo writes `target/demo/`: the ledger export (sessions
//! and connections), nginx's access log, a timeline SVG (`timeline`) and a
//! report (`report`) that compares, per viewer, the bytes nginx logged
//! with those meterd counted. Every piece of the sandbox is a guard, so
//! errors and Ctrl-C also leave nothing behind (no namespace, cgroup, pin,
//! nft table or process), and the demo checks that at the end.

mod agent;
mod origin;
mod play;
mod report;
mod sandbox;
mod timeline;
mod viewer;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::setup::{self, Scope};
use crate::{ebpf, util};
use agent::{Agent, Layout};
use origin::AccessLog;
use play::Play;
use report::{Collected, Outcome};
use sandbox::{Cgroups, NetNs, Proc, in_cgroup};
use viewer::Viewer;

/// The name of the demo's cgroup tree, network namespace and pin dir.
const NAME: &str = "meterd-demo";
/// The nftables table in the namespace: viewers' addresses and losses.
const NFT_TABLE: &str = "meterd_demo";
/// How long the viewers watch.
const WATCH: Duration = Duration::from_secs(75);
/// How long the last sessions may take to settle after the viewers left
/// (`session_idle` and a cycle, with room for a loaded machine).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A viewer is stopped this long (seconds) after a segment request of its
/// ended: the response is delivered and acknowledged by then, so nginx's
/// count is what the player got, and its next request is 2 s away.
const AFTER_SEGMENT: f64 = 0.5;
/// How long (seconds) a cue waits for that segment request before it acts
/// anyway (a player that only gets 403s fetches none).
const CUE_PATIENCE: f64 = 5.0;
/// Without a terminal, a table is printed at 10 s and then this often
/// (seconds), not every second.
const PLAIN_FRAME_EVERY: f64 = 30.0;
/// Players start this far apart (seconds), not all in one instant.
const STAGGER: f64 = 0.5;

/// Which of meterd's two services (nginx ports) a viewer watches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Service {
    /// 1 cent per started 100 kB.
    Volume,
    /// 2 cents per started 10 s.
    Time,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Volume => "volume",
            Service::Time => "time",
        }
    }

    fn port(self) -> u16 {
        match self {
            Service::Volume => origin::VOLUME_PORT,
            Service::Time => origin::TIME_PORT,
        }
    }
}

/// What a viewer does besides watching.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cue {
    /// Watches to the end.
    Watch,
    /// Leaves (its player killed) after its first segment past `at` s.
    Leave { at: f64 },
    /// Stopped (SIGSTOP, its connection left open) after its first segment
    /// past `at` s, continued at `resume` s: longer than `session_idle`,
    /// so it has two viewing sessions.
    Pause { at: f64, resume: f64 },
}

/// One viewer of the demo.
#[derive(Debug)]
struct Plan {
    name: &'static str,
    account: &'static str,
    service: Service,
    /// The content meterd keys the session with (all are the same stream).
    channel: &'static str,
    /// One persistent connection, or a new one per request
    /// (`-http_persistent 0`).
    keep_alive: bool,
    /// Share of its packets dropped (both directions), in percent.
    loss_percent: u32,
    cue: Cue,
}

/// The audience: alice (postpaid) and bob (prepaid, ample) on both
/// services; carol's two viewers spend her 25 prepaid cents in about 40 s.
const PLANS: [Plan; 8] = [
    Plan {
        name: "v1",
        account: "alice",
        service: Service::Volume,
        channel: "news",
        keep_alive: true,
        loss_percent: 0,
        cue: Cue::Watch,
    },
    Plan {
        name: "v2",
        account: "alice",
        service: Service::Time,
        channel: "news",
        keep_alive: false,
        loss_percent: 0,
        cue: Cue::Watch,
    },
    Plan {
        name: "v3",
        account: "bob",
        service: Service::Volume,
        channel: "sport",
        keep_alive: false,
        loss_percent: 2,
        cue: Cue::Watch,
    },
    Plan {
        name: "v4",
        account: "bob",
        service: Service::Time,
        channel: "sport",
        keep_alive: true,
        loss_percent: 0,
        cue: Cue::Leave { at: 30.0 },
    },
    Plan {
        name: "v5",
        account: "carol",
        service: Service::Volume,
        channel: "movies",
        keep_alive: true,
        loss_percent: 0,
        cue: Cue::Watch,
    },
    Plan {
        name: "v6",
        account: "carol",
        service: Service::Time,
        channel: "movies",
        keep_alive: false,
        loss_percent: 1,
        cue: Cue::Watch,
    },
    Plan {
        name: "v7",
        account: "alice",
        service: Service::Volume,
        channel: "music",
        keep_alive: true,
        loss_percent: 0,
        cue: Cue::Pause {
            at: 20.0,
            resume: 35.0,
        },
    },
    Plan {
        name: "v8",
        account: "bob",
        service: Service::Volume,
        channel: "kids",
        keep_alive: true,
        loss_percent: 2,
        cue: Cue::Watch,
    },
];

impl Plan {
    /// How it plays, in a few words.
    fn describe(&self) -> String {
        let mut how = if self.keep_alive {
            "keep-alive".to_owned()
        } else {
            "conn per segment".to_owned()
        };
        if self.loss_percent > 0 {
            let _ = write!(how, ", {}% loss", self.loss_percent);
        }
        match self.cue {
            Cue::Watch => {}
            Cue::Leave { at } => {
                let _ = write!(how, ", leaves at {at:.0} s");
            }
            Cue::Pause { at, resume } => {
                let _ = write!(how, ", pauses {at:.0}-{resume:.0} s");
            }
        }
        how
    }
}

/// `cargo xtask demo`.
pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!(
            "the demo loads meterd's eBPF programs and makes cgroups and a network namespace, \
             which needs root: run `cargo xtask demo` as root"
        );
    }
    let began = Instant::now();
    setup::run(Scope::Full)?;
    let bin = ebpf::build_agent_release("the demo runs the optimised agent")?;
    let dir = util::target_dir().join("demo");
    // From here on Ctrl-C is a flag: the demo stops its viewers, settles,
    // reports and removes what it made.
    sandbox::catch_interrupts();
    let outcome = demo(&bin, &dir)?;
    let left = leftovers(&dir);
    if left.is_empty() {
        util::note(
            "left nothing behind: no network namespace, cgroup, pin, nft table, API socket or \
             process of the demo remains",
        );
    } else {
        util::note(format!("WARNING: still there: {}", left.join(", ")));
    }
    let report = outcome.report(began.elapsed());
    let report_path = dir.join("report.txt");
    fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    print!("{report}");
    Ok(())
}

/// Where the demo's files go.
fn layout(dir: &Path, cgroups: &Cgroups) -> Layout {
    Layout {
        config: dir.join("meterd.toml"),
        cgroup: cgroups.root().join("nginx"),
        pin_dir: PathBuf::from("/sys/fs/bpf").join(NAME),
        api_socket: PathBuf::from(format!("/run/meterd/{NAME}.sock")),
        ledger: dir.join("ledger.sqlite"),
        ready_file: dir.join("meterd.ready"),
        log: dir.join("logs/meterd.log"),
    }
}

/// What the demo made that still exists.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let netns = Path::new("/var/run/netns").join(NAME);
    let pins = PathBuf::from("/sys/fs/bpf").join(NAME);
    let socket = PathBuf::from(format!("/run/meterd/{NAME}.sock"));
    for path in [netns, pins, socket, dir.join("live")] {
        if path.exists() {
            left.push(path.display().to_string());
        }
    }
    if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
        for line in mounts.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(_), Some(root), Some("cgroup2")) =
                (fields.next(), fields.next(), fields.next())
            {
                let cgroup = Path::new(root).join(NAME);
                if cgroup.exists() {
                    left.push(cgroup.display().to_string());
                }
            }
        }
    }
    left
}

/// Sets up the sandbox, plays, and collects the outcome. The guards
/// declared here are dropped when it returns (also on an error), in
/// reverse order of declaration: the watcher, nginx, the agent (stopped,
/// then `meterd unload`), the encoder, the viewers, the namespace (with
/// its nft table) and the cgroups, whose cgroup.kill ends anything left.
#[expect(
    clippy::too_many_lines,
    reason = "the demo's steps, read top to bottom"
)]
fn demo(bin: &Path, dir: &Path) -> Result<Outcome> {
    util::step(
        format!("starting afresh in {}", dir.display()),
        "the demo's config, ledger, logs and results go there",
    );
    let _ = fs::remove_dir_all(dir);
    let logs = dir.join("logs");
    let live = dir.join("live");
    for d in [&logs, &live, &dir.join("nginx")] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    let mut cgroups = Cgroups::create(NAME)?;
    let netns = NetNs::create(NAME)?;
    util::step(
        format!(
            "made cgroup {} and network namespace {NAME}",
            cgroups.root().display()
        ),
        "nginx, meterd and each viewer get a cgroup of their own; all traffic stays on the \
         namespace's loopback",
    );
    let nginx_cgroup = cgroups.child("nginx")?;
    let agent_cgroup = cgroups.child("agent")?;
    let encoder_cgroup = cgroups.child("encoder")?;
    let mut viewers = Vec::new();
    for (i, plan) in PLANS.iter().enumerate() {
        viewers.push(Viewer::new(plan, i, cgroups.child(plan.name)?, &logs));
    }
    let script = nft_script(&viewers, |name| cgroups.nft_match(name));
    netns.nft(&dir.join("viewers.nft"), &script)?;
    util::step(
        "gave each viewer its address, 127.0.0.11 to .18, and 1-2% packet loss to v3, v6 and v8",
        "nft: a mark for the sockets of the viewer's cgroup, SNAT by mark, random drops by \
         conntrack mark",
    );

    util::step(
        "starting the live encoder: ffmpeg, 320x240 test pattern, 300 kbit/s, 2 s HLS segments",
        "a live stream made on the spot, written where nginx serves it",
    );
    let encoder = Proc::spawn(
        "ffmpeg encoder",
        &mut in_cgroup(&encoder_cgroup, &origin::encoder_command(&live)),
        &logs.join("encoder.log"),
    )?;

    let layout = layout(dir, &cgroups);
    agent::write_config(&layout)?;
    let mut agent = Agent::new(bin, &layout);
    util::step(
        format!("starting meterd with {}", layout.config.display()),
        "volume tariff on :8081, time tariff on :8082; alice, bob and carol, carol with 25 cents \
         prepaid; session_idle 5 s",
    );
    let mut run = netns.enter(&bin.display().to_string());
    run.arg("run")
        .arg("--config")
        .arg(&layout.config)
        .arg("--ready-file")
        .arg(&layout.ready_file);
    agent.start(&mut in_cgroup(&agent_cgroup, &run))?;

    let conf = origin::write_nginx_config(
        &dir.join("nginx"),
        &live,
        &layout.api_socket,
        &dir.join("access.log"),
    )?;
    sandbox::output(
        netns
            .exec("nginx")
            .args(origin::nginx_args(&conf))
            .arg("-t"),
    )
    .context("checking the demo's nginx config (nginx -t)")?;
    util::step(
        "starting nginx (workers as www-data) with the shipped auth_request snippet",
        "every request asks meterd, which attributes the connection to the account in the URL",
    );
    let mut nginx = Proc::spawn(
        "nginx",
        &mut in_cgroup(
            &nginx_cgroup,
            netns.exec("nginx").args(origin::nginx_args(&conf)),
        ),
        &logs.join("nginx.log"),
    )?
    .stop_with(libc::SIGQUIT);
    let pid_file = dir.join("nginx/nginx.pid");
    let up = sandbox::wait_until(Duration::from_secs(15), || {
        nginx.try_wait().is_some()
            || (pid_file.exists() && sandbox::cgroup_pids(&nginx_cgroup) >= 2)
    });
    sandbox::check_interrupted()?;
    if !up || nginx.try_wait().is_some() {
        bail!(
            "nginx did not start; its error log:\n{}",
            agent::tail(&dir.join("nginx/error.log"), 15)
        );
    }
    let streaming = sandbox::wait_until(Duration::from_secs(30), || {
        origin::live_segments(&live) >= 3
    });
    sandbox::check_interrupted()?;
    if !streaming {
        bail!(
            "the encoder made no 3 segments in 30 s; the end of its log:\n{}",
            agent::tail(&logs.join("encoder.log"), 10)
        );
    }

    util::step(
        format!(
            "playing for {} s: 8 ffmpeg players, then the report; Ctrl-C ends it early",
            WATCH.as_secs()
        ),
        "`meterd status --watch --sort account` shows the live table, the demo's events under \
         it",
    );
    let mut watch = Command::new(bin);
    watch
        .args(["status", "--watch", "--sort", "account", "--config"])
        .arg(&layout.config);
    let (mut watcher, stdout) = Proc::spawn_piped(
        "meterd status --watch",
        &mut watch,
        &logs.join("status.log"),
    )?;
    let mut play = Play::new(&dir.join("access.log"), watch_frames(stdout));
    play.run(&mut viewers, &netns, &mut agent)?;
    play.settle(&viewers, &mut agent)?;
    play.screen.finish();
    let viewing_ended = play.stopped_at.unwrap_or_else(|| play.t());
    let end = play.t();

    // What only the running sandbox can say.
    watcher.stop(Duration::from_secs(2));
    let status = agent.status()?;
    let mut dropped = HashMap::new();
    for v in viewers.iter().filter(|v| v.plan.loss_percent > 0) {
        dropped.insert(v.plan.name, loss_counter(&netns, v.plan.name)?);
    }
    util::step(
        "stopping the encoder, nginx and meterd",
        "meterd commits its ledger and exits 0 on SIGTERM",
    );
    drop(encoder);
    nginx.stop(Duration::from_secs(5));
    agent.stop()?;

    util::step(
        "exporting the ledger: sessions.csv and connections.csv",
        "`meterd ledger export --config F [--connections]`",
    );
    let sessions_csv = agent.export("csv", false)?;
    let connections_csv = agent.export("csv", true)?;
    fs::write(dir.join("sessions.csv"), &sessions_csv)?;
    fs::write(dir.join("connections.csv"), &connections_csv)?;
    let sessions: Vec<agent::SessionRecord> = agent::parse_jsonl(&agent.export("jsonl", false)?)?;
    let connections: Vec<agent::ConnectionRecord> =
        agent::parse_jsonl(&agent.export("jsonl", true)?)?;
    let events = agent.events()?;
    let requests = AccessLog::new(&dir.join("access.log")).poll();
    let _ = fs::remove_dir_all(&live);

    let outcome = Outcome::collect(
        &viewers,
        &play,
        &Collected {
            status,
            sessions,
            connections,
            events,
            requests,
            dropped,
            watched: viewing_ended,
            end,
        },
    );
    let svg = dir.join("timeline.svg");
    timeline::draw(
        &svg,
        "cargo xtask demo: 8 viewers of a live HLS stream, billed by meterd",
        &outcome.lines,
        &timeline::Marks {
            cut: outcome
                .cut_at
                .map(|t| (t, format!("{} cut off", agent::CUT_ACCOUNT))),
            interval: play.samples.iter().map(|s| (s.t, s.interval.0)).collect(),
            end,
        },
    )?;
    util::step(
        "cleaning up: viewers, nginx, meterd (`meterd unload`), the namespace with its nft \
         table, the cgroups",
        "the demo leaves nothing behind",
    );
    Ok(outcome)
}

/// The nft script that gives each viewer its source address and some of
/// them packet loss. Marks are set in output, where `socket cgroupv2` may
/// be used, and copied to the connection; NAT rewrites the source in
/// postrouting; drops are on the receiving side (input), so they are real
/// losses that TCP retransmits (a drop in the sender's own output hook is
/// only a local send error).
/// `socket_match` is the nft match for the sockets of a viewer's cgroup.
fn nft_script(viewers: &[Viewer], socket_match: impl Fn(&str) -> String) -> String {
    let mut script = format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain viewer_mark {{ type filter hook output priority filter; policy accept; }}\n\
         \tchain viewer_source {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         \tchain viewer_loss {{ type filter hook input priority filter; policy accept; }}\n\
         }}\n"
    );
    for v in viewers {
        let (name, mark) = (v.plan.name, v.mark);
        let _ = writeln!(
            script,
            "add rule ip {NFT_TABLE} viewer_mark {} meta mark set {mark:#x} ct mark set {mark:#x}",
            socket_match(name)
        );
        let _ = writeln!(
            script,
            "add rule ip {NFT_TABLE} viewer_source meta mark {mark:#x} snat to {}",
            v.source
        );
        if v.plan.loss_percent > 0 {
            let _ = writeln!(script, "add counter ip {NFT_TABLE} loss_{name}");
            let _ = writeln!(
                script,
                "add rule ip {NFT_TABLE} viewer_loss ct mark {mark:#x} numgen random mod 100 < {} \
                 counter name loss_{name} drop",
                v.plan.loss_percent
            );
        }
    }
    script
}

/// Packets nft dropped of viewer `name`.
fn loss_counter(netns: &NetNs, name: &str) -> Result<u64> {
    let text = netns.nft_output(&["list", "counter", "ip", NFT_TABLE, &format!("loss_{name}")])?;
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in nft's counter loss_{name}: {text}"))
}

/// The tables `meterd status --watch` prints (not on a terminal: one per
/// second, each followed by an empty line), from a thread of their own.
fn watch_frames(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut frame = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !line.is_empty() {
                frame.push_str(&line);
                frame.push('\n');
            } else if !frame.is_empty() && tx.send(std::mem::take(&mut frame)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Counts as f64, for plotting and sums of cents.
#[expect(
    clippy::cast_precision_loss,
    reason = "byte and cent counts of a demo, far below 2^52"
)]
fn u64_f64(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewers() -> Vec<Viewer> {
        PLANS
            .iter()
            .enumerate()
            .map(|(i, plan)| Viewer::new(plan, i, PathBuf::from("/cg"), Path::new("/logs")))
            .collect()
    }

    #[test]
    fn each_viewer_gets_its_address_and_some_their_loss() {
        let script = nft_script(&viewers(), |name| {
            format!("socket cgroupv2 level 2 \"d/{name}\"")
        });
        assert!(script.contains(
            "add rule ip meterd_demo viewer_mark socket cgroupv2 level 2 \"d/v1\" meta mark set \
             0x6d000001 ct mark set 0x6d000001\n"
        ));
        assert!(script.contains("viewer_source meta mark 0x6d000008 snat to 127.0.0.18\n"));
        assert!(script.contains(
            "viewer_loss ct mark 0x6d000003 numgen random mod 100 < 2 counter name loss_v3 drop"
        ));
        assert_eq!(script.matches("snat to").count(), 8);
        assert_eq!(script.matches("numgen random").count(), 3);
    }

    #[test]
    fn the_audience_is_as_documented() {
        let v = viewers();
        assert_eq!(v[0].url(), "http://127.0.0.1:8081/alice/news/index.m3u8");
        assert_eq!(v[3].plan.describe(), "keep-alive, leaves at 30 s");
        assert_eq!(v[2].plan.describe(), "conn per segment, 2% loss");
        // Every viewing session key (service, account, content) is one
        // viewer's, so that each line of the timeline is one player.
        let mut keys: Vec<_> = PLANS
            .iter()
            .map(|p| (p.service.name(), p.account, p.channel))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), PLANS.len());
        assert!(PLANS.iter().any(|p| p.account == agent::CUT_ACCOUNT));
    }

    #[test]
    fn the_nginx_config_asks_the_demo_agent() {
        let dir = std::env::temp_dir().join(format!("meterd-demo-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let conf = origin::write_nginx_config(
            &dir,
            Path::new("/live"),
            Path::new("/run/meterd/x.sock"),
            Path::new("/a.log"),
        )
        .unwrap();
        let text = fs::read_to_string(&conf).unwrap();
        let snippet = fs::read_to_string(dir.join("meterd.conf")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(snippet.contains("proxy_pass http://unix:/run/meterd/x.sock:/v1/authorize;"));
        assert!(!snippet.contains("unix:/run/meterd/meterd.sock"));
        assert_eq!(text.matches("auth_request /_meterd;").count(), 2);
        assert!(text.contains("listen 127.0.0.1:8081;") && text.contains("listen 127.0.0.1:8082;"));
        assert!(text.contains("user www-data;"));
    }
}
