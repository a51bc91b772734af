//! The `wgmesh` binary: `plan` (its formats and its exit-code-2 errors), `genkey` and `pubkey`,
//! `--help` and `--version`, and output that never panics; and the README's run command,
//! `cargo run --example plan`. (`cargo test` builds the binaries and the examples; these tests
//! run the built programs.)

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const SAMPLE: &str = "examples/clusters/aks-azure-cni.json";

fn example() -> PathBuf {
    // target/<profile>/deps/cli-<hash> → target/<profile>/examples/plan
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples").join("plan");
    assert!(
        path.exists(),
        "{} missing: cargo test builds examples; run through cargo test",
        path.display()
    );
    path
}

fn wgmesh(args: &[&str], stdin: Option<&str>) -> Output {
    spawn(Command::new(env!("CARGO_BIN_EXE_wgmesh")).args(args), stdin)
}

fn plan(args: &[&str], stdin: Option<&str>) -> Output {
    let mut all = vec!["plan"];
    all.extend(args);
    wgmesh(&all, stdin)
}

fn spawn(command: &mut Command, stdin: Option<&str>) -> Output {
    let mut child = command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The program may exit before reading its input (bad arguments): a broken pipe is fine.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes());
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_example_prints_every_node_of_the_design_cluster() {
    let out = spawn(&mut Command::new(example()), None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert_eq!(s.matches("interface: wireguard.cali").count(), 3);
    assert!(s.contains("allowed ips: 10.240.0.64/32, 10.240.0.65/32, 10.240.0.66/32"));
    let bad = spawn(Command::new(example()).arg("/nonexistent.json"), None);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(text(&bad.stderr).lines().count(), 1);
}

#[test]
fn plan_prints_every_node_of_the_design_cluster() {
    let out = plan(&["--cluster", SAMPLE], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert_eq!(s.matches("interface: wireguard.cali").count(), 3);
    for node in ["vmss000000", "vmss000001", "vmss000002"] {
        assert!(
            s.contains(&format!("node: aks-nodepool1-19852467-{node}")),
            "{node}"
        );
    }
    assert!(s.contains("allowed ips: 10.240.0.64/32, 10.240.0.65/32, 10.240.0.66/32"));
    assert!(s.contains("allowed ips: 10.240.0.4/32, 10.240.0.5/32, 10.240.0.6/32"));
    assert!(s.contains("fwmark: 0x100000"));
    assert!(s.contains("private key: (hidden)"));
}

#[test]
fn json_for_one_node() {
    let out = plan(
        &[
            "--cluster",
            SAMPLE,
            "--node",
            "aks-nodepool1-19852467-vmss000001",
            "--format",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"], "aks-nodepool1-19852467-vmss000001");
    assert_eq!(v["interfaces"][0]["mtu"], 1440);
    assert_eq!(v["routes"].as_array().unwrap().len(), 9);
    let all = plan(&["--cluster", SAMPLE, "--format=json"], None);
    let v: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
}

#[test]
fn wg_format_and_yaml_from_stdin() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/clusters/mixed-dual-stack.yaml"
    ))
    .unwrap();
    let out = plan(
        &["--cluster", "-", "--node", "worker-1", "--format", "wg"],
        Some(&yaml),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("[Interface]\nListenPort = 51820\nFwMark = 0x100000\n"),
        "{s}"
    );
    assert!(s.contains("Endpoint = [fd00:10::11]:51821"));
    assert!(s.contains("PersistentKeepalive = 25"));
    assert!(!s.contains("PrivateKey ="));
}

#[test]
fn bad_input_exits_2_with_one_line_naming_node_and_field() {
    let node = |extra: &str| format!(r#"{{"nodes": [{{"name": "n1"{extra}}}]}}"#);
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            node(r#", "wireguard": {"public_key": "bogus"}"#),
            vec![],
            r#"node "n1": wireguard.public_key = "bogus""#,
        ),
        (
            node(r#", "pod_cidrs": ["10.0.0.0/40"]"#),
            vec![],
            r#"node "n1": pod_cidrs[0] = "10.0.0.0/40""#,
        ),
        (
            node(r#", "addresses": ["10.0.0"]"#),
            vec![],
            r#"node "n1": addresses[0] = "10.0.0""#,
        ),
        (
            r#"{"mesh": {"listen_port": 0}}"#.into(),
            vec![],
            "mesh: listen_port",
        ),
        (r#"{"mesh": {"mtu": 20}}"#.into(), vec![], "mesh: mtu"),
        (
            r#"{"mesh": {"route_source": "bgp"}}"#.into(),
            vec![],
            "mesh: route_source",
        ),
        (
            r#"{"nodes": [{"name": "a"}, {"name": "a"}]}"#.into(),
            vec![],
            "nodes[1]: name = \"a\": duplicate node name",
        ),
        (
            node(""),
            vec!["--node", "ghost"],
            r#"node "ghost" is not in the cluster"#,
        ),
        (
            node(""),
            vec!["--format", "xml"],
            "invalid value 'xml' for '--format <FORMAT>'",
        ),
        (node(""), vec!["--bogus"], "unexpected argument '--bogus'"),
        ("{".into(), vec![], "syntax"),
    ];
    for (input, extra, expected) in cases {
        let mut args = vec!["--cluster", "-"];
        args.extend(extra);
        let out = plan(&args, Some(&input));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{input}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(expected),
            "{input}\n got: {err}\n want: {expected}"
        );
        assert!(!err.contains("panicked"));
        assert!(out.stdout.is_empty());
    }
    for args in [
        &["--cluster", "/nonexistent/cluster.json"][..],
        &[],
        &["--cluster", "/dev/zero"],
    ] {
        let out = plan(args, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    assert!(text(&plan(&[], None).stderr).contains("a cluster is required: --cluster FILE"));
    assert!(text(&plan(&["--cluster", "/dev/zero"], None).stderr).contains("larger than 256 MiB"));
}

#[test]
fn help_and_version_exit_0_and_mistakes_exit_2_with_one_line() {
    for args in [
        &["--help"][..],
        &["plan", "--help"],
        &["genkey", "--help"],
        &["help", "plan"],
    ] {
        let out = wgmesh(args, None);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("Usage: wgmesh"), "{args:?}");
    }
    for args in [&["--version"][..], &["plan", "--version"]] {
        let out = wgmesh(args, None);
        assert_eq!(out.status.code(), Some(0));
        let version = text(&out.stdout);
        assert!(version.starts_with("wgmesh"), "{version}");
        assert!(
            version.contains(&format!(" {} ", env!("CARGO_PKG_VERSION")))
                || version.ends_with(&format!(" {}\n", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
    }
    for args in [&["--bogus"][..], &["bogus"], &["plan", "--format"]] {
        let out = wgmesh(args, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.ends_with("(see --help)\n"),
            "{err}"
        );
    }
}

#[test]
fn a_version_built_in_git_names_its_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let Some(head) = head.ok().filter(|o| o.status.success()) else {
        eprintln!("not in a git work tree (or no git): the version has no commit to name");
        return;
    };
    let version = text(&wgmesh(&["--version"], None).stdout);
    let commit = text(&head.stdout).trim().to_owned();
    assert!(version.contains(&format!("(commit {commit})")), "{version}");
}

#[test]
fn output_never_panics() {
    // A reader that goes away: quiet success, as `cat` under SIGPIPE's default would end.
    let mut child = Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .args(["plan", "--cluster", SAMPLE])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    // A full disk: an error, exit 1, one line.
    let full = std::fs::File::create("/dev/full").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .args(["plan", "--cluster", SAMPLE])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(full)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: cannot write the output: "), "{err}");
    // An argument that is not UTF-8: a usage error, not a panic.
    use std::os::unix::ffi::OsStrExt as _;
    let out = Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .args(["plan", "--node"])
        .arg(std::ffi::OsStr::from_bytes(b"\xff\xfe"))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn genkey_and_pubkey() {
    let out = wgmesh(&["genkey"], None);
    assert!(out.status.success());
    let private = text(&out.stdout);
    assert_eq!(private.len(), 45, "{private:?}");
    assert!(private.ends_with('\n'));
    let key = wgmesh::core::PrivateKey::from_base64(private.trim()).unwrap();
    let out = wgmesh(&["pubkey"], Some(&private));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", key.public_key()));
    // Two calls, two keys.
    assert_ne!(text(&wgmesh(&["genkey"], None).stdout), private);
    let bad = wgmesh(&["pubkey"], Some("not a key\n"));
    assert_eq!(bad.status.code(), Some(2));
    let err = text(&bad.stderr);
    assert!(
        err.starts_with("error: standard input: not a private key"),
        "{err}"
    );
    assert!(
        !err.contains("not a key\n"),
        "the input is never echoed: {err}"
    );
}

/// `wgmesh genkey` and `wgmesh pubkey` against wg(8) itself. `scripts/test-all` runs it.
#[test]
#[ignore = "needs wg(8) (wireguard-tools); scripts/test-all runs it"]
fn keys_match_wg() {
    let wg = |args: &[&str], stdin: Option<&str>| spawn(Command::new("wg").args(args), stdin);
    let ours = text(&wgmesh(&["genkey"], None).stdout);
    let theirs = text(&wg(&["genkey"], None).stdout);
    for private in [&ours, &theirs] {
        let a = wgmesh(&["pubkey"], Some(private));
        let b = wg(&["pubkey"], Some(private));
        assert!(a.status.success() && b.status.success());
        assert_eq!(text(&a.stdout), text(&b.stdout));
    }
}

#[test]
fn findings_name_both_nodes_of_a_hostile_claim() {
    // Issue 11: b reports a's address and 8.8.8.8 as workload addresses.
    let cluster = r#"{"mesh": {"cluster_cidrs": ["10.0.0.0/16"]}, "nodes":[
      {"name":"a","addresses":["10.0.0.1"],"wireguard":{"public_key":"kt6ZjwKW9PRldGLl4ReY9SLO7xixUhVBvWdLJAIAHX8="}},
      {"name":"b","addresses":["10.0.0.2"],"wireguard":{"public_key":"UyG4eT0x90K0Aweb284VnX6DI8NsUi697KJKUaNMqkw="},"workload_ips":["10.0.0.1","8.8.8.8"]},
      {"name":"c","addresses":["10.0.0.3"],"wireguard":{"public_key":"hKl+HNs4U8n0NjPMK8t6ZGwADTIR6GEnnA5aHWLJhVQ="}}]}"#;
    let out = plan(&["--cluster", "-", "--node", "c"], Some(cluster));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains(r#"node "b": workload_ips 10.0.0.1/32 refused: it covers 10.0.0.1, an address of node "a""#),
        "{s}"
    );
    assert!(
        s.contains(r#"node "b": workload_ips 8.8.8.8/32 refused: it is outside cluster_cidrs"#)
    );
    assert!(s.contains("throw 8.8.8.8/32 table 1") && s.contains("throw 10.0.0.1/32 table 1"));
    assert!(!s.contains("allowed ips: 8.8.8.8/32"));
}
