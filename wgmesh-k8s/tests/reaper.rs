//! Reaping exited children, as the agent does when it is its container's PID 1. In a binary
//! of its own: reaping every child would race the other tests' `Command`s.

use std::process::Command;
use std::time::{Duration, Instant};

use wgmesh_k8s::run::{reap_exited_children, reap_orphans_if_init};

/// The state letter and parent pid of a process, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(") ")?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

#[test]
fn an_orphaned_daemon_that_exits_is_reaped() {
    let me = rustix::process::getpid();
    // Stand in for PID 1: orphans of our descendants are re-parented to us, as they are to a
    // container's init.
    rustix::process::set_child_subreaper(Some(me)).unwrap();
    // A launcher that forks a daemon into the background and exits, as wireguard-go does.
    let out = Command::new("sh")
        .args(["-c", "sleep 0.5 </dev/null >/dev/null 2>&1 & echo $!"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let daemon: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        stat(daemon).map(|s| s.1),
        Some(me.as_raw_nonzero().get()),
        "the daemon is our child now"
    );
    // Once it exits it stays a zombie, until reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stat(daemon).map(|s| s.0) != Some('Z') {
        assert!(Instant::now() < deadline, "{:?}", stat(daemon));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stat(daemon).map(|s| s.0), Some('Z'), "nobody else reaps it");
    assert_eq!(reap_exited_children(), [daemon]);
    assert_eq!(stat(daemon), None, "gone");
    // Nothing is left to reap, and that is not an error.
    assert!(reap_exited_children().is_empty());
}

#[test]
fn the_reaper_runs_only_as_pid_1() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // A test is never PID 1: the reaper returns at once instead of looping.
    assert!(!rustix::process::getpid().is_init());
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            reap_orphans_if_init(Duration::from_millis(10)),
        )
        .await
        .expect("returned at once");
    });
}
