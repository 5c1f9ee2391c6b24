//! The fleet commands: `helexa status` and `helexa models` read a running gateway's
//! `GET /health` and `GET /v1/models` (`--gateway URL`) and print a table, or the
//! gateway's JSON unchanged with `--json` (for scripts). `helexa load` and `helexa unload`
//! call the gateway's admin routes (`/admin/models/load|unload`, `--admin-key`).
//!
//! The node's `POST /models/load` answers once the model is ready; meanwhile `load` polls
//! `/health`, where each node's loading model carries `progress` (phase `resolving`,
//! `downloading` with bytes done/total, `loading_weights`), and shows a spinner with the
//! elapsed time and each node's state, turning into a byte bar while a download runs. The
//! engine reads weights in one call, so that last phase has no percentage.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

/// `--json`: print the gateway's JSON instead of a table.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON (the gateway's answer) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `helexa load` arguments.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Catalogue id or alias.
    pub model: String,
    /// Load it on this node (default: where the router policy places it).
    #[arg(long)]
    pub node: Option<String>,
    /// Print the gateway's JSON answer instead of progress.
    #[arg(long)]
    pub json: bool,
}

/// `helexa unload` arguments.
#[derive(Debug, Args)]
pub struct UnloadArgs {
    /// Catalogue id or alias.
    pub model: String,
    /// Only from this node (default: every node that holds it).
    #[arg(long)]
    pub node: Option<String>,
    /// Print the gateway's JSON answer.
    #[arg(long)]
    pub json: bool,
}

fn unreachable(gateway: &str, e: &reqwest::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach the gateway at {gateway} ({e}).\nStart one with `helexa up` (or `helexa serve --config helexa.toml`), or point --gateway / HELEXA_GATEWAY at a running one."
    )
}

/// POST an admin route; errors carry the gateway's message and what to do.
async fn admin_post(
    gateway: &str,
    admin_key: Option<&str>,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let Some(key) = admin_key else {
        bail!(
            "{path} needs the gateway's admin key: pass --admin-key KEY or set HELEXA_ADMIN_KEY (the `[admin] key` of the gateway config; `helexa --admin-key KEY up` sets it for a local stack)"
        );
    };
    let url = format!("{}{path}", gateway.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .map_err(|e| unreachable(gateway, &e))?;
    let status = response.status();
    let answer: Value = response
        .json()
        .await
        .with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        let message = answer["error"]["message"]
            .as_str()
            .map_or_else(|| answer.to_string(), str::to_owned);
        bail!("{status}: {message}");
    }
    Ok(answer)
}

/// The state of `model` on each node, from `/health`: `node: state` pairs.
/// Where a load stands, from the gateway's `/health`: a line of per-node states, and the
/// byte progress of a download when a node reports one.
struct LoadView {
    states: String,
    /// Bytes done and total of a download under way (total 0: nothing to download).
    bytes: Option<(u64, u64)>,
}

async fn load_view(gateway: &str, model: &str) -> Option<LoadView> {
    let health = get_json(gateway, "/health").await.ok()?;
    let mut bytes = None;
    let states: Vec<String> = health["nodes"]
        .as_array()?
        .iter()
        .filter_map(|node| {
            let found = node["models"]
                .as_array()?
                .iter()
                .find(|m| m["id"] == model)?;
            let progress = &found["progress"];
            let phase = progress["phase"].as_str();
            if let (Some(done), Some(total)) = (
                progress["done_bytes"].as_u64(),
                progress["total_bytes"].as_u64(),
            ) && total > 0
            {
                bytes = Some((done, total));
            }
            Some(match phase {
                Some(phase) => format!("{}: {} ({phase})", s(&node["name"]), s(&found["state"])),
                None => format!("{}: {}", s(&node["name"]), s(&found["state"])),
            })
        })
        .collect();
    Some(LoadView {
        states: if states.is_empty() {
            "not on any node yet".to_owned()
        } else {
            states.join(", ")
        },
        bytes,
    })
}

/// `helexa load`.
pub async fn load(gateway: &str, admin_key: Option<&str>, args: LoadArgs) -> anyhow::Result<()> {
    let body = json!({"model": args.model, "node": args.node});
    if args.json {
        let answer = admin_post(gateway, admin_key, "/admin/models/load", &body).await?;
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    // The catalogue id (aliases resolved) names the model in /health.
    let models = get_json(gateway, "/v1/models").await?;
    let id = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| {
            m["id"] == args.model.as_str()
                || m["aliases"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == args.model.as_str()))
        })
        .and_then(|m| m["id"].as_str())
        .unwrap_or(&args.model)
        .to_owned();
    let where_ = args.node.as_deref().map_or_else(
        || "where the router places it".to_owned(),
        |n| format!("on {n}"),
    );
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .context("progress style")?,
    );
    // Switched to once a node reports a download with a size.
    let bar_style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
    )
    .context("progress style")?
    .progress_chars("=> ");
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner.set_message(format!("loading {id} {where_}"));
    let started = Instant::now();
    let request = admin_post(gateway, admin_key, "/admin/models/load", &body);
    tokio::pin!(request);
    let mut last_states = String::new();
    let answer = loop {
        tokio::select! {
            answer = &mut request => break answer,
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                let Some(view) = load_view(gateway, &id).await else { continue };
                if let Some((done, total)) = view.bytes {
                    if spinner.length() != Some(total) {
                        spinner.set_style(bar_style.clone());
                        spinner.set_length(total);
                    }
                    spinner.set_position(done);
                }
                if view.states != last_states {
                    let line = format!("  {:>6.1}s  {}", started.elapsed().as_secs_f64(), view.states);
                    // Without a terminal indicatif draws nothing: log the transitions plainly.
                    if spinner.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        spinner.println(line);
                    }
                    spinner.set_message(format!("loading {id} {where_} — {}", view.states));
                    last_states = view.states;
                }
            }
        }
    };
    match answer {
        Ok(answer) => {
            let verb = if answer["already_loaded"] == true {
                "already loaded"
            } else {
                "loaded"
            };
            let done = format!(
                "{id} {verb} on {} in {:.1} s",
                s(&answer["node"]),
                answer["load_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
            );
            if spinner.is_hidden() {
                println!("{done}");
            }
            spinner.finish_with_message(done);
            Ok(())
        }
        Err(e) => {
            spinner.abandon_with_message(format!("loading {id} failed"));
            Err(e)
        }
    }
}

/// `helexa unload`.
pub async fn unload(
    gateway: &str,
    admin_key: Option<&str>,
    args: UnloadArgs,
) -> anyhow::Result<()> {
    let body = json!({"model": args.model, "node": args.node});
    let answer = admin_post(gateway, admin_key, "/admin/models/unload", &body).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let from: Vec<String> = answer["unloaded_from"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        println!("{} unloaded from {}", s(&answer["model"]), from.join(", "));
    }
    Ok(())
}

/// GET `path` from the gateway as JSON, with errors that say what to do next.
pub(crate) async fn get_json(gateway: &str, path: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path}", gateway.trim_end_matches('/'));
    let mut request = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10));
    // `/v1/models` wants an API key when the gateway has auth on.
    if let Ok(key) = std::env::var("HELEXA_API_KEY")
        && !key.is_empty()
    {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|e| unreachable(gateway, &e))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!("{url} wants an API key: set HELEXA_API_KEY to one of the gateway's keys");
    }
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))
}

/// `helexa status`.
pub async fn status(gateway: &str, args: JsonFlag) -> anyhow::Result<()> {
    let health = get_json(gateway, "/health").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&health)?);
    } else {
        print!("{}", render_status(gateway, &health));
    }
    Ok(())
}

/// `helexa models`.
pub async fn models(gateway: &str, args: JsonFlag) -> anyhow::Result<()> {
    let models = get_json(gateway, "/v1/models").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
    } else {
        print!("{}", render_models(&models));
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// A `[#####.....]` bar of `used / total`, `width` cells wide.
pub(crate) fn bar(used: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        let cells = (used.min(total) as f64 / total as f64 * width as f64).round();
        cells as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Lay out rows (the first is the header) in aligned columns.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

fn render_status(gateway: &str, health: &Value) -> String {
    let mut out = format!(
        "gateway {gateway}: {} (v{}, up {}s, auth {}, fleet v{}, catalogue v{})\n",
        s(&health["status"]),
        s(&health["version"]),
        s(&health["uptime_secs"]),
        if health["auth"] == true { "on" } else { "off" },
        s(&health["fleet_version"]),
        s(&health["catalogue_version"]),
    );
    let nodes = health["nodes"].as_array().cloned().unwrap_or_default();
    out += &format!("\nNODES ({})\n", nodes.len());
    let mut rows = vec![vec![
        "NODE".to_owned(),
        "HEALTH".to_owned(),
        "ENGINE".to_owned(),
        "ENDPOINT".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for node in &nodes {
        rows.push(vec![
            s(&node["name"]),
            s(&node["health"]),
            node["engine"]["backend"]
                .as_str()
                .map_or("-".to_owned(), |b| {
                    format!("{b} {}", s(&node["engine"]["version"]))
                }),
            s(&node["endpoint"]),
            s(&node["last_error"]),
        ]);
    }
    out += &table(&rows);

    out += "\nDEVICES\n";
    let mut rows = vec![vec![
        "NODE".to_owned(),
        "#".to_owned(),
        "DEVICE".to_owned(),
        "MEMORY USED".to_owned(),
        String::new(),
    ]];
    for node in &nodes {
        for device in node["devices"].as_array().into_iter().flatten() {
            let total = device["vram_total_mb"].as_u64().unwrap_or(0);
            let free = device["vram_free_mb"].as_u64().unwrap_or(0);
            let used = total.saturating_sub(free);
            rows.push(vec![
                s(&node["name"]),
                s(&device["index"]),
                s(&device["name"]),
                bar(used, total, 20),
                format!("{used} / {total} MiB"),
            ]);
        }
    }
    out += &table(&rows);

    out += "\nMODELS ON NODES\n";
    let mut rows = vec![vec![
        "NODE".to_owned(),
        "MODEL".to_owned(),
        "STATE".to_owned(),
        "IN-FLIGHT".to_owned(),
        "QUEUE".to_owned(),
        "IDLE".to_owned(),
    ]];
    for node in &nodes {
        for model in node["models"].as_array().into_iter().flatten() {
            rows.push(vec![
                s(&node["name"]),
                s(&model["id"]),
                s(&model["state"]),
                s(&model["in_flight"]),
                s(&model["queue_depth"]),
                // The node reports 0 both while serving and before the first request.
                match model["idle_ms"].as_u64() {
                    Some(0) | None => "-".to_owned(),
                    Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
                },
            ]);
        }
    }
    out += &table(&rows);

    out += "\nPOLICIES\n";
    let mut rows = vec![vec![
        "KIND".to_owned(),
        "PLUGIN".to_owned(),
        "VERSION".to_owned(),
        "WIT".to_owned(),
        "CALLS".to_owned(),
        "ERRORS".to_owned(),
    ]];
    for policy in health["policies"].as_array().into_iter().flatten() {
        let builtin = if policy["is_default"] == true {
            " (built-in)"
        } else {
            ""
        };
        rows.push(vec![
            s(&policy["kind"]),
            format!("{}{builtin}", s(&policy["name"])),
            s(&policy["version"]),
            s(&policy["wit_version"]),
            s(&policy["calls"]),
            s(&policy["errors"]),
        ]);
    }
    out += &table(&rows);
    out
}

fn render_models(models: &Value) -> String {
    let mut rows = vec![vec![
        "MODEL".to_owned(),
        "LOADED ON".to_owned(),
        "CAN LOAD ON".to_owned(),
        "CAPABILITIES".to_owned(),
        "ALIASES".to_owned(),
    ]];
    let join = |v: &Value| {
        let items: Vec<String> = v.as_array().into_iter().flatten().map(s).collect();
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    for model in models["data"].as_array().into_iter().flatten() {
        rows.push(vec![
            s(&model["id"]),
            join(&model["locations"]),
            join(&model["feasible_on"]),
            join(&model["capabilities"]),
            join(&model["aliases"]),
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bars_scale_and_clamp() {
        assert_eq!(bar(0, 100, 4), "[....]");
        assert_eq!(bar(50, 100, 4), "[##..]");
        assert_eq!(bar(500, 100, 4), "[####]");
        assert_eq!(bar(1, 0, 4), "[....]");
    }

    #[test]
    fn status_renders_nodes_devices_and_models() {
        let health = json!({
            "status": "ok", "version": "0.1.0", "uptime_secs": 5, "auth": false,
            "fleet_version": 3, "catalogue_version": 1,
            "nodes": [{
                "name": "local", "endpoint": "http://127.0.0.1:1", "health": "healthy",
                "last_error": null, "engine": {"backend": "cpu", "version": "0.1.0"},
                "devices": [{"index": 0, "name": "cpu", "vram_total_mb": 1000, "vram_free_mb": 250}],
                "models": [{"id": "tiny-qwen3", "state": "ready", "in_flight": 1, "queue_depth": 0, "idle_ms": 1500}],
            }],
            "policies": [{"name": "default", "version": "0.1.0", "kind": "router",
                "wit_version": "0.1.0", "is_default": true, "calls": 4, "errors": 0}],
        });
        let text = render_status("http://g", &health);
        assert!(text.contains("local  healthy"), "{text}");
        assert!(
            text.contains("[###############.....]  750 / 1000 MiB"),
            "{text}"
        );
        assert!(text.contains("tiny-qwen3  ready"), "{text}");
        assert!(text.contains("1.5s"), "{text}");
        assert!(
            text.contains("router  default (built-in)  0.1.0    0.1.0  4      0"),
            "{text}"
        );
    }

    #[test]
    fn models_table_lists_locations() {
        let models = json!({"data": [{"id": "m", "locations": ["a"], "feasible_on": ["a", "b"],
            "capabilities": ["chat"], "aliases": ["claude-*"]}]});
        let text = render_models(&models);
        assert!(text.contains("m      a          a,b"), "{text}");
    }

    #[tokio::test]
    async fn unreachable_gateway_says_what_to_do() {
        let error = get_json("http://127.0.0.1:9", "/health").await.unwrap_err();
        assert!(error.to_string().contains("helexa up"), "{error}");
    }
}
