//! The cluster as the agent would see it, from one read instead of watches: for previews
//! before installing (`wgmesh plan --kubeconfig`, `--from-kubectl`) and for diagnostics. The
//! same adapter and view as the agent ([`ClusterView`]), so a preview shows exactly what the
//! agents would program. Read-only: [`list`] only lists, it never writes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use kube::api::{Api, ListParams};
use serde::Deserialize;
use serde_json::Value;
use wgmesh_core::Cluster;

use crate::adapter::{AdapterWarning, PodWorkload, pod_workload};
use crate::agent::AgentSettings;
use crate::run::{POD_FIELD_SELECTOR, strip_node, strip_pod};
use crate::status::{PublishedCondition, published_condition};
use crate::view::ClusterView;

/// Why a snapshot could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Input that is not `kubectl get -o json` output.
    #[error("{source_name}: {problem}")]
    Input {
        /// The file (or `-`).
        source_name: String,
        /// What is wrong.
        problem: String,
    },
    /// The objects make no valid cluster for the mesh settings.
    #[error(transparent)]
    Cluster(#[from] wgmesh_core::Error),
    /// The API server refused or failed a list.
    #[error("listing {what}: {source}")]
    Api {
        /// `nodes` or `pods`.
        what: &'static str,
        /// Why.
        source: kube::Error,
    },
}

/// A pod holding workload addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PodRef {
    /// `namespace/name`.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// The cluster as the agents would see it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Snapshot {
    /// The cluster, with the mesh settings in effect (derived API-server endpoints included).
    pub cluster: Cluster,
    /// What the adapter could not use, per object.
    pub warnings: Vec<AdapterWarning>,
    /// Pods holding workload addresses, by `namespace/name`.
    pub pods: BTreeMap<String, PodRef>,
    /// wgmesh's `WireGuardMeshReady` condition per Node, where an agent wrote one.
    pub conditions: BTreeMap<String, PublishedCondition>,
}

impl Snapshot {
    /// The pod `namespace/name`, if it holds workload addresses.
    pub fn pod(&self, name: &str) -> Option<&PodRef> {
        self.pods.get(name)
    }
}

/// The snapshot of `nodes` and `pods` for an agent with `settings` (its node name is not
/// used: every node is converted).
///
/// ```
/// use wgmesh_core::MeshConfig;
/// use wgmesh_k8s::{agent::AgentSettings, snapshot::{parse_kubectl, snapshot}};
/// let (nodes, pods) = parse_kubectl("-", r#"{"kind": "List", "items": [
///   {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "a",
///    "annotations": {"wgmesh.io/public-key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///    "spec": {"podCIDRs": ["10.65.0.0/26"]},
///    "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}]}"#)?;
/// let s = snapshot(&AgentSettings::new("a", MeshConfig::default()), &nodes, &pods)?;
/// assert_eq!(s.cluster.nodes()[0].pod_cidrs, ["10.65.0.0/26".parse().unwrap()]);
/// # Ok::<(), wgmesh_k8s::snapshot::SnapshotError>(())
/// ```
pub fn snapshot(
    settings: &AgentSettings,
    nodes: &[K8sNode],
    pods: &[Pod],
) -> Result<Snapshot, SnapshotError> {
    let mut view = ClusterView::new(
        settings.mesh.clone(),
        settings.adapter.clone(),
        settings.control_plane.clone(),
        settings.watch_pods,
    );
    let mut warnings = view.replace_nodes(nodes.iter()).warnings;
    let mut refs = BTreeMap::new();
    if settings.watch_pods {
        warnings.extend(view.replace_pods(pods.iter()).warnings);
        for pod in pods {
            let mut ignored = Vec::new();
            if let PodWorkload::Ips { node, ips } = pod_workload(pod, &mut ignored) {
                let name = format!(
                    "{}/{}",
                    pod.metadata.namespace.as_deref().unwrap_or("default"),
                    pod.metadata.name.as_deref().unwrap_or("")
                );
                refs.insert(name.clone(), PodRef { name, node, ips });
            }
        }
    }
    let conditions = nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, published_condition(n)?)))
        .collect();
    Ok(Snapshot {
        cluster: view.cluster()?,
        warnings,
        pods: refs,
        conditions,
    })
}

/// Nodes and Pods from `kubectl get nodes,pods -o json` output (a `List`, a `NodeList` or
/// `PodList`, or one object); other kinds are skipped. `source_name` names the input in errors.
pub fn parse_kubectl(
    source_name: &str,
    text: &str,
) -> Result<(Vec<K8sNode>, Vec<Pod>), SnapshotError> {
    let input = |problem: String| SnapshotError::Input {
        source_name: source_name.to_owned(),
        problem,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| input(format!("not JSON: {e}")))?;
    let (mut nodes, mut pods) = (Vec::new(), Vec::new());
    let list_kind = value["kind"].as_str().unwrap_or("").to_owned();
    let items = match value.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![value],
    };
    for (i, mut item) in items.into_iter().enumerate() {
        // Items of a NodeList or PodList carry no kind of their own.
        let kind = item["kind"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| list_kind.trim_end_matches("List").to_owned());
        match kind.as_str() {
            "Node" => {
                let mut node = K8sNode::deserialize(&item)
                    .map_err(|e| input(format!("items[{i}] (a Node): {e}")))?;
                strip_node(&mut node);
                nodes.push(node);
            }
            "Pod" => {
                item["kind"] = Value::from("Pod");
                let mut pod = Pod::deserialize(&item)
                    .map_err(|e| input(format!("items[{i}] (a Pod): {e}")))?;
                strip_pod(&mut pod);
                pods.push(pod);
            }
            _ => {}
        }
    }
    Ok((nodes, pods))
}

/// Lists the Nodes (and, with `pods`, the running Pods) from the API server, 500 at a time:
/// two kinds of request, both `list`, never a write.
pub async fn list(
    client: &kube::Client,
    pods: bool,
) -> Result<(Vec<K8sNode>, Vec<Pod>), SnapshotError> {
    let mut nodes: Vec<K8sNode> = list_all(Api::all(client.clone()), ListParams::default())
        .await
        .map_err(|source| SnapshotError::Api {
            what: "nodes",
            source,
        })?;
    nodes.iter_mut().for_each(strip_node);
    let mut pod_list = Vec::new();
    if pods {
        pod_list = list_all(
            Api::<Pod>::all(client.clone()),
            ListParams::default().fields(POD_FIELD_SELECTOR),
        )
        .await
        .map_err(|source| SnapshotError::Api {
            what: "pods",
            source,
        })?;
        pod_list.iter_mut().for_each(strip_pod);
    }
    Ok((nodes, pod_list))
}

async fn list_all<K>(api: Api<K>, params: ListParams) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = params.limit(500);
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(out),
        }
    }
}
