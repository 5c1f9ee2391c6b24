//! The default router, called through wasm, against known answers.

use std::path::Path;
use std::sync::Arc;

use helexa_policy_runtime::*;
use serde::Deserialize;

use crate::common::*;

#[test]
fn serves_on_the_least_busy_ready_replica_with_the_others_as_fallbacks() {
    let (runtime, registry) = runtime();
    let set = runtime.default_set().unwrap();
    let decision = set.route(
        &request("qwen3-8b"),
        &catalogue(1),
        &fleet(1, 4, &[(1, 3), (2, 0), (3, 1)]),
    );
    assert_eq!(
        decision,
        Decision::Serve(ServePlan {
            node: "node-02".into(),
            fallbacks: vec!["node-03".into(), "node-01".into()],
        })
    );
    assert_eq!(calls(&registry, "default", "router", "ok"), 1);
}

#[test]
fn resolves_aliases_and_rejects_unknown_models_with_404() {
    let (runtime, _) = runtime();
    let set = runtime.default_set().unwrap();
    let fleet = fleet(1, 2, &[(0, 0)]);
    let decision = set.route(&request("claude-sonnet-4-5"), &catalogue(1), &fleet);
    assert!(
        matches!(&decision, Decision::Serve(plan) if plan.node == "node-00"),
        "{decision:?}"
    );

    match set.route(&request("gpt-9"), &catalogue(1), &fleet) {
        Decision::Reject(rejection) => {
            assert_eq!(rejection.status, 404);
            assert!(
                rejection.message.contains("gpt-9") && rejection.message.contains("qwen3-8b"),
                "{rejection:?}"
            );
        }
        other => panic!("expected a 404, got {other:?}"),
    }
}

#[test]
fn waits_for_a_loading_model_and_places_a_cold_one() {
    let (runtime, _) = runtime();
    let set = runtime.default_set().unwrap();
    let mut loading = (*fleet(1, 2, &[])).clone();
    loading.nodes[1]
        .models
        .push(resident("qwen3-8b", ModelState::Loading, 0));
    assert_eq!(
        set.route(&request("qwen3-8b"), &catalogue(1), &Arc::new(loading)),
        Decision::RetryAfter(500)
    );

    match set.route(&request("qwen3-8b"), &catalogue(1), &fleet(2, 2, &[])) {
        Decision::Load(plan) => {
            assert_eq!(plan.node, "node-00");
            assert_eq!(plan.devices, vec![0]);
            assert_eq!(plan.free_mb_needed, 0);
        }
        other => panic!("expected a load plan, got {other:?}"),
    }
}

#[test]
fn a_new_fleet_version_reaches_the_resident_instances() {
    let (runtime, _) = runtime();
    let set = runtime.default_set().unwrap();
    let cat = catalogue(1);
    for round in 0..3u64 {
        // Alternate where the model is ready; every version change must be seen.
        let at = (round % 2) as usize;
        let decision = set.route(
            &request("qwen3-8b"),
            &cat,
            &fleet(10 + round, 2, &[(at, 0)]),
        );
        assert!(
            matches!(&decision, Decision::Serve(p) if p.node == format!("node-{at:02}")),
            "{decision:?}"
        );
    }
    // A new catalogue version replaces the resident catalogue too.
    let renamed = Arc::new(Catalogue {
        version: 2,
        entries: vec![entry("qwen3-8b", &["fast"], 20_000)],
    });
    let decision = set.route(&request("fast"), &renamed, &fleet(20, 2, &[(1, 0)]));
    assert!(
        matches!(&decision, Decision::Serve(p) if p.node == "node-01"),
        "{decision:?}"
    );
}

#[test]
fn the_default_evictor_answers_through_wasm() {
    let (runtime, registry) = runtime();
    let set = runtime.default_set().unwrap();
    let mut on = node(
        "node-00",
        vec![
            resident("a", ModelState::Ready, 0),
            resident("b", ModelState::Ready, 0),
        ],
    );
    on.models[0].idle_ms = 10;
    on.models[1].idle_ms = 90_000;
    let victims = set.choose_victims(&on, 10_000, &entry("incoming", &[], 30_000));
    // Least recently used first, and one victim frees enough.
    assert_eq!(victims, vec!["b".to_owned()]);
    assert_eq!(calls(&registry, "default", "evictor", "ok"), 1);
}

/// One data-driven case of `policies/router/tests/cases/*.json` (P's format).
#[derive(Deserialize)]
struct Case {
    name: String,
    request: RequestInfo,
    catalogue: Vec<CatalogueEntry>,
    fleet: Fleet,
    expected: Decision,
    /// Router settings of the case (`{}` when absent).
    #[serde(default)]
    settings: Option<serde_json::Value>,
}

#[test]
fn the_router_case_files_hold_through_wasm() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/router/tests/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    let (runtime, _) = runtime();
    let set = runtime.default_set().unwrap();
    for (i, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file).unwrap();
        let case: Case =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let catalogue = Arc::new(Catalogue {
            version: i as u64 + 1,
            entries: case.catalogue,
        });
        let fleet = Arc::new(Fleet {
            version: i as u64 + 1,
            ..case.fleet
        });
        let set = match &case.settings {
            Some(settings) => set.with(
                runtime
                    .load_plugin(
                        PolicyKind::Router,
                        &case.name,
                        "case",
                        embedded::ROUTER,
                        &settings.to_string(),
                    )
                    .unwrap(),
            ),
            None => set.clone(),
        };
        let decision = set.route(&case.request, &catalogue, &fleet);
        assert_eq!(
            decision,
            case.expected,
            "case {} ({})",
            case.name,
            file.display()
        );
    }
}
