//! Integration tests for resync-locks, one binary (one link step). They need the shared Redis
//! (`RESYNC_REDIS_URL`, default 127.0.0.1:6379) and, for the restart and TLS tests,
//! `redis-server` and `openssl` on the PATH (and `redis-cli` for the cluster tests, which
//! start a Redis Cluster of their own); every test uses its own keys.

mod basics;
mod cluster;
mod contention;
mod expiry;
mod restart;
mod support;
mod tls;
