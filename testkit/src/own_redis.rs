//! A redis-server owned by one test: on its own port, killed and restarted at will, never the
//! shared one.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::poll_some;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A redis-server owned by one test, on its own port, so the test may kill it.
pub struct OwnRedis {
    port: u16,
    /// Serve TLS only (on `port`) instead of plain TCP.
    tls: bool,
    /// Appended to the command line (certificates, password).
    extra: Vec<String>,
    child: Option<Child>,
}

impl OwnRedis {
    /// Plain TCP, no persistence: a restart loses every key, like a crashed cache node.
    pub async fn start() -> Self {
        Self::launch_new(false, Vec::new()).await
    }

    /// TLS only; `extra` must name the certificate files (and may set a password).
    pub async fn start_tls(extra: Vec<String>) -> Self {
        Self::launch_new(true, extra).await
    }

    async fn launch_new(tls: bool, extra: Vec<String>) -> Self {
        let mut redis = Self { port: free_port(), tls, extra, child: None };
        redis.launch().await;
        redis
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server vanishes mid-connection, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    async fn launch(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        if self.tls {
            command.args(["--port", "0", "--tls-port", &port]);
        } else {
            command.args(["--port", &port]);
        }
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        poll_some(Duration::from_secs(10), "own redis-server listening", || {
            let addr = addr.clone();
            async move { TcpStream::connect(&addr).is_ok().then_some(()) }
        })
        .await;
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
