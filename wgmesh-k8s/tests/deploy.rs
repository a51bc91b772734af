//! The manifests under `deploy/` are consistent with the agent: the shipped configuration is
//! valid, the DaemonSet has what the agent needs (host network, its node's name, a persistent
//! key directory, probes on the loopback endpoint), and RBAC grants exactly the verbs the
//! agent uses (the mock API tests record those, see `api.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use serde::Deserialize;
use serde_json::Value;
use wgmesh_core::RouteSource;
use wgmesh_k8s::config::ConfigSpec;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find(file: &str, kind: &str) -> Value {
    documents(file)
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

/// Verbs granted per resource by the ClusterRole.
fn granted() -> BTreeMap<String, BTreeSet<String>> {
    let role = find("rbac.yaml", "ClusterRole");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(
            rule["apiGroups"],
            serde_json::json!([""]),
            "core group only"
        );
        for r in rule["resources"].as_array().unwrap() {
            let verbs = rule["verbs"].as_array().unwrap();
            out.entry(r.as_str().unwrap().to_owned())
                .or_default()
                .extend(verbs.iter().map(|v| v.as_str().unwrap().to_owned()));
        }
    }
    out
}

#[test]
fn rbac_grants_the_least_verbs() {
    let g = granted();
    assert_eq!(g.len(), 2);
    assert_eq!(
        g["nodes"],
        ["list", "patch", "watch"].map(String::from).into()
    );
    assert_eq!(g["pods"], ["list", "watch"].map(String::from).into());
    let binding = find("rbac.yaml", "ClusterRoleBinding");
    let sa = find("rbac.yaml", "ServiceAccount");
    assert_eq!(binding["roleRef"]["name"], "wgmesh-agent");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        sa["metadata"]["namespace"]
    );
}

#[test]
fn the_daemonset_and_its_configuration_fit_the_agent() {
    let cm = find("configmap.yaml", "ConfigMap");
    let text = cm["data"]["agent.yaml"].as_str().unwrap();
    let config = ConfigSpec::parse(text)
        .unwrap()
        .validate(|k| (k == "NODE_NAME").then(|| "node-a".to_owned()))
        .unwrap();
    assert_eq!(config.settings.mesh.route_source, RouteSource::WorkloadIps);
    assert!(config.settings.mesh.host_encryption);
    assert!(config.settings.watch_pods);
    let metrics = config.metrics_address.unwrap();
    assert!(metrics.ip().is_loopback(), "metrics stay on the host");

    let ds: DaemonSet = serde_json::from_value(find("daemonset.yaml", "DaemonSet")).unwrap();
    let spec = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(spec.service_account_name.as_deref(), Some("wgmesh-agent"));
    assert!(
        spec.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "runs on every node"
    );
    let c = &spec.containers[0];
    let env = c.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    // --config points into the ConfigMap's mount.
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "--config");
    let mounts = c.volume_mounts.as_ref().unwrap();
    let volumes = spec.volumes.as_ref().unwrap();
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{} is not mounted", path.display()))
    };
    let cfg_mount = mount_of(Path::new(&args[1]));
    let cfg_volume = volumes.iter().find(|v| v.name == cfg_mount.name).unwrap();
    assert_eq!(
        cfg_volume.config_map.as_ref().unwrap().name,
        cm["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(
        Path::new(&args[1]).file_name().unwrap(),
        "agent.yaml",
        "the ConfigMap key"
    );
    // The private key lives on a hostPath, so it survives reboots.
    let key_mount = mount_of(&config.private_key_file);
    let key_volume = volumes.iter().find(|v| v.name == key_mount.name).unwrap();
    assert!(
        key_volume.host_path.is_some(),
        "the key must persist on the host"
    );
    assert_ne!(
        key_mount.read_only,
        Some(true),
        "the agent writes a new key there"
    );
    // Probes reach the loopback endpoint of the configuration.
    for (probe, path) in [
        (c.liveness_probe.as_ref().unwrap(), "/healthz"),
        (c.readiness_probe.as_ref().unwrap(), "/readyz"),
    ] {
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                metrics.port()
            ))
        );
    }
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = &documents("kustomization.yaml")[0];
    let listed: BTreeSet<&str> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let files: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files.iter().map(String::as_str).collect());
}
