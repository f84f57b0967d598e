//! The fleet: what this host shares with the other hosts through NATS
//! JetStream (the patent's delegation of billing work to another system).
//!
//! Owns the link to NATS and two jobs on it, both off the run loop:
//! - shipping the ledger's outbox ([`outbox`]) to the stream, in order,
//!   marking a record shipped only after its acknowledgement;
//! - sharing per-account spend: this host's cumulative figures go into the
//!   KV bucket under `spend.<account>.<host>`, and the other hosts'
//!   figures come back as the fleet view that the limit check adds to its
//!   own ([`Fleet::view`]).
//!
//! The ledger stays the source of truth: NATS down means the outbox grows
//! and the view ages, never that billing or admission stop.

pub mod config;
pub mod export;
pub mod outbox;
pub mod record;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, kv, message::PublishMessage, stream};
use futures_util::StreamExt as _;
use tokio::sync::{Notify, watch};

pub use config::FleetConfig;
use record::{Envelope, Spend};

/// Env var of the test hook: after the stream acknowledged a batch and
/// before it is marked shipped, create this file and stop shipping, so a
/// test can kill the agent in that window.
pub const HOLD_AFTER_ACK_ENV: &str = "METERD_TEST_FLEET_HOLD_AFTER_ACK";

/// Shipped records stay in the outbox this long (for `meterd fleet
/// replay` without a restart), then go: the ledger's tables keep them.
const OUTBOX_RETENTION_MS: u64 = 7 * 24 * 3_600_000;
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Why the fleet link failed a step (each is retried).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "connecting to NATS {urls}: {source} (check fleet.nats_url, that a server listens there, and the credentials)"
    )]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
    #[error("fleet.nkey_seed_file {path}: {source}")]
    Seed {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JetStream stream {name}: {message}")]
    Stream { name: String, message: String },
    #[error("JetStream KV bucket {name}: {message}")]
    Bucket { name: String, message: String },
    #[error("the ledger's fleet outbox: {0}")]
    Outbox(#[from] rusqlite::Error),
}

/// What the metrics and the status show of the fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FleetStatus {
    pub connected: bool,
    /// Seconds since the last round trip to NATS that succeeded; `None`
    /// before the first.
    pub view_age_seconds: Option<f64>,
    pub outbox_pending: u64,
    pub outbox_oldest_seconds: f64,
    pub published_total: u64,
    pub publish_errors_total: u64,
    /// Acknowledgements the stream gave as duplicates (re-publishes).
    pub duplicates_total: u64,
}

/// State the fleet tasks share with the run loop.
#[derive(Default)]
struct Shared {
    connected: AtomicBool,
    /// When a round trip to NATS last succeeded.
    last_ok: Mutex<Option<Instant>>,
    pending: AtomicU64,
    oldest_ms: AtomicU64,
    published: AtomicU64,
    errors: AtomicU64,
    duplicates: AtomicU64,
    /// Other hosts' figures: account -> host -> figures.
    others: Mutex<HashMap<String, HashMap<String, Spend>>>,
    /// The view changed since the loop last read it.
    view_changed: AtomicBool,
}

impl Shared {
    fn ok(&self) {
        *self
            .last_ok
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }
}

/// The run loop's handle on the fleet tasks.
pub struct Fleet {
    host: String,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    spend: watch::Sender<HashMap<String, Spend>>,
}

/// Other hosts' spend and top-ups of one account, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Others {
    pub spent_micro: i64,
    pub credited_minor: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Fleet {
    /// Starts the fleet tasks on the current runtime. They connect in the
    /// background (the agent does not wait for NATS) and retry forever.
    /// `accounts` are the configured accounts whose spend is shared.
    pub fn start(config: &FleetConfig, ledger: &Path, accounts: Vec<String>) -> Self {
        let host = config.host();
        let shared = Arc::new(Shared::default());
        let wake = Arc::new(Notify::new());
        let (spend, spend_rx) = watch::channel(HashMap::new());
        let link = Link {
            config: config.clone(),
            host: host.clone(),
            ledger: ledger.to_owned(),
            accounts,
            shared: Arc::clone(&shared),
            wake: Arc::clone(&wake),
        };
        tokio::spawn(link.run(spend_rx));
        Self {
            host,
            shared,
            wake,
            spend,
        }
    }

    /// This host's id in the fleet.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The outbox has new records (after a commit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// This host's cumulative figures per account, to share.
    /// Called every cycle: only an account whose figures moved is copied
    /// (and only then are the writers woken).
    pub fn share<'a>(&self, figures: impl Iterator<Item = (&'a str, Spend)>) {
        self.spend.send_if_modified(|current| {
            let mut changed = false;
            for (account, spend) in figures {
                if current.get(account) != Some(&spend) {
                    current.insert(account.to_owned(), spend);
                    changed = true;
                }
            }
            changed
        });
    }

    /// The other hosts' figures per account, if they changed since the
    /// last call.
    pub fn view(&self) -> Option<HashMap<String, Others>> {
        if !self.shared.view_changed.swap(false, Ordering::AcqRel) {
            return None;
        }
        let others = self
            .shared
            .others
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(
            others
                .iter()
                .map(|(account, hosts)| {
                    let sum = hosts.values().fold(Others::default(), |acc, s| Others {
                        spent_micro: acc.spent_micro.saturating_add(s.spent_micro),
                        credited_minor: acc.credited_minor.saturating_add(s.credited_minor),
                    });
                    (account.clone(), sum)
                })
                .collect(),
        )
    }

    /// Where the link stands, for metrics and status.
    pub fn status(&self) -> FleetStatus {
        let s = &self.shared;
        let oldest = s.oldest_ms.load(Ordering::Relaxed);
        let last_ok = *s
            .last_ok
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        #[expect(clippy::cast_precision_loss, reason = "seconds for a gauge")]
        let oldest_seconds = if oldest == 0 {
            0.0
        } else {
            now_ms().saturating_sub(oldest) as f64 / 1000.0
        };
        FleetStatus {
            connected: s.connected.load(Ordering::Relaxed),
            view_age_seconds: last_ok.map(|t| t.elapsed().as_secs_f64()),
            outbox_pending: s.pending.load(Ordering::Relaxed),
            outbox_oldest_seconds: oldest_seconds,
            published_total: s.published.load(Ordering::Relaxed),
            publish_errors_total: s.errors.load(Ordering::Relaxed),
            duplicates_total: s.duplicates.load(Ordering::Relaxed),
        }
    }
}

/// Connects with the configured credentials; the client reconnects by
/// itself after that.
pub async fn connect(config: &FleetConfig, name: &str) -> Result<async_nats::Client, FleetError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(5))
        .max_reconnects(None);
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &config.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| FleetError::Seed {
            path: path.clone(),
            source,
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    options
        .connect(config.nats_url.as_slice())
        .await
        .map_err(|source| FleetError::Connect {
            urls: config.nats_url.join(","),
            source,
        })
}

/// Creates a stream unless it exists; `true` if it created it. A stream
/// an operator made beforehand is used as it is.
async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> Result<bool, String> {
    if js.get_stream(&config.name).await.is_ok() {
        return Ok(false);
    }
    let name = config.name.clone();
    match js.create_stream(config).await {
        Ok(_) => Ok(true),
        // Another host may have created it meanwhile.
        Err(e) => match js.get_stream(&name).await {
            Ok(_) => Ok(false),
            Err(_) => Err(e.to_string()),
        },
    }
}

/// Creates the stream and the bucket where they are missing, saying so.
async fn ensure(js: &jetstream::Context, config: &FleetConfig) -> Result<kv::Store, FleetError> {
    let subjects = format!("{}.>", config.subject_prefix);
    let created = ensure_stream(
        js,
        stream::Config {
            name: config.stream.clone(),
            subjects: vec![subjects.clone()],
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await
    .map_err(|message| FleetError::Stream {
        name: config.stream.clone(),
        message,
    })?;
    if created {
        tracing::info!(stream = %config.stream, subjects, replicas = config.replicas, "fleet: created the JetStream stream");
    }
    // The bucket's stream as the KV protocol (NATS ADR-8) lays it out:
    // async-nats's create_key_value first asks for account info in a form
    // nats-server 2.9 does not answer.
    let bucket_err = |message: String| FleetError::Bucket {
        name: config.bucket.clone(),
        message,
    };
    let created = ensure_stream(
        js,
        stream::Config {
            name: format!("KV_{}", config.bucket),
            subjects: vec![format!("$KV.{}.>", config.bucket)],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
    .map_err(bucket_err)?;
    if created {
        tracing::info!(bucket = %config.bucket, replicas = config.replicas, "fleet: created the JetStream KV bucket");
    }
    js.get_key_value(&config.bucket)
        .await
        .map_err(|e| bucket_err(e.to_string()))
}

/// The background side: connects, then ships and shares until the agent
/// exits.
struct Link {
    config: FleetConfig,
    host: String,
    ledger: PathBuf,
    accounts: Vec<String>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
}

impl Link {
    async fn run(self, spend: watch::Receiver<HashMap<String, Spend>>) {
        let outbox = match outbox::Outbox::open(&self.ledger) {
            Ok(o) => Arc::new(Mutex::new(o)),
            Err(e) => {
                tracing::error!(error = %e, "the fleet outbox cannot be opened: nothing is shipped until a restart");
                return;
            }
        };
        let mut delay = Duration::from_secs(1);
        let (client, store) = loop {
            match self.open().await {
                Ok(pair) => break pair,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "fleet: NATS not reachable; billing goes on locally, the outbox keeps the records");
                    self.backlog(&outbox).await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        tracing::info!(host = %self.host, servers = %self.config.nats_url.join(","), "fleet: connected to NATS");
        let js = jetstream::new(client.clone());
        let this = Arc::new(self);
        let health = tokio::spawn(Arc::clone(&this).health(client.clone()));
        let share = tokio::spawn(Arc::clone(&this).share(store, spend));
        this.ship(&js, &outbox).await;
        health.abort();
        share.abort();
    }

    async fn open(&self) -> Result<(async_nats::Client, kv::Store), FleetError> {
        let client = connect(&self.config, &format!("meterd-{}", self.host)).await?;
        let js = jetstream::new(client.clone());
        let store = ensure(&js, &self.config).await?;
        self.shared.connected.store(true, Ordering::Relaxed);
        self.shared.ok();
        Ok((client, store))
    }

    /// Refreshes the backlog figures.
    async fn backlog(&self, outbox: &Arc<Mutex<outbox::Outbox>>) {
        let o = Arc::clone(outbox);
        let backlog = tokio::task::spawn_blocking(move || {
            o.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .backlog()
        })
        .await;
        if let Ok(Ok(b)) = backlog {
            self.shared.pending.store(b.pending, Ordering::Relaxed);
            self.shared.oldest_ms.store(
                b.oldest_ms.map_or(0, |m| u64::try_from(m).unwrap_or(0)),
                Ordering::Relaxed,
            );
        }
    }

    /// Whether NATS answers: a flush is a round trip.
    async fn health(self: Arc<Self>, client: async_nats::Client) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut was = true;
        loop {
            tick.tick().await;
            let up = matches!(
                client.connection_state(),
                async_nats::connection::State::Connected
            ) && tokio::time::timeout(Duration::from_secs(2), client.flush())
                .await
                .is_ok_and(|r| r.is_ok());
            if up {
                self.shared.ok();
            }
            self.shared.connected.store(up, Ordering::Relaxed);
            if up != was {
                if up {
                    tracing::info!("fleet: NATS reachable again; draining the outbox");
                } else {
                    tracing::warn!(
                        "fleet: NATS unreachable; limits use this host's last fleet view, records wait in the outbox"
                    );
                }
                was = up;
            }
        }
    }

    /// Ships the outbox forever: in order, at most `max_in_flight`
    /// unacknowledged, at most `max_publish_rate` per second.
    async fn ship(&self, js: &jetstream::Context, outbox: &Arc<Mutex<outbox::Outbox>>) {
        let max = self.config.max_in_flight;
        let mut delay = Duration::from_millis(200);
        let mut pruned = Instant::now();
        loop {
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                let o = Arc::clone(outbox);
                let before =
                    i64::try_from(now_ms().saturating_sub(OUTBOX_RETENTION_MS)).unwrap_or(0);
                let _ = tokio::task::spawn_blocking(move || {
                    o.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .prune(before)
                })
                .await;
            }
            self.backlog(outbox).await;
            let o = Arc::clone(outbox);
            let rows = tokio::task::spawn_blocking(move || {
                o.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pending(max)
            })
            .await;
            let rows = match rows {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "fleet: reading the outbox");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => return,
            };
            if rows.is_empty() {
                // A commit wakes us; the timeout refreshes the figures.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            }
            let started = Instant::now();
            let acked = self.publish(js, &rows).await;
            let n = acked.len();
            if n > 0 {
                if let Ok(path) = std::env::var(HOLD_AFTER_ACK_ENV) {
                    let _ = std::fs::write(&path, format!("{n}\n"));
                    tracing::warn!(
                        records = n,
                        "fleet: test hook {HOLD_AFTER_ACK_ENV}: acknowledged, not marking shipped"
                    );
                    std::future::pending::<()>().await;
                }
                let o = Arc::clone(outbox);
                let marked = tokio::task::spawn_blocking(move || {
                    o.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .shipped(&acked, i64::try_from(now_ms()).unwrap_or(i64::MAX))
                })
                .await;
                if let Ok(Err(e)) = marked {
                    // Not marked: shipped again later, under the same id.
                    tracing::error!(error = %e, "fleet: marking records shipped");
                }
                self.shared.published.fetch_add(n as u64, Ordering::Relaxed);
            }
            if n < rows.len() {
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            } else {
                delay = Duration::from_millis(200);
            }
            // The rate limit: this batch may not take less than n / rate.
            let floor = Duration::from_micros(
                (n as u64).saturating_mul(1_000_000) / u64::from(self.config.max_publish_rate),
            );
            if let Some(rest) = floor.checked_sub(started.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
    }

    /// Publishes `rows` (all sent before any acknowledgement is awaited)
    /// and returns the outbox seqs of the acknowledged prefix.
    async fn publish(&self, js: &jetstream::Context, rows: &[outbox::Pending]) -> Vec<i64> {
        let mut sent = Vec::with_capacity(rows.len());
        for row in rows {
            let subject = self.config.subject(&self.host, &row.kind);
            let message = PublishMessage::build()
                .message_id(row.record_id.as_str())
                .payload(row.payload.clone().into());
            match js.send_publish(subject, message).await {
                Ok(ack) => sent.push((row, ack)),
                Err(e) => {
                    tracing::debug!(error = %e, "fleet: publish not sent");
                    break;
                }
            }
        }
        let mut acked = Vec::with_capacity(sent.len());
        for (row, ack) in sent {
            match tokio::time::timeout(Duration::from_secs(10), ack).await {
                Ok(Ok(ack)) => {
                    if ack.duplicate {
                        self.shared.duplicates.fetch_add(1, Ordering::Relaxed);
                        if !self.stored(js, &ack, row).await {
                            break;
                        }
                    }
                    acked.push(row.seq);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, record = %row.record_id, "fleet: publish not acknowledged; retried");
                    break;
                }
                Err(_) => {
                    tracing::warn!(record = %row.record_id, "fleet: no acknowledgement within 10 s; retried");
                    break;
                }
            }
        }
        acked
    }

    /// A duplicate acknowledgement is trusted only if the stream holds the
    /// record at the sequence it names: nats-server before 2.11 (PR #6486)
    /// could answer "duplicate" for an id whose first proposal failed.
    /// Otherwise the record goes again under a fresh message id (consumers
    /// deduplicate by the record's own id, so this cannot count twice).
    async fn stored(
        &self,
        js: &jetstream::Context,
        ack: &jetstream::publish::PublishAck,
        row: &outbox::Pending,
    ) -> bool {
        let held = match js.get_stream(&ack.stream).await {
            Ok(stream) => stream.get_raw_message(ack.sequence).await.is_ok_and(|m| {
                serde_json::from_slice::<Envelope>(&m.payload).is_ok_and(|e| e.id == row.record_id)
            }),
            Err(_) => false,
        };
        if held {
            return true;
        }
        tracing::warn!(record = %row.record_id, sequence = ack.sequence, "fleet: the stream called the record a duplicate but does not hold it; publishing it again under a new message id");
        let subject = self.config.subject(&self.host, &row.kind);
        let message = PublishMessage::build()
            .message_id(format!("{}#{}", row.record_id, now_ms()))
            .payload(row.payload.clone().into());
        match js.send_publish(subject, message).await {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(10), ack)
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        }
    }

    /// Writes this host's figures into the bucket when they change, and
    /// keeps the other hosts' figures of the configured accounts.
    async fn share(
        self: Arc<Self>,
        store: kv::Store,
        mut spend: watch::Receiver<HashMap<String, Spend>>,
    ) {
        let watcher = {
            let this = Arc::clone(&self);
            let store = store.clone();
            tokio::spawn(async move { this.watch(store).await })
        };
        let mut written: HashMap<String, Spend> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = spend.changed() => if r.is_err() { break },
            }
            let figures = spend.borrow_and_update().clone();
            for (account, s) in figures {
                if written.get(&account) == Some(&s) {
                    continue;
                }
                let key = record::spend_key(&account, &self.host);
                let value = serde_json::to_vec(&s).unwrap_or_default();
                match store.put(&key, value.into()).await {
                    Ok(_) => {
                        written.insert(account, s);
                        self.shared.ok();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, key, "fleet: spend not written; retried");
                        break;
                    }
                }
            }
        }
        watcher.abort();
    }

    /// Follows `spend.>` (with the current values first), re-subscribing
    /// after errors.
    async fn watch(&self, store: kv::Store) {
        loop {
            match store.watch_with_history("spend.>").await {
                Ok(mut entries) => {
                    while let Some(entry) = entries.next().await {
                        let Ok(entry) = entry else { break };
                        let Some((account, host)) = record::parse_spend_key(&entry.key) else {
                            continue;
                        };
                        if host == self.host || !self.accounts.contains(&account) {
                            continue;
                        }
                        let value = match entry.operation {
                            kv::Operation::Put => {
                                serde_json::from_slice::<Spend>(&entry.value).ok()
                            }
                            _ => None,
                        };
                        let mut others = self
                            .shared
                            .others
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let hosts = others.entry(account).or_default();
                        match value {
                            Some(v) => hosts.insert(host, v),
                            None => hosts.remove(&host),
                        };
                        self.shared.view_changed.store(true, Ordering::Release);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "fleet: watching spend"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
