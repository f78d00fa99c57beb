//! Many consumers through a transaction-mode PgBouncer: what lets 150+ consumer processes run
//! against a Postgres whose `max_connections` is 100.

use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use resync_consumer::{Db, Pooling};
use resync_testkit::pgbouncer::PgBouncer;
use sqlx::{Connection, Row};

use crate::support::{World, history, newest_states, rabbitmq, with_world};

const CONSUMERS: usize = 150;
const SERVER_CONNECTIONS: u32 = 8;

/// The rows of an admin console `SHOW` command that belong to `database`.
async fn pooler_rows(admin: &mut sqlx::PgConnection, show: &'static str, database: &str) -> usize {
    let rows = sqlx::raw_sql(show).fetch_all(admin).await.expect("pgbouncer admin console");
    rows.iter().filter(|row| row.try_get::<String, _>("database").is_ok_and(|d| d == database)).count()
}

/// 150 consumers, each with its own client connection to one PgBouncer that may open at most 8
/// connections to Postgres (its `default_pool_size`, which PgBouncer itself enforces, so the
/// test does not count them): every event ends applied in its newest state and nothing older
/// is written after something newer, all through transaction pooling (no session state, no
/// named prepared statements surviving a transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_and_fifty_consumers_share_eight_postgres_connections_through_pgbouncer() {
    let bouncer = PgBouncer::start(SERVER_CONNECTIONS, 4 * CONSUMERS as u32).await;
    let world = World::new(rabbitmq().await).await;
    with_world(world, move |w| async move {
        let (entities, versions) = (300, 3);
        let mut events = history(entities, versions);
        events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
        w.publish(&events).await;

        let mut consumers = Vec::new();
        for _ in 0..CONSUMERS {
            let db = Db::connect(&bouncer.url(), 1, Pooling::Transaction)
                .await
                .expect("connect through pgbouncer");
            consumers.push(w.consumer_through(w.transport.clone(), Duration::from_secs(10), db).await);
        }
        let mut admin =
            sqlx::PgConnection::connect(&bouncer.admin_url()).await.expect("pgbouncer admin console");
        let database = bouncer.database();
        let clients = pooler_rows(&mut admin, "SHOW CLIENTS", database).await;
        assert!(clients >= CONSUMERS, "every consumer holds a client connection ({clients})");

        let expected = newest_states(entities, versions);
        w.run_until_applied(consumers, &expected, Duration::from_secs(240)).await;
        assert_eq!(w.sink.state(), expected, "the third party ends with the newest state of every entity");
        assert_eq!(w.sink.stale_overwrites(), vec![], "no older version was ever written after a newer one");
    })
    .await;
}
