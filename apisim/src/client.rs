//! A small typed client for checkers, tests and the demo: read the state, the write log and
//! the check; change faults; reset; and write entities the way resync's HTTP sink does.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;
use crate::config::{Config, FaultsPatch};
use crate::model::{CheckReport, EntityState, LogEntry, Stats, WriteAck};
use crate::server::{EVENT_ID_HEADER, MAX_LOG_LIMIT, VERSION_HEADER};

/// Talks to one simulator, e.g. `Client::new("http://127.0.0.1:8080")`.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client with a 30 s request timeout.
    pub fn new(base_url: impl Into<String>) -> Result<Self, Error> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(Self::with_http(base_url, http))
    }

    /// A client using the given `reqwest` client (its timeouts, pool, ...).
    pub fn with_http(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        let base = base_url.into().trim_end_matches('/').to_string();
        Self { base, http }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The URL of an entity, e.g. for a request the typed methods do not cover.
    pub fn entity_url(&self, entity_type: &str, entity_id: &str) -> Result<reqwest::Url, Error> {
        let mut url = reqwest::Url::parse(&self.base).map_err(|e| Error::Url(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| Error::Url(format!("{} cannot be a base URL", self.base)))?
            .pop_if_empty()
            .extend(["entities", entity_type, entity_id]);
        Ok(url)
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<(), Error> {
        let response = self.http.get(format!("{}/healthz", self.base)).send().await?;
        ok_or_status(response).await.map(drop)
    }

    /// `PUT /entities/..` with the version and event id headers; a non-2xx answer is
    /// [`Error::Status`].
    pub async fn upsert(
        &self,
        entity_type: &str,
        entity_id: &str,
        version: i64,
        event_id: &str,
        data: &Value,
    ) -> Result<WriteAck, Error> {
        let request = self
            .http
            .put(self.entity_url(entity_type, entity_id)?)
            .header(VERSION_HEADER, version)
            .header(EVENT_ID_HEADER, event_id)
            .json(data);
        json(request.send().await?).await
    }

    /// `DELETE /entities/..` with the version and event id headers.
    pub async fn delete(
        &self,
        entity_type: &str,
        entity_id: &str,
        version: i64,
        event_id: &str,
    ) -> Result<WriteAck, Error> {
        let request = self
            .http
            .delete(self.entity_url(entity_type, entity_id)?)
            .header(VERSION_HEADER, version)
            .header(EVENT_ID_HEADER, event_id);
        json(request.send().await?).await
    }

    /// `GET /entities/..`; `None` if it was never written.
    pub async fn entity(&self, entity_type: &str, entity_id: &str) -> Result<Option<EntityState>, Error> {
        let response = self.http.get(self.entity_url(entity_type, entity_id)?).send().await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        json(response).await.map(Some)
    }

    /// `GET /state`: every entity, keyed `"<entity_type>/<entity_id>"`.
    pub async fn state(&self) -> Result<BTreeMap<String, EntityState>, Error> {
        self.get("/state").await
    }

    /// `GET /log`: applied writes with `seq > since`, at most `limit` (capped by the server
    /// at [`MAX_LOG_LIMIT`]).
    pub async fn log(&self, since: u64, limit: usize) -> Result<Vec<LogEntry>, Error> {
        self.get(&format!("/log?since={since}&limit={limit}")).await
    }

    /// The whole write log, fetched page by page.
    pub async fn log_all(&self) -> Result<Vec<LogEntry>, Error> {
        let mut all = Vec::new();
        loop {
            let since = all.last().map_or(0, |e: &LogEntry| e.seq);
            let page = self.log(since, MAX_LOG_LIMIT).await?;
            let done = page.len() < MAX_LOG_LIMIT;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// `GET /check`.
    pub async fn check(&self) -> Result<CheckReport, Error> {
        self.get("/check").await
    }

    /// `GET /admin/stats`.
    pub async fn stats(&self) -> Result<Stats, Error> {
        self.get("/admin/stats").await
    }

    /// `GET /admin/faults`: the fault configuration in force.
    pub async fn faults(&self) -> Result<Config, Error> {
        self.get("/admin/faults").await
    }

    /// `PUT /admin/faults`: merges the patch; answers the configuration now in force.
    pub async fn set_faults(&self, patch: &FaultsPatch) -> Result<Config, Error> {
        let response = self.http.put(format!("{}/admin/faults", self.base)).json(patch).send().await?;
        json(response).await
    }

    /// `POST /admin/reset`: clears state, log, stats and faults.
    pub async fn reset(&self) -> Result<(), Error> {
        let response = self.http.post(format!("{}/admin/reset", self.base)).send().await?;
        ok_or_status(response).await.map(drop)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        json(self.http.get(format!("{}{path}", self.base)).send().await?).await
    }
}

async fn ok_or_status(response: reqwest::Response) -> Result<reqwest::Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(Error::Status { status: status.as_u16(), body })
}

async fn json<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, Error> {
    Ok(ok_or_status(response).await?.json().await?)
}
