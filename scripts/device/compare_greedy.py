#!/usr/bin/env python3
"""Compares the greedy tokens of two `helexa-node bench --json` reports (e.g. an optimisation on
and off): per model and decode context, identical, or the first step where they part.

    compare_greedy.py ON.json OFF.json
    # exit 0: every comparable decode identical; 1: some differ; 2: nothing comparable;
    # 3: the comparison itself failed (a missing or malformed report)

Tokens are only comparable from the same prompt. The bench draws its prompts from one seeded
stream, so two runs with different figures (a full bench against a decode-only one) decode
different prompts: where both reports record the prompt (`greedy_prompt`) and they differ, or
a report has no tokens, the decode is reported as not comparable.
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


def compare(a, b):
    differ = identical = 0
    for key in sorted(a.keys() & b.keys()):
        pa, pb = a[key].get("greedy_prompt"), b[key].get("greedy_prompt")
        x, y = a[key].get("greedy_tokens", []), b[key].get("greedy_tokens", [])
        if (pa and pb and pa != pb) or not x or not y:
            why = "different prompts" if x and y else "no tokens recorded"
            print(f"{key[0]} @{key[1]}: {why}, not comparable")
            continue
        unrecorded = "" if pa and pb else " (prompt not recorded in both: same bench arguments assumed)"
        first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if first is None and len(x) != len(y):
            first = min(len(x), len(y))  # one decode stopped early: they part where it stopped
        if first is None:
            identical += 1
            print(f"{key[0]} @{key[1]}: identical ({len(x)} tokens){unrecorded}")
        else:
            differ += 1
            print(f"{key[0]} @{key[1]}: differ from step {first} of {len(x)}{unrecorded}")
    print(f"{identical} identical, {differ} differ")
    return 1 if differ else 0 if identical else 2


if __name__ == "__main__":
    try:
        code = compare(decodes(sys.argv[1]), decodes(sys.argv[2]))
    except Exception as e:  # a report missing (its bench timed out) or malformed
        print(f"comparison failed: {e!r}")
        code = 3
    sys.exit(code)
