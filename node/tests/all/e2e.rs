//! End to end: the real `helexa-node` binary with the real CPU engine library and the trained
//! tiny-qwen3 fixture, over TCP.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{fixtures, read_json};

struct Node {
    child: Child,
    base: String,
}

impl Node {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_helexa-node"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--engine")
            .arg(crate::engine_library())
            .env("RUST_LOG", "warn")
            .env_remove("HELEXA_NODE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start helexa-node");
        Node {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn wait_ready(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/health", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("helexa-node exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("helexa-node did not become healthy");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn check_weather_call(call: &Value) {
    assert!(call["id"].as_str().expect("id").starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("string"))
        .expect("json");
    assert_eq!(args["city"], "Oslo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_real_engine_tool_call() {
    let client = reqwest::Client::new();
    let mut node = Node::start();
    node.wait_ready(&client).await;
    let base = node.base.clone();

    let (status, body) = post(
        &client,
        format!("{base}/models/load"),
        json!({"id": "tiny-qwen3", "source": fixtures().join("tiny-qwen3"), "dtype": "f32"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let reference = read_json(&fixtures().join("tiny-qwen3/reference.json"));
    let tools = &reference["prompts"]["tools"];
    let (status, body) = post(
        &client,
        format!("{base}/tokenize"),
        json!({"model": "tiny-qwen3", "prompt": tools["text"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["count"],
        tools["token_ids"].as_array().expect("ids").len()
    );

    // The fixture's greedy continuation of this prompt is
    // <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>.
    let request = json!({"model": "tiny-qwen3", "messages": tools["messages"], "tools": tools["tools"],
                         "temperature": 0, "max_tokens": 64});
    let (status, body) = post(
        &client,
        format!("{base}/v1/chat/completions"),
        request.clone(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    check_weather_call(&choice["message"]["tool_calls"][0]);
    assert_eq!(body["usage"]["prompt_tokens"], 258);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.expect("body");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk"))
        .collect();
    let call = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned())
        .expect("a tool-call delta");
    check_weather_call(&call);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
    assert_eq!(
        chunks.last().expect("usage chunk")["usage"]["prompt_tokens"],
        258
    );

    // `tool_choice` naming the tool on a prompt that asks for no tool: the reply starts inside
    // that call, and the real model completes its arguments.
    let chat = &reference["prompts"]["chat"];
    let forced = json!({"model": "tiny-qwen3", "messages": chat["messages"], "tools": tools["tools"],
                        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                        "temperature": 0, "max_tokens": 64});
    let (status, body) = post(&client, format!("{base}/v1/chat/completions"), forced).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{body}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("string"))
        .expect("the model completed the arguments as JSON");
    assert!(args["city"].is_string(), "{body}");

    // Bad input is a 4xx envelope, not a crash.
    let (status, body) = post(
        &client,
        format!("{base}/v1/chat/completions"),
        json!({"model": "tiny-qwen3", "messages": [{"role": "user"}], "top_p": 0}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("top_p")
    );

    // SIGTERM drains and exits cleanly.
    let pid = node.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = node.child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
