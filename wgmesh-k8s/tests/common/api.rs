//! A mock Kubernetes API server as a `tower` service behind a real `kube::Client`: it serves
//! Node and Pod lists and watch streams (with resource versions, replay, field selectors on
//! `status.phase`, `410 Gone`), applies server-side-apply and merge patches to Node
//! annotations, records every request, and injects failures.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Pod,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Node => "/api/v1/nodes",
            Kind::Pod => "/api/v1/pods",
        }
    }
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Node => "NodeList",
            Kind::Pod => "PodList",
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

struct Watcher {
    kind: Kind,
    selector: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct Fault {
    method: String,
    path_prefix: String,
    watch: Option<bool>,
    status: u16,
    remaining: usize,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    log: Vec<(u64, Kind, &'static str, Value)>,
    watchers: Vec<Watcher>,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
    /// Annotations set by wgmesh's server-side apply, per node.
    owned: BTreeMap<String, BTreeSet<String>>,
}

/// The mock API server. Cloning shares it.
#[derive(Clone, Default)]
pub struct MockApi {
    state: Arc<Mutex<State>>,
}

fn key_of(kind: Kind, obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_owned();
    match kind {
        Kind::Node => name,
        Kind::Pod => format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            name
        ),
    }
}

/// Whether a pod matches a `status.phase!=A,status.phase!=B` selector.
fn matches(selector: &Option<String>, obj: &Value) -> bool {
    let Some(sel) = selector else { return true };
    let phase = obj["status"]["phase"].as_str().unwrap_or("");
    sel.split(',').all(|term| match term.split_once("!=") {
        Some(("status.phase", v)) => phase != v,
        _ => match term.split_once('=') {
            Some(("status.phase", v)) => phase == v,
            _ => true,
        },
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn full(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(serde_json::to_vec(body).unwrap()))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

impl State {
    fn bump(&mut self, kind: Kind, event: &'static str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if event != "DELETED" {
            self.objects.insert((kind, key_of(kind, &obj)), obj.clone());
        }
        self.log.push((self.rv, kind, event, obj.clone()));
        self.watchers.retain(|w| {
            if w.kind != kind {
                return !w.tx.is_closed();
            }
            let ev = if matches(&w.selector, &obj) {
                event
            } else if event == "MODIFIED" || event == "DELETED" {
                // A pod that stops matching the selector is gone for this watch.
                "DELETED"
            } else {
                return !w.tx.is_closed();
            };
            w.tx.send(line(ev, &obj)).is_ok()
        });
        obj
    }

    fn fault(&mut self, method: &str, path: &str, watch: bool) -> Option<u16> {
        for f in &mut self.faults {
            if f.remaining > 0
                && f.method == method
                && path.starts_with(&f.path_prefix)
                && f.watch.is_none_or(|w| w == watch)
            {
                f.remaining -= 1;
                return Some(f.status);
            }
        }
        None
    }
}

impl MockApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube client whose every request goes to this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn put(&self, kind: Kind, obj: impl serde::Serialize) {
        let obj = serde_json::to_value(obj).unwrap();
        let mut s = self.lock();
        let event = if s.objects.contains_key(&(kind, key_of(kind, &obj))) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.bump(kind, event, obj);
    }

    /// Deletes an object.
    pub fn delete(&self, kind: Kind, key: &str) {
        let mut s = self.lock();
        if let Some(obj) = s.objects.remove(&(kind, key.to_owned())) {
            s.bump(kind, "DELETED", obj);
        }
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(Kind::Node, name.to_owned()))
            .cloned()
    }

    pub fn annotation(&self, node: &str, key: &str) -> Option<String> {
        self.node(node)?["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }

    /// The next `times` requests with this method and path prefix (and watch flag, if
    /// given) fail with `status`.
    pub fn fail(
        &self,
        method: &str,
        path_prefix: &str,
        watch: Option<bool>,
        status: u16,
        times: usize,
    ) {
        self.lock().faults.push(Fault {
            method: method.to_owned(),
            path_prefix: path_prefix.to_owned(),
            watch,
            status,
            remaining: times,
        });
    }

    /// Ends every open watch with `410 Gone` (the watchers relist).
    pub fn expire_watches(&self) {
        let mut s = self.lock();
        let gone = line("ERROR", &status(410, "Expired", "too old resource version"));
        for w in s.watchers.drain(..) {
            let _ = w.tx.send(gone.clone());
        }
    }

    /// Drops every open watch connection (the watchers reconnect).
    pub fn drop_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Open watch connections of a kind.
    pub fn watch_count(&self, kind: Kind) -> usize {
        self.lock()
            .watchers
            .iter()
            .filter(|w| w.kind == kind && !w.tx.is_closed())
            .count()
    }

    fn handle(&self, parts: http::request::Parts, body: Bytes) -> Response<Body> {
        let method = parts.method.to_string();
        let path = parts.uri.path().to_owned();
        let query: BTreeMap<String, String> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), percent_decode(v))
            })
            .collect();
        let content_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body_json = if body.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&body)
                    .unwrap_or(Value::String(String::from_utf8_lossy(&body).into_owned())),
            )
        };
        let recorded = Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: body_json.clone(),
        };
        let watch = recorded.is_watch();
        let mut s = self.lock();
        s.requests.push(recorded);
        if let Some(code) = s.fault(&method, &path, watch) {
            return full(code, &status(code, "InternalError", "injected failure"));
        }
        let kind = if path.starts_with(Kind::Node.path()) {
            Kind::Node
        } else if path.starts_with(Kind::Pod.path()) {
            Kind::Pod
        } else {
            return full(404, &status(404, "NotFound", "no such resource"));
        };
        let selector = query.get("fieldSelector").cloned();
        match method.as_str() {
            "GET" if path == kind.path() && !watch => {
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((k, _), o)| *k == kind && matches(&selector, o))
                    .map(|(_, o)| o.clone())
                    .collect();
                let body = json!({"kind": kind.list_kind(), "apiVersion": "v1",
                                  "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
                full(200, &body)
            }
            "GET" if path == kind.path() => {
                let since: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                for (rv, k, ev, obj) in &s.log {
                    if *k == kind && *rv > since {
                        let ev = if matches(&selector, obj) {
                            *ev
                        } else if *ev == "ADDED" {
                            continue;
                        } else {
                            "DELETED"
                        };
                        let _ = tx.send(line(ev, obj));
                    }
                }
                s.watchers.push(Watcher { kind, selector, tx });
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap()
            }
            "PATCH" if kind == Kind::Node => {
                let name = path.trim_start_matches("/api/v1/nodes/").to_owned();
                let Some(mut obj) = s.objects.get(&(Kind::Node, name.clone())).cloned() else {
                    return full(
                        404,
                        &status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                    );
                };
                let patch = body_json.unwrap_or(Value::Null);
                let new = patch["metadata"]["annotations"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                let annotations = obj["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .entry("annotations")
                    .or_insert_with(|| json!({}));
                let annotations = annotations.as_object_mut().unwrap();
                match content_type.as_deref() {
                    Some("application/apply-patch+yaml") => {
                        let before = s.owned.remove(&name).unwrap_or_default();
                        for k in before {
                            if !new.contains_key(&k) {
                                annotations.remove(&k);
                            }
                        }
                        for (k, v) in &new {
                            annotations.insert(k.clone(), v.clone());
                        }
                        s.owned.insert(name.clone(), new.keys().cloned().collect());
                    }
                    Some("application/merge-patch+json") => {
                        for (k, v) in &new {
                            if v.is_null() {
                                annotations.remove(k);
                                if let Some(o) = s.owned.get_mut(&name) {
                                    o.remove(k);
                                }
                            } else {
                                annotations.insert(k.clone(), v.clone());
                            }
                        }
                    }
                    other => {
                        return full(
                            415,
                            &status(415, "UnsupportedMediaType", &format!("{other:?}")),
                        );
                    }
                }
                let obj = s.bump(Kind::Node, "MODIFIED", obj);
                full(200, &obj)
            }
            _ => full(
                405,
                &status(405, "MethodNotAllowed", "not supported by the mock"),
            ),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl tower::Service<Request<kube::client::Body>> for MockApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Ok(api.handle(parts, body))
        })
    }
}
