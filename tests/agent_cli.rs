//! The `wgmesh-agent` binary as a process: its flags, environment and exit codes, and a dry
//! run against an API server mock on loopback (plain HTTP/1.1, chunked watch streams) reached
//! through a kubeconfig — it lists and watches Nodes, publishes the key of its key file with
//! server-side apply, turns ready, logs JSON lines that never contain the private key, and
//! stops on SIGTERM.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wgmesh::core::PrivateKey;

#[path = "support/loopback_api.rs"]
mod loopback_api;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgmesh-agent-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_key(dir: &Path, mode: u32) -> (PathBuf, PrivateKey) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = PrivateKey::from_bytes([0x42; 32]).unwrap();
    let path = dir.join("private-key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .unwrap();
    writeln!(f, "{}", key.to_base64().as_str()).unwrap();
    (path, key)
}

fn agent(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgmesh-agent"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn flags_and_environment_override_the_file() {
    let dir = scratch("config");
    let path = dir.join("agent.yaml");
    std::fs::write(
        &path,
        "node_name: from-file\nresync_seconds: 30\nmesh: {host_encryption: false, control_plane_endpoints: [\"10.0.0.9:443\"]}\nlog_format: json\n",
    )
    .unwrap();
    let out = agent(
        &[
            "--config",
            path.to_str().unwrap(),
            "--node-name=from-flag",
            "--host-encryption",
            "true",
            "--control-plane-endpoint",
            "[fd00::10]:6443",
            "--calico-annotations=true",
            "--watch-pods",
            "true",
            "--health-address",
            "127.0.0.1:9999",
            "--private-key-file",
            "/tmp/k",
            "--dry-run",
            "--key-rotation-interval",
            "30d",
            "--key-rotation-announcement-limit-seconds",
            "900",
            "--check-config",
        ],
        &[
            ("WGMESH_KEY_ROTATION_MAX_CONCURRENT", "3"),
            ("WGMESH_KEY_ROTATION_SETTLE_SECONDS", "20"),
            ("WGMESH_LOG_FORMAT", "text"),
            ("WGMESH_METRICS_PER_PEER", "false"),
            ("WGMESH_METRICS_ADDRESS", "0.0.0.0:9470"),
            ("NODE_NAME", "from-env"),
        ],
    )
    .output()
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["node_name"], "from-flag", "a flag beats the environment");
    assert_eq!(c["resync_seconds"], 30, "kept from the file");
    assert_eq!(c["mesh"]["host_encryption"], true);
    assert_eq!(
        c["mesh"]["control_plane_endpoints"],
        json!(["10.0.0.9:443", "[fd00::10]:6443"]),
        "flags add endpoints"
    );
    assert_eq!(c["calico_annotations"], true);
    assert_eq!(c["watch_pods"], "true");
    assert_eq!(c["health_address"], "127.0.0.1:9999");
    assert_eq!(c["metrics_address"], "0.0.0.0:9470", "from the environment");
    assert_eq!(c["metrics_per_peer"], false);
    assert_eq!(c["log_format"], "text", "the environment beats the file");
    assert_eq!(c["private_key_file"], "/tmp/k");
    assert_eq!(c["dry_run"], true);
    assert_eq!(c["key_rotation_interval"], "30d");
    assert_eq!(c["key_rotation_max_concurrent"], 3, "from the environment");
    assert_eq!(c["key_rotation_settle_seconds"], 20, "from the environment");
    assert_eq!(c["key_rotation_announcement_limit_seconds"], 900);

    // Without a file: NODE_NAME from the environment.
    let out = agent(&["--check-config"], &[("NODE_NAME", "from-env")])
        .output()
        .unwrap();
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["node_name"], "from-env");
}

#[test]
fn help_and_configuration_errors() {
    let out = agent(&["--help"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: wgmesh-agent"), "{help}");
    for flag in [
        "--backend",
        "--node-name",
        "--config",
        "--metrics-per-peer",
        "[env: NODE_NAME=",
    ] {
        assert!(help.contains(flag), "--help lists {flag}: {help}");
    }
    let out = agent(&["--version"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wgmesh-agent 0."));
    let out = agent(&["--bogus"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    let out = agent(&[], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("NODE_NAME"), "{err}");

    // A rotation interval under a minute is refused in one line naming the field.
    let out = agent(&["--node-name", "a", "--key-rotation-interval", "10s"], &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("key_rotation_interval"), "{err}");

    let out = agent(&["--node-name", "a", "--route-source", "bgp"], &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("route_source = \"bgp\""));

    // A key file others can read is refused, naming the fix.
    let dir = scratch("mode");
    let (key, _) = write_key(&dir, 0o644);
    let out = agent(
        &[
            "--node-name",
            "a",
            "--dry-run",
            "--private-key-file",
            key.to_str().unwrap(),
            "--log-format",
            "text",
        ],
        &[],
    )
    .output()
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    // Not in a cluster and no kubeconfig: a clear failure.
    let out = agent(
        &[
            "--node-name",
            "a",
            "--dry-run",
            "--health-address",
            "",
            "--log-format",
            "text",
        ],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot configure the API client"));
}

#[test]
fn leave_and_rejoin_write_and_remove_the_leave_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = scratch("leave");
    let key = dir.join("private-key");
    let key = key.to_str().unwrap();
    let env = [("NODE_NAME", "n1"), ("WGMESH_PRIVATE_KEY_FILE", key)];
    let leave = dir.join("leave");
    let out = agent(&["leave"], &env).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("leaves the mesh in phases"));
    let mode = std::fs::metadata(&leave).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Idempotent both ways.
    assert!(agent(&["leave"], &env).output().unwrap().status.success());
    let out = agent(&["rejoin"], &env).output().unwrap();
    assert!(out.status.success());
    assert!(!leave.exists());
    assert!(agent(&["rejoin"], &env).output().unwrap().status.success());
    // Another path by flag; a directory that does not exist fails the work (exit 1).
    let other = dir.join("elsewhere");
    let out = agent(&["--leave-file", other.to_str().unwrap(), "leave"], &env)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(other.exists());
    let out = agent(&["--leave-file", "/nonexistent/dir/leave", "leave"], &env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // The phase settings are checked like the others (exit 2, one line naming the field).
    let out = agent(
        &[
            "--phase-grace-seconds",
            "30",
            "--phase-settle-seconds",
            "30",
            "--check-config",
        ],
        &env,
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("phase_settle_seconds"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    Some((
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_dry_run_against_a_loopback_api_server() {
    let (_runtime, api, port) = loopback_api::start(vec![
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-a", "resourceVersion": "5", "annotations": {}},
               "spec": {"podCIDRs": ["10.65.0.0/26"]},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}),
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-b", "resourceVersion": "6",
                            "annotations": {"wgmesh.io/public-key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}},
               "spec": {"podCIDRs": ["10.65.0.64/26"]},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}),
    ]);
    let dir = scratch("run");
    let (key_path, key) = write_key(&dir, 0o600);
    let kubeconfig = loopback_api::kubeconfig(&dir, port);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut child = agent(
        &[
            "--node-name",
            "node-a",
            "--dry-run",
            "--private-key-file",
            key_path.to_str().unwrap(),
            "--health-address",
            &metrics,
            // The first key goes out with the joining marker; a settle time longer than
            // this test keeps the marker's removal (tests/api.rs in wgmesh-k8s checks it)
            // out of it.
            "--phase-settle-seconds",
            "50",
        ],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("RUST_LOG", "debug"),
        ],
    )
    .spawn()
    .unwrap();

    let t0 = Instant::now();
    // Ready, the key's echo seen, and the peer programmed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready = false;
    let mut body = String::new();
    while Instant::now() < deadline {
        body = http_get(&metrics, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        ready = http_get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200)
            && body.contains("wgmesh_key_published 1\n")
            && body.contains("wgmesh_peers{interface=\"wireguard.cali\"} 1\n");
        if ready {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    // The condition's first write waits 10 s after the start (so that it is not the moment
    // before the key's echo); then it says True.
    while Instant::now() < deadline + Duration::from_secs(10)
        && !api
            .lock()
            .unwrap()
            .status
            .iter()
            .any(|(_, s)| s["status"]["conditions"][0]["status"] == "True")
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ready, "not ready in 30 s; log:\n{stderr}");
    // Well before the 10 s after which an unanswered publication is retried.
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}; log:\n{stderr}"
    );
    assert_eq!(api.lock().unwrap().patches.len(), 1, "published once");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "SIGTERM stops it cleanly; log:\n{stderr}"
    );

    let patches = api.lock().unwrap().patches.clone();
    let (name, query, content_type, body_json) = &patches[0];
    assert_eq!(name, "node-a");
    assert!(
        query.contains("fieldManager=wgmesh") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert_eq!(
        body_json["metadata"]["annotations"]["wgmesh.io/public-key"],
        json!(key.public_key().to_base64())
    );
    assert_eq!(
        body_json["metadata"]["annotations"]["wgmesh.io/phase"],
        json!("joining")
    );
    assert!(body.contains("wgmesh_ready 1\n"), "{body}");
    assert!(body.contains("wgmesh_key_published 1\n"), "{body}");
    assert!(body.contains("wgmesh_build_info{version=\"0."), "{body}");
    // It said so on its Node: the condition, and Events.
    let api = api.lock().unwrap();
    assert_eq!(api.status.len(), 1, "one write: {:?}", api.status);
    let (node, status) = api.status.last().expect("a condition was written");
    assert_eq!(node, "node-a");
    let condition = &status["status"]["conditions"][0];
    assert_eq!(condition["type"], "WireGuardMeshReady");
    assert_eq!(condition["status"], "True", "{status}");
    let reasons: Vec<&str> = api
        .events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"KeyPublished") && reasons.contains(&"MeshApplied"),
        "{reasons:?}"
    );
    drop(api);

    // Structured logs: every line is a JSON object; the private key is in none of them.
    let private = key.to_base64();
    assert!(!stderr.contains(private.as_str()), "private key logged");
    assert!(
        !stderr.contains(&key.to_hex().as_str()[..16]),
        "private key logged (hex)"
    );
    assert!(stderr.contains("would reconcile"), "{stderr}");
    for line in stderr.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
}
