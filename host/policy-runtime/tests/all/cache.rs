//! The compilation cache: a second runtime on the same directory loads without compiling.

use helexa_policy_runtime::*;

#[test]
fn the_second_load_hits_the_precompiled_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = || RuntimeConfig {
        cache_dir: Some(dir.path().to_owned()),
        limits: Limits::default(),
    };

    let first = PolicyRuntime::new(config(), &prometheus::Registry::new()).unwrap();
    first.default_set().unwrap();
    let (hits, misses) = first.cache_stats().expect("cache configured");
    assert_eq!(
        (hits, misses),
        (0, 3),
        "a fresh cache compiles the three defaults"
    );

    let second = PolicyRuntime::new(config(), &prometheus::Registry::new()).unwrap();
    let set = second.default_set().unwrap();
    assert_eq!(
        second.cache_stats(),
        Some((3, 0)),
        "the second runtime compiles nothing"
    );
    // And the deserialised components work.
    let victims = set.choose_victims(
        &crate::common::node(
            "n",
            vec![crate::common::resident("x", ModelState::Ready, 0)],
        ),
        1,
        &crate::common::entry("y", &[], 1),
    );
    assert_eq!(victims, vec!["x".to_owned()]);
    assert!(
        PolicyRuntime::new(RuntimeConfig::default(), &prometheus::Registry::new())
            .unwrap()
            .cache_stats()
            .is_none()
    );
}
