//! meterd: bills streaming sessions by the bytes and seconds the kernel saw.
//!
//! Data flows one way: kernel counters ([`kernel`]) -> session table
//! ([`sessions`]) -> settlement sinks ([`closed_log`]), driven by the
//! daemon loop in [`agent`]. [`config`] and [`tariff`] hold what the
//! operator configured.

pub mod agent;
pub mod api;
pub mod attribution;
pub mod billing;
pub mod clock;
pub mod closed_log;
pub mod config;
pub mod exporter;
pub mod governor;
pub mod hooks;
pub mod kernel;
pub mod ledger;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod sessions;
pub mod status;
pub mod tariff;
