//! Conversions between the generated WIT types and the plain types of [`crate::types`].
//!
//! Inputs (request, catalogue, fleet, node) go WIT → plain; outputs (decision, error,
//! events) go plain → WIT. Every field is moved, never cloned: these run once per
//! `set-*` call or per decision.

use crate::bindings::router::helexa::policy::types as wit;
use crate::bindings::translator::exports::helexa::policy::translation as wit_translation;
use crate::types;

impl From<wit::Surface> for types::Surface {
    fn from(surface: wit::Surface) -> Self {
        match surface {
            wit::Surface::OpenaiChat => types::Surface::OpenaiChat,
            wit::Surface::OpenaiCompletions => types::Surface::OpenaiCompletions,
            wit::Surface::OpenaiResponses => types::Surface::OpenaiResponses,
            wit::Surface::AnthropicMessages => types::Surface::AnthropicMessages,
        }
    }
}

/// `request-info` → [`types::RequestInfo`] (a function, not `From`, because the
/// generated record has a field named `stream` that is awkward to destructure in macros).
pub(crate) fn request_info(request: wit::RequestInfo) -> types::RequestInfo {
    types::RequestInfo {
        model: request.model,
        surface: request.surface.into(),
        prompt_tokens_estimate: request.prompt_tokens_estimate,
        max_output_tokens: request.max_output_tokens,
        stream: request.stream,
        caller: request.caller,
        headers: request.headers,
    }
}

impl From<wit::CatalogueEntry> for types::CatalogueEntry {
    fn from(entry: wit::CatalogueEntry) -> Self {
        types::CatalogueEntry {
            id: entry.id,
            aliases: entry.aliases,
            vram_mb: entry.vram_mb,
            min_devices: entry.min_devices,
            min_device_vram_mb: entry.min_device_vram_mb,
            pinned_on: entry.pinned_on,
            residency_priority: entry.residency_priority,
            context_length: entry.context_length,
        }
    }
}

impl From<wit::Device> for types::Device {
    fn from(device: wit::Device) -> Self {
        types::Device {
            index: device.index,
            vram_total_mb: device.vram_total_mb,
            vram_free_mb: device.vram_free_mb,
            compute_capability: device.compute_capability,
        }
    }
}

impl From<wit::ModelState> for types::ModelState {
    fn from(state: wit::ModelState) -> Self {
        match state {
            wit::ModelState::Loading => types::ModelState::Loading,
            wit::ModelState::Ready => types::ModelState::Ready,
            wit::ModelState::Unloading => types::ModelState::Unloading,
            wit::ModelState::Failed => types::ModelState::Failed,
        }
    }
}

impl From<wit::ResidentModel> for types::ResidentModel {
    fn from(model: wit::ResidentModel) -> Self {
        types::ResidentModel {
            id: model.id,
            state: model.state.into(),
            vram_mb: model.vram_mb,
            devices: model.devices,
            idle_ms: model.idle_ms,
            in_flight: model.in_flight,
            queue_depth: model.queue_depth,
            residency_priority: model.residency_priority,
        }
    }
}

impl From<wit::Health> for types::Health {
    fn from(health: wit::Health) -> Self {
        match health {
            wit::Health::Healthy => types::Health::Healthy,
            wit::Health::Degraded => types::Health::Degraded,
            wit::Health::Unreachable => types::Health::Unreachable,
        }
    }
}

impl From<wit::LatencyStats> for types::LatencyStats {
    fn from(latency: wit::LatencyStats) -> Self {
        types::LatencyStats {
            ttft_p50_ms: latency.ttft_p50_ms,
            itl_p50_ms: latency.itl_p50_ms,
            samples: latency.samples,
        }
    }
}

impl From<wit::Node> for types::Node {
    fn from(node: wit::Node) -> Self {
        types::Node {
            name: node.name,
            health: node.health.into(),
            labels: node.labels,
            devices: node.devices.into_iter().map(Into::into).collect(),
            models: node.models.into_iter().map(Into::into).collect(),
            latency: node.latency.into(),
        }
    }
}

impl From<wit::Fleet> for types::Fleet {
    fn from(fleet: wit::Fleet) -> Self {
        types::Fleet {
            version: fleet.version,
            nodes: fleet.nodes.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<types::Decision> for wit::Decision {
    fn from(decision: types::Decision) -> Self {
        match decision {
            types::Decision::Serve(plan) => wit::Decision::Serve(wit::ServePlan {
                node: plan.node,
                fallbacks: plan.fallbacks,
            }),
            types::Decision::Load(plan) => wit::Decision::Load(wit::LoadPlan {
                node: plan.node,
                devices: plan.devices,
                free_mb_needed: plan.free_mb_needed,
            }),
            types::Decision::RetryAfter(ms) => wit::Decision::RetryAfter(ms),
            types::Decision::Reject(rejection) => wit::Decision::Reject(wit::Rejection {
                status: rejection.status,
                message: rejection.message,
                retry_after_ms: rejection.retry_after_ms,
            }),
        }
    }
}

impl From<types::PolicyError> for wit::PolicyError {
    fn from(error: types::PolicyError) -> Self {
        match error {
            types::PolicyError::InvalidInput(message) => wit::PolicyError::InvalidInput(message),
            types::PolicyError::BadSettings(message) => wit::PolicyError::BadSettings(message),
            types::PolicyError::Internal(message) => wit::PolicyError::Internal(message),
        }
    }
}

/// [`types::SseEvent`] → `sse-event`.
pub(crate) fn sse_event(event: types::SseEvent) -> wit_translation::SseEvent {
    wit_translation::SseEvent {
        event: event.event,
        data: event.data,
    }
}
