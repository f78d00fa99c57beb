//! A batch: entities grouped, locked together in one Redis round trip, their applied
//! versions read and intents recorded in one statement, the sink called for each entity at
//! once, every new version recorded in one compare-and-set; entities another consumer holds
//! are then handled one at a time (`run_alone`), so a consumer never waits for a lock while
//! holding others.

use super::*;

impl Processor {
    pub(super) fn lock_key(&self, entity: &EntityId) -> String {
        crate::records::entity_lock_key(
            &self.lock_prefix,
            self.sink.name(),
            &entity.entity_type,
            &entity.entity_id,
        )
    }

    /// Locks every free entity of the batch in one round trip; returns the locked groups with
    /// their guards, and the others.
    pub(super) async fn try_lock_all(
        &self,
        groups: Vec<EntityGroup>,
    ) -> (Vec<(EntityGroup, LockGuard)>, Vec<EntityGroup>) {
        let keys: Vec<String> = groups.iter().map(|g| self.lock_key(&g.entity)).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let guards = match self.locker.try_acquire_many(&key_refs).await {
            Ok(guards) => guards,
            Err(err) => {
                warn!(error = %err, "batch lock failed; locking per entity");
                return (Vec::new(), groups);
            }
        };
        let (mut locked, mut busy) = (Vec::new(), Vec::new());
        for (group, guard) in groups.into_iter().zip(guards) {
            match guard {
                Some(guard) => locked.push((group, guard)),
                None => busy.push(group),
            }
        }
        (locked, busy)
    }

    /// The batch pipeline over locked entities: one read, concurrent sink calls, one
    /// compare-and-set, then settling and one release.
    pub(super) async fn run_locked(&self, locked: Vec<(EntityGroup, LockGuard)>) -> Vec<Outcome> {
        if locked.is_empty() {
            return Vec::new();
        }
        let mut phases = PhaseClock::start();
        // One statement reads what is applied and records the intent of the calls about to
        // start (see `sink_intents`).
        let newest: Vec<(&EntityId, i64)> = locked
            .iter()
            .filter_map(|(g, _)| g.events.first().map(|(_, e)| (&g.entity, e.version)))
            .collect();
        let mut current = match self.store.read_and_mark(self.sink.name(), &newest).await {
            Ok(current) => Some(current),
            Err(err) => {
                warn!(error = %err, "batch read of applied versions failed; applying per event");
                None
            }
        };
        phases.mark("read");
        // First round of each entity's newest event: decide, then call the sink, concurrently.
        let decided: Vec<Option<Decided>> = locked
            .iter()
            .map(|(group, _)| {
                let prefetched = current.as_mut().and_then(|c| c.remove(&group.entity));
                decide_first(group, prefetched)
            })
            .collect();
        let firsts = join_all(locked.iter().zip(decided).map(|((group, guard), decided)| async move {
            match decided {
                Some(d) => {
                    let key = group.key(self.sink.name());
                    let span =
                        group.events.first().map(|(_, e)| event_span(e)).unwrap_or_else(tracing::Span::none);
                    let step = self.execute(key, &d.mine, d.decision, guard).instrument(span).await;
                    FirstRound::Prepared { mine: d.mine, expected: d.expected, step }
                }
                _ => FirstRound::Unstarted,
            }
        }))
        .await;
        phases.mark("sink");
        let cas = self.record_batch(&locked, &firsts).await;
        phases.mark("record");
        let finished = join_all(
            locked
                .iter()
                .zip(firsts)
                .zip(cas)
                .map(|(((group, guard), first), cas)| self.finish_group(group, guard, first, cas)),
        )
        .await;
        phases.mark("finish");
        let (groups, guards): (Vec<EntityGroup>, Vec<LockGuard>) = locked.into_iter().unzip();
        let entities = guards.len();
        // Every version is recorded: the locks are released before the deliveries are settled,
        // so other consumers never wait for our broker round trips (an ack on a slow SQS took
        // seconds, and a consumer gives up on a busy lock after `acquire_timeout`). A lock that
        // cannot be released lapses with its lease; a lost lock was already handled by the
        // compare-and-set.
        if let Err(err) = self.locker.release_many(guards).await {
            debug!(error = %err, "releasing entity locks failed; they expire with their lease");
        }
        phases.mark("release");
        phases.report(entities);
        let settling = groups
            .into_iter()
            .zip(finished)
            .flat_map(|(group, results)| group.events.into_iter().zip(results));
        join_all(settling.map(|((delivery, envelope), result)| async move {
            self.settle(delivery, &envelope, result).await
        }))
        .await
    }

    /// An entity another consumer held: wait for its lock (holding no other), then apply its
    /// events one by one.
    pub(super) async fn run_alone(&self, group: EntityGroup) -> Vec<Outcome> {
        let waited = Instant::now();
        let lock = self.acquire_through_outage(&self.lock_key(&group.entity)).await;
        metrics::histogram!("resync_consumer_lock_wait_seconds").record(waited.elapsed().as_secs_f64());
        let results = match &lock {
            Ok(guard) => self.finish_group(&group, guard, FirstRound::Unstarted, None).await,
            Err(err) => group
                .events
                .iter()
                .map(|_| Err(ApplyError::Infrastructure(format!("entity lock: {err}"))))
                .collect(),
        };
        // Released before settling, as in `run_locked`.
        if let Ok(guard) = lock {
            let _ = guard.release().await;
        }
        let mut outcomes = Vec::with_capacity(results.len());
        for ((delivery, envelope), result) in group.events.into_iter().zip(results) {
            outcomes.push(self.settle(delivery, &envelope, result).await);
        }
        outcomes
    }

    /// One compare-and-set statement for every first round that needs one.
    pub(super) async fn record_batch(
        &self,
        locked: &[(EntityGroup, LockGuard)],
        firsts: &[FirstRound],
    ) -> Vec<Option<Cas>> {
        let requests: Vec<(usize, CasRequest<'_>)> = locked
            .iter()
            .zip(firsts)
            .enumerate()
            .filter_map(|(i, ((group, _), first))| match first {
                FirstRound::Prepared { mine, expected, step: Ok(Step::Record(_)) } => {
                    Some((i, CasRequest { entity: &group.entity, expected: *expected, new: mine }))
                }
                _ => None,
            })
            .collect();
        let mut results = vec![None; locked.len()];
        let batch: Vec<CasRequest<'_>> = requests.iter().map(|(_, r)| r.clone()).collect();
        match self.store.compare_and_set_many(self.sink.name(), &batch).await {
            Ok(recorded) => {
                for ((i, _), recorded) in requests.iter().zip(recorded) {
                    // A conflict's current state is read by the group itself (rare).
                    results[*i] = Some(if recorded { Cas::Recorded } else { Cas::ConflictUnread });
                }
            }
            // Each group then records on its own (and reports the error if it persists).
            Err(err) => warn!(error = %err, "batch compare-and-set failed; recording per event"),
        }
        results
    }

    /// Applies a locked entity's events, newest first: concludes the newest one's first round
    /// (if the batch started it), runs any further rounds, then the older events. Returns one
    /// result per event, in order.
    pub(super) async fn finish_group(
        &self,
        group: &EntityGroup,
        guard: &LockGuard,
        first: FirstRound,
        cas: Option<Cas>,
    ) -> Vec<Result<Outcome, ApplyError>> {
        let key = group.key(self.sink.name());
        let mut results = Vec::with_capacity(group.events.len());
        let mut first = Some((first, cas));
        for (delivery, envelope) in &group.events {
            let result = async {
                match first.take() {
                    Some((FirstRound::Prepared { mine, expected, step }, cas)) => {
                        self.continue_first(key, &mine, expected, step, cas, guard).await
                    }
                    _ => self.apply_locked(key, &applied_state(delivery, envelope), guard).await,
                }
            }
            .instrument(event_span(envelope))
            .await;
            if let Err(ApplyError::Sink(SinkError::Rejected { .. })) = &result {
                // Nothing landed: older events of the entity may be applied again. Cleared
                // under the lock, so no other consumer's intent for this version is in flight.
                if let Err(err) = self.store.clear_intent(key, envelope.version).await {
                    warn!(error = %err, "could not clear the sink intent; older events stay stale");
                }
            }
            results.push(result);
        }
        results
    }

    pub(super) async fn continue_first(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        expected: Option<i64>,
        step: Result<Step, ApplyError>,
        cas: Option<Cas>,
        guard: &LockGuard,
    ) -> Result<Outcome, ApplyError> {
        let decision = match step? {
            Step::Done(outcome) => return Ok(outcome),
            Step::Record(decision) => decision,
        };
        let cas = match cas {
            Some(Cas::ConflictUnread) => Cas::Conflict(
                self.store.get(key).await.map_err(|e| infra("reading the applied version")(e.to_string()))?,
            ),
            Some(cas) => cas,
            None => self.record(key, expected, mine).await?,
        };
        match self.conclude(key, mine, decision, cas, guard).await? {
            Some(outcome) => Ok(outcome),
            None => self.apply_locked(key, mine, guard).await,
        }
    }
}
