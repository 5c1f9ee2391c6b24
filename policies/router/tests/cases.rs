//! Runs every data-driven case in `tests/cases/*.json` through the default router
//! and compares the decision exactly (format: `policies/README.md`).

use std::path::{Path, PathBuf};

use helexa_policy_router::DefaultRouter;
use helexa_policy_sdk::{CatalogueEntry, Decision, Fleet, RequestInfo, Router};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for people reading the case file")]
    description: String,
    /// The router's settings object; `{}` when absent.
    #[serde(default)]
    settings: Option<serde_json::Value>,
    request: RequestInfo,
    catalogue: Vec<CatalogueEntry>,
    fleet: Fleet,
    expected: Decision,
}

fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_router_case_decides_exactly_as_expected() {
    let files = case_files();
    assert!(
        files.len() >= 12,
        "expected at least 12 router cases, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable case file");
        let case: Case = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: not a router case: {error}", file.display()));
        let settings = case
            .settings
            .as_ref()
            .map_or_else(|| "{}".to_owned(), ToString::to_string);
        let router = DefaultRouter::configure(&settings)
            .unwrap_or_else(|error| panic!("{}: settings refused: {error}", file.display()));
        let decision = router.route(&case.request, &case.catalogue, &case.fleet);
        if decision.as_ref() != Ok(&case.expected) {
            failures.push(format!(
                "{} ({}):\n  expected {}\n  got      {}",
                file.display(),
                case.name,
                serde_json::to_string(&case.expected).expect("serialisable"),
                match &decision {
                    Ok(decision) => serde_json::to_string(decision).expect("serialisable"),
                    Err(error) => format!("error {error}"),
                }
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
