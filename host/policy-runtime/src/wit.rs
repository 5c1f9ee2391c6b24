//! WIT version detection and dispatch. Each supported version of `helexa:policy` is bound
//! in exactly one `since_vX_Y_Z` module; nothing outside this module sees generated types.
//!
//! The version of a component is read from its export names
//! (`helexa:policy/routing@0.1.0`) before it is instantiated, so a component built
//! against an unsupported version is refused with a message naming what it exports and
//! what this runtime supports, instead of failing later with a type-check error.

mod since_v0_1_0;

use wasmtime::component::{Component, InstancePre, Linker, ResourceAny};
use wasmtime::{AsContextMut, Engine, Store};

use crate::host::HostState;
use crate::types as domain;
use crate::{PolicyError, PolicyKind};

// The newest bound version; new plugins are expected to target it.
use since_v0_1_0 as latest;

const PACKAGE: &str = "helexa:policy";

/// What a loaded component turned out to be.
pub(crate) struct Inspection {
    /// The WIT package version of the exported interface, e.g. `0.1.0`.
    pub wit_version: String,
    /// WASI imports answered inertly (`inert_wasi`: environment, random).
    pub inert_imports: Vec<String>,
    /// Other imports outside `helexa:policy` (WASI from the guest's std): stubbed with traps.
    pub stubbed_imports: Vec<String>,
    version: Version,
}

/// The bound versions.
#[derive(Clone, Copy)]
enum Version {
    V0_1,
}

/// Check that `component` exports the interface of `kind` at a supported version.
/// `Err` is a complete sentence for the operator (without the plugin's name, which the
/// caller adds).
pub(crate) fn inspect(
    engine: &Engine,
    component: &Component,
    kind: PolicyKind,
) -> Result<Inspection, String> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let wanted = kind.interface();
    let supported = format!("{PACKAGE}/{wanted}@{}", latest::SUPPORTED);

    let mut found = None;
    let mut others = Vec::new();
    for name in &exports {
        let Some((interface, version)) = parse_policy_name(name) else {
            continue;
        };
        if interface == wanted {
            found = Some((*name, version));
        } else {
            others.push(*name);
        }
    }
    let Some((name, version)) = found else {
        let what = if others.is_empty() {
            format!(
                "it exports no {PACKAGE} interface (exports: [{}])",
                exports.join(", ")
            )
        } else {
            format!(
                "it exports {} and is therefore not {}",
                others.join(", "),
                with_article(kind)
            )
        };
        return Err(format!(
            "{what}; {} must export {supported}",
            with_article(kind)
        ));
    };
    let Some(parsed) = parse_semver(version) else {
        return Err(format!(
            "it exports {name}, whose version is not semver; this gateway supports {supported}"
        ));
    };
    let version_enum = if latest::supports(parsed) {
        Version::V0_1
    } else {
        return Err(format!(
            "it exports {name}, a WIT version this gateway does not support; it supports {supported} \
             (rebuild the plugin against that version of the helexa policy SDK)"
        ));
    };

    let (inert_imports, stubbed_imports) = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| parse_policy_name(name).is_none())
        .map(str::to_owned)
        .partition(|name| crate::inert_wasi::answers(name));
    Ok(Inspection {
        wit_version: version.to_owned(),
        inert_imports,
        stubbed_imports,
        version: version_enum,
    })
}

/// The world a component implements, from the first `helexa:policy` interface of a
/// policy kind it exports; `None` when it exports none.
pub(crate) fn detect_kind(engine: &Engine, component: &Component) -> Option<PolicyKind> {
    let ty = component.component_type();
    ty.exports(engine).find_map(|(name, _)| {
        let (interface, _) = parse_policy_name(name)?;
        [
            PolicyKind::Router,
            PolicyKind::Evictor,
            PolicyKind::Translator,
        ]
        .into_iter()
        .find(|kind| kind.interface() == interface)
    })
}

fn with_article(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::Router => "a router",
        PolicyKind::Evictor => "an evictor",
        PolicyKind::Translator => "a translator",
    }
}

/// `helexa:policy/routing@0.1.0` → `("routing", "0.1.0")`.
fn parse_policy_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    rest.split_once('@')
}

fn parse_semver(version: &str) -> Option<(u64, u64, u64)> {
    // Pre-release/build suffixes are not part of what we match on.
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// Define the imports of every bound version (their names differ by version, so one
/// linker serves all).
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    since_v0_1_0::add_to_linker(linker)
}

/// A type-checked component of one kind and version, ready to instantiate.
pub(crate) enum Pre {
    V0_1(since_v0_1_0::Pre),
}

impl Pre {
    pub(crate) fn new(
        inspection: &Inspection,
        kind: PolicyKind,
        pre: InstancePre<HostState>,
    ) -> wasmtime::Result<Self> {
        Ok(match inspection.version {
            Version::V0_1 => Pre::V0_1(since_v0_1_0::Pre::new(kind, pre)?),
        })
    }

    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::V0_1(pre) => Bindings::V0_1(pre.instantiate(store)?),
        })
    }
}

/// One instance's exports, whatever version it was built against.
pub(crate) enum Bindings {
    V0_1(since_v0_1_0::Bindings),
}

type Call<T> = wasmtime::Result<Result<T, PolicyError>>;

/// Forward a call to the bindings of the instance's version.
macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Bindings::V0_1($b) => $call,
        }
    };
}

impl Bindings {
    pub(crate) fn configure(
        &self,
        store: impl AsContextMut<Data = HostState>,
        settings: &str,
    ) -> Call<()> {
        dispatch!(self, b => b.configure(store, settings))
    }

    pub(crate) fn set_catalogue(
        &self,
        store: impl AsContextMut<Data = HostState>,
        entries: &[domain::CatalogueEntry],
    ) -> wasmtime::Result<()> {
        dispatch!(self, b => b.set_catalogue(store, entries))
    }

    pub(crate) fn set_fleet(
        &self,
        store: impl AsContextMut<Data = HostState>,
        fleet: &domain::Fleet,
    ) -> wasmtime::Result<()> {
        dispatch!(self, b => b.set_fleet(store, fleet))
    }

    pub(crate) fn route(
        &self,
        store: impl AsContextMut<Data = HostState>,
        request: &domain::RequestInfo,
    ) -> Call<domain::Decision> {
        dispatch!(self, b => b.route(store, request))
    }

    pub(crate) fn choose_victims(
        &self,
        store: impl AsContextMut<Data = HostState>,
        on: &domain::Node,
        need_mb: u64,
        incoming: &domain::CatalogueEntry,
    ) -> Call<Vec<String>> {
        dispatch!(self, b => b.choose_victims(store, on, need_mb, incoming))
    }

    pub(crate) fn request_to_chat(
        &self,
        store: impl AsContextMut<Data = HostState>,
        from: domain::Surface,
        body: &str,
    ) -> Call<String> {
        dispatch!(self, b => b.request_to_chat(store, from, body))
    }

    pub(crate) fn response_from_chat(
        &self,
        store: impl AsContextMut<Data = HostState>,
        to: domain::Surface,
        request: &str,
        body: &str,
    ) -> Call<String> {
        dispatch!(self, b => b.response_from_chat(store, to, request, body))
    }

    pub(crate) fn stream_new(
        &self,
        store: impl AsContextMut<Data = HostState>,
        to: domain::Surface,
        request: &str,
        response_id: &str,
    ) -> wasmtime::Result<ResourceAny> {
        dispatch!(self, b => b.stream_new(store, to, request, response_id))
    }

    pub(crate) fn stream_push(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
        chunk: &str,
    ) -> Call<Vec<domain::SseEvent>> {
        dispatch!(self, b => b.stream_push(store, stream, chunk))
    }

    pub(crate) fn stream_keepalive(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
    ) -> wasmtime::Result<Vec<domain::SseEvent>> {
        dispatch!(self, b => b.stream_keepalive(store, stream))
    }

    pub(crate) fn stream_finish(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
    ) -> Call<Vec<domain::SseEvent>> {
        dispatch!(self, b => b.stream_finish(store, stream))
    }

    pub(crate) fn stream_fail(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
        message: &str,
    ) -> wasmtime::Result<Vec<domain::SseEvent>> {
        dispatch!(self, b => b.stream_fail(store, stream, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versioned_policy_export_names() {
        assert_eq!(
            parse_policy_name("helexa:policy/routing@0.1.0"),
            Some(("routing", "0.1.0"))
        );
        assert_eq!(parse_policy_name("helexa:policyx/routing@0.1.0"), None);
        assert_eq!(parse_policy_name("wasi:cli/environment@0.2.6"), None);
        assert_eq!(parse_semver("0.1.0"), Some((0, 1, 0)));
        assert_eq!(parse_semver("9.0.0-rc.1"), Some((9, 0, 0)));
        assert_eq!(parse_semver("1.2"), None);
        assert!(latest::supports((0, 1, 7)));
        assert!(!latest::supports((0, 2, 0)));
        assert!(!latest::supports((9, 0, 0)));
    }
}
