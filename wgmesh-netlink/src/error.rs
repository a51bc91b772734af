//! The crate's one error type: what went wrong, the errno when the kernel or the userspace
//! daemon refused, and what was being done.

use std::fmt;
use std::path::PathBuf;

/// Why an operation on the dataplane failed.
///
/// Every variant says what was being done (`doing`), so a log line is enough to act on:
///
/// ```
/// use wgmesh_netlink::Error;
/// let e = Error::kernel("add route 10.0.0.0/24 table 1", 17);
/// assert_eq!(e.errno(), Some(17));
/// assert!(e.to_string().starts_with("add route 10.0.0.0/24 table 1: "));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel answered a netlink request with an error.
    #[error("{doing}: {}", describe_errno(*errno))]
    Kernel {
        /// What was being done.
        doing: String,
        /// The positive errno the kernel returned.
        errno: i32,
    },
    /// A userspace WireGuard implementation answered `errno=N`.
    #[error("{doing}: userspace WireGuard answered errno={errno} ({})", describe_errno(*errno))]
    Userspace {
        /// What was being done.
        doing: String,
        /// The errno from the `errno=` line.
        errno: i32,
    },
    /// A system call or file operation failed.
    #[error("{doing}: {source}")]
    Io {
        /// What was being done.
        doing: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel or daemon sent something this crate could not understand.
    #[error("{doing}: malformed reply: {detail}")]
    Decode {
        /// What was being done.
        doing: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The private key file is unusable (wrong mode, wrong content, not a file).
    #[error("private key {}: {problem}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The kernel has no WireGuard (the backend was `kernel`).
    #[error("{doing}: this kernel has no WireGuard (module missing); use the userspace backend")]
    NoKernelWireGuard {
        /// What was being done.
        doing: String,
    },
    /// The plan or the request cannot be applied as given.
    #[error("{0}")]
    Invalid(String),
    /// An operation failed in the middle of a run; the operations before it were applied.
    #[error("operation {index} of {total} ({operation}) failed: {source}")]
    Operation {
        /// Zero-based position of the failed operation in the run.
        index: usize,
        /// How many operations the run had.
        total: usize,
        /// A one-line description of the operation (never a secret).
        operation: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// A fault injected by [`testing::FailingDataplane`](crate::testing::FailingDataplane).
    #[error("{doing}: injected fault")]
    Injected {
        /// What was being done.
        doing: String,
    },
}

impl Error {
    /// A kernel refusal with its errno (positive, as in `errno.h`).
    pub fn kernel(doing: impl Into<String>, errno: i32) -> Self {
        Self::Kernel {
            doing: doing.into(),
            errno: errno.abs(),
        }
    }

    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            doing: doing.into(),
            source,
        }
    }

    pub(crate) fn decode(doing: impl Into<String>, detail: impl fmt::Display) -> Self {
        Self::Decode {
            doing: doing.into(),
            detail: detail.to_string(),
        }
    }

    /// The errno behind the error, if the kernel, the daemon or the OS gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } | Self::Userspace { errno, .. } => Some(*errno),
            Self::Io { source, .. } => source.raw_os_error(),
            Self::Operation { source, .. } => source.errno(),
            _ => None,
        }
    }

    /// The innermost error (for [`Error::Operation`], the one that caused it).
    pub fn root(&self) -> &Error {
        match self {
            Self::Operation { source, .. } => source.root(),
            other => other,
        }
    }
}

/// `EEXIST`.
pub const EEXIST: i32 = 17;
/// `ENOENT`.
pub const ENOENT: i32 = 2;
/// `ESRCH`.
pub const ESRCH: i32 = 3;
/// `ENODEV`.
pub const ENODEV: i32 = 19;
/// `EINVAL`.
pub const EINVAL: i32 = 22;
/// `EOPNOTSUPP`.
pub const EOPNOTSUPP: i32 = 95;
/// `EPERM`.
pub const EPERM: i32 = 1;

fn describe_errno(errno: i32) -> String {
    let name = match errno {
        1 => "EPERM (operation not permitted: run as root or with CAP_NET_ADMIN)",
        2 => "ENOENT (no such object)",
        3 => "ESRCH (no such process or route)",
        12 => "ENOMEM (out of memory)",
        13 => "EACCES (permission denied)",
        16 => "EBUSY (busy)",
        17 => "EEXIST (already exists)",
        19 => "ENODEV (no such device)",
        22 => "EINVAL (invalid argument)",
        28 => "ENOSPC (no space left)",
        34 => "ERANGE (out of range)",
        90 => "EMSGSIZE (message too long)",
        93 => "EPROTONOSUPPORT (protocol not supported)",
        95 => "EOPNOTSUPP (operation not supported)",
        105 => "ENOBUFS (no buffer space)",
        _ => {
            return format!(
                "errno {errno} ({})",
                std::io::Error::from_raw_os_error(errno)
            );
        }
    };
    format!("errno {errno} {name}")
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
