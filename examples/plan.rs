//! Prints what every node of a cluster must program to encrypt it with WireGuard.
//!
//! ```text
//! cargo run --example plan                                  # the AKS + Azure CNI sample
//! cargo run --example plan -- --cluster examples/clusters/mixed-dual-stack.yaml --node worker-1
//! cargo run --example plan -- --format json --node aks-nodepool1-19852467-vmss000001
//! cat cluster.json | cargo run --example plan -- --cluster - --format wg --private-key key
//! ```
//!
//! Bad input exits with code 2 and one line that names the node and field.

use std::io::Read as _;
use std::process::ExitCode;

use wgmesh::core::diagnostics::diagnose;
use wgmesh::core::{Cluster, NodePlan, PrivateKey, plan_node, render, spec::parse_cluster};

#[path = "support/flags.rs"]
mod flags;
use flags::Flags;

const SAMPLE: &str = include_str!("clusters/aks-azure-cni.json");

const USAGE: &str =
    "usage: plan [--cluster FILE|-] [--node NAME] [--format text|json|wg] [--private-key FILE]";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
    Wg,
}

struct Args {
    cluster: Option<String>,
    node: Option<String>,
    format: Format,
    private_key: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        cluster: None,
        node: None,
        format: Format::Text,
        private_key: None,
    };
    let mut flags = Flags::from_env(USAGE);
    while let Some((flag, inline)) = flags.next_flag() {
        match flag.as_str() {
            "--cluster" | "-c" => args.cluster = Some(flags.value(&flag, inline)?),
            "--node" | "-n" => args.node = Some(flags.value(&flag, inline)?),
            "--private-key" => args.private_key = Some(flags.value(&flag, inline)?),
            "--format" | "-f" => {
                args.format = match flags.value(&flag, inline)?.as_str() {
                    "text" => Format::Text,
                    "json" => Format::Json,
                    "wg" => Format::Wg,
                    other => {
                        return Err(format!(
                            "unknown format {other:?}; expected text, json or wg"
                        ));
                    }
                }
            }
            other => return Err(flags.unknown(other)),
        }
    }
    Ok(args)
}

fn load(path: Option<&str>) -> Result<Cluster, String> {
    let text = match path {
        None => SAMPLE.to_owned(),
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read the cluster from stdin: {e}"))?;
            s
        }
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the cluster file {path}: {e}"))?,
    };
    parse_cluster(&text).map_err(|e| e.to_string())
}

fn run() -> Result<String, String> {
    let args = parse_args()?;
    let cluster = load(args.cluster.as_deref())?;
    let names: Vec<String> = match &args.node {
        Some(name) => vec![name.clone()],
        None => cluster.nodes().iter().map(|n| n.name.clone()).collect(),
    };
    let plans = names
        .iter()
        .map(|n| plan_node(&cluster, n))
        .collect::<Result<Vec<NodePlan>, _>>()
        .map_err(|e| e.to_string())?;
    let private_key = match &args.private_key {
        None => None,
        Some(path) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the private key file {path}: {e}"))?,
            );
            Some(
                PrivateKey::from_base64(&text)
                    .map_err(|e| format!("private key file {path}: {e}"))?,
            )
        }
    };
    let mut out = String::new();
    match args.format {
        Format::Json => {
            let json = if args.node.is_some() {
                serde_json::to_string_pretty(&plans[0])
            } else {
                serde_json::to_string_pretty(&plans)
            };
            out = json.map_err(|e| format!("cannot write JSON: {e}"))? + "\n";
        }
        Format::Text => {
            let findings = diagnose(&cluster);
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
        }
        Format::Wg => {
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
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    match run() {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
