//! apisim over HTTP, in-process on 127.0.0.1:0. Timing is never asserted: waits poll for a
//! condition under a generous hang guard.

mod entities;
mod faults;

use std::future::Future;
use std::time::Duration;

use resync_apisim::{Client, Config, Running};
use serde_json::Value;

/// Fails a test that hangs instead of letting it block the suite.
const HANG_GUARD: Duration = Duration::from_secs(60);

async fn sim(config: Config) -> (Running, Client) {
    let sim = resync_apisim::start(config).await.expect("start apisim");
    let client = sim.client().expect("client");
    (sim, client)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("reqwest client")
}

/// A raw write, as resync's HTTP sink sends it (headers optional to test their absence).
async fn put(
    http: &reqwest::Client,
    sim: &Running,
    entity: (&str, &str),
    version: Option<i64>,
    body: &Value,
) -> reqwest::Response {
    let mut request = http.put(format!("{}/entities/{}/{}", sim.url(), entity.0, entity.1)).json(body);
    if let Some(version) = version {
        request = request
            .header("X-Resync-Entity-Version", version)
            .header("X-Resync-Event-Id", format!("00000000-0000-7000-8000-{version:012}"));
    }
    request.send().await.expect("PUT")
}

async fn delete(
    http: &reqwest::Client,
    sim: &Running,
    entity: (&str, &str),
    version: i64,
) -> reqwest::Response {
    http.delete(format!("{}/entities/{}/{}", sim.url(), entity.0, entity.1))
        .header("X-Resync-Entity-Version", version)
        .header("X-Resync-Event-Id", format!("00000000-0000-7000-8000-{version:012}"))
        .send()
        .await
        .expect("DELETE")
}

fn header(response: &reqwest::Response, name: &str) -> Option<u64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// Polls `probe` every 20 ms until it yields a value; panics after the hang guard.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let wait = async {
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait).await.unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}
