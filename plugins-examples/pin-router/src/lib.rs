//! Example router: pins callers to parts of the fleet, with ordered fallbacks.
//!
//! A caller is recognised by the identity of its API key (`request-info.caller`, the
//! key's configured name) or by an `x-helexa-*` request header (the only headers the
//! gateway passes to routers). Each rule names an ordered list of node *selectors*; each
//! selector is one fallback tier:
//!
//! - `label:<label>` — nodes carrying that operator label from the gateway config
//!   (`node.labels`, e.g. `label:tier=gold`);
//! - `node:<pattern>` — nodes whose name matches a pattern where `*` is any run of
//!   characters (e.g. `node:h200-*`).
//!
//! Per request: resolve the model (404 if unknown); serve on a ready replica in the first
//! tier that has one (least busy first, ties by name), the remaining ready replicas of
//! that and later tiers as fallbacks; if it is loading in a tier, ask to retry; else
//! place it cold in the first tier with room (see `helexa-example-common`). A pinned
//! caller whose tiers can do none of this is refused (503) when `strict`, otherwise routed
//! over the whole fleet. Callers no rule matches use `default` tiers (the whole fleet
//! when empty).
//!
//! Settings (`[plugins.settings.<name>]` in the gateway config, as JSON):
//!
//! ```json
//! {
//!   "rules": [
//!     {"caller": "team-a", "nodes": ["label:tier=gold", "label:tier=silver"]},
//!     {"header": {"name": "x-helexa-tenant", "value": "acme"}, "nodes": ["node:acme-*"]}
//!   ],
//!   "default": ["label:tier=bronze"],
//!   "strict": false,
//!   "loading_retry_ms": 500
//! }
//! ```

use helexa_example_common::{busy, is_answering, loading, place, ready, resolve, unknown_model};
use helexa_policy_sdk::{
    CatalogueEntry, Decision, Fleet, Node, PolicyError, Rejection, RequestInfo, Router, ServePlan,
};
use serde::Deserialize;

/// Operator settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Pinning rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Tiers of callers no rule matches (the whole fleet when empty).
    #[serde(default)]
    pub default: Vec<String>,
    /// Never route a pinned caller outside its tiers.
    #[serde(default)]
    pub strict: bool,
    /// Retry hint while the model is loading in a tier, ms.
    #[serde(default = "default_loading_retry_ms")]
    pub loading_retry_ms: u32,
}

fn default_loading_retry_ms() -> u32 {
    500
}

/// One pinning rule: who (caller and/or header, all given must match) and where.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// API key identity to match.
    #[serde(default)]
    pub caller: Option<String>,
    /// Header to match.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    /// Node selectors, one fallback tier each, in order.
    pub nodes: Vec<String>,
}

/// An `x-helexa-*` header and the value it must have.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (lower-case, starting with `x-helexa-`).
    pub name: String,
    /// Exact value.
    pub value: String,
}

/// Which nodes a selector takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Nodes with this label.
    Label(String),
    /// Nodes whose name matches this `*` pattern.
    Name(String),
}

impl Selector {
    /// Parses `label:<label>` or `node:<pattern>`.
    pub fn parse(text: &str) -> Result<Selector, String> {
        match text.split_once(':') {
            Some(("label", label)) if !label.is_empty() => Ok(Selector::Label(label.to_owned())),
            Some(("node", pattern)) if !pattern.is_empty() => {
                Ok(Selector::Name(pattern.to_owned()))
            }
            _ => Err(format!(
                "node selector {text:?} must be `label:<label>` or `node:<name pattern>`"
            )),
        }
    }

    /// Whether `node` is selected.
    pub fn matches(&self, node: &Node) -> bool {
        match self {
            Selector::Label(label) => node.labels.iter().any(|l| l == label),
            Selector::Name(pattern) => glob(pattern, &node.name),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Label(label) => write!(f, "label:{label}"),
            Selector::Name(pattern) => write!(f, "node:{pattern}"),
        }
    }
}

/// `*`-only glob matching (no other metacharacters).
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
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

/// The configured router: settings with parsed selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRouter {
    rules: Vec<(Rule, Vec<Selector>)>,
    default: Vec<Selector>,
    strict: bool,
    loading_retry_ms: u32,
}

impl PinRouter {
    /// Validates `settings`.
    pub fn new(settings: Settings) -> Result<Self, PolicyError> {
        let selectors = |texts: &[String]| {
            texts
                .iter()
                .map(|text| Selector::parse(text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(PolicyError::BadSettings)
        };
        let mut rules = Vec::new();
        for (index, rule) in settings.rules.into_iter().enumerate() {
            if rule.caller.is_none() && rule.header.is_none() {
                return Err(PolicyError::BadSettings(format!(
                    "rules[{index}] matches everyone: give a `caller` or a `header`"
                )));
            }
            if let Some(header) = &rule.header
                && (!header.name.starts_with("x-helexa-")
                    || header.name != header.name.to_lowercase())
            {
                return Err(PolicyError::BadSettings(format!(
                    "rules[{index}].header.name {:?}: only lower-case `x-helexa-*` headers reach routers",
                    header.name
                )));
            }
            if rule.nodes.is_empty() {
                return Err(PolicyError::BadSettings(format!(
                    "rules[{index}].nodes is empty"
                )));
            }
            let parsed = selectors(&rule.nodes)?;
            rules.push((rule, parsed));
        }
        Ok(PinRouter {
            rules,
            default: selectors(&settings.default)?,
            strict: settings.strict,
            loading_retry_ms: settings.loading_retry_ms,
        })
    }

    /// The tiers of `request`, and whether a rule pinned it.
    pub fn tiers(&self, request: &RequestInfo) -> (&[Selector], bool) {
        let matches = |rule: &Rule| {
            rule.caller
                .as_ref()
                .is_none_or(|caller| request.caller.as_ref() == Some(caller))
                && rule.header.as_ref().is_none_or(|want| {
                    request
                        .headers
                        .iter()
                        .any(|(name, value)| *name == want.name && *value == want.value)
                })
        };
        match self.rules.iter().find(|(rule, _)| matches(rule)) {
            Some((_, selectors)) => (selectors, true),
            None => (&self.default, false),
        }
    }

    /// Decides where `request` runs.
    pub fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Decision {
        let Some(entry) = resolve(&request.model, catalogue) else {
            return unknown_model(&request.model);
        };
        let (selectors, pinned) = self.tiers(request);
        let whole_fleet: Vec<&Node> = fleet.nodes.iter().collect();
        let tiers: Vec<Vec<&Node>> = if selectors.is_empty() {
            vec![whole_fleet.clone()]
        } else {
            // Each node belongs to the first tier that selects it.
            let mut taken = vec![false; fleet.nodes.len()];
            let mut tiers = Vec::with_capacity(selectors.len());
            for selector in selectors {
                let mut tier = Vec::new();
                for (i, node) in fleet.nodes.iter().enumerate() {
                    if !taken[i] && selector.matches(node) {
                        taken[i] = true;
                        tier.push(node);
                    }
                }
                tiers.push(tier);
            }
            tiers
        };
        if let Some(decision) = self.route_within(entry, &tiers) {
            return decision;
        }
        if pinned
            && !self.strict
            && !selectors.is_empty()
            && let Some(decision) = self.route_within(entry, &[whole_fleet])
        {
            return decision;
        }
        let who = request.caller.as_deref().unwrap_or("this caller");
        let tiers: Vec<String> = selectors.iter().map(Selector::to_string).collect();
        Decision::Reject(Rejection {
            status: 503,
            message: format!(
                "no node {who} may use ({}) can serve or load {} now",
                if tiers.is_empty() {
                    "the whole fleet".to_owned()
                } else {
                    tiers.join(", ")
                },
                entry.id
            ),
            retry_after_ms: Some(2_000),
        })
    }

    /// Serve, wait or place within `tiers` (in order); `None` when none of them can.
    fn route_within(&self, entry: &CatalogueEntry, tiers: &[Vec<&Node>]) -> Option<Decision> {
        let mut replicas: Vec<String> = Vec::new();
        for tier in tiers {
            let mut ready_here: Vec<(u64, &str)> = tier
                .iter()
                .filter(|node| is_answering(node))
                .filter_map(|node| {
                    ready(node, &entry.id).map(|model| (busy(model), node.name.as_str()))
                })
                .collect();
            ready_here.sort();
            replicas.extend(ready_here.into_iter().map(|(_, name)| name.to_owned()));
        }
        if !replicas.is_empty() {
            let node = replicas.remove(0);
            return Some(Decision::Serve(ServePlan {
                node,
                fallbacks: replicas,
            }));
        }
        if tiers
            .iter()
            .flatten()
            .any(|node| is_answering(node) && loading(node, &entry.id))
        {
            return Some(Decision::RetryAfter(self.loading_retry_ms));
        }
        tiers
            .iter()
            .find_map(|tier| place(entry, tier.iter().copied()))
    }
}

impl Router for PinRouter {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        PinRouter::new(helexa_policy_sdk::parse_settings(settings)?)
    }

    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        Ok(PinRouter::route(self, request, catalogue, fleet))
    }
}

#[cfg(target_arch = "wasm32")]
helexa_policy_sdk::export_router!(PinRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use helexa_policy_sdk::{Device, Health, LoadPlan, ModelState, ResidentModel};

    fn node(name: &str, labels: &[&str], model: Option<(ModelState, u32)>) -> Node {
        Node {
            name: name.into(),
            health: Health::Healthy,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            devices: vec![Device {
                index: 0,
                vram_total_mb: 80_000,
                vram_free_mb: 80_000,
                compute_capability: 90,
            }],
            models: model
                .map(|(state, in_flight)| ResidentModel {
                    id: "m".into(),
                    state,
                    vram_mb: 10_000,
                    devices: vec![0],
                    idle_ms: 0,
                    in_flight,
                    queue_depth: 0,
                    residency_priority: 100,
                })
                .into_iter()
                .collect(),
            latency: Default::default(),
        }
    }

    fn catalogue() -> Vec<CatalogueEntry> {
        vec![CatalogueEntry {
            id: "m".into(),
            vram_mb: 10_000,
            min_devices: 1,
            ..CatalogueEntry::default()
        }]
    }

    fn request(caller: Option<&str>, headers: &[(&str, &str)]) -> RequestInfo {
        RequestInfo {
            model: "m".into(),
            caller: caller.map(str::to_owned),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            ..RequestInfo::default()
        }
    }

    fn router(json: &str) -> PinRouter {
        PinRouter::configure(json).unwrap()
    }

    fn fleet() -> Fleet {
        Fleet {
            version: 1,
            nodes: vec![
                node("bronze-1", &["tier=bronze"], Some((ModelState::Ready, 0))),
                node("gold-1", &["tier=gold"], Some((ModelState::Ready, 5))),
                node("gold-2", &["tier=gold"], Some((ModelState::Ready, 2))),
                node("silver-1", &["tier=silver"], Some((ModelState::Ready, 0))),
            ],
        }
    }

    const SETTINGS: &str = r#"{
        "rules": [
            {"caller": "team-a", "nodes": ["label:tier=gold", "label:tier=silver"]},
            {"header": {"name": "x-helexa-tenant", "value": "acme"}, "nodes": ["node:silver-*"]}
        ],
        "default": ["label:tier=bronze"]
    }"#;

    #[test]
    fn callers_go_to_their_tiers_in_order_with_fallbacks() {
        let router = router(SETTINGS);
        let serve = |request: RequestInfo| match router.route(&request, &catalogue(), &fleet()) {
            Decision::Serve(plan) => (plan.node, plan.fallbacks),
            other => panic!("expected serve, got {other:?}"),
        };
        assert_eq!(
            serve(request(Some("team-a"), &[])),
            ("gold-2".into(), vec!["gold-1".into(), "silver-1".into()])
        );
        assert_eq!(
            serve(request(None, &[("x-helexa-tenant", "acme")])),
            ("silver-1".into(), vec![])
        );
        assert_eq!(
            serve(request(Some("someone"), &[])),
            ("bronze-1".into(), vec![])
        );
    }

    #[test]
    fn later_tiers_and_cold_placement_stay_inside_the_pins() {
        let router = router(SETTINGS);
        let mut fleet = fleet();
        // No gold replica: silver serves; no replica at all: load on gold first.
        fleet.nodes[1].models.clear();
        fleet.nodes[2].models.clear();
        match router.route(&request(Some("team-a"), &[]), &catalogue(), &fleet) {
            Decision::Serve(plan) => assert_eq!(plan.node, "silver-1"),
            other => panic!("{other:?}"),
        }
        for node in &mut fleet.nodes {
            node.models.clear();
        }
        assert_eq!(
            router.route(&request(Some("team-a"), &[]), &catalogue(), &fleet),
            Decision::Load(LoadPlan {
                node: "gold-1".into(),
                devices: vec![0],
                free_mb_needed: 0
            })
        );
        fleet.nodes[3].models = node("x", &[], Some((ModelState::Loading, 0))).models;
        assert_eq!(
            router.route(&request(Some("team-a"), &[]), &catalogue(), &fleet),
            Decision::RetryAfter(500)
        );
    }

    #[test]
    fn strict_refuses_outside_the_pins_and_lenient_falls_back() {
        let fleet = Fleet {
            version: 1,
            nodes: vec![node("other", &[], Some((ModelState::Ready, 0)))],
        };
        let lenient = router(r#"{"rules": [{"caller": "a", "nodes": ["node:gpu-*"]}]}"#);
        assert!(matches!(
            lenient.route(&request(Some("a"), &[]), &catalogue(), &fleet),
            Decision::Serve(_)
        ));
        let strict =
            router(r#"{"rules": [{"caller": "a", "nodes": ["node:gpu-*"]}], "strict": true}"#);
        match strict.route(&request(Some("a"), &[]), &catalogue(), &fleet) {
            Decision::Reject(rejection) => assert_eq!(rejection.status, 503),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_settings_are_explained() {
        for bad in [
            r#"{"rules": [{"nodes": ["label:a"]}]}"#,
            r#"{"rules": [{"caller": "a", "nodes": []}]}"#,
            r#"{"rules": [{"caller": "a", "nodes": ["gold"]}]}"#,
            r#"{"rules": [{"header": {"name": "x-tenant", "value": "v"}, "nodes": ["label:a"]}]}"#,
            r#"{"rulez": []}"#,
        ] {
            assert!(
                matches!(PinRouter::configure(bad), Err(PolicyError::BadSettings(_))),
                "{bad}"
            );
        }
        assert!(PinRouter::configure("{}").is_ok());
    }

    #[test]
    fn glob_matches_star_patterns() {
        assert!(glob("h200-*", "h200-1"));
        assert!(glob("*-east", "gpu-east"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
        assert!(!glob("a*a", "a"));
        assert!(glob("*", ""));
    }
}
