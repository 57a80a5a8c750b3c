//! The `skiff` binary: command-line parsing, config loading, logging set-up
//! and signals. Everything else lives in the libraries: the server in
//! `skiff`, the client commands, the benchmark and signal sending in
//! `skiff_tools`.
//!
//! The log goes to stderr, as nats-server's does; stdout carries only what
//! a command prints as its result. A command that fails prints one line,
//! `skiff: what failed: why; what to do`, and exits with status 1.
//!
//! Signals to `skiff serve`: SIGINT and SIGTERM shut down gracefully,
//! SIGHUP reloads the config file ([`reload`], on the blocking pool; the
//! log level is applied here, since the binary owns the subscriber),
//! SIGUSR2 enters lame duck mode, after which the process exits.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use skiff::auth::{AuthorizationConfig, Secret};
use skiff::config::{cluster::ClusterConfig, http::HttpConfig, ConfigError, TlsConfig};
use skiff::units::{parse_duration, parse_size};
use skiff::{Config, Server};
use skiff_tools::bench::{self, BenchOptions, Scenario};
use skiff_tools::conn::{Endpoint, TlsOptions};
use skiff_tools::signal::{self, PidFile, Signal, Target};
use skiff_tools::{certs, commands, passwd, Credentials, DEFAULT_URL};

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
    /// Publish a message.
    Pub(PubArgs),
    /// Print the messages published to a subject.
    Sub(SubArgs),
    /// Send a request and print the reply.
    Req(ReqArgs),
    /// Answer every request on a subject with the same data.
    Reply(ReplyArgs),
    /// Measure a NATS server (Skiff or another) under load.
    Bench(BenchArgs),
    /// Print a bcrypt hash of a password (read from stdin, or asked for).
    Passwd(PasswdArgs),
    /// Write a CA, a server certificate and device certificates for
    /// mutual TLS.
    GenCerts(GenCertsArgs),
    /// Send a command to a running server: reload (SIGHUP), ldm (lame duck
    /// mode, SIGUSR2), stop (SIGTERM) or quit (SIGINT).
    Signal(SignalArgs),
    /// Make a running server reload its config file (skiff signal reload).
    Reload(TargetArgs),
    /// Ask a running server about itself.
    #[command(subcommand)]
    Server(ServerCommand),
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Connect, log in and PING: print one line and exit 0 if the server
    /// answers, 1 if not (or if it is in lame duck mode).
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// How long the whole check may take.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Which running server a signal goes to.
#[derive(Args)]
struct TargetArgs {
    /// Its process id.
    #[arg(long, conflicts_with = "pid_file")]
    pid: Option<i32>,
    /// The file `skiff serve --pid-file` wrote.
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

impl TargetArgs {
    fn target(&self) -> anyhow::Result<Target> {
        match (self.pid, &self.pid_file) {
            (Some(pid), _) => Ok(Target::Pid(pid)),
            (None, Some(path)) => Ok(Target::PidFile(path.clone())),
            (None, None) => Err(signal::SignalError::NoTarget.into()),
        }
    }
}

#[derive(Args)]
struct SignalArgs {
    #[arg(value_enum)]
    command: Signal,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct PasswdArgs {
    /// bcrypt cost: each step doubles the time of every check.
    #[arg(long, default_value_t = passwd::DEFAULT_COST)]
    cost: u32,
}

#[derive(Args)]
struct GenCertsArgs {
    /// Directory to write the PEM files to (created if missing).
    dir: PathBuf,
    /// Names and addresses the server certificate is valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    hosts: Vec<String>,
    /// Device (client) certificates to make: device-1 ... device-N.
    #[arg(long, default_value_t = 1)]
    devices: usize,
}

/// How the client commands reach a server and log in.
#[derive(Args)]
struct ConnectArgs {
    /// Server URL: nats://host:port, tls://host:port to insist on TLS;
    /// credentials may be given as nats://user:pass@host:port or
    /// nats://token@host:port.
    #[arg(short = 's', long = "server", default_value = DEFAULT_URL)]
    server: String,
    /// User name.
    #[arg(long, requires = "password")]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, requires = "user")]
    password: Option<String>,
    /// Authentication token.
    #[arg(long, conflicts_with_all = ["user", "nkey"])]
    token: Option<String>,
    /// File holding a user nkey seed (SU...).
    #[arg(long, conflicts_with = "user")]
    nkey: Option<PathBuf>,
    /// NATS credentials file (JWT and seed): not supported.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long = "tls-ca", alias = "tlsca")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    #[arg(long = "tls-cert", alias = "tlscert", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long = "tls-key", alias = "tlskey", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Start TLS before the server's INFO (servers with handshake_first).
    #[arg(long = "tls-first")]
    tls_first: bool,
}

impl ConnectArgs {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        if self.creds.is_some() {
            anyhow::bail!(
                "--creds: JWT credentials (operator mode) are not supported; \
                 use --nkey with the seed, --user/--password or --token"
            );
        }
        let nkey_seed = match &self.nkey {
            Some(path) => Some(read_seed(path)?),
            None => None,
        };
        Ok(Credentials {
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            nkey_seed,
        })
    }

    fn tls(&self) -> TlsOptions {
        TlsOptions {
            ca_file: self.tls_ca.clone(),
            cert_file: self.tls_cert.clone(),
            key_file: self.tls_key.clone(),
            first: self.tls_first,
        }
    }

    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::new(&self.server, &self.tls())?.with_credentials(&self.credentials()?))
    }
}

/// The user seed in an nkey file: its first line starting with `SU`.
fn read_seed(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read nkey file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .map(str::to_string)
        .with_context(|| format!("{} holds no user nkey seed (SU...)", path.display()))
}

#[derive(Args)]
struct PubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    subject: String,
    #[arg(default_value = "")]
    data: String,
    /// Publish the message this many times.
    #[arg(long, default_value_t = 1)]
    count: u64,
}

#[derive(Args)]
struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    subject: String,
    /// Join this queue group.
    #[arg(long)]
    queue: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args)]
struct ReqArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    subject: String,
    #[arg(default_value = "")]
    data: String,
    /// How long to wait for the reply.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct ReplyArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    subject: String,
    #[arg(default_value = "")]
    data: String,
    /// Join this queue group.
    #[arg(long)]
    queue: Option<String>,
    /// Exit after this many requests.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[arg(value_enum)]
    scenario: Scenario,
    /// Messages in total [default: 1,000,000; reqrep: 20,000; jspub and
    /// jsconsume: 200,000].
    #[arg(long)]
    msgs: Option<u64>,
    /// Payload size, e.g. 16 or 1KiB [default: 16].
    #[arg(long, value_parser = parse_size)]
    size: Option<usize>,
    /// Publishers [default: 1].
    #[arg(long)]
    pubs: Option<usize>,
    /// Subscribers (repliers for reqrep) [default: pubsub 1, fanout and queue 4].
    #[arg(long)]
    subs: Option<usize>,
    /// Idle connections for the conns scenario [default: 10,000].
    #[arg(long)]
    conns: Option<usize>,
    /// Subject to publish on [default: bench; jspub and jsconsume: bench.js].
    #[arg(long)]
    subject: Option<String>,
    /// Bound on the whole run, e.g. 30s [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// conns: the server's process id, to measure its memory per connection
    /// (jspub and jsconsume report its memory at the end).
    #[arg(long)]
    server_pid: Option<u32>,
    /// jspub and jsconsume: the stream, on the bench subject; jspub deletes
    /// and recreates it, jsconsume reuses it if it holds --msgs messages
    /// [default: BENCH].
    #[arg(long)]
    stream: Option<String>,
    /// jspub: most PubAcks outstanding at once [default: 256].
    #[arg(long)]
    window: Option<usize>,
    /// jsconsume: messages per pull request [default: 500].
    #[arg(long)]
    batch: Option<usize>,
    /// Connect subscribers (repliers for reqrep) to this server instead:
    /// another node of the same cluster, to measure the route between them.
    #[arg(long)]
    sub_server: Option<String>,
    /// Print the summary as CSV (a header and one row).
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    /// Print the summary as one line of JSON.
    #[arg(long)]
    json: bool,
    /// Do not draw the progress bar (never drawn when stdout is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

impl BenchArgs {
    /// The scenario's defaults with the given flags on top.
    fn options(&self) -> BenchOptions {
        let mut o = BenchOptions::new(&self.connect.server, self.scenario);
        o.sub_url = self.sub_server.clone();
        o.tls = self.connect.tls();
        o.msgs = self.msgs.unwrap_or(o.msgs);
        o.size = self.size.unwrap_or(o.size);
        o.pubs = self.pubs.unwrap_or(o.pubs);
        o.subs = self.subs.unwrap_or(o.subs);
        o.conns = self.conns.unwrap_or(o.conns);
        o.subject = self.subject.clone().unwrap_or(o.subject);
        o.timeout = self.timeout.unwrap_or(o.timeout);
        o.server_pid = self.server_pid;
        o.stream = self.stream.clone().unwrap_or(o.stream);
        o.window = self.window.unwrap_or(o.window);
        o.batch = self.batch.unwrap_or(o.batch);
        o.progress = !self.no_progress;
        o
    }
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
    /// Require TLS with this certificate (PEM); like [tls] cert_file.
    #[arg(long = "tls-cert", alias = "tlscert", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long = "tls-key", alias = "tlskey", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA of client certificates (PEM).
    #[arg(long = "tls-ca", alias = "tlscacert")]
    tls_ca: Option<PathBuf>,
    /// Require a client certificate signed by --tls-ca (mutual TLS).
    #[arg(long = "tls-verify", alias = "tlsverify", requires = "tls_ca")]
    tls_verify: bool,
    /// Log debug messages.
    #[arg(short = 'D', long)]
    debug: bool,
    /// Log every protocol operation.
    #[arg(short = 'V', long)]
    trace: bool,
    /// User required of clients (with --pass).
    #[arg(long, requires = "pass")]
    user: Option<String>,
    /// Password required of clients (with --user).
    #[arg(long, requires = "user")]
    pass: Option<String>,
    /// Token required of clients.
    #[arg(long, conflicts_with = "user")]
    auth: Option<String>,
    /// Name of the cluster to join (every node of a cluster has the same).
    #[arg(long = "cluster-name", alias = "cluster_name")]
    cluster_name: Option<String>,
    /// Route listen address, HOST:PORT: turns clustering on.
    #[arg(long = "cluster-listen", alias = "cluster")]
    cluster_listen: Option<String>,
    /// Seed routes, nats-route://host:port[,...].
    #[arg(long, value_delimiter = ',')]
    routes: Vec<String>,
    /// Serve the monitoring endpoints (/varz, /metrics, ...) on HOST:PORT;
    /// like [http] listen.
    #[arg(long = "http", value_name = "HOST:PORT")]
    http: Option<String>,
    /// Write the process id to this file (removed at exit), for
    /// `skiff signal` and `skiff reload`.
    #[arg(long = "pid-file", short = 'P')]
    pid_file: Option<PathBuf>,
    /// Instead of serving, send a command to a running server, as
    /// nats-server's --signal: reload, ldm, stop or quit, with =PID or
    /// =PIDFILE (else the --pid-file given).
    #[arg(long = "signal", value_name = "COMMAND[=PID]")]
    signal: Option<String>,
}

impl ServeArgs {
    /// The config file (or the defaults), with flags layered on top.
    fn config(&self) -> Result<Config, ConfigError> {
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
        self.apply_tls(&mut config);
        self.apply_cluster(&mut config);
        if let Some(listen) = &self.http {
            // Keeps the file's token, if it has an [http] table.
            config.http.get_or_insert_with(HttpConfig::default).listen = listen.clone();
        }
        config.debug |= self.debug;
        config.trace |= self.trace;
        if self.user.is_some() || self.auth.is_some() {
            // Layered on the file's table; conflicting methods are refused
            // by validation.
            let auth = config
                .authorization
                .get_or_insert_with(AuthorizationConfig::default);
            auth.user = self.user.clone().or(auth.user.take());
            auth.password = self.pass.clone().map(Secret).or(auth.password.take());
            auth.token = self.auth.clone().map(Secret).or(auth.token.take());
        }
        Ok(config)
    }

    /// The cluster flags over the file's `[cluster]` table (which they
    /// create when the file has none).
    fn apply_cluster(&self, config: &mut Config) {
        let wanted =
            self.cluster_listen.is_some() || self.cluster_name.is_some() || !self.routes.is_empty();
        if !wanted {
            return;
        }
        let cluster = config.cluster.get_or_insert_with(ClusterConfig::default);
        if let Some(listen) = &self.cluster_listen {
            cluster.listen = listen.clone();
        }
        if let Some(name) = &self.cluster_name {
            cluster.name = name.clone();
        }
        if !self.routes.is_empty() {
            cluster.routes = self.routes.clone();
        }
    }

    /// The TLS flags over the file's `[tls]` table (which they create when
    /// the file has none).
    fn apply_tls(&self, config: &mut Config) {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let tls = config.tls.get_or_insert_with(|| TlsConfig::new(cert, key));
            tls.cert_file = cert.clone();
            tls.key_file = key.clone();
        }
        if let Some(tls) = &mut config.tls {
            if let Some(ca) = &self.tls_ca {
                tls.ca_file = Some(ca.clone());
            }
            tls.verify |= self.tls_verify;
        }
    }
}

/// The log filter the `debug` and `trace` settings ask for.
fn log_filter(debug: bool, trace: bool) -> &'static str {
    if trace {
        "skiff=trace"
    } else if debug {
        "skiff=debug"
    } else {
        "skiff=info"
    }
}

/// Changes the log filter of the running subscriber.
type LogLevel =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Sets up logging. Returns what changes the level on reload, unless
/// `RUST_LOG` sets it (then it is RUST_LOG's, as at start).
fn init_logging(debug: bool, trace: bool) -> Option<LogLevel> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let reloadable = from_env.is_none();
    let filter =
        from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(log_filter(debug, trace)));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // The log goes to stderr, as nats-server's does: launchers (nats.py's
    // test harness among them) wait for "Listening for client connections
    // on" and "Server is ready" there, and stdout stays free for what a
    // command prints as its result. Colours only for a person at a
    // terminal: harnesses read plain lines.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(colour),
        )
        .init();
    reloadable.then_some(handle)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if let Some(command) = &args.signal {
        return send_signal(command, args.pid_file.as_deref());
    }
    let config = args.config()?;
    let log_level = init_logging(config.debug, config.trace);
    // Handlers first: SIGHUP's default action would kill a server that a
    // script signals as soon as the pid file appears.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let _pid_file = match &args.pid_file {
        Some(path) => Some(
            PidFile::write(path)
                .with_context(|| format!("cannot write pid file {}", path.display()))?,
        ),
        None => None,
    };
    let server = Server::start(config).await?;
    // Shared with the reloads, which read the file on the blocking pool.
    let args = std::sync::Arc::new(args);
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("Trapped \"terminated\" signal");
                break;
            }
            _ = int.recv() => {
                tracing::info!("Trapped \"interrupt\" signal");
                break;
            }
            _ = hup.recv() => reload(&args, &server, log_level.as_ref()).await,
            _ = usr2.recv() => {
                tracing::info!("Trapped \"user defined signal 2\" signal: lame duck mode");
                server.lame_duck();
            }
            _ = server.stopped() => break,
        }
    }
    server.shutdown().await;
    Ok(())
}

/// SIGHUP: re-reads the config file (with the flags on top) and applies
/// what can change while running, the log level included. A broken file,
/// certificate or refused change is logged and the server goes on as it
/// was.
///
/// The file, the certificates and any declared stream are read and written
/// on the blocking pool ([`skiff::ServerHandle::reload_with`]); further
/// signals wait until this reload is done.
async fn reload(
    args: &std::sync::Arc<ServeArgs>,
    server: &skiff::ServerHandle,
    log_level: Option<&LogLevel>,
) {
    tracing::info!("Trapped \"hangup\" signal: reloading the configuration");
    let args = std::sync::Arc::clone(args);
    let reloaded = server.reload_with(move || Ok(args.config()?)).await;
    let (reloaded, config) = match reloaded {
        Ok(done) => done,
        Err(e) => {
            let e = anyhow::Error::from(e);
            tracing::error!(
                "Reload failed, keeping the running configuration: {}",
                one_line(&e)
            );
            return;
        }
    };
    if !(reloaded.includes("debug") || reloaded.includes("trace")) {
        return;
    }
    let level = log_filter(config.debug, config.trace);
    match log_level {
        Some(handle) => match handle.reload(tracing_subscriber::EnvFilter::new(level)) {
            Ok(()) => tracing::info!("Reloaded: log level {level}"),
            Err(e) => tracing::error!("Cannot change the log level: {e}"),
        },
        None => tracing::warn!("RUST_LOG sets the log level: debug and trace are not applied"),
    }
}

/// `skiff serve --signal COMMAND[=PID|=PIDFILE]`: nats-server's way of
/// signalling a running server.
fn send_signal(command: &str, pid_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (command, target) = signal::parse_command(command)?;
    let target = target
        .or_else(|| pid_file.map(|p| Target::PidFile(p.to_owned())))
        .ok_or(signal::SignalError::NoTarget)?;
    signal_server(command, &target)
}

fn signal_server(command: Signal, target: &Target) -> anyhow::Result<()> {
    let pid = signal::send(command, target)?;
    eprintln!(
        "Sent {} to process {pid}",
        format!("{command:?}").to_lowercase()
    );
    Ok(())
}

/// `skiff server check`: one line, and the exit code scripts test.
async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let endpoint = args.connect.endpoint()?;
    match commands::check(&endpoint, args.timeout).await {
        Ok(h) if h.lame_duck => {
            println!(
                "WARNING: {} is in lame duck mode and about to shut down",
                h.server_name
            );
            std::process::exit(1);
        }
        Ok(h) => {
            println!(
                "OK: {} {} ({}), connected in {:.1} ms",
                h.server_name,
                h.version,
                h.implementation,
                h.elapsed.as_secs_f64() * 1000.0
            );
            Ok(())
        }
        Err(e @ skiff_tools::Error::Connect { .. }) => {
            println!("ERROR: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            println!("ERROR: {}: {e}", endpoint.addr());
            std::process::exit(1);
        }
    }
}

fn gen_certs(args: GenCertsArgs) -> anyhow::Result<()> {
    let generated = certs::generate(&args.dir, &args.hosts, args.devices)?;
    eprintln!(
        "Wrote a CA, a server certificate for {} and {} device certificate(s) to {}",
        args.hosts.join(", "),
        generated.devices.len(),
        args.dir.display()
    );
    eprintln!("Add this to the server's config file for mutual TLS:\n");
    println!("{}", certs::config_snippet(&generated));
    Ok(())
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let mut options = args.options();
    options.credentials = args.connect.credentials()?;
    let report = bench::run(&options).await?;
    if args.json {
        println!("{}", report.json());
    } else if args.csv {
        print!("{}", report.csv());
    } else {
        print!("{report}");
    }
    Ok(report.check()?)
}

async fn subscribe(
    connect: ConnectArgs,
    subject: &str,
    queue: Option<&str>,
    count: Option<u64>,
    reply_with: Option<&[u8]>,
) -> anyhow::Result<()> {
    let mut conn = commands::listen(&connect.endpoint()?, subject, queue).await?;
    eprintln!("Listening on \"{subject}\"");
    commands::receive(&mut conn, count, reply_with, &mut std::io::stdout().lock()).await?;
    Ok(())
}

/// An error on one line: its message, then each cause the message does
/// not already include. Most of our errors quote their source in their own
/// text (`cannot listen on ADDR: Address already in use`), so anyhow's
/// `{:#}` would say it twice, and its `{:?}` (what `main` returning an
/// error prints) adds a "Caused by" list and, with RUST_BACKTRACE, a
/// backtrace. Line breaks inside a message are folded.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    if let Some(hint) = hint(error) {
        line.push_str("; ");
        line.push_str(hint);
    }
    line
}

/// What to do about the failures whose message does not say it already.
fn hint(error: &anyhow::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    let io_kind = error
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    if let Some(skiff::StartError::Bind { .. }) = error.downcast_ref() {
        return match io_kind {
            Some(ErrorKind::AddrInUse) => Some(
                "is another server running there? Stop it or choose another address \
                 (--listen, or listen in the config file)",
            ),
            Some(ErrorKind::PermissionDenied) => {
                Some("ports below 1024 need privileges: choose a port above 1024")
            }
            _ => Some("give the address as HOST:PORT, e.g. 127.0.0.1:4222"),
        };
    }
    match io_kind {
        Some(ErrorKind::AddrInUse) => {
            Some("is another server running there? Stop it or choose another address")
        }
        Some(ErrorKind::NotFound) => Some("check the path"),
        Some(ErrorKind::PermissionDenied) => Some("check the permissions"),
        _ => None,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, where the log goes too; stdout carries
            // only what a command prints as its result.
            eprintln!("skiff: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Pub(a) => {
            let endpoint = a.connect.endpoint()?;
            commands::publish(&endpoint, &a.subject, a.data.as_bytes(), a.count).await?;
            eprintln!(
                "Published {} x {} bytes to \"{}\"",
                a.count,
                a.data.len(),
                a.subject
            );
            Ok(())
        }
        Command::Sub(a) => {
            subscribe(a.connect, &a.subject, a.queue.as_deref(), a.count, None).await
        }
        Command::Reply(a) => {
            let data = a.data.as_bytes();
            subscribe(
                a.connect,
                &a.subject,
                a.queue.as_deref(),
                a.count,
                Some(data),
            )
            .await
        }
        Command::Req(a) => {
            let endpoint = a.connect.endpoint()?;
            let (reply, rtt) =
                commands::request(&endpoint, &a.subject, a.data.as_bytes(), a.timeout).await?;
            eprintln!("Received with rtt {rtt:?}");
            println!("{}", String::from_utf8_lossy(reply.data()));
            Ok(())
        }
        Command::Bench(args) => bench(args).await,
        Command::Passwd(args) => {
            let password = passwd::read_password()?;
            println!("{}", passwd::hash(&password, args.cost)?);
            Ok(())
        }
        Command::GenCerts(args) => gen_certs(args),
        Command::Signal(args) => signal_server(args.command, &args.target.target()?),
        Command::Reload(target) => signal_server(Signal::Reload, &target.target()?),
        Command::Server(ServerCommand::Check(args)) => check(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let argv = ["skiff", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("flags parse").command {
            Command::Serve(a) => a,
            _ => panic!("not serve"),
        }
    }

    #[test]
    fn serve_flags_require_credentials() {
        let config = serve_args(&["--user", "u", "--pass", "p"])
            .config()
            .unwrap();
        let auth = config.authorization.expect("auth is on");
        assert_eq!(auth.user.as_deref(), Some("u"));
        assert_eq!(auth.password, Some(Secret("p".into())));
        let config = serve_args(&["--auth", "t"]).config().unwrap();
        assert_eq!(
            config.authorization.unwrap().token,
            Some(Secret("t".into()))
        );
        assert!(serve_args(&[]).config().unwrap().authorization.is_none());
        assert!(Cli::try_parse_from(["skiff", "serve", "--user", "u"]).is_err());
    }

    #[test]
    fn http_flag_turns_monitoring_on_and_keeps_the_files_token() {
        assert!(serve_args(&[]).config().unwrap().http.is_none());
        let config = serve_args(&["--http", "127.0.0.1:9222"]).config().unwrap();
        assert_eq!(config.http.unwrap().listen, "127.0.0.1:9222");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("skiff.toml");
        std::fs::write(&file, "[http]\ntoken = \"t0k\"\n").unwrap();
        let path = file.to_str().unwrap();
        let config = serve_args(&["-c", path, "--http", "127.0.0.1:0"])
            .config()
            .unwrap();
        let http = config.http.unwrap();
        assert_eq!(http.listen, "127.0.0.1:0");
        assert_eq!(http.token, Some(Secret("t0k".into())));
    }

    #[test]
    fn errors_are_one_line_without_repeating_their_cause() {
        let in_use = skiff::StartError::Bind {
            addr: "127.0.0.1:4222".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let line = one_line(&anyhow::Error::from(in_use));
        assert!(line.starts_with("cannot listen on 127.0.0.1:4222: address in use; "));
        assert_eq!(line.matches("address in use").count(), 1, "{line}");
        let pid = Err::<(), _>(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("cannot write pid file /run/x.pid")
            .unwrap_err();
        let line = one_line(&pid);
        assert_eq!(
            line,
            "cannot write pid file /run/x.pid: entity not found; check the path"
        );
        let folded = one_line(&anyhow::anyhow!("first\n  second"));
        assert_eq!(folded, "first second");
    }

    #[test]
    fn signal_commands_and_their_targets() {
        let args = serve_args(&["--signal", "ldm", "--pid-file", "/run/s.pid"]);
        assert_eq!(args.signal.as_deref(), Some("ldm"));
        assert!(send_signal("reload", None).is_err(), "no pid");
        let target = |argv: &[&str]| match Cli::try_parse_from(argv).expect("flags parse").command {
            Command::Signal(a) => (a.command, a.target.target().ok()),
            Command::Reload(t) => (Signal::Reload, t.target().ok()),
            _ => panic!("not a signal"),
        };
        assert_eq!(
            target(&["skiff", "signal", "ldm", "--pid", "7"]),
            (Signal::Ldm, Some(Target::Pid(7)))
        );
        assert_eq!(
            target(&["skiff", "reload", "--pid-file", "f"]),
            (Signal::Reload, Some(Target::PidFile("f".into())))
        );
        assert_eq!(target(&["skiff", "signal", "stop"]).1, None);
        assert!(Cli::try_parse_from(["skiff", "signal", "reopen"]).is_err());
        assert!(Cli::try_parse_from(["skiff", "server", "check", "-s", "nats://h:1"]).is_ok());
    }

    #[test]
    fn client_credentials_from_flags_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let file = dir.path().join("user.nk");
        std::fs::write(&file, format!("# my key\n{seed}\n")).unwrap();
        let parse = |args: &[&str]| {
            let argv = ["skiff", "pub", "x"].iter().chain(args);
            match Cli::try_parse_from(argv).expect("flags parse").command {
                Command::Pub(a) => a.connect.credentials(),
                _ => panic!("not pub"),
            }
        };
        let path = file.to_str().unwrap();
        assert_eq!(parse(&["--nkey", path]).unwrap().nkey_seed, Some(seed));
        assert!(parse(&["--nkey", "/nonexistent"]).is_err());
        let err = parse(&["--creds", path]).unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
        let c = parse(&["--user", "u", "--password", "p"]).unwrap();
        assert_eq!(
            (c.user.as_deref(), c.password.as_deref()),
            (Some("u"), Some("p"))
        );
    }
}
