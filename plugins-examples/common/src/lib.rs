//! Helpers shared by the example routers in `plugins-examples/`: resolving a model name,
//! and cold placement over a *subset* of the fleet (the nodes a caller is pinned to, say).
//!
//! Why not reuse `helexa-policy-router`? Its crate root exports the `routing` interface
//! for `wasm32`, so linking it into another router component defines every
//! `helexa:policy/routing@0.1.0#…` symbol twice (`rust-lld: duplicate symbol`). The
//! placement here is a compact version of `policies/router/src/placement.rs` with the
//! same rules: a node is feasible when it has `min_devices` devices with at least
//! `min_device_vram_mb` each whose total memory holds the model; the load goes to the
//! `min_devices` eligible devices with the most free memory; a shortfall is planned only
//! when the residents the default evictor may unload (idle, not loading or unloading,
//! class ≤ the model's) hold at least that much; fits-now beats needs-evictions, then
//! the least loaded node, then the name.

use helexa_policy_sdk::{
    CatalogueEntry, Decision, Health, LoadPlan, ModelState, Node, Rejection, ResidentModel,
};

/// The entry whose id, else one of whose aliases, is `name` (ids win).
pub fn resolve<'a>(name: &str, catalogue: &'a [CatalogueEntry]) -> Option<&'a CatalogueEntry> {
    catalogue
        .iter()
        .find(|entry| entry.id == name)
        .or_else(|| catalogue.iter().find(|entry| entry.answers_to(name)))
}

/// The 404 for a name that is neither an id nor an alias.
pub fn unknown_model(name: &str) -> Decision {
    Decision::Reject(Rejection {
        status: 404,
        message: format!("model {name} is not in the catalogue"),
        retry_after_ms: None,
    })
}

/// Whether a node takes requests (healthy or degraded).
pub fn is_answering(node: &Node) -> bool {
    matches!(node.health, Health::Healthy | Health::Degraded)
}

/// `model_id` on `node` if it is ready there.
pub fn ready<'a>(node: &'a Node, model_id: &str) -> Option<&'a ResidentModel> {
    node.models
        .iter()
        .find(|model| model.id == model_id && model.state == ModelState::Ready)
}

/// Whether `model_id` is loading on `node`.
pub fn loading(node: &Node, model_id: &str) -> bool {
    node.models
        .iter()
        .any(|model| model.id == model_id && model.state == ModelState::Loading)
}

/// Requests a resident model is generating or holding in its queue.
pub fn busy(model: &ResidentModel) -> u64 {
    u64::from(model.in_flight) + u64::from(model.queue_depth)
}

/// How a healthy node could take a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Devices to load onto (ascending ordinals).
    pub devices: Vec<u32>,
    /// MiB to free first (0 = fits now).
    pub shortfall_mb: u64,
    /// Requests in flight or queued on the node.
    pub load: u64,
}

/// How `node` could take `entry`, or `None` when it cannot (infeasible, not healthy,
/// excluded by `pinned_on`, or full of residents that may not be unloaded).
pub fn candidate(entry: &CatalogueEntry, node: &Node) -> Option<Candidate> {
    if node.health != Health::Healthy
        || (!entry.pinned_on.is_empty() && !entry.pinned_on.contains(&node.name))
    {
        return None;
    }
    let needed = entry.min_devices.max(1) as usize;
    let mut eligible: Vec<_> = node
        .devices
        .iter()
        .filter(|device| device.vram_total_mb >= entry.min_device_vram_mb)
        .collect();
    if eligible.len() < needed {
        return None;
    }
    let mut by_total = eligible.clone();
    by_total.sort_by_key(|device| std::cmp::Reverse(device.vram_total_mb));
    let capacity: u64 = by_total.iter().take(needed).map(|d| d.vram_total_mb).sum();
    if capacity < entry.vram_mb {
        return None;
    }
    eligible.sort_by_key(|device| (std::cmp::Reverse(device.vram_free_mb), device.index));
    eligible.truncate(needed);
    let free: u64 = eligible.iter().map(|device| device.vram_free_mb).sum();
    let shortfall_mb = entry.vram_mb.saturating_sub(free);
    let class = entry.residency_class();
    let evictable: u64 = node
        .models
        .iter()
        .filter(|model| {
            model.in_flight == 0
                && !matches!(model.state, ModelState::Loading | ModelState::Unloading)
                && model.residency_priority <= class
        })
        .map(|model| model.vram_mb)
        .sum();
    if evictable < shortfall_mb {
        return None;
    }
    let mut devices: Vec<u32> = eligible.iter().map(|device| device.index).collect();
    devices.sort_unstable();
    Some(Candidate {
        devices,
        shortfall_mb,
        load: node.models.iter().map(busy).sum(),
    })
}

/// A load plan for `entry` on the best of `nodes`, or `None` when none can take it.
pub fn place<'a>(
    entry: &CatalogueEntry,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Option<Decision> {
    nodes
        .into_iter()
        .filter_map(|node| candidate(entry, node).map(|candidate| (node, candidate)))
        .min_by(|(node_a, a), (node_b, b)| {
            (a.shortfall_mb > 0, a.load, &node_a.name).cmp(&(
                b.shortfall_mb > 0,
                b.load,
                &node_b.name,
            ))
        })
        .map(|(node, candidate)| {
            Decision::Load(LoadPlan {
                node: node.name.clone(),
                devices: candidate.devices,
                free_mb_needed: candidate.shortfall_mb,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use helexa_policy_sdk::Device;

    fn node(name: &str, free: &[u64], models: Vec<ResidentModel>) -> Node {
        Node {
            name: name.into(),
            health: Health::Healthy,
            labels: vec![],
            devices: free
                .iter()
                .enumerate()
                .map(|(index, free)| Device {
                    index: index as u32,
                    vram_total_mb: 80_000,
                    vram_free_mb: *free,
                    compute_capability: 90,
                })
                .collect(),
            models,
            latency: Default::default(),
        }
    }

    fn resident(id: &str, vram_mb: u64, in_flight: u32) -> ResidentModel {
        ResidentModel {
            id: id.into(),
            state: ModelState::Ready,
            vram_mb,
            devices: vec![0],
            idle_ms: 10,
            in_flight,
            queue_depth: 0,
            residency_priority: 100,
        }
    }

    fn entry(vram_mb: u64, min_devices: u32) -> CatalogueEntry {
        CatalogueEntry {
            id: "m".into(),
            aliases: vec!["alias".into()],
            vram_mb,
            min_devices,
            ..CatalogueEntry::default()
        }
    }

    #[test]
    fn fits_now_beats_needs_evictions_and_most_free_devices_are_taken() {
        let tight = node("a", &[10_000], vec![resident("old", 60_000, 0)]);
        let roomy = node("b", &[5_000, 70_000, 60_000], vec![resident("x", 1, 5)]);
        let plan = place(&entry(100_000, 2), [&tight, &roomy]).unwrap();
        assert_eq!(
            plan,
            Decision::Load(LoadPlan {
                node: "b".into(),
                devices: vec![1, 2],
                free_mb_needed: 0
            })
        );
        let plan = place(&entry(30_000, 1), [&tight]).unwrap();
        assert_eq!(
            plan,
            Decision::Load(LoadPlan {
                node: "a".into(),
                devices: vec![0],
                free_mb_needed: 20_000
            })
        );
    }

    #[test]
    fn busy_residents_or_too_few_devices_rule_a_node_out() {
        let busy = node("a", &[10_000], vec![resident("hot", 60_000, 2)]);
        assert_eq!(place(&entry(30_000, 1), [&busy]), None);
        let small = node("b", &[80_000], vec![]);
        assert_eq!(place(&entry(10, 2), [&small]), None);
        let mut down = node("c", &[80_000], vec![]);
        down.health = Health::Degraded;
        assert_eq!(place(&entry(10, 1), [&down]), None);
    }

    #[test]
    fn ids_win_over_aliases() {
        let catalogue = [
            entry(1, 1),
            CatalogueEntry {
                id: "alias".into(),
                ..entry(1, 1)
            },
        ];
        assert_eq!(
            resolve("alias", &catalogue).map(|e| e.id.as_str()),
            Some("alias")
        );
        assert_eq!(resolve("m", &catalogue).map(|e| e.id.as_str()), Some("m"));
        assert!(resolve("nope", &catalogue).is_none());
    }
}
