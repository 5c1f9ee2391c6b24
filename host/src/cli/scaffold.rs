//! `helexa plugin new <router|evictor|translator> <name>`: writes a standalone policy crate.
//!
//! The crate needs nothing from this repository: it carries its own copy of the WIT
//! contract (`wit/`, the frozen `helexa:policy@0.1.0` package the gateway speaks) and
//! its own `wit_bindgen::generate!` glue, with `wit-bindgen` pinned to the version helexa
//! builds its own policies with. It builds with `cargo build --target wasm32-wasip2
//! --release` and its logic is plain functions that `cargo test` runs natively.
//!
//! The templates live in `host/plugin-template/` and are compiled into the binary
//! (`include_str!`), as are the WIT files, so the scaffold always matches the contract
//! of the gateway that wrote it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The `wit-bindgen` version of the workspace (`[workspace.dependencies]`); a test keeps
/// the two in step.
pub const WIT_BINDGEN_VERSION: &str = "0.61.1";

/// The WIT files every scaffold carries, at `wit/<file>`.
const WIT_FILES: &[(&str, &str)] = &[
    (
        "types.wit",
        include_str!("../../../wit/deps/helexa-policy@0.1.0/types.wit"),
    ),
    (
        "worlds.wit",
        include_str!("../../../wit/deps/helexa-policy@0.1.0/worlds.wit"),
    ),
];

const CARGO_TOML: &str = include_str!("../../plugin-template/Cargo.toml.tmpl");
const README: &str = include_str!("../../plugin-template/README.md.tmpl");
const GITIGNORE: &str = include_str!("../../plugin-template/gitignore");
const ROUTER_LIB: &str = include_str!("../../plugin-template/router.rs");
const EVICTOR_LIB: &str = include_str!("../../plugin-template/evictor.rs");
const TRANSLATOR_LIB: &str = include_str!("../../plugin-template/translator.rs");

/// Longest crate name accepted (crates.io's limit).
const MAX_NAME_LEN: usize = 64;

/// Writes a new policy crate of `kind` (`router`, `evictor` or `translator`) named
/// `name` into `parent/name` and returns that directory.
///
/// Refuses an unknown kind, a name that is not a valid crate name, and a destination
/// that exists and is not an empty directory.
pub fn scaffold(kind: &str, name: &str, parent: &Path) -> anyhow::Result<PathBuf> {
    let (world, lib) = match kind {
        "router" => ("router", ROUTER_LIB),
        "evictor" => ("evictor", EVICTOR_LIB),
        "translator" => ("translator", TRANSLATOR_LIB),
        other => bail!("unknown plugin kind {other:?}: expected router, evictor or translator"),
    };
    check_name(name)?;
    let dir = parent.join(name);
    if dir.exists() {
        let mut entries = std::fs::read_dir(&dir).with_context(|| {
            format!(
                "{} exists and is not a directory we can read",
                dir.display()
            )
        })?;
        if entries.next().is_some() {
            bail!(
                "{} already exists and is not empty; choose another name or remove it",
                dir.display()
            );
        }
    }

    let crate_name = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{kind}}", kind)
            .replace("{{world}}", world)
            .replace("{{wit_bindgen_version}}", WIT_BINDGEN_VERSION)
    };
    let mut files: Vec<(PathBuf, String)> = vec![
        ("Cargo.toml".into(), fill(CARGO_TOML)),
        ("README.md".into(), fill(README)),
        (".gitignore".into(), GITIGNORE.to_owned()),
        (Path::new("src").join("lib.rs"), fill(lib)),
    ];
    for (file, text) in WIT_FILES {
        files.push((Path::new("wit").join(file), (*text).to_owned()));
    }
    for (relative, text) in files {
        let path = dir.join(&relative);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// A crate name cargo accepts and that is also a plain directory name: ASCII letters,
/// digits, `-` and `_`, starting with a letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let starts_with_letter = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !starts_with_letter || !plain || name.len() > MAX_NAME_LEN {
        bail!(
            "invalid plugin name {name:?}: use ASCII letters, digits, '-' and '_', starting with \
             a letter, at most {MAX_NAME_LEN} characters (it becomes the crate and directory name)"
        );
    }
    // Cargo refuses these as package names; say so before writing anything.
    if matches!(
        name,
        "test" | "core" | "std" | "alloc" | "proc_macro" | "self" | "crate"
    ) {
        bail!("invalid plugin name {name:?}: cargo reserves it; choose another");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_bindgen_pin_matches_the_workspace() {
        let manifest = include_str!("../../../Cargo.toml");
        let line = manifest
            .lines()
            .find(|line| line.starts_with("wit-bindgen ="))
            .expect("wit-bindgen in [workspace.dependencies]");
        assert!(
            line.contains(&format!("\"={WIT_BINDGEN_VERSION}\"")),
            "scaffold pins wit-bindgen {WIT_BINDGEN_VERSION}, the workspace has: {line}"
        );
    }

    #[test]
    fn writes_every_file_with_the_names_filled_in() {
        let parent = tempfile::tempdir().unwrap();
        let dir = scaffold("evictor", "my-evictor", parent.path()).unwrap();
        assert_eq!(dir, parent.path().join("my-evictor"));
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-evictor\""), "{manifest}");
        assert!(manifest.contains("version = \"=0.61.1\""), "{manifest}");
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("world: \"evictor\""));
        assert!(!lib.contains("{{"), "unfilled placeholder in lib.rs");
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(readme.contains("release/my_evictor.wasm"), "{readme}");
        let worlds = std::fs::read_to_string(dir.join("wit/worlds.wit")).unwrap();
        assert!(worlds.contains("package helexa:policy@0.1.0;"));
        assert!(dir.join("wit/types.wit").is_file());
        assert!(dir.join(".gitignore").is_file());
    }

    #[test]
    fn refuses_bad_kinds_names_and_non_empty_destinations() {
        let parent = tempfile::tempdir().unwrap();
        let error = scaffold("balancer", "x", parent.path()).unwrap_err();
        assert!(error.to_string().contains("unknown plugin kind"), "{error}");
        for name in ["", "1st", "has space", "../escape", "a/b", "test"] {
            let error = scaffold("router", name, parent.path()).unwrap_err();
            assert!(error.to_string().contains("invalid plugin name"), "{error}");
        }
        // An empty directory is fine; a non-empty one is refused and left alone.
        std::fs::create_dir(parent.path().join("empty")).unwrap();
        scaffold("router", "empty", parent.path()).unwrap();
        let error = scaffold("router", "empty", parent.path()).unwrap_err();
        assert!(error.to_string().contains("already exists"), "{error}");
        // A file in the way is refused too.
        std::fs::write(parent.path().join("file"), "x").unwrap();
        assert!(scaffold("router", "file", parent.path()).is_err());
    }
}
