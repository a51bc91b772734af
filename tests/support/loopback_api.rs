//! A minimal Kubernetes API server on loopback (plain HTTP/1.1, chunked watch streams), for
//! the binaries as processes: lists and watches Nodes, applies annotation patches and
//! status-condition applies, takes Events, and records every request.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wgmesh::k8s::tokio;
use wgmesh::k8s::tokio::io::{AsyncReadExt, AsyncWriteExt};
use wgmesh::k8s::tokio::net::{TcpListener, TcpStream};
use wgmesh::k8s::tokio::sync::broadcast;

#[derive(Default)]
pub struct Api {
    pub nodes: Vec<Value>,
    pub rv: u64,
    pub patches: Vec<(String, String, String, Value)>,
    /// Server-side applies to a Node's status subresource: (node, body).
    pub status: Vec<(String, Value)>,
    /// Events posted.
    pub events: Vec<Value>,
    /// Watch events by resource version, replayed to watches that start behind.
    pub log: Vec<(u64, Value)>,
    /// Every request: (method, path with query).
    pub requests: Vec<(String, String)>,
}

async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, String, Vec<(String, String)>, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.lines();
            let mut first = lines.next()?.split(' ');
            let method = first.next()?.to_owned();
            let target = first.next()?.to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((method, target, headers, body));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await
}

async fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut data = serde_json::to_vec(line).unwrap();
    data.push(b'\n');
    stream
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    stream.write_all(&data).await?;
    stream.write_all(b"\r\n").await
}

pub async fn serve(
    listener: TcpListener,
    api: Arc<Mutex<Api>>,
    events: broadcast::Sender<(u64, Value)>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let api = api.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some((method, target, headers, body)) =
                read_request(&mut stream, &mut buf).await
            {
                api.lock()
                    .unwrap()
                    .requests
                    .push((method.clone(), target.clone()));
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let watch = query.split('&').any(|p| p == "watch=true");
                if method == "GET" && path == "/api/v1/nodes" && watch {
                    let since: u64 = query
                        .split('&')
                        .find_map(|p| p.strip_prefix("resourceVersion="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    // Subscribe first, then replay what the watcher missed since its list.
                    let mut rx = events.subscribe();
                    let missed: Vec<(u64, Value)> = api
                        .lock()
                        .unwrap()
                        .log
                        .iter()
                        .filter(|(rv, _)| *rv > since)
                        .cloned()
                        .collect();
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut last = since;
                    for (rv, ev) in missed {
                        last = rv;
                        if chunk(&mut stream, &ev).await.is_err() {
                            return;
                        }
                    }
                    while let Ok((rv, ev)) = rx.recv().await {
                        if rv > last && chunk(&mut stream, &ev).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let reply = if method == "GET" && path == "/api/v1/nodes" {
                    let a = api.lock().unwrap();
                    (
                        200,
                        json!({"kind": "NodeList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": a.rv.to_string()}, "items": a.nodes}),
                    )
                } else if method == "PATCH"
                    && let Some(name) = path
                        .strip_prefix("/api/v1/nodes/")
                        .and_then(|p| p.strip_suffix("/status"))
                {
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let mut a = api.lock().unwrap();
                    a.status.push((name.to_owned(), body.clone()));
                    (200, body)
                } else if method == "POST"
                    && path == "/apis/events.k8s.io/v1/namespaces/default/events"
                {
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    api.lock().unwrap().events.push(body.clone());
                    (201, body)
                } else if method == "PATCH" && path.starts_with("/api/v1/nodes/") {
                    let name = path.trim_start_matches("/api/v1/nodes/").to_owned();
                    let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let ct = headers
                        .iter()
                        .find(|(k, _)| k == "content-type")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    let mut a = api.lock().unwrap();
                    a.patches
                        .push((name.clone(), query.to_owned(), ct, patch.clone()));
                    a.rv += 1;
                    let rv = a.rv.to_string();
                    match a
                        .nodes
                        .iter_mut()
                        .find(|n| n["metadata"]["name"] == name.as_str())
                    {
                        Some(node) => {
                            if let Some(ann) = patch["metadata"]["annotations"].as_object() {
                                for (k, v) in ann {
                                    node["metadata"]["annotations"][k] = v.clone();
                                }
                            }
                            node["metadata"]["resourceVersion"] = json!(rv);
                            let node = node.clone();
                            let ev = json!({"type": "MODIFIED", "object": node});
                            let at = a.rv;
                            a.log.push((at, ev.clone()));
                            let _ = events.send((at, ev));
                            (200, node)
                        }
                        None => (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
                        ),
                    }
                } else {
                    (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
                    )
                };
                if respond(&mut stream, reply.0, &reply.1).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A kubeconfig in `dir` that points at the mock on `port`.
pub fn kubeconfig(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: mock, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: mock, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}

/// Starts the mock with `nodes` on a runtime of its own; returns the runtime (keep it), the
/// state and the port.
pub fn start(nodes: Vec<Value>) -> (tokio::runtime::Runtime, Arc<Mutex<Api>>, u16) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = Arc::new(Mutex::new(Api {
        rv: 10,
        nodes,
        ..Api::default()
    }));
    let (events, _) = broadcast::channel(64);
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(serve(listener, api.clone(), events));
    (runtime, api, port)
}
