//! `apisim`: runs the third-party API simulator. Parses flags into a `Config` and serves;
//! everything else lives in the library.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use resync_apisim::{Config, Latency, Outage};
use tracing_subscriber::EnvFilter;

/// A stand-in third-party API for resync's tests, demo and benchmarks.
///
/// Stores what it is sent (PUT/DELETE /entities/{entity_type}/{entity_id}, with the
/// X-Resync-Entity-Version header), logs every applied write, and proves at GET /check that
/// no older version was written after a newer one. Faults set here are initial values;
/// change them at runtime with PUT /admin/faults (JSON, same names as the flags with
/// underscores, e.g. {"rate_limit_per_sec": 500}). GET /admin/stats shows counters and the
/// config in force. Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "apisim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Global rate limit, writes per second (token bucket); over it: 429 with Retry-After
    /// and Retry-After-Ms.
    #[arg(long, value_name = "PER_SEC")]
    rate_limit: Option<f64>,
    /// Token bucket size (default: one second's worth of --rate-limit).
    #[arg(long, value_name = "N", requires = "rate_limit")]
    rate_limit_burst: Option<f64>,
    /// Share (0..1) of writes answered 500 or 503 at random, without applying.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    error_rate: f64,
    /// Median added latency, ms (lognormal; needs --latency-p99-ms).
    #[arg(long, value_name = "MS", requires = "latency_p99_ms")]
    latency_p50_ms: Option<f64>,
    /// 99th percentile of added latency, ms (needs --latency-p50-ms).
    #[arg(long, value_name = "MS", requires = "latency_p50_ms")]
    latency_p99_ms: Option<f64>,
    /// Fixed added latency, ms.
    #[arg(long, value_name = "MS", conflicts_with_all = ["latency_p50_ms", "latency_p99_ms"])]
    latency_fixed_ms: Option<f64>,
    /// Share (0..1) of writes applied, then answered 504 after --applied-then-timeout-delay-ms
    /// (the client times out although the write happened).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    applied_then_timeout_rate: f64,
    /// How long an applied-then-timeout answer is held, ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    applied_then_timeout_delay_ms: u64,
    /// Share (0..1) of writes rejected with --reject-status and a JSON error (dead letters).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    reject_rate: f64,
    /// Status of rejections (4xx).
    #[arg(long, value_name = "STATUS", default_value_t = 422)]
    reject_status: u16,
    /// Outage window START_MS-END_MS after server start: every write gets 503. Repeatable.
    #[arg(long, value_name = "START_MS-END_MS", value_parser = parse_outage)]
    outage: Vec<Outage>,
    /// Enforce versions like an API with conditional writes: a write whose
    /// X-Resync-Entity-Version is not newer than the entity's newest is refused with 412.
    #[arg(long)]
    conditional_writes: bool,
    /// Seed for the RNG behind random faults (deterministic runs).
    #[arg(long)]
    seed: Option<u64>,
}

fn parse_outage(text: &str) -> Result<Outage, String> {
    let (start, end) = text.split_once('-').ok_or_else(|| format!("`{text}`: expected START_MS-END_MS"))?;
    let ms = |s: &str| s.trim().parse::<u64>().map_err(|e| format!("`{text}`: {e}"));
    Ok(Outage { start_ms: ms(start)?, end_ms: ms(end)? })
}

impl Args {
    fn config(&self) -> Config {
        let latency = match (self.latency_fixed_ms, self.latency_p50_ms, self.latency_p99_ms) {
            (Some(fixed_ms), _, _) => Some(Latency::Fixed { fixed_ms }),
            (None, Some(p50_ms), Some(p99_ms)) => Some(Latency::LogNormal { p50_ms, p99_ms }),
            _ => None,
        };
        Config {
            rate_limit_per_sec: self.rate_limit,
            rate_limit_burst: self.rate_limit_burst,
            error_rate: self.error_rate,
            latency,
            applied_then_timeout_rate: self.applied_then_timeout_rate,
            applied_then_timeout_delay_ms: self.applied_then_timeout_delay_ms,
            reject_rate: self.reject_rate,
            reject_status: self.reject_status,
            outages: self.outage.clone(),
            conditional_writes: self.conditional_writes,
            seed: self.seed,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let config = args.config();
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, ?config, "apisim listening");
    resync_apisim::serve(listener, config, async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c; stopping");
        }
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}
