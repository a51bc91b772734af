//! The health and metrics endpoint over a real loopback socket.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wgmesh_k8s::http::{Routes, bind, serve};
use wgmesh_k8s::metrics::{AgentState, ApplyKind, Metrics};

async fn ask(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn serves_metrics_health_and_readiness_and_refuses_junk() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(addr.ip().is_loopback());
    let metrics = Metrics::new();
    let server = tokio::spawn(serve(
        listener,
        metrics.clone(),
        Duration::from_secs(300),
        Routes::All,
    ));

    // Not started: not alive, not ready.
    let (code, _, _) = ask(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(code, 503);
    let (code, _, body) = ask(addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
    assert_eq!(code, 503);
    assert_eq!(body, "not synced with the API server yet\n");

    metrics.heartbeat(Instant::now());
    metrics.reconciled(ApplyKind::Full, true, 0.02);
    let mut state = AgentState::default();
    state.synced = true;
    state.applied = true;
    state.key_published = true;
    metrics.set_state(state);
    metrics.set_peers([("wireguard.cali".to_owned(), 2)]);
    let (code, _, body) = ask(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _, body) = ask(addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, head, body) = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(code, 200);
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(head.contains(&format!("Content-Length: {}", body.len())));
    assert!(body.contains("wgmesh_peers{interface=\"wireguard.cali\"} 2\n"));
    assert!(body.contains("wgmesh_reconciles_total{kind=\"full\",result=\"ok\"} 1\n"));
    assert!(body.contains("wgmesh_ready 1\n"));
    // Every sample line is `name{labels} value` or `name value`, after HELP and TYPE.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
    }

    let (code, _, body) = ask(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!((code, body.as_str()), (200, ""));
    assert_eq!(ask(addr, b"GET /nope HTTP/1.1\r\n\r\n").await.0, 404);
    assert_eq!(ask(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.0, 405);
    assert_eq!(ask(addr, b"GARBAGE\r\n\r\n").await.0, 400);
    assert_eq!(ask(addr, b"\xff\xfe\xfd\r\n\r\n").await.0, 400);
    let huge = vec![b'a'; 9000];
    assert_eq!(ask(addr, &huge).await.0, 431);
    // A client that connects and says nothing does not hold the server up.
    let _idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(ask(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await.0, 200);
    server.abort();
}

#[test]
fn handshake_timestamps_and_byte_counters_are_rendered_per_peer_unless_turned_off() {
    use std::time::SystemTime;
    use wgmesh_core::PublicKey;
    use wgmesh_k8s::metrics::PeerRow;
    use wgmesh_netlink::PeerStats;
    let metrics = Metrics::new();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let key = PublicKey::from_base64("QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=").unwrap();
    let a = PeerRow::new(
        "node-b",
        PeerStats::new(
            "wireguard.cali",
            key,
            Some(now - Duration::from_secs(42)),
            1234,
            5678,
        ),
    );
    let b = PeerRow::new("node-c", PeerStats::new("wireguard.cali", key, None, 0, 0));
    metrics.set_peer_rows(vec![a, b]);
    let text = metrics.render();
    let labels_b = "interface=\"wireguard.cali\",node=\"node-b\",public_key=\"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=\"";
    assert!(
        text.contains(&format!(
            "wgmesh_peer_last_handshake_timestamp_seconds{{{labels_b}}} 999958\n"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "wgmesh_peer_receive_bytes_total{{{labels_b}}} 1234\n"
    )));
    assert!(text.contains(&format!(
        "wgmesh_peer_transmit_bytes_total{{{labels_b}}} 5678\n"
    )));
    assert!(text.contains(
        "_timestamp_seconds{interface=\"wireguard.cali\",node=\"node-c\",public_key=\"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=\"} 0\n"
    ), "never: 0");
    assert!(!text.contains("age_seconds"));
    metrics.set_per_peer(false);
    let text = metrics.render();
    assert!(
        !text.contains("node-b") && !text.contains("wgmesh_peer_"),
        "{text}"
    );
    assert!(text.contains("wgmesh_build_info{version=\"\",revision=\"\"} 1\n"));
}

/// Idle connections from the host cannot starve the kubelet's probe (a liveness restart
/// loop): 32, and then 100, connections that say nothing, and `/healthz` still answers.
#[tokio::test]
async fn idle_connections_cannot_starve_the_probe() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    metrics.heartbeat(Instant::now());
    let server = tokio::spawn(serve(
        listener,
        metrics.clone(),
        Duration::from_secs(300),
        Routes::All,
    ));
    for idle in [32, 100] {
        let mut held = Vec::new();
        for _ in 0..idle {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them all before the probe arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            ask(addr, b"GET /healthz HTTP/1.1\r\n\r\n"),
        )
        .await
        .expect("the probe is answered while idle connections are open");
        assert_eq!(probe.0, 200, "with {idle} idle connections");
        drop(held);
    }
    server.abort();
}

#[test]
fn strict_drop_counters_are_rendered_per_direction_and_family_while_installed() {
    let metrics = Metrics::new();
    assert!(!metrics.render().contains("wgmesh_strict_dropped"));
    metrics.set_strict_drops(Some(wgmesh_netlink::marking::StrictDrops {
        ingress_v4: 7,
        ingress_v6: 2,
    }));
    let text = metrics.render();
    assert!(
        text.contains("# TYPE wgmesh_strict_dropped_packets_total counter\n"),
        "{text}"
    );
    assert!(text.contains(
        "wgmesh_strict_dropped_packets_total{direction=\"ingress\",family=\"ipv4\"} 7\n"
    ));
    assert!(text.contains(
        "wgmesh_strict_dropped_packets_total{direction=\"ingress\",family=\"ipv6\"} 2\n"
    ));
    metrics.set_strict_drops(None);
    assert!(!metrics.render().contains("wgmesh_strict_dropped"));
}
