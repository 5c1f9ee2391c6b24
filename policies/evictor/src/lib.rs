//! The default eviction policy of helexa (`helexa-policy-evictor`).
//!
//! Asked to free `need_mb` MiB on a node for an `incoming` model, it picks victims
//! least-recently-used first within residency classes:
//!
//! - a model may displace only residents of an equal or lower class than its own
//!   ([`CatalogueEntry::residency_class`]: `residency_priority`, else 1000 when
//!   pinned, else 100);
//! - a resident with requests in flight, or one that is loading or already
//!   unloading, is never chosen;
//! - lower classes go first; within a class the longest idle (`idle_ms`) goes first;
//!   equal idle times fall back to the id, so the answer is deterministic;
//! - it returns just enough victims, in order, to cover `need_mb`; if even every
//!   candidate together cannot, it returns an empty list (the load is refused) and
//!   logs why.
//!
//! The logic is the plain function [`choose_victims`], tested natively against the
//! data-driven cases in `tests/cases/`; [`DefaultEvictor`] is exported as the
//! `eviction` interface of a wasm component when built for `wasm32`.

use helexa_policy_sdk::{CatalogueEntry, Evictor, ModelState, Node, PolicyError, ResidentModel};
use serde::Deserialize;

/// The default evictor takes no settings; this refuses any key, so a typo is reported.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

/// The default evictor (stateless).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DefaultEvictor;

impl Evictor for DefaultEvictor {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        helexa_policy_sdk::parse_settings::<Settings>(settings).map(|_| DefaultEvictor)
    }

    fn choose_victims(
        &self,
        on: &Node,
        need_mb: u64,
        incoming: &CatalogueEntry,
    ) -> Result<Vec<String>, PolicyError> {
        let choice = choose_victims(on, need_mb, incoming);
        if let Err(why) = &choice {
            helexa_policy_sdk::log::warn(why);
        }
        Ok(choice.unwrap_or_default())
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_evictor!(DefaultEvictor);

/// Whether `model` may be unloaded to make room for a model of residency class `class`.
pub fn is_candidate(model: &ResidentModel, class: u32) -> bool {
    model.in_flight == 0
        && !matches!(model.state, ModelState::Loading | ModelState::Unloading)
        && model.residency_priority <= class
}

/// The victims to unload from `on`, in order, to free `need_mb` MiB for `incoming`;
/// or why no set of allowed victims frees enough.
///
/// `need_mb == 0` needs no victims.
pub fn choose_victims(
    on: &Node,
    need_mb: u64,
    incoming: &CatalogueEntry,
) -> Result<Vec<String>, String> {
    if need_mb == 0 {
        return Ok(Vec::new());
    }
    let class = incoming.residency_class();
    let mut candidates: Vec<&ResidentModel> = on
        .models
        .iter()
        .filter(|model| is_candidate(model, class))
        .collect();
    candidates.sort_by(|a, b| {
        a.residency_priority
            .cmp(&b.residency_priority)
            .then_with(|| b.idle_ms.cmp(&a.idle_ms))
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut victims = Vec::new();
    let mut freed: u64 = 0;
    for model in candidates {
        victims.push(model.id.clone());
        freed = freed.saturating_add(model.vram_mb);
        if freed >= need_mb {
            return Ok(victims);
        }
    }
    Err(format!(
        "cannot free {need_mb} MiB on node {} for {} (class {class}): residents that may be \
         unloaded (idle, class <= {class}) hold only {freed} MiB",
        on.name, incoming.id
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use helexa_policy_sdk::Health;

    fn resident(id: &str, vram_mb: u64, idle_ms: u64) -> ResidentModel {
        ResidentModel {
            id: id.into(),
            state: ModelState::Ready,
            vram_mb,
            devices: vec![0],
            idle_ms,
            in_flight: 0,
            queue_depth: 0,
            residency_priority: 100,
        }
    }

    fn node(models: Vec<ResidentModel>) -> Node {
        Node {
            name: "a".into(),
            health: Health::Healthy,
            labels: vec![],
            devices: vec![],
            models,
            latency: Default::default(),
        }
    }

    fn incoming() -> CatalogueEntry {
        CatalogueEntry {
            id: "new".into(),
            vram_mb: 10,
            ..CatalogueEntry::default()
        }
    }

    #[test]
    fn nothing_needed_means_no_victims() {
        let on = node(vec![resident("x", 10, 5)]);
        assert_eq!(choose_victims(&on, 0, &incoming()), Ok(vec![]));
    }

    #[test]
    fn shortfall_is_explained_and_becomes_an_empty_list() {
        let on = node(vec![resident("x", 10, 5)]);
        let why = choose_victims(&on, 11, &incoming()).unwrap_err();
        assert!(why.contains("hold only 10 MiB"), "{why}");
        assert_eq!(
            DefaultEvictor.choose_victims(&on, 11, &incoming()),
            Ok(vec![])
        );
    }

    #[test]
    fn settings_refuse_unknown_keys() {
        assert!(DefaultEvictor::configure("{}").is_ok());
        assert!(DefaultEvictor::configure("").is_ok());
        assert!(matches!(
            DefaultEvictor::configure(r#"{"policy": "lru"}"#),
            Err(PolicyError::BadSettings(_))
        ));
    }
}
