//! Skiff: a lightweight, NATS-compatible message broker.
//!
//! One message, end to end: a client's bytes are parsed by [`protocol`] into
//! ops; a publish is routed by the server through the [`sublist`] to each
//! matching [`subscription`]; a client subscriber's frame is queued on its
//! outbound queue ([`client`]) and written by its writer task, many messages
//! per syscall. In a [`cluster`], peers with matching interest get the
//! message forwarded over their route, once each.
//!
//! Embed a server with [`Server::start`]:
//!
//! ```no_run
//! # async fn run() -> Result<(), skiff::StartError> {
//! let server = skiff::Server::start(skiff::Config::core("127.0.0.1:0")).await?;
//! println!("clients connect to {}", server.client_url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

// No FFI of its own: system calls go through rustix.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod fsutil;
pub mod lame_duck;
pub mod metrics;
pub mod monitor;
pub mod protocol;
pub mod reload;
pub mod server;
pub mod store;
pub mod stream;
pub mod subject;
pub mod sublist;
pub mod subscription;
pub mod tls;
pub mod units;

pub use config::Config;
pub use server::{ReloadError, Reloaded, Server, ServerHandle, StartError};
