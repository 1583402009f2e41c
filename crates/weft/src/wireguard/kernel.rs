//! The kernel data path: where the kernel can create a `wireguard` link, the device is
//! programmed over generic netlink (family `wireguard`, rust-netlink's `genetlink` and
//! `netlink-packet-wireguard`; no `wg` subprocess) as flanneld programs it: private key,
//! listen port, and per peer its public key, PSK, keepalive, endpoint and allowed IPs.
//!
//! The messages are built by pure functions from the planner's peers; the device is
//! configured whole once (replace-peers) and then re-asserted on every reconcile pass
//! without replace-peers, so that existing sessions survive: each wanted peer is set (its
//! allowed IPs replaced), and each peer programmed before and no longer wanted is removed.

use std::collections::BTreeSet;

use futures::StreamExt;
use genetlink::GenetlinkHandle;
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

fn peer(p: &Peer, s: &PeerSettings) -> WireguardPeer {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(p.public_key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::Endpoint(p.endpoint),
        WireguardPeerAttribute::PersistentKeepalive(s.keepalive),
    ];
    // No PSK: all zero, which the kernel treats as none (and clears a previous one).
    attrs.push(WireguardPeerAttribute::PresharedKey(s.psk.map(|k| k.0).unwrap_or([0; 32])));
    let ips = p
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

/// The messages that configure device `name` whole: private key, listen port, and exactly
/// `peers` (the first message replaces whatever peers the device had).
pub fn configure(name: &str, private: &Key, port: u16, peers: &[Peer], s: &PeerSettings) -> Vec<WireguardMessage> {
    let mut out = vec![set_device(
        name,
        vec![
            WireguardAttribute::PrivateKey(private.0),
            WireguardAttribute::ListenPort(port),
            WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
        ],
        peers.iter().take(PEERS_PER_MESSAGE).map(|p| peer(p, s)).collect(),
    )];
    for chunk in peers.chunks(PEERS_PER_MESSAGE).skip(1) {
        out.push(set_device(name, Vec::new(), chunk.iter().map(|p| peer(p, s)).collect()));
    }
    out
}

/// The messages that make device `name`'s peers `peers` when `programmed` are the keys set
/// before: every wanted peer set again (sessions kept, allowed IPs replaced), the others
/// removed by key. Empty when there is nothing to send.
pub fn update(name: &str, peers: &[Peer], programmed: &BTreeSet<Key>, s: &PeerSettings) -> Vec<WireguardMessage> {
    let wanted: BTreeSet<Key> = peers.iter().map(|p| p.public_key).collect();
    let all: Vec<WireguardPeer> = peers
        .iter()
        .map(|p| peer(p, s))
        .chain(programmed.iter().filter(|k| !wanted.contains(k)).map(removal))
        .collect();
    all.chunks(PEERS_PER_MESSAGE).map(|c| set_device(name, Vec::new(), c.to_vec())).collect()
}

/// A kernel WireGuard device, programmed over generic netlink.
pub struct KernelDevice {
    name: &'static str,
    handle: GenetlinkHandle,
    conn: tokio::task::JoinHandle<()>,
    /// The peers' keys as last programmed.
    programmed: BTreeSet<Key>,
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
        Ok(KernelDevice { name, handle, conn, programmed: BTreeSet::new() })
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

    /// Configures the device whole (key, port, exactly `peers`).
    pub async fn configure(
        &mut self,
        private: &Key,
        port: u16,
        peers: &[Peer],
        s: &PeerSettings,
    ) -> Result<(), KernelWgError> {
        for m in configure(self.name, private, port, peers, s) {
            self.send(m).await?;
        }
        self.programmed = peers.iter().map(|p| p.public_key).collect();
        Ok(())
    }

    /// Re-asserts the peer set (see [`update`]).
    pub async fn set_peers(&mut self, peers: &[Peer], s: &PeerSettings) -> Result<(), KernelWgError> {
        for m in update(self.name, peers, &self.programmed, s) {
            self.send(m).await?;
        }
        self.programmed = peers.iter().map(|p| p.public_key).collect();
        Ok(())
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
        let msgs = configure("flannel-wg", &key(7), 51820, &peers, &s);
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
        let m =
            wire(&configure("flannel-wg", &key(7), 51820, &peers[..1], &PeerSettings { psk: None, keepalive: 0 })[0]);
        assert!(peers_of(&m)[0].contains(&WireguardPeerAttribute::PresharedKey([0; 32])));
    }

    #[test]
    fn updates_keep_sessions_and_remove_only_what_is_gone() {
        let s = PeerSettings { psk: None, keepalive: 0 };
        let programmed: BTreeSet<Key> = [key(1), key(2)].into();
        let msgs = update("flannel-wg-v6", &[p(2, "[fd00::2]:51821", &["fd00:5:0:2::/64"])], &programmed, &s);
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
        assert!(update("flannel-wg", &[], &BTreeSet::new(), &s).is_empty());
    }

    #[test]
    fn many_peers_are_split_into_messages() {
        let s = PeerSettings { psk: None, keepalive: 0 };
        let peers: Vec<Peer> = (0..150u8).map(|i| p(i, "192.0.2.1:51820", &["10.5.2.0/24"])).collect();
        let msgs = configure("flannel-wg", &key(7), 51820, &peers, &s);
        assert_eq!(msgs.iter().map(|m| peers_of(&wire(m)).len()).collect::<Vec<_>>(), [64, 64, 22]);
        assert!(wire(&msgs[0]).attributes.contains(&WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers)));
        assert!(
            !wire(&msgs[1]).attributes.iter().any(|a| matches!(a, WireguardAttribute::Flags(_))),
            "only the first message replaces the peer set"
        );
    }
}
