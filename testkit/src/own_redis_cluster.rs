//! A Redis Cluster owned by one test: three primaries with a replica each, on ports of their
//! own, never the shared Redis. A test may kill a primary and watch the cluster fail over.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, poll_some, unique_name};

const NODES: usize = 6;

/// How long a primary may be silent before its replica takes over. Short, so a failover test
/// waits seconds, not the default 15 s; long enough that a busy CI machine does not fail over
/// a healthy primary.
const NODE_TIMEOUT_MS: u32 = 3000;

pub struct OwnRedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    dir: PathBuf,
}

impl OwnRedisCluster {
    /// Starts six nodes, joins them (`redis-cli --cluster create`, one replica per primary) and
    /// waits until every node reports `cluster_state:ok` and every replica is in sync.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("redis-cluster"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut cluster = Self { nodes: Vec::new(), dir };
        for _ in 0..NODES {
            let port = free_port();
            let child = cluster.launch(port);
            cluster.nodes.push((port, Some(child)));
        }
        for &(port, _) in &cluster.nodes {
            let addr = format!("127.0.0.1:{port}");
            poll_some(Duration::from_secs(10), "cluster node listening", || {
                let addr = addr.clone();
                async move { TcpStream::connect(&addr).is_ok().then_some(()) }
            })
            .await;
        }
        let addresses: Vec<String> =
            cluster.nodes.iter().map(|(port, _)| format!("127.0.0.1:{port}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.await_healthy().await;
        cluster.await_replicas_in_sync().await;
        cluster
    }

    /// A replica that has not finished its first sync refuses to take over from its primary,
    /// so a failover test must not kill one before this.
    async fn await_replicas_in_sync(&self) {
        poll_some(Duration::from_secs(60), "every replica linked to its primary", || {
            let linked = self
                .nodes
                .iter()
                .map(|(port, _)| self.cli(*port, &["info", "replication"]))
                .filter(|info| info.contains("role:slave"))
                .filter(|info| info.contains("master_link_status:up"))
                .count();
            async move { (linked == NODES / 2).then_some(()) }
        })
        .await;
    }

    fn launch(&self, port: u16) -> Child {
        let port_text = port.to_string();
        Command::new("redis-server")
            .args(["--port", &port_text, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"))
    }

    /// The seed URLs, comma-separated, as `RESYNC_REDIS_URL` takes them.
    pub fn urls(&self) -> String {
        let urls: Vec<String> =
            self.nodes.iter().map(|(port, _)| format!("redis://127.0.0.1:{port}")).collect();
        urls.join(",")
    }

    /// The ports of the nodes that are primaries now, as the first live node sees it.
    pub fn primaries(&self) -> Vec<u16> {
        let nodes = self.cli(self.live_port(), &["cluster", "nodes"]);
        nodes
            .lines()
            .filter(|line| line.contains("master") && !line.contains("fail"))
            .filter_map(port_of)
            .collect()
    }

    /// The primary serving `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot = self.cli(self.live_port(), &["cluster", "keyslot", key]);
        let slot: u16 =
            slot.trim().parse().unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {slot:?}: {e}"));
        let slots = self.cli(self.live_port(), &["cluster", "nodes"]);
        slots
            .lines()
            .filter(|line| line.contains("master") && !line.contains("fail"))
            .find(|line| line.split_whitespace().skip(8).any(|range| covers(range, slot)))
            .and_then(port_of)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}:\n{slots}"))
    }

    /// SIGKILL on the node at `port`: it vanishes mid-connection, as in a crash.
    pub fn kill(&mut self, port: u16) {
        if let Some((_, child)) = self.nodes.iter_mut().find(|(p, _)| *p == port)
            && let Some(mut child) = child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every slot is served by a primary that is running and every running node
    /// reports `cluster_state:ok`: after a kill, until the cluster noticed (`cluster-node-timeout`)
    /// and promoted a replica.
    pub async fn await_healthy(&self) {
        let live: Vec<u16> =
            self.nodes.iter().filter(|(_, child)| child.is_some()).map(|(port, _)| *port).collect();
        poll_some(Duration::from_secs(60), "every slot served by a running primary", || {
            let nodes = self.cli(self.live_port(), &["cluster", "nodes"]);
            let served: u32 = nodes
                .lines()
                .filter(|line| line.contains("master") && !line.contains("fail"))
                .filter(|line| port_of(line).is_some_and(|port| live.contains(&port)))
                .flat_map(|line| line.split_whitespace().skip(8).map(slot_count).collect::<Vec<_>>())
                .sum();
            let ok = served == 16384
                && live.iter().all(|&port| self.cli(port, &["cluster", "info"]).contains("cluster_state:ok"));
            async move { ok.then_some(()) }
        })
        .await;
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
            .unwrap_or_else(|| panic!("no cluster node is running"))
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The port of a `CLUSTER NODES` line (`id 127.0.0.1:port@cport flags ...`).
fn port_of(line: &str) -> Option<u16> {
    line.split_whitespace().nth(1)?.split(['@', ':']).nth(1)?.parse().ok()
}

/// How many slots a `CLUSTER NODES` slot field (`5461-10922`, or one slot) names.
fn slot_count(range: &str) -> u32 {
    let (start, end) = range.split_once('-').unwrap_or((range, range));
    match (start.parse::<u32>(), end.parse::<u32>()) {
        (Ok(start), Ok(end)) if end >= start => end - start + 1,
        _ => 0,
    }
}

/// Whether a `CLUSTER NODES` slot field (`5461-10922`, or one slot) covers `slot`.
fn covers(range: &str, slot: u16) -> bool {
    let (start, end) = range.split_once('-').unwrap_or((range, range));
    match (start.parse::<u16>(), end.parse::<u16>()) {
        (Ok(start), Ok(end)) => (start..=end).contains(&slot),
        _ => false,
    }
}

/// Runs every test of the calling test binary again (but those whose names contain one of
/// `skip`, which must include the caller) in a new process, with `RESYNC_REDIS_URL` naming the
/// seeds of a cluster of its own; fails with the suite's output unless it passed, and unless it
/// ran at least `at_least` tests (a filter that matched nothing must not pass for a run).
pub async fn run_suite_on_a_redis_cluster(skip: &[&str], at_least: usize) {
    let cluster = OwnRedisCluster::start().await;
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut command = tokio::process::Command::new(exe);
    for name in skip {
        command.args(["--skip", name]);
    }
    command.env("RESYNC_REDIS_URL", cluster.urls()).kill_on_drop(true);
    let output = command.output().await.expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the suite failed on a Redis Cluster ({}):\n{report}", output.status);
    let passed: usize = stdout
        .lines()
        .find_map(|line| line.strip_prefix("test result: ok. ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        passed >= at_least,
        "the suite ran {passed} tests on the cluster, expected {at_least}:\n{report}"
    );
}

impl Drop for OwnRedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
