//! The IO boundary of the [`Linux`](crate::Linux) dataplane: netlink datagrams in and out,
//! and sysctls. [`Sockets`] is the host's; `testing::FakeKernel` answers the same bytes in
//! memory. Everything above this trait — lowering, encoding, parsing, pipelining — is the
//! same code for both.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_NETFILTER, NETLINK_ROUTE};
use netlink_sys::{Socket, SocketAddr};

use crate::wire::Protocol;

/// What the executor needs of a kernel: netlink datagrams and sysctls.
///
/// ```
/// use std::io;
/// use wgmesh_netlink::{KernelIo, Protocol};
/// /// A kernel that never answers.
/// struct Silent;
/// impl KernelIo for Silent {
///     fn send(&mut self, _: Protocol, _: &[u8]) -> io::Result<()> { Ok(()) }
///     fn recv(&mut self, _: Protocol, _: &mut Vec<u8>) -> io::Result<()> {
///         Err(io::ErrorKind::TimedOut.into())
///     }
///     fn read_sysctl(&mut self, _: &str) -> io::Result<Option<String>> { Ok(None) }
///     fn write_sysctl(&mut self, _: &str, _: &str) -> io::Result<()> { Ok(()) }
/// }
/// assert!(wgmesh_netlink::Linux::with_kernel(Silent, Default::default()).is_err());
/// ```
pub trait KernelIo {
    /// Sends one datagram (one or more whole netlink messages) on the socket of `protocol`.
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> io::Result<()>;

    /// Receives one datagram from the socket of `protocol` into `buf` (which it replaces).
    /// Fails with [`io::ErrorKind::TimedOut`] when nothing arrives in time.
    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> io::Result<()>;

    /// Reads a sysctl by its dotted key (`None`: there is no such sysctl).
    fn read_sysctl(&mut self, key: &str) -> io::Result<Option<String>>;

    /// Writes a sysctl by its dotted key.
    fn write_sysctl(&mut self, key: &str, value: &str) -> io::Result<()>;

    /// Another handle on the same kernel, with sockets of its own, usable from another
    /// thread while this one keeps sending: what a resync reads the kernel through without
    /// holding up the deltas ([`crate::Reconciler::begin_resync`]). `None` (the default): this
    /// kernel has no second handle.
    fn open_another(&mut self) -> Option<io::Result<Box<dyn KernelIo + Send>>> {
        None
    }
}

/// `KernelIo` for a pointer to one: every method forwards to the pointee.
macro_rules! forward_kernel_io {
    ($($pointer:ty),*) => {$(
        impl<K: KernelIo + ?Sized> KernelIo for $pointer {
            fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> io::Result<()> {
                (**self).send(protocol, datagram)
            }
            fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> io::Result<()> {
                (**self).recv(protocol, buf)
            }
            fn read_sysctl(&mut self, key: &str) -> io::Result<Option<String>> {
                (**self).read_sysctl(key)
            }
            fn write_sysctl(&mut self, key: &str, value: &str) -> io::Result<()> {
                (**self).write_sysctl(key, value)
            }
            fn open_another(&mut self) -> Option<io::Result<Box<dyn KernelIo + Send>>> {
                (**self).open_another()
            }
        }
    )*};
}

forward_kernel_io!(Box<K>, &mut K);

const RECV_BUF: usize = 1 << 20;

/// The host's kernel: one netlink socket per protocol (`netlink-sys`), and `/proc/sys`.
pub struct Sockets {
    sockets: [Socket; 3],
    proc_sys: PathBuf,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets")
            .field("proc_sys", &self.proc_sys)
            .finish_non_exhaustive()
    }
}

fn open(protocol: isize, timeout: Option<Duration>) -> io::Result<Socket> {
    let mut sock = Socket::new(protocol)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    rustix::net::sockopt::set_socket_timeout(&sock, rustix::net::sockopt::Timeout::Recv, timeout)?;
    let _ = sock.set_rx_buf_sz(4 * RECV_BUF);
    // The kernel's explanations of refusals (NLMSGERR_ATTR_MSG).
    let _ = sock.set_ext_ack(true);
    // Errors need not echo the whole request back.
    let _ = sock.set_cap_ack(true);
    Ok(sock)
}

/// Datagrams above this size may not fit the socket's send buffer (`wmem_default`, 208 KiB
/// on most hosts).
const BIG_DATAGRAM: usize = 128 * 1024;

/// Grows the socket's send buffer to take a datagram of `len` bytes: Linux refuses a netlink
/// datagram larger than the buffer (`EMSGSIZE`), and an nf_tables batch (a table with tens of
/// thousands of set elements) must go in one. `SO_SNDBUFFORCE` (root) passes `wmem_max`;
/// without the privilege `SO_SNDBUF` is tried. A failure is left to the send to report.
fn grow_send_buffer(sock: &Socket, len: usize) {
    use rustix::net::sockopt;
    // Linux stores twice the value set and keeps some for its bookkeeping.
    if sockopt::socket_send_buffer_size(sock).is_ok_and(|have| have >= 2 * len) {
        return;
    }
    let want = len + 64 * 1024;
    if sockopt::set_socket_send_buffer_size_force(sock, want).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(sock, want);
    }
}

impl Sockets {
    /// Opens the rtnetlink, generic and netfilter sockets. Every wait for an answer ends after
    /// `timeout` (`None`: never) with [`io::ErrorKind::TimedOut`]; sysctls are under
    /// `proc_sys` (`/proc/sys`).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use wgmesh_netlink::{Linux, LinuxConfig, Sockets};
    /// let sockets = Sockets::open(Some(Duration::from_secs(30)), "/proc/sys")?;
    /// let linux = Linux::with_kernel(sockets, LinuxConfig::default())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(timeout: Option<Duration>, proc_sys: impl Into<PathBuf>) -> io::Result<Self> {
        Ok(Self {
            sockets: [
                open(NETLINK_ROUTE, timeout)?,
                open(NETLINK_GENERIC, timeout)?,
                open(NETLINK_NETFILTER, timeout)?,
            ],
            proc_sys: proc_sys.into(),
            timeout,
        })
    }

    fn sysctl_path(&self, key: &str) -> PathBuf {
        self.proc_sys.join(key.replace('.', "/"))
    }
}

impl KernelIo for Sockets {
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> io::Result<()> {
        let sock = &self.sockets[protocol.index()];
        if datagram.len() > BIG_DATAGRAM {
            grow_send_buffer(sock, datagram.len());
        }
        sock.send(datagram, 0).map(|_| ())
    }

    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        if buf.capacity() < RECV_BUF {
            buf.reserve(RECV_BUF);
        }
        match self.sockets[protocol.index()].recv(buf, 0) {
            Ok(_) => Ok(()),
            // SO_RCVTIMEO expired: EAGAIN, which says nothing of a timeout.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer from the kernel within the netlink timeout",
            )),
            Err(e) => Err(e),
        }
    }

    fn read_sysctl(&mut self, key: &str) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.sysctl_path(key)) {
            Ok(v) => Ok(Some(v.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> io::Result<()> {
        std::fs::write(self.sysctl_path(key), format!("{value}\n"))
    }

    /// New sockets, with the same timeout and sysctl directory.
    fn open_another(&mut self) -> Option<io::Result<Box<dyn KernelIo + Send>>> {
        Some(
            Self::open(self.timeout, self.proc_sys.clone())
                .map(|s| Box::new(s) as Box<dyn KernelIo + Send>),
        )
    }
}
