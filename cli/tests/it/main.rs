//! The `resync` binary end to end: real processes, real signals, real services.

mod chain;
mod consume;
mod deploy;
mod job;
mod relay;
