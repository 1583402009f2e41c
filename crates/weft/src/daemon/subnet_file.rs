//! Writing `subnet.env` atomically (temp file, fsync, rename) with mode 0644.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Reads the previous subnet file, if any.
pub fn read_previous(path: &Path) -> Option<weft_core::subnet_env::ParsedSubnetEnv> {
    std::fs::read_to_string(path).ok().map(|t| weft_core::subnet_env::parse(&t))
}

/// Writes `text` to `path` so readers see the old or the new file, never a partial one.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
