//! {{name}}: a helexa routing policy (world `router` of `helexa:policy@0.1.0`).
//!
//! What it does, per request:
//!
//! 1. resolve the requested name against the catalogue's ids, then aliases (404 if unknown);
//! 2. serve on the least busy node (`in_flight + queue_depth` of that model, ties by node
//!    name) where the model is `ready` and the node answers; the other ready replicas are
//!    the ordered fallbacks;
//! 3. otherwise reject with 503: this router never loads models (the built-in default
//!    router does; start from it if you need cold placement).
//!
//! Settings (JSON from `[plugins.settings.{{name}}]`, all optional):
//! `{"max_busy": 8}` answers 429 instead of queueing once even the least busy replica
//! has that many requests in flight or queued.
//!
//! The logic is the plain function [`route`] over the generated WIT types, tested
//! natively by `cargo test`; [`Policy`] exports it as the `routing` interface.

wit_bindgen::generate!({ path: "wit", world: "router" });

use std::cell::RefCell;

use exports::helexa::policy::routing::Guest;
use helexa::policy::types::{
    CatalogueEntry, Decision, Fleet, Health, ModelState, PolicyError, Rejection, RequestInfo,
    ResidentModel, ServePlan,
};
use serde::Deserialize;

/// Operator settings (unknown keys are refused, so a typo is reported at install).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Answer 429 when the least busy replica has at least this many requests.
    pub max_busy: Option<u32>,
}

/// What an instance keeps between calls. The gateway pushes the catalogue and the fleet
/// only when they change, so `route` receives just the request.
struct Resident {
    settings: Settings,
    catalogue: Vec<CatalogueEntry>,
    fleet: Fleet,
}

thread_local! {
    // A component instance is single-threaded: a thread-local is a plain static here.
    static RESIDENT: RefCell<Resident> = RefCell::new(Resident {
        settings: Settings::default(),
        catalogue: Vec::new(),
        fleet: Fleet { version: 0, nodes: Vec::new() },
    });
}

/// The exported policy.
pub struct Policy;

impl Guest for Policy {
    fn configure(settings: String) -> Result<(), PolicyError> {
        let settings = parse_settings(&settings)?;
        RESIDENT.with_borrow_mut(|resident| resident.settings = settings);
        Ok(())
    }

    fn set_catalogue(entries: Vec<CatalogueEntry>) {
        RESIDENT.with_borrow_mut(|resident| resident.catalogue = entries);
    }

    fn set_fleet(fleet: Fleet) {
        RESIDENT.with_borrow_mut(|resident| resident.fleet = fleet);
    }

    fn route(request: RequestInfo) -> Result<Decision, PolicyError> {
        RESIDENT.with_borrow(|resident| {
            Ok(route(
                &resident.settings,
                &request,
                &resident.catalogue,
                &resident.fleet,
            ))
        })
    }
}

// Only the wasm build exports the interface; native builds (unit tests) skip the glue.
#[cfg(target_arch = "wasm32")]
export!(Policy);

/// Parses the settings JSON (empty text counts as `{}`).
pub fn parse_settings(text: &str) -> Result<Settings, PolicyError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|error| PolicyError::BadSettings(error.to_string()))
}

/// Decides where `request` runs.
pub fn route(
    settings: &Settings,
    request: &RequestInfo,
    catalogue: &[CatalogueEntry],
    fleet: &Fleet,
) -> Decision {
    let Some(entry) = resolve(&request.model, catalogue) else {
        return Decision::Reject(Rejection {
            status: 404,
            message: format!("model {} is not in the catalogue", request.model),
            retry_after_ms: None,
        });
    };
    let mut ready: Vec<(&str, u64)> = fleet
        .nodes
        .iter()
        .filter(|node| !matches!(node.health, Health::Unreachable))
        .filter_map(|node| {
            node.models
                .iter()
                .find(|model| model.id == entry.id && matches!(model.state, ModelState::Ready))
                .map(|model| (node.name.as_str(), busy(model)))
        })
        .collect();
    ready.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    let Some(&(node, least_busy)) = ready.first() else {
        return Decision::Reject(Rejection {
            status: 503,
            message: format!(
                "model {} is not loaded on any answering node, and this router never loads \
                 models (load it with `helexa load`)",
                entry.id
            ),
            retry_after_ms: Some(5_000),
        });
    };
    if settings
        .max_busy
        .is_some_and(|max| least_busy >= u64::from(max))
    {
        return Decision::Reject(Rejection {
            status: 429,
            message: format!(
                "every replica of {} is busy ({least_busy} requests)",
                entry.id
            ),
            retry_after_ms: Some(1_000),
        });
    }
    Decision::Serve(ServePlan {
        node: node.to_owned(),
        fallbacks: ready[1..]
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect(),
    })
}

/// The entry whose id, else one of whose aliases, is `name` (ids win, so an alias cannot
/// hijack another model's id).
pub fn resolve<'a>(name: &str, catalogue: &'a [CatalogueEntry]) -> Option<&'a CatalogueEntry> {
    catalogue.iter().find(|entry| entry.id == name).or_else(|| {
        catalogue
            .iter()
            .find(|entry| entry.aliases.iter().any(|a| a == name))
    })
}

/// Requests a resident model is generating or holding in its queue.
pub fn busy(model: &ResidentModel) -> u64 {
    u64::from(model.in_flight) + u64::from(model.queue_depth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use helexa::policy::types::{LatencyStats, Node, Surface};

    fn entry(id: &str, aliases: &[&str]) -> CatalogueEntry {
        CatalogueEntry {
            id: id.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            vram_mb: 1000,
            min_devices: 1,
            min_device_vram_mb: 0,
            pinned_on: vec![],
            residency_priority: None,
            context_length: 4096,
        }
    }

    fn node(name: &str, health: Health, state: ModelState, in_flight: u32) -> Node {
        Node {
            name: name.into(),
            health,
            labels: vec![],
            devices: vec![],
            models: vec![ResidentModel {
                id: "m".into(),
                state,
                vram_mb: 1000,
                devices: vec![0],
                idle_ms: 0,
                in_flight,
                queue_depth: 0,
                residency_priority: 100,
            }],
            latency: LatencyStats {
                ttft_p50_ms: 0.0,
                itl_p50_ms: 0.0,
                samples: 0,
            },
        }
    }

    fn request(model: &str) -> RequestInfo {
        RequestInfo {
            model: model.into(),
            surface: Surface::OpenaiChat,
            prompt_tokens_estimate: 0,
            max_output_tokens: None,
            stream: false,
            caller: None,
            headers: vec![],
        }
    }

    #[test]
    fn serves_on_the_least_busy_ready_node_with_fallbacks() {
        let fleet = Fleet {
            version: 1,
            nodes: vec![
                node("a", Health::Healthy, ModelState::Ready, 3),
                node("b", Health::Healthy, ModelState::Ready, 1),
                node("c", Health::Unreachable, ModelState::Ready, 0),
                node("d", Health::Healthy, ModelState::Loading, 0),
            ],
        };
        let decision = route(
            &Settings::default(),
            &request("alias"),
            &[entry("m", &["alias"])],
            &fleet,
        );
        match decision {
            Decision::Serve(plan) => {
                assert_eq!(plan.node, "b");
                assert_eq!(plan.fallbacks, ["a"]);
            }
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn unknown_unloaded_and_busy_are_rejected() {
        let catalogue = [entry("m", &[])];
        let fleet = Fleet {
            version: 1,
            nodes: vec![node("a", Health::Healthy, ModelState::Ready, 4)],
        };
        let status = |decision: Decision| match decision {
            Decision::Reject(rejection) => rejection.status,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(
            status(route(
                &Settings::default(),
                &request("x"),
                &catalogue,
                &fleet
            )),
            404
        );
        let empty = Fleet {
            version: 1,
            nodes: vec![],
        };
        assert_eq!(
            status(route(
                &Settings::default(),
                &request("m"),
                &catalogue,
                &empty
            )),
            503
        );
        let settings = parse_settings(r#"{"max_busy": 4}"#).unwrap();
        assert_eq!(
            status(route(&settings, &request("m"), &catalogue, &fleet)),
            429
        );
    }

    #[test]
    fn settings_refuse_unknown_keys() {
        assert!(parse_settings("").is_ok());
        assert!(matches!(
            parse_settings(r#"{"max_bsy": 1}"#),
            Err(PolicyError::BadSettings(_))
        ));
    }
}
