//! Automatic recovery of models that hit a device fault: the node marks the models of the faulted
//! device `failed` and reloads them in the background from the requests they were loaded with
//! (`failed` → `loading` → `ready`). On the in-process fake engine, whose `device_fault` switch
//! makes `generate` fail with `DEVICE_FAULT` on demand, and on the real node binary with the real
//! CPU engine and its `HELEXA_ENGINE_INJECT_FAULT` switch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use helexa_node::config::Admission;
use helexa_node::fake::FakeBackend;
use helexa_node::state::AppState;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::fixtures;

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(app: &Router, path: &str, body: &Value) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    send(app, request).await
}

async fn get(app: &Router, path: &str) -> Value {
    send(
        app,
        Request::get(path).body(Body::empty()).expect("request"),
    )
    .await
    .1
}

/// The `/models` entry of `id`.
async fn entry(app: &Router, id: &str) -> Value {
    let models = get(app, "/models").await;
    models["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls `/models` until `id` is in `state` (bounded).
async fn wait_for(app: &Router, id: &str, state: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = entry(app, id).await;
        if e["state"] == state {
            return e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never reached {state}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
}

#[tokio::test]
async fn a_faulted_model_is_reloaded_automatically_and_serves_again() {
    let mut backend = FakeBackend::new(Box::new(|_: &[u32]| vec![9707, 0, 1]));
    // Loads take long enough for `loading` to be observed between `failed` and `ready`.
    backend.load_delay = Some(Duration::from_millis(300));
    let backend = Arc::new(backend);
    let state = AppState::new(backend.clone(), Admission::default(), None).expect("state");
    state.set_recovery_delays(vec![Duration::from_millis(200); 3]);
    let app = helexa_node::app(state);
    for id in ["tiny", "other"] {
        let load = json!({"id": id, "source": fixtures().join("tiny-qwen3")});
        let (status, body) = post(&app, "/models/load", &load).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    backend.device_fault.store(true, Ordering::SeqCst);
    let (status, body) = post(&app, "/v1/chat/completions", &chat("tiny")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "model_failed");
    backend.device_fault.store(false, Ordering::SeqCst);

    // Failed, with the reason, in /models and /health.
    let failed = entry(&app, "tiny").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .expect("error")
            .contains("fake device lost"),
        "{failed}"
    );
    let health = get(&app, "/health").await;
    assert_eq!(health["status"], "degraded", "{health}");
    // The fake has one device, so the model sharing it is failed too (the engine poisons every
    // model of a faulted device), naming the model that hit the fault.
    let neighbour = entry(&app, "other").await;
    assert_eq!(neighbour["state"], "failed", "{neighbour}");
    assert!(
        neighbour["error"]
            .as_str()
            .expect("error")
            .contains("while serving tiny"),
        "{neighbour}"
    );

    // No operator action: the node reloads both.
    wait_for(&app, "tiny", "loading").await;
    wait_for(&app, "tiny", "ready").await;
    wait_for(&app, "other", "ready").await;
    for id in ["tiny", "other"] {
        let (status, body) = post(&app, "/v1/chat/completions", &chat(id)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let health = get(&app, "/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    // The faulted handles were freed: exactly the two live models remain in the engine.
    use helexa_node::backend::Backend as _;
    assert_eq!(backend.memory().expect("memory").models.len(), 2);
    // Operators see the fault and the recovery in the metrics.
    let (_, metrics) = send(
        &app,
        Request::get("/metrics")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    let metrics = metrics.as_str().expect("text exposition").to_owned();
    for line in [
        r#"helexa_node_device_faults_total{model="tiny"} 1"#,
        r#"helexa_node_device_faults_total{model="other"} 1"#,
        r#"helexa_node_model_recoveries_total{model="tiny",outcome="recovered"} 1"#,
        r#"helexa_node_model_recoveries_total{model="other",outcome="recovered"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test]
async fn recovery_stops_when_the_operator_unloads_the_model() {
    let backend = Arc::new(FakeBackend::new(Box::new(|_: &[u32]| vec![9707])));
    let state = AppState::new(backend.clone(), Admission::default(), None).expect("state");
    state.set_recovery_delays(vec![Duration::from_millis(100)]);
    let app = helexa_node::app(state);
    let load = json!({"id": "tiny", "source": fixtures().join("tiny-qwen3")});
    let (status, body) = post(&app, "/models/load", &load).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    backend.device_fault.store(true, Ordering::SeqCst);
    let (status, _) = post(&app, "/v1/chat/completions", &chat("tiny")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    backend.device_fault.store(false, Ordering::SeqCst);
    let (status, body) = post(&app, "/models/unload", &json!({"id": "tiny"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Past the recovery delay, the id stays gone: recovery saw the unload and gave up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(entry(&app, "tiny").await, Value::Null);
    use helexa_node::backend::Backend as _;
    assert!(backend.memory().expect("memory").models.is_empty());
}

/// The node binary as a child process, killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_engine_injected_fault_is_recovered_by_the_node() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // The switch is set on the child only: the first generate on "victim" faults the device.
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_helexa-node"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--engine")
            .arg(crate::engine_library())
            .env("RUST_LOG", "warn")
            .env("HELEXA_ENGINE_INJECT_FAULT", "0:victim")
            .env_remove("HELEXA_NODE_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start helexa-node"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(child.0.try_wait().expect("wait").is_none(), "node exited");
        assert!(std::time::Instant::now() < deadline, "node never healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let call = |path: &str, body: Option<Value>| {
        let request = match body {
            Some(b) => client.post(format!("{base}{path}")).json(&b),
            None => client.get(format!("{base}{path}")),
        };
        async move {
            let r = request.send().await.expect("request");
            let status = r.status().as_u16();
            let text = r.text().await.expect("body");
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    for id in ["victim", "bystander"] {
        let load = json!({"id": id, "source": fixtures().join("tiny-qwen3"), "dtype": "f32"});
        let (status, body) = call("/models/load", Some(load)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = call("/v1/chat/completions", Some(chat("victim"))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("HELEXA_ENGINE_INJECT_FAULT"),
        "{body}"
    );
    let state_of = |models: &Value, id: &str| {
        models["data"]
            .as_array()
            .expect("data")
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["state"].as_str().expect("state").to_owned())
    };
    let (_, models) = call("/models", None).await;
    // Both share the CPU device the fault poisoned (recovery waits 1 s before reloading).
    assert_eq!(
        state_of(&models, "victim").as_deref(),
        Some("failed"),
        "{models}"
    );
    assert_eq!(
        state_of(&models, "bystander").as_deref(),
        Some("failed"),
        "{models}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, models) = call("/models", None).await;
        if ["victim", "bystander"]
            .iter()
            .all(|id| state_of(&models, id).as_deref() == Some("ready"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {models}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in ["victim", "bystander"] {
        let (status, body) = call("/v1/chat/completions", Some(chat(id))).await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    let (_, health) = call("/health", None).await;
    assert_eq!(health["status"], "ok", "{health}");
}
