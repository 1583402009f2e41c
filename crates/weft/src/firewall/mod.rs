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
    /// The binary hung (e.g. waiting for the xtables lock) and was killed.
    #[error("{command} did not finish within {after:?} and was killed; is another program holding the xtables lock?")]
    TimedOut {
        /// The command line.
        command: String,
        /// The deadline.
        after: std::time::Duration,
    },
}

/// How long one iptables or nft command may take.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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

/// Runs `program args`, feeding `stdin`; returns stdout. Killed after [`COMMAND_TIMEOUT`].
pub(crate) async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    use crate::process::ProcessError;
    crate::process::run(program, args, stdin, COMMAND_TIMEOUT).await.map_err(|e| match e {
        ProcessError::Spawn { program, source } => FirewallError::Spawn { program, source },
        ProcessError::Failed { command, stderr } => FirewallError::Failed { command, stderr },
        ProcessError::TimedOut { command, after } => FirewallError::TimedOut { command, after },
    })
}

/// Re-checks the rules every `every` and whenever the reconciler makes a pass (`kick`: the
/// same triggers as the data plane), on a task of its own, so a slow or hung iptables never
/// delays lease events, the reconciler or renewal. Kicks during a resync coalesce into one.
pub fn spawn_resync(
    fw: Firewall,
    spec: FirewallSpec,
    every: std::time::Duration,
    kick: std::sync::Arc<tokio::sync::Notify>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = kick.notified() => {}
            }
            match fw.resync(&spec).await {
                Ok(true) => tracing::info!("firewall rules were missing or changed; restored"),
                Ok(false) => {}
                Err(e) => {
                    metrics.error("firewall");
                    tracing::warn!("firewall resync failed: {e}");
                }
            }
        }
    })
}
