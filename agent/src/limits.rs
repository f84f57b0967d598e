//! The balance and credit-limit check (the patent's check processing).
//!
//! Owns what each configured account may spend (its prepaid balance or
//! credit limit plus its top-ups), what it has spent, whether it is over,
//! and what its policy says to do then. Spending is every charge recorded
//! for the account: cycle charges as they happen and settlement
//! adjustments. An account crosses its limit once per top-up: crossing is
//! reported once, and a top-up that brings it back under re-admits it.
//! The state is rebuilt from the ledger at start (spent against limit), so
//! a restart neither repeats nor forgets a crossing.
//!
//! On a fleet, the other hosts' spend and top-ups of an account
//! ([`Limits::set_others`]) count as if they were this host's: the check
//! is against the fleet's sum.

use std::collections::HashMap;

use crate::{
    config::{AccountConfig, OnLimit},
    tariff::MICRO,
};

/// Where an account stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No limit configured, or under it.
    Ok,
    /// Spent at least its limit.
    Reached,
    /// `blocked = true` in the config.
    Blocked,
}

#[derive(Debug, Clone)]
struct Account {
    /// Prepaid balance or credit limit, minor units.
    base_minor: u64,
    /// Top-ups, minor units.
    credit_minor: u64,
    policy: Option<OnLimit>,
    blocked: bool,
    reached: bool,
    /// Other hosts of the fleet: their spend (millionths) and top-ups.
    others_micro: i64,
    others_credit_minor: u64,
}

impl Account {
    fn limit_minor(&self) -> u64 {
        self.base_minor
            .saturating_add(self.credit_minor)
            .saturating_add(self.others_credit_minor)
    }

    fn limit_micro(&self) -> i128 {
        i128::from(self.limit_minor()) * i128::from(MICRO)
    }

    /// The fleet's spend, given this host's.
    fn total(&self, own: i64) -> i64 {
        own.saturating_add(self.others_micro)
    }
}

/// Spending and limits of the configured accounts.
#[derive(Debug, Default)]
pub struct Limits {
    accounts: HashMap<String, Account>,
    /// Spent, in millionths of a minor unit (configured accounts only).
    spent: HashMap<String, i64>,
    /// Bumped whenever an account's standing changes: the run loop
    /// republishes the admission standings when it moved.
    generation: u64,
}

/// A top-up's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credited {
    pub limit_minor: u64,
    pub spent_minor: i64,
    /// It was over its limit and is not any more.
    pub readmitted: bool,
}

impl Limits {
    /// Starts from the ledger's spending and top-ups.
    pub fn new(
        accounts: &[AccountConfig],
        spent: HashMap<String, i64>,
        credits: &HashMap<String, u64>,
    ) -> Self {
        let accounts: HashMap<String, Account> = accounts
            .iter()
            .map(|a| {
                let mut account = Account {
                    base_minor: a.limit_minor(),
                    credit_minor: credits.get(&a.id).copied().unwrap_or(0),
                    policy: a.on_limit,
                    blocked: a.blocked,
                    reached: false,
                    others_micro: 0,
                    others_credit_minor: 0,
                };
                let spent = spent.get(&a.id).copied().unwrap_or(0);
                account.reached = i128::from(spent) >= account.limit_micro();
                (a.id.clone(), account)
            })
            .collect();
        let spent = spent
            .into_iter()
            .filter(|(a, _)| accounts.contains_key(a))
            .collect();
        Self {
            accounts,
            spent,
            generation: 0,
        }
    }

    /// Whether any account has a limit (else [`Self::add`] does nothing).
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Adds a recorded charge (negative for a settlement below the cycles).
    pub fn add(&mut self, account: &str, micro: i64) {
        if self.accounts.contains_key(account) {
            *self.spent.entry(account.to_owned()).or_default() += micro;
        }
    }

    /// Accounts that crossed their limit since the last check, with what
    /// they spent (minor units, rounded down) and their limit.
    pub fn check(&mut self) -> Vec<(String, i64, u64)> {
        let mut out = Vec::new();
        for (id, a) in &mut self.accounts {
            let spent = a.total(self.spent.get(id).copied().unwrap_or(0));
            if !a.reached && i128::from(spent) >= a.limit_micro() {
                a.reached = true;
                self.generation += 1;
                out.push((
                    id.clone(),
                    spent / i64::try_from(MICRO).unwrap_or(1),
                    a.limit_minor(),
                ));
            }
        }
        out.sort();
        out
    }

    /// Adds prepaid credit (a committed top-up); `None` for an account
    /// that is not configured.
    pub fn credit(&mut self, account: &str, minor: u64) -> Option<Credited> {
        let a = self.accounts.get_mut(account)?;
        a.credit_minor = a.credit_minor.saturating_add(minor);
        let spent = a.total(self.spent.get(account).copied().unwrap_or(0));
        let was = a.reached;
        a.reached = i128::from(spent) >= a.limit_micro();
        if a.reached != was {
            self.generation += 1;
        }
        Some(Credited {
            limit_minor: a.limit_minor(),
            spent_minor: spent / i64::try_from(MICRO).unwrap_or(1),
            readmitted: was && !a.reached,
        })
    }

    /// The other hosts' spend (millionths) and top-ups of an account, as
    /// the fleet view last had them. A crossing is reported by the next
    /// [`check`](Self::check); `Some(true)` if the account was over and is
    /// not any more (re-admitted); `None` for an account not configured.
    pub fn set_others(
        &mut self,
        account: &str,
        spent_micro: i64,
        credit_minor: u64,
    ) -> Option<bool> {
        let a = self.accounts.get_mut(account)?;
        a.others_micro = spent_micro;
        a.others_credit_minor = credit_minor;
        let spent = a.total(self.spent.get(account).copied().unwrap_or(0));
        let readmitted = a.reached && i128::from(spent) < a.limit_micro();
        if readmitted {
            a.reached = false;
            self.generation += 1;
        }
        Some(readmitted)
    }

    /// This host's own spend (millionths) and top-ups of each configured
    /// account: what it shares with the fleet.
    pub fn own(&self) -> impl Iterator<Item = (&str, i64, u64)> {
        self.accounts.iter().map(|(id, a)| {
            (
                id.as_str(),
                self.spent.get(id).copied().unwrap_or(0),
                a.credit_minor,
            )
        })
    }

    /// Where an account stands.
    pub fn standing(&self, account: &str) -> Standing {
        match self.accounts.get(account) {
            Some(a) if a.blocked => Standing::Blocked,
            Some(a) if a.reached => Standing::Reached,
            _ => Standing::Ok,
        }
    }

    /// An account's limit (with its top-ups) and what it spent, minor units.
    pub fn figures(&self, account: &str) -> Option<(u64, i64)> {
        let a = self.accounts.get(account)?;
        let spent = a.total(self.spent.get(account).copied().unwrap_or(0));
        Some((a.limit_minor(), spent / i64::try_from(MICRO).unwrap_or(1)))
    }

    /// Every configured account: id, limit (with top-ups), spent (minor
    /// units), where it stands.
    pub fn accounts(&self) -> impl Iterator<Item = (&str, u64, i64, Standing)> {
        self.accounts.keys().map(|id| {
            let (limit, spent) = self.figures(id).unwrap_or_default();
            (id.as_str(), limit, spent, self.standing(id))
        })
    }

    /// Whether an account is configured (has a limit).
    pub fn is_configured(&self, account: &str) -> bool {
        self.accounts.contains_key(account)
    }

    /// The account's own `on_limit`, if it set one.
    pub fn policy(&self, account: &str) -> Option<OnLimit> {
        self.accounts.get(account).and_then(|a| a.policy)
    }

    /// Whether an account has reached its limit.
    pub fn is_reached(&self, account: &str) -> bool {
        self.accounts.get(account).is_some_and(|a| a.reached)
    }

    /// Changes whenever some account's standing changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of accounts at their limit.
    pub fn reached_count(&self) -> usize {
        self.accounts.values().filter(|a| a.reached).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, limit: u64) -> AccountConfig {
        AccountConfig {
            id: id.into(),
            prepaid_minor: Some(limit),
            credit_limit_minor: None,
            on_limit: None,
            blocked: false,
        }
    }

    #[test]
    fn limit_is_reached_once_and_a_top_up_readmits() {
        let mut l = Limits::new(&[account("alice", 100)], HashMap::new(), &HashMap::new());
        l.add("alice", 60 * 1_000_000);
        l.add("bob", 1_000 * 1_000_000); // no limit configured
        assert_eq!(l.check(), [] as [(String, i64, u64); 0]);
        l.add("alice", 40 * 1_000_000);
        assert_eq!(l.check(), vec![("alice".to_owned(), 100, 100)]);
        l.add("alice", 1_000_000);
        assert_eq!(l.check(), Vec::new(), "reported only once");
        assert_eq!(l.standing("alice"), Standing::Reached);
        let c = l.credit("alice", 50).unwrap();
        assert_eq!(
            c,
            Credited {
                limit_minor: 150,
                spent_minor: 101,
                readmitted: true
            }
        );
        assert_eq!(l.standing("alice"), Standing::Ok);
        l.add("alice", 49 * 1_000_000);
        assert_eq!(
            l.check(),
            vec![("alice".to_owned(), 150, 150)],
            "crosses again"
        );
        assert_eq!(l.standing("bob"), Standing::Ok);
        assert!(l.credit("bob", 1).is_none());
    }

    #[test]
    fn restart_keeps_what_was_reached_and_topped_up() {
        let spent = HashMap::from([("alice".to_owned(), 120 * 1_000_000)]);
        let mut l = Limits::new(&[account("alice", 100)], spent.clone(), &HashMap::new());
        assert_eq!(l.check(), [] as [(String, i64, u64); 0], "not again");
        assert!(l.is_reached("alice"));
        let credits = HashMap::from([("alice".to_owned(), 50)]);
        let l = Limits::new(&[account("alice", 100)], spent, &credits);
        assert_eq!(l.standing("alice"), Standing::Ok);
    }

    #[test]
    fn the_fleet_sum_reaches_the_limit() {
        let mut l = Limits::new(&[account("alice", 100)], HashMap::new(), &HashMap::new());
        l.add("alice", 60 * 1_000_000);
        assert_eq!(l.set_others("alice", 30 * 1_000_000, 0), Some(false));
        assert_eq!(l.check(), [] as [(String, i64, u64); 0], "90 of 100");
        assert_eq!(l.figures("alice"), Some((100, 90)));
        l.add("alice", 10 * 1_000_000);
        assert_eq!(l.check(), vec![("alice".to_owned(), 100, 100)]);
        assert_eq!(
            l.own().collect::<Vec<_>>(),
            [("alice", 70 * 1_000_000, 0)],
            "shares only its own"
        );
        // Another host's top-up raises the fleet's limit and re-admits.
        let before = l.generation();
        assert_eq!(l.set_others("alice", 30 * 1_000_000, 50), Some(true));
        assert!(l.generation() > before, "a re-admission is published");
        assert_eq!(l.standing("alice"), Standing::Ok);
        assert_eq!(l.set_others("bob", 1, 1), None);
    }

    #[test]
    fn blocked_accounts_stand_blocked() {
        let mut a = account("mallory", 100);
        a.blocked = true;
        let l = Limits::new(&[a], HashMap::new(), &HashMap::new());
        assert_eq!(l.standing("mallory"), Standing::Blocked);
    }
}
