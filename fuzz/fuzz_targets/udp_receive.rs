//! The udp backend's receive and send paths on arbitrary datagrams from arbitrary senders.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use weft_core::packet::{PeerTable, icmp_net_unreachable, inbound, outbound, parse_ipv4};

fuzz_target!(|data: &[u8]| {
    let Some((&sender, packet)) = data.split_first() else { return };
    let peers = PeerTable::new(24, [("10.5.2.0/24".parse().unwrap(), Ipv4Addr::new(192, 0, 2, 12)), ("10.5.3.0/24".parse().unwrap(), Ipv4Addr::new(192, 0, 2, 13))]);
    let from = Ipv4Addr::new(192, 0, 2, sender % 16);
    let mut buf = packet.to_vec();
    if let Ok(n) = inbound(&mut buf, from, &peers, "10.5.1.0/24".parse().unwrap()) {
        assert!(n <= buf.len());
    }
    let mut buf = packet.to_vec();
    let _ = outbound(&mut buf, &peers);
    if let Ok(h) = parse_ipv4(packet) {
        let mut out = [0u8; 128];
        let _ = icmp_net_unreachable(packet, &h, Ipv4Addr::new(10, 5, 1, 0), &mut out);
    }
});
