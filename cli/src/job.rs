//! `resync job`: argument shapes and printing around the `resync-snapshotter` library.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use resync_bus::{Stream, TransportConfig};
use resync_migrations::Schema;
use resync_snapshotter::{Job, JobOptions, JobStatus, Milestone};
use uuid::Uuid;

use crate::{Common, connect_db};

#[derive(Subcommand)]
pub(crate) enum JobCommand {
    /// Resend every entity of a type from its source table (as the publishing service's config
    /// maps it) on the resync stream, then run the job in this process until every row is
    /// published. Killed or stopped, it continues from its last checkpoint with `resume`.
    Start(StartArgs),
    /// Continue a paused or interrupted job from its last checkpoint, in this process.
    Resume {
        id: Uuid,
        #[command(flatten)]
        source: SourceDb,
    },
    /// Stop a running job after its current chunk (a runner stops; `resume` continues).
    Pause { id: Uuid },
    /// Stop a job for good.
    Cancel { id: Uuid },
    /// A job's progress: published / total, applied, rate, ETA. On a terminal, with `--watch`,
    /// one line redrawn in place every second (fits 80 columns) while the job is running or
    /// waiting for its sinks, then the final status.
    Status {
        id: Uuid,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        watch: bool,
    },
    /// Compare the job's source rows, as they are now, with the versions each sink applied,
    /// and list the entities that differ. Exits with status 1 if any does.
    Verify {
        id: Uuid,
        /// The sinks to check (default: every service with a sink that subscribes to the
        /// job's entity type).
        #[arg(long)]
        sink: Vec<String>,
        /// The directory of service config files (the same one `fare` reads).
        #[arg(long, env = "RESYNC_CONFIG_DIR", default_value = "services")]
        config_dir: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A job's report: rows, published, applied, deleted, when it started and finished, how
    /// long it took and its mean rate, its error if it failed, and per sink what the consumers
    /// did with its events (applied, skipped_unchanged, stale, duplicate, dead_lettered, ...).
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// The newest jobs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

/// How a job runs beside live traffic.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum JobMode {
    /// Live events keep being applied during the resync; the version rule keeps both correct.
    Concurrent,
    /// The subscribing services' live consumers are paused for the job.
    PauseLive,
}

/// Where a job reads its source rows.
#[derive(Args)]
pub(crate) struct SourceDb {
    /// Read the source rows (in one snapshot) from this Postgres instead of RESYNC_DATABASE_URL:
    /// a hot standby of it, so a resync puts no read load on the primary. The job's state is
    /// still written to RESYNC_DATABASE_URL. Not recorded with the job: pass it to `resume` too.
    #[arg(long, env = "RESYNC_SOURCE_URL", hide_env_values = true)]
    source_url: Option<String>,
}

impl SourceDb {
    /// A pool on the standby, if one is named.
    async fn connect(&self) -> Result<Option<sqlx::PgPool>> {
        let Some(url) = &self.source_url else { return Ok(None) };
        let pool = sqlx::PgPool::connect(url).await.with_context(|| {
            format!("connecting to the source database (--source-url) {}", resync_migrations::server(url))
        })?;
        Ok(Some(pool))
    }
}

#[derive(Args)]
pub(crate) struct StartArgs {
    /// The entity type, e.g. `listing`; a service's config must map its source table.
    #[arg(long)]
    entity: String,
    /// The directory of service config files (the same one `fare` reads).
    #[arg(long, env = "RESYNC_CONFIG_DIR", default_value = "services")]
    config_dir: std::path::PathBuf,
    /// An extra SQL boolean expression over the source table's columns, e.g. `country = 'PT'`.
    #[arg(long)]
    filter: Option<String>,
    /// Most events per second (keep a resync within its share of the broker / SNS quota).
    #[arg(long)]
    rate: Option<f64>,
    /// Send only to this service, straight to its resync queue, instead of every subscriber
    /// through the topic. Repeat for several services.
    #[arg(long)]
    target_service: Vec<String>,
    /// Send straight to every subscribing service's resync queue instead of through the
    /// topic/exchange: on SQS, SendMessageBatch per queue (no SNS publish quota spent).
    #[arg(long, conflicts_with = "target_service")]
    direct: bool,
    /// Only the entities whose events the target service's sink dead-lettered (refused by the
    /// third party, or failed too often): resend them once it is fixed. Needs one
    /// --target-service.
    #[arg(long, requires = "target_service")]
    only_rejected: bool,
    /// Key ranges read in parallel, all in one database snapshot.
    #[arg(long, default_value_t = resync_snapshotter::DEFAULT_READERS)]
    readers: u32,
    /// Rows read and published per checkpoint.
    #[arg(long, default_value_t = 1000)]
    chunk_size: i64,
    /// `concurrent` (default): live events keep being applied during the resync; the version
    /// rule keeps both correct. `pause-live`: the subscribing services' live consumers are
    /// paused for the job and resumed when it completes (their backlog is then applied).
    #[arg(long, value_enum, default_value_t = JobMode::Concurrent)]
    mode: JobMode,
    /// Skip the API call for entities whose content the sink already has (the consumers
    /// compare content hashes); without it, a resync re-sends every entity, also those at the
    /// version the sink has (the point of a resync after fixing a sync bug).
    #[arg(long)]
    skip_unchanged: bool,
    /// Record the job and print its id without running it (run it with `resume`).
    #[arg(long)]
    detach: bool,
    /// Also delete, at the --target-service's sink, the entities it holds as present that the
    /// source table has no row for (deleted without an event): each gets a tombstone with a
    /// new version once every row is published. With --filter, only entities whose content
    /// last applied matches the filter are deleted. Needs exactly one --target-service.
    #[arg(long, requires = "target_service")]
    delete_missing: bool,
    /// The most entities --delete-missing may delete: a number (`500`) or a share of what the
    /// sink holds (`10%`). Above it the job is refused before anything is sent.
    #[arg(long, default_value = "10%", requires = "delete_missing")]
    max_deletes: resync_snapshotter::DeleteLimit,
    /// With --delete-missing: print how many entities would be deleted and the first of them,
    /// and stop; no job is recorded, nothing is sent.
    #[arg(long, requires = "delete_missing")]
    dry_run: bool,
    /// POST a JSON document (`{"event": ..., "job": {...}}`) to this http(s) URL at each change
    /// of the job's state: started, paused, resumed, completed, failed, cancelled. Best effort:
    /// a receiver that is down is logged and never stops the job.
    #[arg(long, value_parser = http_url)]
    notify: Option<String>,
    #[command(flatten)]
    source: SourceDb,
}

fn http_url(text: &str) -> std::result::Result<String, String> {
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        Ok(text.to_string())
    } else {
        Err(format!("`{text}`: expected an http:// or https:// URL"))
    }
}

pub(crate) async fn run(common: &Common, schema: &Schema, command: JobCommand) -> Result<()> {
    let pool = connect_db(common).await?;
    match command {
        JobCommand::Start(args) => {
            let catalog = fare_config::load_dir(&args.config_dir)?;
            let source = catalog
                .services
                .iter()
                .flat_map(|s| s.sources.iter())
                .find(|s| s.entity == args.entity)
                .with_context(|| {
                    format!("no service in {} maps a source for `{}`", args.config_dir.display(), args.entity)
                })?;
            let namespace = common.namespace.as_deref();
            let targets = target_services(&catalog, &args)?;
            anyhow::ensure!(
                !args.only_rejected || targets.len() == 1,
                "--only-rejected resends what one service's sink rejected: name exactly one --target-service"
            );
            if args.delete_missing {
                check_deletes_reach(&targets, &args.entity)?;
            }
            // Without targets, every subscriber with a sink must apply the job; with them, theirs.
            let receivers =
                if targets.is_empty() { sinks_in(&catalog, &args.entity) } else { targets.clone() };
            let direct = !targets.is_empty() || args.direct;
            let options = JobOptions {
                filter: args.filter,
                rate: args.rate,
                target_queues: if direct {
                    let all = subscribers_in(&catalog, &args.entity);
                    let to = if targets.is_empty() { &all } else { &targets };
                    to.iter().map(|service| target_queue(namespace, service, &args.entity)).collect()
                } else {
                    Vec::new()
                },
                only_rejected_by: targets.first().filter(|_| args.only_rejected).map(|s| s.sink_name()),
                chunk_size: args.chunk_size,
                sinks: receivers.iter().filter(|s| s.sink.is_some()).map(|s| s.sink_name()).collect(),
                skip_unchanged: args.skip_unchanged,
                paused_services: if args.mode == JobMode::PauseLive {
                    receivers.iter().filter(|s| s.sink.is_some()).map(|s| s.name.clone()).collect()
                } else {
                    Vec::new()
                },
                readers: args.readers,
                delete_missing: targets
                    .first()
                    .filter(|_| args.delete_missing)
                    .map(|service| (service.sink_name(), args.max_deletes)),
                notify: args.notify,
            };
            if args.dry_run {
                if let Some(missing) =
                    resync_snapshotter::preview_deletes(&pool, schema, source, &options).await?
                {
                    print_deletes_preview(&missing, args.max_deletes);
                }
                return Ok(());
            }
            let id = resync_snapshotter::start(&pool, schema, namespace, source, &options).await?;
            println!("job {id}");
            for service in &options.paused_services {
                println!("paused {service} live until the job is finished");
            }
            if !args.detach {
                let source = args.source.connect().await?;
                drive(common, schema, &pool, source.as_ref(), id).await?;
            }
        }
        JobCommand::Resume { id, source } => {
            let source = source.connect().await?;
            let job = resync_snapshotter::resume(&pool, schema, id).await?;
            if job.status.is_finished() {
                println!("job {id} is {}: nothing to resume", job.status);
                return Ok(());
            }
            drive(common, schema, &pool, source.as_ref(), id).await?;
        }
        JobCommand::Pause { id } => {
            println!("{}", line(&resync_snapshotter::pause(&pool, schema, id).await?));
        }
        JobCommand::Cancel { id } => {
            let (job, resumed) = resync_snapshotter::cancel(&pool, schema, id).await?;
            for service in resumed {
                println!("resumed {service} live");
            }
            println!("{}", line(&job));
        }
        JobCommand::Status { id, json, watch } => loop {
            let job = resync_snapshotter::get(&pool, schema, id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
                break;
            }
            if watch && job.status.is_in_progress() && std::io::stdout().is_terminal() {
                // Carriage return and erase-to-end-of-line: the line is redrawn in place.
                print!("\r{}\x1b[K", watch_line(&job));
                use std::io::Write;
                std::io::stdout().flush()?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                if watch && std::io::stdout().is_terminal() {
                    println!();
                }
                println!("{}", line(&job));
                break;
            }
        },
        JobCommand::Verify { id, sink, config_dir, json } => {
            let job = resync_snapshotter::get(&pool, schema, id).await?;
            let sinks = if sink.is_empty() { sinks_of(&config_dir, &job.entity_type)? } else { sink };
            anyhow::ensure!(
                !sinks.is_empty(),
                "no service with a sink subscribes to `{}`; name one with --sink",
                job.entity_type
            );
            let mut reports = Vec::new();
            for sink in &sinks {
                reports.push(resync_snapshotter::verify_job(&pool, schema, id, sink).await?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                for report in &reports {
                    println!(
                        "{}: {} entities checked, {} drifting",
                        report.sink, report.checked, report.drift_count
                    );
                    for drift in &report.drift {
                        let applied = drift
                            .applied_version
                            .map_or("never applied".to_string(), |v| format!("v{v} applied"));
                        let source =
                            drift.source_version.map_or("no version".to_string(), |v| format!("v{v}"));
                        println!("  {} {source} in the source, {applied}", drift.entity_id);
                    }
                }
            }
            if reports.iter().any(|r| r.drift_count > 0) {
                std::process::exit(1);
            }
        }
        JobCommand::Show { id, json } => {
            let report = resync_snapshotter::report(&pool, schema, id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report_lines(&report));
            }
        }
        JobCommand::List { limit, json } => {
            let jobs = resync_snapshotter::list(&pool, schema, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                println!("{}", list_header());
                for job in jobs {
                    println!("{}", list_row(&job));
                }
            }
        }
    }
    Ok(())
}

/// Takes the job as far as it goes in this process (see [`resync_snapshotter::drive`]), printing
/// each milestone.
async fn drive(
    common: &Common,
    schema: &Schema,
    pool: &sqlx::PgPool,
    source: Option<&sqlx::PgPool>,
    id: Uuid,
) -> Result<()> {
    let transport = TransportConfig::named(&common.transport)?;
    let mut show = |milestone: Milestone<'_>| match milestone {
        Milestone::Ran(job) | Milestone::Awaited(job) => println!("{}", line(job)),
        Milestone::LiveResumed(service) => println!("resumed {service} live"),
    };
    let source = source.unwrap_or(pool);
    resync_snapshotter::drive(pool, source, schema, &transport, id, Duration::from_millis(500), &mut show)
        .await?;
    Ok(())
}

/// `<id> <entity> <status> [#####.....] published/total  rate/s  ETA`
/// The lines of `job show`.
fn report_lines(report: &resync_snapshotter::JobReport) -> String {
    let job = &report.job;
    let at = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let end = job.finished_at.unwrap_or(job.updated_at);
    let took = Duration::from_secs(u64::try_from((end - job.created_at).num_seconds()).unwrap_or(0));
    let mut out = format!("job {} ({})\n", job.id, job.entity_type);
    out += &format!("  status     {}\n", job.status);
    out += &format!("  rows       {}\n", job.total.map_or("not counted yet".to_string(), |t| t.to_string()));
    out += &format!("  published  {}\n", job.emitted);
    out += &format!("  applied    {}\n", job.applied);
    out += &format!("  deleted    {}\n", job.deleted);
    out += &format!("  started    {}\n", at(job.created_at));
    if let Some(finished) = job.finished_at {
        out += &format!("  finished   {}\n", at(finished));
    }
    out += &format!("  took       {}\n", humantime::format_duration(took));
    out += &format!("  mean rate  {:.0} rows/s\n", job.rate());
    if let Some(error) = &job.error {
        out += &format!("  error      {error}\n");
    }
    for (sink, outcomes) in &report.outcomes {
        let counts: Vec<String> = outcomes.iter().map(|(outcome, n)| format!("{n} {outcome}")).collect();
        out += &format!("  at {sink}: {}\n", counts.join(", "));
    }
    out
}

fn line(job: &Job) -> String {
    let total = job.total.unwrap_or(0).max(job.emitted);
    let share = if total > 0 { job.emitted as f64 / total as f64 } else { 0.0 };
    let filled = (share * 30.0).round() as usize;
    let bar = format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled.min(30)));
    let eta =
        job.eta().map(|d| format!("  ETA {}", humantime::format_duration(Duration::from_secs(d.as_secs()))));
    let deleted = if job.deleted > 0 { format!(", {} deleted", job.deleted) } else { String::new() };
    format!(
        "{} {} {:<9} [{bar}] {}/{} published, {} applied{deleted}  {:.0}/s{}",
        job.id,
        job.entity_type,
        job.status,
        job.emitted,
        job.total.map_or("?".to_string(), |t| t.to_string()),
        job.applied,
        job.rate(),
        eta.unwrap_or_default()
    ) + &job
        .error
        .as_ref()
        .filter(|_| job.status == JobStatus::Failed)
        .map(|e| format!("\n    error: {e}"))
        .unwrap_or_default()
}

/// `--watch`'s line, at most 79 characters: status, a bar, published / total, applied, rate
/// and ETA (the id and entity are on the command line already).
fn watch_line(job: &Job) -> String {
    let total = job.total.unwrap_or(0).max(job.emitted);
    let share = if total > 0 { job.emitted as f64 / total as f64 } else { 0.0 };
    let filled = ((share * 16.0).round() as usize).min(16);
    let eta =
        job.eta().map(|d| format!(" ETA {}", humantime::format_duration(Duration::from_secs(d.as_secs()))));
    let mut line = format!(
        "{:<9} [{}{}] {}/{} sent {} applied {:.0}/s{}",
        job.status,
        "#".repeat(filled),
        ".".repeat(16 - filled),
        job.emitted,
        job.total.map_or("?".to_string(), |t| t.to_string()),
        job.applied,
        job.rate(),
        eta.unwrap_or_default()
    );
    line.truncate(79);
    line
}

fn list_header() -> String {
    format!(
        "{:<36} {:<12} {:<9} {:>21} {:>9} {:>8}  CREATED",
        "ID", "ENTITY", "STATUS", "PUBLISHED", "APPLIED", "ROWS/S"
    )
}

/// One job under [`list_header`].
fn list_row(job: &Job) -> String {
    let published = format!("{}/{}", job.emitted, job.total.map_or("?".to_string(), |t| t.to_string()));
    format!(
        "{:<36} {:<12} {:<9} {published:>21} {:>9} {:>8.0}  {}",
        job.id,
        job.entity_type,
        job.status,
        job.applied,
        job.rate(),
        job.created_at.format("%Y-%m-%d %H:%M:%S")
    )
}

/// The services named with `--target-service`, each checked to exist and to subscribe to the
/// entity on the resync stream.
fn target_services<'a>(
    catalog: &'a fare_config::Catalog,
    args: &StartArgs,
) -> Result<Vec<&'a fare_config::ServiceConfig>> {
    let dir = args.config_dir.display();
    args.target_service
        .iter()
        .map(|name| {
            let service = catalog
                .service(name)
                .with_context(|| format!("--target-service: no service `{name}` in {dir}"))?;
            anyhow::ensure!(
                !resync_types(service, &args.entity).is_empty(),
                "--target-service: `{name}` does not subscribe to `{}` events on the resync stream ({dir})",
                args.entity
            );
            Ok(service)
        })
        .collect()
}

/// A subscriber's resync queue and the types of `entity_type` it takes there.
fn target_queue(
    namespace: Option<&str>,
    service: &fare_config::ServiceConfig,
    entity_type: &str,
) -> resync_snapshotter::TargetQueue {
    resync_snapshotter::TargetQueue {
        queue: resync_bus::naming::queue_name(namespace, &service.name, Stream::Resync),
        types: resync_types(service, entity_type),
    }
}

/// The type patterns `service` subscribes to on the resync stream that cover `entity_type`.
fn resync_types(service: &fare_config::ServiceConfig, entity_type: &str) -> Vec<String> {
    let prefix = format!("{entity_type}.");
    service
        .subscriptions
        .iter()
        .filter(|sub| sub.streams.contains(&Stream::Resync))
        .flat_map(|sub| sub.types.iter())
        .filter(|t| t.as_str() == "*" || t.starts_with(&prefix))
        .cloned()
        .collect()
}

/// The services subscribing to some type of `entity_type` on the resync stream.
fn subscribers_in<'a>(
    catalog: &'a fare_config::Catalog,
    entity_type: &str,
) -> Vec<&'a fare_config::ServiceConfig> {
    catalog.services.iter().filter(|s| !resync_types(s, entity_type).is_empty()).collect()
}

/// The sinks of the services subscribing to some type of `entity_type` on the resync stream.
fn sinks_of(config_dir: &std::path::Path, entity_type: &str) -> Result<Vec<String>> {
    let catalog = fare_config::load_dir(config_dir)?;
    Ok(sinks_in(&catalog, entity_type).into_iter().map(|s| s.sink_name()).collect())
}

/// `--delete-missing` compares one sink with the source, and its service must take the
/// tombstones (`<entity>.deleted`) on its resync queue.
fn check_deletes_reach(targets: &[&fare_config::ServiceConfig], entity_type: &str) -> Result<()> {
    let [service] = targets else {
        anyhow::bail!(
            "--delete-missing compares one sink with the source: name exactly one --target-service"
        );
    };
    anyhow::ensure!(service.sink.is_some(), "--delete-missing: service `{}` has no [sink]", service.name);
    let deleted = format!("{entity_type}.deleted");
    anyhow::ensure!(
        resync_bus::Filter::types(resync_types(service, entity_type)).matches(&deleted),
        "--delete-missing: service `{}` does not subscribe to `{deleted}` on the resync stream, so it would \
         never receive the tombstones; add it to its subscription",
        service.name
    );
    Ok(())
}

fn print_deletes_preview(missing: &resync_snapshotter::Missing, limit: resync_snapshotter::DeleteLimit) {
    let count = missing.entities.len();
    println!(
        "dry run: {count} of the {} entities sink `{}` holds have no row in the source and would be deleted \
         (--max-deletes {limit} allows {})",
        missing.present, missing.sink, missing.allowed
    );
    for (id, version) in missing.entities.iter().take(20) {
        println!("  {id} (v{version} at the sink)");
    }
    if count > 20 {
        println!("  ... and {} more", count - 20);
    }
    if !missing.within_limit() {
        println!("over the limit: `job start` would refuse; raise --max-deletes if this is meant");
    }
}

/// The services with a sink subscribing to some type of `entity_type` on the resync stream.
pub(crate) fn sinks_in<'a>(
    catalog: &'a fare_config::Catalog,
    entity_type: &str,
) -> Vec<&'a fare_config::ServiceConfig> {
    subscribers_in(catalog, entity_type).into_iter().filter(|s| s.sink.is_some()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(emitted: i64, total: i64, status: JobStatus) -> Job {
        let created_at = chrono::Utc::now() - chrono::TimeDelta::seconds(100);
        Job {
            id: Uuid::now_v7(),
            entity_type: "listing".into(),
            status,
            emitted,
            total: Some(total),
            applied: emitted / 2,
            deleted: 0,
            error: None,
            created_at,
            updated_at: chrono::Utc::now(),
            finished_at: None,
        }
    }

    #[test]
    fn the_watch_line_fits_80_columns_even_at_millions_of_rows() {
        for (emitted, total) in [(0, 0), (3, 10), (123_456_789, 987_654_321), (10_000_000, 10_000_000)] {
            let line = watch_line(&job(emitted, total, JobStatus::Running));
            assert!(line.chars().count() < 80, "{} columns: {line}", line.chars().count());
            assert!(line.contains(&format!("{emitted}/{total} sent")), "{line}");
        }
    }

    #[test]
    fn job_list_rows_line_up_under_the_header() {
        let header = list_header();
        let row = list_row(&job(1500, 3000, JobStatus::Published));
        assert!(header.starts_with("ID ") && header.contains("STATUS"), "{header}");
        assert_eq!(header.find("ENTITY"), row.find("listing"), "\n{header}\n{row}");
        assert_eq!(header.find("STATUS"), row.find(JobStatus::Published.as_str()), "\n{header}\n{row}");
    }
}
