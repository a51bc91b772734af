//! Structured logs with `tracing`: JSON lines (the default, for log collectors) or text.
//! The level comes from `RUST_LOG` (default `info`).
//!
//! Records of the `log` facade (which `wgmesh-netlink` logs through) are bridged into the
//! same subscriber, so they appear in the agent's log with its format and filter.
//!
//! The agent logs node names, public keys, addresses and counts — never a private key: the
//! agent's state machine never holds one (the dataplane does), and the core's private key
//! type prints as `(hidden)` in `Debug` and `Display`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber, and the bridge from `log` records into it. Returns
/// `false` if a subscriber was installed already.
pub fn init(format: LogFormat) -> bool {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
            .is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    }
}
