#!/usr/bin/env python3
"""Compares the greedy tokens of two `helexa-node bench --json` reports (e.g. an optimisation on
and off): per model and decode context, identical, or the first step where they part.

    compare_greedy.py ON.json OFF.json   # exit 1 when any decode differs
"""
import json
import sys


def decodes(path):
    doc = json.load(open(path))
    # Labels carry the run's tag (h200-nokernels/…): key by the model directory instead.
    return {(m["path"].rstrip("/").rsplit("/", 1)[-1], d["context"]): d.get("greedy_tokens", []) for m in doc["models"] for d in m["decode"]}


a, b = decodes(sys.argv[1]), decodes(sys.argv[2])
differ = 0
for key in sorted(a.keys() & b.keys()):
    x, y = a[key], b[key]
    first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
    if first is None and len(x) == len(y):
        print(f"{key[0]} @{key[1]}: identical ({len(x)} tokens)")
    else:
        differ += 1
        print(f"{key[0]} @{key[1]}: differ from step {first} of {len(x)}")
print(f"{len(a.keys() & b.keys()) - differ} identical, {differ} differ")
sys.exit(1 if differ else 0)
