//! Scheduled key rotation (issue 13), driven through watch events on a simulated clock: each
//! phase (next key kept, announced, switched, published), an agent restart in every phase,
//! the bound on concurrent rotations, two nodes announcing at once, a colliding next key, and
//! what a peer's rotation does to this node. The key files are a `KeyDisk` shared across
//! "restarts"; the netlink dataplane's real files are tested in `keyfile_rotation_*`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::*;
use k8s_openapi::api::core::v1::Node as K8sNode;
use wgmesh_core::{Family, MeshConfig, PublicKey};
use wgmesh_k8s::agent::{Agent, AgentSettings};
use wgmesh_k8s::dataplane::{Dataplane, KeyDisk, RecordingDataplane};
use wgmesh_k8s::metrics::Metrics;
use wgmesh_k8s::rotation::{NEXT_PUBLIC_KEY_ANNOTATION, RotationSettings};

const S: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const KEY: &str = "wgmesh.io/public-key";

fn settings(name: &str) -> AgentSettings {
    let mut s = AgentSettings::new(name, MeshConfig::default());
    s.rotation = RotationSettings::every(HOUR);
    s.rotation.settle = 10 * S;
    s.rotation.retry = 30 * S;
    s
}

/// A key disk whose key is two hours old: due at once.
fn old_disk() -> KeyDisk {
    KeyDisk::new(SystemTime::now() - 2 * HOUR)
}

fn cluster(ours: &str, our_key: PublicKey) -> Vec<K8sNode> {
    let mut nodes = vec![
        wg_node("a", "10.0.0.1", &["10.65.0.0/26"], Some(public(1))),
        wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
        wg_node("c", "10.0.0.3", &["10.65.0.128/26"], Some(public(3))),
    ];
    for n in &mut nodes {
        if n.metadata.name.as_deref() == Some(ours) {
            *n = annotate(n.clone(), KEY, Some(&our_key.to_base64()));
        }
    }
    nodes
}

/// Agent `name` on `disk`, started with `nodes` (the API server's copy).
fn agent_on(name: &str, disk: &KeyDisk, nodes: &[K8sNode]) -> Driver {
    let dataplane = RecordingDataplane::with_key_disk(disk.clone());
    let mut d = Driver::new(Agent::new(settings(name), dataplane, Metrics::new()));
    d.start_with(nodes, &[]);
    d
}

fn start(name: &str, disk: &KeyDisk) -> Driver {
    agent_on(name, disk, &cluster(name, disk.current().unwrap()))
}

/// The agent process restarts: a new agent on the same key disk, listing the API server's
/// Nodes as they are now.
fn restart(d: Driver, disk: &KeyDisk) -> Driver {
    let name = d.agent.settings().node_name.clone();
    let nodes: Vec<K8sNode> = d.nodes.values().cloned().collect();
    let (now, start) = (d.now, d.start);
    drop(d);
    let mut d = agent_on(&name, disk, &nodes);
    d.now = now;
    d.start = start;
    d
}

fn annotation(d: &Driver, node: &str, key: &str) -> Option<String> {
    d.nodes[node]
        .metadata
        .annotations
        .as_ref()
        .and_then(|a: &BTreeMap<String, String>| a.get(key).cloned())
}

fn announced(d: &Driver, node: &str) -> Option<String> {
    annotation(d, node, NEXT_PUBLIC_KEY_ANNOTATION)
}

fn published_key(d: &Driver, node: &str) -> Option<String> {
    annotation(d, node, KEY)
}

#[test]
fn a_rotation_keeps_announces_settles_switches_and_publishes() {
    let disk = old_disk();
    let k1 = disk.current().unwrap();
    let mut d = start("a", &disk);
    d.run_for(S);
    // Phase 1 and 2: the next key is on disk and announced; the key is unchanged.
    let k2 = disk.next().expect("a next key is kept");
    assert_ne!(k2, k1);
    assert_eq!(announced(&d, "a"), Some(k2.to_base64()));
    assert_eq!(published_key(&d, "a"), Some(k1.to_base64()));
    assert_eq!(d.key(Family::V4), Some(k1));
    assert_eq!(d.agent.metrics().rotations("started"), 1);
    // Phase 3 waits for the settle time after the announcement came back.
    d.run_for(8 * S);
    assert_eq!(disk.current(), Some(k1), "switched before the settle time");
    d.take_ops();
    d.run_for(3 * S);
    // Phase 3 and 4: switched on disk and in the device, published, announcement removed.
    assert_eq!(disk.current(), Some(k2));
    assert_eq!(disk.next(), None);
    assert_eq!(d.key(Family::V4), Some(k2));
    assert!(
        d.take_ops()
            .iter()
            .any(|o| o.starts_with("set device wireguard.cali private-key")),
        "the device gets the new key"
    );
    assert_eq!(published_key(&d, "a"), Some(k2.to_base64()));
    assert_eq!(announced(&d, "a"), None);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    assert!(d.agent.key_check().unwrap().confirmed());
    let text = d.agent.metrics().render();
    assert!(
        text.contains("wgmesh_key_rotations_total{result=\"completed\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("wgmesh_key_age_seconds "), "{text}");
    // The new key is young: nothing more for the next 50 minutes.
    d.run_for(50 * 60 * S);
    assert_eq!(disk.next(), None);
    assert_eq!(d.agent.metrics().rotations("started"), 1);
}

#[test]
fn three_rotations_in_a_row_each_make_a_new_key() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    d.run_for(20 * S); // the first key was already due
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    let mut keys = vec![disk.current().unwrap()];
    for _ in 0..3 {
        d.run_for(HOUR + 7 * 60 * S); // interval + the largest jitter (6 min) + settle
        keys.push(disk.current().unwrap());
    }
    assert_eq!(d.agent.metrics().rotations("completed"), 4, "{keys:?}");
    let distinct: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), 4, "{keys:?}");
    assert_eq!(published_key(&d, "a"), Some(keys[3].to_base64()));
}

#[test]
fn off_by_default() {
    let disk = old_disk();
    let k1 = disk.current().unwrap();
    let dataplane = RecordingDataplane::with_key_disk(disk.clone());
    let mut d = Driver::new(Agent::new(
        AgentSettings::new("a", MeshConfig::default()),
        dataplane,
        Metrics::new(),
    ));
    d.start_with(&cluster("a", k1), &[]);
    d.run_for(3 * HOUR);
    assert_eq!((disk.current(), disk.next()), (Some(k1), None));
    assert!(
        !d.agent
            .metrics()
            .render()
            .contains("wgmesh_key_age_seconds")
    );
}

#[test]
fn the_next_key_is_kept_before_it_is_announced() {
    let disk = old_disk();
    disk.fail_writes(1);
    let mut d = start("a", &disk);
    d.run_for(S);
    // The write failed: nothing is announced (a key that is not on disk could be lost).
    assert_eq!(disk.next(), None);
    assert_eq!(announced(&d, "a"), None);
    assert_eq!(d.agent.metrics().rotations("failed"), 1);
    // Retried after `retry`.
    d.run_for(31 * S);
    let k2 = disk.next().expect("kept on the second attempt");
    assert_eq!(announced(&d, "a"), Some(k2.to_base64()));
}

#[test]
fn the_switch_waits_for_the_announcement_to_come_back() {
    let disk = old_disk();
    let k1 = disk.current().unwrap();
    let mut d = start("a", &disk);
    d.echo = false;
    d.run_for(60 * S);
    assert!(disk.next().is_some());
    assert_eq!(
        disk.current(),
        Some(k1),
        "switched without seeing its announcement"
    );
    // (Before a fix in `next_wakeup`, this test never returned: once the publication backoff
    // outgrew the echo timeout, the agent's wake-up time stayed in the past.)
    d.echo = true;
    d.run_for(150 * S); // the publication backoff has grown meanwhile (at most 60 s)
    assert_ne!(disk.current(), Some(k1));
    assert_eq!(
        published_key(&d, "a"),
        Some(disk.current().unwrap().to_base64())
    );
}

// -------------------------------------------------------------------------------------------
// An agent restart in every phase.

#[test]
fn restart_after_the_next_key_is_kept_but_before_it_is_announced() {
    let disk = old_disk();
    let k1 = disk.current().unwrap();
    let mut d = start("a", &disk);
    d.fail_publications = 1; // the announcement does not reach the API server
    d.run_for(S / 2);
    let k2 = disk.next().unwrap();
    assert_eq!(announced(&d, "a"), None);
    let mut d = restart(d, &disk);
    d.run_for(S);
    // The restarted agent announces the key it found on disk, not a new one.
    assert_eq!(announced(&d, "a"), Some(k2.to_base64()));
    d.run_for(11 * S);
    assert_eq!(disk.current(), Some(k2));
    assert_ne!(k2, k1);
    assert_eq!(published_key(&d, "a"), Some(k2.to_base64()));
    assert_eq!(announced(&d, "a"), None);
    assert_eq!(
        d.agent.metrics().rotations("started"),
        0,
        "no second key made"
    );
}

#[test]
fn restart_after_the_announcement_before_the_switch() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    d.run_for(5 * S);
    let k2 = disk.next().unwrap();
    assert_eq!(announced(&d, "a"), Some(k2.to_base64()));
    let mut d = restart(d, &disk);
    d.run_for(5 * S);
    assert_eq!(disk.next(), Some(k2), "kept across the restart");
    d.run_for(6 * S);
    assert_eq!(disk.current(), Some(k2));
    assert_eq!(d.key(Family::V4), Some(k2));
    assert_eq!(published_key(&d, "a"), Some(k2.to_base64()));
    assert_eq!(announced(&d, "a"), None);
}

#[test]
fn restart_after_the_switch_before_it_is_published() {
    let disk = old_disk();
    let k1 = disk.current().unwrap();
    let mut d = start("a", &disk);
    d.run_for(5 * S);
    let k2 = disk.next().unwrap();
    d.fail_publications = 1000;
    d.run_for(10 * S);
    // Switched on disk, but the API server still has the old key and the announcement.
    assert_eq!(disk.current(), Some(k2));
    assert_eq!(published_key(&d, "a"), Some(k1.to_base64()));
    assert_eq!(announced(&d, "a"), Some(k2.to_base64()));
    let mut d = restart(d, &disk);
    d.run_for(5 * S);
    assert_eq!(d.key(Family::V4), Some(k2));
    assert_eq!(published_key(&d, "a"), Some(k2.to_base64()));
    assert_eq!(
        announced(&d, "a"),
        None,
        "the stale announcement is removed"
    );
    d.run_for(30 * 60 * S);
    assert_eq!(
        disk.next(),
        None,
        "the new key is not rotated again at once"
    );
    assert_eq!(d.agent.metrics().rotations("started"), 0);
}

#[test]
fn restart_after_the_rotation_finished() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    d.run_for(20 * S);
    let k2 = disk.current().unwrap();
    assert_eq!(published_key(&d, "a"), Some(k2.to_base64()));
    let mut d = restart(d, &disk);
    d.run_for(10 * 60 * S);
    assert_eq!(d.publications.len(), 0, "nothing to publish");
    assert_eq!((disk.current(), disk.next()), (Some(k2), None));
}

// -------------------------------------------------------------------------------------------
// Several nodes.

#[test]
fn a_node_waits_while_the_bound_is_reached() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    // b announces first (before a's agent is due: same instant, but b is in the list).
    let b = d.nodes["b"].clone();
    d.node(annotate(
        b.clone(),
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&public(22).to_base64()),
    ));
    d.run_for(5 * 60 * S);
    assert_eq!(disk.next(), None, "started while b rotates");
    assert!(d.agent.metrics().rotations("deferred") >= 1);
    // b finishes.
    d.node(annotate(
        annotate(b, NEXT_PUBLIC_KEY_ANNOTATION, None),
        KEY,
        Some(&public(22).to_base64()),
    ));
    d.run_for(31 * S);
    assert!(disk.next().is_some() || d.agent.metrics().rotations("completed") == 1);
    d.run_for(11 * S);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
}

#[test]
fn a_bogus_announcement_does_not_count() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    let b = d.nodes["b"].clone();
    d.node(annotate(b, NEXT_PUBLIC_KEY_ANNOTATION, Some("not a key")));
    d.run_for(12 * S);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
}

#[test]
fn two_nodes_announcing_at_once_the_later_name_gives_way() {
    // Agent b and node a announce within the same moment; the bound is 1.
    let disk = old_disk();
    let mut d = start("b", &disk);
    d.run_for(S / 10);
    let ours = disk.next().unwrap();
    let a = d.nodes["a"].clone();
    d.node(annotate(
        a.clone(),
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&public(11).to_base64()),
    ));
    d.run_for(2 * S);
    assert_eq!(disk.next(), None, "b kept its next key");
    assert_eq!(announced(&d, "b"), None, "b's announcement stays");
    assert_ne!(disk.current(), Some(ours));
    assert!(d.agent.metrics().rotations("deferred") >= 1);
    // a finishes; b rotates after its retry.
    d.node(annotate(
        annotate(a, NEXT_PUBLIC_KEY_ANNOTATION, None),
        KEY,
        Some(&public(11).to_base64()),
    ));
    d.run_for(45 * S);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
}

#[test]
fn two_nodes_announcing_at_once_the_earlier_name_goes_on() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    d.run_for(S / 10);
    let ours = disk.next().unwrap();
    let b = d.nodes["b"].clone();
    d.node(annotate(
        b,
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&public(22).to_base64()),
    ));
    d.run_for(12 * S);
    assert_eq!(disk.current(), Some(ours));
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
}

#[test]
fn a_next_key_another_node_publishes_is_given_up() {
    let disk = old_disk();
    let mut d = start("a", &disk);
    d.run_for(S);
    let copied = disk.next().unwrap();
    // c copies a's announced key as its own.
    let c = d.nodes["c"].clone();
    d.node(annotate(c, KEY, Some(&copied.to_base64())));
    d.run_for(40 * S);
    assert_eq!(d.agent.metrics().rotations("collision"), 1);
    let now = disk.current().unwrap();
    assert_ne!(now, copied, "switched to a key another node publishes");
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    assert_eq!(published_key(&d, "a"), Some(now.to_base64()));
}

#[test]
fn a_peers_announcement_changes_nothing_and_its_switch_is_add_new_then_remove_old() {
    let disk = KeyDisk::new(SystemTime::now());
    let mut d = start("a", &disk);
    d.run_for(S);
    d.take_ops();
    let b = d.nodes["b"].clone();
    let next = public(22);
    d.node(annotate(
        b.clone(),
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&next.to_base64()),
    ));
    d.run_for(S);
    assert_eq!(
        d.take_ops(),
        Vec::<String>::new(),
        "an announcement is not programmed"
    );
    d.node(annotate(
        annotate(b, NEXT_PUBLIC_KEY_ANNOTATION, None),
        KEY,
        Some(&next.to_base64()),
    ));
    d.run_for(S);
    let ops = d.take_ops();
    let add = ops
        .iter()
        .position(|o| o.starts_with(&format!("set peer {next} ")) && o.contains("10.65.0.64/26"));
    let kick = ops
        .iter()
        .position(|o| o.starts_with(&format!("start handshake with peer {next}")));
    let remove = ops
        .iter()
        .position(|o| o.starts_with(&format!("remove peer {}", public(2))));
    assert!(
        add < kick && kick < remove && add.is_some(),
        "add-new (with the allowed IPs), kick, then remove-old: {ops:#?}"
    );
}

// -------------------------------------------------------------------------------------------
// The netlink dataplane's key files.

#[test]
fn keyfile_rotation_persists_0600_and_resumes() {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let dir = std::env::temp_dir().join(format!("wgmesh-rotation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let path = dir.join("private-key");
    let mesh = MeshConfig::default();
    let mut dp =
        wgmesh_k8s::netlink::NetlinkDataplane::with_key_file(fake_linux(), &mesh, &path).unwrap();
    let k1 = dp.public_key(Family::V4).unwrap();
    let k2 = dp.create_next_key().unwrap().unwrap();
    let next_path = wgmesh_netlink::keys::next_key_path(&path);
    let mode = std::fs::metadata(&next_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        wgmesh_netlink::keys::load(&next_path).unwrap().public_key(),
        k2
    );
    // Restart: the next key is found; the key is still k1 until the switch.
    drop(dp);
    let mut dp =
        wgmesh_k8s::netlink::NetlinkDataplane::with_key_file(fake_linux(), &mesh, &path).unwrap();
    assert_eq!(dp.public_key(Family::V4), Some(k1));
    assert_eq!(dp.next_public_key(), Some(k2));
    dp.switch_to_next_key().unwrap();
    assert_eq!(dp.public_key(Family::V4), Some(k2));
    assert!(!next_path.exists());
    assert_eq!(wgmesh_netlink::keys::load(&path).unwrap().public_key(), k2);
    // A next key made and given up leaves no file.
    dp.create_next_key().unwrap();
    dp.discard_next_key().unwrap();
    assert!(!next_path.exists());
    assert_eq!(dp.next_public_key(), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

// -------------------------------------------------------------------------------------------
// A node that announces and never switches (the bound's time limit).

const MINUTE: Duration = Duration::from_secs(60);

/// Agent c, due at once, while b announces a next key from the start and never switches.
fn c_behind_a_stuck_b(disk: &KeyDisk) -> Driver {
    let mut nodes = cluster("c", disk.current().unwrap());
    nodes[1] = annotate(
        nodes[1].clone(),
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&public(22).to_base64()),
    );
    agent_on("c", disk, &nodes)
}

#[test]
fn an_announcement_held_forever_stops_counting_after_the_limit() {
    let disk = old_disk();
    let mut d = c_behind_a_stuck_b(&disk);
    assert_eq!(d.agent.settings().rotation.announcement_limit, 10 * MINUTE);
    d.run_for(9 * MINUTE);
    assert_eq!(disk.next(), None, "c started while b's announcement counts");
    assert!(d.agent.metrics().rotations("deferred") >= 1);
    assert_eq!(d.agent.metrics().stale_announcements(), 0);
    // Ten minutes after c first saw it, b's announcement no longer counts: c rotates at its
    // next retry (30 s) and switches after the settle time (10 s).
    d.run_for(MINUTE + 31 * S + 11 * S);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    assert_eq!(d.agent.metrics().stale_announcements(), 1);
    let text = d.agent.metrics().render();
    assert!(
        text.contains("wgmesh_key_rotation_stale_announcements_total 1\n"),
        "{text}"
    );
    // Said once, however often c counts again.
    d.run_for(2 * HOUR);
    assert_eq!(d.agent.metrics().stale_announcements(), 1);
}

#[test]
fn a_shorter_limit_is_honoured() {
    let disk = old_disk();
    let mut nodes = cluster("c", disk.current().unwrap());
    nodes[1] = annotate(
        nodes[1].clone(),
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&public(22).to_base64()),
    );
    let mut s = settings("c");
    s.rotation.announcement_limit = 2 * MINUTE;
    let dataplane = RecordingDataplane::with_key_disk(disk.clone());
    let mut d = Driver::new(Agent::new(s, dataplane, Metrics::new()));
    d.start_with(&nodes, &[]);
    d.run_for(MINUTE);
    assert_eq!(disk.next(), None);
    d.run_for(MINUTE + 31 * S + 11 * S);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
}

#[test]
fn withdrawing_and_announcing_again_does_not_restart_the_clock() {
    // c's key is new: due after an hour (plus at most 6 min of jitter). b announces at once,
    // withdraws after 50 min and announces again a minute before c is first due.
    let disk = KeyDisk::new(SystemTime::now());
    let mut d = agent_on("c", &disk, &cluster("c", disk.current().unwrap()));
    let b = d.nodes["b"].clone();
    let announce = |n: &K8sNode, k: u8| {
        annotate(
            n.clone(),
            NEXT_PUBLIC_KEY_ANNOTATION,
            Some(&public(k).to_base64()),
        )
    };
    d.node(announce(&b, 22));
    d.run_for(50 * MINUTE);
    d.node(annotate(b.clone(), NEXT_PUBLIC_KEY_ANNOTATION, None));
    d.run_for(9 * MINUTE);
    assert_eq!(disk.next(), None, "not due yet");
    d.node(announce(&b, 23));
    // Had the clock restarted at the new announcement, c would wait until 69 min.
    d.run_for(8 * MINUTE);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    assert_eq!(d.agent.metrics().stale_announcements(), 1);
}

#[test]
fn a_node_that_switched_counts_again_when_it_announces_next() {
    let disk = old_disk();
    let mut d = c_behind_a_stuck_b(&disk);
    d.run_for(10 * MINUTE + 42 * S);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    // b finally switches (new key, announcement gone), and announces again two minutes
    // before c is due again: a new key, a new clock, and it counts.
    let b = d.nodes["b"].clone();
    let switched = annotate(
        annotate(b, NEXT_PUBLIC_KEY_ANNOTATION, None),
        KEY,
        Some(&public(22).to_base64()),
    );
    d.node(switched.clone());
    d.run_for(HOUR - 2 * MINUTE);
    d.node(annotate(
        switched,
        NEXT_PUBLIC_KEY_ANNOTATION,
        Some(&public(24).to_base64()),
    ));
    // c is due within the next 8 minutes (an hour plus its jitter, under 6 min), and waits.
    d.run_for(8 * MINUTE);
    assert_eq!(d.agent.metrics().rotations("completed"), 1);
    assert_eq!(disk.next(), None);
    // Ten minutes after the new announcement it no longer counts either.
    d.run_for(3 * MINUTE);
    assert_eq!(d.agent.metrics().rotations("completed"), 2);
    assert_eq!(d.agent.metrics().stale_announcements(), 2);
}
