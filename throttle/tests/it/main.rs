//! Integration tests for resync-throttle, one binary (one link step). They need the shared
//! Redis (`RESYNC_REDIS_URL`, default 127.0.0.1:6379) and fail, saying how to start it, when it
//! is not there. Every test uses its own key prefix. The cluster test starts a Redis Cluster of its
//! own (`redis-server`, `redis-cli` on the PATH) and runs the suite again on it.

mod circuit;
mod cluster;
mod hold;
mod quota;
mod rate_adapts;
mod shared_rate;
mod support;
