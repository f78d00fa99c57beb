//! One entity's round under its lock: the version rule, the sink call with retries (each only
//! with lease left), the compare-and-set of the new version, and the repair after a lost lock.

use super::*;

impl Processor {
    /// Read-decide-write rounds for one event under its entity's lock, until the version rule
    /// settles it.
    pub(super) async fn apply_locked(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        guard: &LockGuard,
    ) -> Result<Outcome, ApplyError> {
        for _ in 0..MAX_ROUNDS {
            let current = self
                .store
                .current(key)
                .await
                .map_err(|e| infra("reading the applied version")(e.to_string()))?;
            let expected = current.applied.as_ref().map(|c| c.version);
            let decision = rule(mine, &current);
            if decision == Decision::Apply {
                let entity =
                    EntityId { entity_type: key.entity_type.into(), entity_id: key.entity_id.into() };
                self.store
                    .record_intents(key.sink, &[(&entity, mine.version)])
                    .await
                    .map_err(|e| infra("recording the sink intent")(e.to_string()))?;
            }
            match self.execute(key, mine, decision, guard).await? {
                Step::Done(outcome) => return Ok(outcome),
                Step::Record(decision) => {
                    let cas = self.record(key, expected, mine).await?;
                    if let Some(outcome) = self.conclude(key, mine, decision, cas, guard).await? {
                        return Ok(outcome);
                    }
                }
            }
        }
        Err(ApplyError::Infrastructure(format!("entity still contended after {MAX_ROUNDS} rounds")))
    }

    /// The first half of a round, once decided (and for `Apply`, once the intent is recorded):
    /// the sink call if the rule says so.
    pub(super) async fn execute(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        decision: Decision,
        guard: &LockGuard,
    ) -> Result<Step, ApplyError> {
        match decision {
            Decision::Stale => Ok(Step::Done(Outcome::Stale)),
            Decision::Duplicate => Ok(Step::Done(Outcome::Duplicate)),
            Decision::SkipUnchanged => Ok(Step::Record(Decision::SkipUnchanged)),
            Decision::Apply => {
                self.send(key, mine, Some(guard)).await?;
                Ok(Step::Record(Decision::Apply))
            }
        }
    }

    /// The second half of a round: what the compare-and-set result means. `None`: go round
    /// again.
    pub(super) async fn conclude(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        decision: Decision,
        cas: Cas,
        guard: &LockGuard,
    ) -> Result<Option<Outcome>, ApplyError> {
        let applied = decision == Decision::Apply;
        match cas {
            Cas::Recorded if applied => Ok(Some(Outcome::Applied)),
            Cas::Recorded => Ok(Some(Outcome::SkippedUnchanged)),
            Cas::Conflict(Some(newer)) if applied && newer.version > mine.version => {
                // Our lock was lost mid-call and a newer version was applied meanwhile; our
                // write may have landed after it. Re-send the newest.
                warn!(
                    newer = newer.version,
                    "a newer version was applied during our call; re-sending the newest"
                );
                self.repair(key, guard).await?;
                Ok(Some(Outcome::Repaired))
            }
            Cas::Conflict(Some(same)) if applied && same.version == mine.version => {
                Ok(Some(Outcome::Applied))
            }
            // An older version was recorded after we read: its write may have landed after
            // ours. Go round again; the rule re-applies ours. (Unread conflicts are read by
            // `continue_first` before they get here; going round reads anyway.)
            Cas::Conflict(_) | Cas::ConflictUnread => Ok(None),
        }
    }

    /// Re-sends the newest recorded version after our write may have landed late. Done under
    /// the entity's lock (taken again if ours was lost), so no other consumer's write is in
    /// flight meanwhile and the newest is what the third party keeps. If the lock stays busy,
    /// re-sends anyway: a late write that survives is worse than a redundant one.
    pub(super) async fn repair(&self, key: EntityKey<'_>, guard: &LockGuard) -> Result<(), ApplyError> {
        let retaken = if guard.is_lost() {
            let wait = self.locker.config().lease * 2;
            match self.locker.acquire_within(guard.key(), wait).await {
                Ok(retaken) => Some(retaken),
                Err(err) => {
                    warn!(error = %err, "entity lock still busy; repairing without it");
                    None
                }
            }
        } else {
            None
        };
        let current =
            self.store.current(key).await.map_err(|e| infra("reading the applied version")(e.to_string()));
        // Under the retaken lock, or ours if it still holds; without either, re-sent anyway.
        let lock = retaken.as_ref().or(Some(guard).filter(|g| !g.is_lost()));
        let result = match current {
            Ok(Current { applied: Some(newest), .. }) => self.send(key, &newest, lock).await,
            Ok(_) => Ok(()),
            Err(err) => Err(err),
        };
        if let Some(retaken) = retaken {
            // Expires with its lease if this fails.
            let _ = retaken.release().await;
        }
        result
    }

    pub(super) async fn record(
        &self,
        key: EntityKey<'_>,
        expected: Option<i64>,
        mine: &AppliedState,
    ) -> Result<Cas, ApplyError> {
        self.store
            .compare_and_set(key, expected, mine)
            .await
            .map_err(|e| infra("recording the applied version")(e.to_string()))
    }

    /// Before a sink call under `lock`: the lock must still be ours with enough lease left for
    /// the whole call (renewed now if it is short), or the call is not made and the event goes
    /// back to the queue. A consumer that lost its lock (frozen, partitioned from Redis) while
    /// an earlier attempt failed must not re-send an older version over what the new holder
    /// applied meanwhile.
    ///
    /// `confirm` asks Redis even when the local lease looks long enough (before a retry: Redis
    /// may have lost the key, or given it to another, without this process noticing yet).
    pub(super) async fn ensure_lease(&self, lock: &LockGuard, confirm: bool) -> Result<(), ApplyError> {
        let needed = self.sink.call_timeout().unwrap_or_default() + LEASE_MARGIN;
        if !confirm && lock.remaining().is_some_and(|left| left >= needed) {
            return Ok(());
        }
        lock.renew().await.map_err(|e| infra("entity lock")(e.to_string()))?;
        match lock.remaining() {
            Some(left) if left >= needed => Ok(()),
            left => Err(ApplyError::Infrastructure(format!(
                "entity lock {}: {left:?} of lease left, a call needs {needed:?}",
                lock.key()
            ))),
        }
    }

    /// Calls the sink, retrying transient failures with exponential backoff and jitter, and
    /// waiting at least as long as the third party's `Retry-After`. Every attempt is made only
    /// while `lock` (if any) holds for the whole call, and only while the sink's circuit and
    /// quota let it through (failures while it is open, and calls a spent quota refuses, spend
    /// no attempt).
    pub(super) async fn send(
        &self,
        key: EntityKey<'_>,
        state: &AppliedState,
        lock: Option<&LockGuard>,
    ) -> Result<(), ApplyError> {
        let write = SinkWrite {
            entity_type: key.entity_type,
            entity_id: key.entity_id,
            version: state.version,
            event_id: state.event_id,
            deleted: state.deleted,
            data: &state.data,
            origin: state.origin,
        };
        let mut delays = resync_bus::backoff(self.retry.min_backoff, self.retry.max_backoff);
        let mut attempt = 1;
        let mut holding_since = None;
        loop {
            let probe = self.pass_circuit(&mut holding_since).await?;
            if let Some(lock) = lock {
                self.ensure_lease(lock, attempt > 1).await?;
            }
            let started = Instant::now();
            let result = self.sink.apply(&write).await;
            metrics::histogram!("resync_consumer_sink_latency_seconds")
                .record(started.elapsed().as_secs_f64());
            let outage = self.report_to_circuit(&result, probe).await;
            match result {
                Ok(()) => return Ok(()),
                Err(SinkError::Held { reason, resumes_in }) => {
                    self.hold_for_quota(&mut holding_since, reason, resumes_in).await?;
                }
                Err(err) if err.is_transient() && outage => {
                    debug!(error = %err, "sink call failed while its circuit is open; waiting for it");
                }
                Err(err) if err.is_transient() && attempt < self.retry.max_attempts => {
                    let backoff = delays.next().unwrap_or(self.retry.max_backoff);
                    let delay = err.retry_after().map_or(backoff, |hint| hint.max(backoff));
                    metrics::counter!("resync_consumer_retries_total").increment(1);
                    self.tally.record_retry();
                    debug!(attempt, error = %err, retry_in = ?delay, "sink call failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}
