//! A 3-node cluster in one process: B and C know only A, find each other by
//! gossip, and a message published on A reaches a subscriber on C. Prints
//! how long the mesh took to form and a message took to cross it, then what
//! a client sees in INFO `connect_urls`.
//!
//! Run with `cargo run --release --example cluster`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use skiff::config::cluster::ClusterConfig;
use skiff::{Config, Server, ServerHandle};

async fn node(name: &str, seeds: &[String]) -> Result<ServerHandle, skiff::StartError> {
    let mut config = Config::core("127.0.0.1:0");
    config.server_name = Some(name.to_string());
    config.cluster = Some(ClusterConfig::new("example", "127.0.0.1:0", seeds));
    Server::start(config).await
}

/// Waits until every node has a route to the two others.
async fn mesh_formed(nodes: &[&ServerHandle]) -> Result<(), &'static str> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.peer_names().len() < nodes.len() - 1) {
        if Instant::now() > deadline {
            return Err("the mesh did not form within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let started = Instant::now();
    let a = node("A", &[]).await?;
    let seed = a.route_url().into_iter().collect::<Vec<_>>();
    let b = node("B", &seed).await?;
    let c = node("C", &seed).await?;
    mesh_formed(&[&a, &b, &c]).await?;
    println!(
        "full mesh of 3 (B and C seeded with A only) in {:?}",
        started.elapsed()
    );
    for n in [&a, &b, &c] {
        println!("  {} -> {:?}", n.client_url(), n.peer_names());
    }

    let on_c = async_nats::connect(c.client_url()).await?;
    let mut sub = on_c.subscribe("greetings").await?;
    on_c.flush().await?;
    let on_a = async_nats::connect(a.client_url()).await?;
    // The subscription's interest travels C -> A; publish once it has.
    let sent = Instant::now();
    while !a.has_route_interest("greetings") {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("interest C -> A propagated in {:?}", sent.elapsed());
    let sent = Instant::now();
    on_a.publish("greetings", "hello from A".into()).await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await?
        .ok_or("subscription closed")?;
    println!(
        "C received {:?} in {:?}",
        String::from_utf8_lossy(&msg.payload),
        sent.elapsed()
    );
    println!(
        "clients of A can fail over to: {:?}",
        on_a.server_info().connect_urls
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
    Ok(())
}
