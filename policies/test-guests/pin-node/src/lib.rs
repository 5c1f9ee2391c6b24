//! Test guest `helexa-guest-pin-node`: a valid router whose decision is set by its
//! settings, `{"node": "<name>"}`: every request is served on that node (a 503 when the
//! fleet has no such node). The hot-reload tests install it under two names with two
//! settings, so which policy is live shows in which node answers.

use helexa_policy_sdk::{
    CatalogueEntry, Decision, Fleet, PolicyError, Rejection, RequestInfo, Router, ServePlan,
};

/// Settings: the node to pin to.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    node: String,
}

/// The pinning router.
pub struct PinNode {
    node: String,
}

impl Router for PinNode {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        let settings: Settings = helexa_policy_sdk::parse_settings(settings)?;
        Ok(PinNode {
            node: settings.node,
        })
    }

    fn route(
        &self,
        _request: &RequestInfo,
        _catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        // Deliberately through std's `HashSet`: its `RandomState` seeds from `wasi:random`,
        // which the runtime answers with inert bytes, so the hot-swap tests that install
        // this guest also check that std's hashed collections work inside a policy.
        let names: std::collections::HashSet<&str> =
            fleet.nodes.iter().map(|n| n.name.as_str()).collect();
        if names.contains(self.node.as_str()) {
            Ok(Decision::Serve(ServePlan {
                node: self.node.clone(),
                fallbacks: Vec::new(),
            }))
        } else {
            Ok(Decision::Reject(Rejection {
                status: 503,
                message: format!("pin-node: no node \"{}\" in the fleet", self.node),
                retry_after_ms: Some(1000),
            }))
        }
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(PinNode);
