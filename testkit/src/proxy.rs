//! A TCP proxy a test puts between the code under test and a shared service, to simulate that
//! service going away (connections reset, new ones refused) without stopping it for everyone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TcpProxy {
    addr: SocketAddr,
    /// Cancelled on `cut`: ends every proxied connection of the current generation.
    generation: Arc<Mutex<Option<CancellationToken>>>,
    /// Connections refused while down: what the service would have seen as calls.
    refused: Arc<AtomicU64>,
    accept_loop: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let generation = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let refused = Arc::new(AtomicU64::new(0));
        let accept_loop = tokio::spawn(accept(listener, target, generation.clone(), refused.clone()));
        Self { addr, generation, refused, accept_loop }
    }

    /// Connections refused so far while the service was "down".
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
        let (userinfo, hostpart) = match rest.rsplit_once('@') {
            Some((user, host)) => (format!("{user}@"), host),
            None => (String::new(), rest),
        };
        let path = hostpart.find('/').map_or("", |i| &hostpart[i..]);
        format!("{scheme}://{userinfo}{}{path}", self.addr)
    }

    /// The service "goes down": open connections are reset and new ones refused (accepted and
    /// closed at once) until [`TcpProxy::restore`].
    pub fn cut(&self) {
        if let Some(token) = self.lock().take() {
            token.cancel();
        }
    }

    /// The service "comes back".
    pub fn restore(&self) {
        self.lock().get_or_insert_with(CancellationToken::new);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept_loop.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    generation: Arc<Mutex<Option<CancellationToken>>>,
    refused: Arc<AtomicU64>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        let token = generation.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(token) = token else {
            refused.fetch_add(1, Ordering::SeqCst);
            drop(inbound); // down: refuse
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else { return };
            let mut inbound = inbound;
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}
