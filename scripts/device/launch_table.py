#!/usr/bin/env python3
"""The launch sweep's choices as a HELEXA_ENGINE_QUANT_GEMV_LAUNCH value.

Reads `gpu-check.sh gemv-sweep`'s output (lines like
`q8_0 down 4096×12288 stages 3 blocks/SM 2: 18.10 µs, 69%`, with ` warps 16` before the colon
for the wide build) and, for each weight, picks the
fastest launch shape; the weight gets an entry only where that beats the default launch
(the block type's stages, the most blocks an SM holds, 8 warps) by more than MARGIN, so noise
does not make the table.
Rows are the weight's as stored: a stacked gate/up weight has twice the product's rows.

    launch_table.py gemv-sweep.txt [MARGIN]   # prints the value (empty when nothing pays),
                                              # and on stderr each weight's default and best
"""
import re
import sys

LINE = re.compile(
    r"^(?P<fmt>\S+) (?P<name>\S+) (?P<rows>\d+)×(?P<cols>\d+) stages (?P<stages>\d) "
    r"blocks/SM (?P<blocks>\d)(?: warps (?P<warps>\d+))?: (?P<us>[\d.]+) µs"
)

# Chunks in flight per warp by default, by block type (`default_quant_gemv_stages`).
DEFAULT_STAGES = {"q8_0": 4}


def main() -> None:
    path = sys.argv[1]
    margin = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
    weights: dict[tuple[str, int, int], list[tuple[float, int, int]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = LINE.match(line.strip())
            if not m:  # the header, split-row lines, test harness lines
                continue
            rows = int(m["rows"]) * (2 if m["name"] == "gate/up" else 1)
            key = (m["fmt"], rows, int(m["cols"]))
            warps = int(m["warps"] or 8)
            shape = (float(m["us"]), int(m["stages"]), int(m["blocks"]), warps)
            weights.setdefault(key, []).append(shape)
    entries = []
    for (fmt, rows, cols), shapes in weights.items():
        # The default: the block type's stages (`default_quant_gemv_stages` in
        # engine-cuda/src/fused.rs; fewer where they do not fit, then not swept either) at the
        # most blocks the sweep launched with them and eight warps a block.
        stages = max(
            (s[1] for s in shapes if s[1] <= DEFAULT_STAGES.get(fmt, 2) and s[3] == 8), default=2
        )
        default = max((s for s in shapes if s[1] == stages and s[3] == 8), key=lambda s: s[2], default=None)
        best = min(shapes)
        if default is None:
            continue
        pays = best[0] < default[0] * (1 - margin)
        print(
            f"{fmt}:{rows}x{cols}: default {default[1]}x{default[2]} {default[0]:.2f} µs, "
            f"best {best[1]}x{best[2]}x{best[3]} {best[0]:.2f} µs{' (taken)' if pays else ''}",
            file=sys.stderr,
        )
        if pays:
            wide = f"x{best[3]}" if best[3] != 8 else ""
            entries.append(f"{fmt}:{rows}x{cols}={best[1]}x{best[2]}{wide}")
    print(",".join(entries))


if __name__ == "__main__":
    main()
