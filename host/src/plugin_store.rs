//! The plugin store: the directory of installed policy plugins that `helexa plugin …`
//! writes and the gateway watches.
//!
//! Layout (one flat directory, default `$XDG_DATA_HOME/helexa/plugins`):
//! - `NAME.wasm`: the component exactly as installed;
//! - `NAME.toml`: its [`Manifest`] (name, version, world, WIT version, sha256, source,
//!   installed at);
//! - `active.toml`: which installed plugin is live per world ([`Active`]); a world it
//!   does not name runs what the gateway config says (`[policies.*]`, else the default).
//!
//! Every file is written to a hidden temporary (`.NAME.*.tmp`) in the same directory and
//! renamed into place, so a reader (the gateway's reload) sees either the old or the new
//! file, never half of one; the manifest is written after the component, and a reload
//! checks the component's sha256 against it, so a reload racing an install sees the old
//! plugin or a mismatch (and keeps the running set), never a mix. The precompiled
//! artifact lives in wasmtime's compilation cache (see `helexa-policy-runtime`), keyed by
//! the component's bytes: an install compiles into it, the gateway's load then only
//! deserialises.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use helexa_policy_runtime::{PolicyKind, PolicyRuntime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file naming the live plugin per world.
pub const ACTIVE_FILE: &str = "active.toml";

/// Why a store operation failed; messages are complete sentences for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest or `active.toml` is not what the store writes.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A plugin name the store cannot use as a file name.
    #[error(
        "\"{0}\" is not a valid plugin name: use 1-64 characters a-z, 0-9, '-' or '_', starting with a letter or digit"
    )]
    BadName(String),
    /// No plugin of that name is installed.
    #[error("no plugin \"{0}\" is installed (see `helexa plugin list`)")]
    NotInstalled(String),
    /// The bytes do not have the checksum the operator expected.
    #[error(
        "checksum mismatch: expected sha256 {expected}, the file has {actual}; refusing to install"
    )]
    Checksum {
        /// What `--sha256` said.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The component is not a policy this gateway can run (wrong world, WIT version, or
    /// not a component at all).
    #[error("refusing to install: {0}")]
    Refused(String),
    /// `use NAME --as KIND` for a plugin of another world.
    #[error("plugin \"{name}\" is {is}, not {wanted}")]
    WrongWorld {
        /// The plugin.
        name: String,
        /// Its world.
        is: PolicyKind,
        /// The world asked for.
        wanted: PolicyKind,
    },
}

/// What the store knows about one installed plugin (`NAME.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name (also its file stem).
    pub name: String,
    /// Its version label (`--plugin-version`, else `0.0.0+sha.` and 12 hex digits of its hash).
    pub version: String,
    /// The world it implements.
    pub world: PolicyKind,
    /// The `helexa:policy` WIT version it exports.
    pub wit_version: String,
    /// Hex sha256 of `NAME.wasm`.
    pub sha256: String,
    /// Where it was installed from (a path or URL).
    pub source: String,
    /// When it was installed, seconds since the Unix epoch.
    pub installed_at: u64,
}

/// `active.toml`: the live plugin of each world, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Active {
    /// The router.
    pub router: Option<String>,
    /// The evictor.
    pub evictor: Option<String>,
    /// The translator.
    pub translator: Option<String>,
}

impl Active {
    /// The plugin named for `kind`.
    pub fn get(&self, kind: PolicyKind) -> Option<&str> {
        match kind {
            PolicyKind::Router => self.router.as_deref(),
            PolicyKind::Evictor => self.evictor.as_deref(),
            PolicyKind::Translator => self.translator.as_deref(),
        }
    }

    fn slot(&mut self, kind: PolicyKind) -> &mut Option<String> {
        match kind {
            PolicyKind::Router => &mut self.router,
            PolicyKind::Evictor => &mut self.evictor,
            PolicyKind::Translator => &mut self.translator,
        }
    }
}

/// What `install` needs besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct InstallRequest {
    /// Name to install under.
    pub name: String,
    /// Version label; `None` derives one from the hash.
    pub version: Option<String>,
    /// Where the bytes came from (recorded in the manifest).
    pub source: String,
    /// The hex sha256 the operator expects; a mismatch refuses the install.
    pub sha256: Option<String>,
}

/// A plugin store directory.
#[derive(Debug, Clone)]
pub struct PluginStore {
    dir: PathBuf,
}

impl PluginStore {
    /// The store at `dir` (created on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PluginStore { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `NAME.wasm`.
    pub fn wasm_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    /// Validate `bytes` (a component of a supported world and WIT version), compile it
    /// into the runtime's cache, and write it with its manifest. Blocking (compiles).
    pub fn install(
        &self,
        runtime: &PolicyRuntime,
        bytes: &[u8],
        request: &InstallRequest,
    ) -> Result<Manifest, StoreError> {
        check_name(&request.name)?;
        let sha256 = sha256_hex(bytes);
        if let Some(expected) = &request.sha256
            && !expected.trim().eq_ignore_ascii_case(&sha256)
        {
            return Err(StoreError::Checksum {
                expected: expected.trim().to_ascii_lowercase(),
                actual: sha256,
            });
        }
        let info = runtime
            .inspect(&request.name, bytes, None)
            .map_err(|e| StoreError::Refused(refusal(&request.name, e)))?;
        let manifest = Manifest {
            name: request.name.clone(),
            version: request
                .version
                .clone()
                .unwrap_or_else(|| format!("0.0.0+sha.{}", &sha256[..12])),
            world: info.kind,
            wit_version: info.wit_version,
            sha256,
            source: request.source.clone(),
            installed_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        self.write_plugin(bytes, &manifest)?;
        Ok(manifest)
    }

    /// Write a validated plugin: component first, manifest second (see the module doc).
    pub fn write_plugin(&self, bytes: &[u8], manifest: &Manifest) -> Result<(), StoreError> {
        check_name(&manifest.name)?;
        let text = toml::to_string(manifest).map_err(|e| StoreError::Corrupt {
            path: self.manifest_path(&manifest.name).display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&self.wasm_path(&manifest.name), bytes)?;
        write_atomic(&self.manifest_path(&manifest.name), text.as_bytes())
    }

    /// Every installed plugin, by name.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io(&self.dir, source)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io(&self.dir, e))?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "toml")
                && path.file_name().is_some_and(|n| n != ACTIVE_FILE)
                && !stem.starts_with('.')
            {
                out.push(self.get(stem)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The manifest of `name`.
    pub fn get(&self, name: &str) -> Result<Manifest, StoreError> {
        check_name(name)?;
        let path = self.manifest_path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotInstalled(name.to_owned()));
            }
            Err(source) => return Err(io(&path, source)),
        };
        let manifest: Manifest = toml::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            message: e.message().to_owned(),
        })?;
        if manifest.name != name {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                message: format!("names plugin \"{}\", not \"{name}\"", manifest.name),
            });
        }
        Ok(manifest)
    }

    /// The component of `manifest`, checked against its recorded sha256.
    pub fn read_wasm(&self, manifest: &Manifest) -> Result<Vec<u8>, StoreError> {
        let path = self.wasm_path(&manifest.name);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let actual = sha256_hex(&bytes);
        if actual != manifest.sha256 {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                message: format!(
                    "sha256 is {actual} but the manifest records {}; reinstall the plugin",
                    manifest.sha256
                ),
            });
        }
        Ok(bytes)
    }

    /// Delete `name` (and make its world fall back to the configured policy if it was live).
    pub fn remove(&self, name: &str) -> Result<Manifest, StoreError> {
        let manifest = self.get(name)?;
        let mut active = self.active()?;
        if active.get(manifest.world) == Some(name) {
            *active.slot(manifest.world) = None;
            self.write_active(&active)?;
        }
        // Manifest first: without it the plugin is not installed, whatever remains.
        for path in [self.manifest_path(name), self.wasm_path(name)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(io(&path, source)),
            }
        }
        Ok(manifest)
    }

    /// `active.toml` (empty when absent).
    pub fn active(&self) -> Result<Active, StoreError> {
        let path = self.dir.join(ACTIVE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                message: e.message().to_owned(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Active::default()),
            Err(source) => Err(io(&path, source)),
        }
    }

    /// Make `name` the live plugin of `kind` (`None`: back to the configured policy).
    pub fn set_active(&self, kind: PolicyKind, name: Option<&str>) -> Result<(), StoreError> {
        if let Some(name) = name {
            let manifest = self.get(name)?;
            if manifest.world != kind {
                return Err(StoreError::WrongWorld {
                    name: name.to_owned(),
                    is: manifest.world,
                    wanted: kind,
                });
            }
        }
        let mut active = self.active()?;
        *active.slot(kind) = name.map(str::to_owned);
        self.write_active(&active)
    }

    fn write_active(&self, active: &Active) -> Result<(), StoreError> {
        let path = self.dir.join(ACTIVE_FILE);
        let text = toml::to_string(active).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&path, text.as_bytes())
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Refuse names that are not safe file stems (no paths, no hidden files, no `active`).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "active"
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_owned()))
    }
}

/// A store name derived from a file name or URL path: its stem, lower-cased, with other
/// characters replaced by `-`.
pub fn name_from_source(source: &str) -> String {
    let last = source
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(source);
    let last = last.split(['?', '#']).next().unwrap_or(last);
    let stem = last.strip_suffix(".wasm").unwrap_or(last);
    stem.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches(['-', '_'])
        .to_owned()
}

/// The runtime's refusal in the words of an install (the plugin has no version yet).
fn refusal(name: &str, error: helexa_policy_runtime::Error) -> String {
    use helexa_policy_runtime::Error;
    match error {
        Error::Incompatible { message, .. } => format!("plugin \"{name}\": {message}"),
        Error::Compile { source, .. } => {
            format!("plugin \"{name}\" is not a valid WebAssembly component: {source:#}")
        }
        other => other.to_string(),
    }
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Write `bytes` to `path` through a hidden temporary in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("plugin");
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_derived() {
        assert!(check_name("pin-router_2").is_ok());
        for bad in ["", "../x", ".hidden", "Upper", "a b", "active", "-x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(name_from_source("/tmp/My Router.wasm"), "my-router");
        assert_eq!(
            name_from_source("https://example.com/p/router.wasm?x=1"),
            "router"
        );
    }

    #[test]
    fn active_round_trips_and_remove_deactivates() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::new(dir.path());
        let manifest = Manifest {
            name: "r".into(),
            version: "1".into(),
            world: PolicyKind::Router,
            wit_version: "0.1.0".into(),
            sha256: sha256_hex(b"x"),
            source: "test".into(),
            installed_at: 0,
        };
        store.write_plugin(b"x", &manifest).unwrap();
        assert_eq!(store.list().unwrap(), vec![manifest.clone()]);
        assert!(matches!(
            store.set_active(PolicyKind::Evictor, Some("r")),
            Err(StoreError::WrongWorld { .. })
        ));
        store.set_active(PolicyKind::Router, Some("r")).unwrap();
        assert_eq!(store.active().unwrap().get(PolicyKind::Router), Some("r"));
        assert_eq!(store.read_wasm(&manifest).unwrap(), b"x");
        std::fs::write(store.wasm_path("r"), b"y").unwrap();
        assert!(matches!(
            store.read_wasm(&manifest),
            Err(StoreError::Corrupt { .. })
        ));
        store.remove("r").unwrap();
        assert_eq!(store.active().unwrap(), Active::default());
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(store.get("r"), Err(StoreError::NotInstalled(_))));
    }
}
