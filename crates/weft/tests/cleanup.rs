//! `weft cleanup`: after a daemon ran (vxlan with iptables, udp with nftables and the
//! blackhole route, host-gw) and stopped, cleanup leaves the host namespace exactly as it
//! was before the daemon started — links, addresses, routes, permanent neighbours, FDB,
//! iptables, ip6tables and the nftables ruleset, the NetworkPolicy table `inet weft-netpol`
//! included (a daemon with policy off removes a leftover one at startup) — while foreign
//! devices, routes, rules and tables next to weft's (some with flannel's names or comments,
//! an `ip weft-netpol`) survive. `--release-lease` deletes this host's lease only; a second
//! run finds nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::cluster::Daemon;
use common::{wait_for, weft_bin};
use weft::lab::netns::{Lan, Netns};

/// The host namespace's state as the tools print it. Left out: dynamic ARP entries (the
/// kernel's cache of the LAN, not weft's; weft's are permanent) and the counters and timestamps of the save tools.
fn snapshot(h: &Netns) -> String {
    let mut out = String::new();
    for args in [
        &["-j", "link", "show"][..],
        &["-j", "addr", "show"],
        &["-j", "-4", "route", "show", "table", "all"],
        &["-j", "-6", "route", "show", "table", "all"],
        &["-j", "neigh", "show", "nud", "permanent"],
        &["-j", "nexthop", "show"],
    ] {
        out += &format!("== ip {}\n{}\n", args.join(" "), h.ip(args).unwrap());
    }
    out += &format!("== bridge fdb\n{}\n", h.exec("bridge", &["-j", "fdb", "show"]).unwrap());
    for save in ["iptables-save", "ip6tables-save"] {
        let text = h.exec(save, &[]).unwrap();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rsplit_once(" [") {
                Some((head, _)) if l.starts_with(':') => head.to_string(),
                _ => l.to_string(),
            })
            .collect();
        out += &format!("== {save}\n{}\n", lines.join("\n"));
    }
    let nft = h.exec("nft", &["list", "ruleset"]).unwrap();
    let counters = regex::Regex::new(r"counter packets \d+ bytes \d+").unwrap();
    out += &format!("== nft\n{}\n", counters.replace_all(&nft, "counter"));
    out
}

fn diff(a: &str, b: &str) -> String {
    let (al, bl): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut s = String::new();
    for l in &al {
        if !bl.contains(l) {
            s += &format!("- {l}\n");
        }
    }
    for l in &bl {
        if !al.contains(l) {
            s += &format!("+ {l}\n");
        }
    }
    s
}

/// Things that are not weft's, some named or commented like flannel's.
fn add_foreign(h: &Netns) {
    for args in [
        &["link", "add", "flannel.9", "type", "bridge"][..],
        &["link", "add", "vxlan7", "type", "vxlan", "id", "7", "dstport", "4789", "dev", "eth0"],
        &["link", "set", "vxlan7", "up"],
        &["route", "add", "10.244.200.0/24", "via", "192.0.2.1", "proto", "static"],
        &["route", "add", "198.51.100.0/24", "via", "192.0.2.1"],
        &["route", "add", "blackhole", "10.244.99.0/24"],
        &["neigh", "add", "192.0.2.99", "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "permanent"],
        // Nexthops of others, one even with an id in weft's range: only protocol 87 is ours.
        &["nexthop", "add", "id", "7", "via", "192.0.2.1", "dev", "eth0", "proto", "static"],
        &["nexthop", "add", "id", "87000005", "via", "192.0.2.1", "dev", "eth0"],
        &["route", "add", "10.244.201.0/24", "nhid", "7"],
    ] {
        h.ip(args).unwrap();
    }
    h.exec("bridge", &["fdb", "append", "00:00:00:00:00:00", "dev", "vxlan7", "dst", "192.0.2.77"]).unwrap();
    let script = "iptables -w -t nat -A POSTROUTING -s 10.9.0.0/16 -m comment --comment 'flanneld masq' -j MASQUERADE
iptables -w -t filter -N FOREIGN
iptables -w -t filter -A FORWARD -j FOREIGN
iptables -w -t filter -A FOREIGN -s 10.9.0.0/16 -j ACCEPT
nft add table inet foreign
nft add chain inet foreign input '{ type filter hook input priority 0; policy accept; }'
nft add rule inet foreign input tcp dport 9 drop
nft add table ip weft-netpol
nft add chain ip weft-netpol forward '{ type filter hook forward priority 0; policy accept; }'";
    h.exec("sh", &["-ec", script]).unwrap();
}

/// weft's NetworkPolicy table as a run with policy on leaves it.
fn leftover_policy_table(h: &Netns) {
    let script = "nft add table inet weft-netpol
nft add chain inet weft-netpol forward '{ type filter hook forward priority filter; policy accept; }'
nft add rule inet weft-netpol forward ct state established,related accept";
    h.exec("sh", &["-ec", script]).unwrap();
}

fn cleanup(h: &Netns, flags: &[String], extra: &[&str]) -> Output {
    let o = h.command(weft_bin()).arg("cleanup").args(flags).args(extra).output().unwrap();
    eprintln!(
        "weft cleanup {extra:?}: {:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn leases(store: &str) -> Vec<(String, String)> {
    let o = Command::new(weft_bin()).args(["leases", "--store=local", store, "--json"]).output().unwrap();
    assert!(o.status.success(), "weft leases: {o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| (l["subnet"].as_str().unwrap_or_default().to_string(), l["public_ip"].to_string()))
        .collect()
}

struct Scenario {
    name: &'static str,
    backend: &'static str,
    nft: bool,
    extra: &'static [&'static str],
    /// SIGKILL instead of SIGTERM: half a daemon's state.
    kill: bool,
}

fn programmed(h: &Netns, s: &Scenario) -> bool {
    let routes = h.ip(&["route", "show", "proto", "87"]).unwrap_or_default();
    match s.backend {
        "udp" => h.ip(&["route", "show", "dev", "flannel0"]).is_ok_and(|r| r.contains("10.244.0.0/16")),
        "vxlan" => {
            !routes.is_empty() && h.ip(&["neigh", "show", "dev", "flannel.1"]).is_ok_and(|n| !n.trim().is_empty())
        }
        _ => !routes.is_empty(),
    }
}

fn run_scenario(lan: &Lan, hosts: &[Netns], dir: &Path, s: &Scenario) {
    eprintln!("--- scenario {}", s.name);
    let dir = dir.join(s.name);
    std::fs::create_dir_all(dir.join("cni/lock")).unwrap();
    let conf = format!(
        r#"{{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.50.0","EnableNFTables":{},"Backend":{{"Type":"{}"}}}}"#,
        s.nft, s.backend
    );
    std::fs::write(dir.join("net-conf.json"), conf).unwrap();
    let store = format!("--local-store={}", dir.join("leases.db").display());
    let flags = |i: usize| -> Vec<String> {
        let mut f = vec![
            "--store=local".to_string(),
            store.clone(),
            format!("--net-config-path={}", dir.join("net-conf.json").display()),
            format!("--subnet-file={}", dir.join(format!("h{i}/subnet.env")).display()),
            "--ip-masq".into(),
            "--healthz-port=8081".into(),
        ];
        f.extend(s.extra.iter().map(|x| x.to_string()));
        f
    };
    let before = snapshot(&hosts[0]);
    // A NetworkPolicy table left by an earlier run with policy on: a daemon with it off
    // removes it at startup (only it: `ip weft-netpol` of add_foreign stays).
    leftover_policy_table(&hosts[0]);
    let args1 = flags(1);
    let args2 = flags(2);
    let mut d1 = Daemon::start(&hosts[0], &dir, &args1.iter().map(String::as_str).collect::<Vec<_>>());
    let mut d2 = Daemon::start(&hosts[1], &dir, &args2.iter().map(String::as_str).collect::<Vec<_>>());
    let env1 = dir.join("h1/subnet.env");
    wait_for(Duration::from_secs(30), "h1's subnet file", || std::fs::read_to_string(&env1).ok());
    wait_for(Duration::from_secs(30), "h1's data plane", || programmed(&hosts[0], s).then_some(()));
    wait_for(Duration::from_secs(10), "the leftover policy table removed at startup", || {
        hosts[0].exec("nft", &["list", "table", "inet", "weft-netpol"]).is_err().then_some(())
    });
    assert!(hosts[0].exec("nft", &["list", "table", "ip", "weft-netpol"]).is_ok(), "another family's table stays");
    // And one left by a daemon killed after its start: cleanup removes it.
    leftover_policy_table(&hosts[0]);
    let during = snapshot(&hosts[0]);
    assert_ne!(before, during, "the daemon changed nothing: the test would prove nothing");
    // The CNI plugin's saved state of a pod.
    std::fs::write(dir.join("cni/0123abcd"), "{}").unwrap();
    std::fs::write(dir.join("cni/.0123abcd.ifname"), "eth0").unwrap();
    assert_eq!(leases(&store).len(), 2);

    // A daemon that answers on its health port: cleanup refuses and changes nothing.
    let cni = format!("--cni-data-dir={}", dir.join("cni").display());
    let o = cleanup(&hosts[0], &args1, &["--release-lease", &cni]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("stop it first"), "{o:?}");
    assert!(env1.exists() && dir.join("cni/0123abcd").exists() && leases(&store).len() == 2);
    assert!(programmed(&hosts[0], s), "the daemon's state is untouched");

    d1.signal(if s.kill { libc::SIGKILL } else { libc::SIGTERM });
    d1.wait_exit(Duration::from_secs(15));
    let o = cleanup(&hosts[0], &args1, &["--release-lease", &cni]);
    assert!(o.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&o.stderr));
    let after = snapshot(&hosts[0]);
    assert!(before == after, "{}: the host differs after cleanup:\n{}", s.name, diff(&before, &after));
    assert!(!env1.exists(), "subnet.env removed");
    assert!(!dir.join("cni/0123abcd").exists() && !dir.join("cni/.0123abcd.ifname").exists());
    assert!(dir.join("cni/lock").is_dir(), "what is not CNI state stays");
    let left = leases(&store);
    assert_eq!(left.len(), 1, "only our lease was released: {left:?}");
    assert!(left[0].1.contains(&lan.host_ip(2)), "h2's lease stays: {left:?}");

    // Idempotent.
    let o = cleanup(&hosts[0], &args1, &["--release-lease", &cni]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing of weft's was left"), "{o:?}");
    assert_eq!(snapshot(&hosts[0]), before);

    // h2 too (its daemon saw h1 leave meanwhile); then the scenario leaves nothing behind.
    d2.signal(libc::SIGTERM);
    d2.wait_exit(Duration::from_secs(15));
    let o = cleanup(&hosts[1], &args2, &[]);
    assert!(o.status.success());
    assert!(!hosts[1].ip(&["route", "show", "proto", "87"]).unwrap().contains("10.244"));
}

#[test]
fn cleanup_leaves_the_host_as_before_the_daemon_and_foreign_state_untouched() {
    let prefix = common::prefix("cln");
    let tmp = tempfile::tempdir().unwrap();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let hosts: Vec<Netns> = (1..=2).map(|i| lan.add_host(i).unwrap()).collect();
    settled(&hosts);
    no_daemon_state_and_bad_flags(&hosts[0], tmp.path());
    add_foreign(&hosts[0]);
    add_foreign(&hosts[1]);
    settled(&hosts);
    for s in [
        Scenario { name: "vxlan-iptables", backend: "vxlan", nft: false, extra: &[], kill: false },
        Scenario { name: "udp-nft-blackhole", backend: "udp", nft: true, extra: &["--ip-blackhole-route"], kill: true },
        Scenario { name: "hostgw-iptables", backend: "host-gw", nft: false, extra: &[], kill: false },
    ] {
        run_scenario(&lan, &hosts, tmp.path(), &s);
    }
}

/// IPv6 link-local addresses settle (duplicate address detection) before a snapshot.
fn settled(hosts: &[Netns]) {
    for h in hosts {
        wait_for(Duration::from_secs(10), "DAD", || {
            h.ip(&["-6", "addr", "show", "tentative"]).is_ok_and(|o| o.trim().is_empty()).then_some(())
        });
    }
}

/// Bad flags exit 2 with usage; on a host weft never ran on, cleanup changes nothing, and an
/// unreachable store is an error within the deadline, not a hang.
fn no_daemon_state_and_bad_flags(h: &Netns, dir: &Path) {
    let o = Command::new(weft_bin()).args(["cleanup", "--no-such-flag"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--release-lease"), "usage lists our flags");
    let o = Command::new(weft_bin()).args(["cleanup", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && help.contains("--release-lease") && help.contains("--etcd-endpoints"), "{help}");
    let before = snapshot(h);
    let sf = format!("--subnet-file={}", dir.join("none.env").display());
    let started = std::time::Instant::now();
    let o = cleanup(h, &[sf], &["--release-lease", "--etcd-endpoints=http://127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot release our lease"), "{o:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "the store deadline holds");
    assert!(String::from_utf8_lossy(&o.stdout).is_empty(), "nothing removed: {o:?}");
    assert_eq!(snapshot(h), before);
}
