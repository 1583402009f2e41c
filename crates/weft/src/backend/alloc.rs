//! alloc: a lease and nothing else; the kernel is never touched.

use futures::future::BoxFuture;
use weft_core::lease::{Lease, SubnetKey};
use weft_core::plan::Plan;

use super::Backend;
use crate::daemon::metrics::Metrics;
use crate::kernel::{Kernel, KernelError};

/// The alloc backend.
pub struct Alloc;

impl Backend for Alloc {
    fn name(&self) -> &'static str {
        "alloc"
    }

    fn programs_kernel(&self) -> bool {
        false
    }

    fn start<'a>(
        &'a mut self,
        _kernel: &'a Kernel,
        _own: &'a SubnetKey,
        _metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<(), KernelError>> {
        Box::pin(async { Ok(()) })
    }

    fn plan(&self, _peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        None
    }
}
