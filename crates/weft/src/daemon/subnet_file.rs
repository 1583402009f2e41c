//! Writing `subnet.env` atomically (temp file, fsync, rename) with mode 0644.

use std::path::Path;

/// Reads the previous subnet file, if any.
pub fn read_previous(path: &Path) -> Option<weft_core::subnet_env::ParsedSubnetEnv> {
    std::fs::read_to_string(path).ok().map(|t| weft_core::subnet_env::parse(&t))
}

/// Writes `text` to `path` so readers see the old or the new file, never a partial one
/// (see [`crate::fsutil::write_atomic`]: no symlink followed, an existing directory's mode
/// kept, a missing one created 0755).
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    crate::fsutil::write_atomic(path, text.as_bytes(), 0o644, 0o755)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_atomically_with_mode_0644_and_creates_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/flannel/subnet.env");
        write_atomic(&p, "FLANNEL_MTU=1500\n").unwrap();
        write_atomic(&p, "FLANNEL_MTU=1450\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "FLANNEL_MTU=1450\n");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1, "no temp file left");
        assert_eq!(read_previous(&p).unwrap().mtu, Some(1450));
    }

    #[test]
    fn a_subnet_file_in_a_world_writable_dir_follows_no_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let victim = d.path().join("shadow");
        std::fs::write(&victim, "root:x:0:0\n").unwrap();
        // The temp names the old code used, and the names a crashed writer leaves.
        let pid = std::process::id();
        for name in [format!(".subnet.env.{pid}.tmp"), ".subnet.env.tmp.4194399.0".to_string()] {
            std::os::unix::fs::symlink(&victim, shared.join(name)).unwrap();
        }
        let p = shared.join("subnet.env");
        write_atomic(&p, "FLANNEL_MTU=1450\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root:x:0:0\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "FLANNEL_MTU=1450\n");
        assert_eq!(std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777, 0o1777);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
    }
}
