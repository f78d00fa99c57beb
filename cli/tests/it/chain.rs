//! The whole chain as users run it: the application writes its rows and calls `resync.emit` in
//! the same transaction (SQL, as from any language); `resync relay` publishes; `resync consume`
//! processes apply to the API simulator; a resync job runs while live writes continue. The
//! oracle is the source table read back from Postgres with resync's version counter, and the
//! simulator's write log, read here rather than trusted from its own check.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fare_config::Topology;
use rand::{Rng, SeedableRng};
use resync_apisim::Config as ApiConfig;
use resync_bus::{Transport, TransportConfig};
use resync_demo::scenario::{Expected, compare};
use resync_migrations::Schema;
use resync_testkit::{Service, service_unreachable, unique_name};

use crate::consume::{log_tails, resync_command, stale_writes};
use crate::relay::{Process, free_port};

/// Rows loaded before resync was adopted: no `resync.emit`, so resync has no version for them.
const PRELOADED: i64 = 300;

/// A schema, an `items` table keyed by integers, a service publishing `item.*` with the table as
/// its source, a `sync` service applying `item.*` to the simulator, and their topology.
struct Chain {
    namespace: String,
    schema: Schema,
    pool: sqlx::PgPool,
    transport: Arc<dyn Transport>,
    topology: Topology,
    config_dir: PathBuf,
    api: resync_apisim::Running,
    client: resync_apisim::Client,
}

impl Chain {
    async fn new(faults: ApiConfig) -> Self {
        let namespace = unique_name("chain");
        let schema = Schema::new(namespace.replace('-', "_")).expect("schema");
        if let Err(err) = resync_migrations::migrate(&Service::Postgres.url(), &schema).await {
            service_unreachable(Service::Postgres, err);
        }
        let pool = sqlx::PgPool::connect(&Service::Postgres.url())
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
        // `version` is the application's own optimistic-lock counter, starting at 10: it means
        // nothing to resync, and the source does not name it.
        let create = schema.sql(
            "CREATE TABLE {schema}.items (id integer PRIMARY KEY, version integer NOT NULL, \
             deleted boolean NOT NULL, data jsonb NOT NULL)",
        );
        sqlx::query(create).execute(&pool).await.expect("create items");
        let load = schema.sql(
            "INSERT INTO {schema}.items SELECT n, 10, false, jsonb_build_object('n', n, 'rev', 0) \
             FROM generate_series(1, $1::int) n",
        );
        sqlx::query(load).bind(PRELOADED as i32).execute(&pool).await.expect("load items");

        let api = resync_apisim::start(faults).await.expect("start apisim");
        let client = api.client().expect("apisim client");
        let config_dir = std::env::temp_dir().join(&namespace);
        std::fs::create_dir_all(&config_dir).expect("config dir");
        let items = format!(
            "name = \"items\"\npublishes = [\"item.updated\", \"item.deleted\", \"tag.updated\"]\n\
             [[sources]]\nentity = \"item\"\n\
             table = \"{}.items\"\ndata_column = \"data\"\ndeleted_column = \"deleted\"\n",
            schema.name()
        );
        std::fs::write(config_dir.join("items.toml"), items).expect("config");
        let sync = format!(
            "name = \"sync\"\n[[subscriptions]]\ntypes = [\"item.*\", \"tag.*\"]\n\
             [sink]\nurl = \"{}/entities/{{entity_type}}/{{entity_id}}\"\ntimeout = \"2s\"\n",
            api.url()
        );
        std::fs::write(config_dir.join("sync.toml"), sync).expect("config");
        let transport = match TransportConfig::named("rabbitmq").expect("transport").connect().await {
            Ok(transport) => transport,
            Err(err) => service_unreachable(Service::RabbitMq, err),
        };
        let catalog = fare_config::load_dir(&config_dir).expect("valid config");
        let topology = Topology::desired(&catalog, Some(&namespace));
        fare_config::apply(transport.as_ref(), &topology).await.expect("fare apply");
        Self { namespace, schema, pool, transport, topology, config_dir, api, client }
    }

    fn resync(&self) -> Command {
        let redis = Service::Redis.url();
        resync_command(&self.config_dir, "rabbitmq", &self.schema, &self.namespace, &redis)
    }

    /// A long-running `resync` process, its log in the config dir.
    fn spawn(&self, name: &str, args: &[&str]) -> Process {
        let log = std::fs::File::create(self.config_dir.join(format!("{}.log", unique_name(name))))
            .expect("process log");
        let listen = free_port().to_string();
        let child = self
            .resync()
            .args(args)
            .args(["--listen", &listen])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start resync {name}: {e}"));
        Process(child)
    }

    /// One application write: the row and its event in one transaction, through the SQL
    /// function. Deletes a live row one time in eight, re-creates a deleted one.
    async fn write(&self, id: i32, rng: &mut rand::rngs::StdRng) {
        let mut tx = self.pool.begin().await.expect("begin");
        let read = self.schema.sql("SELECT deleted FROM {schema}.items WHERE id = $1 FOR UPDATE");
        let was_deleted: bool = sqlx::query_scalar(read).bind(id).fetch_one(&mut *tx).await.expect("row");
        let deleted = !was_deleted && rng.random_ratio(1, 8);
        let update = self.schema.sql(
            "UPDATE {schema}.items SET version = version + 1, deleted = $2, \
             data = jsonb_build_object('n', id, 'rev', (data->>'rev')::int + 1) WHERE id = $1 RETURNING data",
        );
        let data: serde_json::Value =
            sqlx::query_scalar(update).bind(id).bind(deleted).fetch_one(&mut *tx).await.expect("update");
        let event_type = if deleted { "item.deleted" } else { "item.updated" };
        let emit = self.schema.sql("SELECT version FROM {schema}.emit('item', $1, $2, $3, $4)");
        let query = sqlx::query(emit).bind(id.to_string()).bind(event_type).bind(&data).bind(deleted);
        query.execute(&mut *tx).await.expect("resync.emit");
        tx.commit().await.expect("commit");
    }

    /// The table as it is now, each row at the version resync's counter holds for it.
    async fn truth(&self) -> BTreeMap<String, Expected> {
        let sql = self.schema.sql(
            "SELECT i.id::text, ev.version, i.deleted, i.data FROM {schema}.items i \
             LEFT JOIN {schema}.entity_versions ev ON ev.entity_type = 'item' AND ev.entity_id = i.id::text",
        );
        let rows: Vec<(String, Option<i64>, bool, serde_json::Value)> =
            sqlx::query_as(sql).fetch_all(&self.pool).await.expect("read the table");
        rows.into_iter()
            .map(|(id, version, deleted, data)| {
                let version = version.unwrap_or_else(|| {
                    panic!("item {id} has no version in resync's counter: a job gives every row it sends one")
                });
                (id, Expected { version, deleted, data })
            })
            .collect()
    }

    /// Waits until the simulator holds exactly the table.
    async fn wait_until_equal(&self, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let truth = self.truth().await;
            let state = self.client.state().await.expect("apisim state");
            let mismatches = compare("item", &truth, &state);
            if mismatches.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} items differ from the table (first: {:?})\n{}",
                mismatches.len(),
                mismatches.first(),
                log_tails(&self.config_dir)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn cleanup(self) {
        let _ = fare_config::delete(self.transport.as_ref(), &self.topology).await;
        let _ = sqlx::query(self.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&self.pool).await;
        let _ = std::fs::remove_dir_all(&self.config_dir);
        let _ = self.api.shutdown().await;
    }
}

/// Rows loaded without `resync.emit` next to a column the application keeps for itself: a
/// resync while live writes (updates, deletes, re-creations) flow, then more live writes, must
/// leave the third party equal to the table. The job once sent the table's `version` column
/// (10 and up here) as the entity version, and every live event after it (`resync.emit`'s 1, 2,
/// ...) was dropped as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_relay_consume_and_a_resync_leave_the_third_party_equal_to_a_table_without_a_version_column() {
    let chain =
        Arc::new(Chain::new(ApiConfig { error_rate: 0.05, seed: Some(21), ..ApiConfig::default() }).await);
    let relay = chain.spawn("relay", &["relay", "--poll-interval", "100ms"]);
    let consumers: Vec<Process> = (0..2)
        .map(|_| chain.spawn("consumer", &["consume", "--service", "sync", "--lock-lease", "15s"]))
        .collect();

    let (stop, writes) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let writer = {
        let (chain, stop, writes) = (chain.clone(), stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            // Half the ids only: the others keep no counter until the job gives them one.
            while !stop.load(Ordering::Relaxed) {
                let id = rng.random_range(1..=PRELOADED as i32 / 2) * 2;
                chain.write(id, &mut rng).await;
                writes.fetch_add(1, Ordering::Relaxed);
                // Spread the writes over the job rather than racing it.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while writes.load(Ordering::Relaxed) < 50 {
        assert!(!writer.is_finished(), "the writer stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut job = chain.resync();
    job.args(["job", "start", "--entity", "item", "--chunk-size", "7", "--readers", "2"]);
    let job = tokio::task::spawn_blocking(move || job.output()).await.expect("job task").expect("job start");
    assert!(job.status.success(), "job start failed: {}", String::from_utf8_lossy(&job.stderr));
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    chain.wait_until_equal("after the resync").await;

    // Live writes after the resync, also to items only the job ever sent.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for id in (1..=PRELOADED as i32).step_by(10) {
        chain.write(id, &mut rng).await;
    }
    chain.wait_until_equal("after live writes that followed the resync").await;

    let log = chain.client.log_all().await.expect("apisim log");
    assert_eq!(stale_writes(&log), Vec::<String>::new(), "no write older than one before it");
    drop((relay, consumers));
    let chain = Arc::into_inner(chain).expect("the writer is done");
    chain.cleanup().await;
}

/// Two entity types with the same ids, emitted in the same transactions: the relay publishes
/// each to its own topic, one consumer applies both, each to its type's URL, each entity at
/// its own version (the counter is per type and id), and no write of one lands on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_under_two_entity_types_stays_two_entities_through_the_chain() {
    let chain = Chain::new(ApiConfig::default()).await;
    let _relay = chain.spawn("relay", &["relay", "--poll-interval", "100ms"]);
    let _consumer = chain.spawn("consumer", &["consume", "--service", "sync", "--lock-lease", "15s"]);
    let emit = chain.schema.sql("SELECT version FROM {schema}.emit($1, $2, $3, $4)");
    for round in 1..=3 {
        let mut tx = chain.pool.begin().await.expect("begin");
        for id in 1..=20 {
            // Tags change twice as often as items: their versions run ahead.
            let writes: &[&str] = if round == 1 { &["item", "tag", "tag"] } else { &["tag", "item", "tag"] };
            for (write, entity) in writes.iter().enumerate() {
                // Each write changes the content: an unchanged one is recorded, never sent.
                let data = serde_json::json!({"entity": entity, "id": id, "round": round, "write": write});
                let query = sqlx::query(emit.clone()).bind(entity).bind(id.to_string());
                query.bind(format!("{entity}.updated")).bind(data).execute(&mut *tx).await.expect("emit");
            }
        }
        tx.commit().await.expect("commit");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let state = chain.client.state().await.expect("apisim state");
        let done = (1..=20).all(|id| {
            let at = |entity: &str, version: i64| {
                state.get(&format!("{entity}/{id}")).is_some_and(|s| {
                    s.version == Some(version) && s.data["round"] == 3 && s.data["entity"] == entity
                })
            };
            at("item", 3) && at("tag", 6)
        });
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every item and tag arrived: {state:?}\n{}",
            log_tails(&chain.config_dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = chain.client.log_all().await.expect("apisim log");
    assert_eq!(stale_writes(&log), Vec::<String>::new());
    assert!(log.iter().all(|w| w.entity_type == "item" || w.entity_type == "tag"), "only the two types");
    drop((_relay, _consumer));
    chain.cleanup().await;
}
