//! `fare apply` against the real brokers: RabbitMQ and the SNS/SQS emulator.

mod apply;
mod schema;
