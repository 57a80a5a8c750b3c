//! Client-side tools: a small NATS client ([`conn`]), the `skiff pub`, `sub`,
//! `req`, `reply` and `server check` commands ([`commands`]), `skiff bench`
//! ([`bench`]), `skiff gen-certs` ([`certs`]), `skiff passwd` ([`passwd`])
//! and signals to a running server ([`signal`]).
//! They speak the client protocol through [`skiff::protocol`], so they work
//! against Skiff and any other NATS server alike.
//!
//! A crate of its own, with the `skiff` binary, so that embedding the
//! server library does not pull in the command line (clap) or the
//! benchmark's progress bar and histograms.

pub mod bench;
pub mod certs;
pub mod commands;
pub mod conn;
pub mod passwd;
pub mod signal;

pub use conn::{Connection, Credentials, Error, DEFAULT_URL};

/// A core-only server on a free loopback port, for the tools' tests.
#[cfg(test)]
pub(crate) async fn test_server() -> skiff::ServerHandle {
    skiff::Server::start(skiff::Config::core("127.0.0.1:0"))
        .await
        .expect("server starts")
}
