//! A small HTTP/1.1 endpoint for health checks and Prometheus: `GET /metrics`, `GET /healthz`
//! (liveness: the agent's loop is running), `GET /readyz` (readiness: synced, and the
//! dataplane matches the plan). The host's endpoint ([`Routes::All`]) is bound to
//! `127.0.0.1:9469` by default, for the kubelet's probes; a second one for Prometheus
//! ([`Routes::MetricsOnly`]) is off unless `metrics_address` is set.
//!
//! It reads at most one request head of 8 KiB per connection, within 5 seconds, and closes
//! the connection after answering; anything else gets a 4xx and is closed. It never panics on
//! input. Connections that send nothing cannot starve it: at most 32 are open at once, and a
//! new one closes the oldest, so a probe always gets through. It keeps serving after a failed
//! `accept()` (out of descriptors, say).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// The default address of the host's endpoint (health and metrics).
pub const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:9469";

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 32;
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Which paths an endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Routes {
    /// `/metrics`, `/healthz`, `/livez`, `/readyz`: the host's endpoint.
    All,
    /// `/metrics` only: the endpoint Prometheus scrapes.
    MetricsOnly,
}

/// The answer to one request head (pure; the server calls it).
///
/// ```
/// use std::time::{Duration, Instant};
/// use wgmesh_k8s::http::{Routes, respond};
/// use wgmesh_k8s::metrics::Metrics;
/// let metrics = Metrics::new();
/// let ask = |head: &[u8], routes| {
///     respond(head, &metrics, Instant::now(), Duration::from_secs(300), routes)
/// };
/// assert_eq!(ask(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", Routes::All).status, 503); // not synced yet
/// assert_eq!(ask(b"GET /metrics HTTP/1.1\r\n\r\n", Routes::All).status, 200);
/// assert_eq!(ask(b"GET /metrics HTTP/1.1\r\n\r\n", Routes::MetricsOnly).status, 200);
/// assert_eq!(ask(b"GET /readyz HTTP/1.1\r\n\r\n", Routes::MetricsOnly).status, 404);
/// assert_eq!(ask(b"\xff\xfe", Routes::All).status, 400);
/// ```
pub fn respond(
    head: &[u8],
    metrics: &Metrics,
    now: Instant,
    max_silence: Duration,
    routes: Routes,
) -> Response {
    let Ok(text) = std::str::from_utf8(head) else {
        return Response::text(400, "bad request\n");
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request\n");
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Response::text(400, "bad request\n");
    }
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "only GET\n");
    }
    let path = target.split('?').next().unwrap_or("");
    if routes == Routes::MetricsOnly && path != "/metrics" {
        return Response::text(404, "not found\n");
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.render(),
        },
        "/healthz" | "/livez" => {
            if metrics.alive(now, max_silence) {
                Response::text(200, "ok\n")
            } else {
                Response::text(503, "the agent's loop has not run recently\n")
            }
        }
        "/readyz" => {
            let state = metrics.state();
            if state.ready() {
                Response::text(200, "ready\n")
            } else {
                let why = if !state.synced {
                    "not synced with the API server yet".to_owned()
                } else {
                    match &state.last_error {
                        Some(e) => format!("dataplane not applied: {e}"),
                        None => "dataplane not applied yet".to_owned(),
                    }
                };
                Response::text(503, format!("{why}\n"))
            }
        }
        _ => Response::text(404, "not found\n"),
    }
}

async fn handle(mut stream: TcpStream, metrics: Metrics, max_silence: Duration, routes: Routes) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    };
    let response = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(true)) => respond(&head, &metrics, Instant::now(), max_silence, routes),
        Ok(Ok(false)) if head.len() > MAX_HEAD => Response::text(431, "request head too large\n"),
        Ok(Ok(false)) | Ok(Err(_)) => return,
        Err(_) => Response::text(408, "timeout\n"),
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

/// Serves forever. `max_silence` is how long the agent's loop may be quiet before `/healthz`
/// fails.
pub async fn serve(listener: TcpListener, metrics: Metrics, max_silence: Duration, routes: Routes) {
    // The open connections, oldest first; a new one beyond the limit closes the oldest.
    let open: Arc<Mutex<VecDeque<(u64, AbortHandle)>>> = Arc::default();
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE, ENOBUFS, a connection reset before accept: wait a little, go on.
                warn!(error = %e, "health endpoint: accept failed; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let metrics = metrics.clone();
        let done = open.clone();
        // Held while spawning, so the task cannot finish (and remove itself) before it is
        // listed.
        let mut open = lock(&open);
        let task = tokio::spawn(async move {
            handle(stream, metrics, max_silence, routes).await;
            lock(&done).retain(|(i, _)| *i != id);
        });
        open.push_back((id, task.abort_handle()));
        while open.len() > MAX_CONNECTIONS {
            if let Some((_, oldest)) = open.pop_front() {
                debug!(%peer, "too many open connections; closed the oldest");
                oldest.abort();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds the endpoint.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}
