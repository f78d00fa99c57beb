//! `resync dlq`: argument shapes and printing around the `resync-dlq` library.

use std::time::Duration;

use anyhow::{Result, ensure};
use clap::{Args, Subcommand};
use resync_bus::{Stream, Transport, TransportConfig};
use resync_dlq::{DeadLetterRecord, Selection, SweepReport};

use crate::{Common, parse_stream};

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
    /// Counts per reason (invalid envelope, refused by the sink with its status, too many
    /// receives), with the oldest and newest. Reads every dead letter and puts it back.
    List(Target),
    /// The dead letters themselves: entity, version, reason, attempts, error detail, time.
    Show {
        #[command(flatten)]
        target: Target,
        /// Most dead letters printed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        selection: SelectionArgs,
    },
    /// Send dead letters back to the service's queue, e.g. once the third party is fixed.
    /// Consumers judge them afresh: versions superseded meanwhile are counted as stale, never
    /// re-sent. Invalid envelopes are only moved when asked for with `--reason invalid-envelope`.
    Redrive {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        selection: SelectionArgs,
        /// Most messages moved per second (default: as fast as the broker confirms).
        #[arg(long)]
        rate: Option<f64>,
        /// Print what would be moved, move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters dead-lettered longer ago than `--older-than` (their events are lost
    /// for good; `resync job start` can resend the entities).
    Purge {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        selection: SelectionArgs,
        /// e.g. 7d, 36h.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
pub(crate) struct Target {
    /// The service whose dead-letter queues to read, as named in its fare config.
    #[arg(long)]
    service: String,
    /// live or resync (default: both).
    #[arg(long, value_parser = parse_stream)]
    stream: Option<Stream>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct SelectionArgs {
    /// Only this reason, or reasons starting with it (`sink-rejected` takes every status).
    #[arg(long)]
    reason: Option<String>,
    /// Only events of this entity type.
    #[arg(long)]
    entity_type: Option<String>,
}

impl SelectionArgs {
    fn selection(&self) -> Selection {
        Selection { reason: self.reason.clone(), entity_type: self.entity_type.clone() }
    }
}

impl Target {
    /// The service's queues the command looks at.
    fn queues(&self, namespace: Option<&str>) -> Vec<String> {
        let streams = match self.stream {
            Some(stream) => vec![stream],
            None => vec![Stream::Live, Stream::Resync],
        };
        streams.into_iter().map(|s| resync_bus::naming::queue_name(namespace, &self.service, s)).collect()
    }
}

pub(crate) async fn run(common: &Common, command: DlqCommand) -> Result<()> {
    let transport = TransportConfig::named(&common.transport)?.connect().await?;
    let result = dispatch(common, transport.as_ref(), command).await;
    transport.close().await?;
    result
}

async fn dispatch(common: &Common, transport: &dyn Transport, command: DlqCommand) -> Result<()> {
    let namespace = common.namespace.as_deref();
    // With --json, one document for all queues: an array with an object per queue.
    let mut documents = Vec::new();
    let json = match &command {
        DlqCommand::List(target)
        | DlqCommand::Show { target, .. }
        | DlqCommand::Redrive { target, .. }
        | DlqCommand::Purge { target, .. } => target.json,
    };
    let mut out = Output { json, documents: &mut documents };
    match command {
        DlqCommand::List(target) => {
            for queue in existing(transport, target.queues(namespace)).await? {
                let report = resync_dlq::inspect(transport, &queue).await?;
                out.list(&queue, &report);
            }
        }
        DlqCommand::Show { target, limit, selection } => {
            let selection = selection.selection();
            for queue in existing(transport, target.queues(namespace)).await? {
                let report = resync_dlq::inspect(transport, &queue).await?;
                let records: Vec<_> =
                    report.records.iter().filter(|r| selection.matches(r)).take(limit).collect();
                out.records(&queue, &records);
            }
        }
        DlqCommand::Redrive { target, selection, rate, dry_run } => {
            let selection = selection.selection();
            for queue in existing(transport, target.queues(namespace)).await? {
                if dry_run {
                    let report = resync_dlq::inspect(transport, &queue).await?;
                    let records: Vec<_> = report.records.iter().filter(|r| selection.redrives(r)).collect();
                    if !json {
                        println!("dry run: {} dead letters of {queue} would be sent back", records.len());
                    }
                    out.records(&queue, &records);
                } else {
                    let report = resync_dlq::redrive(transport, &queue, &selection, rate).await?;
                    out.outcome(&queue, "sent back", report.moved, &report);
                }
            }
        }
        DlqCommand::Purge { target, selection, older_than, yes } => {
            ensure!(
                yes,
                "purge deletes dead letters for good; add --yes to do it (see `resync dlq list` first)"
            );
            for queue in existing(transport, target.queues(namespace)).await? {
                let report = resync_dlq::purge(transport, &queue, &selection.selection(), older_than).await?;
                out.outcome(&queue, "deleted", report.deleted, &report);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&documents)?);
    }
    Ok(())
}

/// The queues that exist (a service need not subscribe on both streams).
async fn existing(transport: &dyn Transport, queues: Vec<String>) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for queue in queues {
        match transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await {
            Ok(_) => found.push(queue),
            Err(resync_bus::TransportError::NotFound(_)) => {}
            Err(err) => return Err(err.into()),
        }
    }
    ensure!(
        !found.is_empty(),
        "no dead-letter queue found for these queues (check --service and --namespace)"
    );
    Ok(found)
}

/// Prints text at once, or collects one JSON object per queue.
struct Output<'a> {
    json: bool,
    documents: &'a mut Vec<serde_json::Value>,
}

impl Output<'_> {
    fn list(&mut self, queue: &str, report: &SweepReport) {
        let summaries = resync_dlq::summarize(&report.records);
        if self.json {
            self.documents.push(serde_json::json!({
                "queue": queue,
                "total": report.records.len(),
                "reasons": summaries,
                "truncated": report.truncated,
            }));
            return;
        }
        println!("{}: {} dead letters", resync_bus::dead_letter_queue_name(queue), report.records.len());
        for s in summaries {
            let time =
                |t: Option<chrono::DateTime<chrono::Utc>>| t.map_or("-".to_string(), |t| t.to_rfc3339());
            println!(
                "  {:>7}  {:<28} oldest {}  newest {}",
                s.count,
                s.reason,
                time(s.oldest),
                time(s.newest)
            );
        }
        if report.truncated {
            println!("  (more than {} dead letters: only those were read)", resync_dlq::MAX_SWEEP);
        }
    }

    fn records(&mut self, queue: &str, records: &[&DeadLetterRecord]) {
        if self.json {
            self.documents.push(serde_json::json!({"queue": queue, "dead_letters": records}));
            return;
        }
        for r in records {
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            println!(
                "{} {}/{} v{} {} attempts={} at={} redrives={}\n    {}",
                or_dash(r.event_type.clone()),
                or_dash(r.entity_type.clone()),
                or_dash(r.entity_id.clone()),
                or_dash(r.version.map(|v| v.to_string())),
                r.reason,
                or_dash(r.attempts.map(|a| a.to_string())),
                or_dash(r.dead_lettered_at.map(|t| t.to_rfc3339())),
                r.redrives,
                or_dash(r.detail.clone()),
            );
        }
    }

    fn outcome(&mut self, queue: &str, what: &str, count: u64, report: &SweepReport) {
        if self.json {
            let key = what.replace(' ', "_");
            self.documents.push(serde_json::json!({"queue": queue, key: count, "kept": report.kept}));
        } else {
            println!("{queue}: {count} dead letters {what}, {} kept", report.kept);
        }
    }
}
