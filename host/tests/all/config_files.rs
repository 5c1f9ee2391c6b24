//! The example files load; bad configs fail with the message in their golden `.err`
//! (`HELEXA_BLESS=1 cargo test -p helexa --test all config` rewrites the goldens).

use std::path::{Path, PathBuf};

use helexa::catalogue::{self, CatalogueStore};
use helexa::config::{Config, Overrides};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn example_files_load() {
    let path = manifest_dir().join("examples/gateway.toml");
    let env = |name: &str| (name == "HELEXA_CI_KEY").then(|| "sk-ci-0123456789".to_owned());
    let config = Config::load(&path, &Overrides::default(), &env).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:31313");
    assert_eq!(config.metrics_listen.to_string(), "127.0.0.1:31314");
    assert_eq!(config.nodes.len(), 2);
    assert_eq!(config.nodes[0].labels, ["gpu=h200", "tier=gold"]);
    assert_eq!(config.auth.keys.len(), 2);
    assert_eq!(config.auth.keys[1].name, "ci");
    assert_eq!(
        config.policies.router.settings_json,
        r#"{"loading_retry_ms":500}"#
    );
    // The example's policy settings are accepted by the embedded default policies.
    helexa::policy::load(&config.policies, &prometheus::Registry::new()).unwrap();
    assert!(config.policies.evictor.plugin.is_none());
    assert_eq!(config.proxy.stall_timeout.as_secs(), 120);
    assert_eq!(
        config.models.as_deref(),
        Some(manifest_dir().join("examples/models.toml").as_path())
    );

    let names = config.nodes.iter().map(|n| n.name.clone()).collect();
    let store = CatalogueStore::open(config.models.clone(), names).unwrap();
    let catalogue = store.current();
    assert_eq!(catalogue.specs.len(), 3);
    let big = catalogue.find("claude-sonnet-4-5").unwrap();
    assert_eq!(big.id, "llama-3.1-70b");
    assert_eq!((big.min_devices, big.min_device_vram_mb), (2, 80000));
    assert_eq!(big.effective_priority(), 500);
    assert_eq!(
        catalogue.find("qwen3-0.6b").unwrap().effective_priority(),
        100
    );
    assert_eq!(store.reload().unwrap(), 2, "reloading bumps the version");
}

#[test]
fn flags_and_env_override_the_file() {
    let path = manifest_dir().join("examples/gateway.toml");
    let env = |_: &str| Some("sk-ci-0123456789".to_owned());
    let overrides = Overrides {
        listen: Some("0.0.0.0:8080".parse().unwrap()),
        metrics_listen: Some("0.0.0.0:9090".parse().unwrap()),
    };
    let config = Config::load(&path, &overrides, &env).unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:9090");
}

#[test]
fn catalogue_reload_keeps_the_old_one_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    std::fs::write(
        &path,
        "[[models]]\nid = \"a\"\nsource = \"x\"\nvram_mb = 1\n",
    )
    .unwrap();
    let store = CatalogueStore::open(Some(path.clone()), vec![]).unwrap();
    std::fs::write(&path, "[[models]]\nid = \"a\"\n").unwrap();
    assert!(store.reload().is_err());
    assert_eq!(store.current().specs[0].id, "a");
    std::fs::write(
        &path,
        "[[models]]\nid = \"b\"\nsource = \"x\"\nvram_mb = 1\n",
    )
    .unwrap();
    assert_eq!(store.reload().unwrap(), 2);
    assert!(store.current().find("b").is_some());
}

#[test]
fn bad_configs_fail_with_their_golden_message() {
    let dir = manifest_dir().join("tests/bad_configs");
    let bless = std::env::var_os("HELEXA_BLESS").is_some();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        let error = if name.ends_with(".models.toml") {
            catalogue::parse(&text, name, &["a".to_owned()])
                .map(drop)
                .unwrap_err()
        } else {
            Config::from_toml(&text, name, Path::new("."), &Overrides::default(), &|_| {
                None
            })
            .map(drop)
            .unwrap_err()
        };
        let message = error.to_string();
        assert!(
            message.starts_with(name),
            "the message names the file: {message}"
        );
        let golden = file.with_extension("err");
        if bless {
            std::fs::write(&golden, format!("{}\n", error.detail())).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} missing; run with HELEXA_BLESS=1", golden.display()));
        assert_eq!(error.detail(), expected.trim_end(), "{name}");
    }
}
