//! `wgmesh genkey` and `wgmesh pubkey`: the same keys, in the same text, as `wg genkey` and
//! `wg pubkey`.

use std::io::Read as _;
use std::path::Path;

use wgmesh::core::PrivateKey;

use crate::emit;
use crate::shared::Failure;

pub(crate) fn genkey() -> Result<(), Failure> {
    let key = PrivateKey::generate();
    // Sized once, so no copy of the key is left behind by a reallocation.
    let mut line = zeroize::Zeroizing::new(String::with_capacity(64));
    line.push_str(&key.to_base64());
    line.push('\n');
    emit(&line)
}

pub(crate) fn pubkey() -> Result<(), Failure> {
    let text = read_secret(Path::new("-"), "private key on standard input")?;
    let key = PrivateKey::from_base64(text.trim())
        .map_err(|e| Failure::Input(format!("standard input: not a private key: {e}")))?;
    emit(&format!("{}\n", key.public_key()))
}

/// Reads a secret (a private key) from a file or standard input into memory that is wiped
/// when dropped. Keys are 44 characters; anything past 4 KiB is not a key.
pub(crate) fn read_secret(path: &Path, what: &str) -> Result<zeroize::Zeroizing<String>, Failure> {
    const MAX: usize = 4096;
    let shown = path.display();
    // Allocated once, never grown: no copy of the key is left behind in freed memory.
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(MAX + 1));
    let read = if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(MAX as u64 + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX as u64 + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| Failure::Input(format!("cannot read the {what} {shown}: {e}")))?;
    if bytes.len() > MAX {
        return Err(Failure::Input(format!(
            "the {what} {shown} is not a key (too long)"
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Failure::Input(format!("the {what} {shown} is not a key (not text)")))?;
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}
