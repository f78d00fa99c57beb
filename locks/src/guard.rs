//! [`LockGuard`]: a held lock, renewed in the background, that tells its holder when it is lost.
//!
//! The lease state lives in a `watch` channel so that any number of [`LostSignal`]s can
//! check it without a lock or await a change, while the renewal task is its only writer
//! (besides release). "Lost" is judged from local time too: once the lease deadline passes
//! without a successful renewal the guard reports [`LostReason::Expired`] even if the
//! renewal task itself is stalled, because Redis may already have given the key to another.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, info_span, warn};

use crate::locker::{Acquired, Locker};
use crate::{LockConfig, LockError, LostReason};

/// What a guard knows about its lease.
#[derive(Debug, Clone, Copy)]
struct LeaseState {
    /// The earliest moment Redis may expire the key (local clock, measured before the
    /// request that set the expiry was sent).
    valid_until: Instant,
    /// Set once, never cleared: a lost lock stays lost.
    lost: Option<LostReason>,
}

impl LeaseState {
    fn lost_at(&self, now: Instant) -> Option<LostReason> {
        self.lost.or((now >= self.valid_until).then_some(LostReason::Expired))
    }
}

/// Outcome of [`LockGuard::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// This call deleted the lock.
    Released,
    /// The lock was not ours any more (already released, expired, or taken over); nothing
    /// was deleted.
    NotHeld,
}

/// A held lock. Renews its lease in the background until released or dropped; dropping
/// releases it in the background.
///
/// Before committing work done under the lock, check [`LockGuard::is_lost`] (or
/// [`LockGuard::ensure_held`]), or race the work against [`LockGuard::lost`]; and pass
/// [`LockGuard::fence`] to the system being written so it can reject stale holders.
#[derive(Debug)]
pub struct LockGuard {
    locker: Locker,
    key: String,
    token: String,
    fence: u64,
    state: watch::Sender<LeaseState>,
    renewal: AbortHandle,
}

impl LockGuard {
    pub(crate) fn start(locker: Locker, key: &str, acquired: Acquired) -> Self {
        let Acquired { token, fence, valid_until } = acquired;
        let (state, _) = watch::channel(LeaseState { valid_until, lost: None });
        let renewal = Renewal {
            locker: locker.clone(),
            key: key.to_owned(),
            token: token.clone(),
            state: state.clone(),
        };
        let span = info_span!("lock_renewal", key, fence);
        let renewal = tokio::spawn(renewal.run().instrument(span)).abort_handle();
        Self { locker, key: key.to_owned(), token, fence, state, renewal }
    }

    /// The locked key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token of this acquisition: greater than that of every earlier
    /// acquisition of the same key. Store it with the work's result and refuse results
    /// carrying a smaller one.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The random owner token stored in the lock key while this guard holds it.
    pub fn owner_token(&self) -> &str {
        &self.token
    }

    /// True once the lock may no longer be ours; never goes back to false.
    pub fn is_lost(&self) -> bool {
        self.state.borrow().lost_at(Instant::now()).is_some()
    }

    /// How much of the lease is surely left (by the local clock, measured from before the
    /// request that set it); `None` once the lock may no longer be ours.
    pub fn remaining(&self) -> Option<Duration> {
        let state = *self.state.borrow();
        let now = Instant::now();
        state.lost_at(now).is_none().then(|| state.valid_until - now)
    }

    /// `Err(LockError::Lost)` if the lock may no longer be ours: call before committing.
    pub fn ensure_held(&self) -> Result<(), LockError> {
        match self.state.borrow().lost_at(Instant::now()) {
            None => Ok(()),
            Some(reason) => Err(LockError::Lost { key: self.key.clone(), reason }),
        }
    }

    /// Completes when the lock is lost (at once if it already is), with the reason.
    pub async fn lost(&self) -> LostReason {
        self.lost_signal().lost().await
    }

    /// A handle on the lock's state that can be moved into the tasks doing the work.
    pub fn lost_signal(&self) -> LostSignal {
        LostSignal { state: self.state.subscribe() }
    }

    /// Extends the lease now (compare-and-extend on the owner token), e.g. before a step
    /// known to be long. The background renewal keeps running as well.
    ///
    /// `Err(Lost)` if the lock is lost or was taken over; `Unavailable`/`NoReply` if Redis
    /// did not answer, in which case the lease is unchanged.
    pub async fn renew(&self) -> Result<(), LockError> {
        self.ensure_held()?;
        renew_once(&self.locker, &self.key, &self.token, &self.state).await
    }

    /// Stops renewal and deletes the lock if it is still ours (compare-and-delete).
    /// Idempotent: a second call, or a call after the lock was lost, returns
    /// `Ok(Release::NotHeld)` and touches nothing. If Redis cannot be reached the error is
    /// returned and the lock lapses at the end of its lease (renewal has stopped either way).
    pub async fn release(&self) -> Result<Release, LockError> {
        self.renewal.abort();
        mark_lost(&self.state, LostReason::Released);
        let deleted = self.locker.release_token(&self.key, &self.token).await?;
        debug!(key = %self.key, fence = self.fence, deleted, "lock released");
        Ok(if deleted { Release::Released } else { Release::NotHeld })
    }

    /// Stops renewal and marks the guard released without talking to Redis, returning the
    /// key and owner token to delete (`None` if it was already released). For batch release.
    pub(crate) fn into_release(mut self) -> Option<(String, String)> {
        self.renewal.abort();
        let already_released = self.state.borrow().lost == Some(LostReason::Released);
        mark_lost(&self.state, LostReason::Released);
        // Drop now finds the guard released and does nothing.
        (!already_released).then(|| (std::mem::take(&mut self.key), std::mem::take(&mut self.token)))
    }

    /// Fault injection for tests: stops background renewal as if this process had stalled,
    /// so the lease runs out while the guard is still held.
    #[doc(hidden)]
    pub fn simulate_stall(&self) {
        self.renewal.abort();
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewal.abort();
        let already_released = self.state.borrow().lost == Some(LostReason::Released);
        mark_lost(&self.state, LostReason::Released);
        // An empty token: handed to a batch release already (`into_release`).
        if already_released || self.token.is_empty() {
            return;
        }
        // Dropping outside a runtime (e.g. at shutdown) cannot talk to Redis; the lease
        // then expires on its own.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            debug!(key = %self.key, "guard dropped outside a runtime; lock left to expire");
            return;
        };
        let (locker, key, token) =
            (self.locker.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        runtime.spawn(async move {
            if let Err(e) = locker.release_token(&key, &token).await {
                debug!(key, error = %e, "release on drop failed; lock left to expire");
            }
        });
    }
}

/// A cloneable view of whether a lock is still held, for tasks that do not own the guard.
#[derive(Debug, Clone)]
pub struct LostSignal {
    state: watch::Receiver<LeaseState>,
}

impl LostSignal {
    /// True once the lock may no longer be held.
    pub fn is_lost(&self) -> bool {
        self.state.borrow().lost_at(Instant::now()).is_some()
    }

    /// Completes when the lock is lost, with the reason.
    pub async fn lost(&self) -> LostReason {
        let mut state = self.state.clone();
        loop {
            let current = *state.borrow_and_update();
            if let Some(reason) = current.lost_at(Instant::now()) {
                return reason;
            }
            tokio::select! {
                changed = state.changed() => {
                    // The guard and its renewal task are both gone: the lock was released.
                    if changed.is_err() {
                        return LostReason::Released;
                    }
                }
                () = sleep_until(current.valid_until) => {}
            }
        }
    }
}

/// Records a loss; the first reason wins.
fn mark_lost(state: &watch::Sender<LeaseState>, reason: LostReason) {
    state.send_if_modified(|s| {
        if s.lost.is_some() {
            return false;
        }
        s.lost = Some(reason);
        true
    });
}

/// One compare-and-extend, and what it means for the lease.
async fn renew_once(
    locker: &Locker,
    key: &str,
    token: &str,
    state: &watch::Sender<LeaseState>,
) -> Result<(), LockError> {
    let sent_at = Instant::now();
    if !locker.renew_token(key, token).await? {
        mark_lost(state, LostReason::TakenOver);
        warn!(key, "lock taken over: renewal found another owner or no key");
        return Err(LockError::Lost { key: key.to_owned(), reason: LostReason::TakenOver });
    }
    let extended = sent_at + locker.config().lease;
    let mut outcome = Ok(());
    state.send_if_modified(|s| {
        // A renewal that lands after the deadline cannot undo "lost": a holder may already
        // have acted on it.
        if let Some(reason) = s.lost_at(Instant::now()) {
            s.lost = Some(reason);
            outcome = Err(LockError::Lost { key: key.to_owned(), reason });
            return true;
        }
        s.valid_until = s.valid_until.max(extended);
        true
    });
    outcome
}

/// The background task that keeps a lease alive.
struct Renewal {
    locker: Locker,
    key: String,
    token: String,
    state: watch::Sender<LeaseState>,
}

impl Renewal {
    async fn run(self) {
        let config = self.locker.config().clone();
        let mut next = Instant::now() + config.renew_every;
        loop {
            sleep_until(next).await;
            let started = Instant::now();
            match renew_once(&self.locker, &self.key, &self.token, &self.state).await {
                Ok(()) => next = started + config.renew_every,
                Err(LockError::Lost { reason, .. }) => {
                    debug!(?reason, "renewal stopped: lock lost");
                    return;
                }
                Err(e) => {
                    let deadline = self.state.borrow().valid_until;
                    if Instant::now() >= deadline {
                        mark_lost(&self.state, LostReason::Expired);
                        warn!(error = %e, "lock expired: no renewal succeeded within the lease");
                        return;
                    }
                    // Redis may be reconnecting; try again soon while the lease still lasts.
                    warn!(error = %e, "lock renewal failed; retrying while the lease lasts");
                    next = Instant::now() + retry_delay(&config);
                }
            }
        }
    }
}

/// Retry a failed renewal a few times per renewal period (never more often than
/// `retry_min`), so a Redis that is back within the lease keeps the lock.
fn retry_delay(config: &LockConfig) -> Duration {
    (config.renew_every / 4).max(config.retry_min).min(config.renew_every)
}
