#!/usr/bin/env python3
"""Compare two abi_check.py reports run on different backends (e.g. CPU and GPU) case by case.

    python3 scripts/device/compare_runs.py CPU.json GPU.json [OUT.json]

For every (model, type, prompt) both reports ran, it counts the leading greedy tokens that are
identical and the teacher-forced agreement with the reference on each side. Two correct backends
agree up to the first close call of the reference (summing in a different order may flip a step
whose top-2 margin is tiny); the summary line gives the total identical tokens and how many cases
agree on every token. Exit status 1 when a case is missing from one side.
"""
import json
import sys


def key(run):
    return run["model"], run["type"], run["prompt"]


def main():
    a_path, b_path = sys.argv[1:3]
    a = {key(r): r for r in json.load(open(a_path))["runs"] if "prompt" in r}
    b = {key(r): r for r in json.load(open(b_path))["runs"] if "prompt" in r}
    rows, missing = [], sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        ta, tb = a[k]["tokens"], b[k]["tokens"]
        same = 0
        while same < min(len(ta), len(tb)) and ta[same] == tb[same]:
            same += 1
        rows.append({"model": k[0], "type": k[1], "prompt": k[2], "identical_prefix": same,
                     "length": max(len(ta), len(tb)), "all_identical": ta == tb,
                     "forced_a": f'{a[k]["forced_agree"]}/{a[k]["forced_checked"]}',
                     "forced_b": f'{b[k]["forced_agree"]}/{b[k]["forced_checked"]}'})
    for r in rows:
        print(json.dumps(r))
    total = sum(r["identical_prefix"] for r in rows)
    length = sum(r["length"] for r in rows)
    whole = sum(r["all_identical"] for r in rows)
    print(f"{whole}/{len(rows)} cases identical on every token; {total}/{length} leading tokens "
          f"identical; missing on one side: {missing or 'none'}")
    if len(sys.argv) > 3:
        json.dump({"rows": rows, "missing": [list(m) for m in missing]}, open(sys.argv[3], "w"),
                  indent=1)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
