//! `wgmesh plan`: what every node (or one) must program, as text, JSON or `wg setconf` files.

use std::path::PathBuf;

use wgmesh::core::diagnostics::diagnose;
use wgmesh::core::{NodePlan, PrivateKey, plan_node, render};

use crate::emit;
use crate::keys::read_secret;
use crate::shared::{Failure, emit_json};
use crate::source::{ClusterSource, Loaded};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Readable text, with the findings (`wg show` style).
    Text,
    /// The plan as JSON: one object with `--node`, else an array.
    Json,
    /// `wg setconf` files, one per interface.
    Wg,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: ClusterSource,
    /// Only this node (default: every node).
    #[arg(long, short, value_name = "NAME")]
    node: Option<String>,
    /// The output format.
    #[arg(long, short, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// With `--format wg`: a private key file whose key goes into the files.
    #[arg(long, value_name = "FILE")]
    private_key: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let Loaded { cluster, warnings } = args.source.load()?;
    let names: Vec<&str> = match &args.node {
        Some(name) => vec![name.as_str()],
        None => cluster.nodes().iter().map(|n| n.name.as_str()).collect(),
    };
    let plans = names
        .iter()
        .map(|n| plan_node(&cluster, n))
        .collect::<Result<Vec<NodePlan>, _>>()
        .map_err(|e| Failure::Input(e.to_string()))?;
    let private_key =
        match &args.private_key {
            None => None,
            Some(path) => {
                let text = read_secret(path, "private key file")?;
                Some(PrivateKey::from_base64(text.trim()).map_err(|e| {
                    Failure::Input(format!("private key file {}: {e}", path.display()))
                })?)
            }
        };
    match args.format {
        Format::Json => match args.node {
            Some(_) => emit_json(&plans[0]),
            None => emit_json(&plans),
        },
        Format::Text => {
            let mut out = String::new();
            let findings: Vec<String> = warnings
                .iter()
                .cloned()
                .chain(diagnose(&cluster).iter().map(ToString::to_string))
                .collect();
            if !findings.is_empty() {
                out.push_str("findings:\n");
                for f in findings {
                    out.push_str(&format!("  {f}\n"));
                }
                out.push('\n');
            }
            for (i, plan) in plans.iter().enumerate() {
                if i > 0 {
                    out.push_str(&format!("\n{}\n\n", "=".repeat(72)));
                }
                out.push_str(&render::text(plan));
            }
            emit(&out)
        }
        Format::Wg => {
            // The files may hold the private key: wiped when dropped.
            let mut out = zeroize::Zeroizing::new(String::new());
            for plan in &plans {
                for iface in &plan.interfaces {
                    out.push_str(&format!("# node {}, interface {}\n", plan.node, iface.name));
                    if private_key.is_none() {
                        out.push_str(
                            "# PrivateKey omitted: pass --private-key FILE to include it\n",
                        );
                    }
                    out.push_str(&render::setconf(iface, private_key.as_ref()));
                    out.push('\n');
                }
            }
            emit(&out)
        }
    }
}
