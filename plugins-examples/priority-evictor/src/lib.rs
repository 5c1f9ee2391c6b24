//! Example evictor: pinned models stay, the largest idle model goes first, then LRU.
//!
//! A resident model is *pinned* — never chosen — when
//! - its id is in the `pinned` setting (an operator's "keep these loaded" list), or
//! - its residency class is at least `pinned_class` (default 1000: the class the
//!   catalogue gives a model with `pinned_on` nodes and no explicit priority).
//!
//! Of the rest, only idle residents (`in_flight == 0`, state `ready` or `failed`) whose
//! class is no higher than the incoming model's may go (the contract's residency rule).
//! They are taken largest first (`vram_mb`: one big unload instead of several small ones,
//! so fewer models lose their warm state), then longest idle first, then by id — just
//! enough to cover `need_mb`. If even all of them cannot, the answer is an empty list
//! (the gateway refuses the load with a 503) and the reason is logged.
//!
//! Settings (`[plugins.settings.<name>]`, JSON; all optional):
//! `{"pinned": ["qwen3-8b"], "pinned_class": 1000}`.

use helexa_policy_sdk::{
    CatalogueEntry, Evictor, ModelState, Node, PINNED_RESIDENCY_PRIORITY, PolicyError,
    ResidentModel,
};
use serde::Deserialize;

/// Operator settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Model ids never to evict.
    pub pinned: Vec<String>,
    /// Residents of this residency class or higher are never evicted.
    pub pinned_class: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pinned: Vec::new(),
            pinned_class: PINNED_RESIDENCY_PRIORITY,
        }
    }
}

/// The configured evictor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PriorityEvictor {
    settings: Settings,
}

impl PriorityEvictor {
    /// An evictor with `settings`.
    pub fn new(settings: Settings) -> Self {
        PriorityEvictor { settings }
    }

    /// Whether `model` is pinned (never evicted).
    pub fn is_pinned(&self, model: &ResidentModel) -> bool {
        model.residency_priority >= self.settings.pinned_class
            || self.settings.pinned.contains(&model.id)
    }

    /// The victims to unload from `on`, in order, or why none suffice.
    pub fn choose(
        &self,
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
            .filter(|model| {
                !self.is_pinned(model)
                    && model.in_flight == 0
                    && matches!(model.state, ModelState::Ready | ModelState::Failed)
                    && model.residency_priority <= class
            })
            .collect();
        candidates.sort_by(|a, b| {
            b.vram_mb
                .cmp(&a.vram_mb)
                .then_with(|| b.idle_ms.cmp(&a.idle_ms))
                .then_with(|| a.id.cmp(&b.id))
        });
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
            "cannot free {need_mb} MiB on node {} for {}: unpinned idle residents of class <= \
             {class} hold only {freed} MiB",
            on.name, incoming.id
        ))
    }
}

impl Evictor for PriorityEvictor {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        helexa_policy_sdk::parse_settings(settings).map(PriorityEvictor::new)
    }

    fn choose_victims(
        &self,
        on: &Node,
        need_mb: u64,
        incoming: &CatalogueEntry,
    ) -> Result<Vec<String>, PolicyError> {
        Ok(self.choose(on, need_mb, incoming).unwrap_or_else(|why| {
            helexa_policy_sdk::log::warn(&why);
            Vec::new()
        }))
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_evictor!(PriorityEvictor);

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
    fn largest_idle_first_then_least_recently_used() {
        let on = node(vec![
            resident("small-old", 10, 9_000),
            resident("big", 40, 10),
            resident("mid-old", 20, 5_000),
            resident("mid-new", 20, 100),
        ]);
        let evictor = PriorityEvictor::default();
        assert_eq!(evictor.choose(&on, 30, &incoming()).unwrap(), ["big"]);
        assert_eq!(
            evictor.choose(&on, 50, &incoming()).unwrap(),
            ["big", "mid-old"]
        );
        assert_eq!(
            evictor.choose(&on, 0, &incoming()).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn pinned_busy_and_higher_class_models_stay() {
        let mut busy = resident("busy", 100, 9_000);
        busy.in_flight = 1;
        let mut gold = resident("gold", 100, 9_000);
        gold.residency_priority = 500;
        let mut catalogue_pinned = resident("pinned-on", 100, 9_000);
        catalogue_pinned.residency_priority = 1000;
        let on = node(vec![
            busy,
            gold,
            catalogue_pinned,
            resident("keep", 100, 9_000),
            resident("x", 5, 1),
        ]);
        let evictor = PriorityEvictor::configure(r#"{"pinned": ["keep"]}"#).unwrap();
        let why = evictor.choose(&on, 50, &incoming()).unwrap_err();
        assert!(why.contains("hold only 5 MiB"), "{why}");
        // A class-500 incoming model may displace the class-500 resident, never the pinned ones.
        let important = CatalogueEntry {
            residency_priority: Some(500),
            ..incoming()
        };
        assert_eq!(evictor.choose(&on, 50, &important).unwrap(), ["gold"]);
        let important = CatalogueEntry {
            residency_priority: Some(5000),
            ..incoming()
        };
        assert_eq!(evictor.choose(&on, 105, &important).unwrap(), ["gold", "x"]);
    }

    #[test]
    fn settings_default_and_refuse_typos() {
        assert_eq!(
            PriorityEvictor::configure("").unwrap(),
            PriorityEvictor::default()
        );
        assert!(matches!(
            PriorityEvictor::configure(r#"{"pin": []}"#),
            Err(PolicyError::BadSettings(_))
        ));
    }
}
