//! Test guest `helexa-guest-infinite-loop`: a router whose `route` never returns.
//!
//! The policy runtime must cut it off at its call deadline (epoch interruption) and
//! fall back to the default router. `configure` succeeds so that the guest loads.

use helexa_policy_sdk::{CatalogueEntry, Decision, Fleet, PolicyError, RequestInfo, Router};

/// The looping router.
pub struct InfiniteLoop;

impl Router for InfiniteLoop {
    fn configure(_settings: &str) -> Result<Self, PolicyError> {
        Ok(InfiniteLoop)
    }

    fn route(
        &self,
        _request: &RequestInfo,
        _catalogue: &[CatalogueEntry],
        _fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        // `black_box` keeps the optimiser from proving the loop has no effect.
        let mut spins: u64 = 0;
        loop {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(InfiniteLoop);
