//! Child processes with a deadline. A program from outside (iptables waiting for the
//! xtables lock, a wedged nft) must never hang the daemon: past its deadline the child is
//! killed and the caller gets an error it can retry.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// A child process that did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// The program ran past its deadline and was killed.
    #[error("{command} did not finish within {after:?} and was killed")]
    TimedOut {
        /// The command line.
        command: String,
        /// The deadline.
        after: Duration,
    },
    /// The program ran and failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Runs `program args`, feeding `stdin`, and returns its stdout; kills it after `timeout`.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Result<String, ProcessError> {
    let command = || format!("{program} {}", args.join(" "));
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the future at the deadline kills the child; tokio reaps it.
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn { program: program.to_string(), source })?;
    let input = stdin.map(str::to_string);
    let pipe = child.stdin.take();
    let work = async move {
        if let (Some(text), Some(mut pipe)) = (input, pipe) {
            // A child that exits without reading its input is judged by its status below.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        child.wait_with_output().await
    };
    let out = match tokio::time::timeout(timeout, work).await {
        Err(_) => return Err(ProcessError::TimedOut { command: command(), after: timeout }),
        Ok(r) => r.map_err(|source| ProcessError::Spawn { program: program.to_string(), source })?,
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ProcessError::Failed {
            command: command(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn output_failure_and_deadline() {
        assert_eq!(run("cat", &[], Some("hi"), Duration::from_secs(5)).await.unwrap(), "hi");
        let e = run("sh", &["-c", "echo nope >&2; exit 3"], None, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(&e, ProcessError::Failed { stderr, .. } if stderr == "nope"), "{e}");
        assert!(matches!(
            run("/nonexistent/weft-x", &[], None, Duration::from_secs(1)).await,
            Err(ProcessError::Spawn { .. })
        ));
        // A hung child: killed at the deadline, not waited for.
        let started = Instant::now();
        let e = run("sleep", &["30"], None, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, ProcessError::TimedOut { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
