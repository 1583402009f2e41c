//! alloc: a lease and nothing else; the kernel is never touched.

use weft_core::lease::Lease;
use weft_core::plan::Plan;

use super::Backend;

/// The alloc backend.
pub struct Alloc;

impl Backend for Alloc {
    fn name(&self) -> &'static str {
        "alloc"
    }

    fn programs_kernel(&self) -> bool {
        false
    }

    fn plan(&self, _peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        None
    }
}
