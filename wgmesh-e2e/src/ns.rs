//! Network namespaces: creation, threads that live in them, and guaranteed teardown.
//!
//! Every namespace this harness creates is named `wge2e-<pid>-…` and recorded in a
//! process-wide registry *before* it exists. It goes away again through one of:
//!
//! - the `Drop` of its owner (normal end, `?` errors, and panics, which unwind);
//! - the Ctrl-C / SIGTERM / SIGHUP handler ([`install_signal_handler`]), which tears down
//!   everything in the registry and exits with 130;
//! - [`sweep_stale`], which removes namespaces left by harness processes that no longer run
//!   (a `SIGKILL`ed run cannot clean up after itself).
//!
//! Tearing a namespace down first kills the processes that live in it (wireguard-go daemons),
//! by pid, found by comparing `/proc/PID/ns/net` with the namespace, then deletes it; the
//! kernel removes its links with it.
//!
//! Threads, not processes, enter namespaces: `setns(2)` moves only the calling thread, and a
//! socket (netlink, nftables, UDP, raw ICMP) stays in the namespace of the thread that created
//! it; `/proc/sys/net` shows the namespace of the thread that opens it, and a spawned process
//! starts in the namespace of the thread that spawns it.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The prefix of every namespace name this harness creates.
pub const PREFIX: &str = "wge2e-";

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Where userspace WireGuard implementations put their configuration sockets (shared by all
/// namespaces: it is a path in the file system, not a network object).
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

#[derive(Default)]
struct Registry {
    namespaces: BTreeSet<String>,
    sockets: BTreeSet<PathBuf>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut guard = match registry().lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    f(&mut guard)
}

/// Records a userspace WireGuard socket path to remove at teardown if its daemon left it.
pub fn register_socket(path: PathBuf) {
    with_registry(|r| r.sockets.insert(path));
}

/// Tears down every namespace and socket in the registry (what the signal handler does).
pub fn teardown_all() {
    let (namespaces, sockets) = with_registry(|r| {
        (
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.sockets),
        )
    });
    for name in namespaces.iter().rev() {
        let _ = destroy(name);
    }
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
}

/// Installs (once per process) a handler for SIGINT, SIGTERM and SIGHUP that tears down
/// everything this harness created and exits with status 130.
pub fn install_signal_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                eprintln!("wgmesh-e2e: interrupted; tearing down the namespaces");
                teardown_all();
                std::process::exit(130);
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::new(format!("installing the signal handler: {e}")))
}

/// Names of this harness's namespaces that exist now (any process's).
pub fn existing() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    out.sort();
    out
}

/// Removes namespaces left behind by harness processes that no longer run. Returns their names.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in existing() {
        let pid = name[PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && destroy(&name).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// A fresh, unique namespace name: `wge2e-<pid>-<tag>-<role>`.
pub fn unique_name(tag: &str, role: &str) -> String {
    format!("{PREFIX}{}-{tag}-{role}", std::process::id())
}

/// Runs a command and returns its stdout; a non-zero exit is an error naming the command.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::new(format!("{program} {}: {e}", args.join(" "))))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| Error::new(format!("{program}: writing stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::new(format!("{program}: {e}")))?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The inode of a namespace file (`/run/netns/NAME` or `/proc/PID/ns/net`).
fn ns_inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Pids of the processes whose network namespace is the one at `path`.
fn pids_in(path: &Path) -> Vec<i32> {
    let Some(ino) = ns_inode(path) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| ns_inode(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(ino))
        .collect()
}

fn kill(pid: i32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Kills the processes in a namespace (TERM, then KILL after 2 s) and deletes it.
pub fn destroy(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let pids = pids_in(&path);
    for pid in &pids {
        kill(*pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pids_in(&path).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for pid in pids_in(&path) {
        kill(pid, rustix::process::Signal::KILL);
    }
    let result = if path.exists() {
        run("ip", &["netns", "del", name], None).map(|_| ())
    } else {
        Ok(())
    };
    with_registry(|r| r.namespaces.remove(name));
    result
}

/// A named network namespace that this harness created; deleted (with its processes) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (registered for teardown before it exists), with `lo` up,
    /// IPv6 duplicate address detection off (addresses are usable at once) and the given
    /// sysctls.
    pub fn create(name: &str) -> Result<Self> {
        if name.len() > 200 || name.contains('/') {
            return Err(Error::new(format!("bad namespace name {name:?}")));
        }
        with_registry(|r| r.namespaces.insert(name.to_owned()));
        let ns = Self {
            name: name.to_owned(),
        };
        run("ip", &["netns", "add", name], None)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctls(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
        Ok(ns)
    }

    /// Its name (under `/run/netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> Result<()> {
        enter_path(&self.path())
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = self.path();
        thread::scope(|s| {
            s.spawn(|| {
                enter_path(&path)?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::new(format!("a thread in namespace {} panicked", self.name)))?
        })
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// `ip -n NAME -batch -` with one command per line.
    pub fn ip_batch(&self, script: &str) -> Result<()> {
        run("ip", &["-n", &self.name, "-batch", "-"], Some(script)).map(|_| ())
    }

    /// Runs `PROGRAM ARGS…` in this network namespace, with `stdin`: spawned from a thread
    /// inside it (cheaper than `ip netns exec`, which also remounts `/sys`; that matters under
    /// emulation).
    pub fn exec(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        self.run_in(|| run(program, args, stdin))?
    }

    /// Writes sysctls (dotted keys) in this namespace.
    pub fn sysctls(&self, pairs: &[(&str, &str)]) -> Result<()> {
        self.run_in(|| {
            for (key, value) in pairs {
                write_sysctl(key, value)?;
            }
            Ok(())
        })?
    }

    /// Reads a sysctl in this namespace.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        self.run_in(|| {
            let path = sysctl_path(key);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| Error::new(format!("reading {}: {e}", path.display())))
        })?
    }

    /// Pids of the processes living in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.path())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!("wgmesh-e2e: teardown of namespace {}: {e}", self.name);
        }
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Writes a sysctl in the calling thread's network namespace.
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, value)
        .map_err(|e| Error::new(format!("writing {value} to {}: {e}", path.display())))
}

fn enter_path(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| Error::new(format!("setns into {}: {e}", path.display())))
}

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A worker's periodic work: how often, and what.
pub type Tick<S> = (Duration, fn(&mut S));

/// A thread that lives in one namespace and owns a state `S` built there (a node's
/// reconciler: its sockets, the daemons it spawns and the sysctls it writes all belong to the
/// namespace). Jobs run one at a time, in order.
pub struct Worker<S> {
    name: String,
    tx: Option<mpsc::Sender<Job<S>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl<S: 'static> Worker<S> {
    /// Starts the thread in `ns` and builds the state there with `init`.
    pub fn start(ns: &Netns, init: impl FnOnce() -> Result<S> + Send + 'static) -> Result<Self> {
        Self::start_ticking(ns, init, None)
    }

    /// Like [`Self::start`], and between jobs calls `tick` on the state about every `period`
    /// (an agent's timers: the crossing-initiation watchdog).
    pub fn start_ticking(
        ns: &Netns,
        init: impl FnOnce() -> Result<S> + Send + 'static,
        tick: Option<Tick<S>>,
    ) -> Result<Self> {
        let path = ns.path();
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let handle = thread::Builder::new()
            .name(format!("ns:{}", ns.name()))
            .spawn(move || {
                let state = enter_path(&path).and_then(|()| init());
                let mut state = match state {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let Some((period, tick)) = tick else {
                    for job in rx {
                        job(&mut state);
                    }
                    return;
                };
                let mut last = Instant::now();
                loop {
                    match rx.recv_timeout(period.saturating_sub(last.elapsed())) {
                        Ok(job) => job(&mut state),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if last.elapsed() >= period {
                        tick(&mut state);
                        last = Instant::now();
                    }
                }
            })
            .map_err(|e| Error::new(format!("spawning a thread: {e}")))?;
        let worker = Self {
            name: ns.name().to_owned(),
            tx: Some(tx),
            handle: Some(handle),
        };
        ready_rx
            .recv()
            .map_err(|_| Error::new(format!("worker in {} died while starting", ns.name())))??;
        Ok(worker)
    }

    /// Runs `f` on the worker with its state and returns the result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        let job: Job<S> = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.tx
            .as_ref()
            .ok_or_else(|| Error::new("worker stopped"))?
            .send(job)
            .map_err(|_| Error::new(format!("worker in {} is gone", self.name)))?;
        rx.recv()
            .map_err(|_| Error::new(format!("worker in {} panicked", self.name)))
    }
}

impl<S> Drop for Worker<S> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
