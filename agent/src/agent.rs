//! The daemon's run loop: the only place that talks to the kernel, the
//! ledger and the sockets. The billing itself is the [`Core`]'s.
//!
//! Every interval it reads the live maps, drains the ring of close and gap
//! records, hands both to the core, lets the core charge and settle, and
//! commits what the core staged in one ledger transaction. In between, it
//! drains the ring as records arrive (each committed before its release:
//! see [`kernel::Record`]), serves API commands, and applies the
//! admissions the API answered on its own thread (see [`crate::admission`]).
//!
//! `run` takes its shutdown as a future, so tests and `main` decide when it
//! stops; on shutdown it drains and bills once more and returns, leaving the
//! pins in place so the kernel keeps counting.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use meterd_common::{CONN_CLOSED, Closed, Counts, Stat, UdpFlow, UdpFlowKey, UdpStat};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    admission::{Admission, Gate},
    api::{self, ApiError, Command, CreditReply},
    attribution::Pending,
    clock,
    closed_log::{ClosedLog, ClosedLogError},
    config::Config,
    core::{self, Batch, ConnKey, Core, LiveTotals, ServiceDef},
    exporter::{self, ExporterError},
    fleet::{self, Fleet},
    governor::{CycleSignals, Pacer},
    hooks,
    journal::{Entry, Journal, JournalError},
    kernel::{self, Closes, Kernel, KernelError, Record},
    ledger::{Checkpointer, Committed, Ledger, LedgerError, SettledTotals},
    limits::{Limits, Standing},
    load::{Load, LoadMonitor},
    metrics::{Metrics, Persisted, ServiceTotals, SharedMetrics},
    status::{AccountStatus, LiveSession, StatusReport, micro_to_decimal},
};

/// Ledger `meta` key of the agent's own persisted counters.
const PERSISTED_KEY: &str = "metrics";

/// How often the ledger's WAL is checkpointed (off the run loop): this
/// bounds the WAL's size and what a power loss can take back.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Options of `meterd run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Append a JSON line per closed connection here.
    pub closed_log: Option<PathBuf>,
    /// Create this file once metering has started.
    pub ready_file: Option<PathBuf>,
    /// The config file, for the record client commands find the agent by.
    pub config_path: Option<PathBuf>,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(
        "{0}; the kernel keeps counting and keeps the record that was being settled: fix the ledger and start meterd again, it bills the backlog"
    )]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Exporter(#[from] ExporterError),
    #[error(transparent)]
    ClosedLog(#[from] ClosedLogError),
    #[error(
        "{0}; answered admissions are replayed from it at the next start: fix it (disk space, permissions of the ledger's directory) and start meterd again"
    )]
    Journal(#[from] JournalError),
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

/// The services as the core bills them, in the config's (the kernel's) order.
pub fn service_defs(config: &Config) -> Vec<ServiceDef> {
    config
        .services
        .iter()
        .map(|s| ServiceDef {
            name: Arc::from(s.name.as_str()),
            tariff: s.tariff.clone(),
            idle_ns: duration_ns(s.session_idle),
            tcp_ports: s.tcp_ports.clone(),
            udp_ports: s.udp_ports.clone(),
            on_limit: s.on_limit,
            bill_unattributed: s.bill_unattributed,
        })
        .collect()
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    // Before the lock, whose path a non-root user cannot open: the error
    // that names the fix comes first.
    kernel::system::check_privileges().map_err(KernelError::from)?;
    let (_instance, instance_name) = lock_instance(&config.agent.pin_dir)?;
    let ledger = Ledger::open(&config.billing.ledger, &config.billing.currency)?;
    let _checkpointer = Checkpointer::spawn(&config.billing.ledger, CHECKPOINT_INTERVAL)?;
    let boot_id = clock::boot_id().map_err(io("reading the boot id"))?;
    let mut ledger = ledger;
    let mut core = open_core(&config, &mut ledger, &boot_id)?;
    let (gate, admit_rx, replayed_count) = open_admissions(&config, &mut core)?;
    let fleet = start_fleet(&config, &mut ledger)?;
    // The API is bound before anything is attached: a start it refuses (a
    // path that is not a socket, a socket in use) leaves nothing behind.
    // Requests for the loop wait in the channel until the loop runs;
    // admissions are answered from the standings already.
    let (api_tx, api_rx) = mpsc::channel(1024);
    let api_server = api::spawn(&config, api_tx.clone(), Arc::clone(&gate)).await?;
    let api_at = api_server.at.clone();
    let mut kernel = Kernel::open(&config)?;
    tracing::info!(
        startup = ?kernel.startup,
        object = %kernel::object_version(),
        pin_dir = %kernel.pin_dir().display(),
        ledger = %config.billing.ledger.display(),
        services = config.services.len(),
        "metering"
    );
    let (log, log_ids) = match &options.closed_log {
        Some(path) => {
            let (log, ids) = ClosedLog::open(path)?;
            (Some(log), ids)
        }
        None => (None, HashSet::new()),
    };
    let persisted: Persisted = ledger
        .load_meta(PERSISTED_KEY)?
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default();
    let refused_base = persisted.attributions_refused;
    let settled_totals = ledger.service_totals()?;
    let limit_events = ledger.event_count("limit_reached")?;

    tracing::info!(
        api = %api_at,
        open_sessions = core.viewers().count(),
        open_connections = core.restored_waiting(),
        replayed_admissions = replayed_count,
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
        core,
        ledger,
        log,
        log_ids,
        redelivery: true,
        delivering: HashSet::new(),
        live: Vec::new(),
        udp: Vec::new(),
        // Unknown at start: look for closed entries left in LIVE.
        seen_stats: None,
        seen_udp_stats: None,
        pacer,
        load_monitor: LoadMonitor::new(),
        load: Load::default(),
        persisted,
        settled_totals,
        limit_events,
        refused_base,
        metrics: Arc::clone(&metrics),
        fleet,
        standings_generation: 0,
        gate,
        admissions: admit_rx,
    };
    agent.standings_generation = agent.core.limits().generation();
    agent.cycle(ring.get_mut())?;
    // Serve metrics only now: the first scrape already continues the
    // counters from the ledger and the kernel.
    drop(api_tx);
    let metrics_at = exporter::spawn(agent.config.metrics.listen, metrics).await?;
    tracing::info!(metrics = %metrics_at, "metrics endpoint listening");
    if let Some(path) = &options.ready_file {
        std::fs::write(path, format!("api={api_at}\nmetrics={metrics_at}\n"))
            .map_err(io(format!("writing {}", path.display())))?;
    }
    let record = options
        .config_path
        .as_ref()
        .and_then(|config| record_running(config, &agent, &api_at, metrics_at, &instance_name));
    let result = serve(agent, ring, api_rx, shutdown).await;
    if let Some(path) = record {
        let _ = std::fs::remove_file(path);
    }
    drop(api_server);
    result
}

/// A connection's counts in the kernel now (for an attribution: bytes up
/// to here stay where they were).
fn counts_now(kernel: &Kernel, key: &ConnKey) -> Option<Counts> {
    match key {
        ConnKey::Tcp(cookie) => kernel.live_counts(*cookie).ok().flatten(),
        ConnKey::Udp { key, .. } => kernel.udp_flow(key).ok().flatten().map(|f| f.counts),
    }
}

/// Cut orders as the kernel takes them: TCP sockets and UDP flows.
fn split_cuts(orders: &[core::CutOrder]) -> (Vec<kernel::CutTarget>, Vec<UdpFlowKey>) {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for o in orders {
        match o.key {
            ConnKey::Tcp(cookie) => tcp.push(kernel::CutTarget {
                cookie,
                family: o.peer.family,
                client: o.peer.client(),
                server: o.peer.server(),
            }),
            ConnKey::Udp { key, .. } => udp.push(key),
        }
    }
    (tcp, udp)
}

/// The billing core, rebuilt from the ledger: limits with their spending
/// and top-ups, open sessions and segments; and where limit events go.
fn open_core(config: &Config, ledger: &mut Ledger, boot_id: &str) -> Result<Core, AgentError> {
    let limits = Limits::new(
        &config.accounts,
        ledger.spent_by_account()?,
        &ledger.credits_by_account()?,
    );
    let mut targets = Vec::new();
    if config.billing.limit_hook.is_some() {
        targets.push(hooks::Target::Hook);
    }
    if config.billing.limit_webhook.is_some() {
        targets.push(hooks::Target::Webhook);
    }
    ledger.set_delivery_targets(targets);
    let mut core = Core::new(
        boot_id,
        service_defs(config),
        limits,
        Pending::with_capacity(config.api.max_pending),
    );
    core.set_open_write_interval(config.billing.open_write_interval);
    let open = ledger.load_open()?;
    core.restore(open.viewers, open.segments, open.orphans);
    Ok(core)
}

/// With a `[fleet]`: the ledger stages the fleet's records from now on,
/// and the tasks that ship them and share spend start (in the background:
/// the agent does not wait for NATS).
fn start_fleet(config: &Config, ledger: &mut Ledger) -> Result<Option<Fleet>, AgentError> {
    let Some(f) = &config.fleet else {
        return Ok(None);
    };
    let host = f.host();
    let staged = ledger.set_fleet(fleet::outbox::Policy {
        host: host.clone(),
        interim_ms: i64::try_from(f.interim_interval.as_millis()).unwrap_or(i64::MAX),
    })?;
    if staged > 0 {
        tracing::info!(
            sessions = staged,
            "fleet: staged the ledger's settled sessions for the stream (first start with [fleet])"
        );
    }
    let accounts = config.accounts.iter().map(|a| a.id.clone()).collect();
    let fleet = Fleet::start(f, &config.billing.ledger, accounts);
    tracing::info!(host = %host, stream = %f.stream, bucket = %f.bucket, "fleet: records and spend are shared through NATS JetStream");
    Ok(Some(fleet))
}

/// The admission journal, replayed into the core, and the gate the API
/// decides admissions at. Admissions answered before a crash (or a stop)
/// wait for their connections again, for what is left of their TTL: the
/// first read applies them, to connections it meets for the first time
/// and to open ones the ledger had.
fn open_admissions(
    config: &Config,
    core: &mut Core,
) -> Result<(Arc<Gate>, mpsc::UnboundedReceiver<Admission>, usize), AgentError> {
    let (journal, replayed) = Journal::open(&config.billing.ledger)?;
    let replayed_count = replayed.len();
    for e in replayed {
        core.admit(e.conn, e.attribution(), &mut |_| None, 0, e.instant());
    }
    let (admit_tx, admit_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Gate::new(
        core.standings(),
        journal,
        admit_tx,
        config.api.max_pending,
        core.pending_count(),
    ));
    Ok((gate, admit_rx, replayed_count))
}

/// Writes where this agent runs, for client commands without `--config`.
fn record_running(
    config: &std::path::Path,
    agent: &Agent,
    api_at: &str,
    metrics_at: std::net::SocketAddr,
    name: &str,
) -> Option<PathBuf> {
    let running = crate::runtime::Running {
        pid: std::process::id(),
        config: std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned()),
        api: api_at.to_owned(),
        metrics: metrics_at.to_string(),
        ledger: agent.config.billing.ledger.clone(),
        pin_dir: agent.config.agent.pin_dir.clone(),
    };
    running
        .write(name)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot record where this agent runs: client commands need --config");
        })
        .ok()
}

/// The loop proper, until `shutdown` completes.
async fn serve(
    mut agent: Agent,
    mut ring: AsyncFd<Closes>,
    mut api_rx: mpsc::Receiver<Command>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut load_ticker = tokio::time::interval(agent.config.agent.interval);
    load_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut delivery_ticker = tokio::time::interval(Duration::from_secs(1));
    delivery_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (delivered_tx, mut delivered_rx) = mpsc::channel(64);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io("polling the CLOSED ring buffer"))?;
                agent.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            Some(command) = api_rx.recv() => agent.command(command)?,
            Some(first) = agent.admissions.recv() => agent.admitted(first),
            _ = load_ticker.tick() => agent.sample_load(),
            _ = agent.pacer.tick() => agent.cycle(ring.get_mut())?,
            _ = delivery_ticker.tick() => agent.deliver(&delivered_tx)?,
            Some(done) = delivered_rx.recv() => agent.delivered(done)?,
        }
    }
    agent.stop(ring.get_mut())
}

/// The loop's state.
struct Agent {
    config: Config,
    kernel: Kernel,
    core: Core,
    ledger: Ledger,
    log: Option<ClosedLog>,
    /// Connection ids at the end of the closed log when the agent started.
    log_ids: HashSet<String>,
    /// Until the first cycle has drained the ring once: records may be
    /// re-deliveries of ones committed before a crash.
    redelivery: bool,
    /// Event deliveries under way: (event id, target).
    delivering: HashSet<(String, hooks::Target)>,
    /// Reused buffer of the live TCP read.
    live: Vec<(u64, Counts)>,
    /// Reused buffer of the UDP flow read.
    udp: Vec<(UdpFlowKey, UdpFlow)>,
    /// `STATS` at the previous cycle, to report what changed.
    seen_stats: Option<[u64; meterd_common::STAT_SLOTS as usize]>,
    /// `UDP_STATS` as of the last cycle, for the metrics and to log what
    /// grew.
    seen_udp_stats: Option<[u64; meterd_common::UDP_STAT_SLOTS as usize]>,
    /// Paces cycles at the interval the governor chooses.
    pacer: Pacer,
    load_monitor: LoadMonitor,
    /// The load at the end of the last cycle.
    load: Load,
    /// The agent's own counters, saved in the ledger every cycle.
    persisted: Persisted,
    /// What the ledger holds per service (kept up to date at each commit).
    settled_totals: HashMap<String, SettledTotals>,
    limit_events: u64,
    /// Refused attributions before this start (the counter goes on).
    refused_base: u64,
    metrics: SharedMetrics,
    /// The fleet link, with a `[fleet]`.
    fleet: Option<Fleet>,
    /// The limits' generation the gate's standings were built from.
    standings_generation: u64,
    /// Where the API decides admissions; the loop publishes to it.
    gate: Arc<Gate>,
    /// Admissions the API answered, to apply.
    admissions: mpsc::UnboundedReceiver<Admission>,
}

impl Agent {
    /// The last drain and cycle before exiting; the pins stay.
    fn stop(&mut self, ring: &mut Closes) -> Result<(), AgentError> {
        self.core.save_all();
        self.cycle(ring)?;
        if let Some(socket) = self.config.api.socket_path(&self.config.agent) {
            let _ = std::fs::remove_file(socket);
        }
        tracing::info!(
            sessions = self.core.viewers().count(),
            connections = self.core.conns().count(),
            "stopped; the kernel keeps counting"
        );
        Ok(())
    }

    /// Settles every queued close and gap record, each committed before it
    /// is released.
    fn drain(&mut self, ring: &mut Closes) -> Result<usize, AgentError> {
        let mut n = 0;
        while let Some(record) = Record::next(ring) {
            // An admission answered for this connection was handed over
            // before the answer, so before the connection could close:
            // it is in the channel now, and applies before the close.
            self.sweep_admissions();
            let proof = if let Some(closed) = record.closed {
                self.settle_record(&closed)?
            } else {
                tracing::error!(
                    len = record.len,
                    "short record in CLOSED: object/agent mismatch"
                );
                self.commit(&Batch::default())?
            };
            record.release(proof);
            n += 1;
        }
        Ok(n)
    }

    /// Hands one record to the core and commits what it staged.
    fn settle_record(&mut self, closed: &Closed) -> Result<Committed, AgentError> {
        if self.redelivery
            && let Some(id) = self.core.unknown_conn_id(closed)
            && let Some(proof) = self.ledger.connection_committed(&id)?
        {
            // Committed before a crash: already billed. The log may still
            // lack it (the crash came between the commit and the log).
            if let Some(log) = &mut self.log
                && !self.log_ids.contains(&id)
                && let Some(c) = self.core.closed_conn_of(closed)
            {
                log.write(&c)?;
            }
            return Ok(proof);
        }
        self.core.on_record(closed);
        let batch = self.core.take_batch();
        self.commit(&batch)
    }

    /// Commits a batch, then does what follows from it: the closed log,
    /// the per-service totals, the limit hooks and the log lines.
    fn commit(&mut self, batch: &Batch) -> Result<Committed, AgentError> {
        let proof = self.ledger.commit(batch)?;
        self.persisted.session_writes += (batch.viewers.len() + batch.settled.len()) as u64;
        if let Some(f) = &self.fleet {
            f.wake();
        }
        if let Some(log) = &mut self.log {
            for c in &batch.closed {
                log.write(c)?;
            }
        }
        for g in batch.segments.iter().filter(|g| !g.open && !g.restaged) {
            let t = self.settled_totals.entry(g.service.clone()).or_default();
            let (o, i) = g.bytes();
            t.bytes_out += o;
            t.bytes_in += i;
            t.connections += u64::from(g.closes_conn);
        }
        for s in &batch.settled {
            let t = self
                .settled_totals
                .entry(s.row.service.clone())
                .or_default();
            t.viewers += 1;
            t.charge_minor += s.charge_minor;
            tracing::info!(
                target: "meterd::settled",
                id = %s.row.id,
                service = %s.row.service,
                account = %s.row.account,
                content = %s.row.content,
                client = %s.row.client_addr,
                connections = s.row.connections,
                bytes_out = s.row.bytes_out,
                bytes_in = s.row.bytes_in,
                duration_ms = s.duration_ms,
                charge_minor = s.charge_minor,
                "session settled"
            );
        }
        for e in &batch.limits {
            self.limit_events += 1;
            tracing::warn!(
                account = %e.account,
                spent_minor = e.spent_minor,
                limit_minor = e.limit_minor,
                policy = ?e.policy,
                "limit_reached"
            );
        }
        for c in &batch.cut_offs {
            tracing::info!(
                account = %c.account,
                bytes_after_cut = c.bytes_after_cut,
                ms_after_cut = c.ms_after_cut,
                connections = c.connections,
                "cut off: the account's connections have ended"
            );
        }
        self.apply_cuts(batch)?;
        Ok(proof)
    }

    /// Ends in the kernel the connections the core ordered cut, and lifts
    /// the cuts of topped-up accounts. Runs after the commit of the limit
    /// event that ordered them.
    fn apply_cuts(&mut self, batch: &Batch) -> Result<(), AgentError> {
        if !batch.cuts.is_empty() {
            let (tcp, udp) = split_cuts(&batch.cuts);
            // Blocks up to ~300 ms: the sockets are destroyed once what
            // the client already received is acknowledged, so the counts
            // stay exact (see Kernel::cut).
            let report = self.kernel.cut(&tcp)?;
            let flows = self.kernel.cut_udp(&udp)?;
            tracing::warn!(
                connections = tcp.len(),
                destroyed = report.destroyed,
                gone = report.gone,
                failed = report.failed,
                udp_flows = flows,
                waited_ms = report.waited.as_millis(),
                "cut off connections of accounts over their limit"
            );
        }
        if !batch.uncuts.is_empty() {
            let (tcp, udp) = split_cuts(&batch.uncuts);
            let cookies: Vec<u64> = tcp.iter().map(|t| t.cookie).collect();
            self.kernel.uncut(&cookies)?;
            self.kernel.uncut_udp(&udp)?;
            tracing::info!(
                connections = cookies.len(),
                udp_flows = udp.len(),
                "cut lifted: the account was topped up"
            );
        }
        Ok(())
    }

    /// Starts the due deliveries of limit events that are not under way.
    fn deliver(
        &mut self,
        done: &mpsc::Sender<(hooks::Delivery, Result<(), String>)>,
    ) -> Result<(), AgentError> {
        for d in self
            .ledger
            .due_deliveries(std::time::SystemTime::now(), 16)?
        {
            if !self.delivering.insert((d.event_id.clone(), d.target)) {
                continue;
            }
            let hook = self.config.billing.limit_hook.clone();
            let webhook = self.config.billing.limit_webhook.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let result =
                    hooks::deliver(d.target, &d.event, hook.as_deref(), webhook.as_deref()).await;
                let _ = done.send((d, result)).await;
            });
        }
        Ok(())
    }

    /// Records a delivery attempt: acknowledged, or retried later.
    fn delivered(
        &mut self,
        (d, result): (hooks::Delivery, Result<(), String>),
    ) -> Result<(), AgentError> {
        self.delivering.remove(&(d.event_id.clone(), d.target));
        match &result {
            Ok(()) => tracing::info!(
                event_id = %d.event_id,
                target = d.target.as_str(),
                attempts = d.attempts + 1,
                "limit event delivered"
            ),
            Err(e) => tracing::warn!(
                event_id = %d.event_id,
                target = d.target.as_str(),
                attempts = d.attempts + 1,
                error = %e,
                retry_in_s = hooks::backoff(d.attempts + 1).as_secs(),
                "limit event not delivered; will retry"
            ),
        }
        let next = std::time::SystemTime::now() + hooks::backoff(d.attempts + 1);
        self.ledger
            .delivery_done(&d.event_id, d.target, &result, next)?;
        Ok(())
    }

    /// One billing cycle, timed, then the governor's decision.
    fn cycle(&mut self, ring: &mut Closes) -> Result<(), AgentError> {
        let started = Instant::now();
        let cpu_before = clock::thread_cpu();
        let live_totals = self.bill(ring)?;
        let took = started.elapsed();
        let cpu = clock::thread_cpu().saturating_sub(cpu_before);
        let overrun = self.pacer.overrun(tokio::time::Instant::now());
        // Decide on the load of the interval that just ended (since the
        // last cycle), not on the periodic sample, which can be almost an
        // interval old by now, or a few ms.
        self.load = self.load_monitor.sample_window(crate::load::Window::Cycle);
        let change = self.pacer.cycle_finished(&CycleSignals {
            load: self.load,
            overrun,
        });
        self.interval_changed(change, overrun);
        self.persisted.observe_cycle(took, cpu, overrun);
        let refused = self.refused_base + self.core.refused_count();
        if refused > self.persisted.attributions_refused {
            tracing::warn!(
                refused = refused - self.persisted.attributions_refused,
                max_pending = self.config.api.max_pending,
                "attributions refused: api.max_pending are waiting for connections that did not appear"
            );
            self.persisted.attributions_refused = refused;
        }
        if let Ok(json) = serde_json::to_string(&self.persisted) {
            self.ledger.save_meta(PERSISTED_KEY, &json)?;
        }
        self.publish_metrics(&live_totals);
        // Reads took pending attributions and some expired: the gate's
        // count of free pending slots follows.
        self.gate.applied(0, self.core.pending_count());
        self.rotate_journal()?;
        Ok(())
    }

    /// A load sample, taken every base interval, over its own window.
    fn sample_load(&mut self) {
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

    /// Reads the kernel, hands everything to the core, charges and settles.
    ///
    /// The order matters: the clock is read before the maps, and the maps
    /// before the ring is drained. So every gap or close that a read
    /// reflects is applied before the read (whose older values then only
    /// raise counts), and a UDP flow found idle at `now` cannot have had a
    /// datagram since that did not start a new segment.
    fn bill(&mut self, ring: &mut Closes) -> Result<HashMap<Arc<str>, LiveTotals>, AgentError> {
        // systemd recreates a service's cgroup on every restart of it.
        self.kernel.check_cgroup(&self.config)?;
        let now_ns = clock::boot_ns();
        let stats = self.kernel.stats()?;
        let ring_full = Stat::RingFull as usize;
        let find_closed = self
            .seen_stats
            .is_none_or(|s| s[ring_full] != stats[ring_full]);
        self.report_stats(&stats);
        self.seen_stats = Some(stats);
        let udp_stats = self.kernel.udp_stats()?;
        self.report_udp_stats(&udp_stats);
        self.seen_udp_stats = Some(udp_stats);

        self.kernel.read_live(&mut self.live);
        self.kernel.read_udp(&mut self.udp)?;
        // Admissions handed over before the read: applied before the core
        // meets the connections it read (and their closes), so those are
        // attributed whole.
        self.sweep_admissions();
        self.drain(ring)?;
        if find_closed {
            self.settle_closed_in_live()?;
        }
        let kernel = &self.kernel;
        self.core
            .on_tcp_read(&self.live, &mut |cookie| match kernel.info(cookie) {
                Ok(info) => info.filter(|i| i.flags & CONN_CLOSED == 0),
                Err(e) => {
                    tracing::warn!(cookie, error = %e, "INFO lookup failed");
                    None
                }
            });
        self.core.on_udp_read(&self.udp);
        let timeout = duration_ns(self.config.agent.udp_idle_timeout);
        let mut ended = Vec::new();
        for key in self.core.idle_udp(&self.udp, now_ns, timeout) {
            // Taken atomically: a datagram after this starts a new flow.
            if let Some(last) = self.kernel.take_udp(&key)? {
                ended.push((key, last));
            }
        }
        if !ended.is_empty() {
            // A datagram racing the removal left its gap record in the ring.
            self.drain(ring)?;
            for (key, last) in &ended {
                self.core.on_udp_end(key, last);
            }
        }
        self.core
            .expire_pending(Instant::now(), self.config.api.pending_ttl);
        self.apply_fleet_view();
        let live = self.core.on_cycle(now_ns);
        self.persisted.cycle_charges += live.values().map(|t| t.charges).sum::<u64>();
        // Before the commit and the cut-offs: an account the check has
        // just marked is refused from here on.
        self.publish_standings();
        let batch = self.core.take_batch();
        self.commit(&batch)?;
        self.redelivery = false;
        self.share_spend();
        Ok(live)
    }

    /// The other hosts' spend, as the fleet view last had it, into the
    /// limit check this cycle makes.
    fn apply_fleet_view(&mut self) {
        let Some(view) = self.fleet.as_ref().and_then(Fleet::view) else {
            return;
        };
        for (account, others) in view {
            if self
                .core
                .fleet_view(&account, others.spent_micro, others.credited_minor)
            {
                tracing::info!(
                    account,
                    "fleet: a top-up on another host brought the account back under its limit"
                );
            }
        }
    }

    /// This host's spend and top-ups per account, for the fleet.
    fn share_spend(&self) {
        if let Some(f) = &self.fleet {
            f.share(
                self.core
                    .limits()
                    .own()
                    .map(|(a, spent_micro, credited_minor)| {
                        (
                            a,
                            fleet::record::Spend {
                                spent_micro,
                                credited_minor,
                            },
                        )
                    }),
            );
        }
    }

    /// Connections that closed while the ring was full: their final counts
    /// wait in their LIVE slots, INFO flagged closed. Each is settled from
    /// a fresh read of its slot (the one in `self.live` may predate the
    /// close), committed, then its slot returned and INFO deleted.
    fn settle_closed_in_live(&mut self) -> Result<(), AgentError> {
        let mut closed = Vec::new();
        for &(cookie, _) in &self.live {
            match self.kernel.info(cookie) {
                Ok(Some(info)) if info.flags & CONN_CLOSED != 0 => {
                    if let Some(counts) = self.kernel.closed_counts(cookie, &info) {
                        closed.push(Closed {
                            cookie,
                            counts,
                            info,
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(cookie, error = %e, "INFO lookup failed"),
            }
        }
        for c in closed {
            let proof = self.settle_record(&c)?;
            self.kernel.forget(&c, &proof)?;
            self.live.retain(|(cookie, _)| *cookie != c.cookie);
        }
        Ok(())
    }

    /// Replaces the metrics snapshot.
    fn publish_metrics(&self, live: &HashMap<Arc<str>, LiveTotals>) {
        let stats = self.seen_stats.unwrap_or_default();
        let (ring_pending, ring_size) = self.kernel.ring_fill().unwrap_or_default();
        let deliveries = self.ledger.delivery_stats().unwrap_or_default();
        let mut services = std::collections::BTreeMap::new();
        for service in &self.config.services {
            let settled = self
                .settled_totals
                .get(&service.name)
                .copied()
                .unwrap_or_default();
            let l = live.get(service.name.as_str()).copied().unwrap_or_default();
            services.insert(
                service.name.clone(),
                (
                    service.tariff.kind().to_owned(),
                    ServiceTotals {
                        bytes_out: settled.bytes_out + l.bytes_out,
                        bytes_in: settled.bytes_in + l.bytes_in,
                        charged_minor: settled.charge_minor + l.charged_minor,
                        connections_live: l.connections,
                        connections_closed: settled.connections,
                        viewers_live: l.viewers,
                        viewers_settled: settled.viewers,
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
            udp: self.seen_udp_stats.unwrap_or_default(),
            live_map_entries: self.live.len() as u64,
            live_map_capacity: u64::from(self.config.agent.max_connections),
            live_slots_leaked: self.kernel.slot_leaks(),
            ring_pending_bytes: ring_pending,
            ring_capacity_bytes: ring_size,
            limit_reached: self.limit_events,
            attributions_pending: self.core.pending_count() as u64,
            deliveries_pending: deliveries.0,
            delivery_failures: deliveries.1,
            accounts_over_limit: self.core.limits().reached_count() as u64,
            bpf_programs: self.kernel.program_stats(),
            fleet: self.fleet.as_ref().map(Fleet::status),
        };
        if let Ok(mut m) = self.metrics.lock() {
            *m = snapshot;
        }
    }

    /// The report of `GET /v1/status`.
    fn status(&self) -> StatusReport {
        let now_ns = clock::boot_ns();
        let sessions = self
            .core
            .viewers()
            .map(|v| {
                let (bytes_out, bytes_in) = self.core.totals(v);
                let idle_ns = now_ns.saturating_sub(v.last_ns);
                LiveSession {
                    session_id: v.id.to_string(),
                    service: v.service.name.to_string(),
                    account: v.account(),
                    content: v.content().to_owned(),
                    client_addr: v.client_addr.to_string(),
                    connections_open: v.open.len() as u64,
                    connections: u64::from(v.connections),
                    bytes_out,
                    bytes_in,
                    duration_ms: v.duration_ns() / 1_000_000,
                    idle_ms: idle_ns / 1_000_000,
                    // A player fetches a segment every few seconds: idle
                    // only after half of session_idle without payload.
                    state: if idle_ns >= v.service.idle_ns / 2 {
                        "idle"
                    } else {
                        "playing"
                    }
                    .to_owned(),
                    accrued_minor: micro_to_decimal(v.accrual.charged_micro),
                }
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
            connections_live: self.core.conns().count() as u64,
            attributions_pending: self.core.pending_count() as u64,
            fleet: self.fleet.as_ref().map(Fleet::status),
            sessions,
            accounts: {
                let mut accounts: Vec<AccountStatus> = self
                    .core
                    .limits()
                    .accounts()
                    .map(
                        |(account, limit_minor, spent_minor, standing)| AccountStatus {
                            account: account.to_owned(),
                            limit_minor,
                            spent_minor,
                            standing: match standing {
                                Standing::Ok => "ok",
                                Standing::Reached => "limit_reached",
                                Standing::Blocked => "blocked",
                            }
                            .to_owned(),
                        },
                    )
                    .collect();
                accounts.sort_by(|a, b| a.account.cmp(&b.account));
                accounts
            },
        }
    }

    fn command(&mut self, command: Command) -> Result<(), AgentError> {
        match command {
            Command::Attribute {
                conn,
                attribution,
                reply,
            } => {
                let kernel = &self.kernel;
                let outcome = self.core.attribute(
                    conn,
                    attribution,
                    &mut |key| counts_now(kernel, key),
                    clock::boot_ns(),
                    Instant::now(),
                );
                // Committed before the answer: an applied attribution
                // survives a crash.
                self.commit_staged()?;
                self.gate.applied(0, self.core.pending_count());
                let _ = reply.send(outcome);
            }
            Command::Credit {
                account,
                credit_id,
                amount_minor,
                reply,
            } => {
                let _ = reply.send(self.credit(&account, &credit_id, amount_minor)?);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
        Ok(())
    }

    /// Applies admissions the API answered: this one and whatever else
    /// has arrived. What that stages is committed with the next commit (at
    /// the latest the cycle's), not now: until then each admission is in
    /// the journal, whose file is removed only after that commit (see
    /// [`Self::rotate_journal`]), and a commit per request was most of
    /// what the ledger wrote under a stream of admissions.
    fn admitted(&mut self, first: Admission) {
        let mut admissions = vec![first];
        while admissions.len() < 4096
            && let Ok(a) = self.admissions.try_recv()
        {
            admissions.push(a);
        }
        self.apply_admissions(admissions);
    }

    /// Applies every admission handed over so far. Called after reading
    /// the kernel and before billing what was read: an admission answered
    /// before a connection was seen (or closed) then applies from its
    /// start, whatever order the loop's events came in.
    fn sweep_admissions(&mut self) {
        let mut admissions = Vec::new();
        while let Ok(a) = self.admissions.try_recv() {
            admissions.push(a);
        }
        if !admissions.is_empty() {
            self.apply_admissions(admissions);
        }
    }

    fn apply_admissions(&mut self, admissions: Vec<Admission>) {
        let n = admissions.len();
        let now_ns = clock::boot_ns();
        for a in admissions {
            let kernel = &self.kernel;
            self.core.admit(
                a.conn,
                a.attribution,
                &mut |key| counts_now(kernel, key),
                now_ns,
                a.at,
            );
        }
        self.gate.applied(n, self.core.pending_count());
    }

    /// Publishes the standings to the API if they changed.
    fn publish_standings(&mut self) {
        let generation = self.core.limits().generation();
        if generation != self.standings_generation {
            self.gate.publish(self.core.standings());
            self.standings_generation = generation;
        }
    }

    /// Starts a new journal file once the current one has entries: every
    /// entry of the old files is then applied and committed, or waits in
    /// the core and is written again, before the old files go.
    fn rotate_journal(&mut self) -> Result<(), AgentError> {
        let Some(taken) = self.gate.rotate(&mut self.admissions)? else {
            return Ok(());
        };
        self.apply_admissions(taken);
        // Everything the old files held is now committed, or pending and
        // written again below.
        self.commit_staged()?;
        let pending: Vec<Entry> = self
            .core
            .pending_entries()
            .map(|(conn, a, at)| Entry::new(0, *conn, a, at.elapsed()))
            .collect();
        self.gate.rewrite(&pending)?;
        Ok(())
    }

    /// Commits what the core staged, if anything.
    fn commit_staged(&mut self) -> Result<(), AgentError> {
        let batch = self.core.take_batch();
        if !batch.is_empty() {
            self.commit(&batch)?;
        }
        Ok(())
    }

    /// A top-up: recorded once by its id, then the account's limit rises
    /// and, back under it, it is served again.
    fn credit(
        &mut self,
        account: &str,
        credit_id: &str,
        amount_minor: u64,
    ) -> Result<Result<CreditReply, String>, AgentError> {
        if !self.core.limits().is_configured(account) {
            return Ok(Err(format!(
                "account {account:?} has no prepaid_minor or credit_limit_minor in the config"
            )));
        }
        let (inserted, _committed) = self
            .ledger
            .record_credit(credit_id, account, amount_minor)?;
        if inserted && let Some(c) = self.core.credit(account, amount_minor) {
            self.publish_standings();
            tracing::info!(
                account,
                credit_id,
                amount_minor,
                limit_minor = c.limit_minor,
                spent_minor = c.spent_minor,
                readmitted = c.readmitted,
                "credited"
            );
            self.commit_staged()?;
        }
        if inserted {
            if let Some(f) = &self.fleet {
                f.wake();
            }
            self.share_spend();
        }
        let (limit_minor, spent_minor) = self.core.limits().figures(account).unwrap_or_default();
        Ok(Ok(CreditReply {
            status: if inserted { "credited" } else { "duplicate" },
            account: account.to_owned(),
            limit_minor,
            spent_minor,
            standing: if self.core.limits().is_reached(account) {
                "limit_reached"
            } else {
                "ok"
            },
        }))
    }

    /// Logs every kernel-side loss or overflow once, when it changes.
    fn report_stats(&self, stats: &[u64; meterd_common::STAT_SLOTS as usize]) {
        let before = self.seen_stats.unwrap_or(*stats);
        let grew = |s: Stat| stats[s as usize].saturating_sub(before[s as usize]);
        let n = grew(Stat::LiveFull);
        if n > 0 {
            tracing::warn!(
                connections = n,
                "live-connection map full: these are read only at their close (bytes exact, times from their sockets); raise agent.max_connections"
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
                "UDP flow map full: datagrams of new flows the server sent to are not counted; \
                 raise agent.max_udp_flows"
            );
        }
        let n = grew(Stat::GapRingFull);
        if n > 0 {
            tracing::warn!(
                gaps = n,
                "gap records did not fit the ring buffer: TCP retries at the next packet, a UDP flow's session spans the gap"
            );
        }
    }

    /// Logs what UDP probation could not do, once per cycle it grew.
    fn report_udp_stats(&self, stats: &[u64; meterd_common::UDP_STAT_SLOTS as usize]) {
        let before = self.seen_udp_stats.unwrap_or(*stats);
        let grew = |s: UdpStat| stats[s as usize].saturating_sub(before[s as usize]);
        let n = grew(UdpStat::ProbationFailed);
        if n > 0 {
            tracing::warn!(
                datagrams = n,
                "UDP probation map could not take new flows: these clients' datagrams before \
                 the server's answer are not counted"
            );
        }
    }
}

/// Takes the exclusive lock of the agent for `pin_dir`: two agents on the
/// same pins would split one ring buffer between them. The lock file lives
/// in /run/meterd (tmpfs) and holds the owner's pid; the lock goes with the
/// process, also on kill -9.
/// Returns the held lock and its name (also the name of the agent's
/// record under `/run/meterd/agents`).
pub fn lock_instance(pin_dir: &std::path::Path) -> Result<(std::fs::File, String), AgentError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let name = crate::config::instance_name(pin_dir);
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
    Ok((file, name))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
