//! `deploy/admission-policy.yaml`'s CEL expressions, evaluated with a CEL interpreter against
//! admission requests as the API server would send them: each agent may change only its own
//! Node, and there only the `wgmesh.io/*` annotations and the `WireGuardMeshReady` condition.
//!
//! The interpreter (the `cel` crate) is not Kubernetes' (cel-go with the Kubernetes
//! libraries and typed objects); the expressions keep to the core language both share:
//! `has()`, `in`, `startsWith`, `all`, `exists`, equality.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

const AGENT: &str = "system:serviceaccount:wgmesh-system:wgmesh-agent";

struct Policy {
    conditions: Vec<(String, cel::Program)>,
    validations: Vec<(String, cel::Program)>,
}

fn policy() -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/admission-policy.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let vap = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .unwrap();
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .unwrap();
    assert_eq!(binding["spec"]["policyName"], vap["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    let compile = |list: &Value, key: &str| -> Vec<(String, cel::Program)> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let expr = v["expression"].as_str().unwrap().to_owned();
                let program =
                    cel::Program::compile(&expr).unwrap_or_else(|e| panic!("{key}: {expr}: {e}"));
                (expr, program)
            })
            .collect()
    };
    Policy {
        conditions: compile(&vap["spec"]["matchConditions"], "matchConditions"),
        validations: compile(&vap["spec"]["validations"], "validations"),
    }
}

/// What the policy does with a request.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The policy does not apply (another user).
    NotMatched,
    Allowed,
    /// Denied by the validation with this expression (false, or an error: failurePolicy Fail).
    Denied(String),
}

fn judge(policy: &Policy, request: &Value, old: &Value, new: &Value) -> Verdict {
    let mut ctx = cel::Context::default();
    ctx.add_variable_from_value("request", cel::to_value(request).unwrap());
    ctx.add_variable_from_value("oldObject", cel::to_value(old).unwrap());
    ctx.add_variable_from_value("object", cel::to_value(new).unwrap());
    for (_, p) in &policy.conditions {
        if p.execute(&ctx) != Ok(cel::Value::Bool(true)) {
            return Verdict::NotMatched;
        }
    }
    for (expr, p) in &policy.validations {
        if p.execute(&ctx) != Ok(cel::Value::Bool(true)) {
            return Verdict::Denied(expr.clone());
        }
    }
    Verdict::Allowed
}

fn request(user: &str, node_claim: Option<&str>, name: &str, sub: &str) -> Value {
    let extra = match node_claim {
        Some(n) => json!({"authentication.kubernetes.io/node-name": [n],
                          "authentication.kubernetes.io/pod-name": ["wgmesh-agent-x7k2p"]}),
        None => json!({}),
    };
    json!({"operation": "UPDATE", "name": name, "subResource": sub,
           "userInfo": {"username": user, "groups": ["system:serviceaccounts"], "extra": extra}})
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": "0b5e", "resourceVersion": "42",
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                     "wgmesh.io/public-key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
        "spec": {"podCIDRs": ["10.65.0.0/26"], "providerID": "azure:///x"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "10.240.0.4"}],
            "capacity": {"cpu": "2"}, "allocatable": {"cpu": "1900m"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": "v1.33.1"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                {"type": "WireGuardMeshReady", "status": "Unknown", "reason": "Syncing"}
            ]
        }
    })
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    *v.pointer_mut(pointer).unwrap() = value;
    v
}

fn denied(v: &Verdict, needle: &str) -> bool {
    matches!(v, Verdict::Denied(expr) if expr.contains(needle))
}

#[test]
fn the_agent_may_change_its_own_nodes_wgmesh_annotations() {
    let p = policy();
    let old = node("node-a");
    let req = request(AGENT, Some("node-a"), "node-a", "");
    // A new key, a new annotation of wgmesh's, and one removed.
    let new = with(
        old.clone(),
        "/metadata/annotations/wgmesh.io~1public-key",
        json!("/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="),
    );
    assert_eq!(judge(&p, &req, &old, &new), Verdict::Allowed);
    let mut added = new.clone();
    added["metadata"]["annotations"]["wgmesh.io/underlay-mtu"] = json!("9000");
    assert_eq!(judge(&p, &req, &old, &added), Verdict::Allowed);
    let mut removed = old.clone();
    removed["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("wgmesh.io/public-key");
    assert_eq!(judge(&p, &req, &old, &removed), Verdict::Allowed);
    // A Node without annotations gets its first.
    let mut bare = old.clone();
    bare["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let first = with(
        bare.clone(),
        "/metadata",
        json!({"name": "node-a", "labels": old["metadata"]["labels"],
               "annotations": {"wgmesh.io/public-key": "x"}}),
    );
    assert_eq!(judge(&p, &req, &bare, &first), Verdict::Allowed);
}

#[test]
fn but_not_another_node() {
    let p = policy();
    let old = node("node-b");
    let new = with(
        old.clone(),
        "/metadata/annotations/wgmesh.io~1public-key",
        json!("/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="),
    );
    let v = judge(
        &p,
        &request(AGENT, Some("node-a"), "node-b", ""),
        &old,
        &new,
    );
    assert!(denied(&v, "node-name"), "{v:?}");
    // A token without the node claim (not bound to a pod on a node) may change nothing.
    let v = judge(&p, &request(AGENT, None, "node-b", ""), &old, &new);
    assert!(denied(&v, "node-name"), "{v:?}");
    let v = judge(
        &p,
        &request(AGENT, None, "node-a", ""),
        &node("node-a"),
        &new,
    );
    assert!(denied(&v, "node-name"), "{v:?}");
}

#[test]
fn nor_another_annotation_a_label_or_the_spec() {
    let p = policy();
    let old = node("node-a");
    let req = request(AGENT, Some("node-a"), "node-a", "");
    let mut other = old.clone();
    other["metadata"]["annotations"]["example.com/owner"] = json!("mallory");
    assert!(denied(
        &judge(&p, &req, &old, &other),
        "startsWith('wgmesh.io/')"
    ));
    let changed = with(
        old.clone(),
        "/metadata/annotations/node.alpha.kubernetes.io~1ttl",
        json!("30"),
    );
    assert!(denied(
        &judge(&p, &req, &old, &changed),
        "startsWith('wgmesh.io/')"
    ));
    let mut dropped = old.clone();
    dropped["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("node.alpha.kubernetes.io/ttl");
    assert!(denied(
        &judge(&p, &req, &old, &dropped),
        "k in object.metadata.annotations"
    ));
    let mut label = old.clone();
    label["metadata"]["labels"]["node-restriction.kubernetes.io/wgmesh-plain"] = json!("true");
    assert!(denied(&judge(&p, &req, &old, &label), "metadata.labels"));
    let mut unlabelled = old.clone();
    unlabelled["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("labels");
    assert!(denied(
        &judge(&p, &req, &old, &unlabelled),
        "metadata.labels"
    ));
    let taint = with(old.clone(), "/spec/podCIDRs", json!(["0.0.0.0/0"]));
    assert!(denied(
        &judge(&p, &req, &old, &taint),
        "object.spec == oldObject.spec"
    ));
    let mut finalizer = old.clone();
    finalizer["metadata"]["finalizers"] = json!(["example.com/hold"]);
    assert!(denied(&judge(&p, &req, &old, &finalizer), "finalizers"));
}

#[test]
fn the_phase_marker_only_on_its_own_node_and_only_leaving_or_joining() {
    let p = policy();
    let old = node("node-a");
    let req = request(AGENT, Some("node-a"), "node-a", "");
    for value in ["leaving", "joining"] {
        let mut marked = old.clone();
        marked["metadata"]["annotations"]["wgmesh.io/phase"] = json!(value);
        assert_eq!(judge(&p, &req, &old, &marked), Verdict::Allowed, "{value}");
        // And removed again.
        assert_eq!(judge(&p, &req, &marked, &old), Verdict::Allowed, "{value}");
        // Never on another node.
        let mut other = node("node-b");
        let before = other.clone();
        other["metadata"]["annotations"]["wgmesh.io/phase"] = json!(value);
        let v = judge(
            &p,
            &request(AGENT, Some("node-a"), "node-b", ""),
            &before,
            &other,
        );
        assert!(denied(&v, "node-name"), "{v:?}");
    }
    for value in ["active", "Leaving", " leaving", "", "plain"] {
        let mut marked = old.clone();
        marked["metadata"]["annotations"]["wgmesh.io/phase"] = json!(value);
        let v = judge(&p, &req, &old, &marked);
        assert!(denied(&v, "wgmesh.io/phase"), "{value:?}: {v:?}");
    }
}

#[test]
fn in_the_status_only_its_condition() {
    let p = policy();
    let old = node("node-a");
    let req = request(AGENT, Some("node-a"), "node-a", "status");
    let ready = with(
        old.clone(),
        "/status/conditions/1",
        json!({"type": "WireGuardMeshReady", "status": "True", "reason": "MeshReady",
               "message": "4 peers (wireguard.cali 4), 4 with a handshake in the last 3 minutes"}),
    );
    assert_eq!(judge(&p, &req, &old, &ready), Verdict::Allowed);
    // Its first condition.
    let none = with(
        old.clone(),
        "/status/conditions",
        json!([{"type": "Ready", "status": "True", "reason": "KubeletReady"}]),
    );
    assert_eq!(judge(&p, &req, &none, &old), Verdict::Allowed);
    let kubelet = with(old.clone(), "/status/conditions/0/status", json!("False"));
    assert!(denied(
        &judge(&p, &req, &old, &kubelet),
        "oldObject.status.conditions.exists(o, o == c)"
    ));
    let gone = with(
        old.clone(),
        "/status/conditions",
        json!([{"type": "WireGuardMeshReady", "status": "True", "reason": "MeshReady"}]),
    );
    assert!(denied(
        &judge(&p, &req, &old, &gone),
        "object.status.conditions.exists(c, c == o)"
    ));
    let hijack = with(
        old.clone(),
        "/status/addresses",
        json!([{"type": "InternalIP", "address": "10.240.0.5"}]),
    );
    assert!(denied(&judge(&p, &req, &old, &hijack), "status.addresses"));
    let bigger = with(old.clone(), "/status/capacity/cpu", json!("64"));
    assert!(denied(&judge(&p, &req, &old, &bigger), "status.capacity"));
    // On the main resource, status changes are dropped by the API server before admission;
    // the status rules do not apply there.
    let main = request(AGENT, Some("node-a"), "node-a", "");
    assert_eq!(judge(&p, &main, &old, &old), Verdict::Allowed);
}

#[test]
fn other_users_are_not_this_policys_business() {
    let p = policy();
    let old = node("node-b");
    let mut new = old.clone();
    new["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("1");
    let kubelet = request("system:node:node-b", None, "node-b", "");
    assert_eq!(judge(&p, &kubelet, &old, &new), Verdict::NotMatched);
    // Another workload's service account in the same namespace is not the agent either.
    let other = request(
        "system:serviceaccount:wgmesh-system:default",
        Some("node-a"),
        "node-b",
        "",
    );
    assert_eq!(judge(&p, &other, &old, &new), Verdict::NotMatched);
}
