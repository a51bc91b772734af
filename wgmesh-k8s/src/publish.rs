//! Publishing the node's keys on its Node object.
//!
//! Keys are set with **server-side apply** under the field manager [`FIELD_MANAGER`]
//! (`PATCH /api/v1/nodes/{name}?fieldManager=wgmesh&force=true`, content type
//! `application/apply-patch+yaml`), with only wgmesh's annotations in the body. Forcing takes
//! the fields back from whoever changed them (`kubectl annotate --overwrite`), and an
//! annotation wgmesh no longer lists in its apply is removed by the API server if wgmesh was
//! its only manager.
//!
//! Keys are removed (WireGuard disabled, a family the node no longer has) with a **JSON
//! merge patch** setting them to `null` (`application/merge-patch+json`): that removes them
//! whoever set them last, so a disabled node never keeps a key that peers would encrypt to.
//!
//! The agent never creates a Node: it publishes only to a Node it has seen (and the RBAC of
//! the manifests grants no `create`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node as K8sNode;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Map, Value, json};

use crate::agent::Publication;

/// The field manager of wgmesh's server-side applies.
pub const FIELD_MANAGER: &str = "wgmesh";

/// The body of the server-side apply: only wgmesh's annotations.
///
/// ```
/// use std::collections::BTreeMap;
/// use wgmesh_k8s::publish::apply_body;
/// let mut annotations = BTreeMap::new();
/// annotations.insert("wgmesh.io/public-key".to_owned(), "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=".to_owned());
/// assert_eq!(apply_body("node-a", &annotations), serde_json::json!({
///     "apiVersion": "v1", "kind": "Node",
///     "metadata": {"name": "node-a",
///                  "annotations": {"wgmesh.io/public-key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}}));
/// ```
pub fn apply_body(node: &str, annotations: &BTreeMap<String, String>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node, "annotations": annotations},
    })
}

/// The body of the merge patch that removes annotations.
///
/// ```
/// use wgmesh_k8s::publish::remove_body;
/// assert_eq!(remove_body(&["wgmesh.io/public-key".to_owned()]),
///            serde_json::json!({"metadata": {"annotations": {"wgmesh.io/public-key": null}}}));
/// ```
pub fn remove_body(annotations: &[String]) -> Value {
    let nulls: Map<String, Value> = annotations
        .iter()
        .map(|a| (a.clone(), Value::Null))
        .collect();
    json!({"metadata": {"annotations": nulls}})
}

/// Makes a [`Publication`]: a server-side apply of the annotations wgmesh wants, then a merge
/// patch removing the ones it wants gone.
pub async fn publish(client: Client, publication: &Publication) -> Result<(), kube::Error> {
    let api: Api<K8sNode> = Api::all(client);
    if !publication.apply.is_empty() {
        let body = apply_body(&publication.node, &publication.apply);
        api.patch(
            &publication.node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    }
    if !publication.remove.is_empty() {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        api.patch(
            &publication.node,
            &params,
            &Patch::Merge(&remove_body(&publication.remove)),
        )
        .await?;
    }
    Ok(())
}
