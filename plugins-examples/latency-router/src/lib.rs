//! Example router: latency- and throughput-aware replica choice.
//!
//! The gateway measures every node (`node.latency`: median time to first token, median
//! inter-token latency, samples in the window). For a request this router estimates each
//! ready replica's *expected time*:
//!
//! `expected_ms = ttft_p50_ms + itl_p50_ms × output_tokens`
//!
//! where `output_tokens` is the request's `max_output_tokens` capped at
//! `max_expected_output_tokens`, else `expected_output_tokens`. A replica without samples
//! gets the mean of the measured ones (no data is neither good nor bad); with no
//! measurements at all only queue depth counts.
//!
//! The score blends expected time and queue depth (`in_flight + queue_depth`), each
//! normalised by its largest value among the replicas:
//!
//! `score = (1 − queue_weight) × expected / max_expected + queue_weight × busy / max_busy`
//!
//! so `queue_weight = 0` is pure latency and `1` is pure least-busy. Lowest score serves,
//! the rest (by score) are the fallbacks; ties go by name. When the model is ready
//! nowhere it behaves like the default router: retry while it is loading somewhere,
//! else place it cold (`helexa-example-common`), else 503.
//!
//! Settings (`[plugins.settings.<name>]`, JSON; all optional):
//! `{"queue_weight": 0.5, "expected_output_tokens": 256, "max_expected_output_tokens": 2048,
//!   "loading_retry_ms": 500}`.

use helexa_example_common::{busy, is_answering, loading, place, ready, resolve, unknown_model};
use helexa_policy_sdk::{
    CatalogueEntry, Decision, Fleet, Node, PolicyError, Rejection, RequestInfo, Router, ServePlan,
};
use serde::Deserialize;

/// Operator settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Weight of queue depth against expected latency, in `[0, 1]`.
    pub queue_weight: f32,
    /// Output tokens assumed when the request sets no maximum.
    pub expected_output_tokens: u32,
    /// Cap on a request's `max_output_tokens` for the estimate (clients often ask for far
    /// more than they get).
    pub max_expected_output_tokens: u32,
    /// Retry hint while the model is loading somewhere, ms.
    pub loading_retry_ms: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_weight: 0.5,
            expected_output_tokens: 256,
            max_expected_output_tokens: 2048,
            loading_retry_ms: 500,
        }
    }
}

/// The configured router.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyRouter {
    settings: Settings,
}

impl LatencyRouter {
    /// Validates `settings`.
    pub fn new(settings: Settings) -> Result<Self, PolicyError> {
        if !(0.0..=1.0).contains(&settings.queue_weight) {
            return Err(PolicyError::BadSettings(format!(
                "queue_weight must be between 0 and 1, got {}",
                settings.queue_weight
            )));
        }
        Ok(LatencyRouter { settings })
    }

    /// Output tokens to plan for.
    fn output_tokens(&self, request: &RequestInfo) -> f32 {
        let tokens = request
            .max_output_tokens
            .map_or(self.settings.expected_output_tokens, |max| {
                max.min(self.settings.max_expected_output_tokens)
            });
        tokens as f32
    }

    /// Ready replicas of `model_id` with their scores, best first.
    pub fn ranked<'a>(
        &self,
        request: &RequestInfo,
        model_id: &str,
        fleet: &'a Fleet,
    ) -> Vec<(f32, &'a Node)> {
        let tokens = self.output_tokens(request);
        let replicas: Vec<(&Node, u64, Option<f32>)> = fleet
            .nodes
            .iter()
            .filter(|node| is_answering(node))
            .filter_map(|node| {
                let model = ready(node, model_id)?;
                let latency = &node.latency;
                let expected = (latency.samples > 0)
                    .then(|| latency.ttft_p50_ms.max(0.0) + latency.itl_p50_ms.max(0.0) * tokens);
                Some((node, busy(model), expected))
            })
            .collect();
        let measured: Vec<f32> = replicas
            .iter()
            .filter_map(|(_, _, expected)| *expected)
            .collect();
        let mean = if measured.is_empty() {
            0.0
        } else {
            measured.iter().sum::<f32>() / measured.len() as f32
        };
        let max_expected = replicas
            .iter()
            .map(|(_, _, expected)| expected.unwrap_or(mean))
            .fold(0.0_f32, f32::max);
        let max_busy = replicas.iter().map(|(_, busy, _)| *busy).max().unwrap_or(0);
        let weight = self.settings.queue_weight;
        let mut scored: Vec<(f32, &Node)> = replicas
            .into_iter()
            .map(|(node, busy, expected)| {
                let latency = if max_expected > 0.0 {
                    expected.unwrap_or(mean) / max_expected
                } else {
                    0.0
                };
                let queue = if max_busy > 0 {
                    busy as f32 / max_busy as f32
                } else {
                    0.0
                };
                ((1.0 - weight) * latency + weight * queue, node)
            })
            .collect();
        scored.sort_by(|(a, node_a), (b, node_b)| {
            a.total_cmp(b).then_with(|| node_a.name.cmp(&node_b.name))
        });
        scored
    }

    /// Decides where `request` runs.
    pub fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Decision {
        let Some(entry) = resolve(&request.model, catalogue) else {
            return unknown_model(&request.model);
        };
        let mut names = self
            .ranked(request, &entry.id, fleet)
            .into_iter()
            .map(|(_, node)| node.name.clone());
        if let Some(node) = names.next() {
            return Decision::Serve(ServePlan {
                node,
                fallbacks: names.collect(),
            });
        }
        if fleet
            .nodes
            .iter()
            .any(|node| is_answering(node) && loading(node, &entry.id))
        {
            return Decision::RetryAfter(self.settings.loading_retry_ms);
        }
        place(entry, &fleet.nodes).unwrap_or_else(|| {
            Decision::Reject(Rejection {
                status: 503,
                message: format!(
                    "model {} is ready nowhere and no healthy node has room for it now",
                    entry.id
                ),
                retry_after_ms: Some(2_000),
            })
        })
    }
}

impl Router for LatencyRouter {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        LatencyRouter::new(helexa_policy_sdk::parse_settings(settings)?)
    }

    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        Ok(LatencyRouter::route(self, request, catalogue, fleet))
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(LatencyRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use helexa_policy_sdk::{Device, Health, LatencyStats, LoadPlan, ModelState, ResidentModel};

    fn node(name: &str, ttft: f32, itl: f32, samples: u32, in_flight: u32) -> Node {
        Node {
            name: name.into(),
            health: Health::Healthy,
            labels: vec![],
            devices: vec![Device {
                index: 0,
                vram_total_mb: 80_000,
                vram_free_mb: 50_000,
                compute_capability: 90,
            }],
            models: vec![ResidentModel {
                id: "m".into(),
                state: ModelState::Ready,
                vram_mb: 10_000,
                devices: vec![0],
                idle_ms: 0,
                in_flight,
                queue_depth: 0,
                residency_priority: 100,
            }],
            latency: LatencyStats {
                ttft_p50_ms: ttft,
                itl_p50_ms: itl,
                samples,
            },
        }
    }

    fn catalogue() -> Vec<CatalogueEntry> {
        vec![CatalogueEntry {
            id: "m".into(),
            vram_mb: 10_000,
            min_devices: 1,
            ..CatalogueEntry::default()
        }]
    }

    fn request(max_output_tokens: Option<u32>) -> RequestInfo {
        RequestInfo {
            model: "m".into(),
            max_output_tokens,
            ..RequestInfo::default()
        }
    }

    fn order(router: &LatencyRouter, request: &RequestInfo, fleet: &Fleet) -> Vec<String> {
        match router.route(request, &catalogue(), fleet) {
            Decision::Serve(plan) => std::iter::once(plan.node).chain(plan.fallbacks).collect(),
            other => panic!("expected serve, got {other:?}"),
        }
    }

    fn router(json: &str) -> LatencyRouter {
        LatencyRouter::configure(json).unwrap()
    }

    #[test]
    fn output_length_decides_between_fast_start_and_fast_decode() {
        // a: quick first token, slow decode; b: slow first token, quick decode.
        let fleet = Fleet {
            version: 1,
            nodes: vec![node("a", 50.0, 40.0, 10, 0), node("b", 400.0, 10.0, 10, 0)],
        };
        let latency_only = router(r#"{"queue_weight": 0}"#);
        assert_eq!(order(&latency_only, &request(Some(4)), &fleet), ["a", "b"]);
        assert_eq!(
            order(&latency_only, &request(Some(1000)), &fleet),
            ["b", "a"]
        );
        // Without a maximum the default expectation (256 tokens) applies: b is faster.
        assert_eq!(order(&latency_only, &request(None), &fleet), ["b", "a"]);
    }

    #[test]
    fn queue_weight_trades_latency_for_queue_depth() {
        let fleet = Fleet {
            version: 1,
            nodes: vec![
                node("fast-busy", 50.0, 10.0, 10, 8),
                node("slow-idle", 80.0, 12.0, 10, 0),
            ],
        };
        assert_eq!(
            order(&router(r#"{"queue_weight": 0}"#), &request(None), &fleet)[0],
            "fast-busy"
        );
        assert_eq!(
            order(&router(r#"{"queue_weight": 1}"#), &request(None), &fleet)[0],
            "slow-idle"
        );
        assert_eq!(order(&router("{}"), &request(None), &fleet)[0], "slow-idle");
    }

    #[test]
    fn unmeasured_replicas_count_as_average() {
        let fleet = Fleet {
            version: 1,
            nodes: vec![
                node("slow", 300.0, 30.0, 5, 0),
                node("new", 0.0, 0.0, 0, 0),
                node("quick", 100.0, 10.0, 5, 0),
            ],
        };
        assert_eq!(
            order(&router(r#"{"queue_weight": 0}"#), &request(None), &fleet),
            ["quick", "new", "slow"]
        );
    }

    #[test]
    fn not_ready_anywhere_waits_places_or_refuses() {
        let mut fleet = Fleet {
            version: 1,
            nodes: vec![node("a", 0.0, 0.0, 0, 0)],
        };
        fleet.nodes[0].models[0].state = ModelState::Loading;
        assert_eq!(
            router("{}").route(&request(None), &catalogue(), &fleet),
            Decision::RetryAfter(500)
        );
        fleet.nodes[0].models.clear();
        assert_eq!(
            router("{}").route(&request(None), &catalogue(), &fleet),
            Decision::Load(LoadPlan {
                node: "a".into(),
                devices: vec![0],
                free_mb_needed: 0
            })
        );
        fleet.nodes[0].health = Health::Unreachable;
        assert!(
            matches!(router("{}").route(&request(None), &catalogue(), &fleet), Decision::Reject(r) if r.status == 503)
        );
        let unknown = RequestInfo {
            model: "x".into(),
            ..RequestInfo::default()
        };
        assert!(
            matches!(router("{}").route(&unknown, &catalogue(), &fleet), Decision::Reject(r) if r.status == 404)
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(matches!(
            LatencyRouter::configure(r#"{"queue_weight": 2}"#),
            Err(PolicyError::BadSettings(_))
        ));
        assert!(matches!(
            LatencyRouter::configure(r#"{"weight": 0.1}"#),
            Err(PolicyError::BadSettings(_))
        ));
    }
}
