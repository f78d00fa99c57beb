//! A throughput sanity check, run by hand (not a test):
//!
//! ```sh
//! cargo run --release -p resync-apisim --example load -- --clients 64 --requests 100000
//! # or against a running `apisim`:
//! cargo run --release -p resync-apisim --example load -- --url http://127.0.0.1:8080
//! ```
//!
//! `clients` concurrent writers each own their entities (of an entity type unique to the
//! run, so runs against one server do not mix) and write them with increasing versions; it
//! prints writes/s, the answers by status, and the server's check. Faults in force stay.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use resync_apisim::{Client, Config};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// A running simulator; without it one is started in this process.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent writers.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Writes in all.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Entities per writer.
    #[arg(long, default_value_t = 100)]
    entities: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (_running, url) = match &args.url {
        Some(url) => (None, url.clone()),
        None => {
            let running = resync_apisim::start(Config::default()).await?;
            let url = running.url();
            (Some(running), url)
        }
    };
    let client = Client::new(url.clone())?;
    client.health().await.context("apisim is not answering")?;
    let entity_type = format!("load{}", chrono::Utc::now().timestamp_millis());
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.clients).build()?;

    let started = Instant::now();
    let per_client = args.requests / args.clients;
    let writers = (0..args.clients).map(|writer| {
        let (http, url, entities) = (http.clone(), url.clone(), args.entities);
        let entity_type = entity_type.clone();
        tokio::spawn(async move {
            let mut statuses = BTreeMap::<u16, u64>::new();
            for i in 0..per_client {
                let entity = writer * entities + i % entities;
                let version = (i / entities + 1) as i64;
                let response = http
                    .put(format!("{url}/entities/{entity_type}/{entity}"))
                    .header("X-Resync-Entity-Version", version)
                    .header("X-Resync-Event-Id", format!("{writer}-{i}"))
                    .json(&json!({"title": "Flat", "price": i}))
                    .send()
                    .await?;
                *statuses.entry(response.status().as_u16()).or_default() += 1;
            }
            Ok::<_, reqwest::Error>(statuses)
        })
    });
    let mut statuses = BTreeMap::<u16, u64>::new();
    for writer in futures::future::join_all(writers).await {
        for (status, n) in writer??.into_iter() {
            *statuses.entry(status).or_default() += n;
        }
    }
    let elapsed = started.elapsed();
    let total: u64 = statuses.values().sum();
    println!(
        "{total} writes by {} clients in {:.2} s: {:.0} writes/s; statuses {statuses:?}",
        args.clients,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    let report = client.check().await?;
    println!(
        "check: writes {} entities {} stale {} ok {}",
        report.writes,
        report.entities,
        report.stale_overwrites.len(),
        report.ok
    );
    Ok(())
}
