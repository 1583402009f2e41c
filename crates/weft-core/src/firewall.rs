//! flannel's masquerade and forward rules as data: iptables rule arguments, the
//! `iptables-restore` payload, the nftables script, and the text `iptables -S` /
//! `nft list` print for them.

use std::fmt::Write;

/// One iptables rule: table, chain and arguments (as `iptables -A CHAIN <args>` takes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptRule {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The chain.
    pub chain: &'static str,
    /// Match and target arguments.
    pub args: Vec<String>,
}

/// Our chain for masquerade rules (table nat).
pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// Our chain for forward rules (table filter).
pub const FWD_CHAIN: &str = "FLANNEL-FWD";

/// A rule whose arguments are the concatenation of `parts`.
fn rule(table: &'static str, chain: &'static str, parts: &[&[&str]]) -> IptRule {
    IptRule { table, chain, args: parts.iter().flat_map(|p| p.iter()).map(|s| s.to_string()).collect() }
}

/// Address family of a rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// iptables / `ip` family.
    V4,
    /// ip6tables / `ip6` family.
    V6,
}

impl Family {
    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

/// The masquerade rules for cluster network `net` and our subnet `pod`, jump rule first
/// (flannel's order, which its e2e tests compare byte for byte).
pub fn masq_rules(family: Family, net: &str, pod: &str, fully_random: bool) -> Vec<IptRule> {
    let c = ["-m", "comment", "--comment", "flanneld masq"];
    let mc = family.multicast();
    let masq: &[&str] = if fully_random { &["-j", "MASQUERADE", "--random-fully"] } else { &["-j", "MASQUERADE"] };
    let ret: &[&str] = &["-j", "RETURN"];
    vec![
        rule("nat", "POSTROUTING", &[&c, &["-j", MASQ_CHAIN]]),
        rule("nat", MASQ_CHAIN, &[&["-m", "mark", "--mark", "0x4000/0x4000"], &c, ret]),
        rule("nat", MASQ_CHAIN, &[&["-s", pod, "-d", net], &c, ret]),
        rule("nat", MASQ_CHAIN, &[&["-s", net, "-d", pod], &c, ret]),
        rule("nat", MASQ_CHAIN, &[&["!", "-s", net, "-d", pod], &c, ret]),
        rule("nat", MASQ_CHAIN, &[&["-s", net, "!", "-d", mc], &c, masq]),
        rule("nat", MASQ_CHAIN, &[&["!", "-s", net, "-d", net], &c, masq]),
    ]
}

/// The forward rules for cluster network `net`, jump rule first.
pub fn forward_rules(net: &str) -> Vec<IptRule> {
    let c = ["-m", "comment", "--comment", "flanneld forward"];
    vec![
        rule("filter", "FORWARD", &[&c, &["-j", FWD_CHAIN]]),
        rule("filter", FWD_CHAIN, &[&["-s", net], &c, &["-j", "ACCEPT"]]),
        rule("filter", FWD_CHAIN, &[&["-d", net], &c, &["-j", "ACCEPT"]]),
    ]
}

/// An argument as `iptables-save` writes it: quoted when it contains a space.
fn quote(arg: &str) -> String {
    if arg.contains(' ') { format!("\"{arg}\"") } else { arg.to_string() }
}

/// The `-A CHAIN args` line `iptables -S` prints for a rule.
pub fn rule_line(r: &IptRule) -> String {
    let mut s = format!("-A {}", r.chain);
    for a in &r.args {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

/// One `iptables-restore --noflush` transaction for `table`: our chains are declared (which
/// creates or flushes them), jump rules in `existing_jumps` are deleted and every rule is
/// appended, so the jump lands at the end of the built-in chain and the order is exact.
pub fn restore_payload(table: &str, chains: &[&str], rules: &[IptRule], existing_jumps: &[IptRule]) -> String {
    let mut s = format!("*{table}\n");
    for c in chains {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for r in existing_jumps.iter().filter(|r| r.table == table) {
        let _ = writeln!(s, "{}", rule_line(r).replacen("-A", "-D", 1));
    }
    for r in rules.iter().filter(|r| r.table == table) {
        let _ = writeln!(s, "{}", rule_line(r));
    }
    s.push_str("COMMIT\n");
    s
}

/// nftables table name and family keyword per address family.
pub fn nft_table(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("ip", "flannel-ipv4"),
        Family::V6 => ("ip6", "flannel-ipv6"),
    }
}

/// What the nftables rule set covers.
#[derive(Debug, Clone)]
pub struct NftRules {
    /// Address family.
    pub family: Family,
    /// Cluster network and our subnet, when masquerading.
    pub masq: Option<(String, String)>,
    /// Cluster network, when forward rules are on.
    pub forward: Option<String>,
    /// Use `fully-random`.
    pub fully_random: bool,
}

impl NftRules {
    fn masq_lines(&self) -> Vec<String> {
        let (fam, _) = nft_table(self.family);
        let Some((net, pod)) = &self.masq else { return vec![] };
        let masq = if self.fully_random { "masquerade fully-random" } else { "masquerade" };
        let mc = self.family.multicast();
        vec![
            "meta mark 0x00004000 return".into(),
            format!("{fam} saddr {pod} {fam} daddr {net} return"),
            format!("{fam} saddr {net} {fam} daddr {pod} return"),
            format!("{fam} saddr != {pod} {fam} daddr {net} return"),
            format!("{fam} saddr {net} {fam} daddr != {mc} {masq}"),
            format!("{fam} saddr != {net} {fam} daddr {net} {masq}"),
        ]
    }

    fn forward_lines(&self) -> Vec<String> {
        let (fam, _) = nft_table(self.family);
        match &self.forward {
            Some(net) => vec![format!("{fam} saddr {net} accept"), format!("{fam} daddr {net} accept")],
            None => vec![],
        }
    }

    /// One `nft -f -` transaction that creates the table and chains and refills them.
    pub fn script(&self) -> String {
        let (fam, table) = nft_table(self.family);
        let mut s = String::new();
        let _ = writeln!(s, "add table {fam} {table} {{ comment \"rules for {table}\" ; }}");
        let _ = writeln!(
            s,
            "add chain {fam} {table} postrtg {{ comment \"chain to manage traffic masquerading by flannel\" ; type nat hook postrouting priority srcnat ; policy accept ; }}"
        );
        let _ = writeln!(
            s,
            "add chain {fam} {table} forward {{ comment \"chain to accept flannel traffic\" ; type filter hook forward priority filter ; policy accept ; }}"
        );
        let _ = writeln!(s, "flush chain {fam} {table} postrtg");
        let _ = writeln!(s, "flush chain {fam} {table} forward");
        for l in self.masq_lines() {
            let _ = writeln!(s, "add rule {fam} {table} postrtg {l}");
        }
        for l in self.forward_lines() {
            let _ = writeln!(s, "add rule {fam} {table} forward {l}");
        }
        s
    }

    /// What `nft list table <fam> <table>` prints once the script is applied.
    pub fn listing(&self) -> String {
        let (fam, table) = nft_table(self.family);
        let mut s = format!("table {fam} {table} {{\n\tcomment \"rules for {table}\"\n");
        s.push_str("\tchain postrtg {\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        for l in self.masq_lines() {
            let _ = writeln!(s, "\t\t{l}");
        }
        s.push_str("\t}\n\n\tchain forward {\n\t\tcomment \"chain to accept flannel traffic\"\n\t\ttype filter hook forward priority filter; policy accept;\n");
        for l in self.forward_lines() {
            let _ = writeln!(s, "\t\t{l}");
        }
        s.push_str("\t}\n}\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masq_rules_print_as_flannels_golden_text() {
        let lines: Vec<String> =
            masq_rules(Family::V4, "10.42.0.0/16", "10.42.1.0/24", true).iter().map(rule_line).collect();
        assert_eq!(
            lines,
            [
                r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#,
                r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.42.1.0/24 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.42.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
            ]
        );
        let plain = masq_rules(Family::V6, "fd00::/56", "fd00:0:0:1::/64", false);
        assert_eq!(plain[5].args.last().unwrap(), "MASQUERADE");
        assert!(plain[5].args.contains(&"ff00::/8".to_string()));
    }

    #[test]
    fn vector8_restore_payload_quotes_the_comment() {
        let r = rule(
            "nat",
            "INPUT",
            &[
                &["-s", "127.0.0.1", "!", "-d", "224.0.0.0/4", "-m", "comment", "--comment", "flanneld masq"],
                &["-j", "MASQUERADE", "--random-fully"],
            ],
        );
        assert_eq!(
            restore_payload("nat", &[], std::slice::from_ref(&r), &[]),
            "*nat\n-A INPUT -s 127.0.0.1 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\nCOMMIT\n"
        );
        let rules = forward_rules("10.5.0.0/16");
        let p = restore_payload("filter", &[FWD_CHAIN], &rules, &rules[..1]);
        assert!(p.starts_with("*filter\n:FLANNEL-FWD - [0:0]\n-D FORWARD -m comment"), "{p}");
        assert_eq!(p.matches("-A ").count(), 3);
    }

    #[test]
    fn nft_listing_matches_flannels_golden() {
        let r = NftRules {
            family: Family::V4,
            masq: Some(("10.42.0.0/16".into(), "10.42.1.0/24".into())),
            forward: Some("10.42.0.0/16".into()),
            fully_random: true,
        };
        let listing = r.listing();
        assert!(listing.contains(
            "\tchain postrtg {\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmeta mark 0x00004000 return\n\t\tip saddr 10.42.1.0/24 ip daddr 10.42.0.0/16 return\n\t\tip saddr 10.42.0.0/16 ip daddr 10.42.1.0/24 return\n\t\tip saddr != 10.42.1.0/24 ip daddr 10.42.0.0/16 return\n\t\tip saddr 10.42.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n\t\tip saddr != 10.42.0.0/16 ip daddr 10.42.0.0/16 masquerade fully-random\n\t}"
        ));
        assert!(r.script().contains("add rule ip flannel-ipv4 forward ip daddr 10.42.0.0/16 accept"));
    }
}
