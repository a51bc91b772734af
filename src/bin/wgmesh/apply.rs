//! `wgmesh apply`: programs one node's plan on this host (as root) and reports the operations.
//!
//! The private key file (default [`DEFAULT_PRIVATE_KEY_FILE`], the agent's too) must be mode
//! 0600; it is generated when absent (not in a dry run). A second run reports 0 operations;
//! `--dry-run` reports what would change and changes nothing.

use std::path::PathBuf;

use wgmesh::core::plan_node;
use wgmesh::netlink::keys::{DEFAULT_PRIVATE_KEY_FILE, KeyOrigin, load, load_or_generate};
use wgmesh::netlink::{Backend, KeyRing, Linux, LinuxConfig, Ownership, Reconciler, Report};

use crate::emit;
use crate::live::parse_backend;
use crate::shared::{Failure, emit_json, say};
use crate::source::ClusterSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// One line per operation and a summary.
    Text,
    /// One JSON object.
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: ClusterSource,
    /// This node's name in the cluster.
    #[arg(long, short, value_name = "NAME", env = "NODE_NAME")]
    node: String,
    /// The private key file (mode 0600; generated when absent).
    #[arg(long, value_name = "FILE", env = "WGMESH_PRIVATE_KEY_FILE", default_value = DEFAULT_PRIVATE_KEY_FILE)]
    private_key: PathBuf,
    /// Which WireGuard: the kernel's, wireguard-go, or the kernel's when it has it.
    #[arg(long, value_name = "auto|kernel|userspace", env = "WGMESH_BACKEND", default_value = "auto", value_parser = parse_backend)]
    backend: Backend,
    /// Report what would change, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The output format.
    #[arg(long, short, value_enum, default_value_t = Format::Text)]
    format: Format,
}

fn print(report: &Report, backend: &str, format: Format) -> Result<(), Failure> {
    let out = match format {
        Format::Json => {
            emit_json(&serde_json::json!({
                "operations": report.operations.len(),
                "list": report.operations,
                "descriptions": report.operations.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "messages": report.messages,
                "dry_run": report.dry_run,
                "micros": report.micros,
                "backend": backend,
                "warnings": report.warnings,
            }))?;
            String::new()
        }
        Format::Text => {
            let mut out = format!("backend: {backend}\n");
            for op in &report.operations {
                let would = if report.dry_run { "would: " } else { "" };
                out.push_str(&format!("{would}{op}\n"));
            }
            out.push_str(&format!(
                "{} operations{}, {} messages, {:.1} ms\n",
                report.operations.len(),
                if report.dry_run {
                    " (dry run, nothing changed)"
                } else {
                    ""
                },
                report.messages,
                report.micros as f64 / 1000.0
            ));
            out
        }
    };
    emit(&out)?;
    for w in &report.warnings {
        say(&format!("warning: {w}"));
    }
    Ok(())
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let cluster = args.source.load()?.cluster;
    let plan = plan_node(&cluster, &args.node).map_err(|e| Failure::Input(e.to_string()))?;
    let key = if args.dry_run {
        match load(&args.private_key) {
            Ok(k) => Some(k),
            Err(wgmesh::netlink::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                say(&format!(
                    "note: {} does not exist; a real run would generate it",
                    args.private_key.display()
                ));
                None
            }
            Err(e) => return Err(Failure::Input(e.to_string())),
        }
    } else {
        let (k, origin) =
            load_or_generate(&args.private_key).map_err(|e| Failure::Input(e.to_string()))?;
        if origin == KeyOrigin::Generated {
            say(&format!(
                "generated a private key in {} (public key {}); publish it",
                args.private_key.display(),
                k.public_key()
            ));
        }
        Some(k)
    };
    let keys = key.map(KeyRing::single).unwrap_or_default();
    let linux = Linux::open(LinuxConfig::with_backend(args.backend))
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let backend = linux.backend_description().to_owned();
    let mut r = Reconciler::new(linux, Ownership::from_mesh(cluster.mesh()), keys);
    let report = if args.dry_run {
        r.dry_run(&plan)
    } else {
        r.reconcile(&plan)
    }
    .map_err(|e| Failure::Runtime(e.to_string()))?;
    print(&report, &backend, args.format)
}
