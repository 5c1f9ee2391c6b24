//! Misbehaving guests: each is cut off, counted, and answered for by the default while
//! the runtime keeps answering.

use helexa_policy_runtime::*;

use crate::common::*;

/// Load `bytes` as router plugin `name`, route once through it and once more, and check
/// that both answers are the default router's and that the failure was counted as
/// `outcome` (and the default's answers as fallbacks).
fn falls_back(name: &str, bytes: &[u8], outcome: &str) {
    falls_back_within(name, bytes, outcome, Limits::default());
}

fn falls_back_within(name: &str, bytes: &[u8], outcome: &str, limits: Limits) {
    let _ = runtime(); // installs the test log subscriber
    let registry = prometheus::Registry::new();
    let runtime = PolicyRuntime::new(
        RuntimeConfig {
            cache_dir: None,
            limits,
        },
        &registry,
    )
    .unwrap();
    let defaults = runtime.default_set().unwrap();
    let plugin = runtime
        .load_plugin(PolicyKind::Router, name, "1.0.0", bytes, "{}")
        .unwrap_or_else(|e| panic!("{name} should load: {e}"));
    let set = defaults.with(plugin);

    let (cat, fleet) = (catalogue(1), fleet(1, 3, &[(2, 0)]));
    let expected = defaults.route(&request("qwen3-8b"), &cat, &fleet);
    assert!(
        matches!(&expected, Decision::Serve(p) if p.node == "node-02"),
        "{expected:?}"
    );
    for _ in 0..2 {
        assert_eq!(
            set.route(&request("qwen3-8b"), &cat, &fleet),
            expected,
            "{name}"
        );
    }
    assert_eq!(
        calls(&registry, name, "router", outcome),
        2,
        "{name}: {outcome} count"
    );
    assert_eq!(
        calls(&registry, name, "router", "ok"),
        0,
        "{name}: ok count"
    );
    assert_eq!(
        calls(&registry, "default", "router", "fallback"),
        2,
        "{name}: fallbacks"
    );

    let status = set.describe();
    let mine = status.iter().find(|s| s.name == name).expect("described");
    assert_eq!(
        (mine.kind, mine.calls, mine.errors),
        (PolicyKind::Router, 2, 2)
    );
    assert!(
        status
            .iter()
            .any(|s| s.is_default && s.kind == PolicyKind::Router)
    );

    // The runtime still answers other policies normally.
    let victims = set.choose_victims(
        &node("n", vec![resident("x", ModelState::Ready, 0)]),
        1,
        &entry("y", &[], 1),
    );
    assert_eq!(victims, vec!["x".to_owned()]);
}

#[test]
fn an_infinite_loop_times_out_and_the_default_answers() {
    falls_back("infinite-loop", test_guests::INFINITE_LOOP, "timeout");
}

#[test]
fn a_memory_bomb_traps_and_the_default_answers() {
    // Filling 64 MiB takes about as long as the default 20 ms deadline on a slow machine;
    // a smaller memory cap and a longer deadline make sure the memory limit is what stops it.
    let limits = Limits {
        max_memory_bytes: 16 << 20,
        call_deadline: std::time::Duration::from_secs(2),
        ..Limits::default()
    };
    falls_back_within("memory-bomb", test_guests::MEMORY_BOMB, "trap", limits);
}

#[test]
fn a_trap_falls_back_to_the_default() {
    falls_back("trap", test_guests::TRAP, "trap");
}

#[test]
fn a_huge_output_is_contained() {
    // The 64 MiB message either cannot be built inside the 64 MiB memory limit (a trap)
    // or is refused on the way out (an error); it never reaches the client.
    let (runtime, registry) = runtime();
    let set = runtime.default_set().unwrap().with(
        runtime
            .load_plugin(
                PolicyKind::Router,
                "huge",
                "1",
                test_guests::HUGE_OUTPUT,
                "{}",
            )
            .unwrap(),
    );
    let decision = set.route(&request("qwen3-8b"), &catalogue(1), &fleet(1, 1, &[(0, 0)]));
    assert!(
        matches!(&decision, Decision::Serve(p) if p.node == "node-00"),
        "{decision:?}"
    );
    let failures =
        calls(&registry, "huge", "router", "trap") + calls(&registry, "huge", "router", "error");
    assert_eq!(failures, 1);
}

#[test]
fn a_wrong_wit_version_is_refused_at_load_with_a_clear_message() {
    let (runtime, _) = runtime();
    let error = runtime
        .load_plugin(
            PolicyKind::Router,
            "wrong-version",
            "2.0.0",
            test_guests::WRONG_VERSION,
            "{}",
        )
        .expect_err("must be refused");
    let message = error.to_string();
    assert!(matches!(error, Error::Incompatible { .. }), "{message}");
    for needle in [
        "policy \"wrong-version\" v2.0.0",
        "helexa:policy/routing@9.0.0",
        "helexa:policy/routing@0.1.x",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
}

#[test]
fn a_component_of_another_world_is_refused_at_load() {
    let (runtime, _) = runtime();
    let error = runtime
        .load_plugin(
            PolicyKind::Evictor,
            "router-as-evictor",
            "1",
            embedded::ROUTER,
            "{}",
        )
        .expect_err("a router is not an evictor");
    let message = error.to_string();
    assert!(
        message.contains("helexa:policy/routing@0.1.0")
            && message.contains("helexa:policy/eviction@0.1.x"),
        "{message}"
    );
}

#[test]
fn garbage_bytes_and_bad_settings_are_load_errors() {
    let (runtime, _) = runtime();
    let error = runtime
        .load_plugin(PolicyKind::Router, "junk", "1", b"not wasm", "{}")
        .unwrap_err();
    assert!(matches!(error, Error::Compile { .. }), "{error}");
    let error = runtime
        .load_plugin(
            PolicyKind::Router,
            "strict",
            "1",
            embedded::ROUTER,
            r#"{"no_such_setting": 1}"#,
        )
        .unwrap_err();
    assert!(matches!(error, Error::Configure { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("policy \"strict\" v1: configure failed: bad settings"),
        "{error}"
    );
}
