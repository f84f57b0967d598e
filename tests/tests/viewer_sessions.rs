//! Viewing sessions end to end (issue 9, "What it must show" 1 to 4):
//! Debian's nginx, in the metered cgroup, serves an HLS VOD that Debian's
//! ffmpeg made (12 segments of 2 s) to real players: ffmpeg at real-time
//! pace, each from its own loopback address (see `meterd_tests::hls`), and,
//! where the test must attribute a connection before its first byte, a
//! scripted HLS client in the test process.
//!
//! The truth is nginx's own access log (`meterd_tests::nginx`): per
//! request, the bytes it sent (`$bytes_sent`, headers included: TCP
//! payload) and read, and when it started and ended. `meterd_tests::viewing`
//! turns it into viewing sessions (per service and viewer, split at gaps of
//! `session_idle` or more) and compares them with `meterd ledger export`
//! and `meterd ledger export --connections`: sessions per viewer, bytes
//! exact, watching time within 0.5 s, the charge of the tariff applied once
//! to each session's totals (computed by `meterd_tests::tariff`, not by
//! meterd), every connection's bytes exact and in exactly one session.
//!
//! Timing, chosen so every gap is far from `session_idle` (5 s): ffmpeg
//! fetches a segment every 2 s; a pausing viewer is stopped for 8 s; nginx
//! keeps idle keep-alive connections 20 s (longer than the pause, so the
//! paused viewer's connections stay open; players close theirs when they
//! finish, which lets sessions settle). The time tariff is 0.5 minor units
//! per second, pro rata: sessions last whole numbers of 2 s segments, so
//! each charge sits half a unit from a rounding edge, and the same traffic
//! must cost the same whatever the jitter (test 2).

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use meterd_tests::{
    AgentConfig, Setup, TestEnv,
    hls::{Audience, FfmpegPlayer, Role, ScriptedConn, ScriptedViewer, Vod, unix_ms_now},
    nginx::{Nginx, NginxConfig},
    port,
    tariff::{Direction, Rounding, Service, Tariff},
    traffic_bin,
    viewing::{Attribution, Matched, Truth, attribute, wait_for_sessions},
};

/// `session_idle` of both services.
const SESSION_IDLE: Duration = Duration::from_secs(5);

/// nginx's `keepalive_timeout`: longer than a pause plus the 4 s each of
/// ffmpeg's two segment connections waits between its requests.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// How long a pausing viewer is stopped.
const PAUSE: Duration = Duration::from_secs(8);

/// How long players may take, pause and catch-up included (24 s of
/// video).
const PLAY_TIMEOUT: Duration = Duration::from_secs(90);

/// The pausing viewers stop after this segment (fetched at ~4 s).
const PAUSE_AFTER: usize = 3;

/// The leaving viewers leave after this segment (fetched at ~6 s).
const LEAVE_AFTER: usize = 4;

/// Per viewer: (bytes_out, charge_minor) of each session, and bytes_in of
/// all of them.
type Billed = BTreeMap<String, (Vec<(u64, u64)>, u64)>;

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// 127.0.0.`n`.
fn viewer(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// `vod`: 1 minor unit per started 10 kB delivered, once per session (a
/// per-connection bill would round up once per connection).
fn vod_service(port: u16) -> Service {
    Service {
        session_idle: Some(SESSION_IDLE),
        ..Service::tcp(
            "vod",
            &[port],
            Tariff::volume(
                1,
                ("10KB", 10_000),
                Direction::Egress,
                Rounding::PerStartedUnit,
            ),
        )
    }
}

/// `watch`: 0.5 minor units per second of watching time, pro rata, at
/// least 1 (once per session).
fn watch_service(port: u16) -> Service {
    let mut tariff = Tariff::time(500_000, 1, Rounding::ProRata);
    tariff.minimum_minor = 1;
    Service {
        session_idle: Some(SESSION_IDLE),
        ..Service::tcp("watch", &[port], tariff)
    }
}

/// One test's world: its environment and agent, nginx serving the VOD on
/// the `vod` and `watch` ports, and the audience's source addresses.
struct World {
    // Dropped in this order: players' rules, nginx, then the environment
    // (agent, cgroup, namespace).
    audience: Audience,
    nginx: Nginx,
    env: TestEnv,
    vod: Vod,
    services: Vec<Service>,
    name: String,
}

impl World {
    fn new(name: &str, slot: u16, interval: Duration) -> Option<World> {
        let mut env = TestEnv::new(
            name,
            traffic_bin!(),
            Setup {
                netns: true,
                nft: true,
            },
        )?;
        let vod = Vod::cached();
        let (vod_at, watch_at) = (loopback4(port(slot, 0)), loopback4(port(slot, 1)));
        let services = vec![vod_service(vod_at.port()), watch_service(watch_at.port())];
        env.start_agent(AgentConfig {
            interval,
            services: services.clone(),
            ..AgentConfig::default()
        });
        let nginx = Nginx::start(
            &env,
            "nginx",
            &NginxConfig {
                listen: vec![vod_at, watch_at],
                root: vod.dir.clone(),
                keepalive_timeout: KEEPALIVE,
            },
        );
        let audience = Audience::new(&env);
        Some(World {
            audience,
            nginx,
            env,
            vod,
            services,
            name: name.to_owned(),
        })
    }

    /// The playlist's URL on `service`'s port.
    fn url(&self, service: &str) -> String {
        let port = self
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service")
            .tcp_ports[0];
        format!("http://127.0.0.1:{port}/{}", meterd_tests::hls::PLAYLIST)
    }

    fn server(&self, service: &str) -> SocketAddr {
        let port = self
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service")
            .tcp_ports[0];
        loopback4(port)
    }

    /// Starts ffmpeg players: (name, source, service, role).
    fn players(&mut self, plan: &[(&str, u8, &str, Role)]) -> Vec<FfmpegPlayer> {
        plan.iter()
            .map(|&(name, n, service, role)| {
                let url = self.url(service);
                self.audience.ffmpeg(name, viewer(n), &url, role)
            })
            .collect()
    }

    /// Plays the ffmpeg players' roles out.
    fn direct(&self, players: &mut [FfmpegPlayer]) {
        self.audience
            .direct(players, &self.nginx, &self.vod, PLAY_TIMEOUT);
    }

    /// The truth from nginx's access log, once it is complete.
    fn truth(
        &self,
        attributed: &HashMap<SocketAddr, Attribution>,
        opened: &HashMap<SocketAddr, i64>,
    ) -> Truth {
        // nginx logs a request when its last byte is written; the players
        // have all exited, so a moment more makes sure every line is out.
        thread::sleep(Duration::from_millis(300));
        Truth::build(
            &self.nginx.entries(),
            &self.services,
            attributed,
            opened,
            SESSION_IDLE,
        )
    }

    /// Waits for meterd's sessions to match `truth`; see `viewing`.
    fn sessions(&mut self, truth: &Truth) -> Vec<Matched> {
        self.nginx.assert_running();
        let matched = wait_for_sessions(&self.name, self.env.agent(), truth, &self.services);
        self.env.agent().assert_running();
        matched
    }
}

/// Checks that the access log shows what the test meant the players to
/// do, so a failure below is meterd's and not the scenario's: per
/// viewer, its sessions; the pausing viewer's sessions share a keep-alive
/// connection (it stayed open through the pause); the leaver fetched
/// nothing after its cue; the per-segment viewer never reused a
/// connection, the keep-alive one did.
fn check_scenario(truth: &Truth, world: &World, plan: &[(&str, u8, &str, Role)]) {
    for &(name, n, service, role) in plan {
        let source = viewer(n).to_string();
        let sessions: Vec<_> = truth
            .of_account(&source)
            .into_iter()
            .filter(|s| s.key.service == service)
            .collect();
        let want = if matches!(role, Role::Pauser { .. }) {
            2
        } else {
            1
        };
        assert_eq!(
            sessions.len(),
            want,
            "{}: viewer {name} ({source}) has {} sessions in nginx's access log, the scenario \
             means {want}: {sessions:#?}",
            world.name,
            sessions.len()
        );
        let requests: Vec<_> = sessions.iter().flat_map(|s| &s.requests).collect();
        match role {
            Role::Pauser { .. } => {
                let shared = sessions[0]
                    .nginx_connections()
                    .intersection(&sessions[1].nginx_connections())
                    .count();
                assert!(
                    shared > 0,
                    "{name}: no keep-alive connection carried requests both before and after \
                     the pause: {sessions:#?}"
                );
            }
            Role::Leaver { after } => {
                let later: Vec<String> = (after + 1..world.vod.segments.len())
                    .map(|i| world.vod.segment_path(i))
                    .collect();
                let beyond: Vec<_> = requests
                    .iter()
                    .filter(|r| later.iter().any(|p| p == r.path()))
                    .collect();
                assert!(
                    beyond.is_empty(),
                    "{name} fetched segments after {}: {beyond:#?}",
                    world.vod.segment_path(after)
                );
            }
            Role::PerSegment => assert!(
                requests.iter().all(|r| r.connection_requests == 1),
                "{name} reused a connection: {requests:#?}"
            ),
            Role::KeepAlive => assert!(
                requests.iter().any(|r| r.connection_requests > 1),
                "{name} never reused a connection: {requests:#?}"
            ),
        }
    }
}

/// The matched sessions of viewer `n` on `service`, in order.
fn of_viewer<'a>(matched: &'a [Matched], n: u8, service: &str) -> Vec<&'a Matched> {
    let account = viewer(n).to_string();
    let mut out: Vec<&Matched> = matched
        .iter()
        .filter(|m| m.record.account == account && m.record.service == service)
        .collect();
    out.sort_by_key(|m| m.truth.start_ms());
    out
}

fn summary(matched: &[Matched]) -> String {
    matched
        .iter()
        .map(|m| {
            format!(
                "{} {} {}: {} B, {} ms, {} conn, charge {}",
                m.record.service,
                m.record.account,
                m.record.content,
                m.record.bytes_out,
                m.record.duration_ms,
                m.record.connections,
                m.record.charge_minor
            )
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// Issue 9, item 1: eight ffmpeg viewers, four per service (volume and
/// time tariff), each from its own address: keep-alive, a connection per
/// segment, one who leaves after 10 s of video, one who pauses 8 s with
/// its keep-alive connections open. Against nginx's access log, per
/// viewer: sessions (two for the pausing one), bytes exact, watching time
/// within 0.5 s, charge = tariff applied once per session.
#[test]
fn hls_viewers_are_billed_per_viewing_session() {
    let Some(mut world) = World::new("vs-hls", 0, Duration::from_secs(1)) else {
        return;
    };
    let pauser = Role::Pauser {
        after: PAUSE_AFTER,
        pause: PAUSE,
    };
    let leaver = Role::Leaver { after: LEAVE_AFTER };
    let plan = [
        ("vod-keepalive", 11, "vod", Role::KeepAlive),
        ("vod-per-segment", 12, "vod", Role::PerSegment),
        ("vod-leaver", 13, "vod", leaver),
        ("vod-pauser", 14, "vod", pauser),
        ("watch-keepalive", 21, "watch", Role::KeepAlive),
        ("watch-per-segment", 22, "watch", Role::PerSegment),
        ("watch-leaver", 23, "watch", leaver),
        ("watch-pauser", 24, "watch", pauser),
    ];
    let mut players = world.players(&plan);
    world.direct(&mut players);
    drop(players);

    let truth = world.truth(&HashMap::new(), &HashMap::new());
    check_scenario(&truth, &world, &plan);
    let matched = world.sessions(&truth);
    // `wait_for_sessions` checked every session; what the scenario adds:
    // each viewer's sessions are its own, from its own address.
    for &(name, n, service, role) in &plan {
        let mine = of_viewer(&matched, n, service);
        let want = if matches!(role, Role::Pauser { .. }) {
            2
        } else {
            1
        };
        assert_eq!(mine.len(), want, "{name}: {mine:#?}");
        for m in mine {
            assert_eq!(m.record.client_addr, viewer(n), "{name}: {:?}", m.record);
        }
    }
    eprintln!(
        "vs-hls: {} sessions:\n  {}",
        matched.len(),
        summary(&matched)
    );
}

/// Issue 9, item 2: the same viewers (keep-alive, per segment, pausing on
/// both services, leaving on `watch`) against two agents at once, each
/// with its own cgroup, nginx and namespace: one reading every second,
/// one every 8 s (so the 8 s pause begins and ends between two of its
/// reads). Each must match its own access log (as in item 1), and the two
/// must agree, viewer by viewer: sessions, bytes and charges.
#[test]
fn same_sessions_and_charges_at_1s_and_8s_intervals() {
    let Some(mut fast) = World::new("vs-i1", 1, Duration::from_secs(1)) else {
        return;
    };
    let Some(mut slow) = World::new("vs-i8", 2, Duration::from_secs(8)) else {
        return;
    };
    let pauser = Role::Pauser {
        after: PAUSE_AFTER,
        pause: PAUSE,
    };
    let plan = [
        ("vod-keepalive", 11, "vod", Role::KeepAlive),
        ("vod-per-segment", 12, "vod", Role::PerSegment),
        ("vod-pauser", 14, "vod", pauser),
        ("watch-keepalive", 21, "watch", Role::KeepAlive),
        (
            "watch-leaver",
            23,
            "watch",
            Role::Leaver { after: LEAVE_AFTER },
        ),
        ("watch-pauser", 24, "watch", pauser),
    ];
    // The same players start against both at once; each world's cues come
    // from its own nginx.
    let mut fast_players = fast.players(&plan);
    let mut slow_players = slow.players(&plan);
    thread::scope(|s| {
        let (f, sl) = (&fast, &slow);
        let a = s.spawn(|| f.direct(&mut fast_players));
        let b = s.spawn(|| sl.direct(&mut slow_players));
        for t in [a, b] {
            t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
    });
    drop((fast_players, slow_players));

    let fast_truth = fast.truth(&HashMap::new(), &HashMap::new());
    let slow_truth = slow.truth(&HashMap::new(), &HashMap::new());
    check_scenario(&fast_truth, &fast, &plan);
    check_scenario(&slow_truth, &slow, &plan);
    // The two runs' traffic is the same, byte for byte (same files, same
    // ffmpeg requests), or comparing the agents would mean nothing.
    let traffic = |t: &Truth| -> BTreeMap<String, Vec<u64>> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for s in &t.sessions {
            out.entry(s.key.to_string())
                .or_default()
                .push(s.bytes_out());
        }
        out
    };
    assert_eq!(
        traffic(&fast_truth),
        traffic(&slow_truth),
        "the two runs' players fetched different bytes: the test is invalid"
    );

    let fast_sessions = fast.sessions(&fast_truth);
    let slow_sessions = slow.sessions(&slow_truth);
    // Per viewer: (bytes_out, charge_minor) of each session, and bytes_in
    // of all of them (a resuming request may count before the gap).
    let billed = |matched: &[Matched]| -> Billed {
        let mut out = Billed::new();
        for &(name, n, service, _) in &plan {
            let mine = of_viewer(matched, n, service);
            out.insert(
                name.to_owned(),
                (
                    mine.iter()
                        .map(|m| (m.record.bytes_out, m.record.charge_minor))
                        .collect(),
                    mine.iter().map(|m| m.record.bytes_in).sum(),
                ),
            );
        }
        out
    };
    assert_eq!(
        billed(&fast_sessions),
        billed(&slow_sessions),
        "per viewer, ([(bytes_out, charge_minor) per session], bytes_in) at a 1 s interval \
         (left) and at 8 s (right) differ.\n1 s:\n  {}\n8 s:\n  {}",
        summary(&fast_sessions),
        summary(&slow_sessions)
    );
    eprintln!(
        "vs-i1/vs-i8: identical, {} sessions:\n  {}",
        slow_sessions.len(),
        summary(&slow_sessions)
    );
}

/// Starts a scripted viewer of the whole VOD whose every connection is
/// attributed to `attribution` before its first byte.
fn attributed_viewer(
    world: &mut World,
    service: &str,
    attribution: &Attribution,
    connection_per_segment: bool,
) -> thread::JoinHandle<Vec<ScriptedConn>> {
    let api = PathBuf::from(world.env.agent().ready().api);
    let server = world.server(service);
    let viewer = ScriptedViewer {
        server,
        netns: world.env.netns().expect("netns").name().to_owned(),
        connection_per_segment,
        segments: world.vod.segments.len(),
    };
    let attribution = attribution.clone();
    viewer.spawn(move |local| {
        attribute(
            &api,
            local,
            server.port(),
            &attribution,
            Duration::from_secs(30),
        );
    })
}

/// Waits for the scripted viewers; the attributions of their connections
/// and when each was established, for the truth.
fn scripted_truth(
    viewers: Vec<(thread::JoinHandle<Vec<ScriptedConn>>, &Attribution)>,
) -> (HashMap<SocketAddr, Attribution>, HashMap<SocketAddr, i64>) {
    let (mut attributed, mut opened) = (HashMap::new(), HashMap::new());
    for (thread, attribution) in viewers {
        let conns = thread
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        for c in conns {
            attributed.insert(c.local, attribution.clone());
            opened.insert(c.local, c.connected_unix_ms);
        }
    }
    (attributed, opened)
}

fn account(account: &str, content: &str) -> Attribution {
    Attribution {
        account: account.to_owned(),
        content: content.to_owned(),
    }
}

/// Issue 9, item 3: kill -9 of the agent twice while viewers watch: two
/// attributed viewers (their sessions span both kills, so their
/// attributions must survive the restarts), an ffmpeg keep-alive viewer
/// and a per-segment one, and a pausing one whose pause spans the first
/// downtime. The sessions, accounts and charges are those of the access
/// log, with no session or connection part exported twice.
#[test]
fn kill9_mid_session_bills_each_viewing_session_once() {
    let Some(mut world) = World::new("vs-kill", 3, Duration::from_secs(1)) else {
        return;
    };
    let plan = [
        ("vod-keepalive", 11, "vod", Role::KeepAlive),
        ("watch-per-segment", 22, "watch", Role::PerSegment),
        (
            "vod-pauser",
            14,
            "vod",
            Role::Pauser {
                after: PAUSE_AFTER,
                pause: PAUSE,
            },
        ),
    ];
    let (alice, bob) = (account("alice", "movie-1"), account("bob", "movie-2"));
    let start = Instant::now();
    let scripted = vec![
        (attributed_viewer(&mut world, "vod", &alice, false), &alice),
        (attributed_viewer(&mut world, "watch", &bob, false), &bob),
    ];
    let mut players = world.players(&plan);

    let mut kills = Vec::new();
    thread::scope(|s| {
        let World {
            audience,
            nginx,
            env,
            vod,
            ..
        } = &mut world;
        let (audience, nginx, vod) = (&*audience, &*nginx, &*vod);
        let director = s.spawn(|| audience.direct(&mut players, nginx, vod, PLAY_TIMEOUT));
        // (kill at, restart at) in ms from the start: the first downtime
        // falls inside the pause (~4 s to ~12 s), the second after it.
        for (kill_at, restart_at) in [(5_000, 8_500), (15_000, 16_000)] {
            sleep_until(start + Duration::from_millis(kill_at));
            env.agent().kill9();
            kills.push(unix_ms_now());
            sleep_until(start + Duration::from_millis(restart_at));
            env.agent().start();
        }
        director
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
    drop(players);

    let (attributed, opened) = scripted_truth(scripted);
    let truth = world.truth(&attributed, &opened);
    check_scenario(&truth, &world, &plan);
    for who in ["alice", "bob"] {
        let sessions = truth.of_account(who);
        assert_eq!(
            sessions.len(),
            1,
            "{who}'s sessions in the access log: {sessions:#?}"
        );
        assert!(
            kills
                .iter()
                .all(|&k| sessions[0].start_ms() < k && k < sessions[0].end_ms()),
            "{who}'s session ({} .. {}) does not span the kills at {kills:?}: the test did not \
             kill the agent mid-session",
            sessions[0].start_ms(),
            sessions[0].end_ms()
        );
    }
    let matched = world.sessions(&truth);
    for (who, content) in [("alice", "movie-1"), ("bob", "movie-2")] {
        let mine: Vec<_> = matched.iter().filter(|m| m.record.account == who).collect();
        assert_eq!(mine.len(), 1, "{who}: {mine:#?}");
        assert_eq!(mine[0].record.content, content, "{:?}", mine[0].record);
    }
    let runs = world.env.agent().log().matches("=== ").count();
    assert_eq!(runs, 3, "agent runs in the log");
    eprintln!(
        "vs-kill: kills at {kills:?}, {} sessions:\n  {}",
        matched.len(),
        summary(&matched)
    );
}

/// Issue 9, item 4: two viewers behind one address (127.0.0.1, their own
/// client ports) on the same service, attributed to different accounts
/// before their first byte: alice over one keep-alive connection, bob
/// with a connection per segment (opened ahead, each attributed before
/// its first byte, used for one segment and closed). A third viewer from
/// the same address, an unattributed ffmpeg, is billed to the address.
/// Three sessions, each with its own bytes.
#[test]
fn two_viewers_behind_one_address_are_two_sessions() {
    let Some(mut world) = World::new("vs-shared", 4, Duration::from_secs(1)) else {
        return;
    };
    let (alice, bob) = (account("alice", "movie-1"), account("bob", "movie-1"));
    let scripted = vec![
        (attributed_viewer(&mut world, "vod", &alice, false), &alice),
        (attributed_viewer(&mut world, "vod", &bob, true), &bob),
    ];
    let plan = [("vod-unattributed", 1, "vod", Role::KeepAlive)];
    let mut players = world.players(&plan);
    world.direct(&mut players);
    drop(players);

    let (attributed, opened) = scripted_truth(scripted);
    let conns_of = |who: &str| attributed.values().filter(|a| a.account == who).count();
    let segments = world.vod.segments.len();
    assert_eq!(conns_of("alice"), 1, "alice uses one connection");
    assert_eq!(conns_of("bob"), segments, "bob uses one per segment");
    assert!(
        attributed.keys().all(|c| c.ip() == Ipv4Addr::LOCALHOST),
        "every viewer comes from 127.0.0.1: {attributed:?}"
    );
    let truth = world.truth(&attributed, &opened);
    check_scenario(&truth, &world, &plan);
    let keys: Vec<String> = truth.sessions.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "(vod, 127.0.0.1, \"\")",
            "(vod, alice, \"movie-1\")",
            "(vod, bob, \"movie-1\")"
        ],
        "sessions in the access log"
    );
    let matched = world.sessions(&truth);
    assert_eq!(matched.len(), 3, "{matched:#?}");
    let bob_session = matched
        .iter()
        .find(|m| m.record.account == "bob")
        .expect("bob's session");
    assert_eq!(
        bob_session.record.connections, segments as u64,
        "bob's session had a connection per segment: {:?}",
        bob_session.record
    );
    eprintln!(
        "vs-shared: {} sessions:\n  {}",
        matched.len(),
        summary(&matched)
    );
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
}
