//! The plan schema (`wgmesh_core::PLAN_SCHEMA_VERSION`): every field of the serde form of a
//! `NodePlan` and a `PlanDelta`, as a sorted list of paths, against the list committed for the
//! current version. A change to the list is a change to the schema: keep the version for an
//! added field with a default, bump it for anything else (see `wgmesh_core::plan`), and
//! commit the new list (`WGMESH_BLESS=1 cargo test -p wgmesh-core --test schema`).

use std::collections::BTreeSet;

use serde_json::Value;
use wgmesh_core::{PLAN_SCHEMA_VERSION, diff, plan_node, spec::parse_cluster};

fn paths(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                paths(&p, v, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                paths(&format!("{prefix}[]"), item, out);
            }
        }
        _ => {}
    }
}

/// A cluster that sets every optional part of a plan: two families, host encryption, a
/// keepalive, blocks and borrowed addresses, a plain node.
const CLUSTER: &str = r#"{
  "mesh": {"host_encryption": true, "persistent_keepalive": 25},
  "nodes": [
    {"name": "a", "addresses": ["10.0.0.1", "fd00::1"], "pod_cidrs": ["10.65.0.0/26", "fd65::/80"],
     "workload_ips": ["10.65.9.9"],
     "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=",
                   "public_key_v6": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
    {"name": "b", "addresses": ["10.0.0.2", "fd00::2"], "pod_cidrs": ["10.65.0.64/26", "fd65:1::/80"],
     "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=",
                   "public_key_v6": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}},
    {"name": "c", "addresses": ["10.0.0.3"], "pod_cidrs": ["10.65.0.128/26"]}
  ]}"#;

#[test]
fn the_plan_schema_is_the_committed_one() {
    let cluster = parse_cluster(CLUSTER).unwrap();
    let plan = plan_node(&cluster, "a").unwrap();
    // A delta with every list filled: from nothing to the plan, and the other way.
    let empty = wgmesh_core::NodePlan::empty("a");
    let mut fields = BTreeSet::new();
    paths("plan", &serde_json::to_value(&plan).unwrap(), &mut fields);
    paths(
        "delta",
        &serde_json::to_value(diff(&empty, &plan)).unwrap(),
        &mut fields,
    );
    paths(
        "delta",
        &serde_json::to_value(diff(&plan, &empty)).unwrap(),
        &mut fields,
    );
    // A peer that changes: b's keepalive and allowed IPs.
    let changed = parse_cluster(
        &CLUSTER
            .replace(
                "\"persistent_keepalive\": 25",
                "\"persistent_keepalive\": 30",
            )
            .replace("10.65.0.64/26", "10.65.1.64/26"),
    )
    .unwrap();
    paths(
        "delta",
        &serde_json::to_value(diff(&plan, &plan_node(&changed, "a").unwrap())).unwrap(),
        &mut fields,
    );
    // Interfaces that change (a fixed MTU) and a peer that goes (b's key withdrawn).
    let other = parse_cluster(
        &CLUSTER
            .replace(
                "\"persistent_keepalive\": 25",
                "\"persistent_keepalive\": 25, \"mtu\": 1400",
            )
            .replace(
                "\"public_key\": \"/r0P",
                "\"enabled\": false, \"public_key\": \"/r0P",
            ),
    )
    .unwrap();
    paths(
        "delta",
        &serde_json::to_value(diff(&plan, &plan_node(&other, "a").unwrap())).unwrap(),
        &mut fields,
    );
    // Strict mode: the ingress filter in the marking, blackhole routes.
    let strict = parse_cluster(&CLUSTER.replace(
        "{\"host_encryption\": true,",
        "{\"strict_mode\": true, \"control_plane_endpoints\": [\"10.0.0.9:6443\"], \"host_encryption\": true,",
    ))
    .unwrap();
    let strict_plan = plan_node(&strict, "a").unwrap();
    assert!(strict_plan.marking.as_ref().unwrap().strict.is_some());
    paths(
        "plan",
        &serde_json::to_value(&strict_plan).unwrap(),
        &mut fields,
    );
    paths(
        "delta",
        &serde_json::to_value(diff(&plan, &strict_plan)).unwrap(),
        &mut fields,
    );
    let text: String = fields.iter().map(|f| format!("{f}\n")).collect();
    let file = format!(
        "{}/tests/schema/v{PLAN_SCHEMA_VERSION}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("WGMESH_BLESS").is_some() {
        std::fs::write(&file, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        committed == text,
        "the plan schema changed: see wgmesh_core::plan's stability rules; the fields now are:\n{text}"
    );
}
