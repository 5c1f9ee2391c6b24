#!/usr/bin/env python3
"""Device-fault drill on a real device: start `helexa-node` with an engine library and
`HELEXA_ENGINE_INJECT_FAULT`, load two models on the same device, make the first fault, and
check what the node promises (node/README.md, "Device faults"): the request that hit it gets 503
`model_failed`, both models of the device read `failed` with the reason, the node reloads them
by itself, both serve again, and `/metrics` counts the fault and the recoveries. Prints a
timeline and writes it as JSON.

    python3 scripts/device/fault_check.py NODE_BIN ENGINE.so FIXTURES_DIR OUT.json

Standard library only (the GPU machine has no Rust and no internet).
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, path, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        status = e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def states(base):
    _, models = call(base, "/models")
    return {m["id"]: (m["state"], m.get("error")) for m in models.get("data", [])}


def main():
    node, engine, fixtures, out = sys.argv[1:5]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, RUST_LOG="warn", HELEXA_ENGINE_INJECT_FAULT="2:victim")
    env.pop("HELEXA_NODE_CONFIG", None)
    child = subprocess.Popen([node, "--listen", f"127.0.0.1:{port}", "--engine", engine], env=env)
    t0 = time.monotonic()
    timeline = []
    checks = {}

    def mark(event, **data):
        entry = {"t_ms": round((time.monotonic() - t0) * 1000), "event": event, **data}
        timeline.append(entry)
        print(json.dumps(entry), flush=True)

    try:
        while True:
            try:
                if call(base, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if child.poll() is not None or time.monotonic() - t0 > 60:
                raise SystemExit("node did not come up")
            time.sleep(0.05)
        mark("node up")
        for mid, fixture in (("victim", "tiny-qwen3"), ("bystander", "tiny-llama")):
            status, body = call(base, "/models/load",
                                {"id": mid, "source": os.path.join(fixtures, fixture)})
            mark("loaded", id=mid, status=status, devices=body.get("devices") if isinstance(body, dict) else None)
            checks[f"load {mid}"] = status == 200
        chat = lambda mid: {"model": mid, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Say hi."}]}
        status, body = call(base, "/v1/chat/completions", chat("victim"))
        message = body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)
        mark("victim request", status=status, error=message)
        checks["faulted request is 503 model_failed"] = (
            status == 503 and body.get("error", {}).get("code") == "model_failed")
        seen = states(base)
        mark("after fault", states=seen)
        checks["both models of the device failed"] = all(
            seen.get(m, ("",))[0] == "failed" for m in ("victim", "bystander"))
        _, health = call(base, "/health")
        checks["health degraded"] = health.get("status") == "degraded"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen = states(base)
            if all(seen.get(m, ("",))[0] == "ready" for m in ("victim", "bystander")):
                break
            time.sleep(0.05)
        mark("recovered", states=seen)
        checks["both recovered"] = all(seen.get(m, ("",))[0] == "ready" for m in ("victim", "bystander"))
        for mid in ("victim", "bystander"):
            status, body = call(base, "/v1/chat/completions", chat(mid))
            text = body["choices"][0]["message"].get("content") if status == 200 else body
            mark("serves again", id=mid, status=status, text=text)
            checks[f"{mid} serves after recovery"] = status == 200
        _, health = call(base, "/health")
        mark("health", status=health.get("status"), devices=health.get("devices"))
        checks["health ok"] = health.get("status") == "ok"
        _, metrics = call(base, "/metrics")
        lines = [l for l in str(metrics).splitlines()
                 if l.startswith(("helexa_node_device_faults_total", "helexa_node_model_recoveries_total"))]
        mark("metrics", lines=lines)
        checks["metrics count the recoveries"] = any('outcome="recovered"' in l for l in lines)
    finally:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    failed = [k for k, ok in checks.items() if not ok]
    report = {"checks": checks, "failed": failed, "timeline": timeline}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
