//! Writing files that other programs read (subnet.env, CNI state, lab state) so that a
//! reader sees the old or the new content, never a partial one, and so that nothing planted
//! in the directory (a symlink at the temp path, a world-writable parent) can redirect the
//! write or make us change a mode we do not own.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes concurrent writes of one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The prefix of every temp file of `name`: `.<name>.tmp.<pid>.<seq>`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp.")
}

/// Removes temp files of `name` in `dir` left by a writer that no longer runs (a crash
/// between create and rename). Temp files of live processes are left alone: they may be
/// mid-write.
pub fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = temp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            // unlink never follows a symlink: a planted link is removed, its target untouched.
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes the temp files of every name in `dir` whose writer no longer runs.
pub fn remove_all_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(n) = file_name.to_str() else { continue };
        if let Some(i) = n.rfind(".tmp.").filter(|_| n.starts_with('.')) {
            remove_stale_temps(dir, &n[1..i]);
        }
    }
}

/// Creates the missing directories of `dir` with `mode`; an existing directory keeps its
/// mode (it may be shared, e.g. /run or /tmp).
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Creates a fresh temp file next to `path` with `O_CREAT | O_EXCL | O_NOFOLLOW`: an
/// existing file or symlink at the temp path is never opened, another name is tried.
fn create_temp(dir: &Path, name: &str, mode: u32) -> std::io::Result<(PathBuf, std::fs::File)> {
    let pid = std::process::id();
    for _ in 0..1000 {
        let tmp = dir.join(format!("{}{pid}.{}", temp_prefix(name), SEQ.fetch_add(1, Ordering::Relaxed)));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!("no free temp file name for {name} in {}", dir.display())))
}

/// Writes `data` to `path` with `mode`: a temp file in the same directory (exclusive, no
/// symlink followed), fsync, rename over `path`, fsync of the directory. Missing parent
/// directories are created with `dir_mode`; existing ones are never chmod-ed. Stale temp
/// files of a crashed earlier write are removed first.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, dir_mode: u32) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    ensure_dir(dir, dir_mode)?;
    remove_stale_temps(dir, name);
    let (tmp, mut f) = create_temp(dir, name, mode)?;
    let result = (|| {
        f.write_all(data)?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
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

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_planted_symlink_at_the_temp_path_is_not_followed_and_the_dir_mode_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // Every name this process would try first, and one of a dead writer.
        let pid = std::process::id();
        let next = SEQ.load(Ordering::Relaxed);
        for seq in next..next + 64 {
            std::os::unix::fs::symlink(&victim, shared.join(format!(".state.tmp.{pid}.{seq}"))).unwrap();
        }
        let stale = shared.join(".state.tmp.4194399.0");
        std::os::unix::fs::symlink(&victim, &stale).unwrap();

        write_atomic(&shared.join("state"), b"new", 0o640, 0o700).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the symlink was not followed");
        assert_eq!(std::fs::read_to_string(shared.join("state")).unwrap(), "new");
        assert!(std::fs::symlink_metadata(shared.join("state")).unwrap().file_type().is_file());
        assert_eq!(mode(&shared.join("state")), 0o640);
        assert_eq!(mode(&shared), 0o1777, "an existing directory keeps its mode");
        assert!(std::fs::symlink_metadata(&stale).is_err(), "a dead writer's temp file is removed");
        let other = shared.join(".never-written.tmp.4194399.7");
        std::fs::write(&other, "half").unwrap();
        let live = shared.join(format!(".in-flight.tmp.{pid}.0"));
        std::fs::write(&live, "half").unwrap();
        remove_all_stale_temps(&shared);
        assert!(!other.exists(), "stale temps of any name go");
        assert!(live.exists(), "a live writer's temp file stays");
    }

    #[test]
    fn missing_dirs_get_the_mode_and_no_temp_file_stays() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("a/b/file");
        write_atomic(&p, b"1", 0o600, 0o700).unwrap();
        write_atomic(&p, b"2", 0o600, 0o700).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "2");
        assert_eq!(mode(&root.path().join("a/b")), 0o700);
        assert_eq!(std::fs::read_dir(root.path().join("a/b")).unwrap().count(), 1, "no temp file left");
        // A write into a path whose parent is a file fails cleanly.
        assert!(write_atomic(&p.join("x"), b"3", 0o600, 0o700).is_err());
    }
}
