//! The one error type of the core: what was wrong, where (the mesh or a named node, and the
//! field), and the offending value.
//!
//! Values and names are echoed at most [`MAX_ECHO`] bytes long (see [`elide`]): a node that
//! writes a megabyte into a field must not put a megabyte into every agent's log. An error's
//! whole line stays well under a kilobyte.

use std::borrow::Cow;
use std::fmt;

use crate::key::KeyError;

/// How many bytes of a value (or a node name) errors echo; the rest is elided.
pub const MAX_ECHO: usize = 64;

/// How many bytes of a field path errors keep.
const MAX_FIELD: usize = 128;

/// How many bytes of a parser's message errors keep.
#[cfg(feature = "parse")]
const MAX_MESSAGE: usize = 240;

/// `text` when it has at most [`MAX_ECHO`] bytes; otherwise its first [`MAX_ECHO`] bytes (cut
/// at a character boundary), an ellipsis and the full length in bytes. For everything that
/// repeats untrusted input in an error, a warning or a log line.
///
/// ```
/// use wgmesh_core::error::elide;
/// assert_eq!(elide("10.0.0.1"), "10.0.0.1");
/// let long = "x".repeat(1 << 20);
/// assert_eq!(elide(&long), format!("{}…(1048576 bytes)", "x".repeat(64)));
/// assert!(elide(&"é".repeat(1000)).len() < 100);
/// ```
pub fn elide(text: &str) -> Cow<'_, str> {
    elide_to(text, MAX_ECHO)
}

/// [`elide`] with another limit, in bytes.
pub fn elide_to(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}…({} bytes)", &text[..cut], text.len()))
}

/// `text` on one line ([`one_line`]), then cut to `max` bytes ([`elide_to`]): escaping first,
/// so that the limit bounds what is printed (an escape such as `\u{7f}` is six bytes).
fn echo(text: &str, max: usize) -> String {
    elide_to(&one_line(text), max).into_owned()
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), so that it stays on one line
/// and cannot forge log lines or terminal escapes.
///
/// ```
/// use wgmesh_core::error::one_line;
/// assert_eq!(one_line("a\nb"), "a\\nb");
/// assert_eq!(one_line("plain"), "plain");
/// ```
pub fn one_line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Where a bad value sits in the cluster description.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// The `mesh` section.
    Mesh,
    /// The node with this name.
    Node(String),
    /// The node at this position of `nodes`, when its name itself is the problem.
    NodeIndex(usize),
    /// The document as a whole (syntax), at this path (`nodes[2].addresses[0]`), if known.
    Document(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mesh => f.write_str("mesh"),
            Self::Node(name) => write!(f, "node {name:?}"),
            Self::NodeIndex(i) => write!(f, "nodes[{i}]"),
            Self::Document(path) if path.is_empty() || path == "." || path == "?" => {
                f.write_str("cluster")
            }
            Self::Document(path) => write!(f, "cluster at {path}"),
        }
    }
}

/// What is wrong with a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// Not an IPv4 or IPv6 address.
    #[error("not an IP address")]
    InvalidIp,
    /// Not a CIDR (`address/prefix-length`).
    #[error("not a CIDR (address/prefix-length)")]
    InvalidCidr,
    /// A CIDR with bits set after the prefix.
    #[error("host bits are set; the block is {canonical}")]
    HostBitsSet {
        /// The CIDR with the host bits cleared.
        canonical: String,
    },
    /// A malformed WireGuard key.
    #[error("invalid WireGuard key: {0}")]
    InvalidKey(KeyError),
    /// A number outside its range.
    #[error("must be between {min} and {max}")]
    OutOfRange {
        /// Smallest accepted value.
        min: i64,
        /// Largest accepted value.
        max: i64,
    },
    /// A number that is reserved for another purpose.
    #[error("{0}")]
    Reserved(&'static str),
    /// A route source other than `cidr_blocks` and `workload_ips`.
    #[error("unknown route source; expected \"cidr_blocks\" or \"workload_ips\"")]
    UnknownRouteSource,
    /// A Linux interface name that the kernel would refuse.
    #[error("invalid interface name: {0}")]
    InvalidInterfaceName(&'static str),
    /// An empty value where one is required.
    #[error("must not be empty")]
    Empty,
    /// Two settings that must differ are equal.
    #[error("must differ from {0}")]
    MustDiffer(&'static str),
    /// Another node already has this name.
    #[error("duplicate node name (also nodes[{first}])")]
    DuplicateName {
        /// The index of the first node with this name.
        first: usize,
    },
    /// The MTU left for the tunnel is below what the family requires.
    #[error("{0}")]
    Mtu(String),
    /// A value of the wrong type or shape, as the parser reported it.
    #[error("{0}")]
    Syntax(String),
    /// The text is longer than the parser accepts.
    #[error("{size} bytes is more than the limit of {limit}")]
    TooLarge {
        /// The size of the text (or the bytes read before giving up).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The text nests collections deeper than the parser accepts.
    #[error("nested more than {limit} levels deep")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
}

#[cfg(feature = "parse")]
impl Problem {
    /// A parser's message, cut to a bounded length (parsers quote the bad value).
    pub(crate) fn syntax(message: impl Into<String>) -> Self {
        let message = message.into();
        Self::Syntax(echo(&message, MAX_MESSAGE))
    }
}

/// Every error of the core: bad input, found while validating a cluster or applying an event.
///
/// Its `Display` is one line that names the node (or `mesh`) and the field:
///
/// ```
/// use wgmesh_core::spec::parse_cluster;
/// let err = parse_cluster(r#"{"nodes":[{"name":"n1","pod_cidrs":["10.0.0.1/24"]}]}"#).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     r#"node "n1": pod_cidrs[0] = "10.0.0.1/24": host bits are set; the block is 10.0.0.0/24"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field holds a bad value.
    #[error("{location}: {field}{}: {problem}", value_suffix(.value))]
    Invalid {
        /// The mesh, or the node.
        location: Location,
        /// The field, with its index for lists (`pod_cidrs[1]`).
        field: String,
        /// The offending value as given, if there was one.
        value: Option<String>,
        /// What is wrong.
        problem: Problem,
    },
    /// A node was named that the cluster does not have.
    #[error("node {0:?} is not in the cluster")]
    UnknownNode(String),
}

fn value_suffix(value: &Option<String>) -> String {
    match value {
        Some(v) => format!(" = {v:?}"),
        None => String::new(),
    }
}

impl Error {
    /// An invalid value at `location`; the value and any node name in the location are elided
    /// to [`MAX_ECHO`] characters.
    pub(crate) fn invalid(
        location: Location,
        field: impl Into<String>,
        value: Option<String>,
        problem: Problem,
    ) -> Self {
        let location = match location {
            Location::Node(name) => Location::Node(elide(&name).into_owned()),
            Location::Document(path) => Location::Document(echo(&path, MAX_ECHO)),
            other => other,
        };
        Self::Invalid {
            location,
            field: echo(&field.into(), MAX_FIELD),
            value: value.map(|v| match elide(&v) {
                Cow::Borrowed(_) => v,
                Cow::Owned(short) => short,
            }),
            problem,
        }
    }

    pub(crate) fn mesh(field: impl Into<String>, value: Option<String>, problem: Problem) -> Self {
        Self::invalid(Location::Mesh, field, value, problem)
    }

    pub(crate) fn node(
        node: &str,
        field: impl Into<String>,
        value: Option<String>,
        problem: Problem,
    ) -> Self {
        Self::invalid(Location::Node(node.to_owned()), field, value, problem)
    }

    /// A node name that the cluster does not have (elided to [`MAX_ECHO`] characters).
    pub(crate) fn unknown_node(name: &str) -> Self {
        Self::UnknownNode(elide(name).into_owned())
    }

    /// The node the error is about, if it is about one.
    pub fn node_name(&self) -> Option<&str> {
        match self {
            Self::Invalid {
                location: Location::Node(n),
                ..
            }
            | Self::UnknownNode(n) => Some(n),
            _ => None,
        }
    }

    /// The field the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            Self::UnknownNode(_) => None,
        }
    }
}
