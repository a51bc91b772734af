//! Userspace WireGuard (wireguard-go, boringtun): starting and supervising the daemon, and the
//! configuration socket `/var/run/wireguard/<iface>.sock` it serves. The text protocol itself
//! is the pure codec in `uapi`; this module only moves its bytes.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::error::{ECHILD, Error, Result};
use crate::state::{ActualDevice, PeerStats};
use crate::uapi::{self, ReplyError};

/// How the daemons are found and started.
#[derive(Debug, Clone)]
pub(crate) struct Userspace {
    /// The program started when a device is missing (run as `PROGRAM IFNAME`).
    pub(crate) program: PathBuf,
    /// Where the daemons put their sockets.
    pub(crate) socket_dir: PathBuf,
    /// How long to wait for a started daemon's socket.
    pub(crate) daemon_timeout: Duration,
    /// How long one read of a reply may take.
    pub(crate) reply_timeout: Duration,
}

fn reply_error(doing: String, e: ReplyError) -> Error {
    match e {
        ReplyError::Errno(errno) => Error::Userspace { doing, errno },
        ReplyError::Decode(d) => Error::decode(doing, d),
    }
}

impl Userspace {
    /// The socket of an interface.
    pub(crate) fn socket_path(&self, ifname: &str) -> PathBuf {
        self.socket_dir.join(format!("{ifname}.sock"))
    }

    fn transact(&self, path: &Path, request: &str, doing: &str) -> Result<Zeroizing<String>> {
        let mut s = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("{doing}: connect {}", path.display()), e))?;
        let _ = s.set_read_timeout(Some(self.reply_timeout));
        s.write_all(request.as_bytes())
            .map_err(|e| Error::io(format!("{doing}: write {}", path.display()), e))?;
        let mut r = BufReader::new(s);
        let mut out = Zeroizing::new(String::new());
        let mut line = Zeroizing::new(String::new());
        loop {
            line.clear();
            let n = r
                .read_line(&mut line)
                .map_err(|e| Error::io(format!("{doing}: read {}", path.display()), e))?;
            if n == 0 || line.as_str() == "\n" {
                break;
            }
            out.push_str(&line);
        }
        Ok(out)
    }

    /// Reads a device's configuration; `Ok(None)` when there is no socket (no device).
    pub(crate) fn get(&self, ifname: &str) -> Result<Option<ActualDevice>> {
        self.get_parsed(ifname, "", uapi::parse_get)
    }

    /// Reads a device's peer counters; `Ok(None)` when there is no socket (no device).
    pub(crate) fn get_stats(&self, ifname: &str) -> Result<Option<Vec<PeerStats>>> {
        self.get_parsed(ifname, " counters", |reply| {
            uapi::parse_stats(reply, ifname)
        })
    }

    fn get_parsed<T>(
        &self,
        ifname: &str,
        what: &str,
        parse: impl FnOnce(&str) -> std::result::Result<T, ReplyError>,
    ) -> Result<Option<T>> {
        let path = self.socket_path(ifname);
        if !path.exists() {
            return Ok(None);
        }
        let doing = format!("read userspace WireGuard device {ifname}{what}");
        let reply = match self.transact(&path, "get=1\n\n", &doing) {
            Ok(r) => r,
            // A stale socket of a daemon that is gone: no device.
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        parse(&reply).map(Some).map_err(|e| reply_error(doing, e))
    }

    /// Sends a `set=1` request to the daemon of `ifname`.
    pub(crate) fn set(&self, ifname: &str, request: &str, doing: &str) -> Result<()> {
        let reply = self.transact(&self.socket_path(ifname), request, doing)?;
        uapi::parse_set(&reply).map_err(|e| reply_error(doing.to_owned(), e))
    }

    /// Starts the daemon of `ifname` and waits for its socket to answer.
    pub(crate) fn start(&self, ifname: &str) -> Result<()> {
        // The name is the daemon's only argument: never let it read as a flag.
        crate::error::check_interface_name(ifname)?;
        let doing = format!("start {} {ifname}", self.program.display());
        // The daemon forks into the background; its banner and errors are kept for the
        // error message only.
        let out = match Command::new(&self.program)
            .arg(ifname)
            .env_remove("WG_PROCESS_FOREGROUND")
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(out) => Some(out),
            // An init process (an agent that is its container's PID 1) may have reaped the
            // launcher before its status was read; the socket below tells whether it worked.
            Err(e) if e.raw_os_error() == Some(ECHILD) => None,
            Err(e) => return Err(Error::io(&doing, e)),
        };
        if let Some(out) = out.filter(|o| !o.status.success()) {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(Error::io(
                doing,
                std::io::Error::other(format!("exited with {}: {last}", out.status)),
            ));
        }
        let start = Instant::now();
        while self.get(ifname).ok().flatten().is_none() {
            if start.elapsed() > self.daemon_timeout {
                return Err(Error::io(
                    doing,
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no socket at {}", self.socket_path(ifname).display()),
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name starting with `-` never reaches the daemon as a flag (nor do other names the
    /// kernel would refuse): the program is not even run (here it does not exist, so running
    /// it would be an `Io` error instead).
    #[test]
    fn names_that_read_as_flags_never_reach_the_daemon() {
        let u = Userspace {
            program: PathBuf::from("/nonexistent/wireguard-go"),
            socket_dir: PathBuf::from("/nonexistent"),
            daemon_timeout: Duration::from_millis(10),
            reply_timeout: Duration::from_millis(10),
        };
        for name in [
            "-f",
            "--foreground",
            "-",
            "",
            "a/b",
            "a b",
            "sixteen-bytes-xx",
        ] {
            match u.start(name) {
                Err(Error::InvalidInterfaceName { .. }) => {}
                other => panic!("{name:?}: {other:?}"),
            }
        }
        assert!(matches!(u.start("wg0"), Err(Error::Io { .. })));
    }
}
