//! flannel's nftables tables (`flannel-ipv4`, `flannel-ipv6`), written in one `nft`
//! transaction per family and re-checked on every resync (flannel never re-checks).

use weft_core::firewall::{Family, NftRules, nft_table};

use super::{FirewallError, FirewallSpec, run};

/// The nftables traffic manager.
pub struct Nftables {
    fully_random: bool,
}

/// Whether this kernel and nft accept `masquerade fully-random` (checked without applying).
async fn fully_random_supported() -> bool {
    let probe = "add table ip weft-probe\nadd chain ip weft-probe masqueradeTest { type nat hook postrouting priority srcnat ; }\nadd rule ip weft-probe masqueradeTest masquerade fully-random\n";
    run("nft", &["-c", "-f", "-"], Some(probe)).await.is_ok()
}

fn rule_sets(spec: &FirewallSpec, fully_random: bool) -> Vec<NftRules> {
    // Both tables exist even for a disabled family, as flannel makes them.
    [Family::V4, Family::V6]
        .into_iter()
        .map(|family| {
            let f = spec.families.iter().find(|f| f.family == family);
            NftRules {
                family,
                masq: f.filter(|_| spec.masq).map(|f| (f.network.clone(), f.subnet.clone())),
                forward: f.filter(|_| spec.forward).map(|f| f.network.clone()),
                fully_random,
            }
        })
        .collect()
}

impl Nftables {
    /// Probes fully-random support.
    pub async fn new(spec: &FirewallSpec) -> Nftables {
        Nftables { fully_random: !spec.fully_random_disable && fully_random_supported().await }
    }

    /// Writes a family's table when its listing differs from what it should be.
    pub async fn ensure(&self, spec: &FirewallSpec) -> Result<bool, FirewallError> {
        let mut changed = false;
        for rules in rule_sets(spec, self.fully_random) {
            let (fam, table) = nft_table(rules.family);
            let have = run("nft", &["list", "table", fam, table], None).await.unwrap_or_default();
            if have == rules.listing() {
                continue;
            }
            run("nft", &["-f", "-"], Some(&rules.script())).await?;
            tracing::info!(table, "installed flannel's nftables rules");
            changed = true;
        }
        Ok(changed)
    }
}

/// Deletes our nftables tables (when running with iptables).
pub async fn remove_all() {
    for family in [Family::V4, Family::V6] {
        let (fam, table) = nft_table(family);
        let _ = run("nft", &["delete", "table", fam, table], None).await;
    }
}
