//! `resync migrate` and `resync relay` as processes: health endpoints, metrics, SIGTERM, and a
//! SIGKILLed leader replaced by a standby process.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use resync_bus::{Filter, QueueSpec, RabbitMqConfig, RabbitMqTransport, Subscription, Transport};
use resync_producer::{NewEvent, Schema, emit, live_topic};
use resync_testkit::{Service, service_unreachable, unique_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    /// The shared Postgres, unless a test runs its own.
    database_url: String,
    schema: Schema,
    namespace: String,
    queue: String,
    pool: sqlx::PgPool,
    transport: Arc<dyn Transport>,
}

impl Setup {
    async fn new() -> Self {
        Self::on(Service::Postgres.url()).await
    }

    async fn on(database_url: String) -> Self {
        let schema = Schema::new(unique_name("cli").replace('-', "_")).expect("schema");
        let namespace = unique_name("cli");
        let status = resync(&schema, &namespace, &["migrate"])
            .env("RESYNC_DATABASE_URL", &database_url)
            .status()
            .expect("run resync migrate");
        assert!(status.success(), "resync migrate failed");
        let pool = sqlx::PgPool::connect(&database_url)
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
        let transport: Arc<dyn Transport> =
            match RabbitMqTransport::connect(RabbitMqConfig::new(Service::RabbitMq.url())).await {
                Ok(t) => Arc::new(t),
                Err(e) => service_unreachable(Service::RabbitMq, e),
            };
        let topic = live_topic(Some(&namespace), "listing");
        let queue = unique_name("cli-q");
        transport.declare_topic(&topic, None).await.expect("topic");
        transport.declare_queue(&QueueSpec::new(&queue)).await.expect("queue");
        transport.bind(&topic, &queue, &Filter::all()).await.expect("bind");
        Self { database_url, schema, namespace, queue, pool, transport }
    }

    async fn emit(&self, from: usize, to: usize) {
        let mut tx = self.pool.begin().await.expect("begin");
        for i in from..to {
            let event = NewEvent::new("listing.updated", i.to_string(), serde_json::json!({"i": i}));
            emit(&mut tx, &self.schema, &event).await.expect("emit");
        }
        tx.commit().await.expect("commit");
    }

    async fn cleanup(&self) {
        let _ = sqlx::query(self.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&self.pool).await;
        let _ = self.transport.delete_queue(&self.queue).await;
        let _ = self.transport.delete_topic(&live_topic(Some(&self.namespace), "listing")).await;
    }
}

fn resync(schema: &Schema, namespace: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resync"));
    command
        .args(args)
        .env("RESYNC_SCHEMA", schema.name())
        .env("RESYNC_NAMESPACE", namespace)
        .env("RESYNC_DATABASE_URL", Service::Postgres.url())
        .env("RESYNC_AMQP_URL", Service::RabbitMq.url())
        .env("RESYNC_TRANSPORT", "rabbitmq")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

pub(crate) fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// A child process killed when the test ends, also when it fails.
pub(crate) struct Process(pub(crate) Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_relay(setup: &Setup) -> (Process, SocketAddr) {
    let listen = free_port();
    let child = resync(
        &setup.schema,
        &setup.namespace,
        &["relay", "--listen", &listen.to_string(), "--poll-interval", "100ms"],
    )
    .env("RESYNC_DATABASE_URL", &setup.database_url)
    .spawn()
    .expect("start resync relay");
    (Process(child), listen)
}

/// A bare HTTP/1.0 GET: status code and body, or `None` while nothing listens.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Waits until `condition` holds. The limit only bounds a hang: under a whole suite's load the
/// SNS/SQS emulator (one Python process for every test) takes seconds per call, and a
/// redrive once needed more than 30 s to move its first message there.
pub(crate) async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    const LIMIT: Duration = Duration::from_secs(120);
    let started = tokio::time::Instant::now();
    while !condition().await {
        assert!(started.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if started.elapsed() > LIMIT / 4 {
        eprintln!("{what}: took {:?}", started.elapsed());
    }
}

async fn is_leader(addr: SocketAddr) -> bool {
    get(addr, "/metrics").await.is_some_and(|(_, body)| body.lines().any(|l| l == "resync_relay_leader 1"))
}

async fn receive(subscription: &mut dyn Subscription, count: usize) -> std::collections::BTreeSet<String> {
    let mut ids = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ids.len() < count {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {count} events arrived", ids.len());
        for d in subscription.next_batch(100, Duration::from_secs(1)).await.expect("next_batch") {
            ids.insert(d.envelope(&Default::default()).expect("envelope").entity_id);
            d.ack().await.expect("ack");
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_serves_health_and_metrics_and_stops_on_sigterm() {
    let setup = Setup::new().await;
    let (relay, listen) = start_relay(&setup);
    eventually("/readyz answers 200", || async {
        get(listen, "/readyz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert_eq!(get(listen, "/healthz").await.map(|(s, _)| s), Some(200));
    // A fresh process shows every counter, at 0, with its help text.
    let fresh = get(listen, "/metrics").await.expect("metrics").1;
    for line in [
        "resync_relay_published_total 0",
        "resync_relay_errors_total 0",
        "# HELP resync_relay_published_total Events published to the broker.",
        "# HELP resync_relay_errors_total Publish or database errors the relay retried.",
    ] {
        assert!(fresh.lines().any(|l| l == line), "no `{line}` in\n{fresh}");
    }
    setup.emit(0, 10).await;
    let mut subscription =
        setup.transport.subscribe(&setup.queue, Default::default()).await.expect("subscribe");
    assert_eq!(receive(subscription.as_mut(), 10).await.len(), 10);
    eventually("metrics count the published events", || async {
        get(listen, "/metrics")
            .await
            .is_some_and(|(_, b)| b.lines().any(|l| l == "resync_relay_published_total 10"))
    })
    .await;
    // With the outbox empty again, the gauges say so (they once kept their last busy value).
    eventually("pending and lag back at 0", || async {
        get(listen, "/metrics").await.is_some_and(|(_, b)| {
            b.lines().any(|l| l == "resync_relay_pending_events 0")
                && b.lines().any(|l| l == "resync_relay_lag_seconds 0")
        })
    })
    .await;
    let pid = relay.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let exited = tokio::task::spawn_blocking(move || {
        let mut relay = relay;
        relay.0.wait()
    })
    .await
    .expect("wait task")
    .expect("wait");
    assert!(exited.success(), "relay exits cleanly on SIGTERM: {exited}");
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_leader_process_is_replaced_by_the_standby_process() {
    let setup = Setup::new().await;
    let (first, first_addr) = start_relay(&setup);
    eventually("the first relay leads", || is_leader(first_addr)).await;
    let (second, second_addr) = start_relay(&setup);
    eventually("the second relay stands by", || async {
        get(second_addr, "/readyz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert!(!is_leader(second_addr).await, "only one leader");
    let mut subscription =
        setup.transport.subscribe(&setup.queue, Default::default()).await.expect("subscribe");

    setup.emit(0, 200).await;
    let mut first = first;
    first.0.kill().expect("SIGKILL the leader");
    first.0.wait().expect("reap");
    setup.emit(200, 400).await;
    eventually("the standby takes over", || is_leader(second_addr)).await;
    let ids = receive(subscription.as_mut(), 400).await;
    assert_eq!(ids, (0..400).map(|i| i.to_string()).collect(), "nothing is lost across the takeover");
    drop(second);
    setup.cleanup().await;
}

/// `relay` and `consume` against a schema nobody migrated exit at once, saying to run
/// `resync migrate`; against a Postgres port nothing listens on, at once too, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_consume_refuse_an_unmigrated_schema_or_an_unreachable_database() {
    let schema = Schema::new(unique_name("never").replace('-', "_")).expect("schema");
    let namespace = unique_name("never");
    let config_dir = std::env::temp_dir().join(&namespace);
    std::fs::create_dir_all(&config_dir).expect("config dir");
    let sync = "name = \"sync\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\n[sink]\nurl = \"http://127.0.0.1:9/{entity_id}\"\n";
    std::fs::write(config_dir.join("sync.toml"), sync).expect("config");
    std::fs::write(
        config_dir.join("listings.toml"),
        "name = \"listings\"\npublishes = [\"listing.updated\"]\n",
    )
    .expect("config");
    let dir = config_dir.to_string_lossy().to_string();
    let consume = ["consume", "--service", "sync", "--config-dir", &dir, "--listen", "127.0.0.1:0"];
    for args in [&["relay", "--listen", "127.0.0.1:0"][..], &consume[..]] {
        let out = resync(&schema, &namespace, args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started on an unmigrated schema");
        assert!(
            stderr.contains("is not migrated") && stderr.contains("resync migrate"),
            "{args:?}: {stderr}"
        );

        let port = free_port().port();
        let dead = format!("postgres://postgres@127.0.0.1:{port}/test");
        let out = resync(&schema, &namespace, args).env("RESYNC_DATABASE_URL", dead).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started without a database");
        let named = format!("cannot connect to Postgres at 127.0.0.1:{port}/test");
        assert!(stderr.contains(&named), "{args:?}: {stderr}");

        // Refused credentials end the process at once too, naming the server and the cause.
        let stranger = "postgres://nobody:secret@127.0.0.1:5432/test";
        let out =
            resync(&schema, &namespace, args).env("RESYNC_DATABASE_URL", stranger).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started with refused credentials");
        assert!(
            stderr.contains("at 127.0.0.1:5432/test")
                && stderr.contains("\"nobody\"")
                && !stderr.contains("secret"),
            "{args:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&config_dir);
}

/// `pg_ctl restart -m fast` under a running relay (the test's own Postgres): the relay loses its
/// connections, its leadership lock and its LISTEN; it reconnects, leads again, and publishes
/// what was committed before and after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rides_out_a_postgres_restart() {
    let postgres = resync_testkit::OwnPostgres::start();
    let setup = Setup::on(postgres.url()).await;
    let (_relay, addr) = start_relay(&setup);
    eventually("the relay leads", || is_leader(addr)).await;
    let mut subscription =
        setup.transport.subscribe(&setup.queue, Default::default()).await.expect("subscribe");
    setup.emit(0, 200).await;
    let before = receive(subscription.as_mut(), 100).await;

    let restarted_at = tokio::time::Instant::now();
    postgres.restart();
    eprintln!("postgres restarted in {:?}", restarted_at.elapsed());
    setup.emit(200, 400).await;
    // Events published twice (a batch sent but not yet marked when the connection dropped)
    // arrive twice: count distinct ones.
    let mut ids = before;
    while ids.len() < 400 {
        ids.extend(receive(subscription.as_mut(), 1).await);
    }
    eprintln!("every event was published {:?} after the restart began", restarted_at.elapsed());

    assert_eq!(ids, (0..400).map(|i| i.to_string()).collect(), "nothing is lost across the restart");
    eventually("the relay leads again", || is_leader(addr)).await;
    setup.cleanup().await;
}
