//! A mock Kubernetes API server as a `tower` service behind a real `kube::Client`: it serves
//! Node and Pod lists and watch streams (with resource versions, replay, field selectors on
//! `status.phase`, `410 Gone`), applies server-side-apply and merge patches to Node
//! annotations, server-side applies of Node conditions to the `status` subresource (merged by
//! `type`, as the API server merges them), accepts Events (`events.k8s.io/v1`), records every
//! request, and injects failures.

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
    path: String,
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
    /// Events created or patched, by name.
    events: BTreeMap<String, Value>,
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
                && path == f.path
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

    /// Patches of Node objects (annotations), not of their status.
    pub fn patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.method == "PATCH"
                    && r.path.starts_with("/api/v1/nodes/")
                    && !r.path.ends_with("/status")
            })
            .collect()
    }

    /// Patches of Nodes' status subresource.
    pub fn status_patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
            .collect()
    }

    /// A Node's condition of this type, as stored.
    pub fn condition(&self, node: &str, kind: &str) -> Option<Value> {
        self.node(node)?["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
    }

    /// The Events stored, oldest first.
    pub fn events(&self) -> Vec<Value> {
        let mut events: Vec<Value> = self.lock().events.values().cloned().collect();
        events.sort_by(|a, b| a["eventTime"].as_str().cmp(&b["eventTime"].as_str()));
        events
    }

    /// The reasons of the Events about a Node, oldest first.
    pub fn event_reasons(&self, node: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["regarding"]["kind"] == "Node" && e["regarding"]["name"] == node)
            .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// The next `times` requests with this method and path (and watch flag, if given) fail
    /// with `status`.
    pub fn fail(&self, method: &str, path: &str, watch: Option<bool>, status: u16, times: usize) {
        self.lock().faults.push(Fault {
            method: method.to_owned(),
            path: path.to_owned(),
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
        const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
        if path.starts_with(EVENTS) {
            let Some(event) = body_json else {
                return full(400, &status(400, "BadRequest", "no body"));
            };
            return match method.as_str() {
                "POST" if path == EVENTS => {
                    let name = event["metadata"]["name"].as_str().unwrap_or("").to_owned();
                    s.events.insert(name, event.clone());
                    full(201, &event)
                }
                "PATCH" => {
                    let name = path
                        .trim_start_matches(EVENTS)
                        .trim_start_matches('/')
                        .to_owned();
                    match s.events.get_mut(&name) {
                        Some(stored) => {
                            if let (Some(into), Some(from)) =
                                (stored.as_object_mut(), event.as_object())
                            {
                                for (k, v) in from {
                                    into.insert(k.clone(), v.clone());
                                }
                            }
                            full(200, &stored.clone())
                        }
                        None => full(404, &status(404, "NotFound", "no such event")),
                    }
                }
                _ => full(
                    405,
                    &status(405, "MethodNotAllowed", "not supported by the mock"),
                ),
            };
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
            "PATCH" if kind == Kind::Node && path.ends_with("/status") => {
                let name = path
                    .trim_start_matches("/api/v1/nodes/")
                    .trim_end_matches("/status")
                    .to_owned();
                let Some(mut obj) = s.objects.get(&(Kind::Node, name.clone())).cloned() else {
                    return full(
                        404,
                        &status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                    );
                };
                if content_type.as_deref() != Some("application/apply-patch+yaml") {
                    return full(
                        415,
                        &status(415, "UnsupportedMediaType", "the mock takes apply"),
                    );
                }
                let patch = body_json.unwrap_or(Value::Null);
                // Node conditions are a list map keyed by type: each applied condition
                // replaces the one of its type; the others stay.
                let conditions = obj["status"]
                    .as_object_mut()
                    .unwrap()
                    .entry("conditions")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap();
                for c in patch["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    conditions.retain(|old| old["type"] != c["type"]);
                    conditions.push(c);
                }
                let obj = s.bump(Kind::Node, "MODIFIED", obj);
                full(200, &obj)
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
