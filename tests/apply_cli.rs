//! `wgmesh apply`: bad input exits with code 2 and one line (never a panic); as root, a first
//! run applies, a second reports 0 operations, and `--dry-run` changes nothing.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .arg("apply")
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
