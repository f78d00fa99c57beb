//! Integration tests of resync-bus against real brokers (RabbitMQ on 5672, moto on 4566) and
//! the in-memory transport: one test binary, one link step.

mod contract;
mod rabbitmq;
mod schema;
mod support;
