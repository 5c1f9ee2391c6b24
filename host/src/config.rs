//! Gateway configuration: a raw serde layer (`deny_unknown_fields`, so a typo is an
//! error rather than a silently ignored setting) validated into [`Config`], whose values
//! are resolved and ready to use (addresses parsed, key secrets read from the
//! environment, paths made absolute).
//!
//! Precedence is flag > `HELEXA_*` environment variable > file > default. Flags and their
//! environment variables (`HELEXA_LISTEN`, `HELEXA_METRICS_LISTEN`) are merged by clap
//! and arrive here as [`Overrides`].
//!
//! ```toml
//! listen = "127.0.0.1:31313"
//! models = "models.toml"
//! [[nodes]]
//! name = "gpu-a"
//! endpoint = "http://10.0.0.5:13131"
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use helexa_policy_runtime::{FailPolicy, PluginOptions};
use serde::Deserialize;

/// Default API listen address (as the original gateway).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:31313";
/// Default metrics listen address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:31314";

/// Why a configuration or catalogue file was refused. The message names the file and
/// what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown / mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The file parsed but a value is unacceptable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl ConfigError {
    /// The message without the leading file path (for golden tests and terse logs).
    pub fn detail(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => format!("cannot read: {source}"),
            ConfigError::Parse { message, .. } | ConfigError::Invalid { message, .. } => {
                message.clone()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw layer
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    models: Option<PathBuf>,
    poll_interval_ms: Option<u64>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    policies: RawPolicies,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    dir: Option<PathBuf>,
    watch: Option<bool>,
    debounce_ms: Option<u64>,
    deadline_ms: Option<u64>,
    translate_deadline_ms: Option<u64>,
    memory_mb: Option<u64>,
    on_failure: Option<FailPolicy>,
    #[serde(default)]
    settings: BTreeMap<String, toml::Table>,
    #[serde(default)]
    limits: BTreeMap<String, RawPluginLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPluginLimits {
    deadline_ms: Option<u64>,
    memory_mb: Option<u64>,
    on_failure: Option<FailPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    key: Option<String>,
    key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    endpoint: String,
    #[serde(default)]
    labels: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicies {
    cache_dir: Option<PathBuf>,
    router: Option<RawPolicy>,
    evictor: Option<RawPolicy>,
    translator: Option<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    plugin: Option<PathBuf>,
    version: Option<String>,
    #[serde(default)]
    settings: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    key: Option<String>,
    key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    connect_timeout_secs: Option<u64>,
    stall_timeout_secs: Option<u64>,
    load_timeout_secs: Option<u64>,
    queue_budget_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    max_body_mb: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// Validated layer
// ---------------------------------------------------------------------------------------

/// Values given on the command line (or through their `HELEXA_*` variables); they win
/// over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `HELEXA_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--metrics-listen` / `HELEXA_METRICS_LISTEN`.
    pub metrics_listen: Option<SocketAddr>,
}

/// The validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// API listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address.
    pub metrics_listen: SocketAddr,
    /// The model catalogue file (absolute); `None` = empty catalogue.
    pub models: Option<PathBuf>,
    /// How often each node is polled.
    pub poll_interval: Duration,
    /// The fleet, in configuration order.
    pub nodes: Vec<NodeConfig>,
    /// Which policy plugins to run.
    pub policies: PoliciesConfig,
    /// API keys; empty = authentication off.
    pub auth: AuthConfig,
    /// Proxy timeouts and limits.
    pub proxy: ProxyConfig,
    /// The plugin store, its watcher and per-plugin settings and limits.
    pub plugins: PluginsConfig,
    /// The admin API's key (`[admin] key` / `key_env`); `None` = admin API disabled.
    pub admin: AdminConfig,
}

/// `[plugins]`: where installed plugins live and how each is run.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginsConfig {
    /// The plugin store (absolute); default `$XDG_DATA_HOME/helexa/plugins` or
    /// `~/.local/share/helexa/plugins`.
    pub dir: PathBuf,
    /// Reload when the store changes (default true).
    pub watch: bool,
    /// Quiet period after the last change before reloading (default 200 ms).
    pub debounce: Duration,
    /// Default deadline of a router or evictor call (default 20 ms).
    pub deadline: Duration,
    /// Default deadline of a translator call (default 200 ms).
    pub translate_deadline: Duration,
    /// Default memory cap of an instance, bytes (default 64 MiB).
    pub max_memory_bytes: usize,
    /// Default fail policy (default `fallback`).
    pub on_failure: FailPolicy,
    /// Per plugin (by name): its settings and limits.
    pub each: BTreeMap<String, PluginSettings>,
}

/// `[plugins.settings.NAME]` and `[plugins.limits.NAME]` of one plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSettings {
    /// The settings table as JSON text (what `configure` receives).
    pub settings_json: String,
    /// Deadline, memory cap and fail policy.
    pub options: PluginOptions,
}

impl PluginsConfig {
    /// The settings JSON of plugin `name` (`{}` without a `[plugins.settings.NAME]`).
    pub fn settings_json(&self, name: &str) -> String {
        self.each
            .get(name)
            .map_or_else(|| "{}".to_owned(), |p| p.settings_json.clone())
    }

    /// The limits and fail policy of plugin `name` (the `[plugins]` defaults, overridden
    /// by `[plugins.limits.NAME]`).
    pub fn options(&self, name: &str) -> PluginOptions {
        self.each
            .get(name)
            .map_or_else(|| self.default_options(), |p| p.options.clone())
    }

    fn default_options(&self) -> PluginOptions {
        PluginOptions {
            deadline: None,
            max_memory_bytes: Some(self.max_memory_bytes),
            on_failure: self.on_failure,
        }
    }

    /// The runtime's limits: the defaults, with the memory ceiling raised to the largest
    /// per-plugin cap (the pooling allocator reserves slots of that size).
    pub fn runtime_limits(&self) -> helexa_policy_runtime::Limits {
        let ceiling = self
            .each
            .values()
            .filter_map(|p| p.options.max_memory_bytes)
            .fold(self.max_memory_bytes, usize::max);
        helexa_policy_runtime::Limits {
            call_deadline: self.deadline,
            translate_deadline: self.translate_deadline,
            max_memory_bytes: ceiling,
        }
    }

    /// The default store directory: `$XDG_DATA_HOME/helexa/plugins`, else
    /// `~/.local/share/helexa/plugins`, else `./helexa-plugins`.
    pub fn default_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
        env("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".local/share")))
            .map_or_else(
                || PathBuf::from("helexa-plugins"),
                |base| base.join("helexa").join("plugins"),
            )
    }
}

/// The admin API key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// The secret admin clients send as `Authorization: Bearer`.
    pub key: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// One node of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Unique name (routers and `pinned_on` refer to it).
    pub name: String,
    /// Base URL without a trailing slash, e.g. `http://10.0.0.5:13131`.
    pub endpoint: String,
    /// Operator labels passed to the router.
    pub labels: Vec<String>,
}

/// The policy of each kind.
#[derive(Debug, Clone, Default)]
pub struct PoliciesConfig {
    /// Where compiled policy components are cached (absolute); `None` = the user's cache
    /// directory (`$XDG_CACHE_HOME/helexa/policies` or `~/.cache/helexa/policies`).
    pub cache_dir: Option<PathBuf>,
    /// Router.
    pub router: PolicyConfig,
    /// Evictor.
    pub evictor: PolicyConfig,
    /// Translator.
    pub translator: PolicyConfig,
}

/// One policy: a plugin component or the built-in default.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Path of a `.wasm` component (absolute); `None` = the embedded default.
    pub plugin: Option<PathBuf>,
    /// Version label used in logs and metrics.
    pub version: String,
    /// The `settings` table as JSON text (what the component's `configure` receives).
    pub settings_json: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            plugin: None,
            version: "builtin".to_owned(),
            settings_json: "{}".to_owned(),
        }
    }
}

/// API keys.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// The accepted keys.
    pub keys: Vec<ApiKey>,
}

impl std::fmt::Debug for AuthConfig {
    // Never print secrets, not even in a debug dump of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("AuthConfig").field("keys", &names).finish()
    }
}

/// One API key: its name is the caller identity, the secret is what clients send.
#[derive(Clone)]
pub struct ApiKey {
    /// Caller identity passed to the router (never the secret).
    pub name: String,
    /// The secret.
    pub secret: String,
}

/// Proxy timeouts and limits.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// TCP connect timeout to a node.
    pub connect_timeout: Duration,
    /// Longest silence between two chunks of a node's streamed response before it
    /// counts as stalled (a read timeout, not a cap on the whole response). Non-streamed
    /// requests are not cut by it: the node sends nothing until the answer is complete.
    pub stall_timeout: Duration,
    /// Longest a `POST /models/load` may take (downloads can be slow).
    pub load_timeout: Duration,
    /// How long a request may wait in total for a model that is loading.
    pub queue_budget: Duration,
    /// Silence after which a translated stream sends keep-alive events.
    pub keepalive_interval: Duration,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(120),
            load_timeout: Duration::from_secs(900),
            queue_budget: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            max_body_bytes: 32 << 20,
        }
    }
}

impl Config {
    /// Read and validate `path`; `env` looks up environment variables (for `key_env`).
    pub fn load(
        path: &Path,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, &path.display().to_string(), base, overrides, env)
    }

    /// Validate TOML `text`; `origin` names it in errors, relative paths resolve
    /// against `base_dir`.
    pub fn from_toml(
        text: &str,
        origin: &str,
        base_dir: &Path,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned() + &span_hint(text, e.span()),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };

        let listen = match overrides.listen {
            Some(addr) => addr,
            None => parse_addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN))
                .map_err(invalid)?,
        };
        let metrics_listen = match overrides.metrics_listen {
            Some(addr) => addr,
            None => parse_addr(
                "metrics_listen",
                raw.metrics_listen
                    .as_deref()
                    .unwrap_or(DEFAULT_METRICS_LISTEN),
            )
            .map_err(invalid)?,
        };
        if listen == metrics_listen {
            return Err(invalid(format!(
                "listen and metrics_listen are both {listen}; give the metrics their own port"
            )));
        }

        let poll_interval = Duration::from_millis(raw.poll_interval_ms.unwrap_or(1000));
        if poll_interval.is_zero() {
            return Err(invalid("poll_interval_ms must be at least 1".to_owned()));
        }

        if raw.nodes.is_empty() {
            return Err(invalid(
                "no [[nodes]] configured; add at least one `[[nodes]]` with `name` and `endpoint`"
                    .to_owned(),
            ));
        }
        let mut names = HashSet::new();
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for node in raw.nodes {
            if node.name.trim().is_empty() {
                return Err(invalid("a [[nodes]] entry has an empty name".to_owned()));
            }
            if !names.insert(node.name.clone()) {
                return Err(invalid(format!(
                    "node name \"{}\" is used twice",
                    node.name
                )));
            }
            let endpoint = parse_endpoint(&node.endpoint).map_err(|m| {
                invalid(format!(
                    "node \"{}\": endpoint \"{}\" {m}",
                    node.name, node.endpoint
                ))
            })?;
            nodes.push(NodeConfig {
                name: node.name,
                endpoint,
                labels: node.labels,
            });
        }

        let policies = PoliciesConfig {
            cache_dir: raw.policies.cache_dir.map(|dir| base_dir.join(dir)),
            router: policy(raw.policies.router, "router", base_dir).map_err(invalid)?,
            evictor: policy(raw.policies.evictor, "evictor", base_dir).map_err(invalid)?,
            translator: policy(raw.policies.translator, "translator", base_dir).map_err(invalid)?,
        };

        let mut keys = Vec::with_capacity(raw.auth.keys.len());
        let mut key_names = HashSet::new();
        for key in raw.auth.keys {
            if key.name.trim().is_empty() {
                return Err(invalid(
                    "an [[auth.keys]] entry has an empty name".to_owned(),
                ));
            }
            if !key_names.insert(key.name.clone()) {
                return Err(invalid(format!(
                    "auth key name \"{}\" is used twice",
                    key.name
                )));
            }
            let secret = match (key.key, key.key_env) {
                (Some(secret), None) => secret,
                (None, Some(var)) => env(&var).ok_or_else(|| {
                    invalid(format!(
                        "auth key \"{}\": environment variable {var} (key_env) is not set",
                        key.name
                    ))
                })?,
                _ => {
                    return Err(invalid(format!(
                        "auth key \"{}\": set exactly one of `key` or `key_env`",
                        key.name
                    )));
                }
            };
            if secret.len() < 8 {
                return Err(invalid(format!(
                    "auth key \"{}\": the secret is shorter than 8 characters",
                    key.name
                )));
            }
            keys.push(ApiKey {
                name: key.name,
                secret,
            });
        }

        let defaults = ProxyConfig::default();
        let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
        let proxy = ProxyConfig {
            connect_timeout: secs(raw.proxy.connect_timeout_secs, defaults.connect_timeout),
            stall_timeout: secs(raw.proxy.stall_timeout_secs, defaults.stall_timeout),
            load_timeout: secs(raw.proxy.load_timeout_secs, defaults.load_timeout),
            queue_budget: secs(raw.proxy.queue_budget_secs, defaults.queue_budget),
            keepalive_interval: secs(raw.proxy.keepalive_secs, defaults.keepalive_interval),
            max_body_bytes: raw
                .proxy
                .max_body_mb
                .map(|mb| (mb as usize).saturating_mul(1 << 20))
                .unwrap_or(defaults.max_body_bytes),
        };
        for (name, value) in [
            ("connect_timeout_secs", proxy.connect_timeout),
            ("stall_timeout_secs", proxy.stall_timeout),
            ("load_timeout_secs", proxy.load_timeout),
            ("keepalive_secs", proxy.keepalive_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(format!("[proxy] {name} must be at least 1")));
            }
        }
        if proxy.max_body_bytes == 0 {
            return Err(invalid("[proxy] max_body_mb must be at least 1".to_owned()));
        }

        let plugins = plugins_config(raw.plugins, base_dir, env).map_err(invalid)?;
        let admin = AdminConfig {
            key: match (raw.admin.key, raw.admin.key_env) {
                (None, None) => None,
                (Some(key), None) => Some(key),
                (None, Some(var)) => Some(env(&var).ok_or_else(|| {
                    invalid(format!(
                        "[admin] key_env: environment variable {var} is not set"
                    ))
                })?),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "[admin]: set only one of `key` or `key_env`".to_owned(),
                    ));
                }
            },
        };
        if admin.key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err(invalid(
                "[admin] the key is shorter than 16 characters".to_owned(),
            ));
        }

        Ok(Config {
            listen,
            metrics_listen,
            models: raw.models.map(|p| base_dir.join(p)),
            poll_interval,
            nodes,
            policies,
            auth: AuthConfig { keys },
            proxy,
            plugins,
            admin,
        })
    }
}

fn parse_addr(field: &str, value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("{field} = \"{value}\" is not an IP address with a port (e.g. \"127.0.0.1:31313\")")
    })
}

fn parse_endpoint(value: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("is not a URL ({e})"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("must start with http:// or https://".to_owned());
    }
    if url.host_str().is_none() {
        return Err("has no host".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".to_owned());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn policy(raw: Option<RawPolicy>, kind: &str, base: &Path) -> Result<PolicyConfig, String> {
    let Some(raw) = raw else {
        return Ok(PolicyConfig::default());
    };
    let settings_json = serde_json::to_string(&raw.settings)
        .map_err(|e| format!("[policies.{kind}] settings cannot be expressed as JSON: {e}"))?;
    let plugin = raw.plugin.map(|p| base.join(p));
    if let Some(path) = &plugin
        && path.extension().and_then(|e| e.to_str()) != Some("wasm")
    {
        return Err(format!(
            "[policies.{kind}] plugin = \"{}\" is not a .wasm component",
            path.display()
        ));
    }
    let version = raw.version.unwrap_or_else(|| {
        if plugin.is_some() {
            "local".to_owned()
        } else {
            "builtin".to_owned()
        }
    });
    Ok(PolicyConfig {
        plugin,
        version,
        settings_json,
    })
}

fn plugins_config(
    raw: RawPlugins,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PluginsConfig, String> {
    let ms = |field: &str, value: Option<u64>, default: u64| match value.unwrap_or(default) {
        0 => Err(format!("[plugins] {field} must be at least 1")),
        v => Ok(Duration::from_millis(v)),
    };
    let mb = |field: &str, value: u64| match value {
        0 => Err(format!("{field} must be at least 1")),
        v if v > 4096 => Err(format!("{field} = {v} is more than 4096 MiB")),
        v => Ok((v as usize) << 20),
    };
    let max_memory_bytes = mb("[plugins] memory_mb", raw.memory_mb.unwrap_or(64))?;
    let on_failure = raw.on_failure.unwrap_or_default();
    let mut each: BTreeMap<String, PluginSettings> = BTreeMap::new();
    let names: std::collections::BTreeSet<&String> =
        raw.settings.keys().chain(raw.limits.keys()).collect();
    for name in names {
        let settings_json = match raw.settings.get(name) {
            Some(table) => serde_json::to_string(table).map_err(|e| {
                format!("[plugins.settings.{name}] cannot be expressed as JSON: {e}")
            })?,
            None => "{}".to_owned(),
        };
        let limits = raw.limits.get(name);
        let deadline = match limits.and_then(|l| l.deadline_ms) {
            Some(0) => {
                return Err(format!(
                    "[plugins.limits.{name}] deadline_ms must be at least 1"
                ));
            }
            other => other.map(Duration::from_millis),
        };
        let max_memory_bytes = match limits.and_then(|l| l.memory_mb) {
            Some(v) => mb(&format!("[plugins.limits.{name}] memory_mb"), v)?,
            None => max_memory_bytes,
        };
        each.insert(
            name.clone(),
            PluginSettings {
                settings_json,
                options: PluginOptions {
                    deadline,
                    max_memory_bytes: Some(max_memory_bytes),
                    on_failure: limits.and_then(|l| l.on_failure).unwrap_or(on_failure),
                },
            },
        );
    }
    Ok(PluginsConfig {
        dir: raw
            .dir
            .map_or_else(|| PluginsConfig::default_dir(env), |d| base.join(d)),
        watch: raw.watch.unwrap_or(true),
        debounce: ms("debounce_ms", raw.debounce_ms, 200)?,
        deadline: ms("deadline_ms", raw.deadline_ms, 20)?,
        translate_deadline: ms("translate_deadline_ms", raw.translate_deadline_ms, 200)?,
        max_memory_bytes,
        on_failure,
        each,
    })
}

/// ` (line L, column C)` for a parse error span, so messages point at the mistake.
pub(crate) fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = "[[nodes]]\nname = \"a\"\nendpoint = \"http://127.0.0.1:13131/\"\n";

    #[test]
    fn defaults_apply_and_endpoint_loses_trailing_slash() {
        let c = Config::from_toml(
            MINIMAL,
            "t",
            Path::new("/etc"),
            &Overrides::default(),
            &no_env,
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(c.nodes[0].endpoint, "http://127.0.0.1:13131");
        assert!(c.auth.keys.is_empty());
        assert_eq!(c.policies.router.settings_json, "{}");
    }

    #[test]
    fn flag_beats_file() {
        let text = format!("listen = \"127.0.0.1:1\"\n{MINIMAL}");
        let over = Overrides {
            listen: Some("0.0.0.0:9".parse().unwrap()),
            metrics_listen: None,
        };
        let c = Config::from_toml(&text, "t", Path::new("."), &over, &no_env).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9");
        let c =
            Config::from_toml(&text, "t", Path::new("."), &Overrides::default(), &no_env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1");
    }

    #[test]
    fn plugins_settings_limits_and_admin_key_resolve() {
        let text = format!(
            "{MINIMAL}[admin]\nkey_env = \"ADMIN\"\n[plugins]\ndir = \"store\"\nmemory_mb = 32\n\
             [plugins.settings.pin]\nnode = \"b\"\n\
             [plugins.limits.pin]\ndeadline_ms = 5\nmemory_mb = 128\non_failure = \"reject\"\n"
        );
        let env = |v: &str| (v == "ADMIN").then(|| "admin-0123456789abcdef".to_owned());
        let c = Config::from_toml(&text, "t", Path::new("/etc/h"), &Overrides::default(), &env)
            .unwrap();
        assert_eq!(c.admin.key.as_deref(), Some("admin-0123456789abcdef"));
        assert!(!format!("{:?}", c.admin).contains("admin-0123"));
        assert_eq!(c.plugins.dir, Path::new("/etc/h/store"));
        assert_eq!(c.plugins.settings_json("pin"), r#"{"node":"b"}"#);
        assert_eq!(c.plugins.settings_json("other"), "{}");
        let pin = c.plugins.options("pin");
        assert_eq!(pin.deadline, Some(Duration::from_millis(5)));
        assert_eq!(pin.max_memory_bytes, Some(128 << 20));
        assert_eq!(pin.on_failure, FailPolicy::Reject);
        let other = c.plugins.options("other");
        assert_eq!(
            (other.max_memory_bytes, other.on_failure),
            (Some(32 << 20), FailPolicy::Fallback)
        );
        // The engine ceiling is the largest cap.
        assert_eq!(c.plugins.runtime_limits().max_memory_bytes, 128 << 20);

        let default_dir = PluginsConfig::default_dir(&|v| (v == "HOME").then(|| "/home/u".into()));
        assert_eq!(
            default_dir,
            Path::new("/home/u/.local/share/helexa/plugins")
        );
        let bad = format!("{MINIMAL}[plugins.limits.x]\ndeadline_ms = 0\n");
        let e = Config::from_toml(&bad, "t", Path::new("."), &Overrides::default(), &no_env)
            .unwrap_err();
        assert!(
            e.to_string().contains("[plugins.limits.x] deadline_ms"),
            "{e}"
        );
    }

    #[test]
    fn key_env_is_resolved() {
        let text = format!("{MINIMAL}[auth]\nkeys = [{{ name = \"ci\", key_env = \"K\" }}]\n");
        let env = |v: &str| (v == "K").then(|| "secret-123".to_owned());
        let c = Config::from_toml(&text, "t", Path::new("."), &Overrides::default(), &env).unwrap();
        assert_eq!(c.auth.keys[0].secret, "secret-123");
        assert!(!format!("{:?}", c.auth).contains("secret-123"));
    }
}
