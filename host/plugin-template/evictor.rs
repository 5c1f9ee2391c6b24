//! {{name}}: a helexa eviction policy (world `evictor` of `helexa:policy@0.1.0`).
//!
//! Asked to free `need_mb` MiB on a node for an `incoming` model, it unloads the
//! least recently used residents first:
//!
//! - only residents that are idle (`in_flight == 0`), `ready` or `failed`, and of a
//!   residency class no higher than the incoming model's may go;
//! - the longest idle (`idle_ms`) goes first, ties by id so the answer is deterministic;
//! - it returns just enough victims to cover `need_mb`, or an empty list (the gateway then
//!   refuses the load with a 503) when even all of them together cannot.
//!
//! It takes no settings (`{}`); any key is refused so a typo is reported.
//!
//! The logic is the plain function [`choose_victims`] over the generated WIT types, tested
//! natively by `cargo test`; [`Policy`] exports it as the `eviction` interface.

wit_bindgen::generate!({ path: "wit", world: "evictor" });

use exports::helexa::policy::eviction::Guest;
use helexa::policy::log::{Level, write as log};
use helexa::policy::types::{CatalogueEntry, ModelState, Node, PolicyError, ResidentModel};
use serde::Deserialize;

/// No settings: an empty object only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

/// The exported policy (stateless).
pub struct Policy;

impl Guest for Policy {
    fn configure(settings: String) -> Result<(), PolicyError> {
        let text = if settings.trim().is_empty() {
            "{}"
        } else {
            &settings
        };
        serde_json::from_str::<Settings>(text)
            .map(drop)
            .map_err(|error| PolicyError::BadSettings(error.to_string()))
    }

    fn choose_victims(
        on: Node,
        need_mb: u64,
        incoming: CatalogueEntry,
    ) -> Result<Vec<String>, PolicyError> {
        Ok(
            choose_victims(&on, need_mb, &incoming).unwrap_or_else(|why| {
                log(Level::Warn, &why);
                Vec::new()
            }),
        )
    }
}

// Only the wasm build exports the interface; native builds (unit tests) skip the glue.
#[cfg(target_arch = "wasm32")]
export!(Policy);

/// The residency class of a catalogue entry, as `types.wit` defines it: its
/// `residency-priority`, else 1000 when pinned to nodes, else 100.
pub fn residency_class(entry: &CatalogueEntry) -> u32 {
    match entry.residency_priority {
        Some(priority) => priority,
        None if !entry.pinned_on.is_empty() => 1000,
        None => 100,
    }
}

/// Whether `model` may be unloaded for a model of residency class `class`.
pub fn is_candidate(model: &ResidentModel, class: u32) -> bool {
    model.in_flight == 0
        && matches!(model.state, ModelState::Ready | ModelState::Failed)
        && model.residency_priority <= class
}

/// The victims to unload from `on`, in order, to free `need_mb` MiB for `incoming`, or
/// why the allowed victims cannot free enough.
pub fn choose_victims(
    on: &Node,
    need_mb: u64,
    incoming: &CatalogueEntry,
) -> Result<Vec<String>, String> {
    if need_mb == 0 {
        return Ok(Vec::new());
    }
    let class = residency_class(incoming);
    let mut candidates: Vec<&ResidentModel> = on
        .models
        .iter()
        .filter(|model| is_candidate(model, class))
        .collect();
    candidates.sort_by(|a, b| b.idle_ms.cmp(&a.idle_ms).then_with(|| a.id.cmp(&b.id)));
    let mut victims = Vec::new();
    let mut freed = 0u64;
    for model in candidates {
        victims.push(model.id.clone());
        freed = freed.saturating_add(model.vram_mb);
        if freed >= need_mb {
            return Ok(victims);
        }
    }
    Err(format!(
        "cannot free {need_mb} MiB on {} for {}: idle residents of class <= {class} hold {freed} MiB",
        on.name, incoming.id
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use helexa::policy::types::{Health, LatencyStats};

    fn resident(id: &str, vram_mb: u64, idle_ms: u64, in_flight: u32) -> ResidentModel {
        ResidentModel {
            id: id.into(),
            state: ModelState::Ready,
            vram_mb,
            devices: vec![0],
            idle_ms,
            in_flight,
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
            latency: LatencyStats {
                ttft_p50_ms: 0.0,
                itl_p50_ms: 0.0,
                samples: 0,
            },
        }
    }

    fn incoming() -> CatalogueEntry {
        CatalogueEntry {
            id: "new".into(),
            aliases: vec![],
            vram_mb: 10,
            min_devices: 1,
            min_device_vram_mb: 0,
            pinned_on: vec![],
            residency_priority: None,
            context_length: 4096,
        }
    }

    #[test]
    fn least_recently_used_first_and_just_enough() {
        let on = node(vec![
            resident("recent", 10, 5, 0),
            resident("old", 10, 500, 0),
            resident("older-but-busy", 10, 900, 1),
            resident("middle", 10, 50, 0),
        ]);
        assert_eq!(
            choose_victims(&on, 15, &incoming()).unwrap(),
            ["old", "middle"]
        );
        assert_eq!(
            choose_victims(&on, 0, &incoming()).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn higher_classes_stay_and_a_shortfall_is_explained() {
        let mut pinned = resident("pinned", 100, 1000, 0);
        pinned.residency_priority = 1000;
        let on = node(vec![pinned, resident("x", 10, 1, 0)]);
        let why = choose_victims(&on, 50, &incoming()).unwrap_err();
        assert!(why.contains("hold 10 MiB"), "{why}");
    }
}
