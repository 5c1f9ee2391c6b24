//! Runs every data-driven case in `tests/cases/*.json` through the default evictor
//! and compares the victim list exactly (format: `policies/README.md`).

use std::path::{Path, PathBuf};

use helexa_policy_evictor::DefaultEvictor;
use helexa_policy_sdk::{CatalogueEntry, Evictor, Node};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for people reading the case file")]
    description: String,
    /// The evictor's settings object; `{}` when absent.
    #[serde(default)]
    settings: Option<serde_json::Value>,
    on: Node,
    need_mb: u64,
    incoming: CatalogueEntry,
    expected: Vec<String>,
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
fn every_evictor_case_chooses_exactly_the_expected_victims() {
    let files = case_files();
    assert!(
        files.len() >= 6,
        "expected at least 6 evictor cases, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable case file");
        let case: Case = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: not an evictor case: {error}", file.display()));
        let settings = case
            .settings
            .as_ref()
            .map_or_else(|| "{}".to_owned(), ToString::to_string);
        let evictor = DefaultEvictor::configure(&settings)
            .unwrap_or_else(|error| panic!("{}: settings refused: {error}", file.display()));
        let victims = evictor.choose_victims(&case.on, case.need_mb, &case.incoming);
        if victims.as_ref() != Ok(&case.expected) {
            failures.push(format!(
                "{} ({}):\n  expected {:?}\n  got      {victims:?}",
                file.display(),
                case.name,
                case.expected
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
