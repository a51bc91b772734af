//! The agent's configuration file. (Its flags belong to the `wgmesh-agent` binary and are
//! tested there, in the root package's `tests/agent_cli.rs`.)

use std::time::Duration;

use wgmesh_core::RouteSource;
use wgmesh_k8s::config::{ConfigSpec, LogFormat};

fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

const IN_CLUSTER: &[(&str, &str)] = &[
    ("NODE_NAME", "aks-nodepool1-19852467-vmss000000"),
    ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
    ("KUBERNETES_SERVICE_PORT", "443"),
];

#[test]
fn defaults_in_a_pod() {
    let c = ConfigSpec::default().validate(env(IN_CLUSTER)).unwrap();
    let s = &c.settings;
    assert_eq!(s.node_name, "aks-nodepool1-19852467-vmss000000");
    assert_eq!(s.mesh, wgmesh_core::MeshConfig::default());
    assert!(!s.watch_pods, "cidr_blocks: no pods");
    assert_eq!(s.resync_interval, Duration::from_secs(90));
    assert_eq!(s.debounce, Duration::from_millis(100));
    assert_eq!(s.max_delay, Duration::from_millis(100));
    assert_eq!(s.publish_backoff.max, Duration::from_secs(60));
    assert_eq!(s.control_plane.fixed, ["10.0.0.1:443".parse().unwrap()]);
    assert_eq!(s.control_plane.node_port, Some(6443));
    assert_eq!(
        s.adapter.control_plane_label.as_deref(),
        Some("node-role.kubernetes.io/control-plane")
    );
    assert!(!s.adapter.calico_annotations);
    assert_eq!(s.underlay_mtu, None);
    assert_eq!(c.health_address, Some("127.0.0.1:9469".parse().unwrap()));
    assert_eq!(c.metrics_address, None, "Prometheus's endpoint is opt-in");
    assert!(s.per_peer_metrics);
    assert_eq!(
        c.private_key_file.to_str(),
        Some("/var/lib/wgmesh/private-key")
    );
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(!c.dry_run);
}

#[test]
fn a_full_file() {
    let text = r#"
node_name: node-a
mesh:
  route_source: workload_ips
  host_encryption: true
  persistent_keepalive: 25
  control_plane_endpoints: ["10.0.0.100:6443"]
private_key_file: /etc/wgmesh/key
calico_annotations: true
control_plane:
  service: false
  node_label: null
underlay_mtu: 9000
debounce_ms: 50
max_delay_ms: 500
resync_seconds: 30
publish_backoff_max_seconds: 10
metrics_address: "0.0.0.0:9100"
health_address: "127.0.0.1:9000"
metrics_per_peer: false
log_format: text
dry_run: true
"#;
    let c = ConfigSpec::parse(text)
        .unwrap()
        .validate(env(IN_CLUSTER))
        .unwrap();
    let s = &c.settings;
    assert_eq!(s.node_name, "node-a", "the file wins over NODE_NAME");
    assert_eq!(s.mesh.route_source, RouteSource::WorkloadIps);
    assert!(s.mesh.host_encryption);
    assert_eq!(s.mesh.persistent_keepalive, Some(25));
    assert_eq!(
        s.mesh.control_plane_endpoints,
        ["10.0.0.100:6443".parse().unwrap()]
    );
    assert!(s.watch_pods, "auto with workload_ips");
    assert!(s.adapter.calico_annotations);
    assert_eq!(s.adapter.control_plane_label, None);
    assert!(s.control_plane.fixed.is_empty());
    assert_eq!(s.control_plane.node_port, None);
    assert_eq!(s.underlay_mtu, Some(9000));
    assert_eq!(s.debounce, Duration::from_millis(50));
    assert_eq!(s.max_delay, Duration::from_millis(500));
    assert_eq!(s.resync_interval, Duration::from_secs(30));
    assert_eq!(s.publish_backoff.max, Duration::from_secs(10));
    assert_eq!(c.metrics_address, Some("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(c.health_address, Some("127.0.0.1:9000".parse().unwrap()));
    assert!(!s.per_peer_metrics);
    assert_eq!(c.private_key_file.to_str(), Some("/etc/wgmesh/key"));
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.dry_run);
}

#[test]
fn json_works_too_and_an_empty_health_address_turns_it_off() {
    let c = ConfigSpec::parse(r#"{"node_name": "n", "health_address": ""}"#)
        .unwrap()
        .validate(env(&[]))
        .unwrap();
    assert_eq!(c.health_address, None);
    assert!(c.settings.control_plane.fixed.is_empty(), "not in a pod");
}

/// Without `max_delay_ms`, a change waits at most the debounce, whatever the debounce is (a
/// longer debounce alone is not refused as longer than the maximum).
#[test]
fn max_delay_follows_the_debounce_unless_set() {
    let settings = |text: &str| {
        ConfigSpec::parse(text)
            .unwrap()
            .validate(env(&[]))
            .unwrap()
            .settings
    };
    let s = settings("node_name: n\ndebounce_ms: 500");
    assert_eq!(s.debounce, Duration::from_millis(500));
    assert_eq!(s.max_delay, Duration::from_millis(500));
    let s = settings("node_name: n\ndebounce_ms: 50\nmax_delay_ms: 400");
    assert_eq!(s.max_delay, Duration::from_millis(400));
}

#[test]
fn every_error_names_its_field() {
    let err = |text: &str| {
        ConfigSpec::parse(text)
            .and_then(|s| s.validate(env(IN_CLUSTER)))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("mesh: {route_source: bgp}"),
        "config: mesh: route_source = \"bgp\": unknown route source; expected \"cidr_blocks\" or \"workload_ips\""
    );
    assert!(err("mesh: {listen_port: 0}").starts_with("config: mesh: listen_port = \"0\""));
    assert!(err("resync: 5").starts_with("config: resync: unknown field `resync`"));
    assert_eq!(
        err("resync_seconds: 1"),
        "config: resync_seconds = \"1\": must be between 5 and 86400"
    );
    assert_eq!(
        err("debounce_ms: 500\nmax_delay_ms: 100"),
        "config: max_delay_ms = \"100\": must not be less than debounce_ms"
    );
    assert_eq!(
        err("metrics_address: localhost"),
        "config: metrics_address = \"localhost\": not an address:port"
    );
    assert_eq!(
        err("health_address: 9469"),
        "config: health_address = \"9469\": not an address:port"
    );
    assert_eq!(
        err("mesh: {route_source: workload_ips}\nwatch_pods: false"),
        "config: watch_pods = \"false\": route_source workload_ips takes its destinations from pods"
    );
    assert!(err("underlay_mtu: 100").starts_with("config: underlay_mtu = \"100\""));
    assert!(err("control_plane: {port: 0}").starts_with("config: control_plane.port = \"0\""));
    let e = err("log_format: xml");
    assert!(
        e.starts_with("config: log_format: unknown variant `xml`"),
        "{e}"
    );
    assert!(err("[1, 2]").starts_with("config: "));
    assert!(
        err("mesh: {control_plane_endpoints: [apiserver]}").contains("control_plane_endpoints[0]")
    );
    let no_name = ConfigSpec::default()
        .validate(env(&[]))
        .unwrap_err()
        .to_string();
    assert!(no_name.contains("NODE_NAME"));
    let bad_env = ConfigSpec::default()
        .validate(env(&[
            ("NODE_NAME", "n"),
            ("KUBERNETES_SERVICE_HOST", "kubernetes"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        bad_env,
        "config: KUBERNETES_SERVICE_HOST = \"kubernetes\": not an IP address"
    );
}

#[test]
fn ipv6_service_address() {
    let c = ConfigSpec::default()
        .validate(env(&[
            ("NODE_NAME", "n"),
            ("KUBERNETES_SERVICE_HOST", "fd00:10:96::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]))
        .unwrap();
    assert_eq!(
        c.settings.control_plane.fixed,
        ["[fd00:10:96::1]:443".parse().unwrap()]
    );
}

/// Issue 11: the agent's configuration file goes through the same bounds as cluster files:
/// deep nesting is refused before the YAML parser sees it.
#[test]
fn a_deeply_nested_file_is_refused_at_once() {
    let deep = format!("mesh: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let err = ConfigSpec::parse(&deep).unwrap_err().to_string();
    assert!(err.starts_with("config: .: "), "{err}");
    assert!(err.contains("nest"), "{err}");
}

#[test]
fn key_rotation_announcement_limit() {
    let parse = |text: &str| {
        ConfigSpec::parse(text)
            .and_then(|s| s.validate(env(IN_CLUSTER)))
            .map(|c| c.settings.rotation.announcement_limit)
            .map_err(|e| e.to_string())
    };
    assert_eq!(parse("{}"), Ok(std::time::Duration::from_secs(600)));
    assert_eq!(
        parse("key_rotation_announcement_limit_seconds: 3600"),
        Ok(std::time::Duration::from_secs(3600))
    );
    // Never shorter than the settle time (a rotation in progress would stop counting).
    assert_eq!(
        parse("key_rotation_settle_seconds: 900"),
        Ok(std::time::Duration::from_secs(900))
    );
    assert_eq!(
        parse("key_rotation_settle_seconds: 900\nkey_rotation_announcement_limit_seconds: 600"),
        Err("config: key_rotation_announcement_limit_seconds = \"600\": must be between 900 and 604800".to_owned())
    );
    assert_eq!(
        parse("key_rotation_announcement_limit_seconds: 59"),
        Err("config: key_rotation_announcement_limit_seconds = \"59\": must be between 60 and 604800".to_owned())
    );
}

#[test]
fn phase_grace_settle_and_leave_file() {
    use std::time::Duration;
    let parse = |text: &str| {
        ConfigSpec::parse(text)
            .and_then(|s| s.validate(env(IN_CLUSTER)))
            .map(|c| {
                (
                    c.settings.phase.grace,
                    c.settings.phase.settle,
                    c.settings.leave_file,
                )
            })
            .map_err(|e| e.to_string())
    };
    let s = Duration::from_secs;
    assert_eq!(
        parse("{}"),
        Ok((s(60), s(10), Some("/var/lib/wgmesh/leave".into())))
    );
    assert_eq!(
        parse("private_key_file: /etc/wg/key\nphase_grace_seconds: 300\nphase_settle_seconds: 30"),
        Ok((s(300), s(30), Some("/etc/wg/leave".into())))
    );
    // A short grace shortens the default settle time, which stays below it.
    assert_eq!(
        parse("phase_grace_seconds: 10\nleave_file: /run/wgmesh-leave"),
        Ok((s(10), s(5), Some("/run/wgmesh-leave".into())))
    );
    assert_eq!(
        parse("phase_grace_seconds: 20\nphase_settle_seconds: 20"),
        Err("config: phase_settle_seconds = \"20\": must be between 0 and 19".to_owned())
    );
    assert_eq!(
        parse("phase_grace_seconds: 9"),
        Err("config: phase_grace_seconds = \"9\": must be between 10 and 3600".to_owned())
    );
    assert_eq!(
        parse("leave_file: \"\""),
        Err("config: leave_file = \"\": must not be empty".to_owned())
    );
}
