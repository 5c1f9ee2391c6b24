"""Fixtures of the Python client suite: one real `helexa up` (gateway + helexa-node + CPU
engine + the embedded tiny-qwen3 model) per test session, started from the built binaries,
and the official `openai` and `anthropic` SDK clients pointed at it.

The binaries are looked up in $HELEXA_BIN_DIR, else <target>/debug of the cargo target dir
($CARGO_TARGET_DIR or <workspace>/target). `.ci/test` builds them first.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import anthropic
import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "tiny-qwen3"
API_KEY = "test-key-7f3a"
ADMIN_KEY = "test-admin-key-1c9e"


def bin_dir() -> pathlib.Path:
    if os.environ.get("HELEXA_BIN_DIR"):
        return pathlib.Path(os.environ["HELEXA_BIN_DIR"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference() -> dict:
    """fixtures/tiny-qwen3/reference.json: the prompts the model is known to answer."""
    return json.loads((ROOT / "fixtures/tiny-qwen3/reference.json").read_text())


class Stack:
    """A running `helexa up`."""

    def __init__(self, process, base, node, log_path):
        self.process, self.base, self.node, self.log_path = process, base, node, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, url: str, headers=None) -> dict:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, url: str, body: dict, headers=None) -> tuple[int, dict]:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="session")
def stack():
    helexa = bin_dir() / "helexa"
    for artefact in (helexa, bin_dir() / "helexa-node", bin_dir() / "libhelexa_engine_cuda.so"):
        if not artefact.exists():
            pytest.fail(
                f"{artefact} is missing: run `cargo build -p helexa -p helexa-node "
                "-p helexa-engine-cuda` (or set HELEXA_BIN_DIR)"
            )
    home = pathlib.Path(tempfile.mkdtemp(prefix="helexa-pytest."))
    port, node_port = free_port(), free_port()
    env = {
        **os.environ,
        # The embedded model is extracted here, and no user plugin store is read.
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_DATA_HOME": str(home / "data"),
        "HELEXA_LOG": "warn",
    }
    for name in ("HELEXA_API_KEY", "HELEXA_ADMIN_KEY", "HELEXA_GATEWAY", "HELEXA_LISTEN"):
        env.pop(name, None)
    log_path = home / "up.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [
            str(helexa), "--admin-key", ADMIN_KEY, "up",
            "--listen", f"127.0.0.1:{port}",
            "--node-listen", f"127.0.0.1:{node_port}",
            "--api-key", API_KEY,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=home,  # `up` must not depend on the working directory
    )
    stack = Stack(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{node_port}", log_path)
    deadline = time.monotonic() + 120
    while "helexa is up" not in stack.log():
        if process.poll() is not None:
            pytest.fail(f"helexa up exited ({process.returncode}):\n{stack.log()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"helexa up not ready after 120 s:\n{stack.log()}")
        time.sleep(0.05)
    yield stack
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log.close()
    # Ctrl-C is a clean stop, and it takes the node down with it.
    assert code == 0, stack.log()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", node_port)) != 0, "helexa-node still listening"
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def oai(stack):
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def claude(stack):
    return anthropic.Anthropic(base_url=stack.base, api_key=API_KEY, max_retries=0, timeout=60)
