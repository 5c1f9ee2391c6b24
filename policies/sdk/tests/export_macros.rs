//! The export macros expand and link for every world, and the glue behind them keeps
//! the configured policy, catalogue and fleet resident between calls. The `Guest`
//! implementations are driven natively with generated WIT values, exactly as the
//! canonical-ABI shims would drive them inside a component.

use helexa_policy_sdk::bindings::evictor::exports::helexa::policy::eviction::Guest as _;
use helexa_policy_sdk::bindings::router::exports::helexa::policy::routing::Guest as _;
use helexa_policy_sdk::bindings::router::helexa::policy::types as wit;
use helexa_policy_sdk::bindings::translator::exports::helexa::policy::translation::{
    Guest as _, GuestResponseStream as _,
};
use helexa_policy_sdk::glue::{EvictorExport, RouterExport, StreamExport, TranslatorExport};
use helexa_policy_sdk::{
    CatalogueEntry, Decision, Evictor, Fleet, Node, PolicyError, RequestInfo, Router, ServePlan,
    SseEvent, Surface, Translator, TranslatorStream,
};

/// Serves on the first node of the fleet that has the requested model's id; echoes
/// the catalogue size in an error otherwise.
struct EchoRouter {
    prefix: String,
}

impl Router for EchoRouter {
    fn configure(settings: &str) -> Result<Self, PolicyError> {
        if settings == "bad" {
            return Err(PolicyError::BadSettings("bad".into()));
        }
        Ok(EchoRouter {
            prefix: settings.to_owned(),
        })
    }

    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Result<Decision, PolicyError> {
        let entry = catalogue
            .iter()
            .find(|entry| entry.answers_to(&request.model))
            .ok_or_else(|| PolicyError::InvalidInput(format!("{} entries", catalogue.len())))?;
        let node = fleet
            .nodes
            .iter()
            .find(|node| node.models.iter().any(|model| model.id == entry.id))
            .ok_or_else(|| PolicyError::Internal("nowhere".into()))?;
        Ok(Decision::Serve(ServePlan {
            node: format!("{}{}", self.prefix, node.name),
            fallbacks: vec![],
        }))
    }
}

struct FirstEvictor;

impl Evictor for FirstEvictor {
    fn configure(_settings: &str) -> Result<Self, PolicyError> {
        Ok(FirstEvictor)
    }

    fn choose_victims(
        &self,
        on: &Node,
        need_mb: u64,
        incoming: &CatalogueEntry,
    ) -> Result<Vec<String>, PolicyError> {
        Ok(on
            .models
            .iter()
            .filter(|model| model.vram_mb >= need_mb && model.id != incoming.id)
            .map(|model| model.id.clone())
            .collect())
    }
}

struct UpperTranslator;

struct CountingStream {
    to: Surface,
    pushed: usize,
}

impl Translator for UpperTranslator {
    type Stream = CountingStream;

    fn configure(_settings: &str) -> Result<Self, PolicyError> {
        Ok(UpperTranslator)
    }

    fn request_to_chat(&self, from: Surface, body: &str) -> Result<String, PolicyError> {
        Ok(format!("{from:?}:{}", body.to_uppercase()))
    }

    fn response_from_chat(
        &self,
        to: Surface,
        request: &str,
        body: &str,
    ) -> Result<String, PolicyError> {
        Ok(format!("{to:?}:{request}:{body}"))
    }

    fn new_stream(&self, to: Surface, _request: &str, _response_id: &str) -> CountingStream {
        CountingStream { to, pushed: 0 }
    }
}

impl TranslatorStream for CountingStream {
    fn push(&mut self, chunk: &str) -> Result<Vec<SseEvent>, PolicyError> {
        self.pushed += 1;
        Ok(vec![SseEvent {
            event: Some(format!("{:?}", self.to)),
            data: format!("{}:{chunk}", self.pushed),
        }])
    }

    fn keepalive(&mut self) -> Vec<SseEvent> {
        vec![]
    }

    fn finish(&mut self) -> Result<Vec<SseEvent>, PolicyError> {
        Ok(vec![SseEvent {
            event: None,
            data: format!("done after {}", self.pushed),
        }])
    }

    fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        vec![SseEvent {
            event: Some("error".into()),
            data: message.to_owned(),
        }]
    }
}

helexa_policy_sdk::export_router!(EchoRouter);
helexa_policy_sdk::export_evictor!(FirstEvictor);
helexa_policy_sdk::export_translator!(UpperTranslator);

fn wit_node(name: &str, model: &str, vram_mb: u64) -> wit::Node {
    wit::Node {
        name: name.into(),
        health: wit::Health::Healthy,
        labels: vec![],
        devices: vec![wit::Device {
            index: 0,
            vram_total_mb: 80_000,
            vram_free_mb: 1_000,
            compute_capability: 90,
        }],
        models: vec![wit::ResidentModel {
            id: model.into(),
            state: wit::ModelState::Ready,
            vram_mb,
            devices: vec![0],
            idle_ms: 5,
            in_flight: 0,
            queue_depth: 0,
            residency_priority: 100,
        }],
        latency: wit::LatencyStats {
            ttft_p50_ms: 0.0,
            itl_p50_ms: 0.0,
            samples: 0,
        },
    }
}

fn wit_entry(id: &str, alias: &str) -> wit::CatalogueEntry {
    wit::CatalogueEntry {
        id: id.into(),
        aliases: vec![alias.into()],
        vram_mb: 10,
        min_devices: 1,
        min_device_vram_mb: 0,
        pinned_on: vec![],
        residency_priority: None,
        context_length: 4096,
    }
}

fn wit_request(model: &str) -> wit::RequestInfo {
    wit::RequestInfo {
        model: model.into(),
        surface: wit::Surface::OpenaiChat,
        prompt_tokens_estimate: 0,
        max_output_tokens: None,
        stream: false,
        caller: None,
        headers: vec![],
    }
}

// All router glue state lives in one thread-local per test thread, so one test
// drives the whole life of an instance.
#[test]
fn router_glue_keeps_catalogue_and_fleet_resident() {
    type R = RouterExport<EchoRouter>;
    assert!(matches!(
        R::route(wit_request("x")),
        Err(wit::PolicyError::Internal(message)) if message.contains("before `configure`")
    ));
    assert!(matches!(
        R::configure("bad".into()),
        Err(wit::PolicyError::BadSettings(_))
    ));
    R::configure("n-".into()).unwrap();
    R::set_catalogue(vec![wit_entry("qwen", "q"), wit_entry("llama", "l")]);
    R::set_fleet(wit::Fleet {
        version: 3,
        nodes: vec![wit_node("a", "llama", 1), wit_node("b", "qwen", 1)],
    });
    match R::route(wit_request("q")).unwrap() {
        wit::Decision::Serve(plan) => assert_eq!(plan.node, "n-b"),
        other => panic!("expected serve, got {other:?}"),
    }
    assert!(matches!(
        R::route(wit_request("nope")),
        Err(wit::PolicyError::InvalidInput(message)) if message == "2 entries"
    ));
    // A new fleet replaces the old one.
    R::set_fleet(wit::Fleet {
        version: 4,
        nodes: vec![wit_node("c", "qwen", 1)],
    });
    match R::route(wit_request("qwen")).unwrap() {
        wit::Decision::Serve(plan) => assert_eq!(plan.node, "n-c"),
        other => panic!("expected serve, got {other:?}"),
    }
}

#[test]
fn evictor_glue_converts_node_and_entry() {
    type E = EvictorExport<FirstEvictor>;
    E::configure("{}".into()).unwrap();
    let victims = E::choose_victims(wit_node("a", "big", 50), 40, wit_entry("qwen", "q")).unwrap();
    assert_eq!(victims, ["big"]);
    let victims = E::choose_victims(wit_node("a", "big", 50), 60, wit_entry("qwen", "q")).unwrap();
    assert!(victims.is_empty());
}

#[test]
fn translator_glue_wraps_streams() {
    type T = TranslatorExport<UpperTranslator>;
    T::configure("{}".into()).unwrap();
    assert_eq!(
        T::request_to_chat(wit::Surface::AnthropicMessages, "hi".into()).unwrap(),
        "AnthropicMessages:HI"
    );
    assert_eq!(
        T::response_from_chat(wit::Surface::OpenaiResponses, "req".into(), "body".into()).unwrap(),
        "OpenaiResponses:req:body"
    );
    let stream = StreamExport::<UpperTranslator>::new(
        wit::Surface::OpenaiResponses,
        "{}".into(),
        "resp_1".into(),
    );
    let first = stream.push("x".into()).unwrap();
    assert_eq!(first[0].event.as_deref(), Some("OpenaiResponses"));
    assert_eq!(first[0].data, "1:x");
    stream.push("y".into()).unwrap();
    assert!(stream.keepalive().is_empty());
    assert_eq!(stream.finish().unwrap()[0].data, "done after 2");
    assert_eq!(stream.fail("boom".into())[0].data, "boom");
}
