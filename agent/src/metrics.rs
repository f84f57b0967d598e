//! Prometheus metrics: what the agent exposes on `/metrics`, and how the
//! values survive restarts.
//!
//! Owns the metric names, their labels and their encoding. The agent loop
//! fills a [`Metrics`] snapshot every cycle; a scrape encodes that snapshot,
//! so a scrape never touches the kernel or the ledger.
//!
//! Counters never go backwards, also across restarts: bytes, sessions and
//! charges are the ledger's settled totals plus the live sessions' current
//! counts (which the pinned kernel maps carry over a restart); the agent's
//! own counters (cycles, overruns, interval changes) are persisted in the
//! ledger with every cycle; kernel event counters live in a pinned map.
//!
//! The text is built with the `prometheus` crate's data model and encoder
//! (the classic text format that `promtool check metrics` lints), from the
//! snapshot at scrape time, without a global registry.
//! Labels are bounded: service, direction, tariff kind, currency, reason;
//! never a connection, client address or account.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use serde::{Deserialize, Serialize};

/// Upper bounds of the cycle-duration histogram, in seconds.
pub const CYCLE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Totals of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTotals {
    /// Payload bytes delivered to clients (settled + live).
    pub bytes_out: u64,
    /// Payload bytes received from clients (settled + live).
    pub bytes_in: u64,
    /// Charged, in minor units: settled totals plus whole minor units
    /// already charged to live sessions.
    pub charged_minor: u64,
    /// Connections (TCP) and UDP flows open as of the last cycle.
    pub connections_live: u64,
    /// Connections closed (and UDP flows ended) in the ledger.
    pub connections_closed: u64,
    /// Viewing sessions open as of the last cycle.
    pub viewers_live: u64,
    /// Viewing sessions settled in the ledger.
    pub viewers_settled: u64,
}

/// The agent's own counters, persisted in the ledger at every cycle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub cycles: u64,
    pub cycle_seconds_sum: f64,
    /// CPU time of the cycles (the run loop's thread, during them).
    #[serde(default)]
    pub cycle_cpu_seconds: f64,
    /// Count per bucket of [`CYCLE_BUCKETS`] (not cumulative), plus one for
    /// cycles above the last bound.
    pub cycle_buckets: Vec<u64>,
    pub overruns: u64,
    pub overrun_seconds: f64,
    /// `(direction, reason)` -> count.
    pub interval_changes: BTreeMap<String, u64>,
    /// Attributions refused because `api.max_pending` were waiting.
    #[serde(default)]
    pub attributions_refused: u64,
    /// Charges the cycles made (one per session charged per cycle).
    #[serde(default)]
    pub cycle_charges: u64,
    /// Viewing-session rows in the ledger's commits: new, changed and
    /// settled ones (see `billing.open_write_interval`).
    #[serde(default)]
    pub session_writes: u64,
}

impl Persisted {
    /// Records one cycle's duration, CPU time and overrun.
    pub fn observe_cycle(&mut self, took: Duration, cpu: Duration, overrun: Duration) {
        let secs = took.as_secs_f64();
        self.cycle_cpu_seconds += cpu.as_secs_f64();
        self.cycle_buckets.resize(CYCLE_BUCKETS.len() + 1, 0);
        let bucket = CYCLE_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(CYCLE_BUCKETS.len());
        self.cycle_buckets[bucket] += 1;
        self.cycles += 1;
        self.cycle_seconds_sum += secs;
        if !overrun.is_zero() {
            self.overruns += 1;
            self.overrun_seconds += overrun.as_secs_f64();
        }
    }

    /// Counts an interval change.
    pub fn observe_change(&mut self, direction: &str, reason: &str) {
        *self
            .interval_changes
            .entry(format!("{direction}/{reason}"))
            .or_default() += 1;
    }
}

/// Everything `/metrics` shows, as of the last cycle.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub version: String,
    pub object: String,
    pub currency: String,
    /// Per service name: its tariff kind and totals.
    pub services: BTreeMap<String, (String, ServiceTotals)>,
    pub persisted: Persisted,
    pub interval: Duration,
    pub base_interval: Duration,
    pub cpu_pressure: Option<f64>,
    pub psi_some_avg10: Option<f64>,
    pub runnable_per_cpu: f64,
    pub loadavg1_per_cpu: f64,
    /// The kernel's `STATS` slots.
    pub kernel: [u64; meterd_common::STAT_SLOTS as usize],
    /// The kernel's `UDP_STATS` slots.
    pub udp: [u64; meterd_common::UDP_STAT_SLOTS as usize],
    pub live_map_entries: u64,
    pub live_map_capacity: u64,
    /// `LIVE` slots this agent could not push back to `FREE_SLOTS`.
    pub live_slots_leaked: u64,
    pub ring_pending_bytes: u64,
    pub ring_capacity_bytes: u64,
    pub limit_reached: u64,
    pub attributions_pending: u64,
    /// Limit-event deliveries not acknowledged yet.
    pub deliveries_pending: u64,
    /// Delivery attempts that failed (each is retried).
    pub delivery_failures: u64,
    /// Accounts over their limit now.
    pub accounts_over_limit: u64,
    /// `(program, run time, run count)` when `kernel.bpf_stats_enabled`.
    pub bpf_programs: Vec<(String, Duration, u64)>,
    /// The fleet link, on a host with `[fleet]`.
    pub fleet: Option<crate::fleet::FleetStatus>,
}

/// The shared snapshot the agent writes and scrapes read.
pub type SharedMetrics = Arc<Mutex<Metrics>>;

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family under construction.
struct Family {
    inner: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut inner = MetricFamily::default();
        inner.set_name(name.to_owned());
        inner.set_help(help.to_owned());
        inner.set_field_type(kind);
        Self { inner }
    }

    fn sample(&mut self, labels: &Labels<'_>, value: f64) -> &mut Self {
        let mut metric = Metric::from_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*k).to_owned());
                    pair.set_value((*v).to_owned());
                    pair
                })
                .collect(),
        );
        if self.inner.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            metric.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            metric.set_gauge(g);
        }
        self.inner.mut_metric().push(metric);
        self
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "metric values are floats in the exposition format"
)]
fn f(v: u64) -> f64 {
    v as f64
}

/// Encodes `m` in the Prometheus text format (0.0.4).
pub fn encode(m: &Metrics) -> String {
    let families = families(m);
    let mut out = Vec::new();
    // Encoding well-formed families into memory cannot fail.
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[expect(
    clippy::too_many_lines,
    reason = "one block per metric family, in exposition order"
)]
fn families(m: &Metrics) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let mut out = Vec::new();
    let mut push = |f: &mut Family| out.push(std::mem::take(&mut f.inner));
    let none: Labels<'_> = vec![];

    push(
        Family::new(
            "meterd_build_info",
            "meterd version and eBPF object hash (always 1).",
            GAUGE,
        )
        .sample(
            &vec![
                ("version", m.version.as_str()),
                ("object", m.object.as_str()),
            ],
            1.0,
        ),
    );

    let mut bytes = Family::new(
        "meterd_payload_bytes_total",
        "Payload bytes of metered sessions, settled and live, by service and direction.",
        COUNTER,
    );
    let mut charged = Family::new(
        "meterd_charged_minor_total",
        "Money charged, in minor units of the currency: settled sessions plus the whole minor units already charged to live ones.",
        COUNTER,
    );
    let mut live = Family::new(
        "meterd_connections_live",
        "TCP connections and UDP flows open as of the last cycle.",
        GAUGE,
    );
    let mut settled = Family::new(
        "meterd_connections_closed_total",
        "TCP connections closed and UDP flows ended, in the ledger.",
        COUNTER,
    );
    let mut viewers_live = Family::new(
        "meterd_viewer_sessions_live",
        "Viewing sessions open as of the last cycle.",
        GAUGE,
    );
    let mut viewers_settled = Family::new(
        "meterd_viewer_sessions_settled_total",
        "Viewing sessions settled in the ledger.",
        COUNTER,
    );
    for (name, (kind, t)) in &m.services {
        let service = name.as_str();
        bytes.sample(
            &vec![("service", service), ("direction", "egress")],
            f(t.bytes_out),
        );
        bytes.sample(
            &vec![("service", service), ("direction", "ingress")],
            f(t.bytes_in),
        );
        charged.sample(
            &vec![
                ("service", service),
                ("tariff_kind", kind.as_str()),
                ("currency", m.currency.as_str()),
            ],
            f(t.charged_minor),
        );
        live.sample(&vec![("service", service)], f(t.connections_live));
        settled.sample(&vec![("service", service)], f(t.connections_closed));
        viewers_live.sample(&vec![("service", service)], f(t.viewers_live));
        viewers_settled.sample(&vec![("service", service)], f(t.viewers_settled));
    }
    push(&mut bytes);
    push(&mut charged);
    push(&mut live);
    push(&mut settled);
    push(&mut viewers_live);
    push(&mut viewers_settled);

    let p = &m.persisted;
    let mut cumulative = 0;
    let buckets = CYCLE_BUCKETS
        .iter()
        .zip(p.cycle_buckets.iter().chain(std::iter::repeat(&0)))
        .map(|(bound, n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_sample_count(p.cycles);
    h.set_sample_sum(p.cycle_seconds_sum);
    h.set_bucket(buckets);
    let mut metric = Metric::default();
    metric.set_histogram(h);
    let mut cycle = Family::new(
        "meterd_cycle_duration_seconds",
        "Time a billing cycle took: read, charge, ledger commit.",
        MetricType::HISTOGRAM,
    );
    cycle.inner.mut_metric().push(metric);
    push(&mut cycle);

    push(
        Family::new(
            "meterd_cycle_cpu_seconds_total",
            "CPU time the billing cycles used (the run loop's thread): below the cycles' \
             duration by the time they waited for a CPU or the disk.",
            COUNTER,
        )
        .sample(&none, p.cycle_cpu_seconds),
    );
    push(
        Family::new(
            "meterd_cycle_overruns_total",
            "Cycles that ended after their interval was over (the patent's overrun).",
            COUNTER,
        )
        .sample(&none, f(p.overruns)),
    );
    push(
        Family::new(
            "meterd_cycle_overrun_seconds_total",
            "Total time by which cycles overran their interval.",
            COUNTER,
        )
        .sample(&none, p.overrun_seconds),
    );
    push(
        Family::new(
            "meterd_read_interval_seconds",
            "Current read and billing interval.",
            GAUGE,
        )
        .sample(&none, m.interval.as_secs_f64()),
    );
    push(
        Family::new(
            "meterd_base_interval_seconds",
            "Configured base interval.",
            GAUGE,
        )
        .sample(&none, m.base_interval.as_secs_f64()),
    );
    let mut changes = Family::new(
        "meterd_interval_changes_total",
        "Changes of the read interval by direction and reason.",
        COUNTER,
    );
    for key in ["widen/pressure", "widen/overrun", "narrow/calm"] {
        let (direction, reason) = key.split_once('/').unwrap_or((key, ""));
        let n = p.interval_changes.get(key).copied().unwrap_or(0);
        changes.sample(&vec![("direction", direction), ("reason", reason)], f(n));
    }
    push(&mut changes);
    if let Some(v) = m.cpu_pressure {
        push(
            Family::new(
                "meterd_cpu_pressure_ratio",
                "Share of the last cycle in which some task waited for a CPU (PSI cpu some).",
                GAUGE,
            )
            .sample(&none, v),
        );
    }
    if let Some(v) = m.psi_some_avg10 {
        push(
            Family::new(
                "meterd_cpu_pressure_avg10_ratio",
                "PSI cpu some avg10, as a ratio.",
                GAUGE,
            )
            .sample(&none, v / 100.0),
        );
    }
    push(
        Family::new(
            "meterd_runnable_tasks_per_cpu",
            "Runnable tasks (procs_running) per online CPU.",
            GAUGE,
        )
        .sample(&none, m.runnable_per_cpu),
    );
    push(
        Family::new(
            "meterd_load1_per_cpu",
            "1-minute load average per online CPU.",
            GAUGE,
        )
        .sample(&none, m.loadavg1_per_cpu),
    );
    let mut kernel = Family::new(
        "meterd_kernel_events_total",
        "Events counted by the eBPF programs; live_map_full, ring_full, lost, udp_map_full, gap_ring_full and udp_probation_failed mean capacity problems.",
        COUNTER,
    );
    for (event, stat) in [
        ("live_map_full", meterd_common::Stat::LiveFull),
        ("ring_full", meterd_common::Stat::RingFull),
        ("lost", meterd_common::Stat::Lost),
        ("udp_map_full", meterd_common::Stat::UdpFull),
        ("opened", meterd_common::Stat::Opened),
        ("closed", meterd_common::Stat::Closed),
        ("gaps", meterd_common::Stat::Gaps),
        ("gap_ring_full", meterd_common::Stat::GapRingFull),
    ] {
        kernel.sample(&vec![("event", event)], f(m.kernel[stat as usize]));
    }
    for (event, stat) in [
        ("udp_probation_new", meterd_common::UdpStat::ProbationNew),
        ("udp_promoted", meterd_common::UdpStat::Promoted),
        (
            "udp_promoted_unseen",
            meterd_common::UdpStat::PromotedUnseen,
        ),
        (
            "udp_probation_failed",
            meterd_common::UdpStat::ProbationFailed,
        ),
    ] {
        kernel.sample(&vec![("event", event)], f(m.udp[stat as usize]));
    }
    push(&mut kernel);
    push(
        Family::new(
            "meterd_live_map_fill_ratio",
            "Entries in the live-connection map over its capacity.",
            GAUGE,
        )
        .sample(&none, f(m.live_map_entries) / f(m.live_map_capacity.max(1))),
    );
    push(
        Family::new(
            "meterd_live_slots_leaked_total",
            "Live-map slots this agent could not return to the free-slot queue (each logged); \
             they are free again only after `meterd unload`.",
            COUNTER,
        )
        .sample(&none, f(m.live_slots_leaked)),
    );
    push(
        Family::new(
            "meterd_ring_buffer_fill_ratio",
            "Unread bytes in the close-record ring buffer over its size.",
            GAUGE,
        )
        .sample(
            &none,
            f(m.ring_pending_bytes) / f(m.ring_capacity_bytes.max(1)),
        ),
    );
    push(
        Family::new(
            "meterd_limit_reached_total",
            "limit_reached events: accounts that used up their prepaid balance or credit limit.",
            COUNTER,
        )
        .sample(&none, f(m.limit_reached)),
    );
    push(
        Family::new(
            "meterd_attributions_pending",
            "Attributions waiting for their connection.",
            GAUGE,
        )
        .sample(&none, f(m.attributions_pending)),
    );
    push(
        Family::new(
            "meterd_attributions_refused_total",
            "Attributions refused (HTTP 503) because api.max_pending were already waiting for their connection.",
            COUNTER,
        )
        .sample(&none, f(m.persisted.attributions_refused)),
    );
    push(
        Family::new(
            "meterd_cycle_charges_total",
            "Charges the billing cycles made: one per viewing session charged per cycle.",
            COUNTER,
        )
        .sample(&none, f(m.persisted.cycle_charges)),
    );
    push(
        Family::new(
            "meterd_ledger_session_writes_total",
            "Rows of viewing sessions written to the ledger (new, changed, settled; newer accruals at most every billing.open_write_interval).",
            COUNTER,
        )
        .sample(&none, f(m.persisted.session_writes)),
    );
    push(
        Family::new(
            "meterd_event_deliveries_pending",
            "Limit events not yet acknowledged by the limit hook or webhook (retried with backoff).",
            GAUGE,
        )
        .sample(&none, f(m.deliveries_pending)),
    );
    push(
        Family::new(
            "meterd_event_delivery_failures_total",
            "Failed attempts to deliver a limit event to the hook or webhook.",
            COUNTER,
        )
        .sample(&none, f(m.delivery_failures)),
    );
    push(
        Family::new(
            "meterd_accounts_over_limit",
            "Accounts with a prepaid balance or credit limit that are at or over it.",
            GAUGE,
        )
        .sample(&none, f(m.accounts_over_limit)),
    );
    if !m.bpf_programs.is_empty() {
        let mut time = Family::new(
            "meterd_bpf_program_run_seconds_total",
            "Run time of meterd's eBPF programs (only with kernel.bpf_stats_enabled=1).",
            COUNTER,
        );
        let mut runs = Family::new(
            "meterd_bpf_program_runs_total",
            "Invocations of meterd's eBPF programs (only with kernel.bpf_stats_enabled=1).",
            COUNTER,
        );
        for (name, t, n) in &m.bpf_programs {
            time.sample(&vec![("program", name.as_str())], t.as_secs_f64());
            runs.sample(&vec![("program", name.as_str())], f(*n));
        }
        push(&mut time);
        push(&mut runs);
    }
    if let Some(fl) = &m.fleet {
        for (name, help, kind, value) in [
            (
                "meterd_fleet_connected",
                "1 while NATS answers, 0 while this host is cut off from the fleet (limits then use its last fleet view).",
                GAUGE,
                if fl.connected { 1.0 } else { 0.0 },
            ),
            (
                "meterd_fleet_view_age_seconds",
                "Seconds since the fleet view was last confirmed by a round trip to NATS; a limit may be overshot by what other hosts spent in this time.",
                GAUGE,
                fl.view_age_seconds.unwrap_or(-1.0),
            ),
            (
                "meterd_outbox_pending",
                "Fleet records in the ledger's outbox not yet acknowledged by the stream.",
                GAUGE,
                f(fl.outbox_pending),
            ),
            (
                "meterd_outbox_oldest_seconds",
                "Age of the oldest fleet record waiting in the outbox (0 when empty).",
                GAUGE,
                fl.outbox_oldest_seconds,
            ),
            (
                "meterd_outbox_published_total",
                "Fleet records the stream acknowledged.",
                COUNTER,
                f(fl.published_total),
            ),
            (
                "meterd_outbox_publish_failures_total",
                "Batches of fleet records that failed to publish (each is retried).",
                COUNTER,
                f(fl.publish_errors_total),
            ),
            (
                "meterd_outbox_duplicates_total",
                "Re-published fleet records that the stream acknowledged as duplicates.",
                COUNTER,
                f(fl.duplicates_total),
            ),
        ] {
            push(Family::new(name, help, kind).sample(&none, value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_names_and_bounded_labels() {
        let mut m = Metrics {
            version: "0.1.0".into(),
            currency: "EUR".into(),
            ..Metrics::default()
        };
        m.services.insert(
            "web".into(),
            (
                "volume".into(),
                ServiceTotals {
                    bytes_out: 1000,
                    bytes_in: 10,
                    charged_minor: 7,
                    connections_live: 1,
                    connections_closed: 2,
                    viewers_live: 1,
                    viewers_settled: 3,
                },
            ),
        );
        m.persisted.observe_cycle(
            Duration::from_millis(3),
            Duration::from_millis(2),
            Duration::ZERO,
        );
        m.persisted.observe_cycle(
            Duration::from_millis(30),
            Duration::from_millis(6),
            Duration::from_millis(5),
        );
        m.persisted.observe_change("widen", "pressure");
        let text = encode(&m);
        for line in [
            "meterd_payload_bytes_total{service=\"web\",direction=\"egress\"} 1000",
            "meterd_charged_minor_total{service=\"web\",tariff_kind=\"volume\",currency=\"EUR\"} 7",
            "meterd_cycle_duration_seconds_count 2",
            "meterd_cycle_duration_seconds_bucket{le=\"0.005\"} 1",
            "meterd_cycle_duration_seconds_bucket{le=\"+Inf\"} 2",
            "meterd_cycle_overruns_total 1",
            "meterd_cycle_cpu_seconds_total 0.008",
            "meterd_interval_changes_total{direction=\"widen\",reason=\"pressure\"} 1",
            "meterd_connections_closed_total{service=\"web\"} 2",
            "meterd_viewer_sessions_settled_total{service=\"web\"} 3",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("client"), "no per-client label: {text}");
    }
}
