//! `fare`: make the broker match the services' config files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fare_config::{Topology, load_dir};
use resync_bus::TransportConfig;

/// fare reads a directory of service config files (one `*.toml` per service: what it
/// publishes, what it subscribes to) and makes the broker match: topics per published entity
/// and stream, a queue per service and stream with its dead-letter queue, and filtered
/// bindings.
///
/// The broker comes from env vars: RESYNC_TRANSPORT (rabbitmq | sns-sqs), RESYNC_AMQP_URL,
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
    /// Create what is missing and converge queue settings. Idempotent; safe to run
    /// concurrently and to re-run after a failure half-way.
    Apply,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let catalog = load_dir(&cli.config_dir)?;
    let topology = Topology::desired(&catalog, cli.namespace.as_deref());
    match cli.command {
        Command::Show => {
            if cli.json {
                let queues: Vec<_> = topology.queues.keys().collect();
                let json = serde_json::json!({"topics": topology.topics, "queues": queues, "bindings": topology.bindings});
                println!("{}", serde_json::to_string_pretty(&json)?);
            } else {
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
                    println!("binding {} -> {} [{}]", b.topic, b.queue, b.patterns.join(", "));
                }
            }
        }
        Command::Apply => {
            let transport = TransportConfig::named(&cli.transport)?
                .connect()
                .await
                .context("connecting to the broker")?;
            let ensured = fare_config::apply(transport.as_ref(), &topology).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&ensured)?);
            } else {
                for e in &ensured {
                    println!("ok  {:<8} {} {}", e.kind, e.name, e.detail);
                }
                println!(
                    "{} topics, {} queues, {} bindings in place",
                    topology.topics.len(),
                    topology.queues.len(),
                    topology.bindings.len()
                );
            }
            transport.close().await?;
        }
    }
    Ok(())
}
