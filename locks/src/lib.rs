//! `resync-locks`: distributed locks on Redis, with lease renewal and fencing tokens.
//!
//! Owns: taking a lock on a key (waiting with jittered backoff, or a single try), keeping it
//! alive in the background while work runs, releasing it so that only its owner can
//! delete or extend it (compare-and-delete / compare-and-extend on a random owner token, in
//! Lua), telling the holder when the lock is lost, and a fencing token per acquisition that
//! is strictly greater than every earlier one for the same key. Every Redis call is bounded by
//! [`LockConfig::op_timeout`]; Redis being away gives a typed error, never a hang.
//!
//! Does not own: correctness of the data written under a lock. A lock can be lost mid-work
//! (a pause, a partition), so writers must also check the fencing token or a version (as the
//! consumer does with per-entity versions, see DESIGN.md). Not here either: Redlock across
//! several masters (one Redis, a primary with failover, or a Redis Cluster, where each key
//! lives on one primary, is assumed), and metrics (this crate logs through `tracing`, with the
//! key and fencing token on each event).
//!
//! ```no_run
//! use resync_locks::{LockConfig, Locker};
//!
//! # async fn demo() -> Result<(), resync_locks::LockError> {
//! let locker = Locker::connect("rediss://:password@cache.internal:6380", LockConfig::default()).await?;
//! let guard = locker.acquire("lock:listing:42").await?;
//! let result = tokio::select! {
//!     result = async { /* call the third-party API with guard.fence() */ 42 } => result,
//!     reason = guard.lost() => {
//!         tracing::warn!(?reason, "lock lost; abandoning the work");
//!         return Ok(());
//!     }
//! };
//! guard.ensure_held()?; // still ours: commit `result` together with guard.fence()
//! # let _ = result;
//! guard.release().await?;
//! # Ok(()) }
//! ```

mod config;
mod error;
mod guard;
mod locker;
pub mod redis_conn;
mod scripts;

pub use config::LockConfig;
pub use error::{LockError, LostReason};
pub use guard::{LockGuard, LostSignal, Release};
pub use locker::{Locker, fence_key};
