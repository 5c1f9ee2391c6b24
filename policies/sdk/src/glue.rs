//! The wit-bindgen `Guest` implementations behind the `export_*!` macros.
//!
//! A component instance is single-threaded and lives across many calls, so the
//! configured policy and the resident catalogue and fleet are kept in `thread_local!`
//! cells (a plain static on `wasm32-wasip2` without threads). The catalogue and fleet
//! are converted to plain types once per `set-*` call, which is what keeps `route`
//! cheap. The configured instance is stored type-erased (`Box<dyn Any>`) because
//! statics cannot be generic; the downcast costs one type-id comparison.
//!
//! Calling an export before `configure` is a host bug, not an expected failure: the
//! router and evictor answer `internal`, and a stream constructor (which cannot
//! return an error) traps.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::evictor::exports::helexa::policy::eviction as wit_eviction;
use crate::bindings::router::exports::helexa::policy::routing as wit_routing;
use crate::bindings::router::helexa::policy::types as wit;
use crate::bindings::translator::exports::helexa::policy::translation as wit_translation;
use crate::convert;
use crate::types::{CatalogueEntry, Fleet};
use crate::{Evictor, PolicyError, Router, Translator, TranslatorStream};

/// What a router instance keeps between calls.
struct RouterResident {
    instance: Option<Box<dyn Any>>,
    catalogue: Vec<CatalogueEntry>,
    fleet: Fleet,
}

thread_local! {
    static ROUTER: RefCell<RouterResident> = RefCell::new(RouterResident {
        instance: None,
        catalogue: Vec::new(),
        fleet: Fleet::default(),
    });
    static EVICTOR: RefCell<Option<Box<dyn Any>>> = RefCell::new(None);
    static TRANSLATOR: RefCell<Option<Box<dyn Any>>> = RefCell::new(None);
}

fn not_configured(kind: &str) -> PolicyError {
    PolicyError::Internal(format!("the {kind} was called before `configure`"))
}

/// Exports a [`Router`] as the `routing` interface. Use [`crate::export_router!`].
#[doc(hidden)]
pub struct RouterExport<R>(PhantomData<R>);

impl<R: Router> wit_routing::Guest for RouterExport<R> {
    fn configure(settings: String) -> Result<(), wit::PolicyError> {
        let router = R::configure(&settings).map_err(wit::PolicyError::from)?;
        ROUTER.with_borrow_mut(|resident| resident.instance = Some(Box::new(router)));
        Ok(())
    }

    fn set_catalogue(entries: Vec<wit::CatalogueEntry>) {
        let entries = entries.into_iter().map(CatalogueEntry::from).collect();
        ROUTER.with_borrow_mut(|resident| resident.catalogue = entries);
    }

    fn set_fleet(fleet: wit::Fleet) {
        let fleet = Fleet::from(fleet);
        ROUTER.with_borrow_mut(|resident| resident.fleet = fleet);
    }

    fn route(request: wit::RequestInfo) -> Result<wit::Decision, wit::PolicyError> {
        let request = convert::request_info(request);
        ROUTER
            .with_borrow(|resident| {
                let router = resident
                    .instance
                    .as_ref()
                    .and_then(|instance| instance.downcast_ref::<R>())
                    .ok_or_else(|| not_configured("router"))?;
                router.route(&request, &resident.catalogue, &resident.fleet)
            })
            .map(wit::Decision::from)
            .map_err(wit::PolicyError::from)
    }
}

/// Exports an [`Evictor`] as the `eviction` interface. Use [`crate::export_evictor!`].
#[doc(hidden)]
pub struct EvictorExport<E>(PhantomData<E>);

impl<E: Evictor> wit_eviction::Guest for EvictorExport<E> {
    fn configure(settings: String) -> Result<(), wit::PolicyError> {
        let evictor = E::configure(&settings).map_err(wit::PolicyError::from)?;
        EVICTOR.with_borrow_mut(|slot| *slot = Some(Box::new(evictor)));
        Ok(())
    }

    fn choose_victims(
        on: wit::Node,
        need_mb: u64,
        incoming: wit::CatalogueEntry,
    ) -> Result<Vec<String>, wit::PolicyError> {
        let on = crate::types::Node::from(on);
        let incoming = CatalogueEntry::from(incoming);
        EVICTOR
            .with_borrow(|slot| {
                let evictor = slot
                    .as_ref()
                    .and_then(|instance| instance.downcast_ref::<E>())
                    .ok_or_else(|| not_configured("evictor"))?;
                evictor.choose_victims(&on, need_mb, &incoming)
            })
            .map_err(wit::PolicyError::from)
    }
}

/// Exports a [`Translator`] as the `translation` interface. Use
/// [`crate::export_translator!`].
#[doc(hidden)]
pub struct TranslatorExport<T>(PhantomData<T>);

fn with_translator<T: Translator, O>(call: impl FnOnce(&T) -> O) -> Result<O, PolicyError> {
    TRANSLATOR.with_borrow(|slot| {
        slot.as_ref()
            .and_then(|instance| instance.downcast_ref::<T>())
            .map(call)
            .ok_or_else(|| not_configured("translator"))
    })
}

impl<T: Translator> wit_translation::Guest for TranslatorExport<T> {
    type ResponseStream = StreamExport<T>;

    fn configure(settings: String) -> Result<(), wit::PolicyError> {
        let translator = T::configure(&settings).map_err(wit::PolicyError::from)?;
        TRANSLATOR.with_borrow_mut(|slot| *slot = Some(Box::new(translator)));
        Ok(())
    }

    fn request_to_chat(from: wit::Surface, body: String) -> Result<String, wit::PolicyError> {
        let from = crate::types::Surface::from(from);
        with_translator(|translator: &T| translator.request_to_chat(from, &body))
            .and_then(|result| result)
            .map_err(wit::PolicyError::from)
    }

    fn response_from_chat(
        to: wit::Surface,
        request: String,
        body: String,
    ) -> Result<String, wit::PolicyError> {
        let to = crate::types::Surface::from(to);
        with_translator(|translator: &T| translator.response_from_chat(to, &request, &body))
            .and_then(|result| result)
            .map_err(wit::PolicyError::from)
    }
}

/// One `response-stream` resource: the policy's stream state behind a `RefCell`,
/// because resource methods receive `&self`.
#[doc(hidden)]
pub struct StreamExport<T: Translator> {
    stream: RefCell<T::Stream>,
}

fn events(events: Vec<crate::types::SseEvent>) -> Vec<wit_translation::SseEvent> {
    events.into_iter().map(convert::sse_event).collect()
}

impl<T: Translator> wit_translation::GuestResponseStream for StreamExport<T> {
    fn new(to: wit::Surface, request: String, response_id: String) -> Self {
        let to = crate::types::Surface::from(to);
        match with_translator(|translator: &T| translator.new_stream(to, &request, &response_id)) {
            Ok(stream) => StreamExport {
                stream: RefCell::new(stream),
            },
            // A constructor cannot return an error; trapping makes the host fall back.
            Err(error) => panic!("{error}"),
        }
    }

    fn push(&self, chunk: String) -> Result<Vec<wit_translation::SseEvent>, wit::PolicyError> {
        self.stream
            .borrow_mut()
            .push(&chunk)
            .map(events)
            .map_err(wit::PolicyError::from)
    }

    fn keepalive(&self) -> Vec<wit_translation::SseEvent> {
        events(self.stream.borrow_mut().keepalive())
    }

    fn finish(&self) -> Result<Vec<wit_translation::SseEvent>, wit::PolicyError> {
        self.stream
            .borrow_mut()
            .finish()
            .map(events)
            .map_err(wit::PolicyError::from)
    }

    fn fail(&self, message: String) -> Vec<wit_translation::SseEvent> {
        events(self.stream.borrow_mut().fail(&message))
    }
}
