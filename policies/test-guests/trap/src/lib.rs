//! Test guest `helexa-guest-trap`: a router whose `route` panics.
//!
//! On `wasm32` a panic aborts, which is an `unreachable` trap; the instance is dead
//! afterwards. The policy runtime must count the trap, replace the instance and fall
//! back to the default router. With settings `{"mode": "abort"}` it calls
//! `std::process::abort()` instead (also an `unreachable` instruction in wasm, but
//! without the panic machinery), the other common way a guest dies.

use helexa_policy_sdk::{CatalogueEntry, Decision, Fleet, PolicyError, RequestInfo, Router};

/// The trapping router.
pub struct Trap {
    abort: bool,
}

impl Router for Trap {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        let abort = match settings.trim() {
            "" | "{}" => false,
            r#"{"mode": "abort"}"# | r#"{"mode":"abort"}"# => true,
            other => {
                return Err(PolicyError::BadSettings(format!(
                    "unknown settings {other}"
                )));
            }
        };
        Ok(Trap { abort })
    }

    fn route(
        &self,
        request: &RequestInfo,
        _catalogue: &[CatalogueEntry],
        _fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        if self.abort {
            std::process::abort();
        }
        panic!(
            "helexa-guest-trap: deliberate trap routing {}",
            request.model
        );
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(Trap);
