//! No private key in the logs: a scenario runs with every log line captured at the most
//! verbose level. Alone in its test binary on purpose: `tracing` caches per call site whether
//! anyone listens, and a test running in parallel without a subscriber can make a scoped
//! subscriber miss events.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use wgmesh_core::MeshConfig;
/// Runs a scenario with every log line captured at the most verbose level, and looks for the
/// private key in them.
#[test]
fn the_private_key_is_never_logged() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let key = private(21);
    let secret_b64 = key.to_base64();
    let secret_hex = key.to_hex();
    tracing::subscriber::with_default(subscriber, || {
        let mut mesh = MeshConfig::default();
        mesh.host_encryption = true;
        let mut d = netlink_agent(mesh, key.clone());
        start_two_nodes(&mut d);
        d.node(wg_node("c", "10.0.0.3", &[], Some(public(3))));
        d.pod(pod("default", "p", "c", &["10.0.0.30"], "Running"));
        d.run_for(Duration::from_secs(100));
    });
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("netlink"), "operations are logged at debug");
    assert!(log.contains("private-key (ipv4 key, hidden)"));
    assert!(
        log.contains(&key.public_key().to_base64()),
        "public keys may be"
    );
    assert!(!log.contains(secret_b64.as_str()));
    assert!(!log.contains(secret_hex.as_str()));
    assert!(!log.contains(&secret_b64[..12]));
}
