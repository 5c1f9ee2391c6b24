#!/usr/bin/env python3
"""Where two builds' greedy decodes part, how close the call was: for each decode whose tokens
differ between two `helexa-node bench --json` reports (the same seeded prompts), replays the
first report's tokens teacher-forced up to the parting step under each build's switches (the
engine's GPU test `margins_along_a_forced_decode`, ignored unless asked for) and prints both
builds' logit margins there. Run on the GPU machine, models still in the bench's workdir.

    parting_margins.py REF.json OTHER.json 'VAR=VALUE ...' MODELS_DIR TEST_BIN OUT_DIR

REF's tokens run with the environment as it is, OTHER's with the settings added.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from compare_greedy import decodes  # this directory: each decode of a report by model and context


def model_files(directory):
    ggufs = sorted(directory.glob("*.gguf"))
    if ggufs:
        return {"gguf": str(ggufs[0])}
    return {
        "config": str(directory / "config.json"),
        "safetensors": [str(p) for p in sorted(directory.glob("*.safetensors"))],
    }


def margins(test_bin, request, env, out_dir, tag):
    request = dict(request, out=str(out_dir / f"margins-{tag}.json"))
    path = out_dir / f"margins-request-{tag}.json"
    path.write_text(json.dumps(request))
    run = subprocess.run(
        [test_bin, "--ignored", "--exact", "device_worker::gpu_tests::margins_along_a_forced_decode",
         "--test-threads", "1"],
        env=dict(os.environ, HELEXA_MARGINS=str(path), **env),
        capture_output=True, text=True, timeout=300,
    )
    if run.returncode != 0:
        raise SystemExit(f"{tag}: margins test failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return json.load(open(request["out"]))


def main():
    ref_path, other_path, settings, models, test_bin, out_dir = sys.argv[1:7]
    env = dict(s.split("=", 1) for s in settings.split())
    out_dir = Path(out_dir)
    ref, other = decodes(ref_path), decodes(other_path)
    for key in sorted(ref.keys() & other.keys()):
        a, b = ref[key]["greedy_tokens"], other[key]["greedy_tokens"]
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None:
            continue
        prompt = ref[key].get("greedy_prompt")
        if not prompt or prompt != other[key].get("greedy_prompt"):
            print(f"{key[0]} @{key[1]}: parts at step {step}; no common prompt recorded, margin not taken")
            continue
        request = dict(model_files(Path(models) / key[0]), prompt=prompt, tokens=a[: step + 1])
        tag = f"{key[0]}-{key[1]}"
        mine = margins(test_bin, request, {}, out_dir, f"{tag}-ref")[step]
        theirs = margins(test_bin, request, env, out_dir, f"{tag}-other")[step]
        print(
            f"{key[0]} @{key[1]}: parts at step {step}: the reference picks {mine['top']} "
            f"ahead by {mine['lead']:.4g} logits; with {settings} the pick is {theirs['top']} "
            f"ahead by {theirs['lead']:.4g}, the reference's token trailing by "
            f"{-theirs['forced_lead']:.4g}"
        )


if __name__ == "__main__":
    main()
