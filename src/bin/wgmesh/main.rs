//! `wgmesh`: the operator's command line.
//!
//! ```text
//! wgmesh plan --cluster cluster.yaml [--node NAME] [--format text|json|wg] [--private-key FILE]
//! wgmesh apply --cluster cluster.yaml --node NAME [--dry-run]     # as root; feature `netlink`
//! wgmesh genkey > private-key && wgmesh pubkey < private-key       # as wg genkey / wg pubkey
//! wgmesh why default/web-0 kube-system/dns-1 --kubeconfig           # encrypted? through whom?
//! wgmesh status --node NAME --cluster cluster.yaml                  # this host against its plan
//! wgmesh status --kubeconfig                                        # every node, as its agent reports
//! wgmesh graph --cluster cluster.yaml > mesh.svg                    # the mesh as a picture
//! ```
//!
//! Exit codes: 0 success (healthy), 1 the work failed (netlink, I/O, the API server), 2 bad
//! input (one line on standard error naming what is wrong), 3 a check found the mesh
//! unhealthy (`status`, `why --live`: drift, silent or unencrypted nodes).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::shared::{Failure, write_out};

#[cfg(feature = "netlink")]
mod apply;
mod graph;
mod keys;
#[cfg(feature = "netlink")]
mod live;
mod plan;
#[path = "../shared/mod.rs"]
mod shared;
mod source;
#[cfg(feature = "netlink")]
mod status;
mod why;

/// WireGuard for a Kubernetes cluster as one intent: plan, apply and inspect the mesh.
#[derive(Debug, Parser)]
#[command(name = "wgmesh", version = shared::VERSION, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what nodes must program: interfaces, peers, routes, rules, marking.
    Plan(plan::Args),
    /// Program one node's plan on this host over netlink (as root).
    #[cfg(feature = "netlink")]
    Apply(apply::Args),
    /// Explain one flow: the path a packet takes, hop by hop, and whether it is encrypted.
    Why(why::Args),
    /// This host's peers and drift from its plan, or (with --kubeconfig) every node's state.
    #[cfg(feature = "netlink")]
    Status(status::Args),
    /// Draw the mesh: nodes by state, edges encrypted, plain or blocked (SVG, DOT or JSON).
    Graph(graph::Args),
    /// Print a new private key (base64, as `wg genkey`).
    Genkey,
    /// Read a private key on standard input, print its public key (as `wg pubkey`).
    Pubkey,
}

/// Writes text to standard output (see [`write_out`]).
pub(crate) fn emit(text: &str) -> Result<(), Failure> {
    write_out(|out| out.write_all(text.as_bytes()))
}

fn main() -> ExitCode {
    let cli: Cli = match shared::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Plan(args) => plan::run(args),
        #[cfg(feature = "netlink")]
        Command::Apply(args) => apply::run(args),
        Command::Why(args) => why::run(args),
        #[cfg(feature = "netlink")]
        Command::Status(args) => status::run(args),
        Command::Graph(args) => graph::run(args),
        Command::Genkey => keys::genkey(),
        Command::Pubkey => keys::pubkey(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}
