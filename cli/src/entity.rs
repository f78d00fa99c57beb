//! `resync entity`: argument shapes and printing around `resync_snapshotter::inspect_entity`.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use resync_migrations::Schema;
use resync_snapshotter::entity::{EntityReport, SinkView};
use resync_snapshotter::{Inspect, inspect_entity};

use crate::{Common, connect_db};

#[derive(Subcommand)]
pub(crate) enum EntityCommand {
    /// Everything resync knows of one entity, for "why didn't it sync?": its source row and
    /// version, its newest events in the log (published, pending or parked), and per sink the
    /// version applied (and whether its content equals the source row's), a call in flight, a
    /// dead letter with its reason, the lock holder, the job in progress that sent it, and a
    /// one-line verdict (in sync, behind, dead-lettered, deleted, never applied, in flight).
    Show {
        /// The entity type, e.g. `listing`.
        entity_type: String,
        /// The entity's id as resync carries it (as text: `42`, a UUID, ...).
        entity_id: String,
        /// Only these sinks (default: every service with a sink that subscribes to the type).
        #[arg(long)]
        sink: Vec<String>,
        /// The directory of service config files (the same one `fare` reads): where the type's
        /// source table and its subscribers are declared.
        #[arg(long, env = "RESYNC_CONFIG_DIR", default_value = "services")]
        config_dir: std::path::PathBuf,
        /// Redis of the consumers' locks (one URL, or a cluster's seeds); when it cannot be
        /// reached the report says so and leaves the lock holders out.
        #[arg(
            long,
            env = "RESYNC_REDIS_URL",
            default_value = "redis://127.0.0.1:6379",
            hide_env_values = true
        )]
        redis_url: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(common: &Common, schema: &Schema, command: EntityCommand) -> Result<()> {
    let EntityCommand::Show { entity_type, entity_id, sink, config_dir, redis_url, json } = command;
    let pool = connect_db(common).await?;
    let catalog = fare_config::load_dir(&config_dir)?;
    let source = catalog.services.iter().flat_map(|s| s.sources.iter()).find(|s| s.entity == entity_type);
    let sinks = if sink.is_empty() {
        crate::job::sinks_in(&catalog, &entity_type).into_iter().map(|s| s.sink_name()).collect()
    } else {
        sink
    };
    let mut redis = match resync_locks::redis_conn::connect(&redis_url, Duration::from_secs(3)).await {
        Ok(redis) => Some(redis),
        Err(reason) => {
            eprintln!(
                "lock holders left out: cannot reach Redis at {}: {reason}",
                resync_redact::redact_password(&redis_url)
            );
            None
        }
    };
    let inspect = Inspect {
        pool: &pool,
        schema,
        source,
        sinks: &sinks,
        locks: redis.as_mut().map(|redis| (redis, common.namespace.as_deref())),
    };
    let report = inspect_entity(inspect, &entity_type, &entity_id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, source.is_some());
    }
    Ok(())
}

fn print_report(report: &EntityReport, source_mapped: bool) {
    println!("{} {}", report.entity_type, report.entity_id);
    match (&report.source, source_mapped) {
        (Some(row), _) => {
            let version = row.version.map_or("no version".to_string(), |v| format!("v{v}"));
            let deleted = if row.deleted { ", deleted" } else { "" };
            println!("  source: {version}{deleted} {}", row.data);
        }
        (None, true) => println!("  source: no row (or outside the source's filter)"),
        (None, false) => println!("  source: no service maps a source table for `{}`", report.entity_type),
    }
    let counter = report.counter_version.map_or("never emitted".to_string(), |v| format!("v{v}"));
    println!("  resync.emit counter: {counter}");
    if report.events.is_empty() {
        println!("  events in the log: none");
    } else {
        println!("  events in the log, newest first:");
        for event in &report.events {
            println!(
                "    seq {:<8} v{:<4} {:<24} {:<9} {}",
                event.seq,
                event.version,
                event.event_type,
                event.state,
                event.occurred_at.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
    }
    if report.sinks.is_empty() {
        println!("  no service with a sink subscribes to `{}` (name one with --sink)", report.entity_type);
    }
    for sink in &report.sinks {
        print_sink(sink);
    }
}

fn print_sink(sink: &SinkView) {
    let at = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    println!("  sink {}: {}", sink.sink, sink.verdict);
    if let Some(applied) = &sink.applied {
        let deleted = if applied.deleted { " (a delete)" } else { "" };
        let content = match sink.content_equals_source {
            Some(true) => "; content equals the source row",
            Some(false) => "; content differs from the source row",
            None => "",
        };
        println!("    applied v{}{deleted} at {}{content}", applied.version, at(&applied.at));
    }
    if let Some(intent) = &sink.intent {
        println!("    call started for v{} at {}", intent.version, at(&intent.started_at));
    }
    if let Some(dead) = &sink.dead_letter {
        println!("    dead letter v{} at {}: {} {}", dead.version, at(&dead.at), dead.reason, dead.detail);
    }
    if let Some(lock) = &sink.lock {
        println!("    locked by {} ({} ms of lease left)", lock.owner_token, lock.lease_left_ms);
    }
    if let Some(job) = &sink.last_job {
        println!("    last job {} ({}) sent v{} at {}", job.id, job.status, job.version, at(&job.created_at));
    }
}
