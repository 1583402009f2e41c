//! The pure core of weft: everything that decides, nothing that does.
//!
//! No module here performs I/O. The `weft` binary crate feeds these functions with what it
//! read from the kernel, the store and the command line, and carries out what they return.

pub mod acquire;
pub mod backend;
pub mod cache;
pub mod cni;
pub mod config;
pub mod docker_opts;
pub mod doctor;
pub mod firewall;
pub mod flags;
pub mod iface;
pub mod ipam;
pub mod kube;
pub mod lease;
pub mod netpol;
pub mod packet;
pub mod plan;
pub mod schedule;
pub mod subnet_env;
pub mod validate;
pub mod wireguard;
