//! Entering a network namespace: the one way weft does it (CNI CHECK, the lab, tests).
//! Namespace membership is per thread, so the work runs on a thread of its own that enters
//! the namespace first and ends with the work; the caller's thread never changes namespace.

use std::path::{Path, PathBuf};

/// Why the work could not run in the namespace.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// The namespace file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The namespace path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `setns` refused.
    #[error("cannot enter {path}: {source}")]
    Enter {
        /// The namespace path.
        path: PathBuf,
        /// The errno.
        source: nix::Error,
    },
    /// The thread could not be started.
    #[error("cannot start a thread for {path}: {source}")]
    Spawn {
        /// The namespace path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The work panicked.
    #[error("the work in {path} panicked")]
    Panicked {
        /// The namespace path.
        path: PathBuf,
    },
}

/// Runs `f` on a new thread that has entered the network namespace at `path` (for example
/// `/run/netns/NAME` or a CNI_NETNS path) and returns its result.
pub fn run_in<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NsError> {
    let file = std::fs::File::open(path).map_err(|source| NsError::Open { path: path.into(), source })?;
    let owned = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<T, NsError> {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|source| NsError::Enter { path: owned, source })?;
            Ok(f())
        })
        .map_err(|source| NsError::Spawn { path: path.into(), source })?;
    thread.join().map_err(|_| NsError::Panicked { path: path.into() })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_a_clear_error_and_runs_nothing() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let err = run_in(Path::new("/run/netns/weft-no-such-namespace"), move || {
            r.store(true, std::sync::atomic::Ordering::SeqCst)
        })
        .unwrap_err();
        assert!(matches!(err, NsError::Open { .. }), "{err}");
        assert!(err.to_string().contains("/run/netns/weft-no-such-namespace"), "{err}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let err = run_in(Path::new("/proc/self/status"), || ()).unwrap_err();
        assert!(matches!(err, NsError::Enter { .. }), "{err}");
    }

    #[test]
    fn the_work_runs_in_the_namespace_and_the_caller_stays_where_it_was() {
        // Our own namespace, entered by path: the work sees the same inode, and a panic in
        // the work is an error, not a panic of the caller.
        let ino = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
        let before = ino("/proc/thread-self/ns/net");
        let inside = run_in(Path::new("/proc/self/ns/net"), move || ino("/proc/thread-self/ns/net")).unwrap();
        assert_eq!(inside, before);
        assert!(matches!(run_in(Path::new("/proc/self/ns/net"), || panic!("boom")), Err(NsError::Panicked { .. })));
        assert_eq!(ino("/proc/thread-self/ns/net"), before);
    }
}
