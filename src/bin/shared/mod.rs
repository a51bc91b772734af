//! What the two binaries share: the version string, clap's errors as one line, the exit
//! codes, and output that never panics (a closed pipe ends the program quietly; a full disk
//! is an error, not a panic).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

/// `0.1.0 (commit 0123456789ab)`: the package version and, where known, the commit
/// (`build.rs`).
pub(crate) const VERSION: &str = env!("WGMESH_VERSION");

/// The largest input file read (a cluster, a key): enough for a 5,000-node cluster with
/// 110 pods each as pretty JSON, and a bound on what `--cluster /dev/zero` can cost.
pub(crate) const MAX_INPUT: u64 = 256 << 20;

/// Why a command failed; the exit code follows from it.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Bad input (arguments, files, configuration): exit code 2.
    Input(String),
    /// The work itself failed (netlink, the API server): exit code 1.
    Runtime(String),
    /// A check ran and found the mesh unhealthy (`wgmesh status`, `why --live`): exit code
    /// [`UNHEALTHY`], after the report was printed.
    #[allow(dead_code)] // the agent binary shares this module and never reports it
    Unhealthy(String),
}

/// The exit code of a check that found the mesh unhealthy.
pub(crate) const UNHEALTHY: u8 = 3;

impl Failure {
    /// Prints `error: …` on one line and returns the exit code.
    pub(crate) fn report(self) -> ExitCode {
        match self {
            Failure::Input(e) => {
                say(&format!("error: {e}"));
                ExitCode::from(2)
            }
            Failure::Runtime(e) => {
                say(&format!("error: {e}"));
                ExitCode::FAILURE
            }
            Failure::Unhealthy(e) => {
                say(&format!("unhealthy: {e}"));
                ExitCode::from(UNHEALTHY)
            }
        }
    }
}

/// Parses the command line. `--help` and `--version` print and exit 0; any mistake prints one
/// line and exits 2.
pub(crate) fn parse_args<P: clap::Parser>() -> Result<P, ExitCode> {
    use clap::error::ErrorKind;
    match P::try_parse() {
        Ok(p) => Ok(p),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                Err(ExitCode::SUCCESS)
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                Err(ExitCode::from(2))
            }
            _ => {
                // clap's message is its first paragraph (tips and usage follow); as one line.
                let rendered = e.render().to_string();
                let paragraph = rendered.split("\n\n").next().unwrap_or_default();
                let message = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
                let message = message.strip_prefix("error: ").unwrap_or(&message);
                Err(Failure::Input(format!("{message} (see --help)")).report())
            }
        },
    }
}

/// One line on standard error; a closed standard error is not worth a panic.
pub(crate) fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Writes the output through a buffer. A reader that went away (`| head -c1`) ends the
/// program quietly with success, as it would for `cat`; any other write error
/// (`> /dev/full`) is a failure.
pub(crate) fn write_out(
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), Failure> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Runtime(format!("cannot write the output: {e}"))),
    }
}

/// Writes `value` as JSON, streamed: indented for a person at a terminal, compact for a
/// program (a pipe or a file), which is several times faster to write and to read for a big
/// plan.
pub(crate) fn emit_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<(), Failure> {
    use std::io::IsTerminal as _;
    let pretty = std::io::stdout().is_terminal();
    write_out(|out| {
        if pretty {
            serde_json::to_writer_pretty(&mut *out, value)?;
        } else {
            serde_json::to_writer(&mut *out, value)?;
        }
        out.write_all(b"\n")
    })
}

/// Reads a text file (`-`: standard input), at most [`MAX_INPUT`] bytes
/// (`wgmesh_core::spec::read_bounded`: `--cluster /dev/zero` costs 256 MiB, not all memory).
pub(crate) fn read_input(path: &Path, what: &str) -> Result<String, Failure> {
    use wgmesh::core::spec::{ReadError, read_bounded};
    let shown = path.display();
    let limit = usize::try_from(MAX_INPUT).unwrap_or(usize::MAX);
    let read = if path == Path::new("-") {
        read_bounded(std::io::stdin().lock(), limit)
    } else {
        std::fs::File::open(path)
            .map_err(ReadError::Io)
            .and_then(|f| read_bounded(f, limit))
    };
    read.map_err(|e| match e {
        ReadError::TooLarge { .. } => Failure::Input(format!(
            "the {what} {shown} is larger than {} MiB",
            MAX_INPUT >> 20
        )),
        ReadError::Io(e) => Failure::Input(format!("cannot read the {what} {shown}: {e}")),
        other => Failure::Input(format!("the {what} {shown} is {other}")),
    })
}
