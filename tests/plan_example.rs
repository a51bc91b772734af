//! The README's run command: `cargo run --example plan`, its options, and its errors.
//! (`cargo test` builds the examples; these tests run the built binary.)

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn example() -> PathBuf {
    // target/<profile>/deps/plan_example-<hash> → target/<profile>/examples/plan
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

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(example())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The example may exit before reading its input (bad arguments): a broken pipe is fine.
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
fn no_arguments_prints_every_node_of_the_design_cluster() {
    let out = run(&[], None);
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
    let out = run(
        &[
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
    let all = run(&["--format=json"], None);
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
    let out = run(
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
        (node(""), vec!["--format", "xml"], "unknown format"),
        ("{".into(), vec![], "syntax"),
    ];
    for (input, extra, expected) in cases {
        let mut args = vec!["--cluster", "-"];
        args.extend(extra);
        let out = run(&args, Some(&input));
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
    let missing = run(&["--cluster", "/nonexistent/cluster.json"], None);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn findings_name_both_nodes_of_a_hostile_claim() {
    // Issue 11: b reports a's address and 8.8.8.8 as workload addresses.
    let cluster = r#"{"mesh": {"cluster_cidrs": ["10.0.0.0/16"]}, "nodes":[
      {"name":"a","addresses":["10.0.0.1"],"wireguard":{"public_key":"kt6ZjwKW9PRldGLl4ReY9SLO7xixUhVBvWdLJAIAHX8="}},
      {"name":"b","addresses":["10.0.0.2"],"wireguard":{"public_key":"UyG4eT0x90K0Aweb284VnX6DI8NsUi697KJKUaNMqkw="},"workload_ips":["10.0.0.1","8.8.8.8"]},
      {"name":"c","addresses":["10.0.0.3"],"wireguard":{"public_key":"hKl+HNs4U8n0NjPMK8t6ZGwADTIR6GEnnA5aHWLJhVQ="}}]}"#;
    let out = run(&["--cluster", "-", "--node", "c"], Some(cluster));
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
