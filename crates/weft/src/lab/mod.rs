//! Building blocks of `weft lab` and of the integration tests: network namespaces joined by
//! a LAN bridge, and a real etcd server. Everything happens inside namespaces created here;
//! the machine's own network namespace is never changed.

pub mod etcd;
pub mod netns;
