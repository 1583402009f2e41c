//! Masquerade and forward rules, through iptables (flannel's default) or nftables
//! (`EnableNFTables`), installed at startup and re-checked every `--iptables-resync` seconds.

pub mod iptables;
pub mod nftables;

use weft_core::firewall::Family;

/// A firewall command that failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The binary could not be run.
    #[error("cannot run {program}: {source}; install the iptables and nftables packages")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// The binary ran and failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
}

/// The rule set for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyRules {
    /// Address family.
    pub family: Family,
    /// Cluster network (CIDR text).
    pub network: String,
    /// Our lease subnet (CIDR text).
    pub subnet: String,
}

/// What to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    /// `--ip-masq`.
    pub masq: bool,
    /// `--iptables-forward-rules`.
    pub forward: bool,
    /// `--ip-masq-fully-random-disable`.
    pub fully_random_disable: bool,
    /// One entry per enabled family.
    pub families: Vec<FamilyRules>,
}

/// The traffic manager in use.
pub enum Firewall {
    /// iptables-restore transactions.
    Iptables(iptables::Iptables),
    /// One nft transaction per family.
    Nftables(nftables::Nftables),
}

impl Firewall {
    /// Picks the manager and removes the other one's leftovers (flannel does the same).
    pub async fn setup(use_nft: bool, spec: &FirewallSpec) -> Result<Firewall, FirewallError> {
        if use_nft {
            iptables::remove_all().await;
            let fw = nftables::Nftables::new(spec).await;
            fw.ensure(spec).await?;
            Ok(Firewall::Nftables(fw))
        } else {
            nftables::remove_all().await;
            let fw = iptables::Iptables::new(spec).await;
            fw.ensure(spec).await?;
            Ok(Firewall::Iptables(fw))
        }
    }

    /// Puts back what is missing or changed; `Ok(true)` when something was repaired.
    pub async fn resync(&self, spec: &FirewallSpec) -> Result<bool, FirewallError> {
        match self {
            Firewall::Iptables(f) => f.ensure(spec).await,
            Firewall::Nftables(f) => f.ensure(spec).await,
        }
    }
}

/// Runs `program args`, feeding `stdin`; returns stdout.
pub(crate) async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| FirewallError::Spawn { program: program.to_string(), source })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| FirewallError::Spawn { program: program.to_string(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
