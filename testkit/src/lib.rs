//! Test support shared by resync's crates.
//!
//! Owns: where the local services are (from the same env vars the binaries read, with the
//! defaults `scripts/services-up` starts), unique names so tests can run in parallel on shared
//! brokers, and the one failure message that tells a developer how to start a missing service.
//! [`proxy::TcpProxy`] simulates a service outage for one test without stopping the shared
//! service. Does not own: connecting to anything. Each crate connects with its own client and calls
//! [`service_unreachable`] when it cannot, so a missing service fails the test loudly.

use std::fmt::Display;

mod own_postgres;
mod own_redis;
mod own_redis_cluster;
pub mod pgbouncer;
pub mod proxy;

pub use own_postgres::OwnPostgres;
pub use own_redis::{OwnRedis, free_port};
pub use own_redis_cluster::{OwnRedisCluster, run_suite_on_a_redis_cluster};

/// A local service a test may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    RabbitMq,
    SnsSqs,
}

impl Service {
    /// The env var that overrides the service's address, and the local default.
    pub fn env_and_default(self) -> (&'static str, &'static str) {
        match self {
            Service::Postgres => ("RESYNC_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
            Service::Redis => ("RESYNC_REDIS_URL", "redis://127.0.0.1:6379"),
            Service::RabbitMq => ("RESYNC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            Service::SnsSqs => ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
        }
    }

    /// The `host:port` of the service's address.
    pub fn socket_addr(self) -> std::net::SocketAddr {
        use std::net::ToSocketAddrs;
        let url = self.url();
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let hostpart = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let authority = hostpart.split('/').next().unwrap_or(hostpart);
        authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("{self:?} address `{authority}` does not resolve"))
    }

    /// The address tests use: the env var if set, else the local default.
    pub fn url(self) -> String {
        let (var, default) = self.env_and_default();
        std::env::var(var).unwrap_or_else(|_| default.to_string())
    }

    fn start_hint(self) -> &'static str {
        match self {
            Service::Postgres => "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            Service::Redis => {
                "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no"
            }
            Service::RabbitMq => "rabbitmq-server -detached",
            Service::SnsSqs => "scripts/services-up (installs moto[server] and starts it on :4566)",
        }
    }
}

/// Fails the calling test with a message that names the service, the address tried, the error,
/// and the command that starts it. Tests never skip when a service is missing.
pub fn service_unreachable(service: Service, err: impl Display) -> ! {
    let (var, _) = service.env_and_default();
    panic!(
        "{service:?} is not reachable at {url} ({var}): {err}\n\
         Start all local services with `scripts/services-up`, or this one with:\n    {hint}",
        url = service.url(),
        hint = service.start_hint(),
    )
}

/// A name no other test (or earlier run) uses: `<prefix>-<8 hex chars of a v4 uuid>`.
/// Only characters valid in SQS, SNS, AMQP, Redis and Postgres identifiers after quoting.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// A plain connection to the test Redis, for inspecting (and tampering with) keys; fails the
/// test with how to start Redis when it cannot connect.
pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    let connect = async {
        let client = redis::Client::open(Service::Redis.url())?;
        client.get_multiplexed_async_connection().await
    };
    match connect.await {
        Ok(conn) => conn,
        Err(e) => service_unreachable(Service::Redis, e),
    }
}

/// A key's time to live in milliseconds (-2: no such key, -1: no expiry).
pub async fn pttl(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.expect("PTTL")
}

/// A field of a Redis hash (`None`: no such key or field).
pub async fn hget(conn: &mut impl redis::aio::ConnectionLike, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET").arg(key).arg(field).query_async(conn).await.expect("HGET")
}

/// Fails the test if `fut` has not finished within `limit`: a hang guard, not a timing claim.
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: still waiting after {limit:?} (hang)"),
    }
}

/// Polls `attempt` until it yields a value; fails the test after `limit`.
pub async fn poll_some<T, F, Fut>(limit: std::time::Duration, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not true after {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Checks a committed generated file (a JSON Schema in `docs/`) against what the code generates
/// now. With `RESYNC_UPDATE_SCHEMAS` set, an outdated file is rewritten and the test still
/// fails, saying so: a run that rewrote the file checked nothing (`scripts/test`, hence CI,
/// refuses to run with the variable set).
pub fn assert_generated_file_current(path: &str, generated: &str, regenerate: &str) {
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed == generated {
        return;
    }
    if std::env::var_os("RESYNC_UPDATE_SCHEMAS").is_some() {
        std::fs::write(path, generated).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        panic!(
            "rewrote {path} (RESYNC_UPDATE_SCHEMAS is set): review and commit it, then run the tests without it"
        );
    }
    panic!("{path} is out of date; regenerate it with `{regenerate}` and commit it");
}

/// Whether this test runs as root (servers that refuse root are then run as `postgres`).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}
