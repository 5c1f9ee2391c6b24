"""Auth (Bearer and x-api-key), llama-server-style discovery (/props, /models) and the
fleet CLI against `helexa up`."""

import json
import os
import subprocess

import anthropic
import openai
import pytest

from conftest import ADMIN_KEY, API_KEY, MODEL, bin_dir


def test_bearer_and_x_api_key_both_authenticate(stack):
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({"authorization": f"Bearer {API_KEY}"}, {"x-api-key": API_KEY}):
        status, answer = stack.post_json(f"{stack.base}/v1/chat/completions", body, headers)
        assert status == 200, (headers, answer)
        status, answer = stack.post_json(f"{stack.base}/v1/messages", body, headers)
        assert status == 200, (headers, answer)
    status, answer = stack.post_json(f"{stack.base}/v1/messages", body)
    assert status == 401 and answer["type"] == "error", answer


def test_wrong_keys_are_refused_by_both_sdks(stack):
    bad_openai = openai.OpenAI(base_url=f"{stack.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_openai.models.list()
    bad_claude = anthropic.Anthropic(base_url=stack.base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_claude.messages.create(model=MODEL, max_tokens=4,
                                   messages=[{"role": "user", "content": "hi"}])


def test_llama_server_props_and_models(stack):
    props = stack.get_json(f"{stack.base}/props")
    assert props["model_path"] == MODEL
    assert props["total_slots"] >= 1
    # The demo model's config.json: max_position_embeddings.
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert stack.get_json(f"{stack.base}/props?model=claude-sonnet-4-5")["model_path"] == MODEL
    models = stack.get_json(f"{stack.base}/models")
    [entry] = [m for m in models["data"] if m["id"] == MODEL]
    assert entry["status"]["value"] == "loaded"
    assert [m["name"] for m in models["models"]] == [m["id"] for m in models["data"]]


def helexa(stack, *args):
    env = {**os.environ, "HELEXA_API_KEY": API_KEY}
    env.pop("RUST_BACKTRACE", None)
    return subprocess.run(
        [str(bin_dir() / "helexa"), "--gateway", stack.base, "--admin-key", ADMIN_KEY, *args],
        capture_output=True, text=True, timeout=120, env=env)


def test_status_and_models_commands(stack):
    status = helexa(stack, "status")
    assert status.returncode == 0, status.stderr
    assert "local" in status.stdout and MODEL in status.stdout and "ready" in status.stdout
    as_json = json.loads(helexa(stack, "status", "--json").stdout)
    assert as_json["nodes"][0]["models"][0]["id"] == MODEL
    models = helexa(stack, "models")
    assert models.returncode == 0 and MODEL in models.stdout, models.stderr


def test_unload_then_load_through_the_admin_api(stack, oai):
    unloaded = helexa(stack, "unload", MODEL, "--json")
    assert unloaded.returncode == 0, unloaded.stderr
    assert json.loads(unloaded.stdout)["unloaded_from"] == ["local"]
    assert MODEL not in helexa(stack, "status").stdout.split("MODELS ON NODES")[1].split("POLICIES")[0]
    loaded = helexa(stack, "load", MODEL, "--node", "local")
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded on local" in loaded.stderr + loaded.stdout
    assert json.loads(helexa(stack, "load", MODEL, "--json").stdout)["already_loaded"] is True
    # And it serves again.
    assert oai.chat.completions.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]).choices
    missing = helexa(stack, "load", "no-such-model")
    assert missing.returncode != 0 and "not in this gateway's catalogue" in missing.stderr


def test_cli_says_what_to_do_when_the_gateway_is_down(stack):
    down = subprocess.run([str(bin_dir() / "helexa"), "--gateway", "http://127.0.0.1:9", "status"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode != 0
    assert "helexa up" in down.stderr
