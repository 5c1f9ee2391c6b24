//! The model catalogue (`models.toml`): which models the gateway may serve, where their
//! weights come from and what they need. Reloadable: [`CatalogueStore::reload`] validates
//! the file again and swaps it in atomically (a bad file keeps the previous catalogue).
//!
//! ```toml
//! [[models]]
//! id = "qwen3-8b"
//! source = "Qwen/Qwen3-8B-GGUF"
//! quant = "Q4_K_M"
//! vram_mb = 7000
//! aliases = ["gpt-4o-mini", "claude-*-opus-*", "claude-opus-*"]
//! ```
//!
//! An alias with `*` is a glob: `claude-opus-*` serves every dated Claude Opus name, so
//! Claude Code pointed at helexa (`ANTHROPIC_BASE_URL`) finds a model whatever it asks for.
//! Exact ids and aliases win over globs; among globs the most specific wins.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::config::{ConfigError, span_hint};
use crate::policy::{Catalogue, CatalogueEntry};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    source: String,
    quant: Option<String>,
    dtype: Option<String>,
    vram_mb: u64,
    min_devices: Option<u32>,
    min_device_vram_mb: Option<u64>,
    #[serde(default)]
    pinned_on: Vec<String>,
    residency_priority: Option<u32>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    context_length: Option<u32>,
}

/// One validated catalogue model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Canonical id, also the id the node serves it under.
    pub id: String,
    /// Local path or Hugging Face repo id.
    pub source: String,
    /// GGUF quantisation file to pick, if any.
    pub quant: Option<String>,
    /// Compute dtype for safetensors weights.
    pub dtype: Option<String>,
    /// VRAM needed once loaded, MiB.
    pub vram_mb: u64,
    /// Fewest devices.
    pub min_devices: u32,
    /// Least total VRAM per device, MiB.
    pub min_device_vram_mb: u64,
    /// Only these nodes may host it (empty = any).
    pub pinned_on: Vec<String>,
    /// Residency class, if set.
    pub residency_priority: Option<u32>,
    /// Other names.
    pub aliases: Vec<String>,
    /// `chat`, `completion`, `tools`, `reasoning`, ...
    pub capabilities: Vec<String>,
    /// Context length in tokens (0 = the model's own).
    pub context_length: u32,
}

impl ModelSpec {
    /// The policy view of this model.
    pub fn entry(&self) -> CatalogueEntry {
        CatalogueEntry {
            id: self.id.clone(),
            aliases: self.aliases.clone(),
            vram_mb: self.vram_mb,
            min_devices: self.min_devices,
            min_device_vram_mb: self.min_device_vram_mb,
            pinned_on: self.pinned_on.clone(),
            residency_priority: self.residency_priority,
            context_length: self.context_length,
        }
    }

    /// Effective residency class (100, or 1000 when pinned), as the WIT contract defines.
    pub fn effective_priority(&self) -> u32 {
        self.residency_priority
            .unwrap_or(if self.pinned_on.is_empty() { 100 } else { 1000 })
    }
}

/// A validated catalogue: the specs and the policy view built from them.
#[derive(Debug, Clone, Default)]
pub struct LoadedCatalogue {
    /// Models in file order.
    pub specs: Vec<ModelSpec>,
    /// The same as policy types, versioned.
    pub policy: Arc<Catalogue>,
}

impl LoadedCatalogue {
    /// Find a model by id, exact alias, or else glob alias ([`LoadedCatalogue::find_by_pattern`]).
    pub fn find(&self, name: &str) -> Option<&ModelSpec> {
        self.specs
            .iter()
            .find(|m| m.id == name)
            .or_else(|| {
                self.specs
                    .iter()
                    .find(|m| m.aliases.iter().any(|a| a == name))
            })
            .or_else(|| self.find_by_pattern(name))
    }

    /// The model one of whose glob aliases (`*` = any run of characters, e.g.
    /// `claude-*-opus-*`) matches `name`; when several match, the most specific pattern
    /// (most literal characters) wins, then file order. Exact ids and aliases are not
    /// consulted: callers use this to learn that a name needs rewriting to the model's id,
    /// because router policies only match ids and exact aliases.
    pub fn find_by_pattern(&self, name: &str) -> Option<&ModelSpec> {
        let mut best: Option<(usize, &ModelSpec)> = None;
        for spec in &self.specs {
            for alias in spec.aliases.iter().filter(|a| a.contains('*')) {
                let literal = alias.chars().filter(|c| *c != '*').count();
                if glob_match(alias, name) && best.is_none_or(|(l, _)| literal > l) {
                    best = Some((literal, spec));
                }
            }
        }
        best.map(|(_, spec)| spec)
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none
/// included) and everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let middle: Vec<&str> = parts.collect();
    let Some((last, middle)) = middle.split_last() else {
        // No `*`: the whole name must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Parse and validate a catalogue. `nodes` are the configured node names (`pinned_on`
/// must name one of them).
pub fn parse(text: &str, origin: &str, nodes: &[String]) -> Result<Vec<ModelSpec>, ConfigError> {
    let raw: RawCatalogue = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: e.message().to_owned() + &span_hint(text, e.span()),
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: origin.to_owned(),
        message,
    };
    let mut names: HashSet<String> = HashSet::new();
    let mut specs = Vec::with_capacity(raw.models.len());
    for m in raw.models {
        if m.id.is_empty() || m.id.chars().any(char::is_whitespace) {
            return Err(invalid(format!(
                "model id \"{}\" must be non-empty without spaces",
                m.id
            )));
        }
        for name in std::iter::once(&m.id).chain(&m.aliases) {
            if !names.insert(name.clone()) {
                return Err(invalid(format!(
                    "model \"{}\": the name \"{name}\" is already used by another model id or alias",
                    m.id
                )));
            }
        }
        if m.source.trim().is_empty() {
            return Err(invalid(format!("model \"{}\": source is empty", m.id)));
        }
        if m.vram_mb == 0 {
            return Err(invalid(format!(
                "model \"{}\": vram_mb must be greater than 0",
                m.id
            )));
        }
        let min_devices = m.min_devices.unwrap_or(1);
        if min_devices == 0 {
            return Err(invalid(format!(
                "model \"{}\": min_devices must be at least 1",
                m.id
            )));
        }
        if let Some(dtype) = &m.dtype
            && !["bf16", "f16", "f32"].contains(&dtype.as_str())
        {
            return Err(invalid(format!(
                "model \"{}\": dtype \"{dtype}\" is not one of bf16, f16, f32",
                m.id
            )));
        }
        for node in &m.pinned_on {
            if !nodes.iter().any(|n| n == node) {
                return Err(invalid(format!(
                    "model \"{}\": pinned_on names node \"{node}\", which is not in [[nodes]]",
                    m.id
                )));
            }
        }
        specs.push(ModelSpec {
            id: m.id,
            source: m.source,
            quant: m.quant,
            dtype: m.dtype,
            vram_mb: m.vram_mb,
            min_devices,
            min_device_vram_mb: m.min_device_vram_mb.unwrap_or(0),
            pinned_on: m.pinned_on,
            residency_priority: m.residency_priority,
            aliases: m.aliases,
            capabilities: m.capabilities,
            context_length: m.context_length.unwrap_or(0),
        });
    }
    Ok(specs)
}

/// The live catalogue, swapped atomically on reload.
#[derive(Debug)]
pub struct CatalogueStore {
    path: Option<PathBuf>,
    nodes: Vec<String>,
    version: AtomicU64,
    current: ArcSwap<LoadedCatalogue>,
}

impl CatalogueStore {
    /// Load `path` (or start empty when `None`).
    pub fn open(path: Option<PathBuf>, nodes: Vec<String>) -> Result<Self, ConfigError> {
        let store = CatalogueStore {
            path,
            nodes,
            version: AtomicU64::new(0),
            current: ArcSwap::from_pointee(LoadedCatalogue::default()),
        };
        store.reload()?;
        Ok(store)
    }

    /// A store holding `specs` (tests, `helexa up`).
    pub fn from_specs(specs: Vec<ModelSpec>) -> Self {
        let store = CatalogueStore {
            path: None,
            nodes: Vec::new(),
            version: AtomicU64::new(0),
            current: ArcSwap::from_pointee(LoadedCatalogue::default()),
        };
        store.install(specs);
        store
    }

    /// Read and validate the file again and swap it in; on error the previous catalogue
    /// stays. Returns the new version.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let specs = match &self.path {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                parse(&text, &path.display().to_string(), &self.nodes)?
            }
        };
        Ok(self.install(specs))
    }

    fn install(&self, specs: Vec<ModelSpec>) -> u64 {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        let entries = specs.iter().map(ModelSpec::entry).collect();
        self.current.store(Arc::new(LoadedCatalogue {
            specs,
            policy: Arc::new(Catalogue { version, entries }),
        }));
        version
    }

    /// The current catalogue.
    pub fn current(&self) -> Arc<LoadedCatalogue> {
        self.current.load_full()
    }

    /// The file it reloads from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_lookup_and_priority_defaults() {
        let specs = parse(
            "[[models]]\nid = \"a\"\nsource = \"x\"\nvram_mb = 1\naliases = [\"b\"]\npinned_on = [\"n\"]\n",
            "t",
            &["n".to_owned()],
        )
        .unwrap();
        let store = CatalogueStore::from_specs(specs);
        let cat = store.current();
        assert_eq!(cat.find("b").map(|m| m.id.as_str()), Some("a"));
        assert_eq!(cat.find("a").map(ModelSpec::effective_priority), Some(1000));
        assert!(cat.find("c").is_none());
        assert_eq!(cat.policy.version, 1);
    }

    #[test]
    fn glob_aliases_match_and_the_most_specific_wins() {
        assert!(glob_match("claude-*", "claude-sonnet-4-5"));
        assert!(glob_match("claude-*-opus-*", "claude-3-opus-20240229"));
        assert!(!glob_match("claude-*-opus-*", "claude-opus-4-1"));
        assert!(glob_match("*haiku*", "claude-haiku-4-5"));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
        assert!(!glob_match("gpt-4", "gpt-4o"));
        let specs = parse(
            "[[models]]\nid = \"big\"\nsource = \"x\"\nvram_mb = 1\naliases = [\"claude-opus-*\", \"claude-*-opus-*\"]\n\
             [[models]]\nid = \"small\"\nsource = \"y\"\nvram_mb = 1\naliases = [\"claude-*\", \"fast\"]\n",
            "t",
            &[],
        )
        .unwrap();
        let store = CatalogueStore::from_specs(specs);
        let cat = store.current();
        let id = |name: &str| cat.find(name).map(|m| m.id.clone());
        assert_eq!(id("claude-opus-4-1-20250805").as_deref(), Some("big"));
        assert_eq!(id("claude-3-opus-20240229").as_deref(), Some("big"));
        assert_eq!(id("claude-sonnet-4-5-20250929").as_deref(), Some("small"));
        assert_eq!(id("fast").as_deref(), Some("small"));
        assert!(cat.find_by_pattern("fast").is_none());
        assert_eq!(id("gpt-4o"), None);
    }
}
