//! Mutual exclusion under contention from several processes.
//!
//! The test re-runs this binary as worker processes (selected by an env var). Each holder,
//! while holding, increments a per-key occupancy counter in Redis and asserts it saw 1, and
//! swaps its fencing token into a per-key "last fence" (plain `SET .. GET`, no Lua) and
//! asserts the previous one was smaller. Any overlap or out-of-order token fails a worker.

use std::time::Duration;

use rand::Rng;
use resync_locks::redis_conn::RedisConnection;
use resync_locks::{LockConfig, Locker, Release};
use resync_testkit::unique_name;
use tokio::task::JoinSet;

use crate::support::{eventually, expect_success, locker, raw, spawn_self, test_name, within};

const PROCESSES: usize = 4;
const TASKS_PER_PROCESS: usize = 50;
const KEYS: usize = 20;
const ROUNDS: usize = 3;
/// Set in worker processes: the key prefix the coordinator chose.
const WORKER_ENV: &str = "RESYNC_LOCKS_CONTENTION_PREFIX";
const HANG: Duration = Duration::from_secs(120);

fn config() -> LockConfig {
    LockConfig {
        lease: Duration::from_secs(10),
        renew_every: Duration::from_secs(3),
        op_timeout: Duration::from_secs(3),
        // Generous: the point is that every task gets the lock before giving up.
        acquire_timeout: Duration::from_secs(60),
        retry_min: Duration::from_millis(2),
        retry_max: Duration::from_millis(50),
        fence_ttl: Duration::from_secs(600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_across_four_processes() {
    match std::env::var(WORKER_ENV) {
        Ok(prefix) => run_worker(&prefix).await,
        Err(_) => coordinate().await,
    }
}

async fn coordinate() {
    let prefix = unique_name("lk");
    let mut conn = raw().await;
    let name = test_name(module_path!(), "mutual_exclusion_across_four_processes");
    let workers: Vec<_> =
        (0..PROCESSES).map(|_| spawn_self(&name, &[(WORKER_ENV, prefix.as_str())])).collect();

    // Release all workers at once so their tasks really contend.
    eventually(HANG, "all workers ready", || {
        let (mut conn, ready) = (conn.clone(), format!("{prefix}:ready"));
        async move { counter(&mut conn, &ready).await == PROCESSES as i64 }
    })
    .await;
    let _: () =
        redis::cmd("SET").arg(format!("{prefix}:go")).arg(1).query_async(&mut conn).await.expect("SET go");
    for worker in workers {
        within(HANG, "contention worker", expect_success(worker, "contention worker")).await;
    }

    let done = counter(&mut conn, &format!("{prefix}:done")).await;
    assert_eq!(done, (PROCESSES * TASKS_PER_PROCESS * ROUNDS) as i64, "every task acquired every round");
    for key in 0..KEYS {
        let occupancy = counter(&mut conn, &format!("{prefix}:key{key}:occupancy")).await;
        assert_eq!(occupancy, 0, "key{key} left occupied");
    }
    cleanup(&mut conn, &prefix).await;
}

async fn run_worker(prefix: &str) {
    let locker = locker(config()).await;
    let mut conn = raw().await;
    let _: i64 =
        redis::cmd("INCR").arg(format!("{prefix}:ready")).query_async(&mut conn).await.expect("INCR ready");
    eventually(HANG, "coordinator says go", || {
        let (mut conn, go) = (conn.clone(), format!("{prefix}:go"));
        async move { counter(&mut conn, &go).await == 1 }
    })
    .await;

    let mut tasks = JoinSet::new();
    for task in 0..TASKS_PER_PROCESS {
        let key = format!("{prefix}:key{}", task % KEYS);
        let (locker, conn, prefix) = (locker.clone(), conn.clone(), prefix.to_owned());
        tasks.spawn(async move {
            for _ in 0..ROUNDS {
                hold_and_check(&locker, conn.clone(), &key).await;
                let _: i64 = redis::cmd("INCR")
                    .arg(format!("{prefix}:done"))
                    .query_async(&mut conn.clone())
                    .await
                    .expect("INCR done");
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a contending task failed");
    }
}

async fn hold_and_check(locker: &Locker, mut conn: RedisConnection, key: &str) {
    let guard = locker.acquire(key).await.unwrap_or_else(|e| panic!("not acquired in time: {e}"));

    let occupancy: i64 =
        redis::cmd("INCR").arg(format!("{key}:occupancy")).query_async(&mut conn).await.expect("INCR");
    assert_eq!(occupancy, 1, "{key} held by {occupancy} holders at once");
    let previous: Option<u64> = redis::cmd("SET")
        .arg(format!("{key}:last-fence"))
        .arg(guard.fence())
        .arg("GET")
        .query_async(&mut conn)
        .await
        .expect("SET GET");
    assert!(
        previous.is_none_or(|previous| previous < guard.fence()),
        "{key}: fence {} issued after {previous:?}",
        guard.fence()
    );
    // The work: a short random pause widens the window in which an overlap would show.
    let work = Duration::from_micros(rand::rng().random_range(0..3000));
    tokio::time::sleep(work).await;
    guard.ensure_held().expect("still held when committing");
    let _: i64 =
        redis::cmd("DECR").arg(format!("{key}:occupancy")).query_async(&mut conn).await.expect("DECR");

    assert_eq!(guard.release().await.expect("release"), Release::Released);
}

async fn counter(conn: &mut RedisConnection, key: &str) -> i64 {
    let value: Option<i64> = redis::cmd("GET").arg(key).query_async(conn).await.expect("GET");
    value.unwrap_or(0)
}

async fn cleanup(conn: &mut RedisConnection, prefix: &str) {
    let mut del = redis::cmd("DEL");
    del.arg(format!("{prefix}:ready")).arg(format!("{prefix}:go")).arg(format!("{prefix}:done"));
    for key in 0..KEYS {
        for suffix in ["occupancy", "last-fence", "fence"] {
            del.arg(format!("{prefix}:key{key}:{suffix}"));
        }
    }
    let _: i64 = del.query_async(conn).await.expect("DEL");
}
