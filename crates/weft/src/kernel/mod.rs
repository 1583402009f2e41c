//! The kernel side of the data plane over netlink: read the routes, neighbours and FDB
//! entries that belong to us, apply a diff computed by `weft_core::plan`, manage the vxlan
//! device, and watch for changes made behind our back.

pub mod batch;
pub mod link;
pub mod monitor;
pub mod teardown;
pub mod translate;
pub mod vxlan;

use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;
use weft_core::plan::{KernelState, LinkRef, NEXTHOP_IDS, Ops, Route};

use self::batch::{Batcher, CREATE_EXCL, CREATE_REPLACE, Refusal, Requests};
pub use self::translate::{Links, NexthopEntry, WEFT_PROTOCOL};

/// Set to `off` (or `0`, `false`, `no`), weft programs flannel's plain routes even where the
/// kernel has nexthop objects.
pub const NEXTHOPS_ENV: &str = "WEFT_NEXTHOPS";

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

fn refused(op: String, r: Refusal) -> KernelError {
    let mut e = netlink_packet_core::ErrorMessage::default();
    e.code = std::num::NonZeroI32::new(-r.errno);
    let op = match r.message {
        Some(m) => format!("{op} (kernel: {m})"),
        None => op,
    };
    KernelError { op, source: rtnetlink::Error::NetlinkError(e) }
}

fn io_error(op: &str, e: std::io::Error) -> KernelError {
    refused(op.to_string(), Refusal { errno: e.raw_os_error().unwrap_or(libc::EIO), message: Some(e.to_string()) })
}

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;

/// What applying a diff did besides succeeding.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes that failed (retried on the next pass).
    pub errors: Vec<KernelError>,
    /// Routes not created because a route of someone else has the same destination: left
    /// alone, never replaced.
    pub blocked: Vec<Route>,
}

/// The only door to netlink: backends and the daemon speak in plan terms (routes,
/// neighbours, FDB entries, links); message building and dump reading live in
/// [`translate`], which is pure.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
    /// The batched sender (opened on first use).
    batcher: Arc<Mutex<Option<Batcher>>>,
    /// A second socket: a resync dumps neighbours and FDB entries on it while the routes
    /// come in on the first (the kernel's dump work then runs on two cores).
    dumper: Arc<Mutex<Option<Batcher>>>,
    /// Whether nexthop objects are used (probed once).
    nexthops: Arc<std::sync::OnceLock<bool>>,
    /// The ids of others' nexthops as of the last dump (never allocated by us).
    foreign_ids: Arc<Mutex<std::collections::HashSet<u32>>>,
}

impl Kernel {
    /// Wraps a handle.
    pub fn new(handle: Handle) -> Self {
        Kernel {
            handle,
            batcher: Default::default(),
            dumper: Default::default(),
            nexthops: Default::default(),
            foreign_ids: Default::default(),
        }
    }

    /// Runs `f` with the batched sender on a blocking thread.
    async fn with_batcher<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Batcher) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        joined(Self::spawn_on(self.batcher.clone(), f).await)
    }

    /// Starts `f` with the sender in `slot` (opened on first use) on a blocking thread now.
    fn spawn_on<T: Send + 'static>(
        slot: Arc<Mutex<Option<Batcher>>>,
        f: impl FnOnce(&mut Batcher) -> std::io::Result<T> + Send + 'static,
    ) -> tokio::task::JoinHandle<std::io::Result<T>> {
        tokio::task::spawn_blocking(move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(Batcher::open()?);
            }
            let b = guard.as_mut().expect("opened above");
            let res = f(b);
            if res.is_err() {
                // A socket that failed mid-batch may hold stale answers: start afresh.
                *guard = None;
            }
            res
        })
    }

    /// Whether nexthop objects are in use, once probed (`None` before the first pass).
    pub fn nexthops_in_use(&self) -> Option<bool> {
        self.nexthops.get().copied()
    }

    /// The ids of others' nexthops as of the last full read.
    pub fn foreign_nexthop_ids(&self) -> std::collections::HashSet<u32> {
        self.foreign_ids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every nexthop object in the kernel (ours and others').
    pub async fn dump_nexthops(&self) -> Result<Vec<NexthopEntry>, KernelError> {
        self.with_batcher(dump_nexthops_on).await.map_err(|e| io_error("dump nexthops", e))
    }

    /// Deletes every nexthop object of ours (protocol 87; the kernel removes the routes
    /// through them with them), for `weft cleanup`; returns their ids. Kernels without
    /// nexthop objects have none to delete.
    pub async fn remove_own_nexthops(&self) -> Result<Vec<u32>, KernelError> {
        let Ok(all) = self.dump_nexthops().await else { return Ok(Vec::new()) };
        let ours: Vec<u32> = all.iter().filter(|n| n.protocol == 87).map(|n| n.id).collect();
        if ours.is_empty() {
            return Ok(ours);
        }
        let ids = ours.clone();
        let res = self
            .with_batcher(move |b| {
                let mut r = Requests::default();
                for id in &ids {
                    r.raw(translate::RTM_DELNEXTHOP, 0, &translate::nexthop_del(*id));
                }
                b.send(&mut r)
            })
            .await
            .map_err(|e| io_error("delete nexthops", e))?;
        // ENOENT: gone meanwhile (a daemon still stopping), which is what we wanted.
        if let Some(r) = res.into_iter().flatten().find(|r| r.errno != libc::ENOENT) {
            return Err(refused("delete our nexthops".into(), r));
        }
        Ok(ours)
    }

    /// Whether routes go through nexthop objects: probed once by creating (and deleting)
    /// a blackhole nexthop of ours; off where the kernel refuses it, or with
    /// `WEFT_NEXTHOPS=off`, and then flannel's plain routes are used.
    pub async fn nexthops(&self) -> bool {
        if let Some(on) = self.nexthops.get() {
            return *on;
        }
        let forced_off = std::env::var(NEXTHOPS_ENV)
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "off" | "0" | "false" | "no"));
        let on = if forced_off {
            tracing::info!("nexthop objects off ({NEXTHOPS_ENV}); programming plain routes");
            false
        } else {
            match self.probe_nexthops().await {
                Ok(()) => {
                    tracing::info!("routes go through nexthop objects (protocol 87)");
                    true
                }
                Err(e) => {
                    tracing::info!("the kernel has no usable nexthop objects ({e}); programming plain routes");
                    false
                }
            }
        };
        *self.nexthops.get_or_init(|| on)
    }

    async fn probe_nexthops(&self) -> Result<(), KernelError> {
        let taken: std::collections::BTreeSet<u32> = self.dump_nexthops().await?.iter().map(|n| n.id).collect();
        let id = (NEXTHOP_IDS.start..NEXTHOP_IDS.end).rev().find(|i| !taken.contains(i)).unwrap_or(NEXTHOP_IDS.end - 1);
        let res = self
            .with_batcher(move |b| {
                let mut r = Requests::default();
                r.raw(translate::RTM_NEWNEXTHOP, CREATE_EXCL, &translate::nexthop_blackhole(id));
                r.raw(translate::RTM_DELNEXTHOP, 0, &translate::nexthop_del(id));
                b.send(&mut r)
            })
            .await
            .map_err(|e| io_error("probe nexthops", e))?;
        match res.into_iter().next().flatten() {
            None => Ok(()),
            Some(r) => Err(refused("create a probe nexthop".into(), r)),
        }
    }

    /// Dumps nexthop objects, routes, the vxlan devices' neighbours and the FDB, and keeps
    /// what is ours (see [`translate::read_state`]); also returns our own subnets whose route
    /// was displaced. Where nexthop objects are used, the routes of `desired` are pointed at
    /// them ([`weft_core::plan::assign_nexthops`]: existing ones adopted, new ids around
    /// everyone's), so that the diff of the two is what to do.
    pub async fn read_state(
        &self,
        links: &Links,
        networks: &[IpNet],
        own: &[IpNet],
        desired: &mut KernelState,
    ) -> Result<(KernelState, Vec<IpNet>), KernelError> {
        self.begin_read(links, networks, own).await.finish(desired).await
    }

    /// Starts [`Kernel::read_state`]'s dumps at once, on two threads and two sockets (nexthops
    /// and routes on one, neighbours and FDB entries on the other, each turned into its half
    /// of the model there), so the caller can plan meanwhile; [`PendingRead::finish`] joins
    /// them.
    pub async fn begin_read(&self, links: &Links, networks: &[IpNet], own: &[IpNet]) -> PendingRead {
        let started = std::time::Instant::now();
        let nexthops = self.nexthops().await;
        let want_neigh: Vec<AddressFamily> =
            [(links.vxlan4, AddressFamily::Inet), (links.vxlan6, AddressFamily::Inet6)]
                .into_iter()
                .filter_map(|(l, f)| l.map(|_| f))
                .collect();
        let want_fdb = links.vxlan4.is_some() || links.vxlan6.is_some();
        let (l, networks, own) = (*links, networks.to_vec(), own.to_vec());
        // Raw dumps parsed in place: a resync reads every route, neighbour and FDB entry.
        let routes = Self::spawn_on(self.batcher.clone(), move |b| {
            let t = std::time::Instant::now();
            let all_nexthops = match dump_nexthops_on(b) {
                Ok(n) => n,
                Err(e) if nexthops => return Err(std::io::Error::new(e.kind(), format!("dump nexthops: {e}"))),
                // Also with nexthops off: ours from an earlier run are then found and removed.
                Err(_) => Vec::new(),
            };
            let mut routes = Vec::new();
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                dump_parsed(
                    b,
                    RTM_GETROUTE,
                    &translate::route_dump(family),
                    RTM_NEWROUTE,
                    translate::parse_route,
                    &mut routes,
                )?;
            }
            let dumped = t.elapsed();
            let (state, displaced) = translate::read_routes(&all_nexthops, &routes, &l, &networks, &own);
            // Every id in the kernel, sorted (the dump comes by id): searched, not hashed.
            let mut taken: Vec<u32> = all_nexthops.iter().map(|n| n.id).collect();
            taken.sort_unstable();
            Ok(RoutesRead { state, displaced, taken, count: routes.len(), dumped, took: t.elapsed() })
        });
        let neighbours = Self::spawn_on(self.dumper.clone(), move |b| {
            let t = std::time::Instant::now();
            let (mut neighbours, mut fdb) = (Vec::new(), Vec::new());
            for family in want_neigh {
                dump_parsed(
                    b,
                    RTM_GETNEIGH,
                    &translate::neigh_dump(family),
                    RTM_NEWNEIGH,
                    translate::parse_neigh,
                    &mut neighbours,
                )?;
            }
            if want_fdb {
                let payload = translate::neigh_dump(AddressFamily::Bridge);
                dump_parsed(b, RTM_GETNEIGH, &payload, RTM_NEWNEIGH, translate::parse_neigh, &mut fdb)?;
            }
            let dumped = t.elapsed();
            let state = translate::read_neighbours(&neighbours, &fdb, &l);
            Ok(NeighboursRead { state, counts: (neighbours.len(), fdb.len()), dumped, took: t.elapsed() })
        });
        PendingRead { kernel: self.clone(), nexthops, started, routes, neighbours }
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

    /// Applies `ops` in order (neighbours, FDB, nexthops, routes; then deletions in
    /// reverse) as one ordered batch: many requests per `sendmsg`, every answer mapped back to
    /// its change. Keeps going past failures and returns them all.
    pub async fn apply(&self, ops: &Ops, links: &Links) -> Applied {
        const NEWROUTE: u16 = 24;
        const DELROUTE: u16 = 25;
        const NEWNEIGH: u16 = 28;
        const DELNEIGH: u16 = 29;
        /// What each request was, to map its answer back (described only when it failed: a
        /// first pass at 20 000 peers sends 80 000 requests).
        enum What {
            Neigh(&'static str, std::net::IpAddr),
            Fdb(&'static str, weft_core::backend::Mac, std::net::IpAddr),
            Nexthop(&'static str, u32),
            Route(&'static str, IpNet),
            RouteAdd(Route),
        }
        let describe = |w: &What| match w {
            What::Neigh(verb, ip) => format!("{verb} neighbour {ip}"),
            What::Fdb(verb, m, dst) => format!("{verb} fdb {} dst {dst}", weft_core::backend::mac_to_string(m)),
            What::Nexthop(verb, id) => format!("{verb} nexthop id {id}"),
            What::Route(verb, dst) => format!("{verb} route {dst}"),
            What::RouteAdd(r) => format!("add route {}", r.dst),
        };
        let mut errors = Vec::new();
        let missing = |l: LinkRef| KernelError {
            op: format!("{l:?} device is missing"),
            source: rtnetlink::Error::RequestFailed,
        };
        let mut reqs = Requests::default();
        let mut what: Vec<What> = Vec::with_capacity(ops.len());
        for &(l, ip, m) in &ops.neighbors_set {
            match links.index(l) {
                Some(idx) => {
                    reqs.neighbour(NEWNEIGH, CREATE_REPLACE, &translate::neighbour_set(idx, ip, &m));
                    what.push(What::Neigh("set", ip));
                }
                None => errors.push(missing(l)),
            }
        }
        for &(l, m, dst) in &ops.fdb_set {
            match links.index(l) {
                Some(idx) => {
                    reqs.neighbour(NEWNEIGH, CREATE_REPLACE, &translate::fdb_set(idx, &m, dst));
                    what.push(What::Fdb("set", m, dst));
                }
                None => errors.push(missing(l)),
            }
        }
        for (list, flags, verb) in [(&ops.nexthops_add, CREATE_EXCL, "add"), (&ops.nexthops_set, CREATE_REPLACE, "set")]
        {
            for &(id, nh) in list {
                match links.index(nh.link) {
                    Some(idx) => {
                        reqs.raw(translate::RTM_NEWNEXTHOP, flags, &translate::nexthop_add(id, &nh, idx));
                        what.push(What::Nexthop(verb, id));
                    }
                    None => errors.push(missing(nh.link)),
                }
            }
        }
        // Exclusive creation: the kernel refuses (EEXIST) when any route has this destination.
        for r in &ops.routes_add {
            match links.index(r.link) {
                Some(idx) => {
                    reqs.route(NEWROUTE, CREATE_EXCL, &translate::route_add(r, idx));
                    what.push(What::RouteAdd(*r));
                }
                None => errors.push(missing(r.link)),
            }
        }
        for r in &ops.routes_set {
            match links.index(r.link) {
                Some(idx) => {
                    reqs.route(NEWROUTE, CREATE_REPLACE, &translate::route_add(r, idx));
                    what.push(What::Route("set", r.dst));
                }
                None => errors.push(missing(r.link)),
            }
        }
        for r in &ops.routes_del {
            match links.index(r.link) {
                Some(idx) => {
                    reqs.route(DELROUTE, 0, &translate::route_del(r, idx));
                    what.push(What::Route("delete", r.dst));
                }
                None => errors.push(missing(r.link)),
            }
        }
        for &(id, _) in &ops.nexthops_del {
            reqs.raw(translate::RTM_DELNEXTHOP, 0, &translate::nexthop_del(id));
            what.push(What::Nexthop("delete", id));
        }
        for &(l, m, dst) in &ops.fdb_del {
            match links.index(l) {
                Some(idx) => {
                    reqs.neighbour(DELNEIGH, 0, &translate::fdb_del(idx, &m, dst));
                    what.push(What::Fdb("delete", m, dst));
                }
                None => errors.push(missing(l)),
            }
        }
        for &(l, ip, _) in &ops.neighbors_del {
            match links.index(l) {
                Some(idx) => {
                    reqs.neighbour(DELNEIGH, 0, &translate::neighbour_del(idx, ip));
                    what.push(What::Neigh("delete", ip));
                }
                None => errors.push(missing(l)),
            }
        }
        let mut blocked = Vec::new();
        if reqs.is_empty() {
            return Applied { errors, blocked };
        }
        let t = std::time::Instant::now();
        let n = reqs.len();
        let answers = self.with_batcher(move |b| b.send(&mut reqs)).await;
        tracing::debug!(requests = n, took_us = t.elapsed().as_micros() as u64, "netlink batch");
        match answers {
            Err(e) => errors.push(io_error("send a netlink batch", e)),
            Ok(answers) => {
                for (w, a) in what.into_iter().zip(answers) {
                    let Some(r) = a else { continue };
                    match w {
                        // Someone else's route holds the destination: left alone.
                        What::RouteAdd(route) if r.errno == libc::EEXIST => blocked.push(route),
                        w => errors.push(refused(describe(&w), r)),
                    }
                }
            }
        }
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

/// Dumps `kind` with `payload` on `b` and appends every answer of type `answer` that `parse`
/// reads to `out`.
fn dump_parsed<T>(
    b: &mut Batcher,
    kind: u16,
    payload: &[u8],
    answer: u16,
    parse: impl Fn(&[u8]) -> Option<T>,
    out: &mut Vec<T>,
) -> std::io::Result<()> {
    b.dump(kind, payload, |t, p| {
        if t == answer
            && let Some(e) = parse(p)
        {
            out.push(e);
        }
    })
}

/// Every nexthop object in the kernel, dumped on `b`.
fn dump_nexthops_on(b: &mut Batcher) -> std::io::Result<Vec<NexthopEntry>> {
    let mut out = Vec::new();
    dump_parsed(
        b,
        translate::RTM_GETNEXTHOP,
        &translate::nexthop_dump(),
        translate::RTM_NEWNEXTHOP,
        translate::parse_nexthop,
        &mut out,
    )?;
    Ok(out)
}

/// A blocking task's result, or its panic as an error.
fn joined<T>(r: Result<std::io::Result<T>, tokio::task::JoinError>) -> std::io::Result<T> {
    r.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// The routing half of a read: our nexthops and routes, the displaced own subnets, and
/// every nexthop id in the kernel (sorted).
struct RoutesRead {
    state: KernelState,
    displaced: Vec<IpNet>,
    taken: Vec<u32>,
    count: usize,
    dumped: std::time::Duration,
    took: std::time::Duration,
}

/// The neighbour half of a read: our neighbours and FDB entries.
struct NeighboursRead {
    state: KernelState,
    counts: (usize, usize),
    dumped: std::time::Duration,
    took: std::time::Duration,
}

/// A read of the kernel's state under way ([`Kernel::begin_read`]).
pub struct PendingRead {
    kernel: Kernel,
    nexthops: bool,
    started: std::time::Instant,
    routes: tokio::task::JoinHandle<std::io::Result<RoutesRead>>,
    neighbours: tokio::task::JoinHandle<std::io::Result<NeighboursRead>>,
}

impl PendingRead {
    /// Waits for both halves and returns what is ours, as [`Kernel::read_state`] does
    /// (pointing `desired`'s routes at nexthop objects where they are used).
    pub async fn finish(self, desired: &mut KernelState) -> Result<(KernelState, Vec<IpNet>), KernelError> {
        let (routes, neighbours) = tokio::join!(self.routes, self.neighbours);
        let waited = self.started.elapsed();
        let routes = joined(routes).map_err(|e| io_error("dump nexthops and routes", e))?;
        let neighbours = joined(neighbours).map_err(|e| io_error("dump neighbours and FDB entries", e))?;
        let RoutesRead { state: mut actual, displaced, taken, .. } = routes;
        (actual.neighbors, actual.fdb) = (neighbours.state.neighbors, neighbours.state.fdb);
        if self.nexthops {
            weft_core::plan::assign_nexthops(desired, &actual, &|id| taken.binary_search(&id).is_ok());
            // Others' ids: those of the dump that are not ours (both lists sorted).
            let mut ours = actual.nexthops.keys().peekable();
            let foreign: std::collections::HashSet<u32> = taken
                .iter()
                .copied()
                .filter(|id| {
                    while ours.next_if(|o| **o < *id).is_some() {}
                    ours.peek() != Some(&id)
                })
                .collect();
            *self.kernel.foreign_ids.lock().unwrap_or_else(|p| p.into_inner()) = foreign;
        }
        tracing::debug!(
            routes_dump_us = routes.dumped.as_micros() as u64,
            routes_us = routes.took.as_micros() as u64,
            neigh_dump_us = neighbours.dumped.as_micros() as u64,
            neigh_us = neighbours.took.as_micros() as u64,
            waited_us = waited.as_micros() as u64,
            ids_us = (self.started.elapsed() - waited).as_micros() as u64,
            routes = routes.count,
            neighbours = neighbours.counts.0,
            fdb = neighbours.counts.1,
            "kernel state read"
        );
        Ok((actual, displaced))
    }
}
