//! The only `wit_bindgen::generate!` calls of the project, one module per world of
//! `helexa:policy@0.1.0` (bound from the frozen `wit/deps/helexa-policy@0.1.0`, because
//! `wit/` itself holds the same package version a second time).
//!
//! Nothing here is meant to be used directly: policy crates write plain Rust against
//! [`crate::types`] and call the `export_*!` macros, which drive these bindings.
//!
//! `pub_export_macro` makes wit-bindgen split each world's type information in two:
//! the section emitted here describes only the world's *imports* (harmless to link
//! into any component), and the section carrying the *exports* is emitted where the
//! export macro is invoked. That is what lets one SDK rlib serve all three worlds
//! without a router component also claiming to export `eviction` or `translation`.

/// Bindings of the `router` world (`export routing`).
pub mod router {
    wit_bindgen::generate!({
        path: "../../wit/deps/helexa-policy@0.1.0",
        world: "router",
        pub_export_macro: true,
        export_macro_name: "export_router_world",
        default_bindings_module: "::helexa_policy_sdk::bindings::router",
    });
}

/// Bindings of the `evictor` world (`export eviction`); shares the router world's
/// `types` and `log` bindings.
pub mod evictor {
    wit_bindgen::generate!({
        path: "../../wit/deps/helexa-policy@0.1.0",
        world: "evictor",
        pub_export_macro: true,
        export_macro_name: "export_evictor_world",
        default_bindings_module: "::helexa_policy_sdk::bindings::evictor",
        with: {
            "helexa:policy/types@0.1.0": crate::bindings::router::helexa::policy::types,
            "helexa:policy/log@0.1.0": crate::bindings::router::helexa::policy::log,
        },
    });
}

/// Bindings of the `translator` world (`export translation`); shares the router
/// world's `types` and `log` bindings.
pub mod translator {
    wit_bindgen::generate!({
        path: "../../wit/deps/helexa-policy@0.1.0",
        world: "translator",
        pub_export_macro: true,
        export_macro_name: "export_translator_world",
        default_bindings_module: "::helexa_policy_sdk::bindings::translator",
        with: {
            "helexa:policy/types@0.1.0": crate::bindings::router::helexa::policy::types,
            "helexa:policy/log@0.1.0": crate::bindings::router::helexa::policy::log,
        },
    });
}
