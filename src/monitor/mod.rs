//! Monitoring over HTTP: nats-server's JSON endpoints (`/varz`, `/connz`,
//! `/subsz`, `/routez`, `/jsz`, `/healthz`) and `/metrics` for Prometheus.
//!
//! Job: show what the server is doing to operators, dashboards and probes,
//! in nats-server's field names so existing scripts keep working. The HTTP
//! server is hyper (HTTP/1.1, `GET` only: anything else is 405, an unknown
//! path 404); it runs when `[http]` (or `--http`) is configured, on
//! loopback by default, and stops with the server.
//!
//! Invariants:
//! - **Read-only.** Every view reads the state the server keeps anyway
//!   (per-connection counts folded on read, the sublist's counters, the
//!   stream API's own `info` answers); nothing here changes the server, and
//!   nothing on the message path does extra work for monitoring.
//! - **No credentials.** Views show user names and TLS parameters, never a
//!   password, token or key; the `[http]` token itself is a redacted
//!   [`Secret`].
//! - **Bounded.** At most [`MAX_CONNECTIONS`] HTTP connections at once
//!   (more are closed on accept); headers must arrive within
//!   [`HEADER_TIMEOUT`]; work that may touch the disk or wait for a
//!   stream's lock (`/varz`, `/jsz`, `/metrics`, `/healthz`) runs on the
//!   blocking pool, off the server's event loop.
//! - **Token.** With `[http] token`, every endpoint except `/healthz`
//!   requires `Authorization: Bearer <token>` (compared in constant time;
//!   a reload may change it, not `listen`);
//!   `/healthz` stays open because load balancers and Kubernetes probes do
//!   not send one, and it tells nothing but ok/unavailable.

mod connz;
mod healthz;
mod jsz;
mod prometheus;
mod routez;
mod subsz;
mod varz;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::authorization::Secret;
use crate::config::http::HttpConfig;
use crate::server::ServerState;

pub use healthz::{PROBE_FILE, PROBE_TTL};

/// Most HTTP connections served at once; one more is closed at accept.
/// Monitoring is polled by a handful of scrapers, so this only guards the
/// server against a misbehaving client.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an in-flight request may take to finish once the server shuts
/// down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Rows a paged list (`/connz`, `/subsz`) returns when `limit` is not
/// given: nats-server's default.
const DEFAULT_LIMIT: usize = 1024;

/// Why the monitoring listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot listen for monitoring on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Why one request could not be answered; each maps to one status code.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("invalid value {value:?} for `{name}`")]
    BadQuery { name: String, value: String },
    #[error("unknown sort option {0:?}")]
    BadSort(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    fn status(&self) -> StatusCode {
        match self {
            RequestError::BadQuery { .. } | RequestError::BadSort(_) => StatusCode::BAD_REQUEST,
            RequestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The bound, not yet serving, HTTP listener: bound before the rest of the
/// server starts, so that a taken port fails `Server::start` cleanly.
pub struct HttpListener {
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<Secret>,
}

/// Binds `config.listen`.
pub(crate) async fn bind(config: &HttpConfig) -> Result<HttpListener, MonitorError> {
    let bind_error = |source| MonitorError::Bind {
        addr: config.listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok(HttpListener {
        listener,
        addr,
        token: config.token.clone(),
    })
}

/// Starts serving on `listener` until the server shuts down; returns the
/// bound address.
pub(crate) fn serve(state: &Arc<ServerState>, listener: HttpListener) -> SocketAddr {
    let HttpListener {
        listener,
        addr,
        token,
    } = listener;
    if !addr.ip().is_loopback() && token.is_none() {
        tracing::warn!(
            "Monitoring on {addr} is reachable from other hosts and has no token: \
             it shows every connection's address, name and user"
        );
    }
    tracing::info!("Starting http monitor on http://{addr}");
    let monitor = Arc::new(Monitor {
        state: Arc::clone(state),
        addr,
        cpu: varz::CpuMeter::new(),
        health: healthz::Probe::default(),
        connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    });
    state.spawn(accept_loop(monitor, listener));
    addr
}

/// What every request handler shares.
struct Monitor {
    state: Arc<ServerState>,
    /// Where the endpoints are served (shown in `/varz`).
    addr: SocketAddr,
    /// The previous CPU sample, for `/varz`'s `cpu` percentage.
    cpu: varz::CpuMeter,
    /// The store probe of `/healthz`, cached briefly.
    health: healthz::Probe,
    connections: Arc<Semaphore>,
}

async fn accept_loop(monitor: Arc<Monitor>, listener: TcpListener) {
    let shutdown = monitor.state.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually out of file descriptors: back off, do not spin.
                tracing::warn!("Error accepting monitoring connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&monitor.connections).try_acquire_owned() else {
            tracing::debug!("{peer} - too many monitoring connections, closed");
            continue;
        };
        let m = Arc::clone(&monitor);
        monitor.state.spawn(async move {
            serve_connection(m, stream).await;
            drop(permit);
        });
    }
    tracing::debug!("http monitor stopped");
}

/// Serves one HTTP connection (keep-alive included) until the client
/// closes it or the server shuts down.
async fn serve_connection(monitor: Arc<Monitor>, stream: TcpStream) {
    let shutdown = monitor.state.shutdown.clone();
    let service = service_fn(move |request| {
        let monitor = Arc::clone(&monitor);
        async move { Ok::<_, Infallible>(monitor.respond(request).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!("monitoring connection: {e}");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// The endpoints, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Index,
    Varz,
    Connz,
    Subsz,
    Routez,
    Jsz,
    Healthz,
    Metrics,
}

impl Endpoint {
    const ALL: [(&'static str, Endpoint); 8] = [
        ("/", Endpoint::Index),
        ("/varz", Endpoint::Varz),
        ("/connz", Endpoint::Connz),
        ("/subsz", Endpoint::Subsz),
        ("/routez", Endpoint::Routez),
        ("/jsz", Endpoint::Jsz),
        ("/healthz", Endpoint::Healthz),
        ("/metrics", Endpoint::Metrics),
    ];

    fn from_path(path: &str) -> Option<Endpoint> {
        // nats-server's long name for /subsz is accepted too.
        let path = match path {
            "/subscriptionsz" => "/subsz",
            "/" => "/",
            p => p.strip_suffix('/').unwrap_or(p),
        };
        Endpoint::ALL
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, e)| *e)
    }
}

impl Monitor {
    async fn respond(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(endpoint) = Endpoint::from_path(request.uri().path()) else {
            return error(StatusCode::NOT_FOUND, "not found");
        };
        if request.method() != Method::GET {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return response;
        }
        if endpoint != Endpoint::Healthz && !self.authorized(request.headers()) {
            let mut response = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"skiff\""),
            );
            return response;
        }
        self.answer(endpoint, &request)
            .await
            .unwrap_or_else(|e| error(e.status(), &e.to_string()))
    }

    async fn answer(
        self: Arc<Self>,
        endpoint: Endpoint,
        request: &Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, RequestError> {
        let query = Query::parse(request.uri().query().unwrap_or(""));
        const OK: StatusCode = StatusCode::OK;
        Ok(match endpoint {
            Endpoint::Index => json(OK, &index()),
            Endpoint::Varz => blocking(&self, |m| json(OK, &varz::varz(m))).await?,
            Endpoint::Connz => json(OK, &connz::connz(&self, &query)?),
            Endpoint::Subsz => json(OK, &subsz::subsz(&self, &query)?),
            Endpoint::Routez => json(OK, &routez::routez(&self)),
            Endpoint::Jsz => {
                let options = jsz::Options::parse(&query)?;
                blocking(&self, move |m| json(OK, &jsz::jsz(m, &options))).await?
            }
            Endpoint::Healthz => blocking(&self, healthz::healthz).await?,
            Endpoint::Metrics => blocking(&self, prometheus::metrics).await?,
        })
    }

    /// Whether the request carries the configured bearer token (always, when
    /// none is configured). The token is the running configuration's, so a
    /// reload that changes it applies from the next request.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let live = self.state.live();
        let Some(token) = live.config.http.as_ref().and_then(|h| h.token.as_ref()) else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        // Constant time over the token's bytes, so response timing does not
        // reveal how much of a guess was right.
        given.is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.0.as_bytes())))
    }
}

/// Runs `work` on the blocking pool (it may read the disk).
async fn blocking<F>(monitor: &Arc<Monitor>, work: F) -> Result<Response<Full<Bytes>>, RequestError>
where
    F: FnOnce(&Monitor) -> Response<Full<Bytes>> + Send + 'static,
{
    let monitor = Arc::clone(monitor);
    tokio::task::spawn_blocking(move || work(&monitor))
        .await
        .map_err(|e| RequestError::Internal(e.to_string()))
}

#[derive(Serialize)]
struct Index {
    endpoints: Vec<&'static str>,
}

fn index() -> Index {
    Index {
        endpoints: Endpoint::ALL
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| *p != "/")
            .collect(),
    }
}

/// A JSON response, indented as nats-server's are (people read them with
/// curl).
fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => response(status, "application/json", body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `{"error": text}` with `status`.
fn error(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": text }).to_string();
    response(status, "application/json", body)
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Every answer is a live reading: no proxy may serve a stale one.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A request's query string, decoded.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(text: &str) -> Query {
        Query(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A flag: `name=1`, `name=true` (nats-server's spellings), or a bare
    /// `name`.
    fn flag(&self, name: &str) -> Result<bool, RequestError> {
        match self.get(name) {
            None => Ok(false),
            Some("" | "1" | "true" | "yes") => Ok(true),
            Some("0" | "false" | "no") => Ok(false),
            Some(other) => Err(bad_query(name, other)),
        }
    }

    /// A non-negative number, `default` when absent.
    fn number(&self, name: &str, default: usize) -> Result<usize, RequestError> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(v) => v.parse().map_err(|_| bad_query(name, v)),
        }
    }
}

fn bad_query(name: &str, value: &str) -> RequestError {
    RequestError::BadQuery {
        name: name.to_string(),
        value: value.to_string(),
    }
}

/// `%XX` escapes and `+` for space; a malformed escape is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
                out.push(digit(bytes[i + 1]) << 4 | digit(bytes[i + 2]));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Nanoseconds since the Unix epoch (0 for a time before it).
fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// RFC 3339 with nanoseconds, as nats-server writes times.
fn rfc3339(t: SystemTime) -> String {
    crate::stream::api::rfc3339(unix_nanos(t))
}

/// How long since `t`, in nats-server's style: `1d2h3m4s`, `5m0s`, `12s`.
fn uptime(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m{s}s"),
        _ => format!("{d}d{h}h{m}m{s}s"),
    }
}

/// `offset`/`limit` paging over `rows`.
fn page<T>(rows: Vec<T>, offset: usize, limit: usize) -> Vec<T> {
    rows.into_iter().skip(offset).take(limit).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_checked() {
        let q = Query::parse("subs=1&sort=bytes_to&limit=5&name=a%20b+c&bad%2");
        assert!(q.flag("subs").unwrap());
        assert!(!q.flag("missing").unwrap());
        assert_eq!(q.get("sort"), Some("bytes_to"));
        assert_eq!(q.number("limit", 9).unwrap(), 5);
        assert_eq!(q.number("offset", 9).unwrap(), 9);
        assert_eq!(q.get("name"), Some("a b c"));
        assert!(q.get("bad%2").is_some());
        assert!(Query::parse("limit=-1").number("limit", 0).is_err());
        assert!(Query::parse("subs=maybe").flag("subs").is_err());
    }

    #[test]
    fn paths_name_endpoints() {
        assert_eq!(Endpoint::from_path("/varz"), Some(Endpoint::Varz));
        assert_eq!(Endpoint::from_path("/varz/"), Some(Endpoint::Varz));
        assert_eq!(
            Endpoint::from_path("/subscriptionsz"),
            Some(Endpoint::Subsz)
        );
        assert_eq!(Endpoint::from_path("/"), Some(Endpoint::Index));
        assert_eq!(Endpoint::from_path("/nope"), None);
    }

    #[test]
    fn uptime_reads_like_nats_servers() {
        let ago = |s| SystemTime::now() - Duration::from_secs(s);
        assert_eq!(uptime(ago(12)), "12s");
        assert_eq!(uptime(ago(300)), "5m0s");
        assert_eq!(uptime(ago(3_661)), "1h1m1s");
        assert_eq!(uptime(ago(90_061)), "1d1h1m1s");
    }
}
