//! The wgmesh node agent embedded in a program of your own: a configuration file in, the
//! whole agent run (`wgmesh_k8s::daemon::run_agent`) until SIGTERM. The `wgmesh-agent` binary
//! is this plus flags.
//!
//! ```text
//! NODE_NAME=$(hostname) cargo run --features agent --example agent -- agent.yaml
//! ```
//!
//! With `dry_run: true` in the file it programs nothing and logs the plans.

use std::process::ExitCode;

use wgmesh::k8s::config::ConfigSpec;
use wgmesh::k8s::metrics::BuildInfo;
use wgmesh::k8s::{daemon, logging, tokio};

fn main() -> ExitCode {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/etc/wgmesh/agent.yaml".into());
    let config = match ConfigSpec::read(&path).and_then(|s| s.validate(|k| std::env::var(k).ok())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_format);
    let build = BuildInfo::new(env!("CARGO_PKG_VERSION"), "");
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(daemon::run_agent(config, build))
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
