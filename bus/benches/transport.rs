//! RabbitMQ transport throughput against a raw lapin loop, measured in the same run on the same
//! broker, queue type (quorum) and payload.
//!
//!     cargo bench -p resync-bus --bench transport
//!
//! `RESYNC_BENCH_MESSAGES` (default 20000) sets the message count, `RESYNC_AMQP_URL` the broker.
//! Publishing: batches of 100 with publisher confirms. Consuming: prefetch 100, one ack each.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use resync_bus::{
    Destination, Envelope, OutgoingMessage, QueueSpec, RabbitMqConfig, RabbitMqTransport, SubscribeOptions,
    Transport,
};
use resync_testkit::{Service, service_unreachable, unique_name};

const BATCH: usize = 100;
const PREFETCH: u16 = 100;

fn messages(n: usize) -> Vec<OutgoingMessage> {
    (0..n)
        .map(|i| {
            let data = serde_json::json!({"title": format!("listing {i}"), "price": i, "tags": ["a", "b"]});
            OutgoingMessage::from_envelope(&Envelope::new("listing.updated", i.to_string(), 1, data))
        })
        .collect()
}

async fn raw_publish(channel: &lapin::Channel, queue: &str, messages: &[OutgoingMessage]) -> Duration {
    let start = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(batch.len());
        for m in batch {
            let properties = BasicProperties::default().with_delivery_mode(2);
            let confirm = channel
                .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &m.body, properties)
                .await
                .expect("raw publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack());
        }
    }
    start.elapsed()
}

async fn raw_consume(channel: &lapin::Channel, queue: &str, n: usize) -> Duration {
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let start = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.expect("stream open").expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    start.elapsed()
}

async fn resync_publish(
    transport: &RabbitMqTransport,
    queue: &str,
    messages: &[OutgoingMessage],
) -> Duration {
    let destination = Destination::Queue(queue.to_string());
    let start = Instant::now();
    for batch in messages.chunks(BATCH) {
        transport.publish_batch(&destination, batch.to_vec()).await.expect("publish");
    }
    start.elapsed()
}

async fn resync_consume(transport: &RabbitMqTransport, queue: &str, n: usize) -> Duration {
    let mut subscription =
        transport.subscribe(queue, SubscribeOptions { prefetch: PREFETCH }).await.expect("subscribe");
    let start = Instant::now();
    let mut received = 0;
    while received < n {
        for delivery in subscription.next_batch(BATCH, Duration::from_secs(5)).await.expect("next_batch") {
            delivery.ack().await.expect("ack");
            received += 1;
        }
    }
    start.elapsed()
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("RESYNC_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let url = Service::RabbitMq.url();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| service_unreachable(Service::RabbitMq, e));
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let transport = RabbitMqTransport::connect(RabbitMqConfig::new(url.clone()))
        .await
        .unwrap_or_else(|e| service_unreachable(Service::RabbitMq, e));

    let raw_queue = unique_name("bench-raw");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(raw_queue.as_str().into(), durable, args).await.expect("declare");
    let resync_queue = unique_name("bench-resync");
    transport.declare_queue(&QueueSpec::new(&resync_queue)).await.expect("declare");

    let payload = messages(n);
    println!(
        "RabbitMQ transport vs raw lapin: {n} messages of {} bytes, quorum queues",
        payload[0].body.len()
    );
    // Interleave: raw, resync, raw, resync — so neither side gets a warmer broker.
    let raw_pub = raw_publish(&channel, &raw_queue, &payload).await;
    let resync_pub = resync_publish(&transport, &resync_queue, &payload).await;
    let raw_con = raw_consume(&channel, &raw_queue, n).await;
    let resync_con = resync_consume(&transport, &resync_queue, n).await;

    println!("{:<28} {:>12} {:>12} {:>8}", "", "raw msg/s", "resync msg/s", "ratio");
    for (what, raw, ours) in [
        ("publish (confirms, batch 100)", raw_pub, resync_pub),
        ("consume + ack (prefetch 100)", raw_con, resync_con),
    ] {
        let (r, o) = (rate(n, raw), rate(n, ours));
        println!("{what:<28} {r:>12.0} {o:>12.0} {:>7.0}%", 100.0 * o / r);
    }

    channel.queue_delete(raw_queue.as_str().into(), QueueDeleteOptions::default()).await.expect("cleanup");
    transport.delete_queue(&resync_queue).await.expect("cleanup");
    transport.close().await.expect("close");
}
