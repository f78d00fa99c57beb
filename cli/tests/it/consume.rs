//! `resync consume` end to end: several consumer processes on a real broker, Redis and
//! Postgres, applying shuffled, duplicated histories to the API simulator with faults on; the
//! simulator's final state must equal the source table and its write log must show no stale
//! overwrite that survived. Also with a consumer SIGKILLed mid-stream and with consumers frozen
//! (SIGSTOP) past their lock lease mid-call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fare_config::Topology;
use resync_apisim::{Config as ApiConfig, Latency};
use resync_bus::{Destination, Envelope, OutgoingMessage, Routing, Stream, Transport, TransportConfig, attr};
use resync_demo::scenario::{Expected, SourceTable, compare, shuffled_history};
use resync_migrations::Schema;
use resync_testkit::{Service, service_unreachable, unique_name};

use crate::relay::{Process, eventually, free_port, get};

/// One end-to-end world: a namespace of queues, a schema, a source table, an API simulator.
struct World {
    kind: &'static str,
    namespace: String,
    schema: Schema,
    pool: sqlx::PgPool,
    transport: Arc<dyn Transport>,
    topology: Topology,
    config_dir: PathBuf,
    api: resync_apisim::Running,
    client: resync_apisim::Client,
    source: SourceTable,
    truth: BTreeMap<String, Expected>,
    /// The Redis consumers lock with: the shared one unless a test runs its own.
    redis_url: String,
    /// The Postgres of the source table and resync's tables: the shared one unless a test runs
    /// its own.
    database_url: String,
    /// The broker address(es) the processes get: the shared RabbitMQ unless a test proxies it.
    amqp_url: String,
}

impl World {
    async fn new(kind: &'static str, faults: ApiConfig) -> Self {
        Self::with_sync(kind, faults, 20, "").await
    }

    /// A world whose `sync` queues dead-letter after `max_receive_count` deliveries, with
    /// `sink_extra` (TOML tables such as `[sink.circuit]`) appended to its config.
    async fn with_sync(
        kind: &'static str,
        faults: ApiConfig,
        max_receive_count: u32,
        sink_extra: &str,
    ) -> Self {
        Self::build(kind, faults, max_receive_count, sink_extra, Service::Postgres.url()).await
    }

    /// A world on the Postgres at `database_url` (a test's own server).
    async fn on_database(kind: &'static str, faults: ApiConfig, database_url: String) -> Self {
        Self::build(kind, faults, 20, "", database_url).await
    }

    async fn build(
        kind: &'static str,
        faults: ApiConfig,
        max_receive_count: u32,
        sink_extra: &str,
        database_url: String,
    ) -> Self {
        let namespace = unique_name("e2e");
        let schema = Schema::new(namespace.replace('-', "_")).expect("schema");
        let api = resync_apisim::start(faults).await.expect("start apisim");
        let client = api.client().expect("apisim client");
        let config_dir = std::env::temp_dir().join(&namespace);
        std::fs::create_dir_all(&config_dir).expect("config dir");
        let listings = format!(
            "name = \"listings\"\npublishes = [\"listing.created\", \"listing.updated\", \"listing.deleted\"]\n\
             [[sources]]\nentity = \"listing\"\ntable = \"{}.listings\"\ndata_column = \"data\"\n\
             deleted_column = \"deleted\"\nversion_column = \"version\"\n",
            schema.name()
        );
        std::fs::write(config_dir.join("listings.toml"), listings).expect("write config");
        std::fs::write(
            config_dir.join("sync.toml"),
            format!(
                "name = \"sync\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nmax_receive_count = {max_receive_count}\n\
                 [sink]\nurl = \"{}/entities/listing/{{entity_id}}\"\ntimeout = \"2s\"\n\
                 [consumer]\nconcurrency = 16\nprefetch = 16\nbatch_size = 16\n{sink_extra}",
                api.url()
            ),
        )
        .expect("write config");
        let catalog = fare_config::load_dir(&config_dir).expect("valid config");
        let service = match kind {
            "rabbitmq" => Service::RabbitMq,
            _ => Service::SnsSqs,
        };
        let transport = match TransportConfig::named(kind).expect("transport").connect().await {
            Ok(transport) => transport,
            Err(err) => service_unreachable(service, err),
        };
        let topology = Topology::desired(&catalog, Some(&namespace));
        fare_config::apply(transport.as_ref(), &topology).await.expect("fare apply");
        if let Err(err) = resync_migrations::migrate(&database_url, &schema).await {
            service_unreachable(Service::Postgres, err);
        }
        let pool = sqlx::PgPool::connect(&database_url)
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
        let source = SourceTable::create(&pool, &schema).await.expect("source table");
        Self {
            kind,
            namespace,
            schema,
            pool,
            transport,
            topology,
            config_dir,
            api,
            client,
            source,
            truth: BTreeMap::new(),
            redis_url: Service::Redis.url(),
            database_url,
            amqp_url: Service::RabbitMq.url(),
        }
    }

    /// Declares one more subscriber of listings with a sink of its own, at the simulator's
    /// `entity_type` path (so its writes are told apart from `sync`'s), and provisions it.
    async fn add_sink_service(&mut self, name: &str, entity_type: &str) {
        let config = format!(
            "name = \"{name}\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\n\
             [sink]\nurl = \"{}/entities/{entity_type}/{{entity_id}}\"\ntimeout = \"2s\"\n",
            self.api.url()
        );
        std::fs::write(self.config_dir.join(format!("{name}.toml")), config).expect("write config");
        let catalog = fare_config::load_dir(&self.config_dir).expect("valid config");
        self.topology = Topology::desired(&catalog, Some(&self.namespace));
        fare_config::apply(self.transport.as_ref(), &self.topology).await.expect("fare apply");
    }

    /// Sends `sync`'s sink calls through `proxy` (for consumers started afterwards).
    fn route_sink_through(&self, proxy: &resync_testkit::proxy::TcpProxy) {
        let path = self.config_dir.join("sync.toml");
        let config = std::fs::read_to_string(&path).expect("read config");
        let routed = config.replace(&self.api.url(), &proxy.url(&self.api.url()));
        assert_ne!(routed, config, "the sink's URL names the simulator");
        std::fs::write(&path, routed).expect("write config");
    }

    /// Writes the truth to the source table and publishes the history to the live topic.
    async fn publish(&mut self, events: &[Envelope], truth: BTreeMap<String, Expected>) {
        self.seed(truth).await;
        self.publish_events(events).await;
    }

    /// Publishes events to the live topic (the truth is written already).
    async fn publish_events(&self, events: &[Envelope]) {
        let topic = Destination::Topic(resync_bus::naming::topic_name(
            Some(&self.namespace),
            "listing",
            Stream::Live,
        ));
        for chunk in events.chunks(200) {
            let messages = chunk.iter().map(OutgoingMessage::from_envelope).collect();
            self.transport.publish_batch(&topic, messages).await.expect("publish");
        }
    }

    /// Seeds `truth`, publishes the events of the first third of its entities and starts
    /// `consumers` consumers, until half of those entities got a write; returns the consumers
    /// and the other two thirds' events, to publish once the fault under test has begun: work
    /// is left for the fault to meet whatever the machine's speed.
    async fn start_before_a_fault(
        &mut self,
        events: Vec<Envelope>,
        truth: BTreeMap<String, Expected>,
        consumers: usize,
    ) -> (Vec<Process>, Vec<Envelope>) {
        let early: std::collections::BTreeSet<String> = truth.keys().take(truth.len() / 3).cloned().collect();
        let (before, after): (Vec<Envelope>, Vec<Envelope>) =
            events.into_iter().partition(|event| early.contains(&event.entity_id));
        self.seed(truth).await;
        self.publish_events(&before).await;
        let processes: Vec<Process> = (0..consumers).map(|_| self.consumer("15s")).collect();
        resync_testkit::poll_some(Duration::from_secs(120), "writes flowing before the fault", || async {
            (self.applied_writes().await >= early.len() as u64 / 2).then_some(())
        })
        .await;
        (processes, after)
    }

    /// Writes the truth to the source table: what the third party must end up holding.
    async fn seed(&mut self, truth: BTreeMap<String, Expected>) {
        self.source.insert_all(&self.pool, &truth).await.expect("source rows");
        self.truth = truth;
    }

    fn consumer(&self, lock_lease: &str) -> Process {
        self.consumer_listening(lock_lease, "127.0.0.1:0".parse().expect("addr"))
    }

    /// `resync` with this world's settings in its environment.
    fn resync(&self) -> Command {
        let mut command =
            resync_command(&self.config_dir, self.kind, &self.schema, &self.namespace, &self.redis_url);
        command.env("RESYNC_DATABASE_URL", &self.database_url).env("RESYNC_AMQP_URL", &self.amqp_url);
        command
    }

    fn consumer_listening(&self, lock_lease: &str, listen: std::net::SocketAddr) -> Process {
        self.consumer_of("sync", lock_lease, listen)
    }

    /// A consumer of `service` (one of this world's configs).
    fn consumer_of(&self, service: &str, lock_lease: &str, listen: std::net::SocketAddr) -> Process {
        let log = std::fs::File::create(self.config_dir.join(format!("{}.log", unique_name("consumer"))))
            .expect("consumer log");
        let child = self
            .resync()
            .args([
                "consume",
                "--service",
                service,
                "--listen",
                &listen.to_string(),
                "--lock-lease",
                lock_lease,
            ])
            .args(["--shutdown-grace", "5s", "--db-pool-size", "3", "--autoscale-interval", "200ms"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start resync consume");
        Process(child)
    }

    /// Waits until the simulator equals the source table and the queue is drained.
    /// Fails when the two still differ and the simulator applied no write for `stall`: a lost
    /// or stuck event stops progress, a slow machine or emulator only slows it.
    async fn wait_until_equal(&self, stall: Duration) {
        let mut last_progress = (tokio::time::Instant::now(), self.applied_writes().await);
        let queue = resync_bus::naming::queue_name(Some(&self.namespace), "sync", Stream::Live);
        loop {
            let state = self.client.state().await.expect("apisim state");
            // The table read back from Postgres, not the test's own copy of what it wrote.
            let table = self.source.read_all(&self.pool).await.expect("read the source table");
            assert_eq!(table, self.truth, "the source table holds what the test wrote");
            let mismatches = compare("listing", &table, &state);
            let depth = self.transport.queue_depth(&queue).await.expect("queue depth");
            if mismatches.is_empty() && depth.ready == 0 && depth.in_flight == 0 {
                return;
            }
            let applied = self.applied_writes().await;
            if applied != last_progress.1 {
                last_progress = (tokio::time::Instant::now(), applied);
            } else if last_progress.0.elapsed() > stall {
                let dlq = self.transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await;
                panic!(
                    "not converged, no write for {stall:?}: {} entities differ (first: {:?}), queue {depth:?}, \
                     dead-letter queue {dlq:?}\n{}",
                    mismatches.len(),
                    mismatches.first(),
                    self.consumer_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every consumer's whole log, concatenated.
    fn consumer_logs_whole(&self) -> String {
        std::fs::read_dir(&self.config_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "log"))
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
            .collect()
    }

    fn consumer_logs(&self) -> String {
        log_tails(&self.config_dir)
    }

    async fn applied_writes(&self) -> u64 {
        self.client.stats().await.expect("apisim stats").applied
    }

    async fn cleanup(self) {
        let _ = fare_config::delete(self.transport.as_ref(), &self.topology).await;
        let _ = sqlx::query(self.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&self.pool).await;
        let _ = std::fs::remove_dir_all(&self.config_dir);
        let _ = self.api.shutdown().await;
    }
}

/// `resync` with a test world's settings in its environment (services from `testkit`).
pub(crate) fn resync_command(
    config_dir: &std::path::Path,
    transport: &str,
    schema: &Schema,
    namespace: &str,
    redis_url: &str,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resync"));
    command
        .env("RESYNC_CONFIG_DIR", config_dir)
        .env("RESYNC_TRANSPORT", transport)
        .env("RESYNC_SCHEMA", schema.name())
        .env("RESYNC_NAMESPACE", namespace)
        .env("RESYNC_DATABASE_URL", Service::Postgres.url())
        .env("RESYNC_REDIS_URL", redis_url)
        .env("RESYNC_AMQP_URL", Service::RabbitMq.url())
        .env("AWS_ENDPOINT_URL", Service::SnsSqs.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

/// The last lines of every process log (`*.log`) in `dir`, newest first, for failure messages.
pub(crate) fn log_tails(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            out.push_str(&format!("--- {}\n{}\n", entry.path().display(), tail.join("\n")));
        }
    }
    out
}

/// 5% server errors and a rate limit, as the issue asks.
fn faulty_api(seed: u64) -> ApiConfig {
    ApiConfig {
        error_rate: 0.05,
        rate_limit_per_sec: Some(2_000.0),
        latency: Some(Latency::LogNormal { p50_ms: 1.0, p99_ms: 20.0 }),
        seed: Some(seed),
        ..ApiConfig::default()
    }
}

/// No write of an older version reached the simulator after a newer one, computed here from
/// its write log (not taken from its own check).
async fn assert_no_stale_overwrite(world: &World) {
    let stale = stale_writes(&world.client.log_all().await.expect("apisim log"));
    assert!(
        stale.is_empty(),
        "older versions written over newer ones: {stale:#?}\n{}",
        world.consumer_logs()
    );
}

async fn four_processes_apply_a_shuffled_duplicated_history(kind: &'static str, entities: usize) {
    let mut world = World::new(kind, faulty_api(11)).await;
    let (events, truth) = shuffled_history(entities, 10, 0.1, 5);
    world.publish(&events, truth).await;
    let _consumers: Vec<Process> = (0..4).map(|_| world.consumer("15s")).collect();

    world.wait_until_equal(Duration::from_secs(300)).await;

    assert_no_stale_overwrite(&world).await;
    let writes = world.applied_writes().await;
    assert!(
        writes <= (entities * 10) as u64,
        "duplicates and stale events cost no write: {writes} writes for {} versions",
        entities * 10
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_four_consumer_processes_apply_10k_shuffled_duplicated_events_exactly() {
    four_processes_apply_a_shuffled_duplicated_history("rabbitmq", 1_000).await;
}

/// Smaller on the emulator: moto's SQS slows down as a queue grows (see DESIGN.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_four_consumer_processes_apply_1k_shuffled_duplicated_events_exactly() {
    four_processes_apply_a_shuffled_duplicated_history("sns-sqs", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_with_sigkill_mid_stream_loses_nothing() {
    a_consumer_killed_mid_stream_loses_nothing("rabbitmq", 1_000).await;
}

/// On SQS the killed consumer's messages come back when their visibility timeout (30 s)
/// ends; smaller on the emulator (see the four-process test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_consumer_killed_with_sigkill_mid_stream_loses_nothing() {
    a_consumer_killed_mid_stream_loses_nothing("sns-sqs", 50).await;
}

async fn a_consumer_killed_mid_stream_loses_nothing(kind: &'static str, entities: usize) {
    let mut world = World::new(kind, faulty_api(12)).await;
    let (events, truth) = shuffled_history(entities, 10, 0.1, 6);
    world.publish(&events, truth).await;
    let mut consumers: Vec<Process> = (0..4).map(|_| world.consumer("15s")).collect();

    // Kill one once about a third of the queue is consumed, with events in its hands.
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while world.transport.queue_depth(&queue).await.expect("depth").ready > (events.len() * 2 / 3) as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumers made no progress\n{}",
            world.consumer_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut victim = consumers.remove(0);
    victim.0.kill().expect("SIGKILL a consumer");
    victim.0.wait().expect("reap");

    world.wait_until_equal(Duration::from_secs(300)).await;
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

/// Four consumer processes share one rate limit through Redis, and everything is applied. Each
/// process also adapts its concurrency.
///
/// The exact bound (at most `rate` in any second) is checked on the limiter's own slots in
/// `throttle/tests/it/shared_rate.rs`. Here the evidence is the third party's arrival stamps,
/// which carry network and scheduling jitter that can bunch writes admitted a moment apart,
/// so the test checks what no jitter can break: a write arrives after its slot, the slots are
/// `1/rate` apart (burst 1), and the first is after the consumers started, so the last of `N`
/// writes cannot arrive before `(N - 1) / rate` has passed. Four processes each keeping the
/// limit on their own would finish in a quarter of that.
async fn consumer_processes_share_the_sinks_rate_limit(kind: &'static str, rate: usize) {
    let mut world = World::new(kind, ApiConfig::default()).await;
    let mut config =
        std::fs::OpenOptions::new().append(true).open(world.config_dir.join("sync.toml")).expect("config");
    // The file ends in its [consumer] table.
    let limit = format!("adaptive_concurrency = true\n[sink.rate_limit]\nper_second = {rate}\n");
    std::io::Write::write_all(&mut config, limit.as_bytes()).expect("append the rate limit");
    let (events, truth) = shuffled_history(3 * rate, 1, 0.0, 8);
    world.publish(&events, truth).await;
    let started = chrono::Utc::now();
    let _consumers: Vec<Process> = (0..4).map(|_| world.consumer("15s")).collect();
    world.wait_until_equal(Duration::from_secs(120)).await;

    let writes = world.client.log_all().await.expect("apisim log");
    assert_eq!(writes.len(), 3 * rate, "one write per entity");
    let last = writes.iter().map(|w| w.at).max().expect("writes");
    let took = (last - started).to_std().unwrap_or_default();
    let fastest_allowed = Duration::from_secs_f64((writes.len() - 1) as f64 / rate as f64);
    assert!(
        took >= fastest_allowed,
        "{} writes arrived within {took:?} of the consumers starting; {rate}/s allows no less than \
         {fastest_allowed:?}",
        writes.len()
    );
    // The writes went through the shared limiter (its Redis state, kept a minute past use).
    let mut redis = resync_testkit::redis_connection().await;
    let key = format!("{}:throttle:sync", world.namespace);
    assert!(resync_testkit::pttl(&mut redis, &key).await > 0, "no shared rate state at {key}");
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_consumer_processes_share_the_sinks_rate_limit() {
    consumer_processes_share_the_sinks_rate_limit("rabbitmq", 150).await;
}

/// A lower rate on the emulator, whose SQS delivers a few hundred messages a second at most:
/// the limit, not the emulator, must be what paces the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_consumer_processes_share_the_sinks_rate_limit() {
    consumer_processes_share_the_sinks_rate_limit("sns-sqs", 50).await;
}

/// A third party that answers 429 (with Retry-After) well below the configured shared rate:
/// the consumers' shared limiter hears it, cuts the rate for all of them, and every event is
/// still applied once, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_429s_cut_the_shared_rate_and_every_event_still_arrives() {
    let api =
        ApiConfig { rate_limit_per_sec: Some(40.0), rate_limit_burst: Some(5.0), ..ApiConfig::default() };
    let mut world = World::new("rabbitmq", api).await;
    let mut config =
        std::fs::OpenOptions::new().append(true).open(world.config_dir.join("sync.toml")).expect("config");
    // Ten times what the third party takes; adaptive (the default) so 429s cut it.
    std::io::Write::write_all(&mut config, b"[sink.rate_limit]\nper_second = 400\n").expect("rate limit");
    let (events, truth) = shuffled_history(300, 1, 0.0, 10);
    world.publish(&events, truth).await;
    let listens = [free_port(), free_port()];
    let _consumers: Vec<Process> = listens.iter().map(|l| world.consumer_listening("15s", *l)).collect();
    world.wait_until_equal(Duration::from_secs(180)).await;

    let stats = world.client.stats().await.expect("apisim stats");
    assert!(stats.status(429) > 0, "the third party never refused: the test proved nothing");
    assert_eq!(stats.applied, 300, "every event applied once");
    let (mut throttled, mut lowest_rate) = (0.0, f64::MAX);
    for listen in listens {
        let metrics = get(listen, "/metrics").await.expect("metrics").1;
        throttled += sum_of(&metrics, "resync_sink_throttled_total").unwrap_or(0.0);
        let rate = sum_of(&metrics, "resync_sink_rate_limit").expect("the shared rate on /metrics");
        lowest_rate = lowest_rate.min(rate);
    }
    assert!(throttled > 0.0, "no consumer reported the 429s to the shared limiter");
    assert!(lowest_rate < 400.0, "the shared rate was never cut (lowest seen {lowest_rate})");
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = world.transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await.expect("dlq");
    assert_eq!(dlq.ready, 0, "429s are waited out, never dead-lettered");
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

/// The third party down for a few seconds mid-stream (every write answered 503): the consumers
/// retry and requeue, and once it is back every entity reaches its newest version; nothing is
/// dead-lettered and no older version lands over a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_down_for_seconds_mid_stream_loses_and_dead_letters_nothing() {
    // 100 ms calls: the 1,200 events take seconds, so the outage meets most of them.
    let api = ApiConfig { latency: Some(Latency::Fixed { fixed_ms: 100.0 }), ..ApiConfig::default() };
    let mut world = World::new("rabbitmq", api).await;
    let (events, truth) = shuffled_history(400, 3, 0.1, 14);
    world.publish(&events, truth).await;
    let _consumers: Vec<Process> = (0..2).map(|_| world.consumer("15s")).collect();
    // Down once a tenth of the work is done: events are in flight and most still queued.
    resync_testkit::poll_some(Duration::from_secs(120), "a tenth of the writes applied", || async {
        (world.applied_writes().await >= 120).then_some(())
    })
    .await;
    let outage = resync_apisim::FaultsPatch {
        outage: Some(resync_apisim::OutageNow { for_ms: 5_000 }),
        ..Default::default()
    };
    world.client.set_faults(&outage).await.expect("start the outage");

    world.wait_until_equal(Duration::from_secs(180)).await;
    let stats = world.client.stats().await.expect("apisim stats");
    assert!(stats.status(503) > 0, "no write met the outage: the test proved nothing");
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = world.transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await.expect("dlq");
    assert_eq!(dlq.ready, 0, "an outage of seconds is waited out, never dead-lettered");
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

/// How the third party is down in an outage test.
#[derive(Debug, Clone, Copy)]
enum Down {
    /// Connections refused (a TCP proxy in front of the simulator, cut).
    Refusing,
    /// Every write answered 503 (the simulator's own outage).
    Answering503,
}

/// The outage of the circuit tests: twice what an event's retries and deliveries last without
/// the circuit (3 deliveries of 6 calls with backoff: about 10 s, then the dead-letter queue).
const LONG_OUTAGE: Duration = Duration::from_secs(20);
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Four consumers with live events in flight and the third party down for longer than every
/// retry and delivery of an event would last: the sink's shared circuit holds the fleet, at
/// most one call per probe interval reaches the third party, and once it is back every event
/// arrives, nothing dead-lettered and no older version written over a newer one. With
/// `[sink.circuit] enabled = false` the same run dead-letters events.
async fn a_third_party_down_longer_than_every_retry_holds_the_fleet_and_dead_letters_nothing(
    kind: &'static str,
    down: Down,
    entities: usize,
) {
    down_longer_than_every_retry(
        kind,
        down,
        Outage { entities, versions: 3, max_receive_count: 3, max_hold: None },
    )
    .await;
}

/// How a circuit test is shaped besides the transport and the fault.
struct Outage {
    entities: usize,
    versions: i64,
    max_receive_count: u32,
    /// `[sink.circuit] max_hold`, when the test shortens it below the outage.
    max_hold: Option<&'static str>,
}

async fn down_longer_than_every_retry(kind: &'static str, down: Down, outage: Outage) {
    let Outage { entities, versions, max_receive_count, max_hold } = outage;
    let api = ApiConfig { latency: Some(Latency::Fixed { fixed_ms: 20.0 }), ..ApiConfig::default() };
    let mut circuit = format!(
        "[sink.circuit]\nfailure_threshold = 5\nmin_probe_interval = \"{}ms\"\nmax_probe_interval = \"1s\"\n",
        MIN_PROBE_INTERVAL.as_millis()
    );
    if let Some(max_hold) = max_hold {
        circuit.push_str(&format!("max_hold = \"{max_hold}\"\n"));
    }
    let mut world = World::with_sync(kind, api, max_receive_count, &circuit).await;
    let proxy = resync_testkit::proxy::TcpProxy::start(world.api.addr()).await;
    world.route_sink_through(&proxy);
    let (events, truth) = shuffled_history(entities, versions, 0.0, 21);
    let (_consumers, during) = world.start_before_a_fault(events, truth, 4).await;

    let calls_while_down = async || match down {
        Down::Refusing => proxy.refused(),
        Down::Answering503 => world.client.stats().await.expect("apisim stats").status(503),
    };
    match down {
        Down::Refusing => proxy.cut(),
        Down::Answering503 => {
            let outage = resync_apisim::FaultsPatch {
                outage: Some(resync_apisim::OutageNow { for_ms: LONG_OUTAGE.as_millis() as u64 }),
                ..Default::default()
            };
            world.client.set_faults(&outage).await.expect("start the outage");
        }
    }
    let down_at = tokio::time::Instant::now();
    world.publish_events(&during).await;
    // The outage's length is the fault under test, not a wait for a condition. Its first calls
    // fail and open the shared circuit. The window counted starts a few seconds later: calls
    // in flight then have failed, and every process has seen the circuit open (from its own
    // failures or its next read of the shared state); from then on only probes get through.
    let circuit = format!("{}:circuit:sync", world.namespace);
    let redis = resync_testkit::redis_connection().await;
    resync_testkit::poll_some(Duration::from_secs(60), "the shared circuit opened", || {
        let (mut redis, circuit) = (redis.clone(), &circuit);
        async move { resync_testkit::hget(&mut redis, circuit, "opened_at").await.map(|_| ()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (window_start, calls_before) = (tokio::time::Instant::now(), calls_while_down().await);
    tokio::time::sleep_until(down_at + LONG_OUTAGE - Duration::from_secs(1)).await;
    let (window, calls_during) = (window_start.elapsed(), calls_while_down().await - calls_before);
    // Counted while nothing can land, before the third party is back: once it is, the rest
    // can all land within milliseconds (a count taken after the restore once saw no write
    // "after the outage" because every write had landed before it).
    let applied_while_down = world.applied_writes().await;
    if let Down::Refusing = down {
        proxy.restore();
    }
    tokio::time::sleep_until(down_at + LONG_OUTAGE).await;
    let up_at = tokio::time::Instant::now();
    while world.applied_writes().await <= applied_while_down {
        if up_at.elapsed() > Duration::from_secs(120) {
            let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
            let depth = world.transport.queue_depth(&queue).await;
            let mut redis = redis.clone();
            let state: BTreeMap<String, String> =
                redis::cmd("HGETALL").arg(&circuit).query_async(&mut redis).await.unwrap_or_default();
            panic!(
                "no write in 120 s after the outage ended: queue {depth:?}, circuit {state:?}\n{}",
                world.consumer_logs_whole()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{kind} {down:?}: {calls_during} calls reached the third party in {window:?} of outage; \
         writes resumed {:?} after it ended",
        up_at.elapsed()
    );

    world.wait_until_equal(Duration::from_secs(180)).await;
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = world.transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await.expect("dlq");
    assert_eq!(dlq.ready, 0, "an outage is held out, never dead-lettered\n{}", world.consumer_logs());
    assert_no_stale_overwrite(&world).await;
    let probes_allowed = (window.as_secs_f64() / MIN_PROBE_INTERVAL.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        calls_during <= probes_allowed,
        "{calls_during} calls reached the third party in {window:?} of outage: more than one per probe \
         interval ({probes_allowed})"
    );
    if max_hold.is_some() {
        assert!(
            world.consumer_logs_whole().contains("as a fresh copy"),
            "no event was held past max_hold: the test proved nothing\n{}",
            world.consumer_logs()
        );
    }
    world.cleanup().await;
}

/// The outage outlasts `max_hold` many times over, with two deliveries allowed: events held
/// that long go back to their queue as fresh copies, so none spends a delivery on the outage
/// and none is dead-lettered (one version per entity: no entity lock is waited for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_events_held_past_max_hold_go_back_as_fresh_copies_and_none_is_dead_lettered() {
    let outage = Outage { entities: 200, versions: 1, max_receive_count: 2, max_hold: Some("2s") };
    down_longer_than_every_retry("rabbitmq", Down::Refusing, outage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_events_held_past_max_hold_go_back_as_fresh_copies_and_none_is_dead_lettered() {
    let outage = Outage { entities: 80, versions: 1, max_receive_count: 2, max_hold: Some("2s") };
    down_longer_than_every_retry("sns-sqs", Down::Refusing, outage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_third_party_refusing_connections_for_20s_holds_the_fleet_and_dead_letters_nothing() {
    a_third_party_down_longer_than_every_retry_holds_the_fleet_and_dead_letters_nothing(
        "rabbitmq",
        Down::Refusing,
        300,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_third_party_answering_503_for_20s_holds_the_fleet_and_dead_letters_nothing() {
    a_third_party_down_longer_than_every_retry_holds_the_fleet_and_dead_letters_nothing(
        "rabbitmq",
        Down::Answering503,
        300,
    )
    .await;
}

/// Smaller on the emulator (see the four-process test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_third_party_refusing_connections_for_20s_holds_the_fleet_and_dead_letters_nothing() {
    a_third_party_down_longer_than_every_retry_holds_the_fleet_and_dead_letters_nothing(
        "sns-sqs",
        Down::Refusing,
        100,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_third_party_answering_503_for_20s_holds_the_fleet_and_dead_letters_nothing() {
    a_third_party_down_longer_than_every_retry_holds_the_fleet_and_dead_letters_nothing(
        "sns-sqs",
        Down::Answering503,
        100,
    )
    .await;
}

/// The quota of the quota tests: a short window stands in for a day (the same mechanism: a
/// `per_day` budget is a window of 86,400 s), so the budget is spent and turns several times.
const QUOTA_WINDOW: Duration = Duration::from_secs(5);
const QUOTA_IN_FLIGHT: u64 = 4;

/// Four consumers with live events against a sink whose budget runs out several times mid-run:
/// whenever it is spent the whole fleet holds (events held spend no delivery: two deliveries
/// dead-letter here), and when its window turns they resume. No window sees more calls than its
/// budget, plus those granted before its start and still in flight at it.
async fn a_spent_quota_holds_the_fleet_until_its_window_turns(
    kind: &'static str,
    entities: usize,
    limit: u64,
) {
    let quota = format!(
        "[sink.rate_limit]\nmax_in_flight = {QUOTA_IN_FLIGHT}\n\
         [[sink.rate_limit.quota]]\nlimit = {limit}\nwindow = \"{}s\"\n",
        QUOTA_WINDOW.as_secs()
    );
    let mut world = World::with_sync(kind, ApiConfig::default(), 2, &quota).await;
    let (events, truth) = shuffled_history(entities, 1, 0.0, 41);
    world.publish(&events, truth).await;
    let _consumers: Vec<Process> = (0..4).map(|_| world.consumer("15s")).collect();

    world.wait_until_equal(Duration::from_secs(120)).await;

    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = world.transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await.expect("dlq");
    assert_eq!(dlq.ready, 0, "a spent quota is waited out, never dead-lettered\n{}", world.consumer_logs());
    let window_ms = QUOTA_WINDOW.as_millis() as i64;
    let mut per_window = BTreeMap::<i64, u64>::new();
    for write in world.client.log_all().await.expect("apisim log") {
        *per_window.entry(write.at.timestamp_millis() / window_ms).or_default() += 1;
    }
    eprintln!("{kind}: calls per {QUOTA_WINDOW:?} window: {per_window:?}");
    for (window, calls) in &per_window {
        assert!(
            *calls <= limit + QUOTA_IN_FLIGHT,
            "window {window} saw {calls} calls against a budget of {limit} (+{QUOTA_IN_FLIGHT} in flight at its start)"
        );
    }
    assert!(
        world.consumer_logs_whole().contains("sink quota spent"),
        "no consumer ever found the budget spent: the test proved nothing\n{}",
        world.consumer_logs()
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_spent_quota_holds_every_consumer_until_its_window_turns_and_loses_nothing() {
    a_spent_quota_holds_the_fleet_until_its_window_turns("rabbitmq", 150, 40).await;
}

/// Smaller on the emulator (see the four-process test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_spent_quota_holds_every_consumer_until_its_window_turns_and_loses_nothing() {
    a_spent_quota_holds_the_fleet_until_its_window_turns("sns-sqs", 80, 25).await;
}

/// What a write held in transit did once it arrived late: the stale writes in the simulator's
/// log and the version the simulator kept.
async fn a_write_that_arrives_late(conditional: bool) -> (Vec<String>, Option<i64>) {
    let api = ApiConfig { conditional_writes: conditional, ..ApiConfig::default() };
    let extra = if conditional { "[sink.conditional]\n" } else { "" };
    let mut world = World::with_sync("rabbitmq", api, 20, extra).await;
    let (events, mut truth) = shuffled_history(2, 2, 0.0, 31);
    truth.retain(|id, _| id == "L00001");
    let mut versions: Vec<Envelope> = events.into_iter().filter(|e| e.entity_id == "L00001").collect();
    versions.sort_by_key(|e| e.version);
    let hold = resync_apisim::FaultsPatch { hold_next_write_of: Some("L00001".into()), ..Default::default() };
    world.client.set_faults(&hold).await.expect("hold the next write");

    // v1's first call is held in transit; the consumer times out (2 s), retries, and v1 lands.
    world.publish(&versions[..1], truth).await;
    let _consumer = world.consumer("15s");
    let client = world.client.clone();
    let kept = async || client.entity("listing", "L00001").await.expect("read").and_then(|e| e.version);
    resync_testkit::poll_some(Duration::from_secs(60), "v1 applied by the retry", || async {
        (kept().await == Some(1)).then_some(())
    })
    .await;
    let truth = world.truth.clone();
    world.publish(&versions[1..], truth).await;
    resync_testkit::poll_some(Duration::from_secs(60), "v2 applied", || async {
        (kept().await == Some(2)).then_some(())
    })
    .await;

    // Now the first v1 call arrives.
    let release = resync_apisim::FaultsPatch { release_held: Some(true), ..Default::default() };
    world.client.set_faults(&release).await.expect("release the held write");
    resync_testkit::poll_some(Duration::from_secs(30), "the held write handled", || async {
        let stats = world.client.stats().await.expect("stats");
        (stats.requests >= 3 && stats.applied + stats.status(412) >= 3).then_some(())
    })
    .await;
    let log = world.client.log_all().await.expect("log");
    let version = kept().await;
    world.cleanup().await;
    (stale_writes(&log), version)
}

/// A write that reaches the third party late (held in transit past the consumer's timeout,
/// as a consumer frozen mid-call or a stuck proxy would deliver it), after a newer version was
/// applied: a third party enforcing versions refuses it, `[sink.conditional]` counts that as
/// applied, and the newest version stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_conditional_writes_a_write_that_arrives_late_never_lands_over_a_newer_one() {
    let (stale, kept) = a_write_that_arrives_late(true).await;
    assert!(stale.is_empty(), "{stale:?}");
    assert_eq!(kept, Some(2));
}

/// The same without conditional writes: the late write lands over the newer version and the
/// third party keeps the older one. This is why `[sink.conditional]` exists; nothing a consumer
/// does after its call has left can prevent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_conditional_writes_a_write_that_arrives_late_lands_over_a_newer_one() {
    let (stale, kept) = a_write_that_arrives_late(false).await;
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert_eq!(kept, Some(1));
}

/// What a consumer frozen (SIGSTOP) mid-call past its lock lease wrote once its call landed:
/// its v1 call is in transit (held by the simulator) when it freezes; its lock expires, a
/// second consumer applies v2, then the frozen call arrives. Returns the stale writes in the
/// simulator's log, the version it kept once both consumers are done with the entity, the
/// writes it refused as not newer (412), and the messages dead-lettered.
async fn a_consumer_frozen_mid_call(kind: &'static str, conditional: bool) -> FrozenMidCall {
    let api = ApiConfig { conditional_writes: conditional, ..ApiConfig::default() };
    let extra = if conditional { "[sink.conditional]\n" } else { "" };
    let mut world = World::with_sync(kind, api, 20, extra).await;
    let (events, mut truth) = shuffled_history(2, 2, 0.0, 37);
    truth.retain(|id, _| id == "L00001");
    let mut versions: Vec<Envelope> = events.into_iter().filter(|e| e.entity_id == "L00001").collect();
    versions.sort_by_key(|e| e.version);
    let hold = resync_apisim::FaultsPatch { hold_next_write_of: Some("L00001".into()), ..Default::default() };
    world.client.set_faults(&hold).await.expect("hold the next write");

    // One message per consumer at a time: v2 cannot be delivered to the frozen process.
    let path = world.config_dir.join("sync.toml");
    let config = std::fs::read_to_string(&path).expect("read config");
    std::fs::write(&path, config.replace("prefetch = 16", "prefetch = 1")).expect("write config");
    world.publish(&versions[..1], truth).await;
    // The shortest lease a 2 s sink timeout allows: it runs out while the process is frozen.
    let frozen = world.consumer("5s");
    resync_testkit::poll_some(Duration::from_secs(60), "v1's call at the simulator", || async {
        (world.client.stats().await.expect("stats").requests >= 1).then_some(())
    })
    .await;
    let pid = frozen.0.id().to_string();
    signal("-STOP", &pid);

    let _other = world.consumer("5s");
    let truth = world.truth.clone();
    world.publish(&versions[1..], truth).await;
    let client = world.client.clone();
    let kept = async || client.entity("listing", "L00001").await.expect("read").and_then(|e| e.version);
    resync_testkit::poll_some(Duration::from_secs(90), "v2 applied by the other consumer", || async {
        (kept().await == Some(2)).then_some(())
    })
    .await;

    // The frozen process's call arrives now, long after its lock expired.
    let release = resync_apisim::FaultsPatch { release_held: Some(true), ..Default::default() };
    world.client.set_faults(&release).await.expect("release the held write");
    resync_testkit::poll_some(Duration::from_secs(30), "the frozen call handled", || async {
        let stats = world.client.stats().await.expect("stats");
        (stats.applied + stats.status(412) >= 2).then_some(())
    })
    .await;
    signal("-CONT", &pid);
    // The woken process settles its v1 (its record of it loses to v2's), or on SQS the other
    // consumer got v1 again once its visibility ran out: the queue drains.
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    resync_testkit::poll_some(Duration::from_secs(120), "v1 settled", || async {
        let depth = world.transport.queue_depth(&queue).await.expect("depth");
        (depth.ready == 0 && depth.in_flight == 0).then_some(())
    })
    .await;
    let log = world.client.log_all().await.expect("log");
    let dlq = world.transport.queue_depth(&resync_bus::dead_letter_queue_name(&queue)).await.expect("dlq");
    let result = FrozenMidCall {
        stale: stale_writes(&log),
        kept: kept().await,
        refused: world.client.stats().await.expect("stats").status(412),
        dead_lettered: dlq.ready,
    };
    drop(frozen);
    world.cleanup().await;
    result
}

#[derive(Debug)]
struct FrozenMidCall {
    stale: Vec<String>,
    kept: Option<i64>,
    refused: u64,
    dead_lettered: u64,
}

/// With conditional writes, the call of a consumer frozen past its lease lands after the newer
/// version and the third party refuses it (412): no stale write, the newest version stays, and
/// the woken consumer counts the refusal as applied rather than dead-lettering its event.
async fn with_conditional_writes_a_frozen_call_writes_nothing_stale(kind: &'static str) {
    let frozen = a_consumer_frozen_mid_call(kind, true).await;
    assert!(frozen.stale.is_empty(), "{frozen:?}");
    assert_eq!((frozen.kept, frozen.refused, frozen.dead_lettered), (Some(2), 1, 0), "{frozen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_with_conditional_writes_a_consumer_frozen_mid_call_past_its_lease_writes_nothing_stale() {
    with_conditional_writes_a_frozen_call_writes_nothing_stale("rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_with_conditional_writes_a_consumer_frozen_mid_call_past_its_lease_writes_nothing_stale() {
    with_conditional_writes_a_frozen_call_writes_nothing_stale("sns-sqs").await;
}

/// Without them the frozen call lands over the newer version and stays: the known limit of
/// locks with leases, which no consumer can prevent once its call has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_without_conditional_writes_a_consumer_frozen_mid_call_past_its_lease_writes_a_stale_version()
 {
    let frozen = a_consumer_frozen_mid_call("rabbitmq", false).await;
    assert_eq!(frozen.stale.len(), 1, "{frozen:?}");
    assert_eq!(frozen.kept, Some(1), "{frozen:?}");
}

/// The sum of every series of a metric on a Prometheus text page (`None`: no series).
fn sum_of(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Writes that reached the simulator after a newer version of the same entity had, from its
/// write log in apply order (independent of the simulator's own check).
pub(crate) fn stale_writes(log: &[resync_apisim::LogEntry]) -> Vec<String> {
    let mut ordered: Vec<&resync_apisim::LogEntry> = log.iter().collect();
    ordered.sort_by_key(|w| w.seq);
    let mut newest: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    let mut stale = Vec::new();
    for write in ordered {
        let version = write.version.expect("every write carries its version");
        let seen = newest.entry((write.entity_type.as_str(), write.entity_id.as_str())).or_insert(version);
        if version < *seen {
            stale.push(format!(
                "{} v{version} after v{seen} (write #{} at {})",
                write.entity_id, write.seq, write.at
            ));
        }
        *seen = (*seen).max(version);
    }
    stale
}

/// Consumers frozen (SIGSTOP: a GC pause, a VM stall) past their lock lease with calls in
/// flight, and their Redis restarted empty under them (this test's own redis-server), while
/// the sink times out (some writes land and then time out) and answers 5xx: other consumers
/// take the entities over, and no write of an older version ever reaches the third party
/// after a newer one. A consumer once retried after losing its lock and re-sent an older
/// version over the newer one another consumer had just written.
async fn frozen_consumers_and_a_restarted_redis_never_write_an_older_version_over_a_newer_one(
    kind: &'static str,
    entities: usize,
    versions: i64,
    latency: Latency,
) {
    let api = ApiConfig {
        latency: Some(latency),
        applied_then_timeout_rate: 0.02,
        // Past the sink's 2 s timeout: the write landed, the consumer sees a timeout.
        applied_then_timeout_delay_ms: 3_000,
        ..faulty_api(13)
    };
    let mut world = World::new(kind, api).await;
    let mut redis = resync_testkit::OwnRedis::start().await;
    world.redis_url = redis.url();
    let (events, truth) = shuffled_history(entities, versions, 0.1, 7);
    // Freezes happen only while a fifth of the events still wait, so frozen processes hold locks.
    let busy = (events.len() / 5) as u64;
    world.publish(&events, truth).await;
    // The shortest lease a 2 s sink timeout allows (a call starts only with its lease left).
    let consumers: Vec<Process> = (0..4).map(|_| world.consumer("5s")).collect();
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);

    let mut rounds = 0;
    for round in 0..6 {
        if world.transport.queue_depth(&queue).await.expect("depth").ready < busy {
            break;
        }
        rounds += 1;
        let pid = consumers[round % consumers.len()].0.id().to_string();
        signal("-STOP", &pid);
        if round % 2 == 1 {
            redis.restart().await;
        }
        // Longer than the lease: the frozen process's locks expire under its in-flight calls.
        tokio::time::sleep(Duration::from_millis(6_000)).await;
        signal("-CONT", &pid);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    assert!(rounds >= 2, "the queue drained after {rounds} freeze(s): too few events for the test");
    world.wait_until_equal(Duration::from_secs(300)).await;
    let logs = world.consumer_logs_whole();
    assert!(!logs.contains('\x1b'), "colour codes in a log written to a file");
    assert!(
        logs.contains("lock taken over") || logs.contains("lock expired"),
        "no consumer lost a lock: the freezes proved nothing\n{}",
        world.consumer_logs()
    );
    let stale = stale_writes(&world.client.log_all().await.expect("apisim log"));
    assert!(
        stale.is_empty(),
        "older versions written over newer ones: {stale:#?}\n{}",
        world.consumer_logs()
    );
    drop(consumers);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_frozen_consumers_and_a_restarted_redis_never_write_an_older_version_over_a_newer_one() {
    let latency = Latency::LogNormal { p50_ms: 20.0, p99_ms: 400.0 };
    frozen_consumers_and_a_restarted_redis_never_write_an_older_version_over_a_newer_one(
        "rabbitmq", 200, 20, latency,
    )
    .await;
}

/// Four consumers locking on a Redis Cluster of the test's own (three primaries, a replica
/// each), and one primary killed mid-stream: its replica takes over, the consumers follow it
/// (events they cannot lock meanwhile go back to the queue), and the third party ends equal to
/// the source with no older version written over a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_consumers_on_a_redis_cluster_ride_out_a_primary_killed_mid_stream() {
    let mut world = World::new("rabbitmq", faulty_api(17)).await;
    let mut cluster = resync_testkit::OwnRedisCluster::start().await;
    world.redis_url = cluster.urls();
    let (events, truth) = shuffled_history(300, 5, 0.1, 19);
    let (_consumers, after) = world.start_before_a_fault(events, truth, 4).await;

    let victim = cluster.primaries()[0];
    cluster.kill(victim);
    let killed_at = tokio::time::Instant::now();
    world.publish_events(&after).await;
    cluster.await_healthy().await;
    eprintln!("the cluster served every slot again {:?} after a primary was killed", killed_at.elapsed());

    world.wait_until_equal(Duration::from_secs(300)).await;
    eprintln!("the third party equalled the source {:?} after the kill", killed_at.elapsed());
    assert!(!cluster.primaries().contains(&victim), "the killed node no longer serves as a primary");
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

/// `pg_ctl restart -m fast` of the test's own Postgres under four consumers applying a history:
/// every session is cut, in-flight transactions (applied versions, sink intents) roll back, and
/// the consumers reconnect. The third party ends equal to the source with no stale write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_consumers_ride_out_a_postgres_restart_mid_stream() {
    let postgres = resync_testkit::OwnPostgres::start();
    let mut world = World::on_database("rabbitmq", faulty_api(23), postgres.url()).await;
    let (events, truth) = shuffled_history(300, 5, 0.1, 29);
    let (_consumers, after) = world.start_before_a_fault(events, truth, 4).await;

    let restarted_at = tokio::time::Instant::now();
    postgres.restart();
    eprintln!("postgres restarted in {:?}", restarted_at.elapsed());
    world.publish_events(&after).await;

    world.wait_until_equal(Duration::from_secs(300)).await;
    eprintln!("the third party equalled the source {:?} after the restart began", restarted_at.elapsed());
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

/// `resync entity show` for an entity in each state a support question meets: in sync,
/// deleted, behind (the source moved on without an event), dead-lettered (the sink refused it),
/// never applied, and a call in flight (recorded by a consumer that then died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_show_names_each_state_an_entity_can_be_in() {
    let mut world = World::new("rabbitmq", ApiConfig::default()).await;
    let row = |version: i64, deleted: bool| Expected {
        version,
        deleted,
        data: if deleted {
            serde_json::Value::Null
        } else {
            serde_json::json!({"title": format!("v{version}")})
        },
    };
    let event = |id: &str, expected: &Expected| {
        let mut event = Envelope::new(
            if expected.deleted { "listing.deleted" } else { "listing.updated" },
            id,
            expected.version,
            expected.data.clone(),
        );
        event.deleted = expected.deleted;
        event
    };
    let truth: BTreeMap<String, Expected> = [
        ("in-sync", row(1, false)),
        ("behind", row(1, false)),
        ("rejected", row(1, false)),
        ("deleted", row(2, true)),
        ("never", row(1, false)),
        ("in-flight", row(1, false)),
    ]
    .into_iter()
    .map(|(id, expected)| (id.to_string(), expected))
    .collect();
    world.seed(truth.clone()).await;

    // The sink refuses everything while `rejected` goes through.
    let reject_all = resync_apisim::FaultsPatch { reject_rate: Some(1.0), ..Default::default() };
    world.client.set_faults(&reject_all).await.expect("reject everything");
    world.publish_events(&[event("rejected", &truth["rejected"])]).await;
    let consumer = world.consumer("15s");
    let (pool, schema) = (&world.pool, &world.schema);
    let at_sink =
        |id: &'static str| resync_consumer::records::entity_at_sink(pool, schema, "sync", "listing", id);
    resync_testkit::poll_some(Duration::from_secs(60), "`rejected` dead-lettered", || async {
        at_sink("rejected").await.expect("records").dead_letter.map(|_| ())
    })
    .await;
    let accept_all = resync_apisim::FaultsPatch { reject_rate: Some(0.0), ..Default::default() };
    world.client.set_faults(&accept_all).await.expect("accept again");
    let mut events = vec![event("deleted", &row(1, false)), event("deleted", &truth["deleted"])];
    events.extend(["in-sync", "behind", "in-flight"].map(|id| event(id, &truth[id])));
    world.publish_events(&events).await;
    for (id, version) in [("in-sync", 1), ("behind", 1), ("in-flight", 1), ("deleted", 2)] {
        resync_testkit::poll_some(Duration::from_secs(60), "the sink applied the events", || async {
            at_sink(id).await.expect("records").applied.filter(|a| a.version == version).map(|_| ())
        })
        .await;
    }
    drop(consumer);
    // The source moves on without an event; a consumer starts a call for v2 and dies.
    let mut tx = world.pool.begin().await.expect("begin");
    for id in ["behind", "in-flight"] {
        world.source.upsert(&mut tx, id, &row(2, false)).await.expect("source row");
    }
    tx.commit().await.expect("commit");
    let store = resync_consumer::AppliedStore::new(world.pool.clone(), world.schema.clone());
    let in_flight =
        resync_consumer::store::EntityId { entity_type: "listing".into(), entity_id: "in-flight".into() };
    store.record_intents("sync", &[(&in_flight, 2)]).await.expect("intent");

    let verdict = |id: &str| {
        let out =
            world.resync().args(["entity", "show", "listing", id, "--json"]).output().expect("entity show");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "entity show {id}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        report["sinks"][0]["verdict"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(verdict("in-sync"), "in sync (v1)");
    assert_eq!(verdict("deleted"), "deleted (v2)");
    assert_eq!(verdict("behind"), "behind: v1 applied, v2 current");
    assert!(verdict("rejected").starts_with("dead-lettered: v1 "), "{}", verdict("rejected"));
    assert_eq!(verdict("never"), "never applied: v1 current");
    assert!(verdict("in-flight").starts_with("in flight: v2 since "), "{}", verdict("in-flight"));
    let human = world.resync().args(["entity", "show", "listing", "rejected"]).output().expect("entity show");
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("sink sync: dead-lettered: v1") && human.contains("dead letter v1"), "{human}");
    world.cleanup().await;
}

/// Consumers given two AMQP addresses, as for a cluster's nodes (here two proxies of one
/// broker), move to the second when the first goes away mid-stream: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_consumers_move_to_the_next_amqp_address_when_theirs_goes_away() {
    let mut world = World::new("rabbitmq", faulty_api(27)).await;
    let first = resync_testkit::proxy::TcpProxy::start(Service::RabbitMq.socket_addr()).await;
    let second = resync_testkit::proxy::TcpProxy::start(Service::RabbitMq.socket_addr()).await;
    let broker = Service::RabbitMq.url();
    world.amqp_url = format!("{},{}", first.url(&broker), second.url(&broker));
    let (events, truth) = shuffled_history(300, 5, 0.1, 31);
    let (_consumers, after) = world.start_before_a_fault(events, truth, 4).await;

    first.cut();
    world.publish_events(&after).await;

    world.wait_until_equal(Duration::from_secs(300)).await;
    assert!(first.refused() > 0, "the consumers tried the first address again before the second");
    assert_no_stale_overwrite(&world).await;
    world.cleanup().await;
}

fn signal(which: &str, pid: &str) {
    let status = Command::new("kill").args([which, pid]).status().expect("kill");
    assert!(status.success(), "kill {which} {pid} failed");
}

async fn poison_messages_reach_the_dead_letter_queue_with_their_reason_and_the_rest_flows(
    kind: &'static str,
) {
    let mut world = World::new(kind, ApiConfig::default()).await;
    let (events, truth) = shuffled_history(50, 3, 0.0, 8);
    world.publish(&events, truth).await;
    let routing =
        Routing { event_type: "listing.updated".into(), entity_type: "listing".into(), stream: Stream::Live };
    let topic =
        Destination::Topic(resync_bus::naming::topic_name(Some(&world.namespace), "listing", Stream::Live));
    for (i, body) in [&b"not json"[..], b"{\"id\": 1}", b"[]"].into_iter().enumerate() {
        let poison =
            OutgoingMessage::with_routing(Bytes::copy_from_slice(body), &routing, format!("poison-{i}"));
        world.transport.publish(&topic, poison).await.expect("publish poison");
    }
    let _consumer = world.consumer("15s");

    world.wait_until_equal(Duration::from_secs(120)).await;

    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = resync_bus::dead_letter_queue_name(&queue);
    let mut subscription = world.transport.subscribe(&dlq, Default::default()).await.expect("subscribe dlq");
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reasons.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "dead letters so far: {reasons:?}");
        for delivery in subscription.next_batch(10, Duration::from_secs(1)).await.expect("dlq") {
            reasons.push(delivery.attributes.get(attr::DEAD_LETTER_REASON).cloned().unwrap_or_default());
            assert!(
                delivery.attributes.get(attr::DEAD_LETTER_DETAIL).is_some_and(|d| !d.is_empty()),
                "the detail says what is wrong"
            );
            delivery.ack().await.expect("ack");
        }
    }
    assert_eq!(reasons, ["invalid-envelope"; 3]);
    let _ = subscription.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_poison_messages_reach_the_dead_letter_queue_with_their_reason_and_the_rest_flows() {
    poison_messages_reach_the_dead_letter_queue_with_their_reason_and_the_rest_flows("rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_poison_messages_reach_the_dead_letter_queue_with_their_reason_and_the_rest_flows() {
    poison_messages_reach_the_dead_letter_queue_with_their_reason_and_the_rest_flows("sns-sqs").await;
}

/// Valid events of types the service does not subscribe to (published to its queue by hand, or
/// replayed to it) are dead-lettered as `not-subscribed` and never reach the sink, also when
/// their ids are those of listings the sink holds (its URL is the listings URL): they once
/// overwrote listings at the third party.
async fn unsubscribed_types_are_dead_lettered_and_never_sent(kind: &'static str) {
    let mut world = World::new(kind, ApiConfig::default()).await;
    let (events, truth) = shuffled_history(20, 2, 0.0, 12);
    let ids: Vec<String> = truth.keys().take(2).cloned().collect();
    world.publish(&events, truth).await;
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let strangers: Vec<Envelope> = ["user.updated", "widget.deleted"]
        .iter()
        .zip(&ids)
        .map(|(event_type, id)| Envelope::new(event_type, id.clone(), 99, serde_json::json!({"name": "x"})))
        .collect();
    let messages = strangers.iter().map(OutgoingMessage::from_envelope).collect();
    world.transport.publish_batch(&Destination::Queue(queue.clone()), messages).await.expect("publish");
    let _consumer = world.consumer("15s");

    world.wait_until_equal(Duration::from_secs(120)).await;
    let dlq = resync_bus::dead_letter_queue_name(&queue);
    let mut subscription = world.transport.subscribe(&dlq, Default::default()).await.expect("subscribe dlq");
    let mut letters = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while letters.len() < strangers.len() {
        assert!(tokio::time::Instant::now() < deadline, "dead letters so far: {letters:?}");
        for delivery in subscription.next_batch(10, Duration::from_secs(1)).await.expect("dlq") {
            let event = delivery.envelope(&Default::default()).expect("the original envelope");
            let reason = delivery.attributes.get(attr::DEAD_LETTER_REASON).cloned().unwrap_or_default();
            let detail = delivery.attributes.get(attr::DEAD_LETTER_DETAIL).cloned().unwrap_or_default();
            assert!(detail.contains(&event.event_type) && detail.contains("listing.*"), "{detail}");
            letters.push((event.event_type, reason));
            delivery.ack().await.expect("ack");
        }
    }
    letters.sort();
    assert_eq!(
        letters,
        [
            ("user.updated".to_string(), "not-subscribed".to_string()),
            ("widget.deleted".into(), "not-subscribed".into())
        ]
    );
    let log = world.client.log_all().await.expect("apisim log");
    let stranger_ids: Vec<String> = strangers.iter().map(|e| e.id.to_string()).collect();
    let sent: Vec<_> =
        log.iter().filter(|w| w.event_id.as_ref().is_some_and(|id| stranger_ids.contains(id))).collect();
    assert!(sent.is_empty(), "unsubscribed events reached the API: {sent:?}");
    let _ = subscription.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_unsubscribed_types_are_dead_lettered_and_never_sent() {
    unsubscribed_types_are_dead_lettered_and_never_sent("rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_unsubscribed_types_are_dead_lettered_and_never_sent() {
    unsubscribed_types_are_dead_lettered_and_never_sent("sns-sqs").await;
}

/// `pause` and `resume` of a service no config declares (a typo) fail and name the services
/// there; the declared one pauses and resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_refuse_an_unknown_service() {
    let world = World::new("rabbitmq", ApiConfig::default()).await;
    for verb in ["pause", "resume"] {
        let typo = world.resync().args([verb, "--service", "sinc", "--stream", "live"]).output().expect(verb);
        let stderr = String::from_utf8_lossy(&typo.stderr);
        assert!(!typo.status.success(), "{verb} of an unknown service succeeded");
        assert!(stderr.contains("no service `sinc`") && stderr.contains("sync"), "{stderr}");
        let known =
            world.resync().args([verb, "--service", "sync", "--stream", "live"]).output().expect(verb);
        assert!(known.status.success(), "{verb}: {}", String::from_utf8_lossy(&known.stderr));
    }
    let paused = world.schema.sql("SELECT count(*) FROM {schema}.paused_streams");
    let count: i64 = sqlx::query_scalar(paused).fetch_one(&world.pool).await.expect("paused streams");
    assert_eq!(count, 0, "nothing left paused");
    world.cleanup().await;
}

/// SIGTERM: the consumer stops taking messages, finishes and acknowledges what it holds, and
/// exits cleanly; a consumer started afterwards applies the rest, and nothing is lost.
async fn a_consumer_serves_health_and_metrics_and_drains_on_sigterm(kind: &'static str, entities: usize) {
    // One second per call, 16 at a time: `entities` events are `entities / 16` seconds of
    // work, so SIGTERM lands with most of it still queued however slow the checks before it are.
    let api = ApiConfig { latency: Some(Latency::Fixed { fixed_ms: 1000.0 }), ..ApiConfig::default() };
    let mut world = World::new(kind, api).await;
    let (events, truth) = shuffled_history(entities, 1, 0.0, 9);
    world.publish(&events, truth).await;
    let listen = free_port();
    let mut consumer = world.consumer_listening("15s", listen);

    eventually("/readyz answers 200", || async {
        get(listen, "/readyz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert_eq!(get(listen, "/healthz").await.map(|(s, _)| s), Some(200));
    eventually("some events applied", || async { world.applied_writes().await >= 20 }).await;
    let metrics = get(listen, "/metrics").await.expect("metrics").1;
    assert!(metrics.contains("resync_consumer_events_total{outcome=\"applied\"}"), "{metrics}");
    // Histograms, which aggregate across replicas (summaries do not).
    assert!(metrics.contains("resync_consumer_sink_latency_seconds_bucket{le=\"0.005\"}"), "{metrics}");
    // Counters that nothing incremented yet are there at 0, described.
    for line in [
        "resync_consumer_events_total{outcome=\"dead_lettered\"} 0",
        "resync_consumer_dead_lettered_total{reason=\"not-subscribed\"} 0",
        "resync_consumer_retries_total 0",
        "# HELP resync_consumer_events_total Events handled, by outcome.",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in\n{metrics}");
    }
    // The autoscaling signals (sampled every 200 ms here), with values that say something:
    // most of the events wait, some are being processed, at least one replica is wanted.
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let backlog = format!("resync_consumer_backlog{{queue=\"{queue}\"}}");
    eventually("autoscaling signals with values on /metrics", || async {
        let Some((_, m)) = get(listen, "/metrics").await else { return false };
        let waiting = gauge(&m, &backlog).is_some_and(|v| v > 0.0 && v <= entities as f64);
        let rate = gauge(&m, "resync_consumer_processing_rate").is_some_and(|v| v > 0.0);
        let replicas = gauge(&m, "resync_consumer_recommended_replicas").is_some_and(|v| v >= 1.0);
        waiting && rate && replicas
    })
    .await;

    signal("-TERM", &consumer.0.id().to_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = consumer.0.try_wait().expect("wait") {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the consumer did not exit within 30s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", world.consumer_logs());
    let applied_at_exit = world.applied_writes().await;
    assert!(
        applied_at_exit < entities as u64,
        "SIGTERM came before the end of the work ({applied_at_exit} applied)"
    );

    let fast = resync_apisim::FaultsPatch { latency: Some(None), ..Default::default() };
    world.client.set_faults(&fast).await.expect("drop the latency");
    let listen = free_port();
    let _next = world.consumer_listening("15s", listen);
    world.wait_until_equal(Duration::from_secs(120)).await;
    assert_no_stale_overwrite(&world).await;
    // Idle, the lag reads 0 rather than the last event's (a stuck consumer must stand out).
    eventually("the live lag back at 0 when idle", || async {
        get(listen, "/metrics")
            .await
            .is_some_and(|(_, m)| m.lines().any(|l| l == "resync_consumer_lag_seconds{stream=\"live\"} 0"))
    })
    .await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_consumer_serves_health_and_metrics_and_drains_on_sigterm() {
    a_consumer_serves_health_and_metrics_and_drains_on_sigterm("rabbitmq", 600).await;
}

/// On SQS the messages a consumer holds at SIGTERM are finished and deleted; the rest stay
/// queued for the next consumer (fewer on the emulator: 25 s of work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_consumer_serves_health_and_metrics_and_drains_on_sigterm() {
    a_consumer_serves_health_and_metrics_and_drains_on_sigterm("sns-sqs", 400).await;
}

/// The value of a gauge on a Prometheus text page (`name` with its labels, if any).
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The DLQ depth of the sync service's live queue once every write the sink refused (each is
/// dead-lettered once, 4xx are not retried) is in it and the queue itself is drained. RabbitMQ
/// does not report the messages a consumer holds unacknowledged, so the API must also have had
/// no request for a whole poll interval: a prefetched event still to come could be refused.
async fn settled_dead_letters(world: &World) -> u64 {
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = resync_bus::dead_letter_queue_name(&queue);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut previous_requests = None;
    loop {
        let main = world.transport.queue_depth(&queue).await.expect("depth");
        let dead = world.transport.queue_depth(&dlq).await.expect("dlq depth").ready;
        let stats = world.client.stats().await.expect("apisim stats");
        let refused = stats.status(422);
        let quiet = previous_requests.replace(stats.requests) == Some(stats.requests);
        if main.ready + main.in_flight == 0 && refused > 0 && dead == refused && quiet {
            return dead;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never drained: {main:?}, {dead} dead letters for {refused} refusals"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sink refuses a share of writes (422): those events are dead-lettered with the reason,
/// listed with the right count, then redriven after the sink is fixed, by a redrive SIGKILLed
/// mid-way and a second one once what the first held is back. Superseded versions among them are judged stale, never re-sent:
/// the third party ends equal to the database with no stale overwrite.
async fn dead_letters_are_redriven_after_the_sink_is_fixed(kind: &'static str, entities: usize) {
    let api = ApiConfig { reject_rate: 0.2, seed: Some(21), ..ApiConfig::default() };
    let mut world = World::new(kind, api).await;
    let (events, truth) = shuffled_history(entities, 4, 0.0, 21);
    world.publish(&events, truth).await;
    let _consumer = world.consumer("15s");
    let dead = settled_dead_letters(&world).await;

    let listed =
        world.resync().args(["dlq", "list", "--service", "sync", "--stream", "live", "--json"]).output();
    let listed = listed.expect("resync dlq list");
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    let listed = &listed[0];
    assert_eq!(listed["total"], dead);
    assert_eq!(listed["reasons"][0]["reason"], "sink-rejected-422", "{listed}");
    assert_eq!(listed["reasons"][0]["count"], dead, "{listed}");
    let shown = world
        .resync()
        .args(["dlq", "show", "--service", "sync", "--stream", "live", "--limit", "100000", "--json"])
        .output();
    let shown: serde_json::Value =
        serde_json::from_slice(&shown.expect("resync dlq show").stdout).expect("json");
    let rejected: std::collections::BTreeSet<String> = shown[0]["dead_letters"]
        .as_array()
        .expect("dead letters")
        .iter()
        .map(|d| d["entity_id"].as_str().expect("entity id").to_string())
        .collect();
    let recorded: Vec<String> = sqlx::query_scalar(
        world
            .schema
            .sql("SELECT entity_id FROM {schema}.dead_lettered_entities WHERE sink = 'sync' ORDER BY 1"),
    )
    .fetch_all(&world.pool)
    .await
    .expect("dead-lettered entities");
    assert_eq!(
        recorded,
        rejected.into_iter().collect::<Vec<_>>(),
        "each refused entity is recorded for the sink"
    );

    world
        .client
        .set_faults(&resync_apisim::FaultsPatch { reject_rate: Some(0.0), ..Default::default() })
        .await
        .expect("fix the sink");
    let before = world.applied_writes().await;
    let redrive = |rate: &str| {
        let args = ["dlq", "redrive", "--service", "sync", "--stream", "live", "--rate", rate];
        world.resync().args(args).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("redrive")
    };
    let mut interrupted = Process(redrive("5"));
    eventually("the first redriven events to be applied", || async { world.applied_writes().await > before })
        .await;
    signal("-KILL", &interrupted.0.id().to_string());
    let _ = interrupted.0.wait();
    // What the killed redrive held returns to the DLQ: at once on RabbitMQ (connection gone),
    // after the DLQ's visibility timeout (30 s) on SQS.
    let queue = resync_bus::naming::queue_name(Some(&world.namespace), "sync", Stream::Live);
    let dlq = resync_bus::dead_letter_queue_name(&queue);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while world.transport.queue_depth(&dlq).await.expect("dlq depth").in_flight > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the killed redrive's messages never came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let args = ["dlq", "redrive", "--service", "sync", "--stream", "live"];
    let redriven = world.resync().args(args).env("RUST_LOG", "info").output().expect("redrive");
    let report = format!(
        "redrive: {}\n{}",
        String::from_utf8_lossy(&redriven.stdout),
        String::from_utf8_lossy(&redriven.stderr)
    );
    assert!(redriven.status.success(), "the redrive failed: {report}");
    eprintln!("{report}");

    world.wait_until_equal(Duration::from_secs(120)).await;
    assert_no_stale_overwrite(&world).await;
    let left = world.transport.queue_depth(&dlq).await.expect("dlq");
    assert_eq!(left.ready, 0, "every dead letter was sent back and applied or judged stale");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dead_letters_are_redriven_after_the_sink_is_fixed() {
    dead_letters_are_redriven_after_the_sink_is_fixed("rabbitmq", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_dead_letters_are_redriven_after_the_sink_is_fixed() {
    dead_letters_are_redriven_after_the_sink_is_fixed("sns-sqs", 40).await;
}

/// Newer versions of every `step`th entity, written to the source table and published live,
/// as the application would while a resync runs.
async fn live_updates(world: &mut World, step: usize, round: i64) {
    let topic =
        Destination::Topic(resync_bus::naming::topic_name(Some(&world.namespace), "listing", Stream::Live));
    let ids: Vec<String> = world.truth.keys().step_by(step.max(1)).cloned().collect();
    let mut messages = Vec::new();
    let mut tx = world.pool.begin().await.expect("begin");
    for id in ids {
        let Some(old) = world.truth.get(&id) else { continue };
        let new = Expected {
            version: old.version + 1,
            deleted: false,
            data: serde_json::json!({"title": format!("{id} live {round}"), "price": round}),
        };
        world.source.upsert(&mut tx, &id, &new).await.expect("source row");
        let mut event = Envelope::new("listing.updated", id.clone(), new.version, new.data.clone());
        event.stream = Stream::Live;
        messages.push(OutgoingMessage::from_envelope(&event));
        world.truth.insert(id, new);
    }
    tx.commit().await.expect("commit live updates");
    for chunk in messages.chunks(500) {
        world.transport.publish_batch(&topic, chunk.to_vec()).await.expect("publish live updates");
    }
}

/// How big the resync-with-live-updates runs are: 2,000 rows by default (the test suite);
/// `RESYNC_JOB_ROWS=100000` gives the issue's full-size run (see BENCHMARKS.md).
fn job_rows(default: usize) -> usize {
    std::env::var("RESYNC_JOB_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn job_status(world: &World) -> Option<String> {
    let sql = world.schema.sql("SELECT status FROM {schema}.jobs");
    sqlx::query_scalar(sql).fetch_optional(&world.pool).await.expect("job status")
}

/// The moment a job says `completed`, the sink holds every row at the version the job sent
/// or a newer one: a job marked completed too early fails here, before the backlog catches up.
async fn assert_sink_has_at_least(world: &World, sent: &BTreeMap<String, Expected>) {
    let state = world.client.state().await.expect("apisim state");
    let behind: Vec<String> = sent
        .iter()
        .filter(|(id, row)| {
            state.get(&format!("listing/{id}")).and_then(|s| s.version).is_none_or(|v| v < row.version)
        })
        .map(|(id, row)| format!("{id} (job sent v{})", row.version))
        .collect();
    assert!(
        behind.is_empty(),
        "completed while the sink lacked {} rows: {:?}",
        behind.len(),
        &behind[..behind.len().min(10)]
    );
}

/// The job's progress: (emitted, total).
async fn job_progress(world: &World) -> Option<(uuid::Uuid, i64, i64)> {
    let sql = world.schema.sql("SELECT id, emitted, total FROM {schema}.jobs WHERE total IS NOT NULL");
    let row: Option<(uuid::Uuid, i64, Option<i64>)> =
        sqlx::query_as(sql).fetch_optional(&world.pool).await.expect("job progress");
    row.map(|(id, emitted, total)| (id, emitted, total.unwrap_or(0)))
}

/// What befalls a resync job once it has published 30% of its rows.
#[derive(Clone, Copy)]
enum AtThirtyPercent<'a> {
    Nothing,
    /// SIGKILL, then `job resume` in a new process.
    KillTheJob,
    /// `pg_ctl restart -m fast` of the world's Postgres (the test's own) under the job.
    RestartPostgres(&'a resync_testkit::OwnPostgres),
}

/// A resync job over a table the third party has never seen, while 1% of the rows change and
/// are published live every second: consumers apply both streams with faults on, the job moves
/// from `published` to `completed` once every row is applied at the sink, and the third party
/// then equals the database with no stale overwrite and `job verify` finds no drift. In
/// `pause-live` mode the live stream is paused for the job and resumed at completion. `at_30`
/// says what befalls the job at 30%: nothing, a SIGKILL (and `job resume` by another process),
/// or a restart of its Postgres.
async fn a_resync_job_completes_once_its_sink_applied_every_row(
    kind: &'static str,
    rows: usize,
    args: &[&str],
    at_30: AtThirtyPercent<'_>,
) {
    let mut world = match at_30 {
        AtThirtyPercent::RestartPostgres(postgres) => {
            World::on_database(kind, faulty_api(31), postgres.url()).await
        }
        _ => World::new(kind, faulty_api(31)).await,
    };
    let (_, truth) = shuffled_history(rows, 3, 0.0, 31);
    world.seed(truth).await;
    // 1% of the rows per second is 1,000 live events/s at 100k rows: more consumers then.
    let consumers = (rows / 25_000).max(2);
    let _consumers: Vec<Process> = (0..consumers).map(|_| world.consumer("15s")).collect();

    let mode = if args.contains(&"pause-live") { "pause-live" } else { "concurrent" };
    let rate = match at_30 {
        // Ten seconds of reading, so the restart at 30% finds the readers mid-range.
        AtThirtyPercent::RestartPostgres(_) => (rows / 10).max(1),
        _ => (rows / 20).max(1000),
    }
    .to_string();
    let args = [&["job", "start", "--entity", "listing", "--rate", &rate], args].concat();
    // Every row as the job's snapshot will read it (live updates start after this).
    let at_start = world.truth.clone();
    let mut job = Process(world.resync().args(args).stdout(Stdio::null()).spawn().expect("job start"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180 + rows as u64 / 200);
    let mut checked_at_completion = false;
    let paused = world.schema.sql("SELECT count(*) FROM {schema}.paused_streams WHERE service = 'sync'");
    let (mut round, mut faulted, mut seen_paused) = (0, false, false);
    let mut next_round = tokio::time::Instant::now();
    let status = loop {
        if let Some(status) = job_exit(&mut job, &world, deadline) {
            break status;
        }
        if tokio::time::Instant::now() >= next_round {
            round += 1;
            live_updates(&mut world, 100, round).await;
            next_round += Duration::from_secs(1);
        }
        if !matches!(at_30, AtThirtyPercent::Nothing)
            && !faulted
            && let Some((id, emitted, total)) = job_progress(&world).await
            && emitted * 10 >= total * 3
        {
            faulted = true;
            match at_30 {
                AtThirtyPercent::KillTheJob => {
                    job.0.kill().expect("SIGKILL the job");
                    let _ = job.0.wait();
                    let resume = ["job", "resume", &id.to_string()];
                    job = Process(
                        world.resync().args(resume).stdout(Stdio::null()).spawn().expect("job resume"),
                    );
                }
                AtThirtyPercent::RestartPostgres(postgres) => {
                    assert!(emitted < total, "every row was published before the restart: it tested nothing");
                    let restarted_at = tokio::time::Instant::now();
                    postgres.restart();
                    eprintln!("postgres restarted at 30% of the job in {:?}", restarted_at.elapsed());
                }
                AtThirtyPercent::Nothing => {}
            }
        }
        let count: i64 = sqlx::query_scalar(paused.clone()).fetch_one(&world.pool).await.expect("paused");
        seen_paused |= count > 0;
        if !checked_at_completion && job_status(&world).await.as_deref() == Some("completed") {
            checked_at_completion = true;
            assert_sink_has_at_least(&world, &at_start).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !checked_at_completion {
        // The job process exits milliseconds after marking the job completed: check now.
        assert_sink_has_at_least(&world, &at_start).await;
    }
    assert!(status.success(), "resync job failed");
    assert_eq!(faulted, !matches!(at_30, AtThirtyPercent::Nothing), "the fault came at 30% only when asked");
    assert_eq!(seen_paused, mode == "pause-live", "live is paused during the job only in pause-live mode");
    let count: i64 = sqlx::query_scalar(paused).fetch_one(&world.pool).await.expect("paused");
    assert_eq!(count, 0, "live is resumed when the job completes");
    let jobs: Vec<(uuid::Uuid, String, i64, Option<i64>, i64)> =
        sqlx::query_as(world.schema.sql("SELECT id, status, emitted, total, applied FROM {schema}.jobs"))
            .fetch_all(&world.pool)
            .await
            .expect("jobs");
    let [(id, status, emitted, total, applied)] = &jobs[..] else { panic!("one job: {jobs:?}") };
    let rows = rows as i64;
    assert_eq!((status.as_str(), *total, *applied), ("completed", Some(rows), rows));
    // A killed or disconnected job re-sends at most the chunk each reader had in flight.
    assert!(*emitted >= rows && *emitted <= rows + 4 * 1000, "{emitted} published for {rows} rows");

    // The live backlog (all of it in pause-live mode) is applied after the job completes.
    world.wait_until_equal(Duration::from_secs(60 + rows as u64 / 100)).await;
    assert_no_stale_overwrite(&world).await;
    let verified = world.resync().args(["job", "verify", &id.to_string()]).output().expect("job verify");
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "verify found drift: {report}");
    assert!(report.contains(&format!("sync: {rows} entities checked, 0 drifting")), "{report}");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_job_with_live_updates_rides_out_a_postgres_restart_at_30_percent() {
    let postgres = resync_testkit::OwnPostgres::start();
    let at_30 = AtThirtyPercent::RestartPostgres(&postgres);
    let chunks = ["--chunk-size", "100"];
    a_resync_job_completes_once_its_sink_applied_every_row("rabbitmq", job_rows(2_000), &chunks, at_30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_resync_job_completes_with_live_updates_flowing() {
    a_resync_job_completes_once_its_sink_applied_every_row(
        "rabbitmq",
        job_rows(2_000),
        &[],
        AtThirtyPercent::Nothing,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_live_resync_job_pauses_live_and_completes() {
    let args = &["--mode", "pause-live"];
    a_resync_job_completes_once_its_sink_applied_every_row(
        "rabbitmq",
        job_rows(2_000),
        args,
        AtThirtyPercent::Nothing,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_job_killed_at_30_percent_with_live_updates_completes_without_drift() {
    a_resync_job_completes_once_its_sink_applied_every_row(
        "rabbitmq",
        job_rows(2_000),
        &[],
        AtThirtyPercent::KillTheJob,
    )
    .await;
}

/// On SNS/SQS (a fifth of the rows: the emulator is the bottleneck), with `--direct`: the job
/// sends straight to the subscriber's queue with SendMessageBatch (no SNS publish), live events
/// keep flowing through SNS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_direct_resync_job_completes_with_live_updates_flowing() {
    let rows = job_rows(2_000) / 5;
    a_resync_job_completes_once_its_sink_applied_every_row(
        "sns-sqs",
        rows,
        &["--direct"],
        AtThirtyPercent::Nothing,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_a_pause_live_resync_job_through_the_topic_completes() {
    let (rows, args) = (job_rows(2_000) / 5, &["--mode", "pause-live"]);
    a_resync_job_completes_once_its_sink_applied_every_row("sns-sqs", rows, args, AtThirtyPercent::Nothing)
        .await;
}

/// One job, two subscribing services with a sink each: it completes only once both applied
/// every row. With the second service's consumer not started, the job stays `published` with
/// nothing accounted for, although the first sink has every row; started, the second catches
/// up, the job completes with both sinks holding every row, and `job verify` checks both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_two_sinks_completes_only_once_both_applied_every_row() {
    let mut world = World::new("rabbitmq", ApiConfig::default()).await;
    world.add_sink_service("search", "search_listing").await;
    let (_, truth) = shuffled_history(300, 2, 0.0, 51);
    world.seed(truth).await;
    let _sync = world.consumer("15s");
    let start = ["job", "start", "--entity", "listing", "--chunk-size", "100"];
    let mut job = Process(world.resync().args(start).stdout(Stdio::null()).spawn().expect("job start"));

    // Generous limits: hang guards for a loaded machine, not timing claims.
    resync_testkit::poll_some(Duration::from_secs(120), "the first sink holding every row", || async {
        let state = world.client.state().await.expect("apisim state");
        compare("listing", &world.truth, &state).is_empty().then_some(())
    })
    .await;
    resync_testkit::poll_some(Duration::from_secs(60), "the job published", || async {
        (job_status(&world).await.as_deref() == Some("published")).then_some(())
    })
    .await;
    let applied: i64 = sqlx::query_scalar(world.schema.sql("SELECT applied FROM {schema}.jobs"))
        .fetch_one(&world.pool)
        .await
        .expect("job progress");
    assert_eq!(applied, 0, "rows accounted for while the second sink has applied nothing");
    assert!(job.0.try_wait().expect("job process").is_none(), "the job ended without the second sink");

    let _search = world.consumer_of("search", "15s", "127.0.0.1:0".parse().expect("addr"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = job_exit(&mut job, &world, deadline) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "resync job failed");
    assert_eq!(job_status(&world).await.as_deref(), Some("completed"));
    let state = world.client.state().await.expect("apisim state");
    for entity_type in ["listing", "search_listing"] {
        let missing = compare(entity_type, &world.truth, &state);
        assert!(missing.is_empty(), "{entity_type}: completed without {} rows", missing.len());
    }
    let id: uuid::Uuid = sqlx::query_scalar(world.schema.sql("SELECT id FROM {schema}.jobs"))
        .fetch_one(&world.pool)
        .await
        .expect("job id");
    let verified = world.resync().args(["job", "verify", &id.to_string()]).output().expect("job verify");
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "verify found drift: {report}");
    for sink in ["sync", "search"] {
        assert!(report.contains(&format!("{sink}: 300 entities checked, 0 drifting")), "{report}");
    }
    world.cleanup().await;
}

/// The job process's exit status once it exited; fails the test after `deadline`.
fn job_exit(
    job: &mut Process,
    world: &World,
    deadline: tokio::time::Instant,
) -> Option<std::process::ExitStatus> {
    let status = job.0.try_wait().expect("job process");
    assert!(
        status.is_some() || tokio::time::Instant::now() < deadline,
        "the job did not complete\n{}",
        world.consumer_logs()
    );
    status
}

/// Runs `resync job start` for listings with `extra` flags to its end.
async fn run_job(world: &World, extra: &[&str]) {
    let mut args = vec!["job", "start", "--entity", "listing"];
    args.extend_from_slice(extra);
    let mut job = Process(world.resync().args(&args).stdout(Stdio::null()).spawn().expect("job start"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = job_exit(&mut job, world, deadline) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "resync job start {extra:?} failed");
}

/// Rows deleted straight from the table (no events) stay at the third party until a job with
/// `--delete-missing` sends them tombstones: a dry run shows them, the guard refuses a job over
/// `--max-deletes` before anything is sent, `--filter` confines the deletes to its scope, and an
/// entity re-created after the job started ends present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_removes_what_the_source_lost_within_its_guard_and_scope() {
    let mut world = World::new("rabbitmq", ApiConfig::default()).await;
    let truth: BTreeMap<String, Expected> = (0..2000)
        .map(|i| {
            let data = serde_json::json!({"title": format!("listing {i}"), "price": i % 100});
            (format!("L{i:04}"), Expected { version: 1, deleted: false, data })
        })
        .collect();
    world.seed(truth.clone()).await;
    let _consumers: Vec<Process> = (0..2).map(|_| world.consumer("15s")).collect();
    run_job(&world, &["--target-service", "sync"]).await;
    world.wait_until_equal(Duration::from_secs(120)).await;

    // A hundred rows vanish without an event: sixty cheap (price < 50), forty dear.
    let gone: Vec<String> = truth.keys().step_by(20).cloned().collect();
    let delete = world.schema.sql("DELETE FROM {schema}.listings WHERE id = ANY($1)");
    sqlx::query(delete).bind(&gone).execute(&world.pool).await.expect("delete rows");
    for id in &gone {
        world.truth.remove(id);
    }
    let cheap = |id: &String| truth[id].data["price"].as_i64().is_some_and(|p| p < 50);
    let (gone_cheap, gone_dear): (Vec<String>, Vec<String>) = gone.iter().cloned().partition(cheap);
    assert!(!gone_cheap.is_empty() && !gone_dear.is_empty(), "both sides of the filter lose rows");
    let start = ["job", "start", "--entity", "listing", "--target-service", "sync", "--delete-missing"];

    let preview =
        world.resync().args(start).args(["--max-deletes", "10", "--dry-run"]).output().expect("dry run");
    let printed = String::from_utf8_lossy(&preview.stdout);
    assert!(preview.status.success(), "dry run: {}", String::from_utf8_lossy(&preview.stderr));
    assert!(printed.contains(&format!("dry run: {} of the 2000 entities", gone.len())), "{printed}");
    assert!(printed.contains(&gone[0]) && printed.contains("over the limit"), "{printed}");

    let writes_before = world.applied_writes().await;
    let refused = world.resync().args(start).args(["--max-deletes", "10"]).output().expect("job start");
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a job over --max-deletes is refused");
    assert!(refusal.contains(&format!("refusing to delete {} entities", gone.len())), "{refusal}");
    let jobs: i64 = sqlx::query_scalar(world.schema.sql("SELECT count(*) FROM {schema}.jobs"))
        .fetch_one(&world.pool)
        .await
        .expect("jobs");
    assert_eq!(jobs, 1, "the refused job was not recorded");
    assert_eq!(world.applied_writes().await, writes_before, "nothing was sent");

    run_job(
        &world,
        &["--target-service", "sync", "--delete-missing", "--filter", "(data->>'price')::int < 50"],
    )
    .await;
    let state = world.client.state().await.expect("apisim state");
    let deleted_at_sink = |id: &String| state.get(&format!("listing/{id}")).is_some_and(|s| s.deleted);
    assert!(gone_cheap.iter().all(deleted_at_sink), "every entity in the filter's scope is deleted");
    assert!(!gone_dear.iter().any(deleted_at_sink), "no entity outside the filter's scope is deleted");

    // The application re-creates one of the dear ones after the next job is recorded.
    let job = world.resync().args(start).arg("--detach").output().expect("job start --detach");
    assert!(job.status.success(), "job start --detach: {}", String::from_utf8_lossy(&job.stderr));
    let id = String::from_utf8_lossy(&job.stdout).split_whitespace().nth(1).unwrap_or_default().to_string();
    let recreated =
        Expected { version: 2, deleted: false, data: serde_json::json!({"title": "back", "price": 99}) };
    let mut tx = world.pool.begin().await.expect("begin");
    world.source.upsert(&mut tx, &gone_dear[0], &recreated).await.expect("re-create");
    tx.commit().await.expect("commit");
    world.truth.insert(gone_dear[0].clone(), recreated.clone());
    let mut event = Envelope::new("listing.created", gone_dear[0].clone(), 2, recreated.data.clone());
    event.stream = Stream::Live;
    world.publish_events(&[event]).await;
    let resumed = world.resync().args(["job", "resume", &id]).output().expect("job resume");
    assert!(resumed.status.success(), "job resume: {}", String::from_utf8_lossy(&resumed.stderr));

    world.wait_until_equal(Duration::from_secs(120)).await;
    assert_no_stale_overwrite(&world).await;
    let deleted: Vec<i64> =
        sqlx::query_scalar(world.schema.sql("SELECT deleted FROM {schema}.jobs ORDER BY created_at"))
            .fetch_all(&world.pool)
            .await
            .expect("jobs");
    let expected_deletes = [0, gone_cheap.len() as i64, gone_dear.len() as i64 - 1];
    assert_eq!(deleted, expected_deletes, "each job counts the tombstones it sent");
    world.cleanup().await;
}

/// An HTTP receiver of the test's own: keeps the JSON body of every POST, answers 204.
async fn json_receiver() -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            let body = loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    break Some(body[..length].to_string());
                }
            };
            if let Some(body) = body.and_then(|b| serde_json::from_str(&b).ok()) {
                keep.lock().expect("received").push(body);
            }
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await;
        }
    });
    (url, received)
}

/// `--notify URL` gets a JSON document at every change of a job's state, from whichever process
/// made it: started (`job start --detach`), paused (`job pause`), resumed and completed (`job
/// resume`, which runs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_receiver_gets_every_transition_of_a_paused_resumed_and_completed_job() {
    let mut world = World::new("rabbitmq", ApiConfig::default()).await;
    let (_, truth) = shuffled_history(300, 1, 0.0, 43);
    world.seed(truth).await;
    let _consumer = world.consumer("15s");
    let (url, received) = json_receiver().await;

    let started =
        world.resync().args(["job", "start", "--entity", "listing", "--detach", "--notify", &url]).output();
    let started = started.expect("job start");
    assert!(started.status.success(), "job start: {}", String::from_utf8_lossy(&started.stderr));
    let id =
        String::from_utf8_lossy(&started.stdout).split_whitespace().nth(1).unwrap_or_default().to_string();
    for step in [vec!["job", "pause", &id], vec!["job", "resume", &id]] {
        let out = world.resync().args(&step).output().expect("job command");
        assert!(out.status.success(), "{step:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let events: Vec<serde_json::Value> = received.lock().expect("received").clone();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["started", "paused", "resumed", "completed"], "{events:#?}");
    assert!(events.iter().all(|e| e["job"]["id"] == id.as_str()), "every notice names the job: {events:#?}");
    assert_eq!(events[3]["job"]["status"], "completed");
    assert_eq!(events[3]["job"]["applied"], 300);
    let shown = world.resync().args(["job", "show", &id]).output().expect("job show");
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("status     completed") && shown.contains("applied    300"), "{shown}");
    world.cleanup().await;
}

/// A resync re-sends every entity, also at the version the sink has (after a bug in the sync
/// the third party may hold something else); with `--skip-unchanged`, entities whose content the
/// sink has cost no API call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_resync_resends_everything_unless_told_to_skip_unchanged() {
    let mut world = World::new("rabbitmq", ApiConfig::default()).await;
    let (_, truth) = shuffled_history(300, 2, 0.0, 41);
    world.seed(truth).await;
    let _consumer = world.consumer("15s");

    run_job(&world, &[]).await;
    world.wait_until_equal(Duration::from_secs(60)).await;
    let first = world.applied_writes().await;
    assert_eq!(first, 300, "the first resync sends every entity once");

    run_job(&world, &["--skip-unchanged"]).await;
    assert_eq!(world.applied_writes().await, first, "nothing changed: no API call");

    run_job(&world, &[]).await;
    assert_eq!(world.applied_writes().await, first + 300, "a plain resync sends every entity again");

    // Each job's report counts what the sink's consumers did with its events.
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar(world.schema.sql("SELECT id FROM {schema}.jobs ORDER BY created_at"))
            .fetch_all(&world.pool)
            .await
            .expect("jobs");
    let outcomes: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            let shown =
                world.resync().args(["job", "show", &id.to_string(), "--json"]).output().expect("job show");
            let report: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("job show --json");
            report["outcomes"]["sync"].clone()
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            serde_json::json!({"applied": 300}),
            serde_json::json!({"skipped_unchanged": 300}),
            serde_json::json!({"applied": 300})
        ]
    );
    world.cleanup().await;
}
