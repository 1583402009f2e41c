//! Kubernetes NetworkPolicy (networking.k8s.io/v1), compiled for nftables.
//!
//! [`model`] holds validated policies, pods and namespaces; [`eval`] decides a connection
//! straight from the semantics (the reference); [`compile`] turns the model into one node's
//! set/map structure and [`render`] into one atomic `nft -f` transaction; [`kernel`] reads
//! the table back from `nft -j` to detect drift.

pub mod compile;
pub mod eval;
pub mod kernel;
pub mod model;
pub mod render;

#[cfg(test)]
mod tests;
