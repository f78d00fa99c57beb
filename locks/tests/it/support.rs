//! Shared test plumbing: connections, a private redis-server, re-running this binary as a
//! worker process, and bounded waits.

use std::future::Future;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use resync_locks::redis_conn::{self, RedisConnection};
use resync_locks::{LockConfig, Locker};
use resync_testkit::{Service, service_unreachable};

/// Timing for tests that do not exercise expiry: leases far longer than any test step.
pub(crate) fn calm_config() -> LockConfig {
    LockConfig {
        lease: Duration::from_secs(30),
        renew_every: Duration::from_secs(10),
        acquire_timeout: Duration::from_secs(30),
        op_timeout: Duration::from_secs(5),
        // Fence counters of test keys need not outlive the test run by a day.
        fence_ttl: Duration::from_secs(600),
        ..LockConfig::default()
    }
}

/// A locker on the shared Redis; fails the test loudly if Redis is not there.
pub(crate) async fn locker(config: LockConfig) -> Locker {
    match Locker::connect(&Service::Redis.url(), config).await {
        Ok(locker) => locker,
        Err(e) => service_unreachable(Service::Redis, e),
    }
}

pub(crate) use resync_testkit::pttl;

/// A plain connection for looking at keys, on whatever `RESYNC_REDIS_URL` names (one Redis or a
/// cluster's seeds); fails the test loudly if Redis is not there.
pub(crate) async fn raw() -> RedisConnection {
    match redis_conn::connect(&Service::Redis.url(), Duration::from_secs(5)).await {
        Ok(conn) => conn,
        Err(e) => service_unreachable(Service::Redis, e),
    }
}

pub(crate) async fn get(conn: &mut RedisConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.expect("GET")
}

/// Polls `condition` until it holds; fails the test after `limit`.
pub(crate) async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_some(limit, what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

pub(crate) use resync_testkit::{OwnRedis, free_port, poll_some, within};

/// The name libtest knows a test in this binary by, from `module_path!()` and the fn name.
pub(crate) fn test_name(module_path: &str, function: &str) -> String {
    let module = module_path.split_once("::").map_or("", |(_, rest)| rest);
    if module.is_empty() { function.to_owned() } else { format!("{module}::{function}") }
}

/// Runs one test of this very binary in a new process, with `env` set; the test reads the
/// env to know it is the worker. Output is captured and shown if the worker fails.
pub(crate) fn spawn_self(test: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut command = tokio::process::Command::new(exe);
    command
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().expect("re-run the test binary")
}

/// Waits for a worker started by [`spawn_self`]; fails with its output unless it passed.
pub(crate) async fn expect_success(worker: tokio::process::Child, what: &str) {
    let output = worker.wait_with_output().await.expect("wait for worker");
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// A directory for one test's files, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(resync_testkit::unique_name(prefix));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
