//! The kernel data path: where the kernel can create a `wireguard` link, the device is
//! programmed over generic netlink (family `wireguard`, rust-netlink's `genetlink` and
//! `netlink-packet-wireguard`; no `wg` subprocess) as flanneld programs it: private key,
//! listen port, and per peer its public key, PSK, keepalive, endpoint and allowed IPs.
//!
//! The messages are built by pure functions from the planner's peers. The device is
//! configured whole once (replace-peers); after that, each reconcile pass sends only what
//! differs from what was last programmed ([`Programmed::changes`]): new and changed peers
//! are set (their allowed IPs replaced), peers no longer wanted removed by key, the others
//! left alone, so a pass with nothing new sends nothing, and no replace-peers: existing
//! sessions survive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use weft_core::wireguard::{Key, Peer};

/// Peers per generic netlink message (a message must fit the socket's buffer; `wg` splits
/// the same way).
pub const PEERS_PER_MESSAGE: usize = 64;

/// How often every peer is sent again although the record says the device holds it (six
/// resync periods). The record cannot see a peer removed or changed by hand (`wg set`);
/// re-sending is cheaper and simpler than dumping 20 000 peers back from the kernel on
/// every resync, and once a minute instead of every pass is the cost this record removes.
/// (A peer added by hand stays, as it did before: only a re-created device is configured
/// whole.)
pub const FULL_RESEND: Duration = Duration::from_secs(60);

/// Programming a kernel WireGuard device failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelWgError {
    /// No generic netlink socket.
    #[error("cannot open a generic netlink socket: {0}")]
    Socket(std::io::Error),
    /// The kernel refused or the family is missing (no `wireguard` module).
    #[error("programming WireGuard device {device} over generic netlink failed: {problem}")]
    Request {
        /// The device.
        device: String,
        /// What the kernel or the library said.
        problem: String,
    },
}

/// The settings every peer of a device gets (flannel's `PSK` and keepalive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSettings {
    /// `PSK`.
    pub psk: Option<Key>,
    /// `PersistentKeepaliveInterval`, seconds (0: off).
    pub keepalive: u16,
}

/// One peer's configuration as sent to the kernel (its key aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Where it is reached.
    pub endpoint: SocketAddr,
    /// Its subnets.
    pub allowed_ips: Vec<IpNet>,
    /// PSK and keepalive.
    pub settings: PeerSettings,
}

impl PeerConfig {
    fn of(p: &Peer, s: &PeerSettings) -> PeerConfig {
        PeerConfig { endpoint: p.endpoint, allowed_ips: p.allowed_ips.clone(), settings: *s }
    }

    /// Whether `p` with `s` is this (compared in place: a pass allocates nothing for the
    /// peers that did not change).
    fn is(&self, p: &Peer, s: &PeerSettings) -> bool {
        self.endpoint == p.endpoint && self.allowed_ips == p.allowed_ips && self.settings == *s
    }
}

/// What one pass sends: the peers to set (new or changed) and the keys to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Peers to set, with their whole configuration.
    pub set: Vec<(Key, PeerConfig)>,
    /// Peers to remove.
    pub remove: Vec<Key>,
}

/// What a device holds as far as weft knows: each peer as last programmed, by key.
#[derive(Debug, Clone, Default)]
pub struct Programmed {
    peers: BTreeMap<Key, PeerConfig>,
    /// The configurations above may not be what the device holds (a send failed part-way,
    /// or the periodic [`FULL_RESEND`] is due): every wanted peer is sent again. The keys
    /// are still every peer that may be there, so the unwanted ones are removed.
    stale: bool,
}

impl Programmed {
    /// What makes the device's peers `peers`: the wanted peers that are new or differ from
    /// the record (all of them when it is stale), and the recorded keys no longer wanted.
    /// Peers are keyed as the kernel keys them: of two with one key, the later wins, as it
    /// would within one message.
    pub fn changes<'a>(&self, peers: impl IntoIterator<Item = &'a Peer>, s: &PeerSettings) -> Changes {
        let wanted: BTreeMap<&Key, &Peer> = peers.into_iter().map(|p| (&p.public_key, p)).collect();
        let set = wanted
            .iter()
            .filter(|(k, p)| self.stale || self.peers.get(k).is_none_or(|c| !c.is(p, s)))
            .map(|(k, p)| (**k, PeerConfig::of(p, s)))
            .collect();
        let remove = self.peers.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        Changes { set, remove }
    }

    /// Records a pass that sent `c`: all of it (`ok`), or maybe only part of it, when the
    /// record keeps every key that may be there and becomes stale.
    pub fn record(&mut self, c: Changes, ok: bool) {
        if ok {
            for k in &c.remove {
                self.peers.remove(k);
            }
        }
        self.peers.extend(c.set);
        // A successful stale pass sent every wanted peer and removed every other key.
        self.stale = !ok;
    }

    /// Every wanted peer goes again on the next pass.
    pub fn doubt(&mut self) {
        self.stale = true;
    }
}

fn peer(key: &Key, c: &PeerConfig) -> WireguardPeer {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::Endpoint(c.endpoint),
        WireguardPeerAttribute::PersistentKeepalive(c.settings.keepalive),
    ];
    // No PSK: all zero, which the kernel treats as none (and clears a previous one).
    attrs.push(WireguardPeerAttribute::PresharedKey(c.settings.psk.map(|k| k.0).unwrap_or([0; 32])));
    let ips = c
        .allowed_ips
        .iter()
        .map(|net| {
            let family = if net.addr().is_ipv4() { WireguardAddressFamily::Ipv4 } else { WireguardAddressFamily::Ipv6 };
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(family),
                WireguardAllowedIpAttr::IpAddr(net.network()),
                WireguardAllowedIpAttr::Cidr(net.prefix_len()),
            ])
        })
        .collect();
    attrs.push(WireguardPeerAttribute::AllowedIps(ips));
    WireguardPeer(attrs)
}

fn removal(key: &Key) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
    ])
}

fn set_device(name: &str, head: Vec<WireguardAttribute>, peers: Vec<WireguardPeer>) -> WireguardMessage {
    let mut attributes = vec![WireguardAttribute::IfName(name.to_string())];
    attributes.extend(head);
    if !peers.is_empty() {
        attributes.push(WireguardAttribute::Peers(peers));
    }
    WireguardMessage { cmd: WireguardCmd::SetDevice, attributes }
}

/// `c`'s peers as netlink entries, in messages of [`PEERS_PER_MESSAGE`]: the peers set,
/// then the removals.
fn chunks(name: &str, c: &Changes) -> Vec<WireguardMessage> {
    let all: Vec<WireguardPeer> = c.set.iter().map(|(k, p)| peer(k, p)).chain(c.remove.iter().map(removal)).collect();
    all.chunks(PEERS_PER_MESSAGE).map(|c| set_device(name, Vec::new(), c.to_vec())).collect()
}

/// The messages that configure device `name` whole: private key, listen port, and exactly
/// the peers `c` sets (the first message replaces whatever peers the device had).
pub fn configure(name: &str, private: &Key, port: u16, c: &Changes) -> Vec<WireguardMessage> {
    let mut out = chunks(name, c);
    if out.is_empty() {
        out.push(set_device(name, Vec::new(), Vec::new()));
    }
    let head = [
        WireguardAttribute::PrivateKey(private.0),
        WireguardAttribute::ListenPort(port),
        WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
    ];
    out[0].attributes.splice(1..1, head);
    out
}

/// The messages that send `c` to device `name` without replace-peers (the sessions of the
/// peers left alone survive). Empty when there is nothing to send.
pub fn update(name: &str, c: &Changes) -> Vec<WireguardMessage> {
    chunks(name, c)
}

/// A kernel WireGuard device, programmed over generic netlink.
pub struct KernelDevice {
    name: &'static str,
    handle: GenetlinkHandle,
    conn: tokio::task::JoinHandle<()>,
    /// What the device holds as last programmed; `None` until it holds our key and port
    /// (a new or re-created link), when the next pass configures it whole.
    programmed: Option<Programmed>,
    /// When every peer was last sent again (see [`FULL_RESEND`]).
    resent: Instant,
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl KernelDevice {
    /// A generic netlink connection for device `name` (on the current tokio runtime).
    pub fn connect(name: &'static str) -> Result<KernelDevice, KernelWgError> {
        let (conn, handle, _) = genetlink::new_connection().map_err(KernelWgError::Socket)?;
        let conn = tokio::spawn(conn);
        Ok(KernelDevice { name, handle, conn, programmed: None, resent: Instant::now() })
    }

    /// The link was (re-)created: it holds nothing of ours, the next pass configures it
    /// whole.
    pub fn created(&mut self) {
        self.programmed = None;
    }

    async fn send(&mut self, msg: WireguardMessage) -> Result<(), KernelWgError> {
        let fail = |problem: String| KernelWgError::Request { device: self.name.to_string(), problem };
        let mut nl = NetlinkMessage::from(GenlMessage::from_payload(msg));
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut answers = self.handle.request(nl).await.map_err(|e| fail(e.to_string()))?;
        let deadline = std::time::Duration::from_secs(5);
        while let Some(a) = tokio::time::timeout(deadline, answers.next())
            .await
            .map_err(|_| fail("the kernel did not answer within 5 s".into()))?
        {
            let a = a.map_err(|e| fail(e.to_string()))?;
            if let NetlinkPayload::Error(e) = a.payload
                && e.code.is_some()
            {
                return Err(fail(e.to_io().to_string()));
            }
        }
        Ok(())
    }

    /// What the next [`KernelDevice::program`] must send for the device's peers to be
    /// `peers` (synchronous, so that the caller may hold a lock over `peers`): every peer
    /// when the device is to be configured or the periodic re-send is due, else only what
    /// changed.
    pub fn changes<'a>(&mut self, peers: impl IntoIterator<Item = &'a Peer>, s: &PeerSettings) -> Changes {
        match &mut self.programmed {
            None => Programmed::default().changes(peers, s),
            Some(p) => {
                if self.resent.elapsed() >= FULL_RESEND {
                    p.doubt();
                    self.resent = Instant::now();
                }
                p.changes(peers, s)
            }
        }
    }

    /// Sends `c` (from [`KernelDevice::changes`]): the whole configuration (key, port,
    /// replace-peers) to a device not configured yet, else `c` alone. What was sent is
    /// recorded; after a failure the record is stale and the next pass sends every peer
    /// again (a device that was being configured is configured whole again).
    pub async fn program(&mut self, private: &Key, port: u16, c: Changes) -> Result<(), KernelWgError> {
        let msgs = match &self.programmed {
            None => configure(self.name, private, port, &c),
            Some(_) => update(self.name, &c),
        };
        let mut result = Ok(());
        for m in msgs {
            result = self.send(m).await;
            if result.is_err() {
                break;
            }
        }
        let ok = result.is_ok();
        if ok || self.programmed.is_some() {
            self.programmed.get_or_insert_default().record(c, ok);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::{GenlFamily, GenlHeader};
    use weft_core::lease::SubnetKey;

    use super::*;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn p(b: u8, endpoint: &str, nets: &[&str]) -> Peer {
        Peer {
            lease: SubnetKey::v4("10.5.1.0/24".parse().unwrap()),
            public_key: key(b),
            endpoint: endpoint.parse().unwrap(),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    /// What the kernel would read: emitted to bytes and parsed back.
    fn wire(m: &WireguardMessage) -> WireguardMessage {
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        let header = GenlHeader { cmd: m.command(), version: m.version() };
        WireguardMessage::parse_with_param(&buf, header).unwrap()
    }

    fn peers_of(m: &WireguardMessage) -> Vec<Vec<WireguardPeerAttribute>> {
        m.attributes
            .iter()
            .find_map(|a| {
                if let WireguardAttribute::Peers(p) = a { Some(p.iter().map(|p| p.0.clone()).collect()) } else { None }
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_device_is_configured_as_flanneld_configures_it() {
        let s = PeerSettings { psk: Some(key(9)), keepalive: 25 };
        let peers = [
            p(1, "192.0.2.12:51820", &["10.5.2.0/24", "fd00:5:0:2::/64"]),
            p(2, "[fd00:192::13]:51821", &["fd00:5:0:3::/64"]),
        ];
        let msgs = configure("flannel-wg", &key(7), 51820, &Programmed::default().changes(&peers, &s));
        assert_eq!(msgs.len(), 1);
        let m = wire(&msgs[0]);
        assert_eq!(m.cmd, WireguardCmd::SetDevice);
        assert_eq!(WireguardMessage::family_name(), "wireguard");
        assert!(m.attributes.contains(&WireguardAttribute::IfName("flannel-wg".into())));
        assert!(m.attributes.contains(&WireguardAttribute::PrivateKey([7; 32])));
        assert!(m.attributes.contains(&WireguardAttribute::ListenPort(51820)));
        assert!(m.attributes.contains(&WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers)));
        let got = peers_of(&m);
        assert_eq!(got.len(), 2);
        assert!(got[0].contains(&WireguardPeerAttribute::PublicKey([1; 32])));
        assert!(got[0].contains(&WireguardPeerAttribute::PresharedKey([9; 32])));
        assert!(got[0].contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        assert!(got[0].contains(&WireguardPeerAttribute::Endpoint("192.0.2.12:51820".parse().unwrap())));
        assert!(got[0].contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps)));
        let ips = got[0]
            .iter()
            .find_map(|a| if let WireguardPeerAttribute::AllowedIps(i) = a { Some(i.clone()) } else { None })
            .unwrap();
        assert_eq!(
            ips.iter().map(|i| i.0.clone()).collect::<Vec<_>>(),
            vec![
                vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr("10.5.2.0".parse().unwrap()),
                    WireguardAllowedIpAttr::Cidr(24)
                ],
                vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv6),
                    WireguardAllowedIpAttr::IpAddr("fd00:5:0:2::".parse().unwrap()),
                    WireguardAllowedIpAttr::Cidr(64)
                ],
            ]
        );
        assert!(got[1].contains(&WireguardPeerAttribute::Endpoint("[fd00:192::13]:51821".parse().unwrap())));
        // No PSK configured: all zero, the kernel's "none".
        let none = PeerSettings { psk: None, keepalive: 0 };
        let m = wire(&configure("flannel-wg", &key(7), 51820, &Programmed::default().changes(&peers[..1], &none))[0]);
        assert!(peers_of(&m)[0].contains(&WireguardPeerAttribute::PresharedKey([0; 32])));
        // No peers yet: the device still gets its key and port.
        let m = wire(&configure("flannel-wg", &key(7), 51820, &Changes::default())[0]);
        assert!(m.attributes.contains(&WireguardAttribute::PrivateKey([7; 32])));
        assert!(peers_of(&m).is_empty());
    }

    /// What `c` sends to `flannel-wg` without replace-peers, as the kernel reads it: per
    /// message, the peers' public keys and whether each is a removal.
    fn sent(c: &Changes) -> Vec<Vec<(Key, bool)>> {
        update("flannel-wg", c)
            .iter()
            .map(|m| {
                let m = wire(m);
                assert!(
                    !m.attributes.iter().any(|a| matches!(a, WireguardAttribute::Flags(_))),
                    "no replace-peers: the sessions of the peers that stay survive"
                );
                peers_of(&m)
                    .iter()
                    .map(|attrs| {
                        let k = attrs.iter().find_map(|a| match a {
                            WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
                            _ => None,
                        });
                        (k.unwrap(), attrs.contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)))
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn updates_keep_sessions_and_remove_only_what_is_gone() {
        let s = PeerSettings { psk: None, keepalive: 0 };
        let mut programmed = Programmed::default();
        let first = programmed.changes(&[p(1, "[fd00::1]:51821", &[]), p(2, "[fd00::2]:51821", &[])], &s);
        programmed.record(first, true);
        let c = programmed.changes(&[p(2, "[fd00::2]:51821", &["fd00:5:0:2::/64"])], &s);
        let msgs = update("flannel-wg-v6", &c);
        assert_eq!(msgs.len(), 1);
        let m = wire(&msgs[0]);
        assert!(
            !m.attributes.iter().any(|a| matches!(a, WireguardAttribute::Flags(_) | WireguardAttribute::PrivateKey(_))),
            "no replace-peers: the sessions of the peers that stay survive"
        );
        let got = peers_of(&m);
        assert_eq!(got.len(), 2);
        assert!(got[0].contains(&WireguardPeerAttribute::PublicKey([2; 32])));
        assert_eq!(
            got[1],
            vec![
                WireguardPeerAttribute::PublicKey([1; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
            ]
        );
        assert!(update("flannel-wg", &Programmed::default().changes(&[], &s)).is_empty());
    }

    /// Peer `i` of a large cluster: its own key, subnet and host.
    fn nth(i: u32) -> Peer {
        let [_, a, b, c] = i.to_be_bytes();
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        Peer {
            lease: SubnetKey::v4(format!("10.{a}.{b}.{c}/32").parse().unwrap()),
            public_key: Key(k),
            endpoint: format!("192.{a}.{b}.{c}:51820").parse().unwrap(),
            allowed_ips: vec![format!("10.{a}.{b}.{c}/32").parse().unwrap()],
        }
    }

    #[test]
    fn a_pass_sends_only_what_changed_since_the_last() {
        let s = PeerSettings { psk: Some(key(9)), keepalive: 25 };
        let mut peers: Vec<Peer> = (0..20_000).map(nth).collect();
        let mut programmed = Programmed::default();

        // First pass: every peer, split as `wg` splits.
        let c = programmed.changes(&peers, &s);
        let msgs = configure("flannel-wg", &key(7), 51820, &c);
        assert_eq!(msgs.len(), 313);
        assert_eq!(msgs.iter().map(|m| peers_of(m).len()).sum::<usize>(), 20_000);
        assert_eq!(peers_of(&wire(&msgs[312])).len(), 20_000 - 312 * 64);
        programmed.record(c, true);

        // Nothing changed: nothing sent.
        let c = programmed.changes(&peers, &s);
        assert_eq!(c, Changes::default());
        assert!(update("flannel-wg", &c).is_empty());

        // One lease's endpoint changed: that peer alone, set whole.
        peers[1234].endpoint = "198.51.100.7:51821".parse().unwrap();
        let c = programmed.changes(&peers, &s);
        assert_eq!(sent(&c), [vec![(peers[1234].public_key, false)]]);
        let m = wire(&update("flannel-wg", &c)[0]);
        assert!(peers_of(&m)[0].contains(&WireguardPeerAttribute::Endpoint("198.51.100.7:51821".parse().unwrap())));
        assert!(peers_of(&m)[0].contains(&WireguardPeerAttribute::PresharedKey([9; 32])));
        programmed.record(c, true);
        assert_eq!(programmed.changes(&peers, &s), Changes::default(), "recorded");

        // Its subnets changed, or the settings: re-sent too.
        peers[7].allowed_ips.push("fd00:5::/64".parse().unwrap());
        assert_eq!(sent(&programmed.changes(&peers, &s)), [vec![(peers[7].public_key, false)]]);
        peers[7] = nth(7);
        assert_eq!(programmed.changes(&peers, &PeerSettings { psk: None, keepalive: 25 }).set.len(), 20_000);

        // One lease gone: one removal, by key.
        let gone = peers.remove(500);
        let c = programmed.changes(&peers, &s);
        assert_eq!(sent(&c), [vec![(gone.public_key, true)]]);
        programmed.record(c, true);
        assert_eq!(programmed.changes(&peers, &s), Changes::default());

        // A new lease: that peer alone.
        peers.push(nth(20_000));
        assert_eq!(sent(&programmed.changes(&peers, &s)), [vec![(nth(20_000).public_key, false)]]);
    }

    #[test]
    fn after_a_failed_send_every_peer_goes_again() {
        let s = PeerSettings { psk: None, keepalive: 0 };
        let mut peers: Vec<Peer> = (0..20_000).map(nth).collect();
        let mut programmed = Programmed::default();
        let c = programmed.changes(&peers, &s);
        programmed.record(c, true);

        // A pass that removes peer 9 and changes peer 10 fails part-way: which of the two
        // the kernel took is unknown.
        let gone = peers.remove(9);
        peers[9].endpoint = "198.51.100.7:51821".parse().unwrap();
        let c = programmed.changes(&peers, &s);
        assert_eq!(sent(&c), [vec![(peers[9].public_key, false), (gone.public_key, true)]]);
        programmed.record(c, false);

        // The next pass sends every wanted peer again and removes the gone one again.
        let c = programmed.changes(&peers, &s);
        assert_eq!(c.set.len(), peers.len());
        assert_eq!(c.remove, [gone.public_key]);
        assert_eq!(update("flannel-wg", &c).len(), 313);
        programmed.record(c, true);
        assert_eq!(programmed.changes(&peers, &s), Changes::default(), "certain again once all of it went");

        // The periodic re-send (drift: a peer removed by hand) is the same.
        programmed.doubt();
        assert_eq!(programmed.changes(&peers, &s).set.len(), peers.len());
    }

    #[test]
    fn of_two_peers_with_one_key_the_later_wins() {
        let s = PeerSettings { psk: None, keepalive: 0 };
        let peers = [p(1, "192.0.2.1:51820", &["10.5.1.0/24"]), p(1, "192.0.2.2:51820", &["10.5.2.0/24"])];
        let c = Programmed::default().changes(&peers, &s);
        assert_eq!(c.set.len(), 1);
        assert_eq!(c.set[0].1.endpoint, "192.0.2.2:51820".parse().unwrap());
    }

    #[test]
    fn many_peers_are_split_into_messages() {
        let s = PeerSettings { psk: None, keepalive: 0 };
        let peers: Vec<Peer> = (0..150u8).map(|i| p(i, "192.0.2.1:51820", &["10.5.2.0/24"])).collect();
        let msgs = configure("flannel-wg", &key(7), 51820, &Programmed::default().changes(&peers, &s));
        assert_eq!(msgs.iter().map(|m| peers_of(&wire(m)).len()).collect::<Vec<_>>(), [64, 64, 22]);
        assert!(wire(&msgs[0]).attributes.contains(&WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers)));
        assert!(
            !wire(&msgs[1]).attributes.iter().any(|a| matches!(a, WireguardAttribute::Flags(_))),
            "only the first message replaces the peer set"
        );
    }
}
