//! Publish and subscribe with the official async-nats client against an
//! embedded Skiff server.
//!
//! Run with `cargo run --example pubsub`. To use a separately running server
//! instead, set `NATS_URL=nats://127.0.0.1:4222`.

use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Embed a server on a free port unless one is given.
    let (url, server) = match std::env::var("NATS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = skiff::Server::start(skiff::Config::core("127.0.0.1:0")).await?;
            (server.client_url(), Some(server))
        }
    };

    let client = async_nats::connect(&url).await?;
    let mut orders = client.subscribe("orders.>").await?;
    client.flush().await?;

    for (i, region) in ["eu", "us", "apac"].iter().enumerate() {
        let subject = format!("orders.{region}.created");
        client
            .publish(subject, format!("order #{i}").into())
            .await?;
    }
    client.flush().await?;

    for _ in 0..3 {
        if let Some(msg) = orders.next().await {
            println!("{}: {}", msg.subject, String::from_utf8_lossy(&msg.payload));
        }
    }

    // Request/reply: a tiny service answering on "time".
    let mut service = client.subscribe("time").await?;
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            if let Some(reply) = request.reply {
                let _ = responder.publish(reply, "it is now".into()).await;
            }
        }
    });
    let answer = client.request("time", "".into()).await?;
    println!("time: {}", String::from_utf8_lossy(&answer.payload));

    if let Some(server) = server {
        server.shutdown().await;
    }
    Ok(())
}
