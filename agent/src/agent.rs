//! The daemon: the loop that turns kernel counts into charges and settled
//! sessions.
//!
//! Every interval it reads the live maps (one batch read), refreshes the
//! session table, charges every live session for the whole units it used
//! since the last cycle (one ledger transaction), checks account limits, and
//! ends idle UDP flows. In between, it drains the ring buffer of closed
//! connections as records arrive and settles each one, and it serves the
//! attribution API's requests.
//!
//! `run` takes its shutdown as a future, so tests and `main` decide when it
//! stops; on shutdown it drains and bills once more and returns, leaving the
//! pins in place so the kernel keeps counting.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use meterd_common::{Counts, Stat, UdpFlow, UdpFlowKey};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    api::{self, ApiError, Command, Outcome},
    attribution::Pending,
    billing, clock,
    closed_log::{ClosedLog, ClosedLogError},
    config::Config,
    exporter::{self, ExporterError},
    governor::{CycleSignals, Pacer},
    hooks::{self, LimitReached},
    kernel::{self, Kernel, KernelError},
    ledger::{ChargeRow, Ledger, LedgerError, SessionRecord, SettledTotals, rfc3339},
    limits::Limits,
    load::{Load, LoadMonitor},
    metrics::{Metrics, Persisted, ServiceTotals, SharedMetrics},
    sessions::{self, Session, Sessions, Settled},
    status::{LiveSession, StatusReport, micro_to_decimal},
    tariff::MICRO,
};

/// Ledger `meta` key of the agent's own persisted counters.
const PERSISTED_KEY: &str = "metrics";

/// Options of `meterd run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Append a JSON line per settled session here.
    pub closed_log: Option<PathBuf>,
    /// Create this file once metering has started.
    pub ready_file: Option<PathBuf>,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Exporter(#[from] ExporterError),
    #[error(transparent)]
    ClosedLog(#[from] ClosedLogError),
    #[error(
        "another meterd (pid {pid}) is running with agent.pin_dir {pin_dir}: stop it first, or give this one its own pin_dir"
    )]
    AlreadyRunning { pin_dir: PathBuf, pid: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let _instance = lock_instance(&config.agent.pin_dir)?;
    let ledger = Ledger::open(&config.billing.ledger, &config.billing.currency)?;
    let mut kernel = Kernel::open(&config)?;
    tracing::info!(
        startup = ?kernel.startup,
        object = %kernel::object_version(),
        pin_dir = %kernel.pin_dir().display(),
        ledger = %config.billing.ledger.display(),
        services = config.services.len(),
        "metering"
    );
    let boot_id = clock::boot_id().map_err(io("reading the boot id"))?;
    let mut sessions = Sessions::new(&boot_id);
    let log = match &options.closed_log {
        Some(path) => {
            let (log, ids) = ClosedLog::open(path)?;
            sessions.remember_settled(sessions::cookies_of(&ids, &boot_id));
            Some(log)
        }
        None => None,
    };
    sessions.restore_accruals(ledger.open_accruals()?);
    let limits = Limits::new(
        &config.accounts,
        ledger.spent_by_account()?,
        ledger.accounts_with_event("limit_reached")?,
    );
    let persisted: Persisted = ledger
        .load_meta(PERSISTED_KEY)?
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default();
    let settled_totals = ledger.service_totals()?;
    let limit_events = ledger.event_count("limit_reached")?;
    let (api_tx, mut api_rx) = mpsc::channel(1024);
    let api_at = api::spawn(&config, api_tx.clone()).await?;
    tracing::info!(
        api = %api_at,
        open_sessions = sessions.restored_waiting(),
        "attribution API listening"
    );

    let ring = kernel
        .take_closed()
        .expect("a freshly opened Kernel holds its ring buffer");
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
    // owns the ring buffer, and never swaps it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| io("polling the CLOSED ring buffer")(e.into()))?;
    let metrics: SharedMetrics = Arc::new(Mutex::new(Metrics::default()));
    let pacer = Pacer::new(config.governor.clone(), config.agent.interval);
    let mut agent = Agent {
        config,
        kernel,
        sessions,
        ledger,
        limits,
        pending: Pending::default(),
        log,
        live: Vec::new(),
        udp: Vec::new(),
        // Unknown at start: look for closed entries left in LIVE.
        seen_stats: None,
        pacer,
        load_monitor: LoadMonitor::new(),
        load: Load::default(),
        persisted,
        settled_totals,
        limit_events,
        metrics: Arc::clone(&metrics),
    };
    agent.drain(ring.get_mut())?;
    agent.cycle()?;
    // Serve metrics only now: the first scrape already continues the
    // counters from the ledger and the kernel.
    let metrics_at = exporter::spawn(agent.config.metrics.listen, metrics, api_tx).await?;
    tracing::info!(metrics = %metrics_at, "metrics endpoint listening");
    if let Some(path) = &options.ready_file {
        std::fs::write(path, format!("api={api_at}\nmetrics={metrics_at}\n"))
            .map_err(io(format!("writing {}", path.display())))?;
    }

    let mut load_ticker = tokio::time::interval(agent.config.agent.interval);
    load_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io("polling the CLOSED ring buffer"))?;
                agent.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            Some(command) = api_rx.recv() => agent.command(command),
            _ = load_ticker.tick() => agent.sample_load(),
            _ = agent.pacer.tick() => {
                agent.drain(ring.get_mut())?;
                agent.cycle()?;
            }
        }
    }
    agent.stop(ring.get_mut())
}

/// The loop's state.
struct Agent {
    config: Config,
    kernel: Kernel,
    sessions: Sessions,
    ledger: Ledger,
    limits: Limits,
    pending: Pending,
    log: Option<ClosedLog>,
    /// Reused buffer of the live TCP read.
    live: Vec<(u64, Counts)>,
    /// Reused buffer of the UDP flow read.
    udp: Vec<(UdpFlowKey, UdpFlow)>,
    /// `STATS` at the previous cycle, to report what changed.
    seen_stats: Option<[u64; meterd_common::STAT_SLOTS as usize]>,
    /// Paces cycles at the interval the governor chooses.
    pacer: Pacer,
    load_monitor: LoadMonitor,
    /// The load at the end of the last cycle.
    load: Load,
    /// The agent's own counters, saved in the ledger every cycle.
    persisted: Persisted,
    /// What the ledger holds per service (kept up to date at settlement).
    settled_totals: HashMap<String, SettledTotals>,
    limit_events: u64,
    metrics: SharedMetrics,
}

/// Per-service sums over the live sessions, built while charging.
#[derive(Default)]
struct LiveTotals {
    bytes_out: u64,
    bytes_in: u64,
    charged_minor: u64,
    sessions: u64,
}

impl Agent {
    /// The last drain and cycle before exiting; the pins stay.
    fn stop(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), AgentError> {
        self.drain(ring)?;
        self.cycle()?;
        if let Some(socket) = self.config.api.socket_path(&self.config.agent) {
            let _ = std::fs::remove_file(socket);
        }
        tracing::info!(
            live = self.sessions.live_count(),
            "stopped; the kernel keeps counting"
        );
        Ok(())
    }

    /// Settles every queued close record. Each is committed to the ledger
    /// before its slot is released (the item's drop), so a crash
    /// re-delivers, never loses; the ledger ignores a re-delivered one.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<usize, AgentError> {
        let mut n = 0;
        while let Some(item) = ring.next() {
            if let Some(closed) = kernel::decode_closed(&item) {
                if let Some(settled) = self.sessions.close_tcp(&closed) {
                    self.settle(settled)?;
                }
            } else {
                tracing::error!(
                    len = item.len(),
                    "short record in CLOSED: object/agent mismatch"
                );
            }
            drop(item);
            n += 1;
        }
        Ok(n)
    }

    /// One billing cycle, timed, then the governor's decision.
    fn cycle(&mut self) -> Result<(), AgentError> {
        let started = Instant::now();
        let live_totals = self.bill()?;
        let took = started.elapsed();
        let overrun = self.pacer.overrun(tokio::time::Instant::now());
        // Decide on the load of the interval that just ended, not on the
        // periodic sample, which can be almost an interval old by now.
        self.load = self.load_monitor.sample();
        let change = self.pacer.cycle_finished(&CycleSignals {
            load: self.load,
            overrun,
        });
        self.interval_changed(change, overrun);
        self.persisted.observe_cycle(took, overrun);
        if let Ok(json) = serde_json::to_string(&self.persisted) {
            self.ledger.save_meta(PERSISTED_KEY, &json)?;
        }
        self.publish_metrics(&live_totals);
        Ok(())
    }

    /// A load sample, taken every base interval (skipped right after a
    /// cycle took one: a window of a few ms says little).
    fn sample_load(&mut self) {
        if self
            .load_monitor
            .since_last_sample()
            .is_some_and(|age| age < self.config.agent.interval / 2)
        {
            return;
        }
        self.load = self.load_monitor.sample();
        let change = self.pacer.sampled(&self.load);
        self.interval_changed(change, Duration::ZERO);
    }

    fn interval_changed(&mut self, change: Option<crate::governor::Change>, overrun: Duration) {
        let Some(c) = change else { return };
        tracing::info!(
            from_ms = c.from.as_millis(),
            to_ms = c.to.as_millis(),
            reason = c.reason.as_str(),
            cpu_pressure = self.load.cpu_pressure,
            runnable_per_cpu = self.load.runnable_per_cpu,
            overrun_ms = overrun.as_millis(),
            "interval {}",
            c.direction()
        );
        self.persisted
            .observe_change(c.direction(), c.reason.as_str());
        if let Ok(mut m) = self.metrics.lock() {
            m.interval = c.to;
            m.persisted.interval_changes = self.persisted.interval_changes.clone();
        }
    }

    /// Reads the kernel, settles what ended, charges what is live.
    fn bill(&mut self) -> Result<BTreeMap<u32, LiveTotals>, AgentError> {
        let stats = self.kernel.stats()?;
        let ring_full = Stat::RingFull as usize;
        let find_closed = self
            .seen_stats
            .is_none_or(|s| s[ring_full] != stats[ring_full]);
        self.report_stats(&stats);
        self.seen_stats = Some(stats);

        self.kernel.read_live(&mut self.live)?;
        let kernel = &self.kernel;
        let settled = self
            .sessions
            .apply_tcp_read(&self.live, find_closed, |cookie| {
                match kernel.info(cookie) {
                    Ok(info) => info,
                    Err(e) => {
                        tracing::warn!(cookie, error = %e, "INFO lookup failed");
                        None
                    }
                }
            });
        for s in settled {
            let cookie = s.session.cookie;
            self.settle(s)?;
            self.kernel.forget(cookie)?;
        }

        self.kernel.read_udp(&mut self.udp)?;
        let idle_ns = duration_ns(self.config.agent.udp_idle_timeout);
        let idle = self
            .sessions
            .apply_udp_read(&self.udp, clock::boot_ns(), idle_ns);
        for key in idle {
            // Taken atomically: a datagram after this starts a new flow.
            if let Some(last) = self.kernel.take_udp(&key)? {
                let settled = self.sessions.end_udp(&key, &last);
                self.settle(settled)?;
            }
        }

        if !self.pending.is_empty() {
            for s in self.sessions.live_mut() {
                if s.attribution.is_none() {
                    s.attribution = self.pending.take_for(s).map(Box::new);
                }
            }
            self.pending
                .expire(Instant::now(), self.config.api.pending_ttl);
        }
        let live_totals = self.charge()?;
        self.check_limits()?;
        Ok(live_totals)
    }

    /// Charges every live session for the whole units used since the last
    /// cycle, in one ledger transaction; returns the live sums per service
    /// (computed in the same pass) for the metrics.
    fn charge(&mut self) -> Result<BTreeMap<u32, LiveTotals>, AgentError> {
        let now_ns = clock::boot_ns();
        let boot_id = self.sessions.boot_id().to_owned();
        // (session id, service index, account, charge, accrual after it)
        let mut rows = Vec::new();
        let mut totals: BTreeMap<u32, LiveTotals> = BTreeMap::new();
        for s in self.sessions.live_mut() {
            let Some(service) = self.config.services.get(s.service as usize) else {
                continue;
            };
            let quantity = service.tariff.quantity(
                s.counts.bytes_out,
                s.counts.bytes_in,
                elapsed_ns(s.start_ns, now_ns),
            );
            let charge = billing::cycle_charge(&service.tariff, quantity, &mut s.accrual);
            let t = totals.entry(s.service).or_default();
            t.bytes_out += s.counts.bytes_out;
            t.bytes_in += s.counts.bytes_in;
            // Whole minor units only: the settled total can round a
            // fractional price down, and a counter must never go back.
            t.charged_minor += s.accrual.charged_micro / MICRO;
            t.sessions += 1;
            if let Some(charge) = charge {
                rows.push((
                    sessions::session_id(&boot_id, s),
                    s.service as usize,
                    s.account(),
                    charge,
                    s.accrual,
                ));
            }
        }
        let charges: Vec<ChargeRow<'_>> = rows
            .iter()
            .map(|(id, service, account, charge, accrual)| ChargeRow {
                session_id: id,
                seq: charge.seq,
                service: &self.config.services[*service].name,
                account,
                units: charge.units,
                amount_micro: charge.amount_micro,
                accrual: *accrual,
            })
            .collect();
        // If this commit fails the agent stops; a restart resumes from the
        // ledger, not from the accruals already raised in memory.
        self.ledger.record_cycle(SystemTime::now(), &charges)?;
        for (_, _, account, charge, _) in &rows {
            self.limits.add(
                account,
                i64::try_from(charge.amount_micro).unwrap_or(i64::MAX),
            );
        }
        Ok(totals)
    }

    /// Replaces the metrics snapshot.
    fn publish_metrics(&self, live: &BTreeMap<u32, LiveTotals>) {
        let stats = self.seen_stats.unwrap_or_default();
        let (ring_pending, ring_size) = self.kernel.ring_fill().unwrap_or_default();
        let mut services = BTreeMap::new();
        for (index, service) in self.config.services.iter().enumerate() {
            let settled = self
                .settled_totals
                .get(&service.name)
                .copied()
                .unwrap_or_default();
            let l = live.get(&(index as u32));
            let sum = |f: fn(&LiveTotals) -> u64| l.map_or(0, f);
            services.insert(
                service.name.clone(),
                (
                    service.tariff.kind().to_owned(),
                    ServiceTotals {
                        bytes_out: settled.bytes_out + sum(|t| t.bytes_out),
                        bytes_in: settled.bytes_in + sum(|t| t.bytes_in),
                        charged_minor: settled.charge_minor + sum(|t| t.charged_minor),
                        sessions_live: sum(|t| t.sessions),
                        sessions_settled: settled.sessions,
                    },
                ),
            );
        }
        let snapshot = Metrics {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            object: kernel::object_version(),
            currency: self.config.billing.currency.clone(),
            services,
            persisted: self.persisted.clone(),
            interval: self.pacer.interval(),
            base_interval: self.config.agent.interval,
            cpu_pressure: self.load.cpu_pressure,
            psi_some_avg10: self.load.psi_some_avg10,
            runnable_per_cpu: self.load.runnable_per_cpu,
            loadavg1_per_cpu: self.load.loadavg1_per_cpu,
            kernel: stats,
            live_map_entries: self.live.len() as u64,
            live_map_capacity: u64::from(self.config.agent.max_connections),
            ring_pending_bytes: ring_pending,
            ring_capacity_bytes: ring_size,
            limit_reached: self.limit_events,
            attributions_pending: self.pending.len() as u64,
            bpf_programs: self.kernel.program_stats(),
        };
        if let Ok(mut m) = self.metrics.lock() {
            *m = snapshot;
        }
    }

    /// The report of `GET /v1/status`.
    fn status(&self) -> StatusReport {
        let now_ns = clock::boot_ns();
        let live = self
            .sessions
            .live()
            .map(|s| LiveSession {
                session_id: self.sessions.id(s),
                service: self
                    .config
                    .services
                    .get(s.service as usize)
                    .map_or_else(String::new, |svc| svc.name.clone()),
                account: s.account(),
                content: s.content().to_owned(),
                protocol: s.protocol.as_str().to_owned(),
                client: s.client().to_string(),
                server: s.server().to_string(),
                bytes_out: s.counts.bytes_out,
                bytes_in: s.counts.bytes_in,
                duration_ms: elapsed_ns(s.start_ns, now_ns) / 1_000_000,
                accrued_minor: micro_to_decimal(s.accrual.charged_micro),
            })
            .collect();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            currency: self.config.billing.currency.clone(),
            interval_ms: ms(self.pacer.interval()),
            base_interval_ms: ms(self.config.agent.interval),
            cpu_pressure: self.load.cpu_pressure,
            runnable_per_cpu: self.load.runnable_per_cpu,
            loadavg1_per_cpu: self.load.loadavg1_per_cpu,
            cycles: self.persisted.cycles,
            overruns: self.persisted.overruns,
            live,
        }
    }

    /// The patent's check processing: accounts that ran out.
    fn check_limits(&mut self) -> Result<(), AgentError> {
        for (account, spent_minor, limit_minor) in self.limits.check() {
            let event = LimitReached {
                event: "limit_reached",
                account,
                spent_minor,
                limit_minor,
                currency: self.config.billing.currency.clone(),
            };
            tracing::warn!(
                account = %event.account,
                spent_minor,
                limit_minor,
                "limit_reached"
            );
            let detail = serde_json::to_string(&event).unwrap_or_default();
            self.ledger.record_event(
                SystemTime::now(),
                "limit_reached",
                &event.account,
                &detail,
            )?;
            hooks::fire(
                &event,
                self.config.billing.limit_hook.clone(),
                self.config.billing.limit_webhook.as_deref(),
            );
        }
        Ok(())
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Attribute {
                conn,
                attribution,
                reply,
            } => {
                let outcome = if self.sessions.attribute(conn, &attribution) {
                    Outcome::Applied
                } else {
                    self.pending.add(conn, attribution, Instant::now());
                    Outcome::Pending
                };
                let _ = reply.send(outcome);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Settles a session: the tariff applied to its total, minus what the
    /// cycles charged, in the ledger; then the optional log.
    fn settle(&mut self, mut settled: Settled) -> Result<(), AgentError> {
        if settled.session.attribution.is_none() {
            settled.session.attribution = self.pending.take_for(&settled.session).map(Box::new);
        }
        let s = &settled.session;
        let Some(service) = self.config.services.get(s.service as usize) else {
            tracing::error!(id = %settled.id, service = s.service, "session of an unknown service: not billed");
            return Ok(());
        };
        let duration_ns = elapsed_ns(s.start_ns, settled.end_ns);
        let quantity = service
            .tariff
            .quantity(s.counts.bytes_out, s.counts.bytes_in, duration_ns);
        let amounts = billing::settle(&service.tariff, quantity, &s.accrual);
        let account = s.account();
        let record = session_record(
            s,
            &settled,
            service.name.clone(),
            &account,
            duration_ns,
            &amounts,
            &self.config.billing.currency,
        );
        if !self.ledger.record_settlement(&record, SystemTime::now())? {
            tracing::debug!(id = %settled.id, "already settled: ignored");
            return Ok(());
        }
        self.limits.add(&account, amounts.adjustment_micro);
        let totals = self.settled_totals.entry(service.name.clone()).or_default();
        totals.sessions += 1;
        totals.bytes_out += s.counts.bytes_out;
        totals.bytes_in += s.counts.bytes_in;
        totals.charge_minor += amounts.total_minor;
        tracing::info!(
            target: "meterd::settled",
            id = %settled.id,
            service = %service.name,
            account = %account,
            protocol = s.protocol.as_str(),
            client = %s.client(),
            server = %s.server(),
            bytes_out = s.counts.bytes_out,
            bytes_in = s.counts.bytes_in,
            duration_ms = duration_ns / 1_000_000,
            charge_minor = amounts.total_minor,
            "session settled"
        );
        if let Some(log) = &mut self.log {
            log.write(&settled, &service.name)?;
        }
        Ok(())
    }

    /// Logs every kernel-side loss or overflow once, when it changes.
    fn report_stats(&self, stats: &[u64; meterd_common::STAT_SLOTS as usize]) {
        let before = self.seen_stats.unwrap_or_default();
        let grew = |s: Stat| stats[s as usize].saturating_sub(before[s as usize]);
        let n = grew(Stat::LiveFull);
        if n > 0 {
            tracing::warn!(
                connections = n,
                "live-connection map full: these are billed at close without a start time; raise agent.max_connections"
            );
        }
        let n = grew(Stat::RingFull);
        if n > 0 {
            tracing::warn!(
                connections = n,
                "close ring buffer full: records kept in the live map and collected by the next read"
            );
        }
        let n = grew(Stat::Lost);
        if n > 0 {
            tracing::error!(
                connections = n,
                "close records LOST: ring buffer full and no live entry to keep them in"
            );
        }
        let n = grew(Stat::UdpFull);
        if n > 0 {
            tracing::error!(
                datagrams = n,
                "UDP flow map full: datagrams of new flows not counted"
            );
        }
    }
}

fn session_record(
    s: &Session,
    settled: &Settled,
    service: String,
    account: &str,
    duration_ns: u64,
    amounts: &billing::Settlement,
    currency: &str,
) -> SessionRecord {
    let started = if s.start_ns == 0 {
        clock::wall_time(settled.end_ns)
    } else {
        clock::wall_time(s.start_ns)
    };
    SessionRecord {
        session_id: settled.id.clone(),
        service,
        account: account.to_owned(),
        content: s.content().to_owned(),
        protocol: s.protocol.as_str().to_owned(),
        client_addr: s.client().ip().to_string(),
        client_port: s.client_port,
        server_addr: s.server().ip().to_string(),
        server_port: s.server_port,
        started_at: rfc3339(started),
        ended_at: rfc3339(clock::wall_time(settled.end_ns)),
        bytes_out: s.counts.bytes_out,
        bytes_in: s.counts.bytes_in,
        duration_ms: duration_ns / 1_000_000,
        charge_minor: amounts.total_minor,
        currency: currency.to_owned(),
        cycles_micro: amounts.cycles_micro,
        adjustment_micro: amounts.adjustment_micro,
        flags: settled.flags,
    }
}

/// Takes the exclusive lock of the agent for `pin_dir`: two agents on the
/// same pins would split one ring buffer between them. The lock file lives
/// in /run/meterd (tmpfs) and holds the owner's pid; the lock goes with the
/// process, also on kill -9.
pub fn lock_instance(pin_dir: &std::path::Path) -> Result<std::fs::File, AgentError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let name = pin_dir
        .file_name()
        .map_or_else(|| "meterd".into(), |n| n.to_string_lossy().into_owned());
    let path = PathBuf::from(format!("/run/meterd/{name}.lock"));
    std::fs::create_dir_all("/run/meterd").map_err(io("creating /run/meterd"))?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(AgentError::AlreadyRunning {
            pin_dir: pin_dir.to_owned(),
            pid: pid.trim().to_owned(),
        });
    }
    file.set_len(0)
        .map_err(io(format!("writing {}", path.display())))?;
    file.rewind()
        .map_err(io(format!("writing {}", path.display())))?;
    write!(file, "{}", std::process::id()).map_err(io(format!("writing {}", path.display())))?;
    Ok(file)
}

/// Connection time so far; 0 when the start is unknown (`CONN_UNTRACKED`).
fn elapsed_ns(start_ns: u64, now_ns: u64) -> u64 {
    if start_ns == 0 {
        0
    } else {
        now_ns.saturating_sub(start_ns)
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
