//! The daemon: the loop that turns kernel counts into settled sessions.
//!
//! Every interval it reads the live maps (one batch read), refreshes the
//! session table and ends idle UDP flows; in between, it drains the ring
//! buffer of closed connections as records arrive. Settled sessions go to
//! the sinks (today the closed-connection log and the log output).
//!
//! `run` takes its shutdown as a future, so tests and `main` decide when it
//! stops; on shutdown it drains once more and returns, leaving the pins in
//! place so the kernel keeps counting.

use std::{future::Future, path::PathBuf, time::Duration};

use aya::maps::{MapData, RingBuf};
use meterd_common::{Counts, Stat, UdpFlow, UdpFlowKey};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    clock,
    closed_log::{ClosedLog, ClosedLogError},
    config::Config,
    kernel::{self, Kernel, KernelError},
    sessions::{self, Sessions, Settled},
};

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
    ClosedLog(#[from] ClosedLogError),
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
    let mut kernel = Kernel::open(&config)?;
    tracing::info!(
        startup = ?kernel.startup,
        object = %kernel::object_version(),
        pin_dir = %kernel.pin_dir().display(),
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
    let ring = kernel
        .take_closed()
        .expect("a freshly opened Kernel holds its ring buffer");
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
    // owns the ring buffer, and never swaps it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| io("polling the CLOSED ring buffer")(e.into()))?;
    let mut agent = Agent {
        config,
        kernel,
        sessions,
        log,
        live: Vec::new(),
        udp: Vec::new(),
        // Unknown at start: look for closed entries left in LIVE.
        seen_stats: None,
    };
    agent.drain(ring.get_mut())?;
    agent.cycle()?;
    if let Some(path) = &options.ready_file {
        std::fs::write(path, b"metering\n").map_err(io(format!("writing {}", path.display())))?;
    }

    let mut ticker = tokio::time::interval(agent.config.agent.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io("polling the CLOSED ring buffer"))?;
                agent.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                agent.drain(ring.get_mut())?;
                agent.cycle()?;
            }
        }
    }
    agent.drain(ring.get_mut())?;
    agent.cycle()?;
    tracing::info!(
        live = agent.sessions.live_count(),
        "stopped; the kernel keeps counting"
    );
    Ok(())
}

/// The loop's state.
struct Agent {
    config: Config,
    kernel: Kernel,
    sessions: Sessions,
    log: Option<ClosedLog>,
    /// Reused buffer of the live TCP read.
    live: Vec<(u64, Counts)>,
    /// Reused buffer of the UDP flow read.
    udp: Vec<(UdpFlowKey, UdpFlow)>,
    /// `STATS` at the previous cycle, to report what changed.
    seen_stats: Option<[u64; meterd_common::STAT_SLOTS as usize]>,
}

impl Agent {
    /// Settles every queued close record. Each is written before its slot
    /// is released (the item's drop), so a crash re-delivers, never loses.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<usize, AgentError> {
        let mut n = 0;
        while let Some(item) = ring.next() {
            if let Some(closed) = kernel::decode_closed(&item) {
                if let Some(settled) = self.sessions.close_tcp(&closed) {
                    self.settle(&settled)?;
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

    /// One read of the live maps.
    fn cycle(&mut self) -> Result<(), AgentError> {
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
        for s in &settled {
            self.settle(s)?;
            self.kernel.forget(s.session.cookie)?;
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
                self.settle(&settled)?;
            }
        }
        Ok(())
    }

    fn settle(&mut self, settled: &Settled) -> Result<(), AgentError> {
        let s = &settled.session;
        let service = self
            .config
            .services
            .get(s.service as usize)
            .map_or("unknown", |svc| svc.name.as_str());
        tracing::info!(
            target: "meterd::closed",
            id = %s.id,
            service,
            protocol = ?s.protocol,
            client = %s.client,
            server = %s.server,
            bytes_out = s.counts.bytes_out,
            bytes_in = s.counts.bytes_in,
            duration_ms = settled.end_ns.saturating_sub(s.start_ns) / 1_000_000,
            "session closed"
        );
        if let Some(log) = &mut self.log {
            log.write(settled, service)?;
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

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
