//! Acquire+release through resync-locks against raw `SET key token NX PX` + `DEL`, on the
//! same Redis, in the same run: throughput and p50/p99 latency of one acquire+release pair,
//! sequentially and with 16 concurrent tasks on distinct keys.
//!
//! Run: `cargo bench -p resync-locks` (needs the shared Redis, `RESYNC_REDIS_URL`).
//! The two implementations alternate in short rounds so drift in machine load hits both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use resync_locks::{LockConfig, Locker, Release};
use resync_testkit::{Service, service_unreachable, unique_name};

const ROUNDS: usize = 3;
const ROUND_TIME: Duration = Duration::from_millis(1500);
const WARMUP: Duration = Duration::from_millis(300);
const LEASE_MS: u64 = 15_000;

#[derive(Clone, Copy, PartialEq)]
enum Impl {
    Locks,
    Raw,
}

/// Latencies of every acquire+release pair, and the wall time they took.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Samples {
    fn ops_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }
}

struct Bench {
    locker: Locker,
    raw: ConnectionManager,
    prefix: String,
}

impl Bench {
    async fn connect() -> Self {
        let url = Service::Redis.url();
        let locker = Locker::connect(&url, LockConfig::default())
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Redis, e));
        let client =
            redis::Client::open(url.as_str()).unwrap_or_else(|e| service_unreachable(Service::Redis, e));
        let raw =
            ConnectionManager::new(client).await.unwrap_or_else(|e| service_unreachable(Service::Redis, e));
        Self { locker, raw, prefix: unique_name("lk-bench") }
    }

    /// One acquire+release pair on `key`.
    async fn pair(&self, which: Impl, key: &str) {
        match which {
            Impl::Locks => {
                let guard = self.locker.try_acquire(key).await.expect("redis").expect("distinct key is free");
                assert_eq!(guard.release().await.expect("release"), Release::Released);
            }
            Impl::Raw => {
                let mut conn = self.raw.clone();
                let token = uuid::Uuid::now_v7().simple().to_string();
                let set: Option<String> = redis::cmd("SET")
                    .arg(key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_MS)
                    .query_async(&mut conn)
                    .await
                    .expect("SET NX");
                assert!(set.is_some(), "distinct key is free");
                let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await.expect("DEL");
            }
        }
    }

    /// `tasks` tasks, each on its own key, doing pairs back to back for `time`.
    async fn run(self: &Arc<Self>, which: Impl, tasks: usize, time: Duration) -> Samples {
        let started = Instant::now();
        let mut handles = Vec::new();
        for task in 0..tasks {
            let bench = Arc::clone(self);
            let tag = if which == Impl::Locks { "locks" } else { "raw" };
            let key = format!("{}:{tag}:{task}", bench.prefix);
            handles.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while started.elapsed() < time {
                    let begin = Instant::now();
                    bench.pair(which, &key).await;
                    latencies.push(begin.elapsed());
                }
                latencies
            }));
        }
        let mut samples = Samples::default();
        for handle in handles {
            samples.latencies.extend(handle.await.expect("bench task"));
        }
        samples.elapsed = started.elapsed();
        samples
    }

    async fn cleanup(&self) {
        let mut conn = self.raw.clone();
        let mut del = redis::cmd("DEL");
        for task in 0..16 {
            del.arg(resync_locks::fence_key(&format!("{}:locks:{task}", self.prefix)));
        }
        let _: Result<i64, _> = del.query_async(&mut conn).await;
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

async fn scenario(bench: &Arc<Bench>, name: &str, tasks: usize) {
    bench.run(Impl::Raw, tasks, WARMUP).await;
    bench.run(Impl::Locks, tasks, WARMUP).await;
    let (mut raw, mut locks) = (Samples::default(), Samples::default());
    for _ in 0..ROUNDS {
        for (which, into) in [(Impl::Raw, &mut raw), (Impl::Locks, &mut locks)] {
            let round = bench.run(which, tasks, ROUND_TIME).await;
            into.latencies.extend(round.latencies);
            into.elapsed += round.elapsed;
        }
    }
    let (raw_ops, locks_ops) = (raw.ops_per_sec(), locks.ops_per_sec());
    let (raw_p50, raw_p99) = (raw.percentile(0.50), raw.percentile(0.99));
    let (locks_p50, locks_p99) = (locks.percentile(0.50), locks.percentile(0.99));
    println!(
        "| {name} | raw SET NX PX + DEL | {raw_ops:.0} | {} | {} | 1.00 |",
        micros(raw_p50),
        micros(raw_p99)
    );
    println!(
        "| {name} | resync-locks try_acquire + release | {locks_ops:.0} | {} | {} | {:.2} |",
        micros(locks_p50),
        micros(locks_p99),
        locks_ops / raw_ops
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let bench = Arc::new(Bench::connect().await);
        println!("| scenario | implementation | pairs/s | p50 | p99 | throughput vs raw |");
        println!("|---|---|---|---|---|---|");
        scenario(&bench, "sequential (1 task)", 1).await;
        scenario(&bench, "16 tasks, distinct keys", 16).await;
        bench.cleanup().await;
    });
}
