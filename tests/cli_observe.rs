//! The operator's questions, answered by the `wgmesh` binary as a process: `why` (is this flow
//! encrypted, and through whom?), `plan --all`, `graph` (SVG parsed back) and the
//! cluster-wide `status` — from cluster files, from `kubectl get -o json` output (the recorded
//! AKS fixtures), and from the loopback API server, where nothing but lists may be sent.

use std::collections::BTreeMap;

use serde_json::{Value, json};

#[path = "support/cli.rs"]
mod cli;
#[path = "support/loopback_api.rs"]
mod loopback_api;

use cli::{CONFIG, NODES, PODS, wgmesh};

const AKS: &str = "examples/clusters/aks-azure-cni.json";
const MIXED: &str = "examples/clusters/mixed-dual-stack.yaml";
const N0: &str = "aks-nodepool1-19852467-vmss000000";
const N1: &str = "aks-nodepool1-19852467-vmss000001";
const N2: &str = "aks-nodepool1-19852467-vmss000002";

fn json_out(args: &[&str], code: i32) -> Value {
    let out = wgmesh(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn one_line_error(args: &[&str], needle: &str) {
    let out = wgmesh(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn why_pod_to_pod_on_aks_is_encrypted_and_names_the_peer_and_allowed_ip() {
    let from_kubectl = [
        "--from-kubectl",
        NODES,
        PODS,
        "--agent-config",
        CONFIG,
        "--format",
        "json",
    ];
    let mut args = vec![
        "why",
        "kube-system/coredns-6f8b9d9f4b-7xk2p",
        "default/web-7d4b9c8f5d-kz6tb",
        "--proto",
        "udp",
        "--port",
        "53",
    ];
    args.extend(from_kubectl);
    let a = json_out(&args, 0);
    assert_eq!(a["verdict"], "encrypted");
    assert_eq!(a["from"]["address"], "10.240.0.5");
    assert_eq!(a["from"]["node"], N0);
    assert_eq!(a["to"]["address"], "10.240.0.65");
    assert_eq!(a["tunnels"], json!([[N0, N2]]));
    let hops: Vec<&str> = a["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    // The deciding objects: the policy rule and table, the peer and its allowed IP.
    assert!(
        hops.iter()
            .any(|h| h.contains("rule") && h.contains("table") && h.contains("10.240.0.65/32")),
        "{hops:?}"
    );
    assert!(
        hops.iter()
            .any(|h| h.contains(&format!("peer {N2} (allowed 10.240.0.65/32)"))),
        "{hops:?}"
    );
    assert!(
        hops.last()
            .unwrap()
            .contains("delivered to pod 10.240.0.65"),
        "{hops:?}"
    );

    // A node to another node's pod, by names; host encryption is on in the agent's config.
    let mut args = vec!["why", N1, "default/web-7d4b9c8f5d-kz6tb"];
    args.extend(from_kubectl);
    let a = json_out(&args, 0);
    assert_eq!(a["verdict"], "encrypted");
    assert_eq!(a["from"]["kind"], "node");
    assert_eq!(a["tunnels"], json!([[N1, N2]]));
    // A pod on the same node: local.
    let mut args = vec![
        "why",
        "kube-system/coredns-6f8b9d9f4b-7xk2p",
        "kube-system/metrics-server-7b685846d6-q8w4r",
    ];
    args.extend(from_kubectl);
    assert_eq!(json_out(&args, 0)["verdict"], "local");
}

#[test]
fn why_from_a_cluster_file_plain_and_encrypted() {
    // The mixed cluster: legacy-1 has no WireGuard, so traffic with it is plain.
    let a = json_out(
        &["why", "10.65.0.2", "10.65.0.130", "-c", MIXED, "-f", "json"],
        0,
    );
    assert_eq!(a["verdict"], "plain");
    assert_eq!(a["to"]["node"], "legacy-1");
    assert!(
        a["hops"].as_array().unwrap().iter().any(|h| h
            .as_str()
            .unwrap()
            .contains("main table: plaintext on the underlay")),
        "{a}"
    );
    let a = json_out(
        &["why", "10.65.0.2", "10.65.0.66", "-c", MIXED, "-f", "json"],
        0,
    );
    assert_eq!(a["verdict"], "encrypted");
    assert_eq!(a["tunnels"], json!([["cp-1", "worker-1"]]));
    // IPv6 between the nodes' hosts: no host encryption in this cluster.
    let a = json_out(
        &[
            "why", "cp-1", "worker-1", "--family", "ipv6", "-c", MIXED, "-f", "json",
        ],
        0,
    );
    assert_eq!(a["verdict"], "plain");
    assert_eq!(a["from"]["address"], "fd00:10::11");
    // The text form says the verdict and numbers the hops.
    let out = wgmesh(&["why", "10.65.0.2", "10.65.0.66", "-c", MIXED]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("verdict: encrypted (WireGuard cp-1 → worker-1)"),
        "{text}"
    );
    assert!(text.contains("   1. cp-1: pod 10.65.0.2"), "{text}");
}

#[test]
fn why_refuses_what_it_cannot_name() {
    one_line_error(&["why", "nope", "cp-1", "-c", MIXED], "nope is no node");
    one_line_error(
        &["why", "default/web", "cp-1", "-c", MIXED],
        "pod names need --from-kubectl or --kubeconfig",
    );
    one_line_error(
        &["why", "8.8.8.8", "cp-1", "-c", MIXED],
        "a packet starts at a pod or a node",
    );
    one_line_error(
        &["why", "legacy-1", "cp-1", "--family", "ipv6", "-c", MIXED],
        "legacy-1 has no ipv6 address",
    );
    one_line_error(
        &[
            "why",
            "default/nope",
            N0,
            "--from-kubectl",
            NODES,
            PODS,
            "--agent-config",
            CONFIG,
        ],
        "no pod default/nope",
    );
}

#[test]
fn plan_all_summarises_every_node_and_its_state() {
    let r = json_out(&["plan", "--all", "-c", MIXED, "-f", "json"], 0);
    let nodes: BTreeMap<&str, &Value> = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap(), n))
        .collect();
    assert_eq!(nodes["cp-1"]["state"], "mesh");
    assert_eq!(nodes["cp-1"]["peers"], 2); // worker-1 in each family
    assert_eq!(nodes["legacy-1"]["state"], "plain");
    assert_eq!(
        nodes["legacy-1"]["reasons"],
        json!(["ipv4: WireGuard disabled"])
    );
    assert!(
        r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "plain" && f["node"] == "legacy-1")
    );
    // A duplicate key excludes both nodes, and says so.
    let dir = tempdir("dup");
    let file = duplicate_key_cluster(&dir);
    let out = wgmesh(&["plan", "--all", "-c", file.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("3 nodes: 1 in the mesh, 0 plain, 2 excluded"),
        "{text}"
    );
    assert!(text.contains("ipv4: duplicate key"), "{text}");
    assert!(text.contains("finding: "), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A cluster file in `dir` where nodes a and b publish one key.
fn duplicate_key_cluster(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("dup.json");
    std::fs::write(
        &file,
        r#"{"nodes": [
          {"name": "a", "addresses": ["10.0.0.1"], "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
          {"name": "b", "addresses": ["10.0.0.2"], "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
          {"name": "c", "addresses": ["10.0.0.3"], "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#,
    )
    .unwrap();
    file
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wgmesh-observe-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Nodes and edges of an SVG written by `wgmesh graph`, read back with an XML parser.
struct Picture {
    nodes: BTreeMap<String, (String, String)>,
    edges: BTreeMap<(String, String, String), (String, String)>,
}

fn picture(svg: &str) -> Picture {
    let doc = roxmltree::Document::parse(svg).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let mut nodes = BTreeMap::new();
    let mut edges = BTreeMap::new();
    for e in doc.descendants().filter(|e| e.is_element()) {
        match e.attribute("class") {
            Some("node") => {
                let rect = e.children().find(|c| c.has_tag_name("rect")).unwrap();
                let label = e.children().find(|c| c.has_tag_name("text")).unwrap();
                assert!(
                    e.attribute("data-name")
                        .unwrap()
                        .ends_with(label.text().unwrap().rsplit('…').next().unwrap()),
                    "the label is the node's name"
                );
                nodes.insert(
                    e.attribute("data-name").unwrap().to_owned(),
                    (
                        e.attribute("data-state").unwrap().to_owned(),
                        rect.attribute("fill").unwrap().to_owned(),
                    ),
                );
            }
            Some("edge") => {
                edges.insert(
                    (
                        e.attribute("data-a").unwrap().to_owned(),
                        e.attribute("data-b").unwrap().to_owned(),
                        e.attribute("data-family").unwrap().to_owned(),
                    ),
                    (
                        e.attribute("data-kind").unwrap().to_owned(),
                        e.attribute("stroke").unwrap().to_owned(),
                    ),
                );
            }
            _ => {}
        }
    }
    Picture { nodes, edges }
}

const GREEN_NODE: &str = "#a5d6a7";
const GREY_NODE: &str = "#e0e0e0";
const ORANGE_NODE: &str = "#ffcc80";
const GREEN_EDGE: &str = "#2e7d32";
const RED_EDGE: &str = "#c62828";

fn svg(args: &[&str]) -> Picture {
    let out = wgmesh(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    picture(&String::from_utf8(out.stdout).unwrap())
}

fn edge(a: &str, b: &str, family: &str) -> (String, String, String) {
    (a.to_owned(), b.to_owned(), family.to_owned())
}

#[test]
fn graph_svg_has_every_node_and_edge_in_the_right_colours() {
    let aks = svg(&["graph", "-c", AKS]);
    assert_eq!(aks.nodes.len(), 3);
    for (state, fill) in aks.nodes.values() {
        assert_eq!((state.as_str(), fill.as_str()), ("mesh", GREEN_NODE));
    }
    assert_eq!(aks.edges.len(), 3, "every pair once, IPv4 only");
    for (kind, stroke) in aks.edges.values() {
        assert_eq!((kind.as_str(), stroke.as_str()), ("encrypted", GREEN_EDGE));
    }

    let mixed = svg(&["graph", "-c", MIXED, "--format", "svg"]);
    assert_eq!(mixed.nodes["cp-1"], ("mesh".into(), GREEN_NODE.into()));
    assert_eq!(mixed.nodes["legacy-1"], ("plain".into(), GREY_NODE.into()));
    let expected = [
        (edge("cp-1", "worker-1", "ipv4"), "encrypted", GREEN_EDGE),
        (edge("cp-1", "worker-1", "ipv6"), "encrypted", GREEN_EDGE),
        (edge("cp-1", "legacy-1", "ipv4"), "plain", RED_EDGE),
        (edge("worker-1", "legacy-1", "ipv4"), "plain", RED_EDGE),
    ];
    assert_eq!(mixed.edges.len(), expected.len(), "{:?}", mixed.edges);
    for (key, kind, colour) in expected {
        assert_eq!(
            mixed.edges[&key],
            (kind.to_owned(), colour.to_owned()),
            "{key:?}"
        );
    }

    // Excluded nodes (a duplicate key) are orange, and hostile names stay text.
    let dir = tempdir("graph");
    let file = duplicate_key_cluster(&dir);
    let p = svg(&["graph", "-c", file.to_str().unwrap()]);
    assert_eq!(p.nodes["a"], ("excluded".into(), ORANGE_NODE.into()));
    assert_eq!(p.nodes["c"], ("mesh".into(), GREEN_NODE.into()));
    assert_eq!(p.edges[&edge("a", "c", "ipv4")].0, "plain");
    std::fs::remove_dir_all(dir).unwrap();

    // DOT names every node and edge too.
    let out = wgmesh(&["graph", "-c", MIXED, "-f", "dot"]);
    let dot = String::from_utf8(out.stdout).unwrap();
    assert!(dot.starts_with("graph wgmesh {"), "{dot}");
    assert!(
        dot.contains(r##""cp-1" -- "legacy-1" [label="ipv4 plain", color="#c62828"]"##),
        "{dot}"
    );
}

/// The AKS fixture's Nodes with the conditions their agents would have written.
fn nodes_with_conditions(now: i64) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{}/{NODES}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut items = serde_json::from_str::<Value>(&text).unwrap()["items"]
        .as_array()
        .unwrap()
        .clone();
    let time = |t: i64| {
        let secs = t.rem_euclid(86_400);
        let days = t.div_euclid(86_400);
        // 1970-01-01 + days, by the civil-from-days algorithm.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        )
    };
    let condition = |status: &str, reason: &str, heartbeat: i64| {
        json!({"type": "WireGuardMeshReady", "status": status, "reason": reason,
               "message": format!("{reason} message"),
               "lastHeartbeatTime": time(heartbeat), "lastTransitionTime": time(heartbeat - 3600)})
    };
    let conditions = [
        condition("True", "MeshReady", now - 60),
        // An agent silent for an hour.
        condition("True", "MeshReady", now - 3600),
        condition("False", "ApplyFailed", now - 30),
    ];
    for (item, c) in items.iter_mut().zip(conditions) {
        item["status"]["conditions"] = json!([c]);
    }
    items
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn cluster_status_reports_each_agent_and_exits_3_when_unhealthy() {
    let dir = tempdir("status");
    let file = dir.join("nodes.json");
    let items = nodes_with_conditions(now());
    std::fs::write(&file, json!({"kind": "List", "items": items}).to_string()).unwrap();
    let r = json_out(
        &[
            "status",
            "--from-kubectl",
            file.to_str().unwrap(),
            "-f",
            "json",
        ],
        3,
    );
    let rows: BTreeMap<&str, &Value> = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap(), n))
        .collect();
    assert_eq!(rows[N0]["reported"], "True");
    assert_eq!(rows[N0]["healthy"], true);
    assert!(rows[N0]["heartbeat_age_seconds"].as_u64().unwrap() < 600);
    assert_eq!(rows[N1]["stale"], true);
    assert_eq!(rows[N1]["healthy"], false);
    assert_eq!(rows[N2]["reported"], "False");
    assert_eq!(rows[N2]["reason"], "ApplyFailed");
    assert_eq!(rows[N2]["healthy"], false);
    assert_eq!(r["unhealthy"], 2);
    assert_eq!(r["encrypted"], 2);
    // Text: a row per node and the summary; the verdict in the exit code and one stderr line.
    let out = wgmesh(&["status", "--from-kubectl", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("3 nodes: 2 encrypted, 0 plain by choice, 2 unhealthy"),
        "{text}"
    );
    assert!(text.contains("STALE 1h00m"), "{text}");
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    // All healthy: exit 0.
    let mut healthy = items.clone();
    for item in &mut healthy {
        item["status"]["conditions"][0]["status"] = json!("True");
        item["status"]["conditions"][0]["lastHeartbeatTime"] =
            items[0]["status"]["conditions"][0]["lastHeartbeatTime"].clone();
    }
    std::fs::write(&file, json!({"kind": "List", "items": healthy}).to_string()).unwrap();
    let r = json_out(
        &[
            "status",
            "--from-kubectl",
            file.to_str().unwrap(),
            "-f",
            "json",
        ],
        0,
    );
    assert_eq!(r["unhealthy"], 0);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `status`, `why`, `graph` and `plan --all` against a live API server send lists and
/// nothing else.
#[test]
fn live_cluster_views_never_write() {
    let (_runtime, api, port) = loopback_api::start(nodes_with_conditions(now()));
    let dir = tempdir("live");
    let kubeconfig = loopback_api::kubeconfig(&dir, port);
    let kc = kubeconfig.to_str().unwrap();
    let r = json_out(&["status", "--kubeconfig", kc, "-f", "json"], 3);
    assert_eq!(r["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(r["unhealthy"], 2);
    let a = json_out(&["why", N0, N2, "--kubeconfig", kc, "-f", "json"], 0);
    // The defaults (no agent configuration): no host encryption, so hosts talk in plaintext.
    assert_eq!(a["verdict"], "plain");
    let p = svg(&["graph", "--kubeconfig", kc]);
    assert_eq!(p.nodes.len(), 3);
    json_out(&["plan", "--all", "--kubeconfig", kc, "-f", "json"], 0);
    let requests = api.lock().unwrap().requests.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(requests.len() >= 4, "{requests:?}");
    for (method, target) in &requests {
        assert_eq!(method, "GET", "{target}: read-only");
        assert!(
            !target.contains("watch=true"),
            "{target}: a list, not a watch"
        );
    }
}

/// README's pictures are what `wgmesh graph` draws today (`WGMESH_BLESS=1` redraws them).
#[test]
fn readme_pictures_are_current() {
    for (cluster, picture) in [(AKS, "docs/mesh-aks.svg"), (MIXED, "docs/mesh-mixed.svg")] {
        let out = wgmesh(&["graph", "-c", cluster]);
        assert!(out.status.success());
        let path = format!("{}/{picture}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("WGMESH_BLESS").is_some() {
            std::fs::write(&path, &out.stdout).unwrap();
        }
        let committed = std::fs::read(&path).unwrap();
        assert!(
            committed == out.stdout,
            "{picture} is stale: WGMESH_BLESS=1 cargo test --all-features --test cli_observe"
        );
    }
}
