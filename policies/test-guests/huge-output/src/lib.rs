//! Test guest `helexa-guest-huge-output`: a router that answers every request with
//! a rejection whose message is 64 MiB long.
//!
//! It checks that the policy runtime bounds what it copies out of a guest: with the
//! default 64 MiB memory limit the guest cannot even build the message (it traps);
//! with a larger limit the host must refuse to pass such a message to a client.

use helexa_policy_sdk::{
    CatalogueEntry, Decision, Fleet, PolicyError, Rejection, RequestInfo, Router,
};

/// Length of the rejection message, in bytes.
pub const MESSAGE_BYTES: usize = 64 << 20;

/// The verbose router.
pub struct HugeOutput;

impl Router for HugeOutput {
    fn configure(_settings: &str) -> Result<Self, PolicyError> {
        Ok(HugeOutput)
    }

    fn route(
        &self,
        _request: &RequestInfo,
        _catalogue: &[CatalogueEntry],
        _fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        Ok(Decision::Reject(Rejection {
            status: 503,
            message: "x".repeat(MESSAGE_BYTES),
            retry_after_ms: None,
        }))
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(HugeOutput);
