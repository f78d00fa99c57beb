//! # resync-demo: the main job, and the scenarios end-to-end tests share
//!
//! [`run`] is `resync demo`: on the local services it provisions a small system with fare,
//! writes and updates entities through the outbox, runs the relay and several consumers
//! against the API simulator with faults on, injects duplicates (a replay) and a resync, then
//! reports what happened and whether the third party's final state equals the database.
//!
//! [`scale`] is `resync scale-test`: many `resync consume` processes against a rate-limited
//! third party during a full resync, with a scale-down and limit changes mid-run.
//!
//! [`scenario`] holds the event histories, source table and state comparison that the demo and
//! the end-to-end tests use. This crate owns no production logic: everything it runs is the
//! other crates' public API, wired the way a user would.

mod run;
pub mod scale;
pub mod scenario;

pub use run::{DemoError, DemoOptions, Report, run};
