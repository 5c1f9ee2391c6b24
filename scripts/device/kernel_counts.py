#!/usr/bin/env python3
"""Kernel launches and GPU time per decoded token from four Nsight Compute CSV logs
(`ncu --csv --metrics gpu__time_duration.sum`), written by `gpu-check.sh kernels` as
DIR/ncu-l{1,2}-t{4,8}.csv: decodes of 4 and 8 tokens on a model cut to 1 and 2 layers.

    python3 scripts/device/kernel_counts.py DIR LAYERS

With k(L, T) the launches of a run: per token = (k(L,8) - k(L,4)) / 4; per layer per token =
per token at 2 layers - per token at 1 layer; outside the layers = per token at 1 layer - per
layer. The full model (LAYERS layers) launches outside + LAYERS x per layer per token. GPU time
is split the same way, per kernel name, so the table says which kernels the time goes to.

Then the launches of the last decoded token of the 2-layer, 8-token run in order, each with
its grid and time: the per-product view (which matrix product costs what, and how much of a
launch is fixed cost), bounded by the token's greedy pick (`argmax_f32`).

    python3 scripts/device/kernel_counts.py --prefill DIR LAYERS

The same split for one prompt (`gpu-check.sh prefill-kernels`): DIR/ncu-prefill-l{1,2}.csv are
the runs on 1 and 2 layers, so their difference is one layer's share of the prompt; the table
scales it to LAYERS layers, per kernel name.
"""
import collections
import csv
import sys

# Nanoseconds per unit of ncu's time metric (it writes "ns" or "nsecond" depending on version).
NS_PER_UNIT = {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}


def read(path):
    """Launch count and GPU nanoseconds per kernel name."""
    count, ns = collections.Counter(), collections.Counter()
    with open(path) as f:
        rows = csv.DictReader(line for line in f if line.startswith('"'))
        for r in rows:
            if r.get("Metric Name") != "gpu__time_duration.sum":
                continue
            name = r["Kernel Name"].split("(")[0].split("<")[0].strip()
            value = float(r["Metric Value"].replace(",", ""))
            scale = NS_PER_UNIT.get(r.get("Metric Unit"), 1)
            count[name] += 1
            ns[name] += value * scale
    return count, ns


def launches(path):
    """(kernel name, grid size, microseconds) per launch, in launch order."""
    out = []
    with open(path) as f:
        for r in csv.DictReader(line for line in f if line.startswith('"')):
            if r.get("Metric Name") != "gpu__time_duration.sum":
                continue
            scale = NS_PER_UNIT.get(r.get("Metric Unit"), 1) / 1e3
            out.append((r["Kernel Name"].split("(")[0].strip(), r.get("Grid Size", ""),
                        float(r["Metric Value"].replace(",", "")) * scale))
    return out


def last_token(seq):
    """The launches after the second-to-last pick (greedy argmax or device draw) up to and
    including the last."""
    names = {name for name, _, _ in seq}
    pick = "sample_f32" if "sample_f32" in names else "argmax_f32"
    picks = [i for i, (name, _, _) in enumerate(seq) if name == pick]
    return seq[picks[-2] + 1:picks[-1] + 1] if len(picks) >= 2 else []


def per_token(d, layers):
    c4, t4 = read(f"{d}/ncu-l{layers}-t4.csv")
    c8, t8 = read(f"{d}/ncu-l{layers}-t8.csv")
    names = set(c4) | set(c8)
    return ({n: (c8[n] - c4[n]) / 4 for n in names}, {n: (t8[n] - t4[n]) / 4 for n in names})


def prefill(d, full):
    c1, t1 = read(f"{d}/ncu-prefill-l1.csv")
    c2, t2 = read(f"{d}/ncu-prefill-l2.csv")
    names = set(c1) | set(c2)
    layer_c = {n: c2[n] - c1[n] for n in names}
    layer_t = {n: t2[n] - t1[n] for n in names}
    total_t = full * sum(layer_t.values())
    print(f"one prompt, {full}-layer model: {full * sum(layer_c.values()):.0f} launches in the "
          f"layers ({sum(layer_c.values()):.0f} per layer), {total_t / 1e3:.0f} us of GPU time "
          f"in the layers (kernels alone, no gaps)")
    print(f"{'kernel':70s} {'launches/layer':>14s} {'us/layer':>9s} {'share':>6s}")
    for n in sorted(names, key=lambda n: -layer_t[n]):
        if layer_c[n] < 0.5 and layer_t[n] < 1e3:
            continue
        print(f"{n[:70]:70s} {layer_c[n]:14.0f} {layer_t[n] / 1e3:9.1f} "
              f"{100 * full * layer_t[n] / max(total_t, 1):5.1f}%")
    # Which op a copy comes from shows in its neighbours: the 1-layer run, launch by launch.
    seq = launches(f"{d}/ncu-prefill-l1.csv")
    print_launches(f"the 1-layer run, launch by launch ({len(seq)} launches)", seq)


def print_launches(title, seq):
    print(f"\n{title}:")
    for name, grid, us in seq:
        print(f"  {name[:60]:60s} {grid:>14s} {us:9.2f} us")


def main():
    if sys.argv[1] == "--prefill":
        prefill(sys.argv[2], int(sys.argv[3]))
        return
    d, full = sys.argv[1], int(sys.argv[2])
    c1, t1 = per_token(d, 1)
    c2, t2 = per_token(d, 2)
    names = sorted(set(c1) | set(c2))
    layer_c = {n: c2.get(n, 0) - c1.get(n, 0) for n in names}
    layer_t = {n: t2.get(n, 0) - t1.get(n, 0) for n in names}
    out_c = {n: c1.get(n, 0) - layer_c[n] for n in names}
    out_t = {n: t1.get(n, 0) - layer_t[n] for n in names}
    model_c = {n: out_c[n] + full * layer_c[n] for n in names}
    model_t = {n: out_t[n] + full * layer_t[n] for n in names}
    total_c, total_t = sum(model_c.values()), sum(model_t.values())
    print(f"per decoded token, {full}-layer model: {total_c:.0f} kernel launches "
          f"({sum(layer_c.values()):.1f} per layer, {sum(out_c.values()):.1f} outside the layers), "
          f"{total_t / 1e3:.0f} us of GPU time (kernels alone, no gaps)")
    print(f"{'kernel':60s} {'launches/layer':>14s} {'launches/token':>14s} {'us/token':>9s} {'share':>6s}")
    for n in sorted(names, key=lambda n: -model_t[n]):
        if model_c[n] < 0.5 and model_t[n] < 1:
            continue
        print(f"{n[:60]:60s} {layer_c[n]:14.1f} {model_c[n]:14.1f} {model_t[n] / 1e3:9.1f} "
              f"{100 * model_t[n] / max(total_t, 1):5.1f}%")
    token = last_token(launches(f"{d}/ncu-l2-t8.csv"))
    if token:
        print_launches(f"last decoded token of the 2-layer model, launch by launch "
                       f"({sum(t for _, _, t in token):.1f} us)", token)


if __name__ == "__main__":
    main()
