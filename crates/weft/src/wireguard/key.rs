//! The private key file (`/run/flannel/wgkey`, or `$WIREGUARD_KEY_FILE`): loaded when it
//! exists, generated when it does not, as flanneld does. The key never reaches a log, an
//! error message or a metric.

use std::path::{Path, PathBuf};

use rand::TryRngCore;
use weft_core::wireguard::{KEY_FILE, KEY_FILE_ENV, Key};

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file exists but holds no key: left as it is.
    #[error(
        "the WireGuard private key file {path} is not a key ({problem}); it was left untouched: \
         fix it (base64 of 32 bytes, as `wg genkey` writes) or delete it to have a new key generated"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the content).
        problem: String,
    },
    /// Reading or writing the file failed.
    #[error("the WireGuard private key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Where the key lives: `$WIREGUARD_KEY_FILE` when set and not empty, else flannel's path.
pub fn key_path() -> PathBuf {
    match std::env::var_os(KEY_FILE_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(KEY_FILE),
    }
}

/// Loads the private key at `path`, or generates one there (mode 0400, directory 0755,
/// written atomically) when there is none. `Ok((key, generated))`.
pub fn load_or_generate(path: &Path) -> Result<(Key, bool), KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.to_path_buf(), source };
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| KeyFileError::Malformed { path: path.to_path_buf(), problem: "not text".into() })?;
            let key =
                Key::parse(text).map_err(|problem| KeyFileError::Malformed { path: path.to_path_buf(), problem })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let key = Key::clamped(bytes);
            // flanneld writes the bare base64 text, no newline.
            crate::fsutil::write_atomic(path, key.to_base64().as_bytes(), 0o400, 0o755).map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

/// The public key of a private key.
pub fn public_of(private: &Key) -> Key {
    let secret = boringtun::x25519::StaticSecret::from(private.0);
    Key(boringtun::x25519::PublicKey::from(&secret).to_bytes())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn generated_once_then_kept_with_mode_0400() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let (k, generated) = load_or_generate(&path).unwrap();
        assert!(generated);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), k.to_base64());
        let (again, generated) = load_or_generate(&path).unwrap();
        assert_eq!((again, generated), (k, false), "a restart keeps the key");
        assert_ne!(public_of(&k), k);
    }

    #[test]
    fn a_malformed_key_file_is_an_error_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        for junk in [&b"not a key"[..], b"", b"\xff\xfe", b"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk=="] {
            std::fs::write(&path, junk).unwrap();
            let e = load_or_generate(&path).unwrap_err().to_string();
            assert!(e.contains("is not a key") && e.contains("delete it"), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), junk, "left untouched");
        }
        // A key written by `wg genkey` (with its newline) is read.
        std::fs::write(&path, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        let (k, generated) = load_or_generate(&path).unwrap();
        assert!(!generated);
        // `wg pubkey` of that key (the WireGuard documentation's example pair).
        assert_eq!(public_of(&k).to_base64(), "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=");
    }
}
