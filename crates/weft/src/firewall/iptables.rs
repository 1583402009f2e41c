//! flannel's iptables rules, installed with one `iptables-restore --noflush` transaction per
//! table and re-checked on every resync.

use weft_core::firewall::{
    FWD_CHAIN, Family, IptRule, MASQ_CHAIN, forward_rules, masq_rules, restore_payload, rule_line,
};

use super::{FirewallError, FirewallSpec, run};

/// The iptables traffic manager.
pub struct Iptables {
    fully_random: bool,
}

fn binaries(f: Family) -> (&'static str, &'static str) {
    match f {
        Family::V4 => ("iptables", "iptables-restore"),
        Family::V6 => ("ip6tables", "ip6tables-restore"),
    }
}

/// `--random-fully` needs iptables 1.6.2 or later.
fn supports_random_fully(version: &str) -> bool {
    let v = version.split_whitespace().find_map(|w| w.strip_prefix('v')).unwrap_or("");
    let n: Vec<u32> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    n.len() >= 3 && (n[0], n[1], n[2]) >= (1, 6, 2)
}

fn rules_for(spec: &FirewallSpec, fully_random: bool) -> Vec<(Family, Vec<IptRule>)> {
    spec.families
        .iter()
        .map(|f| {
            let mut rules = Vec::new();
            if spec.masq {
                rules.extend(masq_rules(f.family, &f.network, &f.subnet, fully_random));
            }
            if spec.forward {
                rules.extend(forward_rules(&f.network));
            }
            (f.family, rules)
        })
        .collect()
}

async fn exists(bin: &str, r: &IptRule) -> bool {
    let mut args = vec!["-w", "-t", r.table, "-C", r.chain];
    args.extend(r.args.iter().map(String::as_str));
    run(bin, &args, None).await.is_ok()
}

impl Iptables {
    /// Probes the iptables version.
    pub async fn new(spec: &FirewallSpec) -> Iptables {
        let version = run("iptables", &["--version"], None).await.unwrap_or_default();
        Iptables { fully_random: !spec.fully_random_disable && supports_random_fully(&version) }
    }

    /// Installs the rules if anything is missing or different; `Ok(true)` when it did.
    pub async fn ensure(&self, spec: &FirewallSpec) -> Result<bool, FirewallError> {
        let mut changed = false;
        for (family, rules) in rules_for(spec, self.fully_random) {
            let (bin, restore) = binaries(family);
            for (table, chain) in [("nat", MASQ_CHAIN), ("filter", FWD_CHAIN)] {
                let ours: Vec<&IptRule> = rules.iter().filter(|r| r.table == table).collect();
                if ours.is_empty() {
                    continue;
                }
                let want: Vec<String> = ours.iter().filter(|r| r.chain == chain).map(|r| rule_line(r)).collect();
                let have = run(bin, &["-w", "-t", table, "-S", chain], None)
                    .await
                    .map(|out| out.lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect::<Vec<_>>());
                let jumps: Vec<IptRule> = {
                    let mut v = Vec::new();
                    for r in ours.iter().filter(|r| r.chain != chain) {
                        if exists(bin, r).await {
                            v.push((*r).clone());
                        }
                    }
                    v
                };
                let jumps_ok = jumps.len() == ours.iter().filter(|r| r.chain != chain).count();
                if have.as_ref().is_ok_and(|h| *h == want) && jumps_ok {
                    continue;
                }
                let owned: Vec<IptRule> = ours.into_iter().cloned().collect();
                let payload = restore_payload(table, &[chain], &owned, &jumps);
                run(restore, &["--noflush", "--wait"], Some(&payload)).await?;
                tracing::info!(table, chain, ?family, "installed flannel's {table} rules");
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// Removes our chains and jump rules from iptables and ip6tables (when switching to nftables).
pub async fn remove_all() {
    for family in [Family::V4, Family::V6] {
        let (bin, _) = binaries(family);
        let jumps =
            [masq_rules(family, "0.0.0.0/0", "0.0.0.0/0", false)[0].clone(), forward_rules("0.0.0.0/0")[0].clone()];
        for (jump, chain) in jumps.iter().zip([MASQ_CHAIN, FWD_CHAIN]) {
            while exists(bin, jump).await {
                let mut args = vec!["-w", "-t", jump.table, "-D", jump.chain];
                args.extend(jump.args.iter().map(String::as_str));
                if run(bin, &args, None).await.is_err() {
                    break;
                }
            }
            // flannel looks FLANNEL-FWD up in the nat table (a bug); we remove it where it lives.
            let _ = run(bin, &["-w", "-t", jump.table, "-F", chain], None).await;
            let _ = run(bin, &["-w", "-t", jump.table, "-X", chain], None).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_fully_needs_1_6_2() {
        assert!(supports_random_fully("iptables v1.8.9 (nf_tables)"));
        assert!(supports_random_fully("iptables v1.6.2"));
        assert!(!supports_random_fully("iptables v1.6.1"));
        assert!(!supports_random_fully(""));
    }
}
