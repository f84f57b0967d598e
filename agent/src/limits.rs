//! The per-cycle balance and credit-limit check (the patent's check
//! processing).
//!
//! Owns what each account has spent and which accounts have reached their
//! limit. Spending is every charge recorded for the account: cycle charges
//! as they happen and settlement adjustments at close. An account reaches
//! its limit once; the event is kept in the ledger, so a restart does not
//! repeat it.

use std::collections::{HashMap, HashSet};

use crate::{config::AccountConfig, tariff::MICRO};

/// Spending and limits of the configured accounts.
#[derive(Debug, Default)]
pub struct Limits {
    /// Limit of each account, minor units.
    limit_of: HashMap<String, u64>,
    /// Spent, in millionths of a minor unit (all accounts, not only limited ones).
    spent: HashMap<String, i64>,
    /// Accounts that have reached their limit.
    reached: HashSet<String>,
}

impl Limits {
    /// Starts from the ledger's spending and past events.
    pub fn new(
        accounts: &[AccountConfig],
        spent: HashMap<String, i64>,
        reached: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            limit_of: accounts
                .iter()
                .map(|a| (a.id.clone(), a.limit_minor()))
                .collect(),
            spent,
            reached: reached.into_iter().collect(),
        }
    }

    /// Adds a recorded charge (negative for a settlement below the cycles).
    pub fn add(&mut self, account: &str, micro: i64) {
        if self.limit_of.contains_key(account) {
            *self.spent.entry(account.to_owned()).or_default() += micro;
        }
    }

    /// Accounts that reached their limit since the last check, with what
    /// they spent (minor units, rounded down) and their limit.
    pub fn check(&mut self) -> Vec<(String, i64, u64)> {
        let mut out = Vec::new();
        for (account, &limit) in &self.limit_of {
            let spent = self.spent.get(account).copied().unwrap_or(0);
            let limit_micro = i128::from(limit) * i128::from(MICRO);
            if i128::from(spent) >= limit_micro && self.reached.insert(account.clone()) {
                out.push((
                    account.clone(),
                    spent / i64::try_from(MICRO).unwrap_or(1),
                    limit,
                ));
            }
        }
        out.sort();
        out
    }

    /// Whether an account has reached its limit.
    pub fn is_reached(&self, account: &str) -> bool {
        self.reached.contains(account)
    }

    /// Number of accounts at their limit.
    pub fn reached_count(&self) -> usize {
        self.reached.len()
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
        }
    }

    #[test]
    fn limit_is_reached_once() {
        let mut l = Limits::new(&[account("alice", 100)], HashMap::new(), []);
        l.add("alice", 60 * 1_000_000);
        l.add("bob", 1_000 * 1_000_000); // no limit configured
        assert_eq!(l.check(), [] as [(String, i64, u64); 0]);
        l.add("alice", 40 * 1_000_000);
        assert_eq!(l.check(), vec![("alice".to_owned(), 100, 100)]);
        l.add("alice", 1_000_000);
        assert_eq!(l.check(), Vec::new(), "reported only once");
        assert!(l.is_reached("alice"));
    }

    #[test]
    fn restart_keeps_what_was_reached() {
        let spent = HashMap::from([("alice".to_owned(), 500 * 1_000_000)]);
        let mut l = Limits::new(&[account("alice", 100)], spent, ["alice".to_owned()]);
        assert_eq!(l.check(), [] as [(String, i64, u64); 0]);
    }
}
