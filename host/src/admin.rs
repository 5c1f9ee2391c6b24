//! The admin API, mounted on the main listener next to the client API:
//! - `GET /admin/plugins`: installed plugins (manifest, live or not, calls and errors of
//!   the live ones) and the reload state per world;
//! - `POST /admin/plugins/reload`: re-read the config and the store and swap in the new
//!   policy set (200 with the report, 422 with the reason when the running set is kept).
//!
//! Every route wants `Authorization: Bearer <[admin] key>`: 401 without credentials,
//! 403 with a wrong key or when no admin key is configured (the admin API is then
//! off). `/health` stays public. Errors use the OpenAI envelope like the rest of the API.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::policy::PluginManager;

#[derive(Clone)]
struct AdminState {
    manager: Arc<PluginManager>,
    key: Option<Arc<str>>,
}

/// The admin routes for `manager`, guarded by `key` (`None`: every route answers 403).
pub fn router(manager: Arc<PluginManager>, key: Option<String>) -> Router {
    Router::new()
        .route("/admin/plugins", get(list))
        .route("/admin/plugins/reload", post(reload))
        .with_state(AdminState {
            manager,
            key: key.map(Arc::from),
        })
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": null, "param": null}});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Checks `Authorization: Bearer <key>` against the configured admin key; every admin
/// route (plugins here, fleet load/unload in `fleet_admin`) goes through it.
pub(crate) fn authorize(key: Option<&str>, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(key) = key else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "the admin API is disabled: set [admin] key (or key_env) in the gateway config, or start `helexa --admin-key KEY up`",
        )));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing admin key: send `Authorization: Bearer <admin key>` (helexa --admin-key / HELEXA_ADMIN_KEY)",
        )));
    };
    if constant_time_eq(key.as_bytes(), presented.as_bytes()) {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "invalid admin key",
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn list(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(state.key.as_deref(), &headers) {
        return *denied;
    }
    let manager = Arc::clone(&state.manager);
    let listed = tokio::task::spawn_blocking(move || {
        let manifests = manager.store().list()?;
        let active = manager.store().active()?;
        let set = manager.handle().load();
        let live = set.describe();
        let plugins: Vec<serde_json::Value> = manifests
            .into_iter()
            .map(|m| {
                let is_active = active.get(m.world) == Some(m.name.as_str());
                let status = live.iter().find(|s| {
                    !s.is_default && s.kind == m.world && s.name == m.name && s.version == m.version
                });
                json!({
                    "manifest": m,
                    "active": is_active,
                    "calls": status.map(|s| s.calls),
                    "errors": status.map(|s| s.errors),
                })
            })
            .collect();
        Ok::<_, crate::plugin_store::StoreError>(json!({
            "plugins": plugins,
            "live": live,
            "reload": manager.health(),
        }))
    })
    .await;
    match listed {
        Ok(Ok(body)) => axum::Json(body).into_response(),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &format!("listing task failed: {e}"),
        ),
    }
}

async fn reload(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(state.key.as_deref(), &headers) {
        return *denied;
    }
    let manager = Arc::clone(&state.manager);
    match tokio::task::spawn_blocking(move || manager.reload("admin", true)).await {
        Ok(report) if report.ok => axum::Json(report).into_response(),
        Ok(report) => (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(report)).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &format!("reload task failed: {e}"),
        ),
    }
}
