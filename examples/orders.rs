//! The e-commerce "orders" example: an order's events stored in order,
//! processed by a group of workers sharing one durable pull consumer, with
//! exactly-once effects, and replayed from the beginning by an auditor.
//!
//! Run with `cargo run --example orders` (an embedded server with a temporary
//! store), or against a running server with
//! `NATS_URL=nats://127.0.0.1:4222 cargo run --example orders`.
//!
//! Delivery guarantees shown here:
//! - at-least-once: a worker acks after processing; if it crashes before,
//!   the message is redelivered after `ack_wait`;
//! - exactly-once: the producer sets `Nats-Msg-Id`, so a retried publish is
//!   stored once; workers use `double_ack`, which returns only when the ack
//!   is recorded, so an acknowledged order is never processed again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;

const ORDERS: u64 = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = tempfile::tempdir()?;
    let (url, server) = match std::env::var("NATS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let config = skiff::Config::with_streams("127.0.0.1:0", store.path());
            let server = skiff::Server::start(config).await?;
            (server.client_url(), Some(server))
        }
    };
    let js = jetstream::new(async_nats::connect(&url).await?);

    // The stream: every subject under orders.> is stored, in order.
    let orders = js
        .get_or_create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;

    // Producer: each order is created, paid, shipped. The message id makes a
    // retry after a lost PubAck harmless.
    for id in 1..=ORDERS {
        for event in ["created", "paid", "shipped"] {
            let publish = jetstream::message::PublishMessage::build()
                .payload(format!("order {id} {event}").into())
                .message_id(format!("order-{id}-{event}"));
            js.send_publish(format!("orders.{id}.{event}"), publish)
                .await?
                .await?;
        }
    }
    // A retry of an already stored event is recognised as a duplicate.
    let retry = jetstream::message::PublishMessage::build()
        .payload("order 1 created".into())
        .message_id("order-1-created");
    let ack = js.send_publish("orders.1.created", retry).await?.await?;
    println!("retried publish: duplicate = {}", ack.duplicate);

    // Workers: three instances share one durable consumer; each message goes
    // to one of them.
    let shipping = orders
        .get_or_create_consumer(
            "shipping",
            pull::Config {
                durable_name: Some("shipping".into()),
                filter_subject: "orders.*.shipped".into(),
                ack_wait: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await?;
    let shipped = Arc::new(Mutex::new(HashSet::new()));
    let mut workers = Vec::new();
    for worker in 0..3 {
        let consumer = shipping.clone();
        let shipped = Arc::clone(&shipped);
        workers.push(tokio::spawn(async move {
            let mut handled = 0;
            loop {
                let mut batch = consumer
                    .fetch()
                    .max_messages(5)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await?;
                let mut got_any = false;
                while let Some(msg) = batch.next().await {
                    let msg = msg?;
                    got_any = true;
                    // Process, then record the ack before moving on.
                    shipped
                        .lock()
                        .map_err(|_| "poisoned")?
                        .insert(msg.subject.to_string());
                    msg.double_ack().await?;
                    handled += 1;
                }
                if !got_any {
                    println!("worker {worker} handled {handled} orders");
                    return Ok::<_, async_nats::Error>(());
                }
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    println!(
        "shipped: {} distinct orders",
        shipped.lock().map_err(|_| "poisoned")?.len()
    );

    // Audit: replay one order's history from the earliest message.
    let audit = orders
        .create_consumer(pull::Config {
            filter_subject: "orders.7.>".into(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut history = audit.fetch().max_messages(10).messages().await?;
    while let Some(msg) = history.next().await {
        let msg = msg?;
        println!(
            "replay #{}: {}",
            msg.info()?.stream_sequence,
            String::from_utf8_lossy(&msg.payload)
        );
        msg.ack().await?;
    }

    if let Some(server) = server {
        server.shutdown().await;
    }
    Ok(())
}
