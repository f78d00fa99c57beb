//! A private PgBouncer in transaction mode in front of the test Postgres, on its own port and
//! directory, stopped when dropped: tests of many clients sharing a few server connections
//! start one each instead of sharing (and reconfiguring) a system-wide pooler.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Service;

pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
    user: String,
    database: String,
}

/// The parts of the Postgres URL the pooler needs.
struct Upstream {
    host: String,
    port: u16,
    user: String,
    database: String,
}

fn upstream() -> Upstream {
    let addr = Service::Postgres.socket_addr();
    let url = Service::Postgres.url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let user = rest.split_once('@').map_or("postgres", |(u, _)| u.split(':').next().unwrap_or(u));
    let database = rest.rsplit_once('/').map_or("postgres", |(_, d)| d.split('?').next().unwrap_or(d));
    Upstream { host: addr.ip().to_string(), port: addr.port(), user: user.into(), database: database.into() }
}

/// A port nobody listens on now (the pooler binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl PgBouncer {
    /// Starts PgBouncer with at most `server_connections` connections to Postgres and
    /// `max_clients` clients, and waits until it accepts connections.
    pub async fn start(server_connections: u32, max_clients: u32) -> Self {
        let up = upstream();
        let port = free_port();
        let dir = std::env::temp_dir().join(crate::unique_name("pgbouncer"));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let config = format!(
            "[databases]\n\
             {db} = host={host} port={pg_port} dbname={db}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             admin_users = {user}\n\
             pool_mode = transaction\n\
             default_pool_size = {server_connections}\n\
             max_db_connections = {server_connections}\n\
             max_client_conn = {max_clients}\n\
             ignore_startup_parameters = extra_float_digits, options\n",
            db = up.database,
            host = up.host,
            pg_port = up.port,
            user = up.user,
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), config).expect("pgbouncer.ini");
        std::fs::write(dir.join("users.txt"), format!("\"{}\" \"\"\n", up.user)).expect("users.txt");
        let mut command = Command::new("pgbouncer");
        // PgBouncer refuses to run as root; it drops to another user when told to.
        if crate::is_root() {
            command.args(["-u", "postgres"]);
            let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
        }
        let log = std::fs::File::create(dir.join("pgbouncer.log")).expect("pgbouncer.log");
        let child =
            command.arg(dir.join("pgbouncer.ini")).stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(
                |e| {
                    panic!(
                        "cannot start pgbouncer ({e}): install it with `scripts/services-up` \
                     (or `apt-get install pgbouncer`)"
                    )
                },
            );
        let bouncer = Self { child, dir, port, user: up.user, database: up.database };
        bouncer.wait_until_listening().await;
        bouncer
    }

    async fn wait_until_listening(&self) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
                panic!("pgbouncer did not listen on {addr} within 10 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The database URL of the test database through the pooler.
    pub fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/{}", self.user, self.port, self.database)
    }

    /// The database the pooler serves (the test database's name).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The URL of the pooler's admin console (`SHOW CLIENTS`, `SHOW SERVERS`, ...).
    pub fn admin_url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/pgbouncer", self.user, self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
