//! Opening a Redis connection the way resync's Redis users (locks, the shared rate limit) all
//! want it, on one node or a Redis Cluster, and sorting its errors; public so
//! `resync-throttle` shares it.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{
    Client, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value,
};
use tokio::time::timeout;

/// One Redis, or a Redis Cluster, behind one type: every command and script of the locks and
/// the throttle goes through it unchanged. Cheap to clone; clones share the connection(s),
/// which reconnect by themselves (and, on a cluster, follow `MOVED`/`ASK` and failovers).
#[derive(Clone)]
pub enum RedisConnection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// True on a Redis Cluster, where one script may only touch keys of one hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// Splits `keys` (by index) into the groups one script call may take together: all of them
    /// on one node, one group per hash slot on a cluster. Groups keep the keys' order.
    pub fn script_groups<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Vec<usize>> {
        if !self.is_cluster() {
            return vec![(0..keys.len()).collect()];
        }
        let mut groups: Vec<(Slot, Vec<usize>)> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let slot = Slot::for_key(key);
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(index),
                None => groups.push((slot, vec![index])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Node(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Node(conn) => conn.get_db(),
            RedisConnection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Connects to `urls` and checks that Redis answers, within `op_timeout` per step.
///
/// `urls` is one URL (`redis://`, or `rediss://` for TLS; a password in the URL is used for
/// `AUTH`) or several separated by commas, the seed nodes of a cluster. Whether it is a
/// cluster is asked of the server (`INFO cluster`), so a cluster's configuration endpoint
/// (ElastiCache, MemoryDB) works as a single URL. The error is a reason to show next to the
/// URL as [`resync_redact::redact_password`] prints it.
pub async fn connect(urls: &str, op_timeout: Duration) -> Result<RedisConnection, String> {
    let seeds: Vec<&str> = urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
    let Some(first) = seeds.first() else { return Err("no Redis URL given".to_owned()) };
    let node = connect_node(first, op_timeout).await?;
    if !cluster_enabled(node.clone(), op_timeout).await? {
        if seeds.len() > 1 {
            return Err(format!(
                "{} URLs were given (cluster seed nodes) but {} is not in cluster mode; give one URL \
                 for a single Redis",
                seeds.len(),
                resync_redact::redact_password(first)
            ));
        }
        return Ok(RedisConnection::Node(node));
    }
    drop(node);
    let client = ClusterClientBuilder::new(seeds.iter().copied())
        .connection_timeout(op_timeout)
        .response_timeout(op_timeout)
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(1000)
        .build()
        .map_err(|e| e.to_string())?;
    let cluster = timeout(op_timeout, client.get_async_connection())
        .await
        .map_err(|_| format!("the cluster did not answer within {op_timeout:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(RedisConnection::Cluster(cluster))
}

async fn connect_node(url: &str, op_timeout: Duration) -> Result<ConnectionManager, String> {
    let client = Client::open(url).map_err(|e| e.to_string())?;
    if matches!(client.get_connection_info().addr(), ConnectionAddr::TcpTls { .. }) {
        install_tls_provider();
    }
    timeout(op_timeout, ConnectionManager::new_with_config(client, manager_config(op_timeout)))
        .await
        .map_err(|_| format!("no answer within {op_timeout:?}"))?
        .map_err(|e| e.to_string())
}

/// `INFO cluster` says `cluster_enabled:1` on a cluster node, `:0` on a plain Redis.
async fn cluster_enabled(mut node: ConnectionManager, op_timeout: Duration) -> Result<bool, String> {
    let info: String = timeout(op_timeout, redis::cmd("INFO").arg("cluster").query_async(&mut node))
        .await
        .map_err(|_| format!("no answer to INFO within {op_timeout:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

/// The connection manager's own timeouts match ours, and its reconnect attempts stay short
/// so a returning Redis is noticed within about a second.
fn manager_config(op_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(op_timeout))
        .set_response_timeout(Some(op_timeout))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(3)
}

/// redis' rustls support ships no crypto provider; install the one the workspace builds
/// unless the application already installed its own (then `install_default` fails, harmlessly).
fn install_tls_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Connection-level failures, plus the server replies that mean "not now" (loading a dump,
/// a replica during failover, a cluster moving slots): worth retrying later.
pub fn is_unavailable(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.kind() == ErrorKind::ClusterConnectionNotFound
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
                    // The cluster moved the slot (a failover, resharding) and the client ran out
                    // of redirects before its slot map caught up: the next call finds it.
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
            )
        )
}
