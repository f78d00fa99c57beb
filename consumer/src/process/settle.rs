//! Settling a delivery once its event is done with: ack, nack for later, or dead-letter with
//! the reason (remembered per entity, so a job can resend what a sink refused).

use super::*;

impl Processor {
    /// Acknowledges, requeues or dead-letters a delivery according to how applying it went.
    pub(super) async fn settle(
        &self,
        delivery: Delivery,
        envelope: &Envelope,
        result: Result<Outcome, ApplyError>,
    ) -> Outcome {
        let outcome = self.settle_inner(delivery, envelope, result).await;
        self.count_for_job(envelope, outcome);
        outcome
    }

    async fn settle_inner(
        &self,
        delivery: Delivery,
        envelope: &Envelope,
        result: Result<Outcome, ApplyError>,
    ) -> Outcome {
        async {
            let lag = (chrono::Utc::now() - envelope.occurred_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("resync_consumer_lag_seconds", "stream" => envelope.stream.as_str()).set(lag);
            match result {
                Ok(outcome) => {
                    if let Err(err) = delivery.ack().await {
                        // Redelivered later and then found to be a duplicate: harmless.
                        warn!(error = %err, "ack failed after the event was applied");
                    }
                    debug!(outcome = outcome.label(), "done");
                    outcome
                }
                Err(ApplyError::Sink(SinkError::Rejected { status, body })) => {
                    let detail = format!("HTTP {status}: {body}");
                    warn!(status, "sink rejected the event; dead-lettering");
                    let dead = DeadLetter { reason: DeadLetterReason::SinkRejected { status }, detail };
                    self.remember_dead_letter(envelope, &dead).await;
                    self.dead_letter(delivery, dead).await
                }
                Err(ApplyError::Sink(SinkError::Held { reason, .. })) => {
                    self.requeue_held(delivery, &reason).await
                }
                Err(err) => self.retry_later(delivery, envelope, err).await,
            }
        }
        .instrument(event_span(envelope))
        .await
    }

    /// Records the entity as rejected by this sink; a failure only costs the record.
    pub(super) async fn remember_dead_letter(&self, envelope: &Envelope, dead: &DeadLetter) {
        let key = EntityKey {
            sink: self.sink.name(),
            entity_type: &envelope.entity_type,
            entity_id: &envelope.entity_id,
        };
        let reason = dead.reason.as_attribute();
        if let Err(err) = self.store.record_dead_letter(key, envelope.version, &reason, &dead.detail).await {
            warn!(error = %err, "could not record the dead-lettered entity; `--only-rejected` will miss it");
        }
    }

    pub(super) async fn retry_later(
        &self,
        delivery: Delivery,
        envelope: &Envelope,
        err: ApplyError,
    ) -> Outcome {
        let from_sink = matches!(err, ApplyError::Sink(_));
        if from_sink && delivery.receive_count >= self.retry.max_receive_count {
            warn!(error = %err, receives = delivery.receive_count, "giving up; dead-lettering");
            let dead = DeadLetter { reason: DeadLetterReason::MaxReceivesExceeded, detail: err.to_string() };
            self.remember_dead_letter(envelope, &dead).await;
            return self.dead_letter(delivery, dead).await;
        }
        // Later deliveries wait longer, so a struggling third party gets room.
        let delay = self.retry.min_backoff * 2u32.saturating_pow(delivery.receive_count.min(10));
        let delay = delay.min(self.retry.max_backoff);
        warn!(error = %err, receives = delivery.receive_count, retry_in = ?delay, "event not applied; returning it to the queue");
        if let Err(nack_err) = delivery.nack(delay).await {
            warn!(error = %nack_err, "nack failed; the broker redelivers the message anyway");
        }
        Outcome::Requeued
    }

    /// The event waited for a held sink (circuit open, quota spent) as long as it may and was
    /// never given a fair try: it goes back as a fresh copy, so someone else's outage spends
    /// none of the deliveries the queue allows. Should the copy fail, a plain return does
    /// (counted, as any retry).
    async fn requeue_held(&self, delivery: Delivery, reason: &str) -> Outcome {
        // Back in a moment: the queue loops take nothing new while the sink is held anyway.
        let delay = self.retry.min_backoff;
        warn!(reason, "sink held past max_hold; the event goes back to its queue as a fresh copy");
        if let Err(err) = delivery.requeue_fresh(delay).await {
            warn!(error = %err, "could not requeue a fresh copy; the broker redelivers the message");
        }
        metrics::counter!("resync_consumer_held_requeues_total").increment(1);
        Outcome::Requeued
    }

    pub(super) async fn dead_letter(&self, delivery: Delivery, dead: DeadLetter) -> Outcome {
        let reason = dead.reason.as_attribute();
        match delivery.dead_letter(&dead).await {
            Ok(()) => {
                metrics::counter!("resync_consumer_dead_lettered_total", "reason" => reason).increment(1);
                Outcome::DeadLettered
            }
            Err(err) => {
                // Not acked either: the broker redelivers it and we try again.
                warn!(error = %err, "could not dead-letter; the message will be redelivered");
                Outcome::Requeued
            }
        }
    }
}
