//! The nft text of a compiled [`Ruleset`]: one `nft -f` transaction that replaces weft's
//! policy table atomically (create-if-absent, delete, create: the idiom that works on
//! nft 1.0.x, which has no `destroy`).

use std::fmt::Write;

use super::compile::{DirSets, Fam, FamilySets, Ruleset};

/// nft family of the policy table.
pub const TABLE_FAMILY: &str = "inet";
/// Name of the policy table (weft's own; nothing else is touched).
pub const TABLE: &str = "weft-netpol";

/// ICMPv6 neighbour discovery: never filtered (pods on one bridge must resolve each other).
const ND_TYPES: &str = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect";

/// Name prefix of one direction's maps, chains and sets.
fn prefix(ingress: bool) -> &'static str {
    if ingress { "in" } else { "out" }
}

fn fam_suffix(f: Fam) -> &'static str {
    match f {
        Fam::V4 => "4",
        Fam::V6 => "6",
    }
}

fn addr_type(f: Fam) -> &'static str {
    match f {
        Fam::V4 => "ipv4_addr",
        Fam::V6 => "ipv6_addr",
    }
}

/// `lo` or `lo-hi`.
fn range(f: Fam, lo: u128, hi: u128) -> String {
    if lo == hi { f.addr(lo).to_string() } else { format!("{}-{}", f.addr(lo), f.addr(hi)) }
}

fn port_range(lo: u16, hi: u16) -> String {
    if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }
}

/// Names of a group's sets: `<dir>-<n>-all<4|6>` and `<dir>-<n>-ports<4|6>`.
pub fn set_name(ingress: bool, group: usize, kind: &str, f: Fam) -> String {
    format!("{}-{group}-{kind}{}", prefix(ingress), fam_suffix(f))
}

/// The rules of a group chain, in order (sets that would be empty are left out).
pub fn group_rules(ingress: bool, g: usize, sets: [(Fam, &FamilySets); 2]) -> Vec<String> {
    let mut rules = Vec::new();
    for (f, s) in sets {
        let (ipk, remote) = match (f, ingress) {
            (Fam::V4, true) => ("ip", "saddr"),
            (Fam::V4, false) => ("ip", "daddr"),
            (Fam::V6, true) => ("ip6", "saddr"),
            (Fam::V6, false) => ("ip6", "daddr"),
        };
        if !s.all.is_empty() {
            rules.push(format!("{ipk} {remote} @{} return", set_name(ingress, g, "all", f)));
        }
        if !s.ports.is_empty() {
            rules
                .push(format!("{ipk} {remote} . meta l4proto . th dport @{} return", set_name(ingress, g, "ports", f)));
        }
    }
    rules.push("drop".to_string());
    rules
}

/// Keeps a node name safe inside an nft comment.
fn clean(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).take(63).collect()
}

fn write_elements(s: &mut String, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        return;
    }
    let _ = writeln!(s, "\t\telements = {{ {} }}", items.join(", "));
}

fn write_dir(s: &mut String, d: &DirSets, ingress: bool) {
    let p = prefix(ingress);
    for f in [Fam::V4, Fam::V6] {
        let _ = writeln!(s, "\tmap {p}-pods{} {{\n\t\ttype {} : verdict", fam_suffix(f), addr_type(f));
        write_elements(
            s,
            d.dispatch.iter().filter(|(ip, _)| Fam::of(**ip) == f).map(|(ip, g)| format!("{ip} : jump {p}-{g}")),
        );
        s.push_str("\t}\n");
    }
    for (g, group) in d.groups.iter().enumerate() {
        for f in [Fam::V4, Fam::V6] {
            let sets = group.family(f);
            if !sets.all.is_empty() {
                let _ = writeln!(
                    s,
                    "\tset {} {{\n\t\ttype {}\n\t\tflags interval",
                    set_name(ingress, g, "all", f),
                    addr_type(f)
                );
                write_elements(s, sets.all.iter().map(|&(a, z)| range(f, a, z)));
                s.push_str("\t}\n");
            }
            if !sets.ports.is_empty() {
                let _ = writeln!(
                    s,
                    "\tset {} {{\n\t\ttype {} . inet_proto . inet_service\n\t\tflags interval",
                    set_name(ingress, g, "ports", f),
                    addr_type(f)
                );
                write_elements(
                    s,
                    sets.ports.iter().map(|e| {
                        format!("{} . {} . {}", range(f, e.lo, e.hi), e.proto.nft(), port_range(e.port_lo, e.port_hi))
                    }),
                );
                s.push_str("\t}\n");
            }
        }
    }
    for (g, group) in d.groups.iter().enumerate() {
        let _ = writeln!(s, "\tchain {p}-{g} {{");
        for r in group_rules(ingress, g, [(Fam::V4, &group.v4), (Fam::V6, &group.v6)]) {
            let _ = writeln!(s, "\t\t{r}");
        }
        s.push_str("\t}\n");
    }
}

/// The rules of the base chain `forward`, in order.
pub fn forward_rules() -> Vec<String> {
    vec![
        // Replies of allowed connections; established flows survive policy changes.
        "ct state established,related accept".into(),
        format!("icmpv6 type {{ {ND_TYPES} }} accept"),
        // The pod's own node always reaches it (kubelet probes).
        "fib saddr type local accept".into(),
        "ip saddr vmap @out-pods4".into(),
        "ip6 saddr vmap @out-pods6".into(),
        "ip daddr vmap @in-pods4".into(),
        "ip6 daddr vmap @in-pods6".into(),
    ]
}

/// The table's comment (names the node, so an operator sees whose rules these are).
pub fn comment(rs: &Ruleset) -> String {
    format!("weft NetworkPolicy rules for node {}", clean(&rs.node))
}

/// The whole transaction: replaces the table in one `nft -f`.
pub fn render(rs: &Ruleset) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table {TABLE_FAMILY} {TABLE}\ndelete table {TABLE_FAMILY} {TABLE}");
    let _ = writeln!(s, "table {TABLE_FAMILY} {TABLE} {{\n\tcomment \"{}\"", comment(rs));
    write_dir(&mut s, &rs.egress, false);
    write_dir(&mut s, &rs.ingress, true);
    // Egress is checked before ingress: a jumped group chain returns when it allows, and
    // drops otherwise, so a connection between two local pods needs both.
    s.push_str("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n");
    for r in forward_rules() {
        let _ = writeln!(s, "\t\t{r}");
    }
    s.push_str("\t}\n}\n");
    s
}

/// The transaction that removes the table (when the feature is off). Applying it when the
/// table is absent is a no-op, not an error.
pub fn remove_script() -> String {
    format!("table {TABLE_FAMILY} {TABLE}\ndelete table {TABLE_FAMILY} {TABLE}\n")
}
