//! Test guest `helexa-guest-memory-bomb`: a router whose `route` allocates without
//! bound.
//!
//! It keeps every allocation and doubles the next one's size (8 MiB, 16 MiB, 32 MiB, …),
//! so it reaches any memory limit in a handful of `memory.grow`s and well within the
//! call deadline: a bomb that crawls toward the limit would be cut off by the timeout
//! instead and test the wrong limit. The chunks are zeroed allocations, which fresh
//! linear memory satisfies without a memset. When `grow` is refused the allocation
//! fails, the guest aborts (a trap), and the host must fall back to the default
//! router.

use helexa_policy_sdk::{CatalogueEntry, Decision, Fleet, PolicyError, RequestInfo, Router};

/// The allocating router.
pub struct MemoryBomb;

/// Size of the first allocation; each next one is twice as large.
const FIRST_CHUNK: usize = 8 << 20;

impl Router for MemoryBomb {
    fn configure(_settings: &str) -> Result<Self, PolicyError> {
        Ok(MemoryBomb)
    }

    fn route(
        &self,
        _request: &RequestInfo,
        _catalogue: &[CatalogueEntry],
        _fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        let mut size = FIRST_CHUNK;
        loop {
            hoard.push(std::hint::black_box(vec![0_u8; size]));
            // Past `isize::MAX` the allocation itself fails, which is a trap too.
            size = size.saturating_mul(2);
        }
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(MemoryBomb);
