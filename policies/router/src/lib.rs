//! The default routing policy of helexa (`helexa-policy-router`).
//!
//! For each request, in order:
//!
//! 1. **Resolve** the requested name against catalogue ids and aliases; an unknown name
//!    is a 404 listing the known ids.
//! 2. **Serve** where the model is `ready` on a healthy or degraded node: least busy
//!    (`in_flight + queue_depth` of that model) first, ties broken by lower recent
//!    time-to-first-token (nodes with latency samples before nodes without), then by
//!    node name. The other ready replicas become the ordered fallbacks.
//! 3. **Wait** if the model is only `loading` somewhere reachable: `retry-after`
//!    (`loading_retry_ms`, default 500).
//! 4. **Place cold** on a feasible healthy node (see [`placement`]): nodes where the
//!    model fits in free VRAM before nodes that need evictions, and those only if
//!    evictable residents can free enough; ties go to the least-loaded node, then the
//!    name. The load plan carries the shortfall as `free_mb_needed`.
//! 5. Otherwise **reject**: 404 when every node is known to be unable to host the
//!    model (the message says why, node by node), 503 with `retry_after_ms` when a
//!    feasible node is only unreachable or degraded — or unreachable without reported
//!    devices, whose capacity is unknown rather than absent — 503 when every feasible
//!    node is full of residents that may not be evicted.
//!
//! The logic is plain functions over the SDK's plain types, tested natively against
//! the data-driven cases in `tests/cases/`; [`DefaultRouter`] is exported as the
//! `routing` interface of a wasm component when built for `wasm32`.

pub mod placement;

use helexa_policy_sdk::{
    CatalogueEntry, Decision, Fleet, Health, ModelState, Node, PolicyError, Rejection, RequestInfo,
    ResidentModel, Router, ServePlan,
};
use serde::Deserialize;

/// Operator settings of the default router (all optional; unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long to ask the gateway to wait when the model is loading somewhere, ms.
    pub loading_retry_ms: u32,
    /// `Retry-After` of a 503 when the only feasible nodes are unreachable or
    /// degraded, ms.
    pub unavailable_retry_ms: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            loading_retry_ms: 500,
            unavailable_retry_ms: 2000,
        }
    }
}

/// The default router: its only state is its settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DefaultRouter {
    settings: Settings,
}

impl DefaultRouter {
    /// A router with the given settings.
    pub fn new(settings: Settings) -> Self {
        DefaultRouter { settings }
    }
}

impl Router for DefaultRouter {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        helexa_policy_sdk::parse_settings(settings).map(DefaultRouter::new)
    }

    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        Ok(route(&self.settings, request, catalogue, fleet))
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(DefaultRouter);

/// Decides where `request` runs. Never fails: every outcome is a [`Decision`].
pub fn route(
    settings: &Settings,
    request: &RequestInfo,
    catalogue: &[CatalogueEntry],
    fleet: &Fleet,
) -> Decision {
    let Some(entry) = resolve(&request.model, catalogue) else {
        return Decision::Reject(unknown_model(&request.model, catalogue));
    };
    if let Some(plan) = serve_plan(&entry.id, fleet) {
        return Decision::Serve(plan);
    }
    if is_loading_somewhere(&entry.id, fleet) {
        return Decision::RetryAfter(settings.loading_retry_ms);
    }
    placement::place(settings, entry, fleet)
}

/// The catalogue entry whose id, or else one of whose aliases, is `name`.
///
/// Ids win over aliases so that an alias that shadows another model's id cannot
/// hijack it.
pub fn resolve<'a>(name: &str, catalogue: &'a [CatalogueEntry]) -> Option<&'a CatalogueEntry> {
    catalogue
        .iter()
        .find(|entry| entry.id == name)
        .or_else(|| catalogue.iter().find(|entry| entry.answers_to(name)))
}

/// The 404 for a name that is neither an id nor an alias.
pub fn unknown_model(name: &str, catalogue: &[CatalogueEntry]) -> Rejection {
    let known = if catalogue.is_empty() {
        "none (the catalogue is empty)".to_owned()
    } else {
        catalogue
            .iter()
            .map(|entry| entry.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Rejection {
        status: 404,
        message: format!("model {name} is not in the catalogue; known: {known}"),
        retry_after_ms: None,
    }
}

/// Whether a node takes requests at all (unreachable nodes do not).
pub fn is_answering(node: &Node) -> bool {
    matches!(node.health, Health::Healthy | Health::Degraded)
}

/// `model_id` on `node`, if resident there.
pub fn resident<'a>(node: &'a Node, model_id: &str) -> Option<&'a ResidentModel> {
    node.models.iter().find(|model| model.id == model_id)
}

/// The serve plan over every answering node where `model_id` is ready, or `None`.
pub fn serve_plan(model_id: &str, fleet: &Fleet) -> Option<ServePlan> {
    let mut replicas: Vec<(&Node, &ResidentModel)> = fleet
        .nodes
        .iter()
        .filter(|node| is_answering(node))
        .filter_map(|node| resident(node, model_id).map(|model| (node, model)))
        .filter(|(_, model)| model.state == ModelState::Ready)
        .collect();
    replicas.sort_by(|(node_a, model_a), (node_b, model_b)| {
        busy(model_a)
            .cmp(&busy(model_b))
            .then_with(|| compare_ttft(node_a, node_b))
            .then_with(|| node_a.name.cmp(&node_b.name))
    });
    let mut names = replicas.into_iter().map(|(node, _)| node.name.clone());
    let node = names.next()?;
    Some(ServePlan {
        node,
        fallbacks: names.collect(),
    })
}

/// Requests a resident model is generating or holding in its queue.
pub fn busy(model: &ResidentModel) -> u64 {
    u64::from(model.in_flight) + u64::from(model.queue_depth)
}

/// Lower recent time-to-first-token first; a node without samples has no known
/// latency and sorts after every node that has one.
fn compare_ttft(a: &Node, b: &Node) -> std::cmp::Ordering {
    let key = |node: &Node| (node.latency.samples == 0, node.latency.ttft_p50_ms);
    let (a_unknown, a_ttft) = key(a);
    let (b_unknown, b_ttft) = key(b);
    a_unknown.cmp(&b_unknown).then_with(|| {
        if a_unknown {
            std::cmp::Ordering::Equal
        } else {
            a_ttft.total_cmp(&b_ttft)
        }
    })
}

/// Whether `model_id` is loading on a node that answers (so it will soon be ready).
pub fn is_loading_somewhere(model_id: &str, fleet: &Fleet) -> bool {
    fleet
        .nodes
        .iter()
        .filter(|node| is_answering(node))
        .any(|node| {
            resident(node, model_id).is_some_and(|model| model.state == ModelState::Loading)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use helexa_policy_sdk::LatencyStats;

    fn entry(id: &str, aliases: &[&str]) -> CatalogueEntry {
        CatalogueEntry {
            id: id.into(),
            aliases: aliases.iter().map(|alias| (*alias).to_owned()).collect(),
            vram_mb: 1000,
            min_devices: 1,
            ..CatalogueEntry::default()
        }
    }

    fn node_with(name: &str, ttft: f32, samples: u32, in_flight: u32) -> Node {
        Node {
            name: name.into(),
            health: Health::Healthy,
            labels: vec![],
            devices: vec![],
            models: vec![ResidentModel {
                id: "m".into(),
                state: ModelState::Ready,
                vram_mb: 1000,
                devices: vec![0],
                idle_ms: 0,
                in_flight,
                queue_depth: 0,
                residency_priority: 100,
            }],
            latency: LatencyStats {
                ttft_p50_ms: ttft,
                itl_p50_ms: 0.0,
                samples,
            },
        }
    }

    #[test]
    fn ids_win_over_aliases() {
        let catalogue = [entry("a", &["b"]), entry("b", &[])];
        assert_eq!(resolve("b", &catalogue).map(|e| e.id.as_str()), Some("b"));
        assert_eq!(resolve("a", &catalogue).map(|e| e.id.as_str()), Some("a"));
        let catalogue = [entry("a", &["alias"])];
        assert_eq!(
            resolve("alias", &catalogue).map(|e| e.id.as_str()),
            Some("a")
        );
        assert!(
            resolve("Alias", &catalogue).is_none(),
            "names are case-sensitive"
        );
    }

    #[test]
    fn unknown_model_lists_ids_or_says_empty() {
        let rejection = unknown_model("x", &[entry("a", &[]), entry("b", &[])]);
        assert_eq!(rejection.status, 404);
        assert_eq!(
            rejection.message,
            "model x is not in the catalogue; known: a, b"
        );
        assert!(
            unknown_model("x", &[])
                .message
                .ends_with("known: none (the catalogue is empty)")
        );
    }

    #[test]
    fn measured_latency_beats_unmeasured_and_lower_beats_higher() {
        let fleet = Fleet {
            version: 1,
            nodes: vec![
                node_with("a", 0.0, 0, 0),
                node_with("b", 90.0, 4, 0),
                node_with("c", 40.0, 4, 0),
                node_with("d", 10.0, 4, 1),
            ],
        };
        let plan = serve_plan("m", &fleet).expect("ready replicas");
        assert_eq!(plan.node, "c");
        assert_eq!(plan.fallbacks, ["b", "a", "d"]);
    }

    #[test]
    fn settings_default_and_reject_unknown_keys() {
        let router = DefaultRouter::configure("{}").unwrap();
        assert_eq!(router.settings, Settings::default());
        let router = DefaultRouter::configure(r#"{"loading_retry_ms": 250}"#).unwrap();
        assert_eq!(router.settings.loading_retry_ms, 250);
        assert!(matches!(
            DefaultRouter::configure(r#"{"loading_retry": 250}"#),
            Err(PolicyError::BadSettings(_))
        ));
        assert!(matches!(
            DefaultRouter::configure("not json"),
            Err(PolicyError::BadSettings(_))
        ));
    }
}
