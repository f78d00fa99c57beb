//! `resync`: the command-line entry point. Parses arguments, builds configuration from flags
//! and env vars, and calls the library crates; no logic of its own beyond wiring.

mod dlq;
mod entity;
mod job;
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use resync_bus::{Stream, TransportConfig};
use resync_producer::{Relay, RelayConfig, RelayStatus, ReplayRequest, ReplayTarget, Schema};

/// resync keeps third-party systems in sync with your data through event streams on
/// RabbitMQ or SNS/SQS.
///
/// Connection settings come from env vars: RESYNC_DATABASE_URL, RESYNC_TRANSPORT
/// (rabbitmq | sns-sqs), RESYNC_AMQP_URL, AWS_ENDPOINT_URL, AWS_REGION, RESYNC_SCHEMA.
#[derive(Parser)]
#[command(name = "resync", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// Postgres holding the outbox and resync's state.
    #[arg(
        long,
        global = true,
        env = "RESYNC_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        hide_env_values = true
    )]
    database_url: String,
    /// The Postgres schema resync's tables live in.
    #[arg(long, global = true, env = "RESYNC_SCHEMA", default_value = "resync")]
    schema: String,
    /// Prefix of every topic and queue name (an environment or tenant), as given to `fare`.
    #[arg(long, global = true, env = "RESYNC_NAMESPACE")]
    namespace: Option<String>,
    /// The broker: rabbitmq or sns-sqs (endpoints from RESYNC_AMQP_URL / AWS_ENDPOINT_URL).
    #[arg(long, global = true, env = "RESYNC_TRANSPORT", default_value = "rabbitmq")]
    transport: String,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade resync's schema in Postgres (idempotent; safe to run concurrently).
    Migrate,
    /// Publish committed outbox events to the broker, in order, with broker confirms.
    ///
    /// Run two or more for availability: one leads, the others stand by and take over within
    /// seconds if it dies. Stops cleanly on SIGTERM after the batch in flight.
    Relay(RelayArgs),
    /// Republish a range of the event log, to every subscriber or to one service.
    Replay(ReplayArgs),
    /// Stop every consumer of a service's stream from taking messages (within about 2 s);
    /// messages accumulate in the queue until `resync resume`.
    Pause(StreamArgs),
    /// Let the consumers of a paused stream take messages again.
    Resume(StreamArgs),
    /// Apply a service's events to its sink: consumes the service's live and resync queues
    /// (as its fare config declares them) until SIGTERM, then finishes the events in flight.
    ///
    /// Run as many as needed; they share the work through the broker and never apply an
    /// older version of an entity over a newer one. Serves /metrics, /healthz and /readyz.
    Consume(ConsumeArgs),
    /// Full resync jobs: resend every entity of a type from its source table on the resync
    /// stream (start, resume, pause, cancel, status, list).
    Job {
        #[command(subcommand)]
        command: job::JobCommand,
    },
    /// Look one entity up across the source, the event log and every sink's records.
    Entity {
        #[command(subcommand)]
        command: entity::EntityCommand,
    },
    /// Inspect, redrive and purge a service's dead-letter queues.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Maintain the outbox / event log.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Args)]
struct RelayArgs {
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "RESYNC_LISTEN", default_value = "0.0.0.0:9464")]
    listen: SocketAddr,
    /// Most events read and published per round.
    #[arg(long, default_value_t = 500)]
    batch_size: i64,
    /// Fallback poll interval when no NOTIFY arrives, e.g. 500ms.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
}

#[derive(Args)]
struct ConsumeArgs {
    /// The service to consume for, as named in its config file.
    #[arg(long)]
    service: String,
    /// The directory of service config files (the same one `fare` reads).
    #[arg(long, env = "RESYNC_CONFIG_DIR", default_value = "services")]
    config_dir: std::path::PathBuf,
    /// Redis for the per-entity locks and the shared rate limit: one URL (`rediss://` for TLS),
    /// or a Redis Cluster's seed nodes separated by commas (a cluster is also recognised from a
    /// single configuration endpoint).
    #[arg(long, env = "RESYNC_REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    redis_url: String,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "RESYNC_LISTEN", default_value = "0.0.0.0:9465")]
    listen: SocketAddr,
    /// Events processed at once (overrides the config's consumer.concurrency).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Messages held from the broker per queue (overrides consumer.prefetch).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Postgres connections of this process.
    #[arg(long, env = "RESYNC_DB_POOL_SIZE", default_value_t = 4)]
    db_pool_size: u32,
    /// `transaction` when --database-url points at a pooler in transaction mode (PgBouncer
    /// `pool_mode = transaction`), the way to run more consumer processes than Postgres has
    /// connections: statements then run in explicit transactions and are not kept prepared.
    /// `direct` (straight to Postgres) otherwise.
    #[arg(long, env = "RESYNC_DB_POOLING", default_value = "direct")]
    db_pooling: resync_consumer::Pooling,
    /// How long an entity lock lives without renewal (renewed every third of it while held).
    #[arg(long, env = "RESYNC_LOCK_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    lock_lease: Duration,
    /// How long in-flight events may take to finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// How often the autoscaling signals on /metrics are sampled (queue backlog, processing
    /// rate, sink capacity, recommended replicas).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    autoscale_interval: Duration,
    /// The backlog should be gone within this: the recommended replica count drains it in this
    /// time (never beyond what the sink's rate limit can use).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_target: Duration,
}

#[derive(Args)]
struct ReplayArgs {
    /// First sequence number of the log to replay (inclusive).
    #[arg(long)]
    from: i64,
    /// Last sequence number (inclusive); default: the end of the log.
    #[arg(long)]
    to: Option<i64>,
    /// Only events of this entity type.
    #[arg(long)]
    entity_type: Option<String>,
    /// Send only to this service's live queue instead of to every subscriber, and only the
    /// event types it subscribes to there (from its config in --config-dir).
    #[arg(long)]
    to_service: Option<String>,
    /// The directory of service config files (the same one `fare` reads).
    #[arg(long, env = "RESYNC_CONFIG_DIR", default_value = "services")]
    config_dir: std::path::PathBuf,
}

#[derive(Args)]
struct StreamArgs {
    /// The service whose consumers pause or resume, as named in its fare config.
    #[arg(long)]
    service: String,
    /// live or resync.
    #[arg(long, value_parser = parse_stream)]
    stream: Stream,
    /// Why (shown in logs); pause only.
    #[arg(long)]
    reason: Option<String>,
    /// The directory of service config files, where the service must be declared.
    #[arg(long, env = "RESYNC_CONFIG_DIR", default_value = "services")]
    config_dir: std::path::PathBuf,
}

fn parse_stream(text: &str) -> Result<Stream, String> {
    text.parse()
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Delete published events older than a duration from the log (never unpublished ones).
    Prune {
        /// e.g. 7d, 36h, 30min.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
    /// List the events the relay set aside because their entity type has no topic, per type.
    Parked,
    /// Put an entity type's parked events back in line for the relay, in order (after `fare
    /// apply` created its topic).
    Release {
        #[arg(long)]
        entity_type: String,
    },
    /// Give up on an entity type's parked events: never published (they stay in the log).
    Drop {
        #[arg(long)]
        entity_type: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    serve::init_logging();
    let cli = Cli::parse();
    let schema = Schema::new(cli.common.schema.clone()).context("--schema / RESYNC_SCHEMA")?;
    match cli.command {
        Command::Migrate => {
            resync_migrations::migrate(&cli.common.database_url, &schema).await?;
            println!("schema `{schema}` is up to date");
        }
        Command::Relay(args) => relay(&cli.common, schema, args).await?,
        Command::Consume(args) => consume(&cli.common, schema, args).await?,
        Command::Replay(args) => {
            let replayed = replay(&cli.common, &schema, args).await?;
            println!("replayed {} events", replayed.sent);
            if replayed.not_subscribed > 0 {
                println!(
                    "skipped {} events of types the service does not subscribe to",
                    replayed.not_subscribed
                );
            }
        }
        Command::Pause(args) => {
            find_service(&fare_config::load_dir(&args.config_dir)?, &args.service, &args.config_dir)?;
            let pool = connect_db(&cli.common).await?;
            resync_consumer::control::pause(
                &pool,
                &schema,
                &args.service,
                args.stream,
                args.reason.as_deref(),
            )
            .await?;
            println!(
                "paused {} {}: consumers stop taking messages within about 2 s",
                args.service, args.stream
            );
        }
        Command::Resume(args) => {
            find_service(&fare_config::load_dir(&args.config_dir)?, &args.service, &args.config_dir)?;
            let pool = connect_db(&cli.common).await?;
            if resync_consumer::control::resume(&pool, &schema, &args.service, args.stream).await? {
                println!("resumed {} {}", args.service, args.stream);
            } else {
                println!("{} {} was not paused", args.service, args.stream);
            }
        }
        Command::Dlq { command } => dlq::run(&cli.common, command).await?,
        Command::Job { command } => job::run(&cli.common, &schema, command).await?,
        Command::Entity { command } => entity::run(&cli.common, &schema, command).await?,
        Command::Outbox { command } => {
            let pool =
                sqlx::PgPool::connect(&cli.common.database_url).await.context("connecting to Postgres")?;
            match command {
                OutboxCommand::Prune { older_than } => {
                    let deleted = resync_producer::prune(&pool, &schema, older_than).await?;
                    println!("pruned {deleted} events older than {}", humantime::format_duration(older_than));
                }
                OutboxCommand::Parked => {
                    for p in resync_producer::parked(&pool, &schema).await? {
                        println!(
                            "{}: {} events parked (seq {}..={}): {}",
                            p.entity_type, p.events, p.first_seq, p.last_seq, p.reason
                        );
                    }
                }
                OutboxCommand::Release { entity_type } => {
                    let released = resync_producer::release_parked(&pool, &schema, &entity_type).await?;
                    println!("released {released} parked {entity_type} events to the relay");
                }
                OutboxCommand::Drop { entity_type } => {
                    let dropped = resync_producer::drop_parked(&pool, &schema, &entity_type).await?;
                    println!("dropped {dropped} parked {entity_type} events (still in the log)");
                }
            }
        }
    }
    Ok(())
}

async fn relay(common: &Common, schema: Schema, args: RelayArgs) -> Result<()> {
    resync_migrations::ensure_migrated(&common.database_url, &schema).await?;
    let transport = TransportConfig::named(&common.transport)?.connect().await?;
    let mut config = RelayConfig::new(schema);
    config.namespace = common.namespace.clone();
    config.batch_size = args.batch_size;
    config.poll_interval = args.poll_interval;
    let relay = Relay::new(common.database_url.clone(), transport.clone(), config);
    let shutdown = serve::shutdown_on_signals();
    let status = relay.status();
    let ready = Arc::new(move || matches!(*status.borrow(), RelayStatus::Leader | RelayStatus::Standby));
    serve::serve_health(args.listen, ready, shutdown.clone()).await?;
    resync_producer::metrics::describe();
    relay.run(shutdown).await;
    transport.close().await?;
    Ok(())
}

async fn consume(common: &Common, schema: Schema, args: ConsumeArgs) -> Result<()> {
    let catalog = fare_config::load_dir(&args.config_dir)?;
    let mut service = find_service(&catalog, &args.service, &args.config_dir)?.clone();
    resync_migrations::ensure_migrated(&common.database_url, &schema).await?;
    if let Some(concurrency) = args.concurrency {
        service.consumer.concurrency = concurrency;
    }
    if let Some(prefetch) = args.prefetch {
        service.consumer.prefetch = prefetch;
    }
    let lock = resync_consumer::service::lock_config(args.lock_lease);
    let runtime = resync_consumer::service::Runtime {
        database_url: common.database_url.clone(),
        schema,
        namespace: common.namespace.clone(),
        redis_url: args.redis_url,
        lock,
        db_pool_size: args.db_pool_size,
        db_pooling: args.db_pooling,
    };
    // Config mistakes first, before any connection is made.
    resync_consumer::service::http_sink(&service)?;
    let transport = TransportConfig::named(&common.transport)?.connect().await?;
    let (mut consumer, mut autoscaler) =
        resync_consumer::service::build_with_autoscaler(&service, transport.clone(), &runtime).await?;
    autoscaler.interval = args.autoscale_interval;
    autoscaler.drain_target = args.drain_target;
    consumer.set_shutdown_grace(args.shutdown_grace);
    let consumer = Arc::new(consumer);
    let shutdown = serve::shutdown_on_signals();
    let ready = {
        let consumer = consumer.clone();
        Arc::new(move || consumer.ready())
    };
    serve::serve_health(args.listen, ready, shutdown.clone()).await?;
    resync_consumer::metrics::describe();
    tokio::spawn(autoscaler.run(shutdown.clone()));
    tracing::info!(service = %service.name, transport = %common.transport, "consumer starting");
    consumer.run(shutdown).await?;
    transport.close().await?;
    Ok(())
}

/// The service named `name` in the configs of `dir`, or an error listing the services there.
fn find_service<'a>(
    catalog: &'a fare_config::Catalog,
    name: &str,
    dir: &std::path::Path,
) -> Result<&'a fare_config::ServiceConfig> {
    catalog.service(name).with_context(|| {
        let known: Vec<&str> = catalog.services.iter().map(|s| s.name.as_str()).collect();
        format!("no service `{name}` in {} (services there: {})", dir.display(), known.join(", "))
    })
}

async fn connect_db(common: &Common) -> Result<sqlx::PgPool> {
    sqlx::PgPool::connect(&common.database_url)
        .await
        .context("connecting to Postgres (--database-url / RESYNC_DATABASE_URL)")
}

async fn replay(common: &Common, schema: &Schema, args: ReplayArgs) -> Result<resync_producer::Replayed> {
    let target = match &args.to_service {
        Some(name) => {
            let catalog = fare_config::load_dir(&args.config_dir)?;
            let service = find_service(&catalog, name, &args.config_dir)?;
            ReplayTarget::Queue {
                queue: resync_bus::naming::queue_name(common.namespace.as_deref(), name, Stream::Live),
                subscribed: service.subscribed(Stream::Live),
            }
        }
        None => ReplayTarget::AllSubscribers { namespace: common.namespace.clone() },
    };
    let pool = connect_db(common).await?;
    let transport = TransportConfig::named(&common.transport)?.connect().await?;
    let request = ReplayRequest { from: args.from, to: args.to, entity_type: args.entity_type, target };
    let replayed = resync_producer::replay(&pool, schema, &transport, &request).await?;
    transport.close().await?;
    Ok(replayed)
}
