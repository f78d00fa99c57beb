//! [`Locker`]: the connection to Redis and the acquisition paths.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use redis::RedisResult;
use redis::cluster_routing::Slot;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, instrument};

use crate::guard::LockGuard;
use crate::redis_conn::RedisConnection;
use crate::scripts::Scripts;
use crate::{LockConfig, LockError};

/// Takes locks on one Redis or a Redis Cluster. Cheap to clone; clones share one multiplexed
/// connection (one per node on a cluster) that reconnects by itself after Redis comes back.
#[derive(Clone)]
pub struct Locker {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConnection,
    config: LockConfig,
    scripts: Scripts,
}

impl std::fmt::Debug for Locker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locker").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// A successful acquisition, before it is wrapped in a guard.
pub(crate) struct Acquired {
    pub(crate) token: String,
    pub(crate) fence: u64,
    /// When the lease ends at the latest, measured from before the request was sent.
    pub(crate) valid_until: Instant,
}

impl Locker {
    /// Connects to `url` (`redis://` or `rediss://` for TLS; a password in the URL is used
    /// for `AUTH`; several comma-separated URLs for a cluster's seed nodes, see
    /// [`redis_conn::connect`](crate::redis_conn::connect)) and checks that the server answers,
    /// within `config.op_timeout`.
    pub async fn connect(url: &str, config: LockConfig) -> Result<Self, LockError> {
        config.validate()?;
        let conn = crate::redis_conn::connect(url, config.op_timeout)
            .await
            .map_err(|reason| LockError::Connect { url: resync_redact::redact_password(url), reason })?;
        let inner = Inner { conn, config, scripts: Scripts::new() };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The timing this locker was built with.
    pub fn config(&self) -> &LockConfig {
        &self.inner.config
    }

    /// One attempt: the lock if `key` is free, `None` if someone holds it.
    #[instrument(level = "debug", skip(self), err(level = "debug"))]
    pub async fn try_acquire(&self, key: &str) -> Result<Option<LockGuard>, LockError> {
        let acquired = self.try_acquire_raw(key).await?;
        Ok(acquired.map(|acquired| LockGuard::start(self.clone(), key, acquired)))
    }

    /// Waits up to `config.acquire_timeout` for `key`; see [`Locker::acquire_within`].
    pub async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        self.acquire_within(key, self.inner.config.acquire_timeout).await
    }

    /// Retries `key` with jittered exponential backoff until it is free or `wait` has passed.
    ///
    /// Returns [`LockError::Timeout`] if the key stayed busy, or the last Redis error if Redis
    /// was unreachable at the end. Returns within `wait + op_timeout`.
    #[instrument(level = "debug", skip(self), err(level = "debug"))]
    pub async fn acquire_within(&self, key: &str, wait: Duration) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.inner.config.retry_min, self.inner.config.retry_max);
        loop {
            let last_error = match self.try_acquire(key).await {
                Ok(Some(guard)) => return Ok(guard),
                Ok(None) => None,
                // Redis being away is worth waiting out like a busy key.
                Err(e) if e.is_transient() => Some(e),
                Err(e) => return Err(e),
            };
            let waited = started.elapsed();
            let Some(left) = wait.checked_sub(waited).filter(|left| !left.is_zero()) else {
                return Err(last_error.unwrap_or(LockError::Timeout { key: key.to_owned(), waited }));
            };
            sleep(backoff.next_delay().min(left)).await;
        }
    }

    pub(crate) async fn try_acquire_raw(&self, key: &str) -> Result<Option<Acquired>, LockError> {
        let config = &self.inner.config;
        let token = uuid::Uuid::now_v7().simple().to_string();
        let sent_at = Instant::now();
        let mut conn = self.inner.conn.clone();
        let mut invocation = self.inner.scripts.acquire.key(key);
        invocation.key(fence_key(key)).arg(&token).arg(millis(config.lease)).arg(millis(config.fence_ttl));
        let result: Result<u64, LockError> =
            self.bounded("acquire", key, invocation.invoke_async(&mut conn)).await;
        match result {
            Ok(0) => Ok(None),
            Ok(fence) => {
                debug!(key, fence, "lock acquired");
                Ok(Some(Acquired { token, fence, valid_until: sent_at + config.lease }))
            }
            Err(e) => {
                self.forget_ambiguous_acquire(key, &token, &e);
                Err(e)
            }
        }
    }

    /// One attempt at many keys in one round trip: per key, the lock if it was free, `None`
    /// if someone holds it. Keys must be distinct. On a cluster, one script call per hash slot,
    /// sent together (the cluster connection pipelines them per node).
    #[instrument(level = "debug", skip_all, fields(keys = keys.len()), err(level = "debug"))]
    pub async fn try_acquire_many(&self, keys: &[&str]) -> Result<Vec<Option<LockGuard>>, LockError> {
        let config = &self.inner.config;
        let tokens: Vec<String> = keys.iter().map(|_| uuid::Uuid::now_v7().simple().to_string()).collect();
        let sent_at = Instant::now();
        let groups = self.inner.conn.script_groups(keys);
        let calls = groups.iter().map(|group| self.acquire_group(keys, &tokens, group));
        let mut fences = vec![0; keys.len()];
        let mut failure = None;
        for (group, result) in groups.iter().zip(futures::future::join_all(calls).await) {
            match result {
                Ok(group_fences) => {
                    for (&index, fence) in group.iter().zip(group_fences) {
                        fences[index] = fence;
                    }
                }
                Err(e) => {
                    for &index in group {
                        self.forget_ambiguous_acquire(keys[index], &tokens[index], &e);
                    }
                    failure = Some(e);
                }
            }
        }
        let guards: Vec<Option<LockGuard>> = keys
            .iter()
            .zip(tokens)
            .zip(fences)
            .map(|((key, token), fence)| {
                (fence != 0).then(|| {
                    let acquired = Acquired { token, fence, valid_until: sent_at + config.lease };
                    LockGuard::start(self.clone(), key, acquired)
                })
            })
            .collect();
        match failure {
            // The locks other slots gave are released again (dropping their guards), so a
            // failure leaves nothing held, as on one node.
            Some(e) => {
                self.release_many(guards.into_iter().flatten().collect()).await.ok();
                Err(e)
            }
            None => Ok(guards),
        }
    }

    /// One `ACQUIRE_MANY` call for the keys at `group` (indexes into `keys` and `tokens`).
    async fn acquire_group(
        &self,
        keys: &[&str],
        tokens: &[String],
        group: &[usize],
    ) -> Result<Vec<u64>, LockError> {
        let config = &self.inner.config;
        let mut conn = self.inner.conn.clone();
        let mut invocation = self.inner.scripts.acquire_many.prepare_invoke();
        for &index in group {
            invocation.key(keys[index]).key(fence_key(keys[index]));
        }
        invocation.arg(millis(config.lease)).arg(millis(config.fence_ttl));
        for &index in group {
            invocation.arg(&tokens[index]);
        }
        let first = group.first().map_or("", |&index| keys[index]);
        self.bounded("acquire", first, invocation.invoke_async(&mut conn)).await
    }

    /// Releases many guards in one round trip (compare-and-delete each; one call per hash slot
    /// on a cluster); returns how many locks were still ours and deleted. Guards already
    /// released or lost count as not held.
    pub async fn release_many(&self, guards: Vec<LockGuard>) -> Result<usize, LockError> {
        let held: Vec<(String, String)> = guards.into_iter().filter_map(LockGuard::into_release).collect();
        let keys: Vec<&str> = held.iter().map(|(key, _)| key.as_str()).collect();
        let calls = self.inner.conn.script_groups(&keys).into_iter().map(|group| {
            let mut conn = self.inner.conn.clone();
            let mut invocation = self.inner.scripts.release_many.prepare_invoke();
            for &index in &group {
                let (key, token) = &held[index];
                invocation.key(key).arg(token);
            }
            let first = group.first().map_or("", |&index| keys[index]).to_owned();
            async move { self.bounded("release", &first, invocation.invoke_async::<usize>(&mut conn)).await }
        });
        let mut deleted = 0;
        for result in futures::future::join_all(calls).await {
            deleted += result?;
        }
        debug!(locks = held.len(), deleted, "locks released");
        Ok(deleted)
    }

    /// After a lost reply the script may still have run and taken the lock for a token
    /// nobody will use; delete it in the background rather than block the key for a lease.
    fn forget_ambiguous_acquire(&self, key: &str, token: &str, err: &LockError) {
        if !err.is_transient() {
            return;
        }
        let (locker, key, token) = (self.clone(), key.to_owned(), token.to_owned());
        tokio::spawn(async move {
            // Best effort: if Redis is still away this fails and the lease expires on its own.
            let _ = locker.release_token(&key, &token).await;
        });
    }

    /// Compare-and-extend. `Ok(false)` means `token` no longer owns `key`.
    pub(crate) async fn renew_token(&self, key: &str, token: &str) -> Result<bool, LockError> {
        let mut conn = self.inner.conn.clone();
        let mut invocation = self.inner.scripts.renew.key(key);
        invocation.arg(token).arg(millis(self.inner.config.lease));
        let extended: i64 = self.bounded("renew", key, invocation.invoke_async(&mut conn)).await?;
        Ok(extended == 1)
    }

    /// Compare-and-delete. `Ok(false)` means `token` did not own `key` (any more).
    pub(crate) async fn release_token(&self, key: &str, token: &str) -> Result<bool, LockError> {
        let mut conn = self.inner.conn.clone();
        let mut invocation = self.inner.scripts.release.key(key);
        invocation.arg(token);
        let deleted: i64 = self.bounded("release", key, invocation.invoke_async(&mut conn)).await?;
        Ok(deleted == 1)
    }

    /// Every Redis call goes through here, so none can wait longer than `op_timeout`.
    async fn bounded<T>(
        &self,
        op: &'static str,
        key: &str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, LockError> {
        let limit = self.inner.config.op_timeout;
        match timeout(limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(LockError::from_redis(op, key, e)),
            Err(_) => Err(LockError::NoReply { op, key: key.to_owned(), limit }),
        }
    }
}

/// The companion key holding the last fencing token of `key`.
///
/// A script may only touch keys of one hash slot on a Redis Cluster, so the counter must hash
/// like the lock. It carries, as its hash tag, a short string of the lock key's slot (braces in
/// the lock key itself then do not matter): `{tag}<key>:fence`.
pub fn fence_key(key: &str) -> String {
    format!("{{{}}}{key}:fence", slot_tag(key))
}

/// A short string that hashes to the same cluster slot as `key`: the first number (in hex)
/// that does, from a table of all 16,384 slots built once (about 10^5 hashes).
fn slot_tag(key: &str) -> &'static str {
    static TAGS: std::sync::OnceLock<HashMap<Slot, String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = HashMap::with_capacity(SLOTS);
        let mut n: u64 = 0;
        while tags.len() < SLOTS {
            let tag = format!("{n:x}");
            tags.entry(Slot::for_key(&tag)).or_insert(tag);
            n += 1;
        }
        tags
    });
    // Every slot is in the table (the loop above stops only when all are).
    tags.get(&Slot::for_key(key)).map_or("", String::as_str)
}

const SLOTS: usize = 16384;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Full-jitter exponential backoff: spreads contenders out so they do not retry in lockstep.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self { next: min, max }
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_counter_hashes_to_its_lock_slot_whatever_braces_the_key_holds() {
        for key in ["listing:42", "ns:{listing:42}", "a}b{c", "{}x", "x{", "}", "", "\u{e9}t\u{e9}:7"] {
            let fence = fence_key(key);
            assert_eq!(Slot::for_key(&fence), Slot::for_key(key), "{key:?} -> {fence:?}");
            assert!(fence.ends_with(&format!("{key}:fence")), "{fence:?} names its lock key");
        }
    }

    #[test]
    fn backoff_stays_within_its_ceiling() {
        let max = Duration::from_millis(40);
        let mut backoff = Backoff::new(Duration::from_millis(5), max);
        for _ in 0..20 {
            assert!(backoff.next_delay() <= max);
        }
        assert_eq!(backoff.next, max);
    }
}
