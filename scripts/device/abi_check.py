#!/usr/bin/env python3
"""Drive an engine library through the helexa C ABI from Python (ctypes) and check its greedy
output against the fixtures' references: transformers for safetensors (f32 and bf16), llama.cpp
for GGUF files. Written for the lent GPU machine (no Rust there), where the CUDA engine is the
library under test; it runs against the CPU engine too.

    python3 scripts/device/abi_check.py ENGINE.so FIXTURES_DIR OUT.json

It only uses what the C header (node/engine-abi/include/helexa_engine.h) declares, so it is also a
check that the ABI is usable from another language. Greedy tokens are compared up to the first
step whose reference top-1/top-2 margin is below the precision's threshold (beyond it rounding
may legitimately pick another token); the thresholds are in MARGIN below. Then every confident
reference step is checked again by teacher forcing (see `forced`), so a case whose free-running
comparison ends early still checks the rest of the reference. `compare_runs.py` compares two
reports (e.g. CPU and GPU) token by token.
"""
import ctypes as C
import json
import os
import sys
import time

# Below these reference margins a different greedy token is not a bug (see fixtures/README.md).
MARGIN = {"f32": 0.05, "bf16": 0.5, "BF16": 0.1, "Q8_0": 0.3, "Q6_K": 0.4, "Q4_K_M": 0.6}

ERR = C.c_void_p


class Entry(C.Structure):
    _fields_ = [("abi_major", C.c_uint32), ("abi_minor", C.c_uint32),
                ("init", C.c_void_p), ("deinit", C.c_void_p), ("get_interface", C.c_void_p)]


class Buf(C.Structure):
    _fields_ = [("ptr", C.POINTER(C.c_uint8)), ("len", C.c_size_t)]


class VTable(C.Structure):
    _fields_ = [("struct_size", C.c_size_t)] + [(n, C.c_void_p) for n in (
        "info", "load_model", "unload_model", "memory_report", "generate",
        "buf_free", "error_message", "error_kind", "error_free")]


ON_TOKEN = C.CFUNCTYPE(C.c_uint32, C.c_void_p, C.c_uint32)
ON_DONE = C.CFUNCTYPE(None, C.c_void_p, C.c_uint32, C.POINTER(C.c_uint8), C.c_size_t, ERR)


class Sink(C.Structure):
    _fields_ = [("userdata", C.c_void_p), ("on_token", ON_TOKEN), ("on_done", ON_DONE)]


class Engine:
    def __init__(self, path):
        self.lib = C.CDLL(path)
        entry = Entry.in_dll(self.lib, "helexa_engine_entry")
        assert entry.abi_major == 1, f"ABI {entry.abi_major}.{entry.abi_minor}"
        get_interface = C.CFUNCTYPE(C.c_void_p, C.c_char_p)(entry.get_interface)
        self.vt = VTable.from_address(get_interface(b"helexa.engine.v1"))
        f = lambda name, *sig: C.CFUNCTYPE(*sig)(getattr(self.vt, name))
        self._info = f("info", ERR, C.c_void_p, C.POINTER(Buf))
        self._load = f("load_model", ERR, C.c_void_p, C.c_char_p, C.c_size_t, C.POINTER(Buf))
        self._unload = f("unload_model", ERR, C.c_void_p, C.c_uint64)
        self._generate = f("generate", ERR, C.c_void_p, C.c_uint64, C.c_char_p, C.c_size_t,
                           C.POINTER(C.c_uint32), C.c_size_t, Sink)
        self._buf_free = f("buf_free", None, Buf)
        self._err_msg = f("error_message", C.POINTER(C.c_uint8), ERR, C.POINTER(C.c_size_t))
        self._err_kind = f("error_kind", C.c_uint32, ERR)
        self._err_free = f("error_free", None, ERR)
        init = C.CFUNCTYPE(ERR, C.c_char_p, C.c_size_t, C.POINTER(C.c_void_p))(entry.init)
        self.engine = C.c_void_p()
        self._check(init(b"", 0, C.byref(self.engine)))

    def _check(self, err):
        if err:
            n = C.c_size_t()
            msg = C.string_at(self._err_msg(err, C.byref(n)), n.value).decode()
            kind = self._err_kind(err)
            self._err_free(err)
            raise RuntimeError(f"engine error kind {kind}: {msg}")

    def _json_call(self, fn, *args):
        out = Buf()
        self._check(fn(self.engine, *args, C.byref(out)))
        data = C.string_at(out.ptr, out.len)
        self._buf_free(out)
        return json.loads(data)

    def info(self):
        return self._json_call(self._info)

    def load(self, spec):
        raw = json.dumps(spec).encode()
        return self._json_call(self._load, raw, len(raw))

    def unload(self, handle):
        self._check(self._unload(self.engine, handle))

    def generate(self, handle, prompt, max_tokens, stop_ids=()):
        tokens, done = [], {}

        def on_token(_, token):
            tokens.append(token)
            return 0

        def on_done(_, status, summary, length, err):
            if status == 0:
                done["summary"] = json.loads(C.string_at(summary, length))
            else:
                try:
                    self._check(err)
                except RuntimeError as e:
                    done["error"] = str(e)

        sink = Sink(None, ON_TOKEN(on_token), ON_DONE(on_done))
        params = json.dumps({"max_tokens": max_tokens, "stop_ids": list(stop_ids)}).encode()
        ids = (C.c_uint32 * len(prompt))(*prompt)
        start = time.perf_counter()
        self._check(self._generate(self.engine, handle, params, len(params), ids, len(prompt), sink))
        elapsed = time.perf_counter() - start
        if "error" in done:
            raise RuntimeError(done["error"])
        return tokens, done["summary"], elapsed


def agree(got, want, margins, threshold):
    """(steps equal, steps comparable): comparable = up to the first small-margin step."""
    comparable = next((i for i, m in enumerate(margins) if m < threshold), len(want))
    equal = 0
    while equal < min(comparable, len(got)) and got[equal] == want[equal]:
        equal += 1
    return equal, comparable


def forced(engine, handle, prompt, want, margins, threshold):
    """Teacher forcing: for every reference step whose margin is at least `threshold`, feed the
    prompt plus the reference tokens before it and ask for one greedy token. This checks every
    confident step, not only those before the first close call (where free-running greedy output
    may fork legitimately). Each call reuses the previous one's KV prefix, so it is cheap.
    Returns (agreeing steps, checked steps, first disagreeing step or None)."""
    agreeing, checked, first_bad = 0, 0, None
    for i, margin in enumerate(margins[:len(want)]):
        if margin < threshold:
            continue
        got, _, _ = engine.generate(handle, list(prompt) + list(want[:i]), 1)
        checked += 1
        if got and got[0] == want[i]:
            agreeing += 1
        elif first_bad is None:
            first_bad = i
    return agreeing, checked, first_bad


def main():
    engine_path, fixtures, out_path = sys.argv[1:4]
    engine = Engine(engine_path)
    report = {"info": engine.info(), "runs": []}
    print(json.dumps(report["info"]), flush=True)
    cases = []
    for model, arch in (("tiny-qwen3", "Qwen3ForCausalLM"), ("tiny-llama", "LlamaForCausalLM"),
                        ("tiny-qwen3-moe", "Qwen3MoeForCausalLM")):
        d = os.path.join(fixtures, model)
        for dtype in ("f32", "bf16"):
            cases.append((model, dtype, {"architecture": arch, "dtype": dtype, "files": {
                "config": f"{d}/config.json", "safetensors": [f"{d}/model.safetensors"]}}))
        gguf_dir = os.path.join(d, "gguf")
        for name in sorted(os.listdir(gguf_dir)):
            if name.endswith(".gguf"):
                ty = name[len(model) + 1:-len(".gguf")]
                cases.append((model, ty, {"architecture": arch,
                                          "files": {"gguf": f"{gguf_dir}/{name}"}}))
    failures = 0
    for model, ty, spec in cases:
        spec = {"id": f"{model}-{ty}", "devices": [0], **spec}
        ref = json.load(open(os.path.join(fixtures, model, "reference.json")))["prompts"]
        if "gguf" in spec["files"]:
            lcpp = json.load(open(os.path.join(fixtures, model, "gguf", "reference-llamacpp.json")))
            greedy = lcpp["files"][os.path.basename(spec["files"]["gguf"])]["prompts"]
        else:
            greedy = ref
        t0 = time.perf_counter()
        loaded = engine.load(spec)
        load_s = time.perf_counter() - t0
        for prompt in ("chat", "think", "tools", "long"):
            want = greedy[prompt]["greedy_token_ids"]
            got, summary, secs = engine.generate(loaded["handle"], ref[prompt]["token_ids"], len(want))
            margins = greedy[prompt]["greedy_top1_minus_top2"]
            equal, comparable = agree(got, want, margins, MARGIN[ty])
            f_ok, f_checked, f_first_bad = forced(engine, loaded["handle"], ref[prompt]["token_ids"],
                                                  want, margins, MARGIN[ty])
            ok = equal >= comparable and f_ok == f_checked
            failures += not ok
            run = {"model": model, "type": ty, "prompt": prompt, "ok": ok, "equal": equal,
                   "comparable": comparable, "forced_agree": f_ok, "forced_checked": f_checked,
                   "forced_first_bad": f_first_bad, "tokens": got,
                   "prompt_tokens": len(ref[prompt]["token_ids"]),
                   "generated": len(got), "seconds": round(secs, 4), "load_seconds": round(load_s, 3),
                   "dtype": loaded.get("dtype"), "quant": loaded.get("quant")}
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
        # Prefix reuse: the same prompt again reuses all but its last token.
        _, summary, _ = engine.generate(loaded["handle"], ref["chat"]["token_ids"], 4)
        _, summary, _ = engine.generate(loaded["handle"], ref["chat"]["token_ids"], 4)
        report["runs"].append({"model": model, "type": ty, "reuse": summary})
        engine.unload(loaded["handle"])
    report["failures"] = failures
    json.dump(report, open(out_path, "w"), indent=1)
    print(f"{failures} failing runs of {len(cases) * 4}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
