//! Cluster changes under continuous ping, with the loss each one causes.
//!
//! Before a change, background pings start between pods and hosts on every node (every
//! [`INTERVAL`]); the change is made (topology first, then every node's agent applies its delta,
//! in node order); after [`SETTLE`] the pings stop and the unanswered requests are counted.
//! Then the flows table must pass again.

use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use wgmesh_core::Family;

use crate::cluster::Cluster;
use crate::flows::{self, End, Flow, Probe, Row};
use crate::traffic::{ContinuousPing, Loss};
use crate::{Error, Result};

/// Time between two echo requests of a stream.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// How long the streams run after the change was applied everywhere.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// How long [`measure`] waits for every pair before it logs WireGuard's state (a stall).
pub const STALL: Duration = Duration::from_secs(2);

/// What one change did.
#[derive(Debug, Clone)]
pub struct ChangeReport {
    /// The change.
    pub change: String,
    /// Operations the appliers performed, all nodes together.
    pub operations: usize,
    /// Time to make the change and apply it on every node.
    pub apply_time: Duration,
    /// Time from the start of the change until every WireGuard pod pair answered again.
    pub recovered: Duration,
    /// Loss of every stream.
    pub losses: Vec<Loss>,
    /// The flows checked afterwards.
    pub flows: Vec<Row>,
}

impl ChangeReport {
    /// Requests lost, all streams together.
    pub fn lost(&self) -> u32 {
        self.losses.iter().map(|l| l.lost).sum()
    }

    /// Requests sent, all streams together.
    pub fn sent(&self) -> u32 {
        self.losses.iter().map(|l| l.sent).sum()
    }

    /// The streams that lost something, as `label: lost/sent`.
    pub fn lossy(&self) -> String {
        let v: Vec<String> = self
            .losses
            .iter()
            .filter(|l| l.lost > 0)
            .map(|l| format!("{}: {}/{}", l.label, l.lost, l.sent))
            .collect();
        if v.is_empty() {
            "–".to_owned()
        } else {
            v.join("; ")
        }
    }
}

/// The background streams: every WireGuard node's pods to another node's, the plain node to a
/// WireGuard node, host to host, and IPv6 when the cluster has it.
fn start_streams(cluster: &Cluster) -> Result<Vec<ContinuousPing>> {
    let mut pairs: Vec<(End, End, Family)> = vec![
        (End::Pod("p1a".into()), End::Pod("p2".into()), Family::V4),
        (End::Pod("p2".into()), End::Pod("p3".into()), Family::V4),
        (End::Pod("p3".into()), End::Pod("p1a".into()), Family::V4),
        (End::Pod("p4".into()), End::Pod("p1b".into()), Family::V4),
        (End::Host("n1".into()), End::Host("n3".into()), Family::V4),
    ];
    if cluster.options().ipv6 {
        pairs.push((End::Pod("p1b".into()), End::Pod("p3".into()), Family::V6));
        pairs.push((End::Pod("p2".into()), End::Pod("p1a".into()), Family::V6));
    }
    let mut out = Vec::new();
    for (src, dst, family) in pairs {
        let addr = |e: &End| -> Result<IpAddr> {
            match e {
                End::Pod(p) => cluster.pod(p)?.address(family),
                End::Host(n) => cluster.node(n)?.address(family),
            }
            .ok_or_else(|| Error::new(format!("{e} has no {} address", family.as_str())))
        };
        let ns = match &src {
            End::Pod(p) => cluster.pod_ns(p)?,
            End::Host(n) => cluster.node_ns(n)?,
        };
        let dst_ip = addr(&dst)?;
        let label = format!("{src} → {dst} ({})", family.as_str());
        out.push(ContinuousPing::start(&label, ns, dst_ip, INTERVAL)?);
    }
    Ok(out)
}

/// Makes one change under continuous ping and checks the flows afterwards (`extra` flows too).
pub fn measure(
    cluster: &mut Cluster,
    change: &str,
    extra: &[Flow],
    apply: impl FnOnce(&mut Cluster) -> Result<usize>,
) -> Result<ChangeReport> {
    let streams = start_streams(cluster)?;
    thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let operations = apply(cluster).map_err(|e| e.context(format!("change {change:?}")))?;
    let apply_time = start.elapsed();
    // Keep pinging until every WireGuard pod pair answers again (handshakes after a key change
    // or a re-enable), then a little longer: the loss covers the whole outage.
    let waited = match cluster.wait_mesh(STALL) {
        Ok(w) => w,
        Err(_) => {
            // A stall: record what WireGuard says (handshakes, endpoints, counters; no keys
            // but public ones) while it lasts and once it is over, to tell a crossing from
            // anything else. It costs one `wg` run per node and changes no state.
            let applied = start + apply_time;
            eprintln!(
                "wgmesh-e2e: {change}: not every pair answers {:.1} s after the change; WireGuard now:\n{}",
                start.elapsed().as_secs_f64(),
                cluster.wireguard_state()
            );
            cluster.wait_mesh(Duration::from_secs(60))?;
            eprintln!(
                "wgmesh-e2e: {change}: every pair answers again {:.1} s after the change; WireGuard now:\n{}",
                start.elapsed().as_secs_f64(),
                cluster.wireguard_state()
            );
            applied.elapsed()
        }
    };
    let recovered = start.elapsed();
    thread::sleep(SETTLE);
    let mut losses = Vec::new();
    for s in &streams {
        s.halt();
    }
    for s in streams {
        losses.push(s.stop()?);
    }
    let mut flow_list = Vec::new();
    let families: &[Family] = if cluster.options().ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for f in families {
        flow_list.extend(flows::standard(*f, cluster.mesh().host_encryption));
    }
    flow_list.extend(extra.iter().cloned());
    let rows = flows::run_all(cluster, &flow_list)?;
    eprintln!(
        "wgmesh-e2e: {change}: applied in {:.0} ms, mesh up after {:.1} s more, flows checked at {:.1} s",
        apply_time.as_secs_f64() * 1000.0,
        waited.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(ChangeReport {
        change: change.to_owned(),
        operations,
        apply_time,
        recovered,
        losses,
        flows: rows,
    })
}

/// Echo flows from `p1a` to a pod, in every family of the cluster.
pub fn to_pod(cluster: &Cluster, pod: &str) -> Vec<Flow> {
    let mut families = vec![Family::V4];
    if cluster.options().ipv6 {
        families.push(Family::V6);
    }
    families
        .into_iter()
        .map(|family| Flow {
            src: End::Pod("p1a".into()),
            dst: End::Pod(pod.into()),
            family,
            probe: Probe::Echo,
        })
        .collect()
}

/// The standard sequence of changes: a pod added, its address moved to another node, the pod
/// removed, a key rotated, scheduled rotations ([`rotation_sequence`]), WireGuard disabled and
/// enabled again on a node, a node removed and re-added — these four in phases,
/// make-before-break ([`Cluster::set_wireguard`], [`Cluster::remove_node`],
/// [`Cluster::readd_node`]) — and last a node deleted abruptly, with no phase
/// ([`Cluster::delete_node`]). Returns one report per change.
pub fn standard_sequence(cluster: &mut Cluster) -> Result<Vec<ChangeReport>> {
    let opts = cluster.options().clone();
    let new_pod = crate::cluster::pod_addresses(opts.route_source, opts.ipv6, 2, 2);
    let mut out = Vec::new();

    let extra = |c: &Cluster| to_pod(c, "p2b");
    let addrs = new_pod.clone();
    let mut report = measure(cluster, "pod added (p2b on n2)", &[], move |c| {
        c.add_pod("p2b", "n2", addrs)
    })?;
    report
        .flows
        .extend(flows::run_all(cluster, &extra(cluster))?);
    out.push(report);

    let moved = if opts.route_source == wgmesh_core::RouteSource::CidrBlocks {
        "IP moved (p2b's addresses to n3, borrowed from n2's block)"
    } else {
        "IP moved (p2b's addresses to n3)"
    };
    let mut report = measure(cluster, moved, &[], |c| c.move_pod("p2b", "n3"))?;
    report
        .flows
        .extend(flows::run_all(cluster, &extra(cluster))?);
    out.push(report);

    out.push(measure(cluster, "pod removed (p2b)", &[], |c| {
        c.remove_pod("p2b")
    })?);
    out.push(measure(cluster, "key rotated (n2)", &[], |c| {
        c.rotate_keys("n2")
    })?);
    out.extend(rotation_sequence(cluster)?);
    out.push(measure(cluster, "WireGuard disabled (n3)", &[], |c| {
        c.set_wireguard("n3", false)
    })?);
    out.push(measure(
        cluster,
        "WireGuard enabled again (n3)",
        &[],
        |c| c.set_wireguard("n3", true),
    )?);
    out.push(measure(cluster, "node removed (n3)", &[], |c| {
        c.remove_node("n3")
    })?);
    out.push(measure(cluster, "node re-added (n3)", &[], |c| {
        c.readd_node("n3")
    })?);
    out.push(measure(cluster, "node deleted abruptly (n3)", &[], |c| {
        c.delete_node("n3")
    })?);
    Ok(out)
}

/// Scheduled key rotation in the agent's order ([`Cluster::rotate_scheduled`]): three
/// rotations in a row (n1, n2, n3, one after the other as `key_rotation_max_concurrent: 1`
/// has them) under one continuous ping, then an agent restart in the middle of a rotation,
/// once after the next key was kept (n2) and once after the switch, before the publication
/// (n3). The rows that follow run on the rotated keys.
pub fn rotation_sequence(cluster: &mut Cluster) -> Result<Vec<ChangeReport>> {
    use crate::cluster::RotationRestart;
    let three = measure(
        cluster,
        "scheduled rotation ×3 (n1, n2, n3 in turn)",
        &[],
        |c| {
            let mut ops = 0;
            for n in ["n1", "n2", "n3"] {
                ops += c.rotate_scheduled(n, RotationRestart::None)?;
            }
            Ok(ops)
        },
    )?;
    let kept = measure(
        cluster,
        "agent restart mid-rotation (n2, after keeping the next key)",
        &[],
        |c| c.rotate_scheduled("n2", RotationRestart::AfterKeepingNextKey),
    )?;
    let switched = measure(
        cluster,
        "agent restart mid-rotation (n3, after the switch, before publishing)",
        &[],
        |c| c.rotate_scheduled("n3", RotationRestart::AfterSwitch),
    )?;
    Ok(vec![three, kept, switched])
}

/// The reports as a Markdown table.
pub fn table(reports: &[ChangeReport]) -> String {
    let mut s = String::from(
        "| change | operations | apply (all nodes) | all pairs answer after | echo requests lost / sent | streams that lost | flows after |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let passed = r.flows.iter().filter(|f| f.pass).count();
        s.push_str(&format!(
            "| {} | {} | {:.0} ms | {:.2} s | {} / {} | {} | {}/{} pass |\n",
            r.change,
            r.operations,
            r.apply_time.as_secs_f64() * 1000.0,
            r.recovered.as_secs_f64(),
            r.lost(),
            r.sent(),
            r.lossy(),
            passed,
            r.flows.len()
        ));
    }
    s
}
