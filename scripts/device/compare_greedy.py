#!/usr/bin/env python3
"""Compares the greedy tokens of two `helexa-node bench --json` reports (e.g. an optimisation on
and off): per model and decode context, identical, or the first step where they part.

    compare_greedy.py ON.json OFF.json   # exit 1 when any decode differs

Tokens are only comparable from the same prompt. The bench draws its prompts from one seeded
stream, so two runs with different figures (a full bench against a decode-only one) decode
different prompts: where both reports record the prompt (`greedy_prompt`) and they differ, the
decode is reported as not comparable (exit 2 when nothing was comparable).
"""
import json
import sys


def decodes(path):
    doc = json.load(open(path))
    # Labels carry the run's tag (h200-nokernels/…): key by the model directory instead.
    return {
        (m["path"].rstrip("/").rsplit("/", 1)[-1], d["context"]): d
        for m in doc["models"]
        for d in m["decode"]
    }


a, b = decodes(sys.argv[1]), decodes(sys.argv[2])
differ = identical = 0
for key in sorted(a.keys() & b.keys()):
    pa, pb = a[key].get("greedy_prompt"), b[key].get("greedy_prompt")
    if pa and pb and pa != pb:
        print(f"{key[0]} @{key[1]}: different prompts, not comparable")
        continue
    x, y = a[key].get("greedy_tokens", []), b[key].get("greedy_tokens", [])
    first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
    unrecorded = "" if pa and pb else " (prompt not recorded in both: same bench arguments assumed)"
    if first is None and len(x) == len(y):
        identical += 1
        print(f"{key[0]} @{key[1]}: identical ({len(x)} tokens){unrecorded}")
    else:
        differ += 1
        print(f"{key[0]} @{key[1]}: differ from step {first} of {len(x)}{unrecorded}")
print(f"{identical} identical, {differ} differ")
sys.exit(1 if differ else 0 if identical else 2)
