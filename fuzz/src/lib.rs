//! # wgmesh-fuzz
//!
//! Fuzz targets for the parsers that read untrusted input, on the stable toolchain: a small
//! mutational driver ([`run`]) that replays a kept corpus, then mutates it (bit flips, byte
//! edits, cut and repeated ranges, splices, and tokens from a per-target dictionary) until
//! its time budget is spent. Every input must pass the target's check, must not panic, and
//! must finish within a time bound; an input that fails is written to
//! `fuzz/artifacts/<target>/` and the run fails, naming it.
//!
//! Targets live in [`targets`]; each has a test in `fuzz/tests/` and a corpus in
//! `fuzz/corpus/<target>/`: `cluster` (the cluster description parser) and `netlink` (every
//! kernel answer the Linux dataplane parses). A new target is a check
//! function, a dictionary, a corpus directory and a three-line test.
//!
//! ```text
//! cargo test -p wgmesh-fuzz                                    # a few seconds per target
//! WGMESH_FUZZ_SECONDS=300 cargo test --release -p wgmesh-fuzz -- --nocapture
//! WGMESH_FUZZ_SEED=42 WGMESH_FUZZ_SECONDS=60 cargo test --release -p wgmesh-fuzz --test cluster
//! ```
//!
//! There is no coverage feedback (that needs nightly's sanitizer coverage): the corpus is
//! the guide, so it holds one input per feature worth reaching. When a run finds a failure,
//! fix it and copy the artifact into the corpus, so every later run replays it first.

pub mod targets;

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One fuzz target.
pub struct Target {
    /// Its name: the corpus and artifact directories are named after it.
    pub name: &'static str,
    /// Tokens worth inserting (keywords, delimiters, values at the edges).
    pub dictionary: &'static [&'static str],
    /// The check: `Err` describes a failure (a panic is one too).
    pub check: fn(&[u8]) -> Result<(), String>,
}

/// How long and how a run goes.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Time for mutated inputs, after the corpus.
    pub duration: Duration,
    /// The random seed; the run prints it.
    pub seed: u64,
    /// Inputs never grow beyond this many bytes.
    pub max_len: usize,
    /// An input that takes longer than this fails.
    pub slow: Duration,
}

impl Budget {
    /// From the environment: `WGMESH_FUZZ_SECONDS` (default 3), `WGMESH_FUZZ_SEED` (default:
    /// fixed for a default run, from the clock when a duration is given), `WGMESH_FUZZ_MAX_LEN`
    /// (default 65536 bytes), `WGMESH_FUZZ_SLOW_MS` (default 5000).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let seconds = var("WGMESH_FUZZ_SECONDS");
        let seed = var("WGMESH_FUZZ_SEED").unwrap_or_else(|| match seconds {
            None => 0x5eed_f00d,
            Some(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        });
        Self {
            duration: Duration::from_secs(seconds.unwrap_or(3)),
            seed,
            max_len: var("WGMESH_FUZZ_MAX_LEN").map_or(1 << 16, |v| v as usize),
            slow: Duration::from_millis(var("WGMESH_FUZZ_SLOW_MS").unwrap_or(5000)),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Inputs checked, the corpus included.
    pub executions: u64,
    /// Corpus entries.
    pub corpus: usize,
    /// The seed used.
    pub seed: u64,
}

/// A failed input.
#[derive(Debug)]
pub struct Failure {
    /// Where the input was written, if it could be.
    pub artifact: Option<PathBuf>,
    /// What went wrong.
    pub message: String,
    /// The input, shortened for display.
    pub preview: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n  input: {}", self.message, self.preview)?;
        if let Some(path) = &self.artifact {
            write!(f, "\n  saved: {}", path.display())?;
        }
        Ok(())
    }
}

/// The directory of this crate (`fuzz/`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The corpus of a target: every file in `fuzz/corpus/<name>/`, sorted by name.
pub fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = root().join("corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

/// Replays the target's corpus, then fuzzes it within the budget.
pub fn run(target: &Target, budget: &Budget) -> Result<Report, Box<Failure>> {
    let corpus = corpus(target.name);
    if corpus.is_empty() {
        return Err(Box::new(Failure {
            artifact: None,
            message: format!("{}: the corpus is empty", target.name),
            preview: String::new(),
        }));
    }
    let mut executions = 0u64;
    for (path, input) in &corpus {
        executions += 1;
        if let Err(message) = execute(target, input, budget.slow) {
            return Err(Box::new(Failure {
                artifact: Some(path.clone()),
                message: format!("{}: corpus entry fails: {message}", target.name),
                preview: preview(input),
            }));
        }
    }
    let mut rng = Rng(budget.seed | 1);
    let start = Instant::now();
    let inputs: Vec<&[u8]> = corpus.iter().map(|(_, b)| b.as_slice()).collect();
    while start.elapsed() < budget.duration {
        let base = inputs[rng.below(inputs.len())];
        let mut input = base.to_vec();
        for _ in 0..=rng.below(8) {
            mutate(
                &mut input,
                &inputs,
                target.dictionary,
                &mut rng,
                budget.max_len,
            );
        }
        executions += 1;
        if let Err(message) = execute(target, &input, budget.slow) {
            let artifact = save(target.name, &input);
            return Err(Box::new(Failure {
                artifact,
                message: format!("{}: {message} (seed {})", target.name, budget.seed),
                preview: preview(&input),
            }));
        }
    }
    Ok(Report {
        executions,
        corpus: corpus.len(),
        seed: budget.seed,
    })
}

/// Runs one input: the check passes, without a panic, in time.
pub fn execute(target: &Target, input: &[u8], slow: Duration) -> Result<(), String> {
    quiet_panics();
    PANIC_AT.with(|at| at.borrow_mut().take());
    QUIET.with(|q| q.set(true));
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| (target.check)(input)));
    let took = start.elapsed();
    QUIET.with(|q| q.set(false));
    match result {
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let at = PANIC_AT
                .with(|at| at.borrow_mut().take())
                .unwrap_or_default();
            Err(format!("panicked at {at}: {what}"))
        }
        Ok(Err(message)) => Err(message),
        Ok(Ok(())) if took > slow => Err(format!("took {took:?} (limit {slow:?})")),
        Ok(Ok(())) => Ok(()),
    }
}

thread_local! {
    /// Set while [`execute`] runs a check on this thread: its panics are reported by
    /// [`execute`] itself, not printed by the panic hook.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the last quiet panic on this thread happened.
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs, once, a panic hook that keeps quiet about the panics of a running check: the
/// check's failure names the panic and where it happened, and panics caught inside the
/// code under test (`wgmesh_netlink::wire::parse` catches the rust-netlink parsers' own)
/// would otherwise print a backtrace per input, tens of thousands in a run. Panics on other
/// threads, or outside a check, go to the previous hook.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(std::cell::Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                PANIC_AT.with(|p| *p.borrow_mut() = Some(at));
            } else {
                previous(info);
            }
        }));
    });
}

fn save(name: &str, input: &[u8]) -> Option<PathBuf> {
    let dir = root().join("artifacts").join(name);
    std::fs::create_dir_all(&dir).ok()?;
    // FNV-1a names the file by content.
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("failure-{hash:016x}"));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

fn preview(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(&input[..input.len().min(300)]);
    let mut s = format!("{text:?}");
    if input.len() > 300 {
        s.push_str(&format!(" …({} bytes)", input.len()));
    }
    s
}

/// xorshift64*: small, fast and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(
    input: &mut Vec<u8>,
    corpus: &[&[u8]],
    dictionary: &[&str],
    rng: &mut Rng,
    max_len: usize,
) {
    let len = input.len();
    let at = rng.below(len + 1);
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next() as u8;
        }
        2 => input.insert(at, rng.next() as u8),
        3 if len > 0 => {
            let end = (at + 1 + rng.below(16)).min(len);
            input.drain(at.min(len - 1)..end);
        }
        4 if len > 0 => {
            // Repeat a short range: nesting and long lists.
            let start = rng.below(len);
            let end = (start + 1 + rng.below(8)).min(len);
            let piece = input[start..end].to_vec();
            let most = if rng.below(4) == 0 { 2000 } else { 8 };
            let times = 1 + rng.below(most);
            let mut rep = Vec::with_capacity(piece.len() * times);
            for _ in 0..times {
                rep.extend_from_slice(&piece);
            }
            input.splice(start..start, rep);
        }
        5 | 6 if !dictionary.is_empty() => {
            let token = dictionary[rng.below(dictionary.len())];
            input.splice(at..at, token.bytes());
        }
        7 => {
            // Splice: this input's head with another's tail.
            let other = corpus[rng.below(corpus.len())];
            let from = rng.below(other.len() + 1);
            input.truncate(at);
            input.extend_from_slice(&other[from..]);
        }
        _ if len > 1 => {
            // Swap two ranges' bytes (reorders fields and lines).
            let a = rng.below(len);
            let b = rng.below(len);
            input.swap(a, b);
        }
        _ => input.push(rng.next() as u8),
    }
    input.truncate(max_len);
}

/// Runs a target as a test: panics with the failure, or prints the report.
pub fn test(target: &Target) {
    let budget = Budget::from_env();
    match run(target, &budget) {
        Ok(report) => eprintln!(
            "fuzz {}: {} inputs ({} from the corpus) in {:?}, seed {}",
            target.name, report.executions, report.corpus, budget.duration, report.seed
        ),
        Err(failure) => panic!("{failure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panics(input: &[u8]) -> Result<(), String> {
        // A panic caught inside the code under test is no failure.
        let caught = catch_unwind(|| panic!("caught inside"));
        assert!(caught.is_err());
        if input.first() == Some(&1) {
            panic!("boom {}", input.len());
        }
        Ok(())
    }

    /// A check's panic is a failure that names the panic and where it happened (the quiet
    /// hook records it instead of printing it); a panic caught inside the check is not.
    #[test]
    fn a_panic_is_a_failure_with_its_place() {
        let target = Target {
            name: "test",
            dictionary: &[],
            check: panics,
        };
        let slow = Duration::from_secs(5);
        assert_eq!(execute(&target, &[0], slow), Ok(()));
        let failure = execute(&target, &[1, 2], slow).unwrap_err();
        assert!(failure.starts_with("panicked at "), "{failure}");
        assert!(failure.contains("lib.rs:"), "{failure}");
        assert!(failure.ends_with(": boom 2"), "{failure}");
        assert_eq!(execute(&target, &[0], slow), Ok(()));
    }
}
