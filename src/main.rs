//! The `skiff` binary: command-line parsing, config loading and logging
//! set-up. Everything else lives in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use skiff::{Config, Server};

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "A lightweight, NATS-compatible message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file (see conf/skiff.toml).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Client listen address, HOST:PORT (port 0: any free port).
    #[arg(long)]
    listen: Option<String>,
    /// Directory for durable streams.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Server name shown to clients.
    #[arg(long)]
    server_name: Option<String>,
    /// Log debug messages.
    #[arg(short = 'D', long)]
    debug: bool,
    /// Log every protocol operation.
    #[arg(short = 'V', long)]
    trace: bool,
}

impl ServeArgs {
    /// The config file (or the defaults), with flags layered on top.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = &self.listen {
            config.listen = listen.clone();
        }
        if let Some(store) = &self.store {
            config.jetstream.store_dir = store.clone();
        }
        if let Some(name) = &self.server_name {
            config.server_name = Some(name.clone());
        }
        config.debug |= self.debug;
        config.trace |= self.trace;
        Ok(config)
    }
}

fn init_logging(debug: bool, trace: bool) {
    let default = if trace {
        "skiff=trace"
    } else if debug {
        "skiff=debug"
    } else {
        "skiff=info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    init_logging(config.debug, config.trace);
    let server = Server::start(config).await.context("cannot start server")?;
    shutdown_signal().await?;
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("Trapped \"terminated\" signal"),
        _ = int.recv() => tracing::info!("Trapped \"interrupt\" signal"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
    }
}
