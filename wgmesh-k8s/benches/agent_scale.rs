//! The agent at cluster scale (issue 15): restart to first full apply, steady pod churn, a
//! node pool joining, an API outage and its relists — the agent library with its real async
//! shell against an in-process mock API server, programming the message-level fake kernel.
//!
//! ```text
//! cargo bench -p wgmesh-k8s --bench agent_scale                      # 5,000 nodes × 110 pods
//! cargo bench -p wgmesh-k8s --bench agent_scale -- --nodes 1000 --rates 100,1000
//! ```
//!
//! Options: `--nodes N` (5000), `--pods P` per node (110), `--rates R,R,…` (100,1000,5000
//! pod events per second), `--churn-secs S` (30), `--burst N` (100), `--outage-secs S` (60),
//! `--outage-rate R` (100 events per second during the outage), `--steady-secs S` (120),
//! `--resync-secs S` (the agent's resync interval; its default is 90), `--max-delay-ms M`
//! (the agent's `max_delay`: how long a change may wait for the debounce at most),
//! `--foreground-resync`
//! (the resync as a full reconcile on the event loop, as before it moved to a thread),
//! `--restart-only` (stop after the first full apply: its time and memory; with
//! `--hold-secs S`, S seconds later, with the peaks of RSS and heap over those seconds),
//! `--mock-process` (with `--restart-only`: the mock API server in a child process, this
//! binary run with `--serve-mock`, over HTTP on 127.0.0.1, so that the agent's process holds
//! only the agent and the fake kernel), `--kernel-process` (with `--restart-only`: the fake
//! kernel in a child process too, this binary run with `--serve-kernel PATH`, over a Unix
//! socket, so that the measured process holds only the agent),
//! `--dataplane wireguard-go` (wireguard-go devices and the host's rtnetlink in a network
//! namespace of the bench's own instead of the fake kernel; needs root and wireguard-go,
//! skipped with the reason otherwise), `--dataplane kernel` (kernel WireGuard devices the
//! same way; needs root and the wireguard module, so it runs in the VM:
//! `scripts/bench-kernel-vm.sh`), `--smoke` (the small scale of the test). With
//! `RUST_LOG` set (`RUST_LOG=wgmesh_k8s=debug`), the agent's log goes to stderr.

#[path = "agent_scale/harness.rs"]
mod harness;

use std::process::ExitCode;

/// Counts live heap bytes by part (agent, mock, fake kernel); see `harness::heap`.
#[global_allocator]
static HEAP: harness::heap::Tagged = harness::heap::Tagged;

fn parse(
    params: &mut harness::Params,
    serve_mock: &mut bool,
    serve_kernel: &mut Option<std::path::PathBuf>,
) -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--bench" {
            continue; // cargo bench passes it
        }
        if arg == "--foreground-resync" {
            params.foreground_resync = true;
            continue;
        }
        if arg == "--restart-only" {
            params.restart_only = true;
            continue;
        }
        if arg == "--mock-process" {
            params.mock_process = true;
            continue;
        }
        if arg == "--kernel-process" {
            params.kernel_process = true;
            continue;
        }
        if arg == "--serve-kernel" {
            *serve_kernel = Some(args.next().ok_or("--serve-kernel needs a path")?.into());
            continue;
        }
        if arg == "--serve-mock" {
            *serve_mock = true;
            continue;
        }
        if arg == "--smoke" {
            *params = harness::Params::smoke();
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{arg} takes a number, got {v:?}"))
        };
        match arg.as_str() {
            "--nodes" => params.nodes = number(&value)?.max(2),
            "--pods" => params.pods = number(&value)?.min(120),
            "--rates" => {
                params.rates = value
                    .split(',')
                    .filter(|v| !v.is_empty())
                    .map(number)
                    .collect::<Result<_, _>>()?
            }
            "--churn-secs" => params.churn_secs = number(&value)? as u64,
            "--burst" => params.burst = number(&value)?,
            "--outage-secs" => params.outage_secs = number(&value)? as u64,
            "--outage-rate" => params.outage_rate = number(&value)?,
            "--steady-secs" => params.steady_secs = number(&value)? as u64,
            "--hold-secs" => params.hold_secs = number(&value)? as u64,
            "--max-delay-ms" => params.max_delay_ms = Some(number(&value)? as u64),
            "--resync-secs" => params.resync_secs = Some(number(&value)?.max(1) as u64),
            "--dataplane" => {
                (params.wireguard_go, params.kernel_wireguard) = match value.as_str() {
                    "fake" => (false, false),
                    "wireguard-go" => (true, false),
                    "kernel" => (false, true),
                    other => {
                        return Err(format!(
                            "--dataplane takes fake, wireguard-go or kernel, got {other:?}"
                        ));
                    }
                }
            }
            _ => return Err(format!("unknown option {arg}")),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut params = harness::Params::full();
    let mut serve_mock = false;
    let mut serve_kernel = None;
    if let Err(e) = parse(&mut params, &mut serve_mock, &mut serve_kernel) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(path) = serve_kernel {
        harness::serve_kernel(&path);
        return ExitCode::SUCCESS;
    }
    if serve_mock {
        harness::serve_mock(params.nodes, params.pods);
        return ExitCode::SUCCESS;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        // The agent's own log, to stderr (`RUST_LOG=wgmesh_k8s=debug`): what it did when.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    println!("agent_scale: {params:?}");
    let report = harness::run(&params, &mut |line| println!("{line}"));
    if let Some(why) = &report.skipped {
        println!("skipped: {why}");
        return ExitCode::SUCCESS;
    }
    println!("peak RSS of the process: {:.0} MB", report.peak_rss_mb);
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        ExitCode::FAILURE
    }
}
