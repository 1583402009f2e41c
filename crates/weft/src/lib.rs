//! weft: a flannel-compatible overlay network for containers.
//!
//! This crate holds everything with effects (store clients, netlink, HTTP, processes); the
//! decisions it acts on come from `weft-core`.

pub mod apiserver;
pub mod backend;
pub mod cli;
pub mod cni;
pub mod daemon;
pub mod firewall;
pub mod fsutil;
pub mod host;
pub mod kernel;
pub mod lab;
pub mod leases;
pub mod metrics;
pub mod nsenter;
pub mod process;
pub mod registry;
pub mod udp;
