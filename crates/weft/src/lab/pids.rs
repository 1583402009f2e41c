//! The lab's own processes (daemons, etcd, API server, responders): whether one still
//! runs, and signals to it.

/// Whether process `pid` runs (a zombie whose threads are all gone does not; our own exited
/// child is reaped on the way).
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let mut status = 0;
    // SAFETY: waitpid(2) with WNOHANG on a pid; `status` is a valid out-pointer. Reaps the
    // daemon if it is our exited child, so it does not linger as a zombie that looks alive.
    if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
        return false;
    }
    // Another parent's exited child is a zombie until reaped: not running, once all its
    // threads are gone too (a zombie leader can still have threads closing its sockets).
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => {
            let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
            !field("State:").starts_with('Z') || field("Threads:").parse::<u32>().unwrap_or(0) > 1
        }
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` (0 is never signalled: it would mean our own process group).
pub fn kill(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) on a pid the lab started; no memory is involved.
        unsafe { libc::kill(pid as i32, sig) };
    }
}
