#!/usr/bin/env python3
"""Folds a device visit's outputs into three files, since only a few files come back from
the lent machine:

    summary.txt   commit, GPU, then every text output (*.txt, *.log) under a header
    benches.json  {file name: content} of every bench-*.json
    check.json    {file name: content} of the parity, agreement and fault-drill JSONs

    python3 scripts/device/fold_outputs.py OUT_DIR

Everything folded is removed, and so is the JIT cache archive (a fresh machine rebuilds it).
"""
import json
import pathlib
import sys

CHECKS = ("abi_check_cuda.json", "abi_check_cpu.json", "cpu_vs_gpu.json", "fault_check.json")


def fold(out):
    folded = []
    first = [out / "commit.txt", out / "gpu.txt"]
    texts = first + sorted(p for p in out.iterdir() if p.suffix in (".txt", ".log") and p not in first)
    summary = []
    for p in texts:
        if p.exists():
            summary.append(f"==> {p.name} <==\n{p.read_text(errors='replace').rstrip()}\n")
            folded.append(p)
    benches = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json"))}
    checks = {n: json.loads((out / n).read_text()) for n in CHECKS if (out / n).exists()}
    folded += [out / n for n in benches] + [out / n for n in checks]
    for p in folded:
        p.unlink()
    (out / "summary.txt").write_text("\n".join(summary))
    (out / "benches.json").write_text(json.dumps(benches, indent=1))
    (out / "check.json").write_text(json.dumps(checks, indent=1))
    (out / "jitcache.tgz").unlink(missing_ok=True)


if __name__ == "__main__":
    fold(pathlib.Path(sys.argv[1]))
