//! The kernel side of the data plane over netlink: read the routes, neighbours and FDB
//! entries that belong to us, apply a diff computed by `weft_core::plan`, manage the vxlan
//! device, and watch for changes made behind our back.

pub mod link;
pub mod monitor;
pub mod teardown;
pub mod translate;
pub mod vxlan;

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::RouteMessage;
use rtnetlink::{Handle, RouteMessageBuilder};
use weft_core::plan::{KernelState, LinkRef, Ops, Route};

pub use self::translate::{Dump, Links, WEFT_PROTOCOL};

/// A netlink operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct KernelError {
    /// What was attempted.
    pub op: String,
    /// The kernel's answer.
    #[source]
    pub source: rtnetlink::Error,
}

/// Turns a netlink error into a [`KernelError`] that says what was attempted.
pub(crate) fn err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let op = op.into();
    move |source| KernelError { op, source }
}

/// What applying a diff did besides succeeding.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes that failed (retried on the next pass).
    pub errors: Vec<KernelError>,
    /// Routes not created because a route of someone else has the same destination: left
    /// alone, never replaced.
    pub blocked: Vec<Route>,
}

/// How many netlink requests are in flight at once while applying a diff.
const PARALLEL: usize = 64;

/// The only door to netlink: backends and the daemon speak in plan terms (routes,
/// neighbours, FDB entries, links); message building and dump reading live in
/// [`translate`], which is pure.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
}

impl Kernel {
    /// Wraps a handle.
    pub fn new(handle: Handle) -> Self {
        Kernel { handle }
    }

    /// Dumps routes, the vxlan devices' neighbours and the FDB, and keeps what is ours
    /// (see [`translate::read_state`]); also returns our own subnets whose route was
    /// displaced.
    pub async fn read_state(
        &self,
        links: &Links,
        networks: &[IpNet],
        own: &[IpNet],
    ) -> Result<(KernelState, Vec<IpNet>), KernelError> {
        let mut dump = Dump::default();
        for v6 in [false, true] {
            let msg = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let routes: Vec<RouteMessage> =
                self.handle.route().get(msg).execute().try_collect().await.map_err(err("dump routes"))?;
            dump.routes.extend(routes);
        }
        for (present, family) in [(links.vxlan4, AddressFamily::Inet), (links.vxlan6, AddressFamily::Inet6)] {
            if present.is_none() {
                continue;
            }
            let neighs: Vec<_> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(err("dump neighbours"))?;
            dump.neighbours.extend(neighs);
        }
        if links.vxlan4.is_some() || links.vxlan6.is_some() {
            dump.fdb = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute()
                .try_collect()
                .await
                .map_err(err("dump fdb"))?;
        }
        Ok(translate::read_state(&dump, links, networks, own))
    }

    /// Puts back the route of our own subnet `net` on the device holding an address inside
    /// it (the CNI bridge, `cni0`), as the kernel makes it, in place of a route via the
    /// external interface that displaced it. Does nothing while no such device exists.
    pub async fn restore_own_route(&self, net: IpNet, external: u32) -> Result<bool, KernelError> {
        let addrs: Vec<_> = self.handle.address().get().execute().try_collect().await.map_err(err("dump addresses"))?;
        let holder = addrs.iter().find_map(|a| {
            let ip = a.attributes.iter().find_map(|x| match x {
                netlink_packet_route::address::AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            (a.header.index != external && a.header.prefix_len == net.prefix_len() && net.contains(&ip))
                .then_some((a.header.index, ip))
        });
        let Some((index, src)) = holder else { return Ok(false) };
        let Some(msg) = translate::own_subnet_route(net, index, src) else { return Ok(false) };
        self.handle.route().add(msg).replace().execute().await.map_err(err(format!("restore the route of {net}")))?;
        Ok(true)
    }

    /// Applies `ops` in order (neighbours, FDB, routes; then deletions in reverse), many
    /// requests in flight at once. Keeps going past failures and returns them all.
    pub async fn apply(&self, ops: &Ops, links: &Links) -> Applied {
        let mut errors = Vec::new();
        let mut blocked = Vec::new();
        let missing = |l: LinkRef| KernelError {
            op: format!("{l:?} device is missing"),
            source: rtnetlink::Error::RequestFailed,
        };
        macro_rules! phase {
            ($items:expr, |$it:ident| $fut:expr) => {{
                let t = std::time::Instant::now();
                let results: Vec<Result<(), KernelError>> =
                    stream::iter($items.iter().map(|$it| $fut)).buffer_unordered(PARALLEL).collect().await;
                errors.extend(results.into_iter().filter_map(Result::err));
                tracing::debug!(items = $items.len(), took_us = t.elapsed().as_micros() as u64, "netlink phase");
            }};
        }
        phase!(ops.neighbors_set, |n| async move {
            let (l, ip, mac) = *n;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            let mut req = self.handle.neighbours().add(idx, ip).replace();
            *req.message_mut() = translate::neighbour_set(idx, ip, &mac);
            req.execute().await.map_err(err(format!("set neighbour {ip}")))
        });
        phase!(ops.fdb_set, |f| async move {
            let (l, mac, dst) = *f;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            let mut req = self.handle.neighbours().add_bridge(idx, &mac).replace();
            *req.message_mut() = translate::fdb_set(idx, &mac, dst);
            req.execute().await.map_err(err(format!("set fdb {} dst {dst}", weft_core::backend::mac_to_string(&mac))))
        });
        // Exclusive creation: the kernel refuses (EEXIST) when any route has this destination.
        let added: Vec<(Route, Result<(), KernelError>)> = stream::iter(ops.routes_add.iter().map(|r| async move {
            let res = match links.index(r.link) {
                None => Err(missing(r.link)),
                Some(idx) => self
                    .handle
                    .route()
                    .add(translate::route_add(r, idx))
                    .execute()
                    .await
                    .map_err(err(format!("add route {}", r.dst))),
            };
            (*r, res)
        }))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
        for (r, res) in added {
            match res {
                Ok(()) => {}
                Err(KernelError { source: rtnetlink::Error::NetlinkError(e), .. }) if e.raw_code() == -libc::EEXIST => {
                    blocked.push(r)
                }
                Err(e) => errors.push(e),
            }
        }
        phase!(ops.routes_set, |r| async move {
            let idx = links.index(r.link).ok_or_else(|| missing(r.link))?;
            self.handle
                .route()
                .add(translate::route_add(r, idx))
                .replace()
                .execute()
                .await
                .map_err(err(format!("set route {}", r.dst)))
        });
        phase!(ops.routes_del, |r| async move {
            let idx = links.index(r.link).ok_or_else(|| missing(r.link))?;
            let msg = translate::route_del(r, idx);
            self.handle.route().del(msg).execute().await.map_err(err(format!("delete route {}", r.dst)))
        });
        phase!(ops.fdb_del, |f| async move {
            let (l, mac, dst) = *f;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            let msg = translate::fdb_del(idx, &mac, dst);
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(err(format!("delete fdb {}", weft_core::backend::mac_to_string(&mac))))
        });
        phase!(ops.neighbors_del, |n| async move {
            let (l, ip, _) = *n;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            let msg = translate::neighbour_del(idx, ip);
            self.handle.neighbours().del(msg).execute().await.map_err(err(format!("delete neighbour {ip}")))
        });
        Applied { errors, blocked }
    }

    /// Keeps `blackhole <net>` routes for our subnets (`--ip-blackhole-route`).
    pub async fn ensure_blackholes(&self, nets: &[IpNet]) -> Result<(), KernelError> {
        for net in nets {
            let msg = translate::blackhole(*net);
            match self.handle.route().add(msg).execute().await {
                Ok(()) => {}
                // EEXIST: a route for the subnet is already there (ours, or the CNI bridge's).
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(err(format!("add blackhole route {net}"))(e)),
            }
        }
        Ok(())
    }

    /// The prefixes directly connected on interface `index` (for DirectRouting).
    pub async fn connected_prefixes(&self, index: u32) -> Result<Vec<IpNet>, KernelError> {
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(err("dump addresses"))?;
        Ok(addrs
            .iter()
            .filter_map(|a| {
                a.attributes.iter().find_map(|x| match x {
                    netlink_packet_route::address::AddressAttribute::Address(ip) => {
                        IpNet::new(*ip, a.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .map(|n| n.trunc())
            .collect())
    }
}
