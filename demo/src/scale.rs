//! `resync-demo scale-test`: many `resync consume` processes on one machine against a rate-limited
//! third party, during a full resync.
//!
//! N consumer processes (through one PgBouncer in transaction mode, so N may exceed Postgres's
//! `max_connections`) share the sink's rate limit in Redis; the API simulator refuses writes over
//! R per second with 429. A resync job publishes M entities; mid-run all but a few consumers get
//! SIGTERM; the limit may change at given times. The report gives what the issue asks to see:
//! completion against M/R, achieved against allowed rate, the 429 share, peak RSS per consumer
//! process, how fast throughput followed each limit change, and lost and stale counts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use resync_apisim::{Config as ApiConfig, FaultsPatch, Stats};
use resync_migrations::Schema;
use resync_testkit::pgbouncer::PgBouncer;
use tracing::info;

use crate::run::{DemoError, Stage, cleanup, provision, run_resync_job, step, write_listings_config};
use crate::scenario::{SourceTable, compare};

/// Postgres connections the consumers share through PgBouncer (the server allows 100; the job
/// and this process use some directly).
const SERVER_CONNECTIONS: u32 = 30;

/// The rate limit of the third party changes to `per_second`, `after` the job started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitChange {
    pub after: Duration,
    pub per_second: f64,
}

impl FromStr for LimitChange {
    type Err = String;

    /// `20s=500`: 20 seconds after the job starts, the limit becomes 500 writes/s.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || format!("`{s}`: expected <delay>=<writes per second>, e.g. 20s=500");
        let (after, rate) = s.split_once('=').ok_or_else(expected)?;
        let after = humantime::parse_duration(after.trim()).map_err(|e| format!("{}: {e}", expected()))?;
        let per_second: f64 = rate.trim().parse().map_err(|_| expected())?;
        if per_second.is_finite() && per_second > 0.0 {
            Ok(Self { after, per_second })
        } else {
            Err(expected())
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// The `resync` binary the consumer processes run.
    pub resync_bin: PathBuf,
    pub database_url: String,
    pub redis_url: String,
    pub consumers: usize,
    pub entities: usize,
    /// The third party's limit at the start, writes per second (also the sink's configured
    /// shared rate).
    pub rate: f64,
    /// Consumers left after the scale-down (the others get SIGTERM).
    pub scale_down_to: usize,
    /// Share of the entities applied when the scale-down happens (none: no scale-down).
    pub scale_down_at: Option<f64>,
    pub limit_changes: Vec<LimitChange>,
    /// Tokio worker threads per consumer process (`TOKIO_WORKER_THREADS`).
    pub worker_threads: usize,
    /// Longest wait for the job to complete.
    pub deadline: Duration,
    pub keep: bool,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        Self {
            resync_bin: PathBuf::from("resync"),
            database_url: "postgres://postgres@127.0.0.1:5432/test".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            consumers: 150,
            entities: 100_000,
            rate: 2_000.0,
            scale_down_to: 6,
            scale_down_at: Some(0.5),
            limit_changes: Vec::new(),
            worker_threads: 1,
            deadline: Duration::from_secs(600),
            keep: false,
        }
    }
}

/// One second of the run as the third party saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Second {
    /// Seconds since the job started (end of this second).
    pub at: f64,
    pub requests: u64,
    pub accepted: u64,
    pub refused_429: u64,
    /// The third party's limit in force.
    pub limit: f64,
}

#[derive(Debug, Clone, Default)]
pub struct ScaleReport {
    pub consumers: usize,
    pub entities: usize,
    pub rate: f64,
    /// From the job's start until resync saw every entity applied at the sink.
    pub completion: Duration,
    pub requests: u64,
    pub accepted: u64,
    pub refused_429: u64,
    /// Peak resident set (VmHWM) of each consumer process, bytes.
    pub peak_rss: Vec<u64>,
    /// When the scale-down happened (seconds after the job started) and to how many.
    pub scaled_down: Option<(f64, usize)>,
    /// Per limit change: the change, and how long until throughput followed it.
    pub follow: Vec<(LimitChange, Option<f64>)>,
    pub timeline: Vec<Second>,
    /// Entities whose state at the third party is not the database's.
    pub lost: usize,
    /// Writes that replaced a newer version with an older one.
    pub stale: usize,
}

impl ScaleReport {
    /// The writes the limit allowed over the completion time, per second on average.
    pub fn allowed_rate(&self) -> f64 {
        let seconds: Vec<&Second> =
            self.timeline.iter().filter(|s| s.at <= self.completion.as_secs_f64() + 0.5).collect();
        if seconds.is_empty() {
            return self.rate;
        }
        seconds.iter().map(|s| s.limit).sum::<f64>() / seconds.len() as f64
    }

    pub fn achieved_rate(&self) -> f64 {
        self.accepted as f64 / self.completion.as_secs_f64().max(f64::EPSILON)
    }

    pub fn share_429(&self) -> f64 {
        self.refused_429 as f64 / self.requests.max(1) as f64
    }

    pub fn passed(&self) -> bool {
        self.lost == 0 && self.stale == 0
    }
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ideal = self.entities as f64 / self.rate;
        let completion = self.completion.as_secs_f64();
        writeln!(
            f,
            "resync scale test: {} consumer processes, {} entities, third party limited to {:.0} writes/s",
            self.consumers, self.entities, self.rate
        )?;
        writeln!(
            f,
            "  completion              {completion:.1} s (M/R = {ideal:.1} s: {:.2}x)",
            completion / ideal
        )?;
        writeln!(
            f,
            "  API rate                {:.0}/s achieved of {:.0}/s allowed ({:.0}%)",
            self.achieved_rate(),
            self.allowed_rate(),
            100.0 * self.achieved_rate() / self.allowed_rate()
        )?;
        writeln!(
            f,
            "  answered 429            {} of {} requests ({:.2}%)",
            self.refused_429,
            self.requests,
            100.0 * self.share_429()
        )?;
        let mut rss = self.peak_rss.clone();
        rss.sort_unstable();
        if let (Some(max), Some(median)) = (rss.last(), rss.get(rss.len() / 2)) {
            writeln!(
                f,
                "  peak RSS per consumer   max {:.1} MB, median {:.1} MB ({} processes)",
                megabytes(*max),
                megabytes(*median),
                rss.len()
            )?;
        }
        if let Some((at, to)) = self.scaled_down {
            writeln!(f, "  scaled down to {to:<8} at {at:.1} s (SIGTERM to the others)")?;
        }
        for (change, followed) in &self.follow {
            let followed = followed.map_or("did not follow".to_string(), |s| format!("followed in {s:.0} s"));
            writeln!(
                f,
                "  limit -> {:<6.0}         at {:.0} s: {followed}",
                change.per_second,
                change.after.as_secs_f64()
            )?;
        }
        writeln!(f, "  lost                    {}", self.lost)?;
        writeln!(f, "  stale overwrites        {}", self.stale)?;
        write!(f, "  accepted writes per second:")?;
        for (i, second) in self.timeline.iter().enumerate() {
            if i % 10 == 0 {
                write!(f, "\n    {:>4.0}s", second.at - 1.0)?;
            }
            write!(f, " {:>5}", second.accepted)?;
        }
        Ok(())
    }
}

/// A running `resync consume` process.
struct ConsumerProcess {
    child: Child,
    port: u16,
    peak_rss: u64,
    stopping: bool,
}

impl ConsumerProcess {
    /// VmHWM (the peak resident set) from /proc, in bytes.
    fn sample_peak_rss(&mut self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        if let Some(kb) = kb {
            self.peak_rss = self.peak_rss.max(kb * 1024);
        }
    }

    fn terminate(&mut self) {
        self.stopping = true;
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }
}

impl Drop for ConsumerProcess {
    /// A consumer left running when the run fails is killed with it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the scale test and returns its report.
pub async fn run(options: &ScaleOptions) -> Result<ScaleReport, DemoError> {
    let faults = ApiConfig { rate_limit_per_sec: Some(options.rate), ..ApiConfig::default() };
    let api = resync_apisim::start(faults).await.map_err(step("starting the API simulator"))?;
    let client = api.client().map_err(step("API simulator client"))?;
    let api_url = api.url();
    let configs = |dir: &Path, schema: &Schema| write_configs(dir, &api_url, schema, options.rate);
    let stage = provision("scale", "rabbitmq", &options.database_url, &configs).await?;
    let result = drive(options, &stage, &client).await;
    if !options.keep {
        cleanup(&stage).await;
    }
    let _ = api.shutdown().await;
    result
}

fn write_configs(dir: &Path, api_url: &str, schema: &Schema, rate: f64) -> std::io::Result<()> {
    write_listings_config(dir, schema)?;
    std::fs::write(
        dir.join("sync.toml"),
        format!(
            "name = \"sync\"\n\n[[subscriptions]]\ntypes = [\"listing.*\"]\nstreams = [\"live\", \"resync\"]\n\
             max_receive_count = 20\n\n[sink]\nurl = \"{api_url}/entities/listing/{{entity_id}}\"\ntimeout = \"5s\"\n\n\
             [sink.rate_limit]\nper_second = {rate}\nadaptive = true\n\n\
             [consumer]\nconcurrency = 16\nprefetch = 32\nbatch_size = 16\n"
        ),
    )
}

async fn drive(
    options: &ScaleOptions,
    stage: &Stage,
    client: &resync_apisim::Client,
) -> Result<ScaleReport, DemoError> {
    let source =
        SourceTable::create(&stage.pool, &stage.schema).await.map_err(step("creating the source table"))?;
    insert_rows(stage, options.entities).await?;
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS, (options.consumers * 3 + 50) as u32).await;
    info!(consumers = options.consumers, "starting consumer processes");
    let mut consumers = Vec::with_capacity(options.consumers);
    let mut port = 20_000;
    for index in 0..options.consumers {
        port = free_port(port)?;
        consumers.push(spawn_consumer(options, stage, &bouncer, index, port)?);
    }
    wait_until_ready(&mut consumers, stage).await?;
    info!("every consumer is ready; starting the resync job");

    let started = Instant::now();
    let catalog = fare_config::load_dir(&stage.config_dir).map_err(step("loading the service configs"))?;
    let job = run_resync_job(stage, &catalog);
    tokio::pin!(job);
    let mut report = ScaleReport {
        consumers: options.consumers,
        entities: options.entities,
        rate: options.rate,
        ..ScaleReport::default()
    };
    let mut limit = options.rate;
    let mut pending_changes: Vec<LimitChange> = options.limit_changes.clone();
    pending_changes.sort_by_key(|c| c.after);
    pending_changes.reverse();
    let mut last = client.stats().await.map_err(step("reading API stats"))?;
    let base = last.clone();
    let mut next_sample = started + Duration::from_secs(1);
    let completion = loop {
        tokio::select! {
            done = &mut job => {
                done?;
                break started.elapsed();
            }
            _ = tokio::time::sleep_until(next_sample.into()) => {}
        }
        next_sample += Duration::from_secs(1);
        let stats = client.stats().await.map_err(step("reading API stats"))?;
        report.timeline.push(second(started, &last, &stats, limit));
        last = stats;
        for consumer in consumers.iter_mut().filter(|c| !c.stopping) {
            consumer.sample_peak_rss();
        }
        while pending_changes.last().is_some_and(|c| started.elapsed() >= c.after) {
            let change = pending_changes.pop().unwrap_or_else(|| unreachable!("checked just above"));
            let patch =
                FaultsPatch { rate_limit_per_sec: Some(Some(change.per_second)), ..FaultsPatch::default() };
            client.set_faults(&patch).await.map_err(step("changing the API's rate limit"))?;
            info!(per_second = change.per_second, "third-party rate limit changed");
            limit = change.per_second;
        }
        let applied_share = (last.applied - base.applied) as f64 / options.entities as f64;
        if report.scaled_down.is_none()
            && options.scale_down_at.is_some_and(|at| applied_share >= at)
            && options.scale_down_to < consumers.len()
        {
            for consumer in consumers.iter_mut().skip(options.scale_down_to) {
                consumer.terminate();
            }
            report.scaled_down = Some((started.elapsed().as_secs_f64(), options.scale_down_to));
            info!(left = options.scale_down_to, "scaled down with SIGTERM");
        }
        if started.elapsed() > options.deadline {
            stop_all(&mut consumers).await;
            return Err(DemoError::Step {
                what: "waiting for the resync job",
                detail: format!("not completed within {:?}", options.deadline),
            });
        }
    };
    report.completion = completion;
    let stats = client.stats().await.map_err(step("reading API stats"))?;
    report.timeline.push(second(started, &last, &stats, limit));
    report.requests = stats.requests - base.requests;
    report.accepted = stats.applied - base.applied;
    report.refused_429 = stats.status(429) - base.status(429);
    report.follow = follow_times(&options.limit_changes, &report.timeline);

    for consumer in consumers.iter_mut().filter(|c| !c.stopping) {
        consumer.sample_peak_rss();
    }
    stop_all(&mut consumers).await;
    report.peak_rss = consumers.iter().map(|c| c.peak_rss).collect();
    let truth = source.read_all(&stage.pool).await.map_err(step("reading the source table"))?;
    let state = client.state().await.map_err(step("reading the API's state"))?;
    report.lost = compare("listing", &truth, &state).len();
    report.stale =
        client.check().await.map_err(step("reading the API's write check"))?.stale_overwrites.len();
    drop(bouncer);
    Ok(report)
}

fn second(started: Instant, before: &Stats, now: &Stats, limit: f64) -> Second {
    Second {
        at: started.elapsed().as_secs_f64(),
        requests: now.requests - before.requests,
        accepted: now.applied - before.applied,
        refused_429: now.status(429) - before.status(429),
        limit,
    }
}

/// Seconds from each change until the requests (3-s average) are within 15% of the new limit
/// and the accepted writes at least 85% of it; `None` if that did not happen before the next
/// change or the end.
pub fn follow_times(changes: &[LimitChange], timeline: &[Second]) -> Vec<(LimitChange, Option<f64>)> {
    let mut changes = changes.to_vec();
    changes.sort_by_key(|c| c.after);
    let average = |window: &[Second], f: fn(&Second) -> u64| {
        window.iter().map(f).sum::<u64>() as f64 / window.len().max(1) as f64
    };
    changes
        .iter()
        .enumerate()
        .map(|(i, change)| {
            let from = change.after.as_secs_f64();
            let until = changes.get(i + 1).map_or(f64::INFINITY, |next| next.after.as_secs_f64());
            let limit = change.per_second;
            let followed = (2..timeline.len()).find_map(|end| {
                let window = &timeline[end - 2..=end];
                let at = timeline[end].at;
                let settled = window[0].at - 1.0 >= from && at <= until;
                let requests = average(window, |s| s.requests);
                let accepted = average(window, |s| s.accepted);
                (settled && (requests - limit).abs() <= 0.15 * limit && accepted >= 0.85 * limit)
                    .then_some(at - from)
            });
            (*change, followed)
        })
        .collect()
}

/// M rows at version 1, in one statement.
async fn insert_rows(stage: &Stage, entities: usize) -> Result<(), DemoError> {
    sqlx::query(stage.schema.sql(
        "INSERT INTO {schema}.listings (id, version, deleted, data) \
         SELECT 'L' || lpad(i::text, 7, '0'), 1, false, jsonb_build_object('title', 'listing ' || i, 'price', i) \
         FROM generate_series(1, $1) AS i",
    ))
    .bind(entities as i64)
    .execute(&stage.pool)
    .await
    .map_err(step("writing the source rows"))?;
    Ok(())
}

/// A port for the consumer's /readyz and /metrics, free now and below the kernel's ephemeral
/// range (32768 and up by default), so no outgoing connection of another process takes it
/// before the consumer binds it.
fn free_port(after: u16) -> Result<u16, DemoError> {
    (after + 1..32_768).find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()).ok_or_else(
        || DemoError::Step { what: "finding a free port", detail: format!("none in {after}..32768") },
    )
}

fn spawn_consumer(
    options: &ScaleOptions,
    stage: &Stage,
    bouncer: &PgBouncer,
    index: usize,
    port: u16,
) -> Result<ConsumerProcess, DemoError> {
    let log = std::fs::File::create(stage.config_dir.join(format!("consumer-{index}.log")))
        .map_err(step("creating a consumer log"))?;
    let child = Command::new(&options.resync_bin)
        .args(["consume", "--service", "sync", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--shutdown-grace", "10s", "--autoscale-interval", "5s"])
        .env("RESYNC_CONFIG_DIR", &stage.config_dir)
        .env("RESYNC_TRANSPORT", "rabbitmq")
        .env("RESYNC_SCHEMA", stage.schema.name())
        .env("RESYNC_NAMESPACE", &stage.namespace)
        .env("RESYNC_DATABASE_URL", bouncer.url())
        .env("RESYNC_DB_POOLING", "transaction")
        .env("RESYNC_DB_POOL_SIZE", "2")
        .env("RESYNC_REDIS_URL", &options.redis_url)
        .env("TOKIO_WORKER_THREADS", options.worker_threads.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(step("starting `resync consume`"))?;
    Ok(ConsumerProcess { child, port, peak_rss: 0, stopping: false })
}

/// Waits until every consumer answers /readyz with 200; fails with the log of one that exited.
async fn wait_until_ready(consumers: &mut [ConsumerProcess], stage: &Stage) -> Result<(), DemoError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(step("building an HTTP client"))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    for (index, consumer) in consumers.iter_mut().enumerate() {
        let url = format!("http://127.0.0.1:{}/readyz", consumer.port);
        loop {
            if let Ok(Some(status)) = consumer.child.try_wait() {
                let log = std::fs::read_to_string(stage.config_dir.join(format!("consumer-{index}.log")))
                    .unwrap_or_default();
                return Err(DemoError::Step {
                    what: "starting the consumers",
                    detail: format!("consumer {index} exited ({status}); its log:\n{log}"),
                });
            }
            if http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if Instant::now() > deadline {
                return Err(DemoError::Step {
                    what: "starting the consumers",
                    detail: format!("consumer {index} was not ready within 300 s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// SIGTERM to every consumer still running, then waits for all of them to exit.
async fn stop_all(consumers: &mut [ConsumerProcess]) {
    for consumer in consumers.iter_mut().filter(|c| !c.stopping) {
        consumer.terminate();
    }
    for consumer in consumers.iter_mut() {
        while matches!(consumer.child.try_wait(), Ok(None)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_changes_parse_and_explain_mistakes() {
        assert_eq!(
            "20s=500".parse::<LimitChange>(),
            Ok(LimitChange { after: Duration::from_secs(20), per_second: 500.0 })
        );
        for bad in ["20s", "x=500", "20s=0", "20s=fast"] {
            let err = bad.parse::<LimitChange>().unwrap_err();
            assert!(err.contains("e.g. 20s=500"), "{bad}: {err}");
        }
    }

    fn timeline(rates: &[(u64, u64)], limit_at: impl Fn(usize) -> f64) -> Vec<Second> {
        rates
            .iter()
            .enumerate()
            .map(|(i, &(requests, accepted))| Second {
                at: (i + 1) as f64,
                requests,
                accepted,
                refused_429: requests - accepted,
                limit: limit_at(i),
            })
            .collect()
    }

    #[test]
    fn throughput_follows_a_change_once_three_seconds_sit_at_the_new_limit() {
        // 2000/s, the limit drops to 500 at 3 s: requests take until 7 s to come down.
        let mut rates = vec![(2000, 2000); 3];
        rates.extend([(2000, 500), (1400, 500), (980, 500), (600, 500), (520, 500), (500, 500), (510, 500)]);
        let seconds = timeline(&rates, |i| if i < 3 { 2000.0 } else { 500.0 });
        let change = LimitChange { after: Duration::from_secs(3), per_second: 500.0 };
        let followed = follow_times(&[change], &seconds);
        // The window of seconds 7, 8, 9 (600, 520, 500 requests: 540 average) is the first within 15%.
        assert_eq!(followed, vec![(change, Some(6.0))]);
    }

    #[test]
    fn a_change_never_reached_before_the_next_one_is_reported_as_not_followed() {
        let seconds = timeline(&[(2000, 500); 10], |_| 500.0);
        let first = LimitChange { after: Duration::from_secs(1), per_second: 500.0 };
        let second = LimitChange { after: Duration::from_secs(5), per_second: 2000.0 };
        let followed = follow_times(&[first, second], &seconds);
        assert_eq!(followed, vec![(first, None), (second, None)]);
    }
}
