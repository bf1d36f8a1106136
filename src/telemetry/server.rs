//! The HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Invariants (the endpoint is reachable by anyone who can reach the port,
//! and must not take the pipeline down with it):
//! - at most [`Limits::max_connections`] connections are open at once; a
//!   connection over the cap gets a best-effort `503` and is closed at
//!   once, without waiting for its request;
//! - a client has [`Limits::read_timeout`] to send its request head (a
//!   total deadline, so dripping bytes does not extend it) and
//!   [`Limits::write_timeout`] to take the response; then it is dropped;
//! - a failing `accept` (EMFILE, ENFILE, ENOBUFS, …) is retried after a
//!   sleep that doubles up to [`Limits::backoff_max`], never in a hot loop;
//! - responses are built on the blocking pool, not on the async thread the
//!   sinks share (a `/metrics` scrape reads the journal's cursors).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{Health, Metrics, TelemetryError};

/// Default cap on concurrent connections.
pub const MAX_CONNECTIONS: usize = 64;
/// Default time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; the rest is ignored.
const MAX_REQUEST: usize = 4096;
/// How often the over-cap and accept-failure warnings may repeat.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Resource limits of the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// First sleep after a failed `accept`; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// The defaults, with the connection cap lowered to a quarter of the
    /// process's open-file limit (`RLIMIT_NOFILE`) when that is smaller,
    /// so the endpoint cannot take the descriptors the pipeline needs.
    pub fn for_process() -> Limits {
        let mut l = Limits::default();
        if let Some(nofile) = open_file_limit() {
            l.max_connections = l.max_connections.min((nofile / 4).max(1));
        }
        l
    }
}

/// The soft open-file limit, from `/proc/self/limits` (None: unlimited or
/// unknown).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Why one connection ended without a complete exchange.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("no complete request within {0:?}")]
    ReadTimeout(Duration),
    #[error("response not taken within {0:?}")]
    WriteTimeout(Duration),
    #[error("closed before sending a request")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One response: status line, content type, body.
pub(crate) struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

type Route = dyn Fn(&str, &str) -> Response + Send + Sync;

/// Binds the telemetry endpoint (so a bad address fails start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TelemetryError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })
}

/// Serves until `shutdown` fires, with [`Limits::for_process`].
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    shutdown: tokio::sync::broadcast::Receiver<()>,
) {
    let limits = Limits::for_process();
    tracing::debug!(
        max_connections = limits.max_connections,
        read_timeout = ?limits.read_timeout,
        write_timeout = ?limits.write_timeout,
        "metrics endpoint limits"
    );
    let route: Arc<Route> = Arc::new(move |method: &str, path: &str| {
        respond(method, path, &metrics, &health, &*refresh)
    });
    serve_with(listener, limits, route, shutdown).await
}

fn respond(
    method: &str,
    path: &str,
    metrics: &Metrics,
    health: &Health,
    refresh: &(dyn Fn() + Send + Sync),
) -> Response {
    let r = |status, content_type, body: String| Response {
        status,
        content_type,
        body,
    };
    if method != "GET" {
        return r("405 Method Not Allowed", "text/plain", "only GET\n".into());
    }
    match path {
        "/metrics" => {
            refresh();
            r(
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(),
            )
        }
        "/healthz" => r("200 OK", "text/plain", "ok\n".into()),
        "/readyz" => {
            let (ready, body) = health.readiness();
            let status = if ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            r(status, "text/plain", body)
        }
        _ => r("404 Not Found", "text/plain", "not found\n".into()),
    }
}

/// Connection errors that concern only the connection being accepted.
fn per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

/// A warning that repeats at most every [`WARN_EVERY`], with a count.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Some(count since the last warning) when it is time to warn again.
    fn due(&mut self) -> Option<u64> {
        self.suppressed += 1;
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

async fn serve_with(
    listener: TcpListener,
    limits: Limits,
    route: Arc<Route>,
    mut shutdown: tokio::sync::broadcast::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = limits.backoff_min;
    let (mut over_cap, mut accept_failed) = (Throttle::default(), Throttle::default());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.recv() => return,
            accepted = listener.accept() => accepted,
        };
        let sock = match accepted {
            Ok((sock, _)) => {
                backoff = limits.backoff_min;
                sock
            }
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                if let Some(failures) = accept_failed.due() {
                    tracing::warn!(
                        error = %e,
                        failures,
                        retry_in = ?backoff,
                        "metrics endpoint: accept failed; backing off"
                    );
                }
                tokio::select! {
                    _ = shutdown.recv() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(limits.backoff_max);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(rejected) = over_cap.due() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    rejected,
                    "metrics endpoint: connection cap reached; closing new connections"
                );
            }
            // Best effort, never waits: the socket buffer is empty.
            let _ = sock.try_write(BUSY);
            drop(sock);
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = handle(sock, &limits, route).await {
                tracing::debug!(error = %e, "metrics endpoint: connection dropped");
            }
        });
    }
}

/// Reads one request head and writes one response, within the deadlines.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    limits: &Limits,
    route: Arc<Route>,
) -> Result<(), ConnError> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut n = 0;
    tokio::time::timeout(limits.read_timeout, async {
        while n < buf.len() {
            let m = sock.read(&mut buf[n..]).await?;
            if m == 0 {
                break;
            }
            n += m;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| ConnError::ReadTimeout(limits.read_timeout))??;
    if n == 0 {
        return Err(ConnError::Closed);
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let mut parts = req.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    // Not on the async thread: a `/metrics` scrape reads the journal.
    let resp = tokio::task::spawn_blocking(move || route(&method, &path))
        .await
        .map_err(std::io::Error::other)?;
    let out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        resp.status,
        resp.content_type,
        resp.body.len(),
        resp.body
    );
    tokio::time::timeout(limits.write_timeout, async {
        sock.write_all(out.as_bytes()).await?;
        sock.shutdown().await
    })
    .await
    .map_err(|_| ConnError::WriteTimeout(limits.write_timeout))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 2,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
        }
    }

    fn ok_route() -> Arc<Route> {
        Arc::new(|_: &str, path: &str| Response {
            status: "200 OK",
            content_type: "text/plain",
            body: format!("{path}\n"),
        })
    }

    fn big_route() -> Arc<Route> {
        Arc::new(|_: &str, _: &str| Response {
            status: "200 OK",
            content_type: "text/plain",
            body: "x".repeat(1 << 20),
        })
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_client_that_does_not_read_the_response_is_dropped() {
        rt().block_on(async {
            // A 64-byte pipe: the 1 MiB response cannot be written until
            // the client reads, and it never does.
            let (mut client, server) = tokio::io::duplex(64);
            client
                .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let route = big_route();
            let r = tokio::time::timeout(Duration::from_secs(3), handle(server, &limits(), route))
                .await
                .expect("the connection is given up within the write timeout");
            assert!(matches!(r, Err(ConnError::WriteTimeout(_))), "{r:?}");
            drop(client);
        });
    }

    #[test]
    fn a_client_that_drips_its_request_is_dropped_at_the_deadline() {
        rt().block_on(async {
            let (mut client, server) = tokio::io::duplex(4096);
            let (route, limits) = (ok_route(), limits());
            let started = Instant::now();
            let drip = async move {
                for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" {
                    if client.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            };
            let (r, _) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(3), handle(server, &limits, route)),
                tokio::time::timeout(Duration::from_secs(3), drip),
            );
            let r = r.expect("dropped within the read timeout");
            assert!(matches!(r, Err(ConnError::ReadTimeout(_))), "{r:?}");
            assert!(started.elapsed() < Duration::from_secs(1));
        });
    }

    #[test]
    fn connections_over_the_cap_are_closed_at_once_and_slots_free_up() {
        rt().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = tokio::sync::broadcast::channel(1);
            let server = tokio::spawn(serve_with(listener, limits(), ok_route(), rx));
            // Two idle connections take both slots.
            let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
            let idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let _ = third.read_to_end(&mut got).await;
            assert!(started.elapsed() < Duration::from_millis(250));
            assert!(
                got.is_empty() || got.starts_with(b"HTTP/1.1 503"),
                "{got:?}"
            );
            // The idle ones are closed by the server at the read timeout.
            for mut s in [idle1, idle2] {
                let mut b = Vec::new();
                let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut b)).await;
                assert!(r.is_ok(), "idle connection not closed by the server");
            }
            // Then a real request is served.
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
            let mut b = String::new();
            s.read_to_string(&mut b).await.unwrap();
            assert!(
                b.starts_with("HTTP/1.1 200 OK") && b.ends_with("/healthz\n"),
                "{b}"
            );
            tx.send(()).unwrap();
            server.await.unwrap();
        });
    }

    #[test]
    fn the_cap_never_exceeds_a_quarter_of_the_open_file_limit() {
        let l = Limits::for_process();
        assert!(l.max_connections >= 1 && l.max_connections <= MAX_CONNECTIONS);
        if let Some(n) = open_file_limit() {
            assert!(l.max_connections <= (n / 4).max(1));
        }
    }
}
