//! `resync-demo`: the main job and the scale benchmark, on the local services. Kept out of the
//! `resync` binary, which ships to production without the API simulator or test support.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// The main job, on the local services: provisions a small system with fare, writes and updates
/// listings through the outbox, runs the relay and several consumers against the API simulator
/// with faults on (errors, rate limit, latency, late timeouts), injects duplicates and a resync,
/// then reports and checks that the third party equals the database. Exits non-zero if it does
/// not. `--transport sns-sqs` runs it on the emulator. `scripts/demo` builds and runs it.
#[derive(Parser)]
#[command(name = "resync-demo", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    demo: DemoArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct Common {
    /// Postgres for the demo's schema (dropped afterwards unless --keep).
    #[arg(
        long,
        global = true,
        env = "RESYNC_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        hide_env_values = true
    )]
    database_url: String,
    /// The broker: rabbitmq or sns-sqs (endpoints from RESYNC_AMQP_URL / AWS_ENDPOINT_URL).
    #[arg(long, global = true, env = "RESYNC_TRANSPORT", default_value = "rabbitmq")]
    transport: String,
}

#[derive(Subcommand)]
enum Command {
    /// A benchmark on the local services (RabbitMQ): N `resync consume` processes (through a
    /// private PgBouncer, so N may exceed Postgres's max_connections) against the API simulator
    /// limited to R writes/s, during a resync of M entities; all but a few get SIGTERM mid-run,
    /// and the limit may change at given times. Prints completion against M/R, achieved
    /// against allowed rate, the 429 share, peak RSS per consumer, how fast throughput followed
    /// each limit change, and lost and stale counts; exits non-zero if anything was lost or
    /// overwritten by an older version. `scripts/scale` builds and runs it.
    ScaleTest(ScaleArgs),
}

#[derive(Args)]
struct ScaleArgs {
    /// The `resync` binary the consumer processes run (default: the one beside this binary).
    #[arg(long)]
    resync_bin: Option<PathBuf>,
    /// Redis for the per-entity locks and the shared rate limit.
    #[arg(long, env = "RESYNC_REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    redis_url: String,
    /// Consumer processes.
    #[arg(long, default_value_t = 150)]
    consumers: usize,
    /// Entities in the resync.
    #[arg(long, default_value_t = 100_000)]
    entities: usize,
    /// The third party's limit, writes/s (the sink's configured shared rate too).
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// Consumers left after the scale-down.
    #[arg(long, default_value_t = 6)]
    scale_down_to: usize,
    /// Scale down once this share of the entities is applied (0..1); `--no-scale-down` to keep all.
    #[arg(long, default_value_t = 0.5)]
    scale_down_at: f64,
    #[arg(long)]
    no_scale_down: bool,
    /// Change the third party's limit during the run: `<after job start>=<writes/s>`, repeatable
    /// (e.g. --limit-change 15s=500 --limit-change 35s=2000).
    #[arg(long = "limit-change")]
    limit_changes: Vec<resync_demo::scale::LimitChange>,
    /// Tokio worker threads per consumer process.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Longest wait for the resync to complete.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Keep the schema, queues and topics afterwards.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Redis for the per-entity locks.
    #[arg(long, env = "RESYNC_REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    redis_url: String,
    /// Listings to create.
    #[arg(long, default_value_t = 1_000)]
    entities: usize,
    /// Update transactions after the creates.
    #[arg(long, default_value_t = 4_000)]
    updates: usize,
    /// Consumers (each with its own broker connection).
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// Longest wait for the third party to converge.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Keep the demo's schema, queues and topics afterwards.
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        None => demo(&cli.common, cli.demo).await,
        Some(Command::ScaleTest(args)) => scale_test(&cli.common, args).await,
    }
}

async fn demo(common: &Common, args: DemoArgs) -> Result<()> {
    let options = resync_demo::DemoOptions {
        transport: common.transport.clone(),
        database_url: common.database_url.clone(),
        redis_url: args.redis_url,
        entities: args.entities,
        updates: args.updates,
        consumers: args.consumers,
        deadline: args.deadline,
        keep: args.keep,
        ..resync_demo::DemoOptions::default()
    };
    let report = resync_demo::run(&options).await?;
    println!("{report}");
    anyhow::ensure!(report.converged(), "the third party does not equal the database");
    Ok(())
}

async fn scale_test(common: &Common, args: ScaleArgs) -> Result<()> {
    let options = resync_demo::scale::ScaleOptions {
        resync_bin: match args.resync_bin {
            Some(path) => path,
            None => beside_this_binary("resync")?,
        },
        database_url: common.database_url.clone(),
        redis_url: args.redis_url,
        consumers: args.consumers,
        entities: args.entities,
        rate: args.rate,
        scale_down_to: args.scale_down_to,
        scale_down_at: (!args.no_scale_down).then_some(args.scale_down_at),
        limit_changes: args.limit_changes,
        worker_threads: args.worker_threads,
        deadline: args.deadline,
        keep: args.keep,
    };
    let report = resync_demo::scale::run(&options).await?;
    println!("{report}");
    anyhow::ensure!(report.passed(), "entities were lost or overwritten by an older version");
    Ok(())
}

/// `name` in this binary's directory, where cargo builds every binary of the workspace.
fn beside_this_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the resync-demo binary")?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "no `{name}` binary beside {} (build it: cargo build --release -p resync-cli --bin resync), \
         or name one with --resync-bin",
        exe.display()
    );
    Ok(path)
}

/// Logs to stderr, `RUST_LOG` filtering (default: info), colours only on a terminal.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
