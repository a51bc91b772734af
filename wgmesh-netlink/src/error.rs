//! The crate's errors: [`Error`] says what went wrong, the errno when the kernel or the
//! userspace daemon refused (with the kernel's own explanation when it gave one), and what was
//! being done; [`DecodeError`] says what in an answer could not be understood.

use std::fmt;
use std::path::PathBuf;

use wgmesh_core::Family;

/// Why an operation on the dataplane failed.
///
/// Every variant says what was being done (`doing`), so a log line is enough to act on. The
/// kernel's extended acknowledgement (`NLMSGERR_ATTR_MSG`), when it sends one, is part of the
/// message:
///
/// ```
/// use wgmesh_netlink::Error;
/// let e = Error::kernel("add route 10.0.0.0/24 table 1", 17);
/// assert_eq!(e.errno(), Some(17));
/// assert!(e.to_string().starts_with("add route 10.0.0.0/24 table 1: errno 17 EEXIST"));
/// let e = Error::kernel("create link wg0", 95).with_kernel_message("Unknown device type");
/// assert!(e.to_string().ends_with("; the kernel says: Unknown device type"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel answered a netlink request with an error.
    #[error("{doing}: {}{}", describe_errno(*errno), kernel_says(message.as_deref()))]
    Kernel {
        /// What was being done.
        doing: String,
        /// The positive errno the kernel returned.
        errno: i32,
        /// The kernel's explanation (`NLMSGERR_ATTR_MSG` of its extended acknowledgement).
        message: Option<String>,
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
    #[error("{doing}: malformed answer: {source}")]
    Decode {
        /// What was being done.
        doing: String,
        /// What was wrong with it.
        #[source]
        source: DecodeError,
    },
    /// Another program's rule collides with wgmesh's mark bits, table or rule priority
    /// ([`crate::neighbours`]); wgmesh refuses rather than take them over.
    #[error("{collision}; wgmesh changes nothing while it collides")]
    Collision {
        /// The collision, naming the other owner.
        collision: crate::neighbours::Collision,
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
    /// An operation sets a family's private key and the key ring has none for it.
    #[error("no {family} private key in the key ring")]
    MissingKey {
        /// The family.
        family: Family,
    },
    /// A sysctl key that is not a dotted path of `[A-Za-z0-9_-]` components.
    #[error("invalid sysctl key {key:?}")]
    InvalidSysctlKey {
        /// The key.
        key: String,
    },
    /// A route names an output device whose interface index is not known.
    #[error("route via {interface}: no such interface")]
    UnknownInterface {
        /// The interface name.
        interface: String,
    },
    /// `LinuxConfig::max_message` cannot hold one peer and one allowed IP.
    #[error("a WireGuard message of {max_message} bytes cannot hold one peer")]
    MessageTooSmall {
        /// The configured size.
        max_message: usize,
    },
    /// `Reconciler::apply_delta` before any full plan was applied.
    #[error("apply_delta needs a base plan: reconcile a full plan first")]
    NoBasePlan,
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
    /// A link has one of wgmesh's interface names but is not wgmesh's (see
    /// [`ActualLink::foreign`](crate::ActualLink::foreign)): nothing was changed, and nothing
    /// will be until the name is changed in the mesh settings or the link is removed.
    #[error(
        "interface {interface}: refusing to touch a link wgmesh does not own: {reason}; choose another interface name, or delete the link if it is a leftover"
    )]
    ForeignLink {
        /// The interface name.
        interface: String,
        /// Why it is not wgmesh's.
        reason: crate::ForeignLink,
    },
    /// An interface name that must not reach a program or the kernel (empty, longer than
    /// 15 bytes, starting with `-`, or holding `/`, whitespace, `:` or a control character).
    #[error("invalid interface name {name:?}: {problem}")]
    InvalidInterfaceName {
        /// The name (cut to 64 characters).
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A fault injected by `testing::FailingDataplane`.
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
            message: None,
        }
    }

    /// The same error with the kernel's explanation attached (a no-op for other variants).
    pub fn with_kernel_message(mut self, text: impl Into<String>) -> Self {
        if let Self::Kernel { message, .. } = &mut self {
            *message = Some(text.into());
        }
        self
    }

    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            doing: doing.into(),
            source,
        }
    }

    pub(crate) fn decode(doing: impl Into<String>, source: DecodeError) -> Self {
        Self::Decode {
            doing: doing.into(),
            source,
        }
    }

    /// The errno behind the error, if the kernel, the daemon or the OS gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } | Self::Userspace { errno, .. } => Some(*errno),
            Self::Io { source, .. } => source.raw_os_error(),
            Self::Operation { source, .. } => source.errno(),
            Self::Decode { .. }
            | Self::KeyFile { .. }
            | Self::NoKernelWireGuard { .. }
            | Self::MissingKey { .. }
            | Self::InvalidSysctlKey { .. }
            | Self::UnknownInterface { .. }
            | Self::MessageTooSmall { .. }
            | Self::NoBasePlan
            | Self::ForeignLink { .. }
            | Self::InvalidInterfaceName { .. }
            | Self::Collision { .. }
            | Self::Injected { .. } => None,
        }
    }

    /// The kernel's own explanation of a refusal, when it gave one.
    pub fn kernel_message(&self) -> Option<&str> {
        match self.root() {
            Self::Kernel { message, .. } => message.as_deref(),
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

/// What in a kernel or daemon answer could not be understood.
///
/// ```
/// use wgmesh_netlink::DecodeError;
/// let e = DecodeError::Truncated { what: "nlmsgerr", len: 2, need: 20 };
/// assert_eq!(e.to_string(), "nlmsgerr: 2 bytes, at least 20 needed");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than its fixed part.
    #[error("{what}: {len} bytes, at least {need} needed")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A required attribute or field is absent.
    #[error("{what} without {missing}")]
    Missing {
        /// The structure.
        what: &'static str,
        /// What it lacks.
        missing: &'static str,
    },
    /// A field has a value this crate cannot represent.
    #[error("{what}: {detail}")]
    Invalid {
        /// The structure or field.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A message the netlink-packet crates refused.
    #[error("{what}: {source}")]
    Message {
        /// The message.
        what: &'static str,
        /// The crate's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A line of the userspace configuration protocol with a bad value.
    #[error("bad {key} line")]
    UapiLine {
        /// The key of the line.
        key: String,
    },
    /// A userspace reply that does not end with `errno=N`.
    #[error("reply without errno")]
    UapiNoErrno,
}

impl DecodeError {
    pub(crate) fn message(what: &'static str, source: netlink_packet_core::DecodeError) -> Self {
        Self::Message {
            what,
            source: Box::new(source),
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl fmt::Display) -> Self {
        Self::Invalid {
            what,
            detail: detail.to_string(),
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
/// `EAFNOSUPPORT`.
pub const EAFNOSUPPORT: i32 = 97;
/// `EPROTONOSUPPORT`.
pub const EPROTONOSUPPORT: i32 = 93;
/// `ECHILD`.
pub const ECHILD: i32 = 10;

/// `text` cut to 64 characters, for messages that echo a value found on the host.
pub(crate) fn cut(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// Whether `name` may be given to the kernel or to a userspace WireGuard daemon as an
/// interface name: what Linux accepts (`dev_valid_name`: 1 to 15 bytes, no `/`, `:` or
/// whitespace, not `.` or `..`), minus control characters, and never a leading `-` (a
/// daemon would take it for a flag).
pub(crate) fn check_interface_name(name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name.starts_with('-') {
        Some("starts with '-' (a program would read it as a flag)")
    } else if name == "." || name == ".." {
        Some("not a name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("holds '/', ':', whitespace or a control character")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(Error::InvalidInterfaceName {
            name: cut(name),
            problem,
        }),
        None => Ok(()),
    }
}

fn kernel_says(message: Option<&str>) -> String {
    match message {
        Some(m) if !m.is_empty() => format!("; the kernel says: {m}"),
        _ => String::new(),
    }
}

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
