//! Admission, attribution and accounts end to end (issue 10, "What it must
//! show" 1 to 5): Debian's nginx with `user www-data;` runs the shipped
//! `packaging/nginx/hls-secure-link.conf` and `meterd.conf` (and, for RTMP,
//! `rtmp.conf` with Debian's `libnginx-mod-rtmp`), asking the agent over
//! its unix socket (`[api] group = "www-data"`) on every request. See
//! `meterd_tests::admission` for the world and its logs.
//!
//! The truths: nginx's own logs (per request: the bytes it sent and read,
//! the account it passed to meterd, meterd's refusal reason, whether the
//! response completed; per RTMP session: its bytes on the connection; per
//! RTMP callback: meterd's answer), what the test's own clients received
//! and when, and what the test's webhook receiver was sent. Charges are
//! computed on the test side (`meterd_tests::tariff`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::AtomicBool},
    thread,
    time::{Duration, Instant},
};

use meterd_tests::{
    AgentConfig, Setup, TcpClient, TestEnv,
    admission::{
        self, NOBODY, Origin, OriginOptions, Pace, Ports, STREAM, WWW_DATA, WebhookReceiver,
        curl_unix_as, flood_pending, now_ms, signed_path, unix_now,
    },
    hls::{PLAYLIST, Role},
    ledger::{ConnectionRecord, Ledger, SessionRecord, rfc3339_utc_ms},
    metrics::Exposition,
    nginx::AccessEntry,
    port,
    process::wait_until,
    tariff::{Direction, Rounding, Service, Tariff},
    traffic_bin,
    viewing::{Attribution, Truth, wait_for_sessions},
};

/// `session_idle` of the services: far from ffmpeg's 2 s between segments.
const SESSION_IDLE: Duration = Duration::from_secs(5);

/// How long ffmpeg players may take for the 24 s VOD.
const PLAY_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the ledger may take to settle what the test waits for.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);

/// The service `name` on `port`, with [`SESSION_IDLE`].
fn service(name: &str, port: u16, tariff: Tariff) -> Service {
    Service {
        session_idle: Some(SESSION_IDLE),
        ..Service::tcp(name, &[port], tariff)
    }
}

/// 1 minor unit per started `unit` bytes delivered (`text` as the config
/// writes it).
fn per_started(text: &str, unit: u64) -> Tariff {
    Tariff::volume(1, (text, unit), Direction::Egress, Rounding::PerStartedUnit)
}

/// `[[account]]` tables: (id, prepaid_minor, on_limit).
fn accounts(list: &[(&str, u64, Option<&str>)]) -> String {
    let mut out = String::new();
    for (id, prepaid, policy) in list {
        let _ = write!(
            out,
            "\n[[account]]\nid = \"{id}\"\nprepaid_minor = {prepaid}\n"
        );
        if let Some(p) = policy {
            let _ = writeln!(out, "on_limit = \"{p}\"");
        }
    }
    out
}

/// Waits until `done` holds for the ledger; returns it (or the last one
/// read, after `timeout`).
fn wait_ledger(origin: &Origin, timeout: Duration, done: impl Fn(&Ledger) -> bool) -> Ledger {
    let started = Instant::now();
    loop {
        let ledger = origin.agent.ledger();
        if done(&ledger) || started.elapsed() >= timeout {
            return ledger;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn conn_of(c: &ConnectionRecord) -> SocketAddr {
    SocketAddr::new(c.client_addr, c.client_port)
}

fn sessions_of<'a>(ledger: &'a Ledger, account: &str) -> Vec<&'a SessionRecord> {
    ledger
        .sessions
        .iter()
        .filter(|s| s.account == account)
        .collect()
}

fn describe(ledger: &Ledger) -> String {
    let mut out = String::from("sessions:");
    for s in &ledger.sessions {
        let _ = write!(
            out,
            "\n  {} {} {:?} from {}: out {} in {}, {} conn, charge {} [{}]",
            s.service,
            s.account,
            s.content,
            s.client_addr,
            s.bytes_out,
            s.bytes_in,
            s.connections,
            s.charge_minor,
            s.session_id
        );
    }
    out.push_str("\nconnections:");
    for c in &ledger.connections {
        let _ = write!(
            out,
            "\n  {}:{} -> {} {} {:?}: out {} in {} [{} in {}]",
            c.client_addr,
            c.client_port,
            c.server_port,
            c.account,
            c.content,
            c.bytes_out,
            c.bytes_in,
            c.connection_id,
            c.session_id
        );
    }
    out
}

/// Issue 10, item 1: nginx's workers run as www-data and reach the agent's
/// socket (root:www-data 0660) through the shipped snippet. Two ffmpeg
/// players, alice keep-alive and bob with a connection per segment, both
/// from 127.0.0.5, play the VOD through secure_link-signed URLs. Every
/// request is asked about (the account nginx passed is the URL's), and
/// meterd's ledger is nginx's access log per account, to the byte: one
/// viewing session per account, bytes out and in exact, every connection's
/// bytes exact and in its account's session, no session of the shared
/// address, and the charge of the tariff applied once per session.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn two_accounts_behind_one_address_are_billed_as_nginx_logged_them() {
    let ports = Ports::of_slot(0);
    let services = vec![service("hls", ports.hls, per_started("10KB", 10_000))];
    let Some(mut origin) = Origin::start(
        "adm-hls",
        traffic_bin!(),
        ports,
        &OriginOptions {
            agent: AgentConfig {
                services: services.clone(),
                extra_toml: accounts(&[("alice", 1_000_000, None), ("bob", 1_000_000, None)]),
                ..AgentConfig::default()
            },
            ..OriginOptions::default()
        },
    ) else {
        return;
    };
    let uids = origin.nginx_uids();
    assert!(
        uids.iter().filter(|(_, uid)| *uid == 0).count() == 1
            && uids.iter().filter(|(_, uid)| *uid == WWW_DATA.0).count() >= 1
            && uids.iter().all(|(_, uid)| [0, WWW_DATA.0].contains(uid)),
        "nginx's processes (pid, uid) {uids:?}: want a root master and www-data workers"
    );
    assert_eq!(
        admission::socket_mode_and_group(&origin.api()),
        (0o660, WWW_DATA.1),
        "the API socket's mode and group with api.group = \"www-data\""
    );

    let shared = Ipv4Addr::new(127, 0, 0, 5);
    let (alice_url, bob_url) = (origin.playlist_url("alice"), origin.playlist_url("bob"));
    let mut players = vec![
        origin
            .audience
            .ffmpeg("alice", shared, &alice_url, Role::KeepAlive),
        origin
            .audience
            .ffmpeg("bob", shared, &bob_url, Role::PerSegment),
    ];
    origin
        .audience
        .direct(&mut players, &origin.nginx, &origin.vod, PLAY_TIMEOUT);
    drop(players);
    thread::sleep(Duration::from_millis(300));

    // The scenario, from nginx's logs: every request served (so meterd
    // answered 204), for the account in its URL, which is what nginx
    // passed to meterd; one account per connection.
    let log = origin.nginx.entries();
    let asked = origin.admission_entries();
    let mut attributed: HashMap<SocketAddr, Attribution> = HashMap::new();
    for e in &log {
        let a = asked
            .iter()
            .find(|a| {
                a.connection == e.connection && a.connection_requests == e.connection_requests
            })
            .unwrap_or_else(|| panic!("no admission log line for {e:?}"));
        assert!(
            (200..300).contains(&e.status),
            "nginx answered {e:?}; its error log:\n{}",
            origin.nginx.error_log_tail(20)
        );
        let url_account = e.path().split('/').nth(2).unwrap_or("");
        assert_eq!(
            a.account.as_deref(),
            Some(url_account),
            "nginx passed another account than the URL's: {a:?}"
        );
        assert_eq!(e.remote_addr, IpAddr::V4(shared), "{e:?}");
        let attribution = Attribution {
            account: url_account.to_owned(),
            content: STREAM.to_owned(),
        };
        if let Some(before) = attributed.insert(e.client(), attribution.clone()) {
            assert_eq!(before, attribution, "two accounts on one connection: {e:?}");
        }
    }
    let conns = |who: &str| attributed.values().filter(|a| a.account == who).count();
    let segments = origin.vod.segments.len();
    assert!(
        conns("alice") >= 1 && conns("alice") < segments,
        "alice keeps her connections alive: {attributed:?}"
    );
    assert!(
        conns("bob") > segments,
        "bob uses a connection per request: {attributed:?}"
    );

    let truth = Truth::build(&log, &services, &attributed, &HashMap::new(), SESSION_IDLE);
    let keys: Vec<String> = truth.sessions.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(
        keys,
        ["(hls, alice, \"movie\")", "(hls, bob, \"movie\")"],
        "sessions in the access log"
    );
    let matched = wait_for_sessions("adm-hls", &origin.agent, &truth, &services);
    origin.agent.assert_running();
    origin.nginx.assert_running();
    for m in &matched {
        eprintln!(
            "adm-hls: {} {}: nginx sent {} B in {} requests on {} connections, meterd: {} B out, \
             {} B in, charge {}",
            m.record.account,
            m.record.content,
            m.truth.bytes_out(),
            m.truth.requests.len(),
            m.truth.nginx_connections().len(),
            m.record.bytes_out,
            m.record.bytes_in,
            m.record.charge_minor
        );
    }
}

/// Issue 10, item 1: URLs nginx refuses before meterd is asked. From
/// 127.0.0.9: a wrong signature, an expired one, and alice's signature
/// with bob's name in the path, each answered 403 by nginx; from
/// 127.0.0.11, the stream's file by its plain path (no signature), which
/// must not be served either; from 127.0.0.10, a signed request of alice,
/// served, as a control that billing works. No account is billed for any
/// refused request; alice only for her control request, to the byte; and
/// where the client address is billed for nginx's 403 page, the charge
/// must be 0 (it is not an account's, and it is not a viewer's either).
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn unsigned_expired_or_forged_urls_bill_no_account() {
    let ports = Ports::of_slot(1);
    // Every request is admitted through /v1/authorize, as the shipped
    // example says: nginx's own 403 pages bill nobody.
    let services = vec![Service {
        bill_unattributed: Some(false),
        ..service("hls", ports.hls, per_started("10KB", 10_000))
    }];
    let Some(origin) = Origin::start(
        "adm-refused",
        traffic_bin!(),
        ports,
        &OriginOptions {
            agent: AgentConfig {
                services: services.clone(),
                extra_toml: accounts(&[("alice", 1_000_000, None), ("bob", 1_000_000, None)]),
                ..AgentConfig::default()
            },
            ..OriginOptions::default()
        },
    ) else {
        return;
    };
    let refused_from = Ipv4Addr::new(127, 0, 0, 9);
    let control_from = Ipv4Addr::new(127, 0, 0, 10);
    let plain_from = Ipv4Addr::new(127, 0, 0, 11);
    let expires = unix_now() + 3600;
    let good = signed_path("alice", expires, PLAYLIST);
    let refused = [
        (
            "a wrong signature",
            format!("/hls/alice/{expires}/AAAAAAAAAAAAAAAAAAAAAA/{STREAM}/{PLAYLIST}"),
        ),
        (
            "an expired signature",
            signed_path("alice", unix_now() - 60, PLAYLIST),
        ),
        (
            "alice's signature with bob's name",
            good.replacen("/hls/alice/", "/hls/bob/", 1),
        ),
    ];
    let mut problems = Vec::new();
    let mut refused_clients = BTreeSet::new();
    for (what, path) in &refused {
        let fetch = origin.curl(refused_from, path);
        refused_clients.insert(fetch.client);
        if fetch.status != 403 {
            problems.push(format!(
                "{what} ({path}): nginx answered {}, not 403",
                fetch.status
            ));
        }
    }
    let plain_path = format!("/{STREAM}/{PLAYLIST}");
    let plain = origin.curl(plain_from, &plain_path);
    if plain.status == 200 {
        problems.push(format!(
            "{plain_path} without any signature: nginx served it (200, {} bytes): the shipped \
             hls-secure-link.conf's server-level `root` serves every file of the media \
             directory by its plain path, without secure_link or auth_request",
            plain.size
        ));
    }
    let control = origin.curl(control_from, &good);
    assert_eq!(control.status, 200, "the control request: {control:?}");

    // The requests as nginx logged them; for the refused ones, meterd was
    // not asked (no $meterd_account).
    thread::sleep(Duration::from_millis(300));
    let log = origin.nginx.entries();
    for a in origin.admission_entries() {
        if refused_clients.contains(&a.client) && a.account.is_some() {
            problems.push(format!("nginx asked meterd about a refused URL: {a:?}"));
        }
    }
    let sent = |client: SocketAddr| -> u64 {
        log.iter()
            .filter(|e| e.client() == client)
            .map(|e| e.bytes_sent)
            .sum()
    };
    let all_clients: Vec<SocketAddr> = log.iter().map(AccessEntry::client).collect();
    let ledger = wait_ledger(&origin, SETTLE_TIMEOUT, |l| {
        all_clients.iter().all(|c| {
            l.connections
                .iter()
                .any(|r| conn_of(r) == *c && l.session(&r.session_id).is_some())
        })
    });

    for r in ledger
        .connections
        .iter()
        .filter(|r| refused_clients.contains(&conn_of(r)))
    {
        if r.account == "alice" || r.account == "bob" {
            problems.push(format!(
                "a refused request's connection is billed to account {}: {r:?}",
                r.account
            ));
        }
    }
    if !sessions_of(&ledger, "bob").is_empty() {
        problems.push(format!(
            "bob, whose name only a forged URL carried, has sessions: {:?}",
            sessions_of(&ledger, "bob")
        ));
    }
    let alice: u64 = sessions_of(&ledger, "alice")
        .iter()
        .map(|s| s.bytes_out)
        .sum();
    if alice != sent(control.client) {
        problems.push(format!(
            "alice is billed {alice} bytes out; nginx sent {} for her one request",
            sent(control.client)
        ));
    }
    for (who, addr) in [
        ("the refused requests", refused_from),
        ("the plain path", plain_from),
    ] {
        for s in ledger
            .sessions
            .iter()
            .filter(|s| s.account == addr.to_string())
        {
            eprintln!(
                "adm-refused: {who} from {addr}: billed to the client address, {} B out, charge {}",
                s.bytes_out, s.charge_minor
            );
            if s.charge_minor != 0 {
                problems.push(format!(
                    "{who} from {addr}: the client address is charged {} for {} bytes of nginx's \
                     answers (want 0): {s:?}",
                    s.charge_minor, s.bytes_out
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "adm-refused:\n- {}\n{}",
        problems.join("\n- "),
        describe(&ledger)
    );
}

/// Prepaid credit of the account that runs out mid-stream (test 2), in
/// minor units: 1 per started kB, so 5 MB, ~4 s in.
const CUT_PREPAID: u64 = 5_000;

/// Keeps the governor from widening the interval on a loaded machine: the
/// issue's bound is the one at a 1 s interval (a widened one checks less
/// often, the README's accepted cost of overload).
const PINNED_INTERVAL: &str = "[governor]\nmax_interval = \"1s\"\n";

/// The rate at which test 2's viewer takes its stream (1 MiB/s): steady,
/// so "one interval's worth of the viewer's rate" is well defined and the
/// crossing falls mid-response, seconds into it.
const CUT_RATE: u64 = 1 << 20;

/// The progressive file of test 2: 24 s at [`CUT_RATE`].
const CUT_FILE: (&str, u64) = ("feature.ts", 24 << 20);

/// How soon after the crossing the stream must have ended (the issue).
const CUT_WITHIN: Duration = Duration::from_secs(2);

/// On top of one interval's worth of the viewer's rate, what the cut may
/// let through for the cycle's own work (read, charge, commit the event)
/// and the cut-off itself on a loaded 2-core machine. The README's bound is
/// "what its sessions use in one interval before the cut-off order, plus
/// what is in flight until its sockets are destroyed".
const CUT_LATENCY: Duration = Duration::from_millis(250);

/// Issue 10, item 2: carol (prepaid 5000, 1 minor unit per started kB,
/// `on_limit = "cut"`) downloads a 24 MiB file through a signed URL,
/// taking it in at a steady 1 MiB/s like a player (TCP's flow control
/// paces nginx), from a reader in the test that records when it received
/// each byte. Her prepaid credit is used up ~4 s in, in
/// the middle of the response. Against what the reader received: the
/// stream ends within 2 s of the crossing, and what arrived after the
/// crossing is at most one interval's worth of its rate (plus
/// [`CUT_LATENCY`]). nginx logs the cut request as incomplete. A new
/// request gets 403 with reason `limit_reached` and is billed to nobody.
/// A top-up through the API (idempotent by its id) admits her again: a
/// new request is served and billed to her, to the byte.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn prepaid_account_is_cut_mid_stream_and_plays_again_after_top_up() {
    let ports = Ports::of_slot(2);
    let services = vec![service("hls", ports.hls, per_started("1KB", 1_000))];
    let Some(origin) = Origin::start(
        "adm-cut",
        traffic_bin!(),
        ports,
        &OriginOptions {
            agent: AgentConfig {
                services: services.clone(),
                extra_toml: format!(
                    "{}\n{PINNED_INTERVAL}",
                    accounts(&[("carol", CUT_PREPAID, Some("cut"))])
                ),
                ..AgentConfig::default()
            },
            files: vec![(CUT_FILE.0.to_owned(), CUT_FILE.1)],
            ..OriginOptions::default()
        },
    ) else {
        return;
    };
    let interval = origin.agent.config().interval;
    let stop = Arc::new(AtomicBool::new(false));
    let (t0, t0_ms) = (Instant::now(), now_ms());
    let at_ms = |t: Instant| t0_ms + i64::try_from((t - t0).as_millis()).expect("fits");
    let reader = admission::read_stream(
        origin.netns(),
        origin.server(),
        &origin.signed("carol", CUT_FILE.0),
        Pace::Rate(CUT_RATE),
        Arc::clone(&stop),
    );
    // The crossing is ~4 s in; then give the cut the 2 s and
    // three more to show that nothing else arrives.
    let crossed = wait_until(Duration::from_secs(20), || {
        !origin.events("limit_reached").is_empty()
    });
    assert!(
        crossed,
        "no limit_reached event for carol within 20 s; agent log:\n{}",
        origin.agent.log_tail(30)
    );
    let event_seen = Instant::now();
    wait_until(CUT_WITHIN + Duration::from_secs(3), || reader.is_finished());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reading = reader
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(
        reading.status_line.starts_with("HTTP/1.1 200"),
        "carol's request: {:?}",
        reading.status_line
    );
    let events = origin.events("limit_reached");
    assert_eq!(events.len(), 1, "limit_reached events: {events:?}");
    let (event_id, event_ms, detail) = &events[0];
    assert_eq!(
        event_id,
        &format!("limit_reached:carol:{CUT_PREPAID}"),
        "{detail}"
    );

    // The crossing, from what the reader received: the moment it had the
    // bytes worth carol's whole prepaid credit (meterd charges whole
    // units, so it can know of the crossing from then on).
    let worth = CUT_PREPAID * 1_000;
    let crossing = reading.when(worth).unwrap_or_else(|| {
        panic!(
            "the reader got {} bytes ({}), fewer than carol's {worth}",
            reading.total(),
            reading.end
        )
    });
    // Its rate in the seconds before the crossing.
    let first = reading.samples[0].0;
    let from = (first + Duration::from_millis(1000)).min(
        crossing
            .checked_sub(Duration::from_millis(500))
            .unwrap_or(first),
    );
    #[expect(clippy::cast_precision_loss, reason = "bytes far below 2^52")]
    let rate = (reading.by(crossing) - reading.by(from)) as f64 / (crossing - from).as_secs_f64();
    let after = reading.total() - reading.by(crossing);
    #[expect(
        clippy::cast_sign_loss,
        clippy::cast_possible_truncation,
        reason = "a positive number of bytes"
    )]
    let bound = (rate * (interval + CUT_LATENCY).as_secs_f64()) as u64;
    let last = reading.last_byte().expect("bytes arrived");
    let ended_after = last.saturating_duration_since(crossing);
    let mut problems = Vec::new();
    eprintln!(
        "adm-cut: crossing {:.3} s in at {:.0} B/s; limit_reached committed {} ms after it \
         (the test saw it {} ms after); last byte {} ms after the crossing; {} B after the \
         crossing (bound {bound}); the stream ended with {}; {} B in all",
        (crossing - first).as_secs_f64(),
        rate,
        event_ms - at_ms(crossing),
        (event_seen - crossing).as_millis(),
        ended_after.as_millis(),
        after,
        reading.end,
        reading.total()
    );
    if ended_after > CUT_WITHIN
        || reading.end == "stopped" && reading.ended - last < Duration::from_secs(2)
    {
        problems.push(format!(
            "the stream did not end within {CUT_WITHIN:?} of the crossing: its last byte came {} ms \
             after it, and it ended with {:?} ({} ms after its last byte)",
            ended_after.as_millis(),
            reading.end,
            (reading.ended - last).as_millis()
        ));
    }
    if after > bound {
        problems.push(format!(
            "carol received {after} bytes after the crossing, more than one interval's worth of \
             her rate ({rate:.0} B/s x ({interval:?} + {CUT_LATENCY:?}) = {bound})"
        ));
    }

    // nginx logged the cut request, incomplete.
    let cut_client = reading.local;
    let mut cut_entry = None;
    wait_until(Duration::from_secs(10), || {
        cut_entry = origin
            .admission_entries()
            .into_iter()
            .find(|a| a.client == cut_client);
        cut_entry.is_some()
    });
    let cut_entry = cut_entry.unwrap_or_else(|| {
        panic!("nginx did not log carol's cut request ({cut_client}) within 10 s")
    });
    eprintln!(
        "adm-cut: nginx logged the cut request: status {}, {} B sent, completed {}",
        cut_entry.status, cut_entry.bytes_sent, cut_entry.completed
    );
    if cut_entry.completed || cut_entry.bytes_sent >= CUT_FILE.1 {
        problems.push(format!(
            "nginx logged carol's cut request as complete: {cut_entry:?}"
        ));
    }

    // New requests are refused, and billed to nobody.
    let segment = origin.signed("carol", &origin.vod.segments[0].uri);
    let refused = origin.curl(Ipv4Addr::LOCALHOST, &segment);
    thread::sleep(Duration::from_millis(300));
    let refused_entry = origin
        .admission_entries()
        .into_iter()
        .find(|a| a.client == refused.client);
    if refused.status != 403
        || refused_entry.as_ref().and_then(|a| a.reason.as_deref()) != Some("limit_reached")
    {
        problems.push(format!(
            "a new request of carol after the crossing: {refused:?}, logged as {refused_entry:?} \
             (want 403, reason limit_reached)"
        ));
    }

    // A top-up admits her again, once per credit id.
    let (status, answer) = origin.credit("carol", "carol-top-up-1", 100_000);
    assert_eq!(status, 200, "top-up: {answer}");
    assert_eq!(
        (answer["status"].as_str(), answer["standing"].as_str()),
        (Some("credited"), Some("ok")),
        "top-up: {answer}"
    );
    let (status, again) = origin.credit("carol", "carol-top-up-1", 100_000);
    assert_eq!(
        (
            status,
            again["status"].as_str(),
            again["limit_minor"].as_u64()
        ),
        (200, Some("duplicate"), answer["limit_minor"].as_u64()),
        "the same top-up again: {again}"
    );
    let (status, unknown) = origin.credit("nobody-configured", "x", 1);
    assert_eq!(
        status, 404,
        "a top-up of an account without a limit: {unknown}"
    );
    let replay = origin.curl(Ipv4Addr::LOCALHOST, &segment);
    assert_eq!(
        (replay.status, replay.size),
        (200, origin.vod.segments[0].bytes),
        "carol's request after the top-up"
    );

    // The ledger: the cut connection billed for at least what the reader
    // got and at most what nginx wrote; the refusal billed to nobody; the
    // replay billed to carol, to the byte.
    thread::sleep(Duration::from_millis(300));
    let log = origin.nginx.entries();
    let nginx_sent = |client: SocketAddr| -> u64 {
        log.iter()
            .filter(|e| e.client() == client)
            .map(|e| e.bytes_sent)
            .sum()
    };
    let ledger = wait_ledger(&origin, SETTLE_TIMEOUT, |l| {
        [cut_client, replay.client].iter().all(|c| {
            l.connections
                .iter()
                .any(|r| conn_of(r) == *c && l.session(&r.session_id).is_some())
        })
    });
    let billed = |client: SocketAddr, account: &str| -> u64 {
        ledger
            .connections
            .iter()
            .filter(|r| conn_of(r) == client && r.account == account)
            .filter(|r| ledger.session(&r.session_id).is_some())
            .map(|r| r.bytes_out)
            .sum()
    };
    let cut_billed = billed(cut_client, "carol");
    if cut_billed < reading.total() || cut_billed > nginx_sent(cut_client) {
        problems.push(format!(
            "carol's cut connection is billed {cut_billed} bytes out; the reader received {}, \
             nginx wrote {}",
            reading.total(),
            nginx_sent(cut_client)
        ));
    }
    for r in ledger
        .connections
        .iter()
        .filter(|r| conn_of(r) == refused.client && r.bytes_out > 0)
    {
        if ledger.session(&r.session_id).is_some() {
            problems.push(format!("the refused request is billed: {r:?}"));
        }
    }
    if billed(replay.client, "carol") != nginx_sent(replay.client) {
        problems.push(format!(
            "carol's request after the top-up: billed {} bytes out to her, nginx sent {}",
            billed(replay.client, "carol"),
            nginx_sent(replay.client)
        ));
    }
    let cut_offs = origin.events("cut_off");
    eprintln!("adm-cut: cut_off events: {cut_offs:?}");
    assert!(
        problems.is_empty(),
        "adm-cut:\n- {}\n{}\nagent log:\n{}",
        problems.join("\n- "),
        describe(&ledger),
        origin.agent.log_tail(20)
    );
}

/// The live stream's name (test 3).
const LIVE: &str = "stream";

/// dave's prepaid credit (test 3): 1 minor unit per started kB, so 60 kB,
/// a few seconds of the ~16 kB/s test stream.
const DAVE_PREPAID: u64 = 60;

/// What the RTMP handshake and `connect` exchange may send before
/// nginx-rtmp's `on_play`: bytes meterd may bill to the client address
/// when it has seen the connection before it is attributed (the README:
/// earlier bytes stay where they were).
const BEFORE_PLAY: u64 = 8 << 10;

/// The RTMP handshake (C0+C1+C2 in, S0+S1+S2 out: 1 + 1536 + 1536 bytes
/// each way), which nginx-rtmp's `$bytes_sent` and `$bytes_received` leave
/// out: it is sent and read before its counters start.
const HANDSHAKE: u64 = 3_073;

/// What nginx-rtmp may count as sent on a connection beyond what its peer
/// took: its answers to a closing player's or publisher's last commands,
/// written after the peer had closed (never delivered, so never billed).
const UNDELIVERED_AT_CLOSE: u64 = 256;

/// ffmpeg arguments of an RTMP player of `url` writing what it received to
/// `out`, for at most `seconds` of media.
fn rtmp_player(url: &str, out: &str, seconds: u32) -> Vec<String> {
    [
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        "info",
        "-i",
        url,
        "-t",
        &seconds.to_string(),
        "-c",
        "copy",
        "-f",
        "flv",
        "-y",
        out,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Issue 10, item 3: nginx-rtmp (Debian's libnginx-mod-rtmp, the shipped
/// rtmp.conf and its relay) with ffmpeg publishing a live test stream
/// from 127.0.0.20, and ffmpeg players with `?account=` from addresses of
/// their own: alice (ample credit) for 12 s, and dave (60 kB of credit,
/// `on_limit = "deny"`, so only nginx-rtmp's `on_update` can stop him).
/// Against nginx-rtmp's own records: every player's and the publisher's
/// connection billed to the byte of its `$bytes_sent`/`$bytes_received`,
/// to the player's account (all but the handshake, [`BEFORE_PLAY`]), the
/// publisher to its address; meterd answers alice's callbacks 200 and
/// dave's first `update_play` after his crossing 403, after which
/// nginx-rtmp drops him (his ffmpeg exits early). A neighbour behind
/// dave's address then fetches a page meterd is not asked about: billed
/// to the address, not swallowed by dave's refusal. After a top-up, dave
/// plays again, billed to him.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn rtmp_players_are_billed_and_one_over_its_limit_is_dropped_on_update() {
    let ports = Ports::of_slot(3);
    let services = vec![
        service("live", ports.rtmp, per_started("1KB", 1_000)),
        service("hls", ports.hls, per_started("1KB", 1_000)),
    ];
    let Some(mut origin) = Origin::start(
        "adm-rtmp",
        traffic_bin!(),
        ports,
        &OriginOptions {
            agent: AgentConfig {
                services: services.clone(),
                extra_toml: format!(
                    "{}\n{PINNED_INTERVAL}",
                    accounts(&[
                        ("alice", 1_000_000, None),
                        ("dave", DAVE_PREPAID, Some("deny"))
                    ])
                ),
                ..AgentConfig::default()
            },
            rtmp: true,
            ..OriginOptions::default()
        },
    ) else {
        return;
    };
    let publisher_from = Ipv4Addr::new(127, 0, 0, 20);
    let (alice_from, dave_from) = (Ipv4Addr::new(127, 0, 0, 30), Ipv4Addr::new(127, 0, 0, 31));
    let live = format!("rtmp://127.0.0.1:{}/live/{LIVE}", ports.rtmp);
    let mut publisher = origin.audience.spawn(
        "publisher",
        publisher_from,
        "ffmpeg",
        &[
            "-hide_banner",
            "-nostdin",
            "-nostats",
            "-loglevel",
            "info",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=44100",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            "25",
            "-c:a",
            "aac",
            "-b:a",
            "64k",
            "-f",
            "flv",
            &live,
        ],
    );
    let on_air = wait_until(Duration::from_secs(20), || {
        origin
            .relay_entries()
            .iter()
            .any(|r| r.call == "publish" && r.status == 200)
    });
    assert!(
        on_air,
        "the publisher did not get on air within 20 s; its output:\n{}\nnginx:\n{}",
        publisher.proc.output_tail(20),
        origin.nginx.error_log_tail(20)
    );
    // A key frame or two, so players start at once.
    thread::sleep(Duration::from_secs(2));

    let out = |who: &str| origin.env.dir().join(format!("{who}.flv"));
    let (alice_out, dave_out) = (out("alice"), out("dave"));
    let args = |who: &str, file: &std::path::Path, seconds| {
        rtmp_player(
            &format!("{live}?account={who}"),
            &file.to_string_lossy(),
            seconds,
        )
    };
    let alice_args = args("alice", &alice_out, 12);
    let dave_args = args("dave", &dave_out, 40);
    let mut alice = origin
        .audience
        .spawn("alice", alice_from, "ffmpeg", &alice_args);
    let mut dave = origin
        .audience
        .spawn("dave", dave_from, "ffmpeg", &dave_args);
    let (mut alice_exit, mut dave_exit) = (None, None);
    wait_until(Duration::from_secs(45), || {
        if alice_exit.is_none() {
            alice_exit = alice.proc.try_wait().map(|s| (s, now_ms()));
        }
        if dave_exit.is_none() {
            dave_exit = dave.proc.try_wait().map(|s| (s, now_ms()));
        }
        alice_exit.is_some() && dave_exit.is_some()
    });
    let (alice_status, _) = alice_exit.unwrap_or_else(|| {
        panic!(
            "alice's player did not finish within 45 s; its output:\n{}",
            alice.proc.output_tail(20)
        )
    });
    assert!(
        alice_status.success(),
        "alice's player failed ({alice_status}); its output:\n{}",
        alice.proc.output_tail(20)
    );
    let (_, dave_exit_ms) = dave_exit.unwrap_or_else(|| {
        panic!(
            "dave's player was not dropped within 45 s (its -t is 40 s of media); relay log: \
             {:#?}\nagent log:\n{}",
            origin.relay_entries(),
            origin.agent.log_tail(20)
        )
    });

    // meterd's answers, as the relay logged them.
    let relay = origin.relay_entries();
    let of = |addr: Ipv4Addr| -> Vec<_> {
        relay
            .iter()
            .filter(|r| r.addr == addr.to_string())
            .cloned()
            .collect()
    };
    let (alice_calls, dave_calls) = (of(alice_from), of(dave_from));
    assert!(
        alice_calls.iter().any(|r| r.call == "update_play")
            && alice_calls
                .iter()
                .all(|r| r.status == 200 && r.account.as_deref() == Some("alice")),
        "alice's callbacks: {alice_calls:#?}"
    );
    let first_403 = dave_calls
        .iter()
        .position(|r| r.status == 403)
        .unwrap_or_else(|| panic!("meterd never refused dave: {dave_calls:#?}"));
    let refusal = &dave_calls[first_403];
    assert!(
        refusal.call == "update_play"
            && dave_calls[..first_403].iter().all(|r| r.status == 200)
            && dave_calls[0].call == "play",
        "dave's callbacks: {dave_calls:#?}"
    );
    let limit = origin.events("limit_reached");
    let dave_limit = limit
        .iter()
        .find(|(id, ..)| id == &format!("limit_reached:dave:{DAVE_PREPAID}"))
        .unwrap_or_else(|| panic!("no limit_reached event for dave: {limit:?}"));
    assert!(
        dave_limit.1 <= refusal.at_ms,
        "meterd refused dave ({refusal:?}) before his limit_reached event ({dave_limit:?})"
    );
    assert!(
        dave_exit_ms - refusal.at_ms <= 3_000,
        "dave's player exited {} ms after meterd's 403 to on_update: nginx-rtmp did not drop it",
        dave_exit_ms - refusal.at_ms
    );
    eprintln!(
        "adm-rtmp: dave's limit_reached at +0 ms, 403 to {} at +{} ms, his player exited at +{} \
         ms",
        refusal.call,
        refusal.at_ms - dave_limit.1,
        dave_exit_ms - dave_limit.1
    );

    // Someone else behind dave's address (a NAT) fetches a page of the
    // HLS server that nginx serves without asking meterd: billed to the
    // address, like any unattributed connection, whatever meterd refused
    // dave a moment ago.
    let neighbour = origin.curl(dave_from, "/no-such-page");
    assert_eq!(neighbour.status, 404, "the neighbour's request");

    // A top-up, and dave plays again.
    let (status, answer) = origin.credit("dave", "dave-top-up", 100_000);
    assert_eq!(
        (status, answer["standing"].as_str()),
        (200, Some("ok")),
        "dave's top-up: {answer}"
    );
    let again_out = out("dave-again");
    let again_args = args("dave", &again_out, 4);
    let mut again = origin
        .audience
        .spawn("dave-again", dave_from, "ffmpeg", &again_args);
    let status = again.proc.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "dave's player after the top-up: {status:?}; its output:\n{}\nrelay: {:#?}",
        again.proc.output_tail(20),
        origin.relay_entries()
    );
    publisher.proc.signal(libc::SIGINT);
    if publisher
        .proc
        .wait_timeout(Duration::from_secs(5))
        .is_none()
    {
        publisher.proc.kill();
    }

    // nginx-rtmp's records of every session, once all have ended.
    let mut sessions = Vec::new();
    let ended = wait_until(Duration::from_secs(10), || {
        sessions = origin.rtmp_entries();
        sessions.len() >= 4
    });
    assert!(ended, "nginx-rtmp logged {sessions:#?}");
    let mut want: Vec<(Ipv4Addr, &str, u64, u64, i64)> = sessions
        .iter()
        .map(|s| {
            let who = match s.remote_addr {
                a if a == alice_from => "alice",
                a if a == dave_from => "dave",
                _ => "",
            };
            (s.remote_addr, who, s.bytes_sent, s.bytes_received, s.end_ms)
        })
        .collect();
    want.sort_by_key(|w| (w.0, w.4));
    assert_eq!(
        want.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>(),
        [
            (publisher_from, ""),
            (alice_from, "alice"),
            (dave_from, "dave"),
            (dave_from, "dave")
        ],
        "nginx-rtmp's sessions: {sessions:#?}"
    );
    let flv = std::fs::metadata(&alice_out).map_or(0, |m| m.len());
    assert!(
        flv > 0 && flv <= want[1].2 + (64 << 10),
        "alice's ffmpeg wrote {flv} bytes of FLV; nginx-rtmp sent her {}",
        want[1].2
    );

    // The ledger, per connection, in the order of nginx-rtmp's sessions.
    // Every part settled: in an exported session, or in none (billed to
    // nobody) for good.
    let ledger = wait_ledger(&origin, SETTLE_TIMEOUT, |l| {
        let conns: BTreeSet<SocketAddr> = l.connections.iter().map(conn_of).collect();
        conns.len() >= 5
            && l.connections
                .iter()
                .all(|r| r.session_id.is_empty() || l.session(&r.session_id).is_some())
    });
    let mut by_conn: BTreeMap<SocketAddr, (String, Vec<&ConnectionRecord>)> = BTreeMap::new();
    for r in ledger
        .connections
        .iter()
        .filter(|r| r.server_port == ports.rtmp)
    {
        by_conn
            .entry(conn_of(r))
            .or_insert_with(|| (r.started_at.clone(), Vec::new()))
            .1
            .push(r);
    }
    let mut conns: Vec<(SocketAddr, String, Vec<&ConnectionRecord>)> = by_conn
        .into_iter()
        .map(|(c, (started, parts))| (c, started, parts))
        .collect();
    conns.sort_by_key(|c| (c.0.ip(), rfc3339_utc_ms(&c.1).unwrap_or(0)));
    let mut problems = Vec::new();
    if conns.len() != want.len() {
        problems.push(format!(
            "meterd has {} RTMP connections, nginx-rtmp logged {}",
            conns.len(),
            want.len()
        ));
    }
    for ((addr, who, sent, received, _), (conn, _, parts)) in want.iter().zip(&conns) {
        let out: u64 = parts.iter().map(|p| p.bytes_out).sum();
        let inn: u64 = parts.iter().map(|p| p.bytes_in).sum();
        // A part in no session is billed to nobody (a refused request's).
        let unsettled: Vec<_> = parts
            .iter()
            .filter(|p| ledger.session(&p.session_id).is_none())
            .collect();
        let sent_range = (sent + HANDSHAKE).saturating_sub(UNDELIVERED_AT_CLOSE)..=sent + HANDSHAKE;
        if conn.ip() != IpAddr::V4(*addr)
            || !sent_range.contains(&out)
            || inn != received + HANDSHAKE
            || !unsettled.is_empty()
        {
            problems.push(format!(
                "{addr} ({who}): nginx-rtmp sent {sent} and received {received} after the \
                 {HANDSHAKE}-byte handshake; meterd's connection {conn} has {out} out (want \
                 {sent_range:?}), {inn} in{}",
                if unsettled.is_empty() {
                    String::new()
                } else {
                    format!(", and parts billed to nobody (in no session): {unsettled:?}")
                }
            ));
        }
        let account = if who.is_empty() {
            addr.to_string()
        } else {
            (*who).to_owned()
        };
        let theirs: u64 = parts
            .iter()
            .filter(|p| p.account == account)
            .map(|p| p.bytes_out)
            .sum();
        let address: u64 = parts
            .iter()
            .filter(|p| p.account == addr.to_string())
            .map(|p| p.bytes_out)
            .sum();
        if !who.is_empty() && (theirs + address != out || address > BEFORE_PLAY)
            || who.is_empty() && theirs != out
        {
            problems.push(format!(
                "{addr}: of {out} bytes out, {theirs} are billed to {account}, {address} to the \
                 address (at most {BEFORE_PLAY} before on_play): {parts:?}"
            ));
        }
        if !who.is_empty() && parts.iter().any(|p| p.account == *who && p.content != LIVE) {
            problems.push(format!("{who}'s content is not {LIVE:?}: {parts:?}"));
        }
    }
    let neighbour_sent: u64 = origin
        .nginx
        .entries()
        .iter()
        .filter(|e| e.client() == neighbour.client)
        .map(|e| e.bytes_sent)
        .sum();
    let neighbour_parts: Vec<&ConnectionRecord> = ledger
        .connections
        .iter()
        .filter(|r| conn_of(r) == neighbour.client)
        .collect();
    let billed_to_address: u64 = neighbour_parts
        .iter()
        .filter(|p| p.account == dave_from.to_string() && ledger.session(&p.session_id).is_some())
        .map(|p| p.bytes_out)
        .sum();
    if billed_to_address != neighbour_sent {
        problems.push(format!(
            "the neighbour's request from {dave_from} (nginx sent {neighbour_sent} bytes, meterd \
             was not asked) is billed {billed_to_address} bytes to the address: {neighbour_parts:?}"
        ));
    }
    for s in &ledger.sessions {
        eprintln!(
            "adm-rtmp: {} {:?} from {}: {} B out, {} B in, charge {}",
            s.account, s.content, s.client_addr, s.bytes_out, s.bytes_in, s.charge_minor
        );
    }
    assert!(
        problems.is_empty(),
        "adm-rtmp:\n- {}\nnginx-rtmp: {want:?}\n{}",
        problems.join("\n- "),
        describe(&ledger)
    );
}

/// Issue 10, item 4: three accounts (prepaid 10, `on_limit = "notify"`)
/// each fetch a segment (38 kB at 1 minor unit per started kB), so each
/// crosses its limit: three `limit_reached` events. The webhook receiver
/// (in the test, on loopback) answers 500 to the first three deliveries
/// and goes down right after the third; the agent is killed (-9) and
/// started again while it is down, and the third account crosses after
/// the restart; then the receiver comes back. It must have acknowledged
/// every event of the ledger, by event id (header and body agree), none
/// other, each one's attempts spaced by the backoff, with at least one
/// event pending across the restart; and the outbox must be empty.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn webhook_gets_every_limit_event_despite_failures_and_a_restart() {
    let ports = Ports::of_slot(4);
    let receiver_at = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.webhook));
    let mut receiver = WebhookReceiver::start(receiver_at, 3, true);
    let Some(mut origin) = Origin::start(
        "adm-webhook",
        traffic_bin!(),
        ports,
        &OriginOptions {
            agent: AgentConfig {
                services: vec![service("hls", ports.hls, per_started("1KB", 1_000))],
                extra_toml: accounts(&[
                    ("w1", 10, Some("notify")),
                    ("w2", 10, Some("notify")),
                    ("w3", 10, Some("notify")),
                ]),
                ..AgentConfig::default()
            },
            webhook: Some(format!("http://{receiver_at}/meterd/limit")),
            ..OriginOptions::default()
        },
    ) else {
        return;
    };
    let segment = origin.vod.segments[0].uri.clone();
    for who in ["w1", "w2"] {
        let fetch = origin.curl(Ipv4Addr::LOCALHOST, &origin.signed(who, &segment));
        assert_eq!(fetch.status, 200, "{who}'s request");
    }
    let down = wait_until(Duration::from_secs(30), || receiver.is_down());
    assert!(
        down,
        "the receiver did not get three deliveries within 30 s: {:#?}\nagent log:\n{}",
        receiver.received(),
        origin.agent.log_tail(20)
    );
    let killed = Instant::now();
    origin.agent.kill9();
    thread::sleep(Duration::from_secs(1));
    origin.agent.start();
    let restarted = Instant::now();
    let fetch = origin.curl(Ipv4Addr::LOCALHOST, &origin.signed("w3", &segment));
    assert_eq!(fetch.status, 200, "w3's request");
    let three = wait_until(Duration::from_secs(20), || {
        origin.events("limit_reached").len() == 3
    });
    assert!(
        three,
        "limit_reached events: {:?}",
        origin.events("limit_reached")
    );
    // Still down a little longer: the deliveries due meanwhile are refused.
    thread::sleep(Duration::from_secs(2));
    receiver.up();
    let up = Instant::now();

    let ids: BTreeSet<String> = origin
        .events("limit_reached")
        .into_iter()
        .map(|(id, ..)| id)
        .collect();
    let acked = |r: &WebhookReceiver| -> BTreeSet<String> {
        r.received()
            .iter()
            .filter(|d| d.status == 200)
            .filter_map(|d| d.header_id.clone())
            .collect()
    };
    let all = wait_until(Duration::from_secs(60), || acked(&receiver) == ids);
    // Anything more would come now, within a backoff step or two.
    thread::sleep(Duration::from_secs(3));
    let deliveries = receiver.received();
    let mut problems = Vec::new();
    if !all || acked(&receiver) != ids {
        problems.push(format!(
            "the receiver acknowledged {:?}; the ledger's events are {ids:?}",
            acked(&receiver)
        ));
    }
    let failures = deliveries.iter().filter(|d| d.status == 500).count();
    if failures != 3 {
        problems.push(format!("{failures} deliveries failed with 500, want 3"));
    }
    for d in &deliveries {
        let body_id = d.body["event_id"].as_str();
        let id = d.header_id.as_deref().unwrap_or("");
        let account = id.split(':').nth(1).unwrap_or("");
        if body_id != Some(id)
            || d.body["event"].as_str() != Some("limit_reached")
            || d.body["account"].as_str() != Some(account)
            || d.body["limit_minor"].as_u64() != Some(10)
        {
            problems.push(format!(
                "a delivery's X-Meterd-Event-Id {:?} and body disagree: {}",
                d.header_id, d.body
            ));
        }
    }
    let mut by_id: BTreeMap<&str, Vec<&admission::Received>> = BTreeMap::new();
    for d in &deliveries {
        by_id
            .entry(d.header_id.as_deref().unwrap_or(""))
            .or_default()
            .push(d);
    }
    for (id, attempts) in &by_id {
        for pair in attempts.windows(2) {
            let gap = pair[1].at - pair[0].at;
            if gap < Duration::from_millis(900) {
                problems.push(format!(
                    "{id}: two attempts {} ms apart, less than the first backoff step (1 s)",
                    gap.as_millis()
                ));
            }
        }
        let after_ack = attempts
            .iter()
            .skip_while(|d| d.status != 200)
            .skip(1)
            .count();
        eprintln!(
            "adm-webhook: {id}: {} attempt(s) received: {:?}; {after_ack} more after its 2xx",
            attempts.len(),
            attempts
                .iter()
                .map(|d| (d.status, (d.at - killed.min(d.at)).as_millis()))
                .collect::<Vec<_>>()
        );
    }
    let across = by_id.values().any(|attempts| {
        attempts.first().is_some_and(|d| d.at < killed)
            && attempts.iter().any(|d| d.status == 200 && d.at > restarted)
    });
    if !across {
        problems.push(
            "no event was tried before the kill and acknowledged after the restart: the outbox \
             was not carried across it"
                .to_owned(),
        );
    }
    let undelivered = meterd_tests::ledger::sqlite(
        origin.agent.ledger_path(),
        "SELECT event_id, target, attempts FROM deliveries WHERE delivered_ms IS NULL",
    );
    if !undelivered.is_empty() {
        problems.push(format!(
            "deliveries still pending in the outbox: {undelivered:?}"
        ));
    }
    let pending = origin
        .agent
        .scrape()
        .value("meterd_event_deliveries_pending", &[]);
    if pending != Some(0.0) {
        problems.push(format!("meterd_event_deliveries_pending is {pending:?}"));
    }
    eprintln!(
        "adm-webhook: receiver down for {} ms; acknowledged {} events in {} requests",
        (up - killed).as_millis(),
        ids.len(),
        deliveries.len()
    );
    assert!(
        problems.is_empty(),
        "adm-webhook:\n- {}\nreceived: {deliveries:#?}\nagent log:\n{}",
        problems.join("\n- "),
        origin.agent.log_tail(30)
    );
}

/// The requests of item 5, as curl arguments: (what, path, arguments).
fn api_requests(server_port: u16) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let header = |h: &str| vec!["-H".to_owned(), h.to_owned()];
    let mut authorize = header("X-Meterd-Client: 10.9.9.9:40000");
    authorize.extend(header(&format!("X-Meterd-Server-Port: {server_port}")));
    authorize.extend(header("X-Meterd-Account: mallory"));
    let attribute = vec![
        "-H".to_owned(),
        "content-type: application/json".to_owned(),
        "-d".to_owned(),
        format!(
            "{{\"client_addr\":\"10.9.9.8\",\"client_port\":40001,\"server_port\":{server_port},\
             \"account\":\"mallory\"}}"
        ),
    ];
    vec![
        ("read status", "/v1/status", Vec::new()),
        ("authorize", "/v1/authorize", authorize),
        ("attribute", "/v1/attribute", attribute),
    ]
}

/// Issue 10, item 5: the API socket is root:www-data 0660. `nobody`
/// (outside the group, no supplementary groups) cannot connect to it to
/// read the status, authorize or attribute (EACCES), and nothing it tried
/// reached the agent (no attribution pending); www-data (its group) can
/// do all three (two attributions now pending); the metrics port does not
/// serve the status.
#[test]
fn api_socket_refuses_users_outside_its_group() {
    let Some(env) = TestEnv::new("adm-socket", traffic_bin!(), Setup::default()) else {
        return;
    };
    let server_port = port(5, 0);
    let agent = admission::start_agent(
        &env,
        &AgentConfig {
            tcp_ports: vec![server_port],
            ..AgentConfig::default()
        },
        "",
        None,
    );
    let socket = std::path::PathBuf::from(agent.ready().api);
    assert_eq!(
        admission::socket_mode_and_group(&socket),
        (0o660, WWW_DATA.1),
        "{} with api.group = \"www-data\"",
        socket.display()
    );
    let pending = || agent.scrape().value("meterd_attributions_pending", &[]);
    let mut problems = Vec::new();
    for (what, path, args) in api_requests(server_port) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = curl_unix_as(NOBODY.0, NOBODY.1, &socket, path, &args);
        if !r.permission_denied() {
            problems.push(format!(
                "nobody could {what}: curl exit {}, HTTP {}: {}",
                r.code, r.status, r.stderr
            ));
        }
    }
    // The gauge is the cycle's: wait for two cycles.
    let interval = agent.config().interval;
    thread::sleep(interval * 2 + Duration::from_millis(200));
    if pending() != Some(0.0) {
        problems.push(format!(
            "after nobody's attempts, {:?} attributions are pending (want 0)",
            pending()
        ));
    }
    for (what, path, args) in api_requests(server_port) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = curl_unix_as(WWW_DATA.0, WWW_DATA.1, &socket, path, &args);
        let want = if path == "/v1/authorize" { 204 } else { 200 };
        if r.code != 0 || r.status != want {
            problems.push(format!(
                "www-data could not {what}: curl exit {}, HTTP {} (want {want}): {}",
                r.code, r.status, r.stderr
            ));
        }
    }
    wait_until(interval * 3 + Duration::from_secs(1), || {
        pending() == Some(2.0)
    });
    if pending() != Some(2.0) {
        problems.push(format!(
            "after www-data's authorize and attribute of unseen connections, {:?} attributions \
             are pending (want 2)",
            pending()
        ));
    }
    let metrics = agent.ready().metrics;
    let status = meterd_tests::http::get(metrics, "/v1/status")
        .unwrap_or_else(|e| panic!("GET http://{metrics}/v1/status: {e}"));
    if status.status == 200 {
        problems.push(format!(
            "the metrics port serves /v1/status: {}",
            status.body
        ));
    }
    assert!(
        problems.is_empty(),
        "adm-socket:\n- {}\nagent log:\n{}",
        problems.join("\n- "),
        agent.log_tail(20)
    );
    drop(agent);
}

/// `api.max_pending` in item 5's flood.
const MAX_PENDING: u32 = 10_000;

/// Bogus attributions sent in item 5's flood.
const FLOOD: u32 = 100_000;

/// How much the agent's RSS may grow over the flood.
const RSS_BUDGET_KIB: u64 = 50 << 10;

/// Mean cycle time (histogram sum and count deltas) over `window`.
fn mean_cycle(agent: &meterd_tests::Agent, window: Duration) -> (f64, f64) {
    let read = |e: &Exposition| {
        (
            e.value("meterd_cycle_duration_seconds_sum", &[])
                .unwrap_or(0.0),
            e.value("meterd_cycle_duration_seconds_count", &[])
                .unwrap_or(0.0),
        )
    };
    let (s0, c0) = read(&agent.scrape());
    thread::sleep(window);
    let (s1, c1) = read(&agent.scrape());
    assert!(c1 - c0 >= 3.0, "only {} cycles in {window:?}", c1 - c0);
    ((s1 - s0) / (c1 - c0), c1 - c0)
}

/// Issue 10, item 5: with 100 live metered connections, 100 000 bogus
/// attributions (distinct tuples no connection has) from four keep-alive
/// clients at once: exactly `max_pending` (10 000) are kept, the rest
/// refused with 503 (also one more afterwards), the agent's RSS grows by
/// less than 50 MiB, and the billing cycle takes no longer than before
/// (mean over a few seconds each, at most 3 times the time before plus
/// 5 ms: a cycle that scanned the pending attributions per connection
/// would take far longer).
#[test]
fn bogus_pending_attributions_are_bounded_in_number_memory_and_cycle_time() {
    let Some(mut env) = TestEnv::new(
        "adm-flood",
        traffic_bin!(),
        Setup {
            netns: true,
            nft: false,
        },
    ) else {
        return;
    };
    let server_port = port(6, 0);
    let agent = admission::start_agent(
        &env,
        &AgentConfig {
            tcp_ports: vec![server_port],
            extra_toml: PINNED_INTERVAL.to_owned(),
            ..AgentConfig::default()
        },
        &format!("max_pending = {MAX_PENDING}\npending_ttl = \"10m\""),
        None,
    );
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server_port));
    let _server = env.tcp_server(&[addr]);
    let _clients = env.spawn_tcp_client(&TcpClient {
        count: 100,
        parallel: 100,
        hold_ms: 120_000,
        ..TcpClient::new(addr, 1_000, 0)
    });
    let live = wait_until(Duration::from_secs(20), || {
        agent.scrape().sum("meterd_connections_live", &[]) >= 100.0
    });
    assert!(live, "meterd does not see the 100 connections");
    let pid = admission::agent_pid(&agent);
    let (before, cycles_before) = mean_cycle(&agent, Duration::from_secs(6));
    let rss_before = admission::rss_kib(pid);
    let api = std::path::PathBuf::from(agent.ready().api);
    let started = Instant::now();
    let flood = flood_pending(&api, FLOOD, 4, server_port);
    let took = started.elapsed();
    let rss_after = admission::rss_kib(pid);
    let one_more = flood_pending(&api, 1, 1, server_port.wrapping_add(1));
    let pending = agent.scrape().value("meterd_attributions_pending", &[]);
    let (after, cycles_after) = mean_cycle(&agent, Duration::from_secs(6));
    let rss_end = admission::rss_kib(pid);
    eprintln!(
        "adm-flood: {FLOOD} attributions in {:.1} s: {} pending, {} refused, {} applied, {} other; \
         RSS {rss_before} KiB -> {rss_after} KiB -> {rss_end} KiB; cycle {:.2} ms ({cycles_before} \
         cycles) -> {:.2} ms ({cycles_after} cycles)",
        took.as_secs_f64(),
        flood.pending,
        flood.refused,
        flood.applied,
        flood.other_count,
        before * 1e3,
        after * 1e3
    );
    let mut problems = Vec::new();
    if (flood.pending, flood.refused, flood.other_count)
        != (MAX_PENDING as usize, (FLOOD - MAX_PENDING) as usize, 0)
    {
        problems.push(format!(
            "want {MAX_PENDING} pending and {} refused (503): {flood:?}",
            FLOOD - MAX_PENDING
        ));
    }
    if one_more.refused != 1 {
        problems.push(format!("one more after the flood: {one_more:?} (want 503)"));
    }
    if pending != Some(f64::from(MAX_PENDING)) {
        problems.push(format!("meterd_attributions_pending is {pending:?}"));
    }
    let grown = rss_after.max(rss_end).saturating_sub(rss_before);
    if grown > RSS_BUDGET_KIB {
        problems.push(format!(
            "the agent's RSS grew by {grown} KiB, more than {RSS_BUDGET_KIB} KiB"
        ));
    }
    if after > before * 3.0 + 0.005 {
        problems.push(format!(
            "the billing cycle took {:.2} ms on average with {MAX_PENDING} attributions \
             pending, {:.2} ms before",
            after * 1e3,
            before * 1e3
        ));
    }
    let log = agent.log();
    eprintln!(
        "adm-flood: agent log lines about refused attributions: {}",
        log.lines()
            .filter(|l| l.contains("pending") || l.contains("refus"))
            .count()
    );
    assert!(
        problems.is_empty(),
        "adm-flood:\n- {}\nagent log:\n{}",
        problems.join("\n- "),
        agent.log_tail(20)
    );
    drop(agent);
}

/// Asks `GET /v1/authorize` on the agent's unix socket as nginx's
/// `auth_request` does (one connection per request); returns the status.
fn authorize_on(
    socket: &std::path::Path,
    client: SocketAddr,
    server_port: u16,
    account: &str,
) -> u16 {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    write!(
        s,
        "GET /v1/authorize HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n\
         X-Meterd-Client: {client}\r\nX-Meterd-Server-Port: {server_port}\r\n\
         X-Meterd-Account: {account}\r\nX-Meterd-Content: crash-test\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
}

/// The crash rule of issue 10's last point: an attribution answered 204
/// is not lost by a `kill -9` of the agent right after the answer. A
/// client connects to a metered server, `/v1/authorize` names its
/// connection for alice (204), and the agent is killed at once, before its
/// next cycle could read the connection (so the attribution was only on
/// its way, or pending). While no agent runs, the server sends the
/// response (3 MB); the agent starts again. The connection's bytes, as
/// the server logged them, are billed to alice's session, none to the
/// client's address.
#[test]
fn admission_answered_204_survives_kill_9_of_the_agent() {
    use std::io::{Read as _, Write as _};
    let Some(mut env) = TestEnv::new("adm-crash", traffic_bin!(), Setup::default()) else {
        return;
    };
    let server_port = port(7, 0);
    let server_at = SocketAddr::from((Ipv4Addr::LOCALHOST, server_port));
    // A 2 s interval: the kill lands well before the next read.
    let config = AgentConfig {
        tcp_ports: vec![server_port],
        interval: Duration::from_secs(2),
        session_idle: Duration::from_secs(2),
        ..AgentConfig::default()
    };
    let mut agent = admission::start_agent(&env, &config, "", None);
    let server = env.tcp_server(&[server_at]);
    let socket = std::path::PathBuf::from(agent.ready().api);
    let down: u64 = 3_000_000;
    let mut stream = std::net::TcpStream::connect(server_at).unwrap();
    let client = stream.local_addr().unwrap();
    let status = authorize_on(&socket, client, server_port, "alice");
    agent.kill9();
    assert_eq!(status, 204, "/v1/authorize for {client}");

    // The response moves while no agent runs.
    stream
        .write_all(format!("GET {down} 0 client\n").as_bytes())
        .unwrap();
    let mut got = vec![0u8; usize::try_from(down).unwrap()];
    stream.read_exact(&mut got).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    drop(stream);
    thread::sleep(Duration::from_millis(300));
    agent.start();

    let started = Instant::now();
    let mut ledger = agent.ledger();
    while started.elapsed() < SETTLE_TIMEOUT
        && !ledger
            .connections
            .iter()
            .any(|c| conn_of(c) == client && ledger.session(&c.session_id).is_some())
    {
        thread::sleep(Duration::from_millis(500));
        ledger = agent.ledger();
    }
    let log = env.server_log(&server);
    let truth = log
        .iter()
        .find(|c| c.client_port == client.port())
        .unwrap_or_else(|| panic!("the server logged no connection from {client}: {log:?}"));
    let records: Vec<&ConnectionRecord> = ledger
        .connections
        .iter()
        .filter(|c| conn_of(c) == client)
        .collect();
    let billed: BTreeMap<&str, u64> = records.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.account.as_str()).or_default() += c.bytes_out;
        m
    });
    assert_eq!(
        billed,
        BTreeMap::from([("alice", truth.bytes_sent)]),
        "the connection's bytes out by account (the server sent {} bytes); the agent's log:\n{}\n{}",
        truth.bytes_sent,
        agent.log_tail(30),
        describe(&ledger)
    );
    let alice = sessions_of(&ledger, "alice");
    assert!(
        alice.len() == 1 && alice[0].bytes_out == truth.bytes_sent,
        "alice's sessions: {alice:?}"
    );
    agent.stop();
}
