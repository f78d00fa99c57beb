//! Opening a Redis connection the way resync's Redis users (locks, the shared rate limit) all
//! want it, and sorting its errors; public so `resync-throttle` shares it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, ErrorKind, RedisError, ServerErrorKind};
use tokio::time::timeout;

/// Connects to `url` (`redis://`, or `rediss://` for TLS; a password in the URL is used for
/// `AUTH`) and checks that the server answers, within `op_timeout`. The error is a reason to
/// show next to the URL as [`resync_redact::redact_password`] prints it.
pub async fn connect(url: &str, op_timeout: Duration) -> Result<ConnectionManager, String> {
    let client = Client::open(url).map_err(|e| e.to_string())?;
    if matches!(client.get_connection_info().addr(), ConnectionAddr::TcpTls { .. }) {
        install_tls_provider();
    }
    timeout(op_timeout, ConnectionManager::new_with_config(client, manager_config(op_timeout)))
        .await
        .map_err(|_| format!("no answer within {op_timeout:?}"))?
        .map_err(|e| e.to_string())
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
/// a replica during failover): worth retrying later.
pub fn is_unavailable(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}
