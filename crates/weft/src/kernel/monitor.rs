//! Netlink change notifications: wakes the reconciler when links, addresses, neighbours or
//! routes change, so an entry deleted by hand or a deleted device is put back within moments.

use std::sync::Arc;

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;

/// Subscribes to link, neighbour and route changes and notifies `wake` on each batch of
/// deletions or changes. Returns when the subscription cannot be made.
pub fn spawn(wake: Arc<Notify>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    tokio::spawn(conn);
    Ok(tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            // Every kind of change can concern us; the reconciler reads the state and does
            // nothing when all is in place, so a spurious wake-up costs one dump.
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelNeighbour(_)
                | RouteNetlinkMessage::NewNeighbour(_)
                | RouteNetlinkMessage::DelRoute(_)
                | RouteNetlinkMessage::NewRoute(_)
                | RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_),
            ) = msg.payload
            {
                wake.notify_one();
            }
        }
    }))
}
