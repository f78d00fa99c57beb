//! Integration tests of the consumer against real Postgres, Redis and brokers, with a
//! recording sink standing in for the third party.

// Test helpers panic on poisoned locks like any other test failure.
#![allow(clippy::unwrap_used)]

mod http_sink;
mod pipeline;
mod pooler;
mod support;
