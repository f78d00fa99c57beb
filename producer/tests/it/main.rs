//! Integration tests of the producer against real Postgres, RabbitMQ and the SNS/SQS emulator.

mod emit;
mod faults;
mod log;
mod relay;
mod support;
