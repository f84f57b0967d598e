//! meterd: bills streaming sessions by the bytes and seconds the kernel saw.
//!
//! Data flows one way: kernel counters ([`kernel`]) -> the billing core
//! ([`core`]: connections, viewing sessions, charges, limits) -> the
//! ledger and exports ([`ledger`], [`closed_log`], [`metrics`]), driven by
//! the run loop in [`agent`], with [`load`] and [`governor`] pacing the
//! cycle. [`config`] and [`tariff`] hold what the operator configured.
//! The [`api`] answers admissions from [`admission`]'s published standings
//! on its own thread, with each answer first recorded in the [`journal`].

pub mod admission;
pub mod agent;
pub mod api;
pub mod attribution;
pub mod billing;
pub mod clock;
pub mod closed_log;
pub mod config;
pub mod core;
pub mod exporter;
pub mod fleet;
pub mod governor;
pub mod hooks;
pub mod journal;
pub mod kernel;
pub mod ledger;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod runtime;
pub mod serve;
pub mod status;
pub mod tariff;
