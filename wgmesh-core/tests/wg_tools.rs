//! Keys against wg(8) itself: `wg genkey` private keys give our public key exactly as
//! `wg pubkey` does, and our generated keys are read by `wg pubkey` the same way.
//! Needs wireguard-tools; `scripts/test-all` installs it and runs this with `--ignored`.

use std::io::Write as _;
use std::process::{Command, Stdio};

use wgmesh_core::PrivateKey;

fn wg(args: &[&str], input: &str) -> String {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg(8) is required: apt-get install wireguard-tools");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "wg {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
#[ignore = "needs wg(8) (wireguard-tools); run by scripts/test-all"]
fn keys_match_wg_genkey_and_wg_pubkey() {
    for _ in 0..16 {
        let private = wg(&["genkey"], "");
        let ours = PrivateKey::from_base64(&private).unwrap();
        assert_eq!(ours.to_base64().as_str(), private);
        assert_eq!(ours.public_key().to_base64(), wg(&["pubkey"], &private));

        let generated = PrivateKey::generate();
        let text = generated.to_base64();
        assert_eq!(generated.public_key().to_base64(), wg(&["pubkey"], &text));
    }
}
