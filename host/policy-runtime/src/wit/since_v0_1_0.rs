//! Bindings of `helexa:policy@0.1.0` (the frozen copy in `wit/deps/helexa-policy@0.1.0`) and
//! the conversions between its generated types and the crate's domain types.
//!
//! The three worlds are bound in three sub-modules; the evictor and translator bindings
//! reuse the router's `types` and `log` modules (`with`), so the `log` host function is
//! implemented once and a `types::Surface` is one type, not three.

use wasmtime::component::{InstancePre, Linker, ResourceAny};
use wasmtime::{AsContextMut, Store};

use crate::host::{GuestLevel, HostState};
use crate::types as domain;
use crate::{PolicyError, PolicyKind};

/// The WIT package version these bindings were generated from.
pub(crate) const VERSION: (u64, u64, u64) = (0, 1, 0);

/// Semver range this module serves: 0.1.x (for 0.x versions the minor is the breaking
/// component; a later 0.1.y may only add things, which these bindings ignore).
pub(crate) fn supports(version: (u64, u64, u64)) -> bool {
    version.0 == VERSION.0 && version.1 == VERSION.1
}

/// The range above, as a person reads it.
pub(crate) const SUPPORTED: &str = "0.1.x";

mod router_world {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/helexa-policy@0.1.0",
        world: "router",
    });
}

mod evictor_world {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/helexa-policy@0.1.0",
        world: "evictor",
        with: {
            "helexa:policy/types": crate::wit::since_v0_1_0::router_world::helexa::policy::types,
            "helexa:policy/log": crate::wit::since_v0_1_0::router_world::helexa::policy::log,
        },
    });
}

mod translator_world {
    wasmtime::component::bindgen!({
        path: "../../wit/deps/helexa-policy@0.1.0",
        world: "translator",
        with: {
            "helexa:policy/types": crate::wit::since_v0_1_0::router_world::helexa::policy::types,
            "helexa:policy/log": crate::wit::since_v0_1_0::router_world::helexa::policy::log,
        },
    });
}

use router_world::helexa::policy::log as wit_log;
use router_world::helexa::policy::types as wit;
use translator_world::exports::helexa::policy::translation as wit_translation;

impl wit_log::Host for HostState {
    fn write(&mut self, level: wit_log::Level, message: String) {
        let level = match level {
            wit_log::Level::Debug => GuestLevel::Debug,
            wit_log::Level::Info => GuestLevel::Info,
            wit_log::Level::Warn => GuestLevel::Warn,
            wit_log::Level::Error => GuestLevel::Error,
        };
        self.log(level, &message);
    }
}

impl wit::Host for HostState {}

/// Define this version's imports (`log`, and the type-only `types` instance).
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    wit_log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    wit::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    Ok(())
}

/// A linked, type-checked component of one kind, ready to instantiate.
pub(crate) enum Pre {
    Router(router_world::RouterPre<HostState>),
    Evictor(evictor_world::EvictorPre<HostState>),
    Translator(translator_world::TranslatorPre<HostState>),
}

impl Pre {
    pub(crate) fn new(kind: PolicyKind, pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        Ok(match kind {
            PolicyKind::Router => Pre::Router(router_world::RouterPre::new(pre)?),
            PolicyKind::Evictor => Pre::Evictor(evictor_world::EvictorPre::new(pre)?),
            PolicyKind::Translator => Pre::Translator(translator_world::TranslatorPre::new(pre)?),
        })
    }

    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::Router(pre) => Bindings::Router(pre.instantiate(store)?),
            Pre::Evictor(pre) => Bindings::Evictor(pre.instantiate(store)?),
            Pre::Translator(pre) => Bindings::Translator(pre.instantiate(store)?),
        })
    }
}

/// One instance's exports.
pub(crate) enum Bindings {
    Router(router_world::Router),
    Evictor(evictor_world::Evictor),
    Translator(translator_world::Translator),
}

/// What a guest call returns: the outer error is a trap, the inner one the guest's answer.
type Call<T> = wasmtime::Result<Result<T, PolicyError>>;

fn wrong_kind<T>() -> wasmtime::Result<T> {
    // Unreachable by construction (a plugin's kind fixes its bindings); an error rather
    // than a panic so a bug here costs one call, not the gateway.
    Err(wasmtime::format_err!(
        "internal: call on an instance of another policy kind"
    ))
}

impl Bindings {
    pub(crate) fn configure(
        &self,
        store: impl AsContextMut<Data = HostState>,
        settings: &str,
    ) -> Call<()> {
        let result = match self {
            Bindings::Router(b) => b.helexa_policy_routing().call_configure(store, settings)?,
            Bindings::Evictor(b) => b.helexa_policy_eviction().call_configure(store, settings)?,
            Bindings::Translator(b) => b
                .helexa_policy_translation()
                .call_configure(store, settings)?,
        };
        Ok(result.map_err(Into::into))
    }

    pub(crate) fn set_catalogue(
        &self,
        store: impl AsContextMut<Data = HostState>,
        entries: &[domain::CatalogueEntry],
    ) -> wasmtime::Result<()> {
        let Bindings::Router(b) = self else {
            return wrong_kind();
        };
        let entries: Vec<wit::CatalogueEntry> = entries.iter().map(Into::into).collect();
        b.helexa_policy_routing()
            .call_set_catalogue(store, &entries)
    }

    pub(crate) fn set_fleet(
        &self,
        store: impl AsContextMut<Data = HostState>,
        fleet: &domain::Fleet,
    ) -> wasmtime::Result<()> {
        let Bindings::Router(b) = self else {
            return wrong_kind();
        };
        b.helexa_policy_routing()
            .call_set_fleet(store, &fleet.into())
    }

    pub(crate) fn route(
        &self,
        store: impl AsContextMut<Data = HostState>,
        request: &domain::RequestInfo,
    ) -> Call<domain::Decision> {
        let Bindings::Router(b) = self else {
            return wrong_kind();
        };
        let answer = b
            .helexa_policy_routing()
            .call_route(store, &request.into())?;
        Ok(answer.map(Into::into).map_err(Into::into))
    }

    pub(crate) fn choose_victims(
        &self,
        store: impl AsContextMut<Data = HostState>,
        on: &domain::Node,
        need_mb: u64,
        incoming: &domain::CatalogueEntry,
    ) -> Call<Vec<String>> {
        let Bindings::Evictor(b) = self else {
            return wrong_kind();
        };
        let answer = b.helexa_policy_eviction().call_choose_victims(
            store,
            &on.into(),
            need_mb,
            &incoming.into(),
        )?;
        Ok(answer.map_err(Into::into))
    }

    pub(crate) fn request_to_chat(
        &self,
        store: impl AsContextMut<Data = HostState>,
        from: domain::Surface,
        body: &str,
    ) -> Call<String> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        let answer =
            b.helexa_policy_translation()
                .call_request_to_chat(store, from.into(), body)?;
        Ok(answer.map_err(Into::into))
    }

    pub(crate) fn response_from_chat(
        &self,
        store: impl AsContextMut<Data = HostState>,
        to: domain::Surface,
        request: &str,
        body: &str,
    ) -> Call<String> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        let answer = b.helexa_policy_translation().call_response_from_chat(
            store,
            to.into(),
            request,
            body,
        )?;
        Ok(answer.map_err(Into::into))
    }

    pub(crate) fn stream_new(
        &self,
        store: impl AsContextMut<Data = HostState>,
        to: domain::Surface,
        request: &str,
        response_id: &str,
    ) -> wasmtime::Result<ResourceAny> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        b.helexa_policy_translation()
            .response_stream()
            .call_constructor(store, to.into(), request, response_id)
    }

    pub(crate) fn stream_push(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
        chunk: &str,
    ) -> Call<Vec<domain::SseEvent>> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        let answer = b
            .helexa_policy_translation()
            .response_stream()
            .call_push(store, stream, chunk)?;
        Ok(answer.map(events).map_err(Into::into))
    }

    pub(crate) fn stream_keepalive(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
    ) -> wasmtime::Result<Vec<domain::SseEvent>> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        let answer = b
            .helexa_policy_translation()
            .response_stream()
            .call_keepalive(store, stream)?;
        Ok(events(answer))
    }

    pub(crate) fn stream_finish(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
    ) -> Call<Vec<domain::SseEvent>> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        let answer = b
            .helexa_policy_translation()
            .response_stream()
            .call_finish(store, stream)?;
        Ok(answer.map(events).map_err(Into::into))
    }

    pub(crate) fn stream_fail(
        &self,
        store: impl AsContextMut<Data = HostState>,
        stream: ResourceAny,
        message: &str,
    ) -> wasmtime::Result<Vec<domain::SseEvent>> {
        let Bindings::Translator(b) = self else {
            return wrong_kind();
        };
        let answer = b
            .helexa_policy_translation()
            .response_stream()
            .call_fail(store, stream, message)?;
        Ok(events(answer))
    }
}

fn events(events: Vec<wit_translation::SseEvent>) -> Vec<domain::SseEvent> {
    events
        .into_iter()
        .map(|e| domain::SseEvent {
            event: e.event,
            data: e.data,
        })
        .collect()
}

impl From<wit::PolicyError> for PolicyError {
    fn from(error: wit::PolicyError) -> Self {
        match error {
            wit::PolicyError::InvalidInput(m) => PolicyError::InvalidInput(m),
            wit::PolicyError::BadSettings(m) => PolicyError::BadSettings(m),
            wit::PolicyError::Internal(m) => PolicyError::Internal(m),
        }
    }
}

impl From<domain::Surface> for wit::Surface {
    fn from(surface: domain::Surface) -> Self {
        match surface {
            domain::Surface::OpenaiChat => wit::Surface::OpenaiChat,
            domain::Surface::OpenaiCompletions => wit::Surface::OpenaiCompletions,
            domain::Surface::OpenaiResponses => wit::Surface::OpenaiResponses,
            domain::Surface::AnthropicMessages => wit::Surface::AnthropicMessages,
        }
    }
}

impl From<&domain::RequestInfo> for wit::RequestInfo {
    fn from(r: &domain::RequestInfo) -> Self {
        wit::RequestInfo {
            model: r.model.clone(),
            surface: r.surface.into(),
            prompt_tokens_estimate: r.prompt_tokens_estimate,
            max_output_tokens: r.max_output_tokens,
            stream: r.stream,
            caller: r.caller.clone(),
            headers: r.headers.clone(),
        }
    }
}

impl From<&domain::CatalogueEntry> for wit::CatalogueEntry {
    fn from(e: &domain::CatalogueEntry) -> Self {
        wit::CatalogueEntry {
            id: e.id.clone(),
            aliases: e.aliases.clone(),
            vram_mb: e.vram_mb,
            min_devices: e.min_devices,
            min_device_vram_mb: e.min_device_vram_mb,
            pinned_on: e.pinned_on.clone(),
            residency_priority: e.residency_priority,
            context_length: e.context_length,
        }
    }
}

impl From<&domain::Node> for wit::Node {
    fn from(n: &domain::Node) -> Self {
        wit::Node {
            name: n.name.clone(),
            health: match n.health {
                domain::Health::Healthy => wit::Health::Healthy,
                domain::Health::Degraded => wit::Health::Degraded,
                domain::Health::Unreachable => wit::Health::Unreachable,
            },
            labels: n.labels.clone(),
            devices: n
                .devices
                .iter()
                .map(|d| wit::Device {
                    index: d.index,
                    vram_total_mb: d.vram_total_mb,
                    vram_free_mb: d.vram_free_mb,
                    compute_capability: d.compute_capability,
                })
                .collect(),
            models: n
                .models
                .iter()
                .map(|m| wit::ResidentModel {
                    id: m.id.clone(),
                    state: match m.state {
                        domain::ModelState::Loading => wit::ModelState::Loading,
                        domain::ModelState::Ready => wit::ModelState::Ready,
                        domain::ModelState::Unloading => wit::ModelState::Unloading,
                        domain::ModelState::Failed => wit::ModelState::Failed,
                    },
                    vram_mb: m.vram_mb,
                    devices: m.devices.clone(),
                    idle_ms: m.idle_ms,
                    in_flight: m.in_flight,
                    queue_depth: m.queue_depth,
                    residency_priority: m.residency_priority,
                })
                .collect(),
            latency: wit::LatencyStats {
                ttft_p50_ms: n.latency.ttft_p50_ms,
                itl_p50_ms: n.latency.itl_p50_ms,
                samples: n.latency.samples,
            },
        }
    }
}

impl From<&domain::Fleet> for wit::Fleet {
    fn from(f: &domain::Fleet) -> Self {
        wit::Fleet {
            version: f.version,
            nodes: f.nodes.iter().map(Into::into).collect(),
        }
    }
}

impl From<wit::Decision> for domain::Decision {
    fn from(d: wit::Decision) -> Self {
        match d {
            wit::Decision::Serve(p) => domain::Decision::Serve(domain::ServePlan {
                node: p.node,
                fallbacks: p.fallbacks,
            }),
            wit::Decision::Load(p) => domain::Decision::Load(domain::LoadPlan {
                node: p.node,
                devices: p.devices,
                free_mb_needed: p.free_mb_needed,
            }),
            wit::Decision::RetryAfter(ms) => domain::Decision::RetryAfter(ms),
            wit::Decision::Reject(r) => domain::Decision::Reject(domain::Rejection {
                status: r.status,
                message: r.message,
                retry_after_ms: r.retry_after_ms,
            }),
        }
    }
}
