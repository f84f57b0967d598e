//! Admission without the run loop: `/v1/authorize` and the nginx-rtmp
//! callbacks are answered by the API's own thread, from standings the loop
//! publishes, and the attribution they imply is journaled and handed to
//! the loop, which applies it without anyone waiting.
//!
//! Owns three things: the refusal rule ([`refusal`], also what the billing
//! core's own [`Core::authorize`](crate::core::Core::authorize) uses), the
//! published [`Standings`] (the only input of that rule the API needs: the
//! accounts that are blocked or at their limit, their policies and the
//! services'), and the [`Gate`] between the API and the loop, which bounds
//! the attributions waiting for their connection (`api.max_pending`) and
//! makes sure that an answered admission is in the [`Journal`] before the
//! answer leaves. It does not own attribution itself (the core does) nor
//! the journal's file format ([`crate::journal`]).
//!
//! Consistency: the loop publishes new standings as soon as the core's
//! change (right after the cycle's check marks an account `limit_reached`,
//! before that cycle's commit and cut-off; after a top-up is committed), so
//! every admission decided after that point sees them. An admission decided
//! concurrently with the change is ordered before it, as a request that
//! reached the loop just before the cycle was before.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use tokio::sync::mpsc;

use crate::{
    attribution::{Attribution, ConnectionRef},
    config::OnLimit,
    core::Decision,
    journal::{Entry, Journal, JournalError},
    limits::{Limits, Standing},
};

/// Why an account is refused, if it is: blocked whatever its balance, or
/// over its limit under a `deny` or `cut` policy (the account's own, else
/// its service's, else `cut`). `notify` only reports.
pub fn refusal(
    standing: Standing,
    account_policy: Option<OnLimit>,
    service_policy: Option<OnLimit>,
) -> Option<&'static str> {
    match standing {
        Standing::Blocked => Some("blocked"),
        Standing::Reached
            if account_policy.or(service_policy).unwrap_or(OnLimit::Cut) != OnLimit::Notify =>
        {
            Some("limit_reached")
        }
        Standing::Ok | Standing::Reached => None,
    }
}

/// What admission needs to know of the accounts: those that are not in
/// good standing (every other account, configured or not, is admitted),
/// and the services' `on_limit` by TCP port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standings {
    /// Blocked or limit-reached accounts, with their own policy.
    accounts: HashMap<String, (Standing, Option<OnLimit>)>,
    /// Services' `on_limit` by server port (TCP).
    ports: HashMap<u16, Option<OnLimit>>,
}

impl Standings {
    /// The standings of `limits`, with each service's policy on its ports.
    pub fn new(limits: &Limits, ports: impl IntoIterator<Item = (u16, Option<OnLimit>)>) -> Self {
        Self {
            accounts: limits
                .accounts()
                .filter(|(_, _, _, standing)| *standing != Standing::Ok)
                .map(|(id, _, _, standing)| (id.to_owned(), (standing, limits.policy(id))))
                .collect(),
            ports: ports.into_iter().collect(),
        }
    }

    /// Why `account` is refused on `server_port` (unknown for nginx-rtmp),
    /// if it is: [`refusal`] on these standings.
    pub fn refusal(&self, account: &str, server_port: Option<u16>) -> Option<&'static str> {
        let (standing, policy) = self.accounts.get(account).copied()?;
        let service = server_port.and_then(|p| self.ports.get(&p).copied().flatten());
        refusal(standing, policy, service)
    }
}

/// An answered admission on its way to the run loop.
#[derive(Debug)]
pub struct Admission {
    pub conn: ConnectionRef,
    /// With `denied` set when it was refused.
    pub attribution: Attribution,
    /// When it was answered: a pending attribution's TTL counts from then.
    pub at: Instant,
}

/// Why an admission could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// `api.max_pending` attributions wait already (503, as before).
    #[error("too many attributions are waiting for their connection")]
    Busy,
    /// The journal could not be written: nothing is answered 204 unless
    /// it is on record.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The run loop has stopped.
    #[error("meterd is stopping")]
    Stopping,
}

/// The API's side of admission, shared with the run loop.
#[derive(Debug)]
pub struct Gate {
    standings: RwLock<Arc<Standings>>,
    /// The journal and the channel to the loop, under one lock: an entry
    /// is sent in the order of its sequence number, and the loop's
    /// rotation (drain, then a new file) sees every entry of the old file.
    journal: Mutex<(Journal, mpsc::UnboundedSender<Admission>)>,
    /// Attributions waiting in the core, as the loop last published.
    pending: AtomicUsize,
    /// Admissions answered whose attribution the loop has not applied yet
    /// (each holds a pending slot until then).
    queued: AtomicUsize,
    max_pending: usize,
}

impl Gate {
    /// A gate writing to `journal`, deciding from `standings`, handing
    /// admissions to the loop through `to_loop`.
    pub fn new(
        standings: Standings,
        journal: Journal,
        to_loop: mpsc::UnboundedSender<Admission>,
        max_pending: usize,
        pending: usize,
    ) -> Self {
        Self {
            standings: RwLock::new(Arc::new(standings)),
            journal: Mutex::new((journal, to_loop)),
            pending: AtomicUsize::new(pending),
            queued: AtomicUsize::new(0),
            max_pending,
        }
    }

    /// The standings admissions are decided from now.
    pub fn standings(&self) -> Arc<Standings> {
        Arc::clone(
            &self
                .standings
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the standings (the loop, whenever they change).
    pub fn publish(&self, standings: Standings) {
        *self
            .standings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(standings);
    }

    /// Decides an admission and, unless the account is refused and the
    /// connection named only by address, records it in the journal and
    /// hands it to the loop before returning: so the answer is given only
    /// for what is on record. Denials are decided exactly as
    /// [`Core::authorize`](crate::core::Core::authorize) decides them.
    pub fn admit(
        &self,
        conn: ConnectionRef,
        mut attribution: Attribution,
        server_port: Option<u16>,
    ) -> Result<Decision, GateError> {
        let refused = self.standings().refusal(&attribution.account, server_port);
        attribution.denied = refused.is_some();
        // As in the core: a refusal is kept only for a connection named
        // exactly, and a refusal that finds no slot is not kept at all.
        let keep = !(attribution.denied && matches!(conn, ConnectionRef::Client(_)));
        if keep {
            match self.reserve() {
                Ok(()) => {
                    if let Err(e) = self.record(conn, attribution) {
                        self.queued.fetch_sub(1, Ordering::AcqRel);
                        return Err(e);
                    }
                }
                Err(e) if refused.is_none() => return Err(e),
                Err(_) => {}
            }
        }
        Ok(match refused {
            Some(reason) => Decision::Deny(reason),
            None => Decision::Allow(crate::core::Outcome::Pending),
        })
    }

    /// Takes a pending slot, if `max_pending` leaves one.
    fn reserve(&self) -> Result<(), GateError> {
        let pending = self.pending.load(Ordering::Acquire);
        self.queued
            .try_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (pending + q < self.max_pending).then_some(q + 1)
            })
            .map(|_| ())
            .map_err(|_| GateError::Busy)
    }

    fn record(&self, conn: ConnectionRef, attribution: Attribution) -> Result<(), GateError> {
        let at = Instant::now();
        let mut guard = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (journal, to_loop) = &mut *guard;
        journal.append(&conn, &attribution)?;
        to_loop
            .send(Admission {
                conn,
                attribution,
                at,
            })
            .map_err(|_| GateError::Stopping)
    }

    /// The loop applied `n` admissions and has `pending` attributions
    /// waiting now (also called with `n = 0` whenever that changed).
    pub fn applied(&self, n: usize, pending: usize) {
        // The new count first: pending + queued never undercounts.
        self.pending.store(pending, Ordering::Release);
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }

    /// Starts a new journal file: under the lock, the loop takes every
    /// admission already sent (all of the old file's entries), then the
    /// file is switched. The caller applies them, commits, writes the
    /// still-pending attributions with [`Gate::rewrite`] and then
    /// [`Journal::retire`]s the old files.
    /// `None` when the current file is empty and no older one is left.
    pub fn rotate(
        &self,
        from_loop: &mut mpsc::UnboundedReceiver<Admission>,
    ) -> Result<Option<Vec<Admission>>, JournalError> {
        let mut guard = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.0.is_empty() && !guard.0.has_retired() {
            return Ok(None);
        }
        let mut taken = Vec::new();
        while let Ok(a) = from_loop.try_recv() {
            taken.push(a);
        }
        guard.0.rotate()?;
        Ok(Some(taken))
    }

    /// Writes the attributions still pending into the current journal
    /// file (with their original sequence numbers), then removes the
    /// retired files: what they held is committed or written again.
    pub fn rewrite(&self, pending: &[Entry]) -> Result<(), JournalError> {
        let mut guard = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.0.write_entries(pending)?;
        guard.0.remove_retired()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::AccountConfig;

    fn account(id: &str, limit: u64, on_limit: Option<OnLimit>, blocked: bool) -> AccountConfig {
        AccountConfig {
            id: id.into(),
            prepaid_minor: Some(limit),
            credit_limit_minor: None,
            on_limit,
            blocked,
        }
    }

    fn limits() -> Limits {
        let spent = HashMap::from([
            ("over".to_owned(), 200 * 1_000_000),
            ("over_notify".to_owned(), 200 * 1_000_000),
            ("over_deny".to_owned(), 200 * 1_000_000),
        ]);
        Limits::new(
            &[
                account("ok", 100, None, false),
                account("over", 100, None, false),
                account("over_notify", 100, Some(OnLimit::Notify), false),
                account("over_deny", 100, Some(OnLimit::Deny), false),
                account("blocked", 100, Some(OnLimit::Notify), true),
            ],
            spent,
            &HashMap::new(),
        )
    }

    #[test]
    fn refusal_rule() {
        use OnLimit::{Cut, Deny, Notify};
        assert_eq!(refusal(Standing::Ok, Some(Cut), Some(Cut)), None);
        assert_eq!(
            refusal(Standing::Blocked, Some(Notify), None),
            Some("blocked")
        );
        assert_eq!(
            refusal(Standing::Reached, None, None),
            Some("limit_reached")
        );
        assert_eq!(
            refusal(Standing::Reached, None, Some(Deny)),
            Some("limit_reached")
        );
        assert_eq!(refusal(Standing::Reached, None, Some(Notify)), None);
        assert_eq!(
            refusal(Standing::Reached, Some(Cut), Some(Notify)),
            Some("limit_reached")
        );
        assert_eq!(refusal(Standing::Reached, Some(Notify), Some(Cut)), None);
    }

    #[test]
    fn standings_hold_only_accounts_not_in_good_standing() {
        let s = Standings::new(&limits(), [(8080, Some(OnLimit::Notify)), (8081, None)]);
        assert_eq!(s.accounts.len(), 4, "{s:?}");
        assert_eq!(s.refusal("ok", Some(8080)), None);
        assert_eq!(s.refusal("stranger", Some(8081)), None);
        assert_eq!(s.refusal("blocked", None), Some("blocked"));
        // The service's notify applies to an account without its own.
        assert_eq!(s.refusal("over", Some(8080)), None);
        assert_eq!(s.refusal("over", Some(8081)), Some("limit_reached"));
        assert_eq!(s.refusal("over", None), Some("limit_reached"));
        assert_eq!(s.refusal("over_notify", Some(8081)), None);
        assert_eq!(s.refusal("over_deny", Some(8080)), Some("limit_reached"));
    }

    #[test]
    fn published_standings_decide_from_then_on() {
        let mut l = Limits::new(
            &[account("alice", 100, None, false)],
            HashMap::new(),
            &HashMap::new(),
        );
        let dir = tempfile::tempdir().unwrap();
        let (journal, replayed) = Journal::open(&dir.path().join("ledger.sqlite")).unwrap();
        assert_eq!(replayed, []);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let gate = Gate::new(Standings::new(&l, []), journal, tx, 10, 0);
        let alice = || Attribution {
            account: "alice".into(),
            content: None,
            denied: false,
        };
        let conn = ConnectionRef::Tuple {
            client: "203.0.113.7:5000".parse().unwrap(),
            server_port: 8080,
        };
        assert!(matches!(
            gate.admit(conn, alice(), Some(8080)).unwrap(),
            Decision::Allow(_)
        ));
        let generation = l.generation();
        l.add("alice", 100 * 1_000_000);
        assert_eq!(l.check().len(), 1);
        assert_ne!(l.generation(), generation);
        gate.publish(Standings::new(&l, []));
        assert_eq!(
            gate.admit(conn, alice(), Some(8080)).unwrap(),
            Decision::Deny("limit_reached")
        );
        // Both reached the loop, the second marked denied, in order.
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert!(!a.attribution.denied && b.attribution.denied);
        // The top-up readmits.
        l.credit("alice", 50).unwrap();
        gate.publish(Standings::new(&l, []));
        assert!(matches!(
            gate.admit(conn, alice(), Some(8080)).unwrap(),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn the_pending_cap_holds_across_the_gate_and_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(&dir.path().join("ledger.sqlite")).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let gate = Gate::new(Standings::default(), journal, tx, 3, 1);
        let a = || Attribution {
            account: "a".into(),
            content: None,
            denied: false,
        };
        let conn = |port| ConnectionRef::Tuple {
            client: std::net::SocketAddr::new([203, 0, 113, 7].into(), port),
            server_port: 80,
        };
        assert!(gate.admit(conn(1), a(), Some(80)).is_ok());
        assert!(gate.admit(conn(2), a(), Some(80)).is_ok());
        assert!(matches!(
            gate.admit(conn(3), a(), Some(80)),
            Err(GateError::Busy)
        ));
        // The loop applied both; one of them found its connection.
        gate.applied(2, 2);
        assert!(gate.admit(conn(4), a(), Some(80)).is_ok());
        assert!(matches!(
            gate.admit(conn(5), a(), Some(80)),
            Err(GateError::Busy)
        ));
    }
}
