//! The netlink answer parsers under the fuzz driver; `WGMESH_FUZZ_SECONDS` sets the budget
//! (see the crate documentation). The corpus is recorded from the fake kernel (whose answers
//! are pinned to Linux 6.1's by wgmesh-netlink's golden tests) and from the nlmon capture of
//! Linux 6.1 in `wgmesh-netlink/testdata/`: `WGMESH_FUZZ_RECORD=1 cargo test -p wgmesh-fuzz
//! --test netlink -- --ignored` writes it again.

use std::io;

use wgmesh_fuzz::targets::{NETLINK, ScriptedKernel, netlink_conversation};
use wgmesh_netlink::testing::FakeKernel;
use wgmesh_netlink::{KernelIo, Protocol};

#[test]
fn netlink() {
    wgmesh_fuzz::test(&NETLINK);
}

/// The fake kernel, keeping every datagram it answers, in the target's script format.
struct Recorder {
    kernel: FakeKernel,
    script: Vec<u8>,
}

impl KernelIo for Recorder {
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> io::Result<()> {
        self.kernel.send(protocol, datagram)
    }

    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> io::Result<()> {
        self.kernel.recv(protocol, buf)?;
        let len = u16::try_from(buf.len()).map_err(io::Error::other)?;
        self.script.extend_from_slice(&len.to_le_bytes());
        self.script.extend_from_slice(buf);
        Ok(())
    }

    fn read_sysctl(&mut self, key: &str) -> io::Result<Option<String>> {
        self.kernel.read_sysctl(key)
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> io::Result<()> {
        self.kernel.write_sysctl(key, value)
    }
}

/// The script of the conversation with `kernel`, and the kernel after it.
fn record(kernel: FakeKernel) -> (Vec<u8>, FakeKernel) {
    let mut r = Recorder {
        kernel,
        script: Vec::new(),
    };
    netlink_conversation(&mut r).expect("the fake kernel's conversation succeeds");
    (r.script, r.kernel)
}

/// A recorded conversation replays through the scripted kernel to the same end: the target
/// really reaches the parsers (a script that fed nothing to them would end in an error).
#[test]
fn recorded_conversations_replay() {
    let (fresh, _) = record(FakeKernel::new());
    netlink_conversation(ScriptedKernel::new(&fresh)).expect("replay of a fresh host");
    // One byte short: the conversation ends with an error, not a panic or a hang.
    assert!(netlink_conversation(ScriptedKernel::new(&fresh[..fresh.len() - 1])).is_err());
}

#[test]
#[ignore = "writes fuzz/corpus/netlink/ (WGMESH_FUZZ_RECORD=1)"]
fn record_corpus() {
    if std::env::var_os("WGMESH_FUZZ_RECORD").is_none() {
        println!("skipped: set WGMESH_FUZZ_RECORD=1 to write the corpus");
        return;
    }
    let dir = wgmesh_fuzz::root().join("corpus/netlink");
    std::fs::create_dir_all(&dir).unwrap();
    // A fresh host, then the same host with the plan applied (full dumps of links,
    // addresses, routes, rules, the device and the tables).
    let (fresh, applied) = record(FakeKernel::new());
    std::fs::write(dir.join("00-fresh-host"), &fresh).unwrap();
    let (steady, _) = record(applied);
    std::fs::write(dir.join("01-applied-host"), &steady).unwrap();
    // The Linux 6.1 answers of the nlmon capture, one script per window.
    let capture = std::fs::read_to_string(
        wgmesh_fuzz::root().join("../wgmesh-netlink/testdata/nlmon-linux-6.1.txt"),
    )
    .unwrap();
    let mut windows: Vec<(String, Vec<u8>)> = Vec::new();
    for line in capture.lines().filter(|l| !l.starts_with('#')) {
        let mut parts = line.split(' ');
        let (Some(window), Some("ans"), Some(hex)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        // nlmon frames start with the netlink header: the datagram as the socket reads it.
        let len = u16::try_from(bytes.len()).unwrap();
        match windows.iter_mut().find(|(w, _)| w == window) {
            Some((_, s)) => {
                s.extend_from_slice(&len.to_le_bytes());
                s.extend_from_slice(&bytes);
            }
            None => {
                let mut s = len.to_le_bytes().to_vec();
                s.extend_from_slice(&bytes);
                windows.push((window.to_owned(), s));
            }
        }
    }
    for (i, (window, script)) in windows.iter().enumerate() {
        std::fs::write(
            dir.join(format!("{:02}-linux-6.1-{window}", 10 + i)),
            script,
        )
        .unwrap();
    }
}
