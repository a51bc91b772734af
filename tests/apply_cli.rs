//! `wgmesh apply`: bad input exits with code 2 and one line (never a panic); as root, a first
//! run applies, a second reports 0 operations, and `--dry-run` changes nothing; `status` and
//! `why --live` find the host matching its plan, then name drift made by hand.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    wgmesh(&[&["apply"], args].concat())
}

fn wgmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // Only the arguments count: no fallbacks from the environment the tests run in.
        .env_remove("NODE_NAME")
        .env_remove("WGMESH_CLUSTER")
        .env_remove("WGMESH_PRIVATE_KEY_FILE")
        .env_remove("WGMESH_BACKEND")
        .output()
        .unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgmesh-apply-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const CLUSTER: &str = "examples/clusters/aks-azure-cni.json";
const NODE: &str = "aks-nodepool1-19852467-vmss000000";

fn assert_input_error(args: &[&str], needle: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{args:?}: {err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let d = tmp("bad");
    let key = d.join("key");
    std::fs::write(&key, "aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let k = key.to_str().unwrap();
    assert_input_error(&["--node", NODE], "a cluster is required: --cluster FILE");
    assert_input_error(
        &["--cluster", CLUSTER],
        "required arguments were not provided: --node",
    );
    assert_input_error(
        &["--cluster", "/nonexistent.json", "--node", "x"],
        "cannot read the cluster file",
    );
    assert_input_error(&["--cluster", CLUSTER, "--node", "nope"], "nope");
    assert_input_error(
        &["--cluster", CLUSTER, "--node", NODE, "--backend", "magic"],
        "unknown backend \"magic\"",
    );
    assert_input_error(
        &["--cluster", CLUSTER, "--node", NODE, "--format", "xml"],
        "invalid value 'xml' for '--format <FORMAT>'",
    );
    assert_input_error(&["--bogus"], "unexpected argument '--bogus'");
    assert_input_error(
        &[
            "--cluster",
            CLUSTER,
            "--node",
            NODE,
            "--private-key",
            k,
            "--dry-run",
        ],
        "mode 0644",
    );
    std::fs::write(
        d.join("bad.json"),
        "{\"nodes\": [{\"name\": \"a\", \"addresses\": [\"10.0.0.300\"]}]}",
    )
    .unwrap();
    assert_input_error(
        &[
            "--cluster",
            d.join("bad.json").to_str().unwrap(),
            "--node",
            "a",
        ],
        "addresses",
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
#[ignore = "needs root in a throwaway network namespace with wireguard-go; run by scripts/test-netlink.sh"]
fn second_run_reports_zero_and_dry_run_changes_nothing() {
    assert_eq!(
        std::env::var("WGMESH_TEST_BACKEND").as_deref(),
        Ok("userspace"),
        "run by scripts/test-netlink.sh"
    );
    let d = tmp("root");
    let key = d.join("key");
    let k = key.to_str().unwrap();
    let base = [
        "--cluster",
        CLUSTER,
        "--node",
        NODE,
        "--private-key",
        k,
        "--backend",
        "userspace",
        "--format",
        "json",
    ];
    let json = |args: &[&str]| -> serde_json::Value {
        let out = run(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Dry run on a clean host: reports work, changes nothing (the key is not even generated).
    let dry = json(&[&base[..], &["--dry-run"]].concat());
    assert!(dry["operations"].as_u64().unwrap() > 0);
    assert!(!key.exists());
    let again = json(&[&base[..], &["--dry-run"]].concat());
    assert_eq!(again["operations"], dry["operations"]);
    let first = json(&base);
    assert_eq!(first["operations"], dry["operations"]);
    assert_eq!(
        first["list"].as_array().unwrap().len() as u64,
        first["operations"].as_u64().unwrap()
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let second = json(&base);
    assert_eq!(second["operations"], 0);
    status_and_why_live_name_hand_made_drift(k);
    let secret = std::fs::read_to_string(&key).unwrap();
    assert!(
        !first.to_string().contains(secret.trim()),
        "the private key must never be printed"
    );
    // Tear down with a disabled mesh.
    let off = d.join("off.json");
    let text = std::fs::read_to_string(CLUSTER).unwrap().replacen(
        "\"mesh\": {",
        "\"mesh\": {\"enabled\": false, ",
        1,
    );
    std::fs::write(&off, text).unwrap();
    let down = json(&[
        "--cluster",
        off.to_str().unwrap(),
        "--node",
        NODE,
        "--private-key",
        k,
        "--backend",
        "userspace",
        "--format",
        "json",
    ]);
    assert!(down["operations"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&d);
}

/// On a host programmed with `NODE`'s plan: `status` and `why --live` report no drift and
/// exit 0; after an MTU change and a peer removed by hand (ip, wg), both exit 3 and name
/// each; an apply repairs it.
fn status_and_why_live_name_hand_made_drift(key: &str) {
    let live = [
        "--cluster",
        CLUSTER,
        "--node",
        NODE,
        "--private-key",
        key,
        "--backend",
        "userspace",
        "--format",
        "json",
    ];
    let check = |args: &[&str], code: i32| -> serde_json::Value {
        let out = wgmesh(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = check(&[&["status"], &live[..]].concat(), 0);
    assert_eq!(status["drift"], serde_json::json!([]));
    assert_eq!(status["healthy"], true);
    let mut peers: Vec<(String, String)> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap().to_owned(),
                p["endpoint"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    peers.sort();
    assert_eq!(
        peers,
        [
            (
                "aks-nodepool1-19852467-vmss000001".to_owned(),
                "10.240.0.35:51820".to_owned()
            ),
            (
                "aks-nodepool1-19852467-vmss000002".to_owned(),
                "10.240.0.64:51820".to_owned()
            )
        ]
    );
    let why = [&["why", "10.240.0.5", "10.240.0.65", "--live"], &live[..]].concat();
    let w = check(&why, 0);
    assert_eq!(w["verdict"], "encrypted");
    assert_eq!(w["drift"], serde_json::json!([]));

    // Drift by hand.
    let sh = |cmd: &[&str]| {
        let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&["ip", "link", "set", "wireguard.cali", "mtu", "1300"]);
    sh(&[
        "wg",
        "set",
        "wireguard.cali",
        "peer",
        "bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA=",
        "remove",
    ]);
    let status = check(&[&["status"], &live[..]].concat(), 3);
    assert_eq!(status["healthy"], false);
    let drift: Vec<String> = status["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    assert!(
        drift
            .iter()
            .any(|d| d.contains("mtu") && d.contains("1440")),
        "{drift:?}"
    );
    assert!(drift.iter().any(|d| d.contains("bbcKpAY+")), "{drift:?}");
    assert_eq!(
        status["missing_peers"],
        serde_json::json!(["aks-nodepool1-19852467-vmss000001 (wireguard.cali)"])
    );
    let w = check(&why, 3);
    assert_eq!(w["drift"].as_array().unwrap().len(), drift.len());
    // Text: the drift lines and the summary.
    let out = wgmesh(&[&["status"], &live[..live.len() - 2]].concat());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("drift: "), "{text}");
    assert!(text.contains("1 peers, "), "{text}");
    // An apply repairs it.
    let out = run(&live);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&[&["status"], &live[..]].concat(), 0);
}
