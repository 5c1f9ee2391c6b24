//! Cold placement: where a model that is not ready (or loading) anywhere gets loaded.
//!
//! A node is *feasible* for a model when it may host it at all: it is in `pinned_on`
//! (if that is set), it has at least `min_devices` devices each with
//! `vram_total_mb >= min_device_vram_mb`, and those devices' total memory can hold
//! the model. Feasibility does not depend on what is loaded; a model no node is
//! feasible for is a 404.
//!
//! An *unreachable* node that has reported no devices is *possibly feasible* (unless
//! `pinned_on` excludes it): its capacity is unknown, not absent. When no healthy node
//! can take the model, a possibly-feasible node, or a feasible one that is unreachable
//! or degraded, makes the answer a 503 with `retry_after_ms`; only when every node is
//! known to be infeasible (or excluded) is it a 404.
//!
//! On a feasible *healthy* node the router takes the `min_devices` eligible devices
//! with the most free memory. If their free memory covers the model it fits; else the
//! shortfall must be freed by evicting residents, which is only planned when the
//! evictable residents (equal-or-lower residency class, nothing in flight, not
//! loading or unloading — the default evictor's rule) hold at least the shortfall.
//! Evictable memory is counted per node, as the evictor chooses per node.

use helexa_policy_sdk::{
    CatalogueEntry, Decision, Device, Fleet, Health, LoadPlan, ModelState, Node, Rejection,
    ResidentModel,
};

use crate::Settings;

/// Why a node can never host a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Infeasible {
    /// `pinned_on` is set and does not name the node.
    NotPinned,
    /// The node has no devices at all.
    NoDevices,
    /// No device is large enough; carries the largest device's total MiB.
    DevicesTooSmall(u64),
    /// Too few devices are large enough; carries how many are.
    TooFewDevices(usize),
    /// Enough devices, but together they hold less than the model; carries their MiB.
    TooLittleMemory(u64),
}

/// How a healthy feasible node could take the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Node name.
    pub node: String,
    /// Devices to load onto (ascending ordinals).
    pub devices: Vec<u32>,
    /// MiB that must be freed first (0 = fits now).
    pub shortfall_mb: u64,
    /// MiB the evictable residents of the node hold.
    pub evictable_mb: u64,
    /// Requests in flight or queued on the node, over all its models.
    pub load: u64,
}

impl Candidate {
    /// Whether the load can happen (now, or after evicting evictable residents).
    pub fn is_placeable(&self) -> bool {
        self.evictable_mb >= self.shortfall_mb
    }
}

/// Devices needed: `min_devices`, and at least one.
fn devices_needed(entry: &CatalogueEntry) -> usize {
    usize::try_from(entry.min_devices.max(1)).unwrap_or(usize::MAX)
}

/// The node's devices that are large enough for `entry`, most free memory first
/// (ties: lower ordinal).
fn eligible_devices<'a>(entry: &CatalogueEntry, node: &'a Node) -> Vec<&'a Device> {
    let mut devices: Vec<&Device> = node
        .devices
        .iter()
        .filter(|device| device.vram_total_mb >= entry.min_device_vram_mb)
        .collect();
    devices.sort_by(|a, b| {
        b.vram_free_mb
            .cmp(&a.vram_free_mb)
            .then_with(|| a.index.cmp(&b.index))
    });
    devices
}

/// Whether `node` could ever host `entry`, and if not, why.
pub fn feasibility(entry: &CatalogueEntry, node: &Node) -> Result<(), Infeasible> {
    if !entry.pinned_on.is_empty() && !entry.pinned_on.contains(&node.name) {
        return Err(Infeasible::NotPinned);
    }
    if node.devices.is_empty() {
        return Err(Infeasible::NoDevices);
    }
    let needed = devices_needed(entry);
    let mut eligible: Vec<&Device> = node
        .devices
        .iter()
        .filter(|device| device.vram_total_mb >= entry.min_device_vram_mb)
        .collect();
    if eligible.is_empty() {
        let largest = node
            .devices
            .iter()
            .map(|d| d.vram_total_mb)
            .max()
            .unwrap_or(0);
        return Err(Infeasible::DevicesTooSmall(largest));
    }
    if eligible.len() < needed {
        return Err(Infeasible::TooFewDevices(eligible.len()));
    }
    // The largest `needed` devices bound what the model could ever get here.
    eligible.sort_by_key(|device| std::cmp::Reverse(device.vram_total_mb));
    let capacity: u64 = eligible.iter().take(needed).map(|d| d.vram_total_mb).sum();
    if capacity < entry.vram_mb {
        return Err(Infeasible::TooLittleMemory(capacity));
    }
    Ok(())
}

/// Whether the default evictor may unload `model` to make room for a model of
/// residency class `class`.
pub fn is_evictable(model: &ResidentModel, class: u32) -> bool {
    model.in_flight == 0
        && !matches!(model.state, ModelState::Loading | ModelState::Unloading)
        && model.residency_priority <= class
}

/// How `node` (healthy and feasible) could take `entry`.
pub fn candidate(entry: &CatalogueEntry, node: &Node) -> Candidate {
    let mut devices: Vec<u32> = eligible_devices(entry, node)
        .into_iter()
        .take(devices_needed(entry))
        .map(|device| device.index)
        .collect();
    let free: u64 = node
        .devices
        .iter()
        .filter(|device| devices.contains(&device.index))
        .map(|device| device.vram_free_mb)
        .sum();
    devices.sort_unstable();
    let class = entry.residency_class();
    let evictable_mb = node
        .models
        .iter()
        .filter(|model| is_evictable(model, class))
        .map(|model| model.vram_mb)
        .sum();
    let load = node.models.iter().map(crate::busy).sum();
    Candidate {
        node: node.name.clone(),
        devices,
        shortfall_mb: entry.vram_mb.saturating_sub(free),
        evictable_mb,
        load,
    }
}

/// Places `entry` on the fleet: a load plan, or the rejection that says why not.
pub fn place(settings: &Settings, entry: &CatalogueEntry, fleet: &Fleet) -> Decision {
    let mut infeasible: Vec<(&Node, Infeasible)> = Vec::new();
    let mut unavailable: Vec<&Node> = Vec::new();
    let mut candidates: Vec<Candidate> = Vec::new();
    for node in &fleet.nodes {
        match feasibility(entry, node) {
            Ok(()) if node.health == Health::Healthy => candidates.push(candidate(entry, node)),
            Ok(()) => unavailable.push(node),
            // The poller never reached this node (or lost it before it reported its
            // devices): its capacity is unknown, not absent, so it may well host the
            // model once it answers. `pinned_on` is checked first, so an excluded node
            // never gets here.
            Err(Infeasible::NoDevices) if node.health == Health::Unreachable => {
                unavailable.push(node);
            }
            Err(why) => infeasible.push((node, why)),
        }
    }

    // Fits-now before needs-evictions; then least loaded; then name.
    if let Some(best) = candidates
        .iter()
        .filter(|candidate| candidate.is_placeable())
        .min_by(|a, b| {
            (a.shortfall_mb > 0, a.load, &a.node).cmp(&(b.shortfall_mb > 0, b.load, &b.node))
        })
    {
        return Decision::Load(LoadPlan {
            node: best.node.clone(),
            devices: best.devices.clone(),
            free_mb_needed: best.shortfall_mb,
        });
    }

    if !unavailable.is_empty() {
        return Decision::Reject(Rejection {
            status: 503,
            message: unavailable_message(entry, &unavailable, &candidates),
            retry_after_ms: Some(settings.unavailable_retry_ms),
        });
    }
    if !candidates.is_empty() {
        return Decision::Reject(Rejection {
            status: 503,
            message: full_message(entry, &candidates),
            retry_after_ms: None,
        });
    }
    Decision::Reject(Rejection {
        status: 404,
        message: unhostable_message(entry, &infeasible),
        retry_after_ms: None,
    })
}

fn health_word(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Unreachable => "unreachable",
    }
}

fn full_reason(candidate: &Candidate) -> String {
    format!(
        "node {} needs {} MiB freed but only {} MiB is evictable",
        candidate.node, candidate.shortfall_mb, candidate.evictable_mb
    )
}

/// 503 text when every feasible node is either unavailable or full.
fn unavailable_message(
    entry: &CatalogueEntry,
    unavailable: &[&Node],
    full: &[Candidate],
) -> String {
    let nodes: Vec<String> = unavailable
        .iter()
        .map(|node| format!("node {} is {}", node.name, health_word(node.health)))
        .chain(full.iter().map(full_reason))
        .collect();
    format!(
        "model {} cannot be placed right now: {}; retry shortly",
        entry.id,
        nodes.join(", ")
    )
}

/// 503 text when every feasible node is healthy but full of residents that may not go.
fn full_message(entry: &CatalogueEntry, full: &[Candidate]) -> String {
    let nodes: Vec<String> = full.iter().map(full_reason).collect();
    format!(
        "model {} cannot be loaded now: {} (residents are busy or of a higher residency class than {})",
        entry.id,
        nodes.join(", "),
        entry.residency_class()
    )
}

/// 404 text naming, node by node, why no node can ever host the model.
fn unhostable_message(entry: &CatalogueEntry, infeasible: &[(&Node, Infeasible)]) -> String {
    let needed = devices_needed(entry);
    let noun = if needed == 1 { "device" } else { "devices" };
    let size = if entry.min_device_vram_mb > 0 {
        format!(" with ≥{} MiB", entry.min_device_vram_mb)
    } else {
        String::new()
    };
    let mut need = format!(
        "{} needs {needed} {noun}{size} and {} MiB in all",
        entry.id, entry.vram_mb
    );
    if !entry.pinned_on.is_empty() {
        need.push_str(&format!(" on one of {}", entry.pinned_on.join(", ")));
    }
    if infeasible.is_empty() {
        return format!("{need}; the fleet has no nodes");
    }
    let reasons: Vec<String> = infeasible
        .iter()
        .map(|(node, why)| match why {
            Infeasible::NotPinned => format!("node {} is not in pinned_on", node.name),
            Infeasible::NoDevices => format!("node {} has no devices", node.name),
            Infeasible::DevicesTooSmall(largest) => {
                format!("node {}'s devices have {largest} MiB", node.name)
            }
            Infeasible::TooFewDevices(count) => format!("node {} has {count}", node.name),
            Infeasible::TooLittleMemory(capacity) => format!(
                "node {}'s {needed} largest {noun} hold {capacity} MiB",
                node.name
            ),
        })
        .collect();
    format!("{need}; {}", reasons.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(index: u32, total: u64, free: u64) -> Device {
        Device {
            index,
            vram_total_mb: total,
            vram_free_mb: free,
            compute_capability: 90,
        }
    }

    fn node(name: &str, devices: Vec<Device>) -> Node {
        Node {
            name: name.into(),
            health: Health::Healthy,
            labels: vec![],
            devices,
            models: vec![],
            latency: Default::default(),
        }
    }

    fn model(vram_mb: u64, min_devices: u32, min_device_vram_mb: u64) -> CatalogueEntry {
        CatalogueEntry {
            id: "m".into(),
            vram_mb,
            min_devices,
            min_device_vram_mb,
            ..CatalogueEntry::default()
        }
    }

    #[test]
    fn feasibility_names_each_reason() {
        let two_big = node("a", vec![device(0, 80_000, 0), device(1, 80_000, 0)]);
        assert_eq!(feasibility(&model(100_000, 2, 80_000), &two_big), Ok(()));
        assert_eq!(
            feasibility(&model(100_000, 3, 80_000), &two_big),
            Err(Infeasible::TooFewDevices(2))
        );
        assert_eq!(
            feasibility(&model(100_000, 1, 90_000), &two_big),
            Err(Infeasible::DevicesTooSmall(80_000))
        );
        assert_eq!(
            feasibility(&model(170_000, 2, 0), &two_big),
            Err(Infeasible::TooLittleMemory(160_000))
        );
        assert_eq!(
            feasibility(&model(1, 1, 0), &node("b", vec![])),
            Err(Infeasible::NoDevices)
        );
        let mut pinned = model(1, 1, 0);
        pinned.pinned_on = vec!["z".into()];
        assert_eq!(feasibility(&pinned, &two_big), Err(Infeasible::NotPinned));
    }

    #[test]
    fn candidate_takes_the_freest_devices_and_reports_the_shortfall() {
        let n = node(
            "a",
            vec![
                device(0, 24_000, 1_000),
                device(1, 24_000, 20_000),
                device(2, 24_000, 9_000),
            ],
        );
        let c = candidate(&model(30_000, 2, 16_000), &n);
        assert_eq!(c.devices, [1, 2]);
        assert_eq!(c.shortfall_mb, 1_000);
        assert_eq!(c.evictable_mb, 0);
        assert!(!c.is_placeable());
    }

    #[test]
    fn evictability_follows_the_default_evictor() {
        let resident = |state, in_flight, residency_priority| ResidentModel {
            id: "r".into(),
            state,
            vram_mb: 1,
            devices: vec![0],
            idle_ms: 10,
            in_flight,
            queue_depth: 0,
            residency_priority,
        };
        assert!(is_evictable(&resident(ModelState::Ready, 0, 100), 100));
        assert!(is_evictable(&resident(ModelState::Failed, 0, 50), 100));
        assert!(!is_evictable(&resident(ModelState::Ready, 1, 100), 100));
        assert!(!is_evictable(&resident(ModelState::Loading, 0, 100), 100));
        assert!(!is_evictable(&resident(ModelState::Unloading, 0, 100), 100));
        assert!(!is_evictable(&resident(ModelState::Ready, 0, 1000), 100));
    }
}
