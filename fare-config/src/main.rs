//! `fare`: make the broker match the services' config files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fare_config::{Change, Plan, Topology, check_namespace, load_dir};
use resync_bus::{Transport, TransportConfig};

/// fare reads a directory of service config files (one `*.toml` per service: what it
/// publishes, what it subscribes to) and makes the broker match, the way terraform does: `plan`
/// shows the difference, `apply` creates and converges, `prune` deletes what fare created and
/// no config declares any more, `verify` proves the routes with probe events.
///
/// Topology: a topic per published entity and stream, a queue per service and stream with its
/// dead-letter queue, and filtered routes. Everything fare creates carries the ownership mark
/// `fare:<namespace>` (an AMQP argument on RabbitMQ, a tag on SNS/SQS); fare never deletes
/// what does not carry its namespace's mark.
///
/// The broker comes from env vars: RESYNC_TRANSPORT (rabbitmq | sns-sqs), RESYNC_AMQP_URL and
/// RESYNC_AMQP_MANAGEMENT_URL (default: the AMQP host on port 15672, same credentials),
/// AWS_ENDPOINT_URL, AWS_REGION and the AWS credential chain.
#[derive(Parser)]
#[command(name = "fare", version)]
struct Cli {
    /// The directory of service config files.
    #[arg(long, global = true, env = "RESYNC_CONFIG_DIR", default_value = "services")]
    config_dir: PathBuf,
    /// Prefix of every topic and queue name (an environment or tenant).
    #[arg(long, global = true, env = "RESYNC_NAMESPACE")]
    namespace: Option<String>,
    /// rabbitmq or sns-sqs.
    #[arg(long, global = true, env = "RESYNC_TRANSPORT", default_value = "rabbitmq")]
    transport: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config files and print the topology they ask for (no broker needed).
    Show,
    /// Compare the config with what the broker holds and print the changes `apply` would make
    /// and what `prune` would delete. Changes nothing.
    Plan {
        /// Exit with status 2 when the broker differs from the config (for CI drift checks).
        #[arg(long)]
        exit_code: bool,
    },
    /// Create what is missing, converge settings and routes. Idempotent; safe to run
    /// concurrently and to re-run after a failure half-way. Never deletes a queue or topic.
    Apply,
    /// Delete the queues (with their dead-letter queues and messages) and topics that carry this
    /// namespace's fare mark and no config declares any more.
    Prune {
        /// Really delete; without it, prune only prints what it would delete.
        #[arg(long)]
        yes: bool,
    },
    /// Publish one probe event per declared route and check it arrives in exactly the queues
    /// that should get it; probes are removed as they are found. Messages of other events met
    /// while draining are put back at once. Exits with status 1 if any route is wrong.
    Verify {
        /// How long to wait for probes per queue.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(namespace) = &cli.namespace {
        check_namespace(namespace)?;
    }
    let catalog = load_dir(&cli.config_dir)?;
    let topology = Topology::desired(&catalog, cli.namespace.as_deref());
    if let Command::Show = cli.command {
        show(&topology, cli.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let transport = TransportConfig::named(&cli.transport)?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.transport))?;
    let status = run(&cli, transport.as_ref(), &topology).await;
    transport.close().await?;
    status
}

async fn run(cli: &Cli, transport: &dyn Transport, topology: &Topology) -> Result<ExitCode> {
    match cli.command {
        Command::Show => unreachable!("handled before connecting"),
        Command::Plan { exit_code } => {
            let plan = fare_config::plan(transport, topology).await.context("reading the broker")?;
            print_plan(&plan, cli.json)?;
            Ok(if exit_code && !plan.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        Command::Apply => {
            let applied = fare_config::apply(transport, topology).await?;
            print_done(&applied, "applied", "No changes: the broker matches the config.", cli.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { yes: false } => {
            let plan = fare_config::plan(transport, topology).await.context("reading the broker")?;
            print_done(&plan.prune, "would_delete", "Nothing to prune.", cli.json)?;
            if !plan.prune.is_empty() && !cli.json {
                println!("Run `fare prune --yes` to delete these (their messages are lost).");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { yes: true } => {
            let deleted = fare_config::prune(transport, topology).await?;
            print_done(&deleted, "deleted", "Nothing to prune.", cli.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { wait } => {
            let verification = fare_config::verify_routes(transport, topology, wait).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&verification)?);
            } else {
                for probe in &verification.probes {
                    let mark = if probe.ok() { "ok  " } else { "FAIL" };
                    println!("{mark} {} on {}", probe.event_type, probe.topic);
                    for queue in probe.missing() {
                        println!("       missing in {queue}");
                    }
                    for queue in probe.unexpected() {
                        println!("       arrived in {queue}, which does not subscribe to it");
                    }
                }
                println!(
                    "{} of {} probes routed as declared; {} other messages put back",
                    verification.probes.iter().filter(|p| p.ok()).count(),
                    verification.probes.len(),
                    verification.requeued
                );
            }
            Ok(if verification.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

fn show(topology: &Topology, json: bool) -> Result<()> {
    if json {
        let queues: Vec<_> = topology.queues.keys().collect();
        let json =
            serde_json::json!({"topics": topology.topics, "queues": queues, "bindings": topology.bindings});
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    for topic in &topology.topics {
        println!("topic   {topic}");
    }
    for (name, spec) in &topology.queues {
        println!(
            "queue   {name} (max_receive_count={}, visibility_timeout={}s)",
            spec.max_receive_count,
            spec.visibility_timeout.as_secs()
        );
    }
    for b in &topology.bindings {
        println!("route   {} -> {} [{}]", b.topic, b.queue, b.patterns.join(", "));
    }
    Ok(())
}

fn print_plan(plan: &Plan, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(plan)?);
        return Ok(());
    }
    if plan.is_empty() {
        println!("No changes: the broker matches the config.");
    }
    for change in &plan.changes {
        println!("{change}");
    }
    if !plan.prune.is_empty() {
        println!("Declared by no config any more (deleted only by `fare prune --yes`):");
        for change in &plan.prune {
            println!("{change}");
        }
    }
    for name in &plan.not_owned {
        println!("! {name} exists but was not created by fare: used as is, never deleted");
    }
    if !plan.is_empty() {
        let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        println!(
            "Plan: {} for `fare apply`, {} for `fare prune`.",
            count(plan.changes.len(), "change"),
            count(plan.prune.len(), "deletion")
        );
    }
    Ok(())
}

fn print_done(changes: &[Change], key: &str, nothing: &str, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ key: changes }))?);
    } else if changes.is_empty() {
        println!("{nothing}");
    } else {
        for change in changes {
            println!("{change}");
        }
    }
    Ok(())
}
