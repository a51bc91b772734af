//! A small HTTP/1.1 endpoint for health checks and Prometheus: `GET /metrics`, `GET /healthz`
//! (liveness: the agent's loop is running), `GET /readyz` (readiness: synced, and the
//! dataplane matches the plan). Bound to `127.0.0.1:9469` by default: metrics name every node
//! and key of the mesh, so exposing them beyond the host is the operator's choice.
//!
//! It reads at most one request head of 8 KiB per connection, within 5 seconds, and closes
//! the connection after answering; anything else gets a 4xx and is closed. It never panics on
//! input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use crate::metrics::Metrics;

/// The default address of the endpoint.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9469";

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 32;

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

/// The answer to one request head (pure; the server calls it).
///
/// ```
/// use std::time::{Duration, Instant, SystemTime};
/// use wgmesh_k8s::http::respond;
/// use wgmesh_k8s::metrics::Metrics;
/// let metrics = Metrics::new();
/// let r = respond(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", &metrics, Instant::now(), SystemTime::now(), Duration::from_secs(300));
/// assert_eq!(r.status, 503); // not synced yet
/// let r = respond(b"GET /metrics HTTP/1.1\r\n\r\n", &metrics, Instant::now(), SystemTime::now(), Duration::from_secs(300));
/// assert_eq!(r.status, 200);
/// assert_eq!(respond(b"\xff\xfe", &metrics, Instant::now(), SystemTime::now(), Duration::from_secs(1)).status, 400);
/// ```
pub fn respond(
    head: &[u8],
    metrics: &Metrics,
    now: Instant,
    wall: SystemTime,
    max_silence: Duration,
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
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.render(wall),
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

async fn handle(mut stream: TcpStream, metrics: Metrics, max_silence: Duration) {
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
        Ok(Ok(true)) => respond(
            &head,
            &metrics,
            Instant::now(),
            SystemTime::now(),
            max_silence,
        ),
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

/// Serves until the listener fails. `max_silence` is how long the agent's loop may be quiet
/// before `/healthz` fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    max_silence: Duration,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = listener.accept().await?;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many health connections; dropped");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            handle(stream, metrics, max_silence).await;
            drop(permit);
        });
    }
}

/// Binds the endpoint.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}
