//! A PostgreSQL server owned by one test: its own data directory and port, restarted at will
//! (`pg_ctl restart -m fast`, as an upgrade or a failover would), never the shared one.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{free_port, unique_name};

pub struct OwnPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

/// Postgres refuses to run as root; a test run as root runs it as the `postgres` user.
fn as_server_user(program: &Path) -> Command {
    if crate::is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// The newest server installed under `/usr/lib/postgresql/*/bin` (Debian), else the PATH's.
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0)
    });
    versions.pop().unwrap_or_default()
}

impl OwnPostgres {
    /// `initdb` (trust authentication, no fsync: a test server) and a started server with a
    /// `test` database, on a free port.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("postgres"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        if crate::is_root() {
            let _ = Command::new("chown").args(["-R", "postgres"]).arg(&dir).status();
        }
        let postgres = Self { bin: server_bin(), dir, port: free_port() };
        postgres.run("initdb", &["-D", &postgres.data(), "-U", "postgres", "--auth=trust", "-E", "UTF8"]);
        postgres.pg_ctl("start");
        let created = Command::new(postgres.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &postgres.port.to_string(), "-U", "postgres", "-qc"])
            .arg("CREATE DATABASE test")
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(created.status.success(), "CREATE DATABASE: {}", String::from_utf8_lossy(&created.stderr));
        postgres
    }

    /// A hot standby of this server (`pg_basebackup -R`: streaming replication), on a port of
    /// its own, started.
    pub fn start_standby(&self) -> OwnPostgres {
        let dir = std::env::temp_dir().join(unique_name("postgres-standby"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        if crate::is_root() {
            let _ = Command::new("chown").args(["-R", "postgres"]).arg(&dir).status();
        }
        let standby = Self { bin: self.bin.clone(), dir, port: free_port() };
        let port = self.port.to_string();
        let data = standby.data();
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        standby.pg_ctl("start");
        standby
    }

    /// Runs one SQL statement with psql, as `postgres`, on the `test` database.
    pub fn psql(&self, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "test",
                "-Atqc",
                sql,
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(output.status.success(), "psql `{sql}`: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/test", self.port)
    }

    /// `pg_ctl restart -m fast`: every session is disconnected, in-flight transactions roll
    /// back, and the server is back (accepting connections) when this returns.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[action, "-D", &self.data(), "-m", "fast", "-w", "-t", "60", "-o", &options, "-l", &log],
        );
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let output = as_server_user(&path)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (is PostgreSQL installed?): {e}", path.display()));
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        assert!(
            output.status.success(),
            "{program} {args:?} failed:\n{}{}\n--- server log\n{log}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let _ = as_server_user(&path).args(["stop", "-D", &self.data(), "-m", "immediate"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
