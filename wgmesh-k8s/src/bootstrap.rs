//! The host-encryption bootstrap: how a node always regains the API server.
//!
//! # The deadlock
//!
//! With host encryption, traffic between node addresses goes through WireGuard. A node that
//! comes back with a key its peers do not know (the key file was lost, the node was
//! re-imaged, someone overwrote the annotation) sends to the API server through a tunnel that
//! the API server's node cannot decrypt, and the API server's replies are encrypted to the
//! *old* key, which the node cannot decrypt. The node cannot publish its new key, so nobody
//! ever learns it (Calico's deadlock, projectcalico/calico#5125).
//!
//! # Three layers
//!
//! 1. **The key survives reboots.** The agent keeps its private key in a file on the host
//!    (`/var/lib/wgmesh/private-key`, mode 0600), so an ordinary reboot keeps the key that
//!    peers know, and nothing is ever out of step.
//! 2. **API server traffic never enters the tunnel, in either direction.** The mesh's
//!    `control_plane_endpoints` are marked in every node's output path, so packets *to*
//!    them and *from* them (the API server's replies, on the API server's own node) skip the
//!    mesh table and cross the underlay in plaintext (the API server speaks TLS). The agent
//!    fills this list without configuration: the endpoints in the configuration, the
//!    address its own client uses (`KUBERNETES_SERVICE_HOST:PORT`, marked before kube-proxy
//!    translates it), and every `InternalIP` of every control-plane node on the API server's
//!    port (6443) — see [`crate::view::ControlPlaneEndpoints`]. A node with an unknown key
//!    therefore still reaches the API server, and the API server still reaches it.
//! 3. **Until the node's published keys are confirmed, its own traffic stays outside the
//!    tunnel.** "Confirmed" means the agent has read back, through its watch of Nodes, the
//!    key annotations of its own Node and they hold the public keys of the private keys its
//!    dataplane programs ([`key_check`]). Until then the agent applies its plan with the
//!    packet marking's `mark_output` set ([`guard_plan`], [`guard_delta`]): every packet
//!    the host itself sends skips the mesh table, whatever address the API server is reached
//!    at (a load-balancer VIP, an address missing from the list). Pods stay encrypted (their
//!    traffic is forwarded, not locally generated): during the window a peer that still has
//!    the old key drops it — never sends it in plaintext. Once the echo arrives, the full plan
//!    is applied. If the annotation is later changed or removed, the node is unconfirmed
//!    again, guards itself and republishes.
//!
//! Without host encryption, host traffic is marked anyway (`mark_output` is always on), so
//! the guard changes nothing. A node whose annotation is missing takes part in no mesh at all
//! until it publishes (the planner's rule), so it is reachable in plaintext.
//!
//! What is *not* covered: an API server reached through an address that is in no node's
//! destinations is never routed into the tunnel anyway, except its replies from a node of
//! the mesh — a VIP held by a control-plane node must be listed in `control_plane_endpoints`
//! (the replies come *from* the VIP). The README's operator guide says so.

use wgmesh_core::delta::MarkingDelta;
use wgmesh_core::{Family, NodePlan, PlanDelta, PublicKey};

use crate::adapter::{NodeInfo, Published};

/// Whether a node's published keys are the ones it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyCheck {
    /// Every family the node has an address of publishes the key its dataplane uses.
    Confirmed,
    /// These families publish another key, a malformed one, or none.
    Unconfirmed(Vec<Family>),
}

impl KeyCheck {
    /// Whether the keys are confirmed.
    pub fn confirmed(&self) -> bool {
        *self == Self::Confirmed
    }
}

/// Compares the keys a node publishes (as read from the API server) with the keys its
/// dataplane uses, for every family the node has an address of.
///
/// ```
/// use wgmesh_core::{Family, Node, PublicKey};
/// use wgmesh_k8s::adapter::{AdapterOptions, node_info};
/// use wgmesh_k8s::bootstrap::{KeyCheck, key_check};
/// let ours: PublicKey = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=".parse()?;
/// let stale: PublicKey = "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=".parse()?;
/// let node = |key: &PublicKey| serde_json::from_value::<k8s_openapi::api::core::v1::Node>(serde_json::json!({
///     "metadata": {"name": "a", "annotations": {"wgmesh.io/public-key": key.to_string()}},
///     "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}})).unwrap();
/// let info = |key| node_info(&node(key), &AdapterOptions::default(), &mut Vec::new()).unwrap();
/// assert_eq!(key_check(&info(&ours), [Some(ours), None]), KeyCheck::Confirmed);
/// assert_eq!(key_check(&info(&stale), [Some(ours), None]), KeyCheck::Unconfirmed(vec![Family::V4]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn key_check(node: &NodeInfo, ours: [Option<PublicKey>; 2]) -> KeyCheck {
    let bad: Vec<Family> = Family::ALL
        .into_iter()
        .filter(|f| node.node.address(*f).is_some())
        .filter(|f| !published_matches(&node.published, *f, ours[f.index()]))
        .collect();
    if bad.is_empty() {
        KeyCheck::Confirmed
    } else {
        KeyCheck::Unconfirmed(bad)
    }
}

fn published_matches(published: &Published, family: Family, ours: Option<PublicKey>) -> bool {
    published.has_key(family, ours)
}

/// Keeps the host's own traffic outside the tunnel: marks every locally generated packet, so
/// it skips the mesh table. Pods' (forwarded) traffic is unchanged.
///
/// ```
/// use wgmesh_core::{plan_node, spec::parse_cluster};
/// use wgmesh_k8s::bootstrap::guard_plan;
/// let cluster = parse_cluster(r#"{"mesh": {"host_encryption": true}, "nodes": [
///   {"name": "a", "addresses": ["10.0.0.1"],
///    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}]}"#)?;
/// let mut plan = plan_node(&cluster, "a")?;
/// assert!(!plan.marking.as_ref().unwrap().mark_output);
/// guard_plan(&mut plan);
/// assert!(plan.marking.as_ref().unwrap().mark_output);
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
pub fn guard_plan(plan: &mut NodePlan) {
    if let Some(m) = &mut plan.marking {
        m.mark_output = true;
    }
}

/// [`guard_plan`] for a delta: a marking it sets is guarded too.
pub fn guard_delta(delta: &mut PlanDelta) {
    if let MarkingDelta::Set(m) = &mut delta.marking {
        m.mark_output = true;
    }
}
