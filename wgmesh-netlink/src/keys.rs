//! Private keys: the key ring the executor programs, and the key file (mode 0600, generated
//! atomically when absent). Keys are never logged, displayed or serialized.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use wgmesh_core::{Family, PrivateKey, PublicKey};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Where a node's private key lives unless told otherwise: the `wgmesh` CLI's `apply`, the
/// agent and the DaemonSet's hostPath volume all use this one path, so a node keeps one
/// identity whichever of them programs it.
pub const DEFAULT_PRIVATE_KEY_FILE: &str = "/var/lib/wgmesh/private-key";

/// The private keys of the local node, per family. Its `Debug` shows only public keys.
///
/// ```
/// use wgmesh_netlink::KeyRing;
/// use wgmesh_core::{Family, PrivateKey};
/// let key = PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=")?;
/// let ring = KeyRing::single(key);
/// assert_eq!(ring.public_key(Family::V6), ring.public_key(Family::V4));
/// assert!(!format!("{ring:?}").contains("aLHd"));
/// # Ok::<(), wgmesh_core::KeyError>(())
/// ```
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: [Option<PrivateKey>; 2],
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("ipv4", &self.public_key(Family::V4))
            .field("ipv6", &self.public_key(Family::V6))
            .finish()
    }
}

impl KeyRing {
    /// No keys: devices keep whatever key they have.
    pub fn none() -> Self {
        Self::default()
    }

    /// One key for both families' interfaces.
    pub fn single(key: PrivateKey) -> Self {
        Self {
            keys: [Some(key.clone()), Some(key)],
        }
    }

    /// A key per family.
    pub fn per_family(v4: Option<PrivateKey>, v6: Option<PrivateKey>) -> Self {
        Self { keys: [v4, v6] }
    }

    /// The private key of a family.
    pub fn private_key(&self, family: Family) -> Option<&PrivateKey> {
        self.keys[family.index()].as_ref()
    }

    /// The public key of a family's private key.
    pub fn public_key(&self, family: Family) -> Option<PublicKey> {
        self.private_key(family).map(PrivateKey::public_key)
    }

    /// Public keys for [`DiffOptions`](crate::DiffOptions).
    pub fn public_keys(&self) -> [Option<PublicKey>; 2] {
        [self.public_key(Family::V4), self.public_key(Family::V6)]
    }
}

/// Where a loaded key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyOrigin {
    /// Read from an existing file.
    Loaded,
    /// Generated now and written to the file.
    Generated,
}

fn key_error(path: &Path, problem: impl Into<String>) -> Error {
    Error::KeyFile {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Reads the private key in `path` (the base64 text of `wg genkey`), refusing files that the
/// group or others can read or write; when the file does not exist, generates a key and
/// writes it atomically (temporary file in the same directory, mode 0600, fsync, rename).
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("wgmesh-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// use wgmesh_netlink::keys::{load_or_generate, KeyOrigin};
/// let path = dir.join("private.key");
/// let (key, origin) = load_or_generate(&path)?;
/// assert_eq!(origin, KeyOrigin::Generated);
/// let (again, origin) = load_or_generate(&path)?;
/// assert_eq!((again == key, origin), (true, KeyOrigin::Loaded));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_or_generate(path: &Path) -> Result<(PrivateKey, KeyOrigin)> {
    match fs::symlink_metadata(path) {
        Ok(_) => load(path).map(|k| (k, KeyOrigin::Loaded)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            write_atomically(path, &key)?;
            Ok((key, KeyOrigin::Generated))
        }
        Err(e) => Err(Error::io(format!("inspect {}", path.display()), e)),
    }
}

/// Reads an existing key file, with the same checks as [`load_or_generate`].
pub fn load(path: &Path) -> Result<PrivateKey> {
    let meta = fs::metadata(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(key_error(path, "is not a regular file"));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_error(
            path,
            format!(
                "mode {mode:04o} lets {} read or change it; a private key must be mode 0600 (chmod 600 {})",
                if mode & 0o007 != 0 {
                    "everyone"
                } else {
                    "the group"
                },
                path.display()
            ),
        ));
    }
    if meta.len() > 1024 {
        return Err(key_error(path, "is too large to be a WireGuard key"));
    }
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?,
    );
    PrivateKey::from_base64(text.trim())
        .map_err(|e| key_error(path, format!("not a WireGuard private key ({e})")))
}

fn write_atomically(path: &Path, key: &PrivateKey) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let name = path
        .file_name()
        .ok_or_else(|| key_error(path, "has no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let doing = format!("write {}", tmp.display());
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&doing, e))?;
    // The umask cannot widen 0600, but make sure anyway.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&doing, e))?;
    let mut text = key.to_base64();
    text.push('\n');
    let r = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&doing, e));
    drop(text);
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("rename to {}", path.display()), e)
    })?;
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgmesh-keys-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn generated_file_is_0600_and_reloads() {
        let d = tmpdir("gen");
        let p = d.join("sub/key");
        let (k, o) = load_or_generate(&p).unwrap();
        assert_eq!(o, KeyOrigin::Generated);
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let (k2, o2) = load_or_generate(&p).unwrap();
        assert_eq!((k == k2, o2), (true, KeyOrigin::Loaded));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(d.join("sub")).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn readable_by_others_is_refused_and_says_why() {
        let d = tmpdir("mode");
        let p = d.join("key");
        fs::write(&p, "aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=\n").unwrap();
        for (mode, who) in [
            (0o644, "everyone"),
            (0o640, "the group"),
            (0o604, "everyone"),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains(who) && e.contains("0600"), "{e}");
            assert!(!e.contains("aLHd"));
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&p).is_ok());
        fs::write(&p, "not a key").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("not a WireGuard private key"), "{e}");
        assert!(load(&d).is_err()); // a directory
        fs::remove_dir_all(&d).unwrap();
    }
}
