//! Applies one node's plan to this host (as root) and reports the operations performed.
//!
//! ```text
//! cargo run --example apply --features netlink -- --cluster FILE --node NAME \
//!     [--private-key FILE] [--backend auto|kernel|userspace] [--dry-run] [--format text|json]
//! ```
//!
//! The private key file (default `/var/lib/wgmesh/private.key`) must be mode 0600; it is
//! generated when absent (not in a dry run). A second run reports 0 operations; `--dry-run`
//! reports what would change and changes nothing. Bad input exits with code 2 and one line;
//! a failure while applying exits with code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use wgmesh::core::{plan_node, spec::parse_cluster};
use wgmesh::netlink::keys::{KeyOrigin, load, load_or_generate};
use wgmesh::netlink::{Backend, KeyRing, Linux, LinuxConfig, Ownership, Reconciler, Report};

const USAGE: &str = "usage: apply --cluster FILE --node NAME [--private-key FILE] [--backend auto|kernel|userspace] [--dry-run] [--format text|json]";
const DEFAULT_KEY: &str = "/var/lib/wgmesh/private.key";

struct Args {
    cluster: String,
    node: String,
    private_key: PathBuf,
    backend: Backend,
    dry_run: bool,
    json: bool,
}

#[path = "support/flags.rs"]
mod flags;
use flags::Flags;

fn parse_args() -> Result<Args, String> {
    let (mut cluster, mut node, mut key) = (None, None, None);
    let (mut backend, mut dry_run, mut json) = (Backend::Auto, false, false);
    let mut flags = Flags::from_env(USAGE);
    while let Some((flag, inline)) = flags.next_flag() {
        match flag.as_str() {
            "--cluster" | "-c" => cluster = Some(flags.value(&flag, inline)?),
            "--node" | "-n" => node = Some(flags.value(&flag, inline)?),
            "--private-key" => key = Some(PathBuf::from(flags.value(&flag, inline)?)),
            "--backend" => backend = flags.value(&flag, inline)?.parse()?,
            "--dry-run" => dry_run = true,
            "--format" | "-f" => {
                json = match flags.value(&flag, inline)?.as_str() {
                    "text" => false,
                    "json" => true,
                    other => {
                        return Err(format!("unknown format {other:?}; expected text or json"));
                    }
                }
            }
            other => return Err(flags.unknown(other)),
        }
    }
    Ok(Args {
        cluster: cluster.ok_or_else(|| format!("--cluster is required; {USAGE}"))?,
        node: node.ok_or_else(|| format!("--node is required; {USAGE}"))?,
        private_key: key.unwrap_or_else(|| PathBuf::from(DEFAULT_KEY)),
        backend,
        dry_run,
        json,
    })
}

enum Failure {
    Input(String),
    Apply(String),
}

fn print(report: &Report, backend: &str, json: bool) -> Result<(), Failure> {
    if json {
        let v = serde_json::json!({
            "operations": report.operations.len(),
            "list": report.operations,
            "descriptions": report.operations.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "messages": report.messages,
            "dry_run": report.dry_run,
            "micros": report.micros,
            "backend": backend,
            "warnings": report.warnings,
        });
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| Failure::Apply(format!("cannot write JSON: {e}")))?;
        println!("{text}");
    } else {
        println!("backend: {backend}");
        for op in &report.operations {
            println!("{}{op}", if report.dry_run { "would: " } else { "" });
        }
        println!(
            "{} operations{}, {} messages, {:.1} ms",
            report.operations.len(),
            if report.dry_run {
                " (dry run, nothing changed)"
            } else {
                ""
            },
            report.messages,
            report.micros as f64 / 1000.0
        );
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn run() -> Result<(), Failure> {
    let args = parse_args().map_err(Failure::Input)?;
    let text = std::fs::read_to_string(&args.cluster).map_err(|e| {
        Failure::Input(format!(
            "cannot read the cluster file {}: {e}",
            args.cluster
        ))
    })?;
    let cluster = parse_cluster(&text).map_err(|e| Failure::Input(e.to_string()))?;
    let plan = plan_node(&cluster, &args.node).map_err(|e| Failure::Input(e.to_string()))?;
    let key = if args.dry_run {
        match load(&args.private_key) {
            Ok(k) => Some(k),
            Err(wgmesh::netlink::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                eprintln!(
                    "note: {} does not exist; a real run would generate it",
                    args.private_key.display()
                );
                None
            }
            Err(e) => return Err(Failure::Input(e.to_string())),
        }
    } else {
        let (k, origin) =
            load_or_generate(&args.private_key).map_err(|e| Failure::Input(e.to_string()))?;
        if origin == KeyOrigin::Generated {
            eprintln!(
                "generated a private key in {} (public key {}); publish it",
                args.private_key.display(),
                k.public_key()
            );
        }
        Some(k)
    };
    let keys = key.map(KeyRing::single).unwrap_or_default();
    let linux = Linux::open(LinuxConfig::with_backend(args.backend))
        .map_err(|e| Failure::Apply(e.to_string()))?;
    let backend = linux.backend_description().to_owned();
    let mut r = Reconciler::new(linux, Ownership::from_mesh(cluster.mesh()), keys);
    let report = if args.dry_run {
        r.dry_run(&plan)
    } else {
        r.reconcile(&plan)
    }
    .map_err(|e| Failure::Apply(e.to_string()))?;
    print(&report, &backend, args.json)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Apply(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
