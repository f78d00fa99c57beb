//! Choosing and connecting a transport from configuration (env vars by default).

use std::sync::Arc;

use crate::transport::memory::MemoryTransport;
use crate::transport::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use crate::transport::sns_sqs::{SnsSqsConfig, SnsSqsTransport};
use crate::transport::{Transport, TransportError};

/// Which transport to use and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportConfig {
    Memory,
    RabbitMq(RabbitMqConfig),
    SnsSqs(SnsSqsConfig),
}

impl TransportConfig {
    /// Reads `RESYNC_TRANSPORT` (`rabbitmq`, the default; `sns-sqs`; `memory`), then
    /// `RESYNC_AMQP_URL` (and `RESYNC_AMQP_MANAGEMENT_URL`) or `AWS_ENDPOINT_URL`/`AWS_REGION`.
    pub fn from_env() -> Result<Self, TransportError> {
        let kind = std::env::var("RESYNC_TRANSPORT").unwrap_or_else(|_| "rabbitmq".into());
        Self::named(&kind)
    }

    /// The config for a transport name, other settings from env vars.
    pub fn named(kind: &str) -> Result<Self, TransportError> {
        match kind {
            "rabbitmq" => {
                let mut config = RabbitMqConfig::new(
                    std::env::var("RESYNC_AMQP_URL")
                        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
                );
                config.management_url =
                    std::env::var("RESYNC_AMQP_MANAGEMENT_URL").ok().filter(|s| !s.is_empty());
                Ok(Self::RabbitMq(config))
            }
            "sns-sqs" => Ok(Self::SnsSqs(SnsSqsConfig::from_env())),
            "memory" => Ok(Self::Memory),
            other => Err(TransportError::Config(format!(
                "RESYNC_TRANSPORT is `{other}`: expected `rabbitmq`, `sns-sqs` or `memory`"
            ))),
        }
    }

    /// Connects the configured transport.
    pub async fn connect(&self) -> Result<Arc<dyn Transport>, TransportError> {
        Ok(match self {
            Self::Memory => Arc::new(MemoryTransport::new()),
            Self::RabbitMq(config) => Arc::new(RabbitMqTransport::connect(config.clone()).await?),
            Self::SnsSqs(config) => Arc::new(SnsSqsTransport::connect(config.clone()).await?),
        })
    }
}
