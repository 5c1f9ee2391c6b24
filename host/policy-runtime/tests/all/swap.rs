//! Hot swap under load: no call is lost or answered wrongly while sets are swapped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use helexa_policy_runtime::*;

use crate::common::*;

#[test]
fn swapping_fifty_times_under_concurrent_calls_loses_no_call() {
    let (runtime, registry) = runtime();
    let defaults = runtime.default_set().unwrap();
    // Two distinct plugins built from the same component (so both give the same answers),
    // plus the trapping guest, which the default covers for.
    let alt = defaults.with(
        runtime
            .load_plugin(PolicyKind::Router, "alt", "1", embedded::ROUTER, "{}")
            .unwrap(),
    );
    let other = defaults.with(
        runtime
            .load_plugin(
                PolicyKind::Router,
                "other",
                "1",
                embedded::ROUTER,
                r#"{"loading_retry_ms": 500}"#,
            )
            .unwrap(),
    );
    let trap = defaults.with(
        runtime
            .load_plugin(PolicyKind::Router, "trap", "1", test_guests::TRAP, "{}")
            .unwrap(),
    );
    let sets = [defaults, alt, other, trap];
    let handle: PolicyHandle = Arc::new(arc_swap::ArcSwap::from_pointee(sets[0].clone()));

    let (cat, fleet) = (catalogue(1), fleet(1, 16, &[(5, 2), (11, 0)]));
    let expected = Decision::Serve(ServePlan {
        node: "node-11".into(),
        fallbacks: vec!["node-05".into()],
    });
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (handle, cat, fleet, expected) =
                (handle.clone(), cat.clone(), fleet.clone(), expected.clone());
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut mine = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let set = handle.load_full();
                    assert_eq!(set.route(&request("qwen3-8b"), &cat, &fleet), expected);
                    mine += 1;
                }
                answered.fetch_add(mine, Ordering::Relaxed);
            })
        })
        .collect();
    for i in 0..50 {
        handle.store(Arc::new(sets[(i + 1) % sets.len()].clone()));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker
            .join()
            .expect("a routing thread panicked (wrong answer)");
    }

    let answered = answered.load(Ordering::Relaxed);
    assert!(answered > 0);
    // Every call is accounted for: answered by a plugin ("ok"; the default's "ok" includes
    // the calls it took over), and every failure of a plugin was taken over by the default.
    let answers: u64 = ["default", "alt", "other"]
        .iter()
        .map(|p| calls(&registry, p, "router", "ok"))
        .sum();
    assert_eq!(answers, answered);
    let failures: u64 = ["alt", "other", "trap"]
        .iter()
        .flat_map(|p| {
            ["trap", "timeout", "error"].map(|outcome| calls(&registry, p, "router", outcome))
        })
        .sum();
    assert!(
        calls(&registry, "trap", "router", "trap") > 0,
        "the trapping set was active"
    );
    assert_eq!(calls(&registry, "default", "router", "fallback"), failures);
}
