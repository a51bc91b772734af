//! What the agent tells Kubernetes about its node, so that `kubectl describe node` answers
//! "is this node encrypted?": the Node condition [`CONDITION_TYPE`] (`WireGuardMeshReady`)
//! and Events on Nodes ([`Notice`]).
//!
//! - The condition is written with **server-side apply** to the Node's `status` subresource
//!   (`PATCH /api/v1/nodes/{name}/status?fieldManager=wgmesh&force=true`), holding only
//!   wgmesh's condition: Node conditions are a list keyed by `type`, so the kubelet's own
//!   conditions are untouched. It is written when its status changes (within seconds), when
//!   only its reason or message changes (at most every few minutes: the message counts
//!   handshakes), and as a heartbeat (`lastHeartbeatTime`), so a reader can tell a silent agent.
//! - Events are created with kube-runtime's recorder (`events.k8s.io/v1`, namespace
//!   `default`, as for every cluster-scoped object) only when something changes: the key
//!   published, the first mesh applied, programming failing and recovering. Like the
//!   kubelet's, they name the Node with its name as `uid`, which is how `kubectl describe
//!   node` finds them.
//!
//! The condition is decided purely ([`mesh_condition`]); the agent's state machine decides
//! when to write it; [`crate::run`] writes.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node as K8sNode, NodeCondition, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::{Value, json};

use crate::publish::FIELD_MANAGER;

/// The type of wgmesh's Node condition.
pub const CONDITION_TYPE: &str = "WireGuardMeshReady";

/// A handshake younger than this counts as fresh (WireGuard rekeys every 2 minutes while
/// traffic flows).
pub const FRESH_HANDSHAKE: Duration = Duration::from_secs(180);

/// The longest message written into the condition or an Event.
pub const MAX_MESSAGE: usize = 512;

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConditionStatus {
    /// The node is encrypted: in the mesh, programmed, its key published.
    True,
    /// It is not (the reason says why).
    False,
    /// Not known yet (starting, programming).
    Unknown,
}

impl ConditionStatus {
    /// `True`, `False` or `Unknown`, as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }
}

/// wgmesh's Node condition, as decided by [`mesh_condition`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeshCondition {
    /// Whether the node is encrypted.
    pub status: ConditionStatus,
    /// Why, in one PascalCase word (`MeshReady`, `ApplyFailed`, …).
    pub reason: &'static str,
    /// Details for a person.
    pub message: String,
}

impl MeshCondition {
    fn new(status: ConditionStatus, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: truncate(message.into()),
        }
    }
}

/// Cuts a message to [`MAX_MESSAGE`] bytes (on a character boundary), saying so.
pub fn truncate(mut text: String) -> String {
    if text.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 20;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let total = text.len();
        text.truncate(end);
        text.push_str(&format!("… ({total} bytes)"));
    }
    text
}

/// What the condition is decided from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConditionInputs {
    /// Nodes (and Pods) have been listed.
    pub synced: bool,
    /// The mesh is enabled in the agent's configuration.
    pub enabled: bool,
    /// The last dataplane call failed with this error.
    pub error: Option<String>,
    /// A dataplane call has succeeded.
    pub applied: bool,
    /// The node's published keys are the ones it uses.
    pub key_confirmed: bool,
    /// Peers per interface of the plan (empty: the node takes part in no family's mesh).
    pub interfaces: Vec<(String, usize)>,
    /// Peers with a handshake younger than [`FRESH_HANDSHAKE`] (`None`: the dataplane cannot
    /// tell).
    pub fresh_handshakes: Option<usize>,
}

/// The condition for a node in the state `inputs` describes.
///
/// ```
/// use wgmesh_k8s::status::{ConditionInputs, ConditionStatus, mesh_condition};
/// let mut inputs = ConditionInputs::default();
/// assert_eq!(mesh_condition(&inputs).status, ConditionStatus::Unknown); // not synced yet
/// inputs.synced = true;
/// inputs.enabled = true;
/// inputs.applied = true;
/// inputs.key_confirmed = true;
/// inputs.interfaces = vec![("wireguard.cali".into(), 4)];
/// inputs.fresh_handshakes = Some(3);
/// let c = mesh_condition(&inputs);
/// assert_eq!((c.status, c.reason), (ConditionStatus::True, "MeshReady"));
/// assert_eq!(c.message, "4 peers (wireguard.cali 4), 3 with a handshake in the last 3 minutes");
/// ```
pub fn mesh_condition(i: &ConditionInputs) -> MeshCondition {
    use ConditionStatus::{False, True, Unknown};
    if !i.synced {
        return MeshCondition::new(
            Unknown,
            "Syncing",
            "the agent is listing Nodes (and Pods) from the API server",
        );
    }
    if !i.enabled {
        return MeshCondition::new(
            False,
            "MeshDisabled",
            "the mesh is disabled in the agent's configuration: this node is plain",
        );
    }
    if let Some(e) = &i.error {
        return MeshCondition::new(
            False,
            "ApplyFailed",
            format!("programming the node failed: {e}"),
        );
    }
    if !i.applied {
        return MeshCondition::new(Unknown, "Applying", "programming the node");
    }
    if !i.key_confirmed {
        return MeshCondition::new(
            False,
            "KeyNotPublished",
            "the WireGuard key on the Node is not yet the key the node uses; its own traffic stays outside the tunnel until it is",
        );
    }
    if i.interfaces.is_empty() {
        return MeshCondition::new(
            False,
            "NotInMesh",
            "this node takes part in no family's mesh (WireGuard off on the node, no usable key, a key another node claims too, or no address of the family): its traffic is plain; `wgmesh plan` names the reason",
        );
    }
    let peers: usize = i.interfaces.iter().map(|(_, n)| n).sum();
    let per_interface = i
        .interfaces
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let handshakes = match i.fresh_handshakes {
        Some(n) => format!("{n} with a handshake in the last 3 minutes"),
        None => "handshakes not readable".to_owned(),
    };
    let noun = if peers == 1 { "peer" } else { "peers" };
    MeshCondition::new(
        True,
        "MeshReady",
        format!("{peers} {noun} ({per_interface}), {handshakes}"),
    )
}

/// The peers among `stats` whose latest handshake is younger than [`FRESH_HANDSHAKE`] at
/// `now`.
pub fn fresh_handshakes(stats: &[wgmesh_netlink::PeerStats], now: SystemTime) -> usize {
    stats
        .iter()
        .filter_map(|s| s.last_handshake)
        .filter(|t| {
            now.duration_since(*t)
                .is_ok_and(|age| age < FRESH_HANDSHAKE)
                || *t > now
        })
        .count()
}

/// wgmesh's condition as a Node carries it: what was written, and since when its status holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PublishedCondition {
    /// The condition.
    pub condition: MeshCondition,
    /// `lastTransitionTime`.
    pub since: Option<Time>,
    /// `lastHeartbeatTime`: the agent's latest write; an old one means a silent agent.
    pub heartbeat: Option<Time>,
}

/// wgmesh's condition on a Node, if it carries one.
pub fn published_condition(node: &K8sNode) -> Option<PublishedCondition> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)?;
    Some(PublishedCondition {
        condition: MeshCondition {
            status: ConditionStatus::parse(&c.status),
            reason: known_reason(c.reason.as_deref().unwrap_or("")),
            message: c.message.clone().unwrap_or_default(),
        },
        since: c.last_transition_time.clone(),
        heartbeat: c.last_heartbeat_time.clone(),
    })
}

const REASONS: [&str; 7] = [
    "Syncing",
    "MeshDisabled",
    "ApplyFailed",
    "Applying",
    "KeyNotPublished",
    "NotInMesh",
    "MeshReady",
];

fn known_reason(text: &str) -> &'static str {
    REASONS
        .iter()
        .find(|r| **r == text)
        .copied()
        .unwrap_or("Unknown")
}

/// A condition for the shell to write.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StatusUpdate {
    /// The Node.
    pub node: String,
    /// The condition.
    pub condition: MeshCondition,
    /// `lastTransitionTime` to keep (`None`: the status changes now).
    pub since: Option<Time>,
}

impl StatusUpdate {
    /// A condition for `node`, keeping `since` as its transition time (`None`: now).
    pub fn new(node: impl Into<String>, condition: MeshCondition, since: Option<Time>) -> Self {
        Self {
            node: node.into(),
            condition,
            since,
        }
    }
}

/// The body of the server-side apply: only wgmesh's condition.
///
/// ```
/// use wgmesh_k8s::status::{ConditionInputs, condition_body, mesh_condition};
/// let c = mesh_condition(&ConditionInputs::default());
/// let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-12-03T10:00:00Z".parse().unwrap());
/// let body = condition_body("node-a", &c, &t, &t);
/// assert_eq!(body["status"]["conditions"][0]["type"], "WireGuardMeshReady");
/// assert_eq!(body["status"]["conditions"][0]["status"], "Unknown");
/// assert_eq!(body["status"]["conditions"][0]["lastHeartbeatTime"], "2026-12-03T10:00:00Z");
/// ```
pub fn condition_body(node: &str, c: &MeshCondition, heartbeat: &Time, since: &Time) -> Value {
    let condition = NodeCondition {
        type_: CONDITION_TYPE.to_owned(),
        status: c.status.as_str().to_owned(),
        reason: Some(c.reason.to_owned()),
        message: Some(c.message.clone()),
        last_heartbeat_time: Some(heartbeat.clone()),
        last_transition_time: Some(since.clone()),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node},
        "status": {"conditions": [condition]},
    })
}

/// Writes a condition (server-side apply to the status subresource); returns the
/// `lastTransitionTime` it wrote.
pub async fn write_condition(
    client: kube::Client,
    update: &StatusUpdate,
) -> Result<Time, kube::Error> {
    let api: Api<K8sNode> = Api::all(client);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let since = update.since.clone().unwrap_or_else(|| now.clone());
    let body = condition_body(&update.node, &update.condition, &now, &since);
    api.patch_status(
        &update.node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(since)
}

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoticeKind {
    /// Things going as they should.
    Normal,
    /// Something an operator should look at.
    Warning,
}

/// An Event for a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Notice {
    /// The Node it is about.
    pub node: String,
    /// Normal or Warning.
    pub kind: NoticeKind,
    /// PascalCase reason (`KeyPublished`, `MeshApplied`, `ApplyFailed`, …).
    pub reason: &'static str,
    /// Details for a person (at most [`MAX_MESSAGE`] bytes).
    pub note: String,
}

impl Notice {
    /// An Event about `node`.
    pub fn new(
        node: impl Into<String>,
        kind: NoticeKind,
        reason: &'static str,
        note: impl Into<String>,
    ) -> Self {
        Self {
            node: node.into(),
            kind,
            reason,
            note: truncate(note.into()),
        }
    }
}

/// How an Event names a Node: as the kubelet does, with the node's name as its `uid`
/// (`kubectl describe node` searches for that).
pub fn node_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Node".to_owned()),
        name: Some(name.to_owned()),
        uid: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

/// Sends an Event.
pub async fn send_notice(recorder: &Recorder, notice: &Notice) -> Result<(), kube::Error> {
    let event = Event {
        type_: match notice.kind {
            NoticeKind::Normal => EventType::Normal,
            NoticeKind::Warning => EventType::Warning,
        },
        reason: notice.reason.to_owned(),
        note: Some(notice.note.clone()),
        action: "ProgramMesh".to_owned(),
        secondary: None,
    };
    recorder
        .publish(&event, &node_reference(&notice.node))
        .await
}
