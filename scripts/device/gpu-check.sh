#!/usr/bin/env bash
# One device visit, run on the lent GPU machine from the repository root; everything lands
# under $OUT. What it runs comes from .carry/ (built and packed here by scripts/device/pack.sh).
#
#   scripts/device/gpu-check.sh check   # fused kernels vs candle's ops (unit tests on the GPU),
#                                       # parity (GPU and CPU engines through the C ABI),
#                                       # CPU-vs-GPU agreement, the device-fault drill (~2 min)
#   scripts/device/gpu-check.sh bench [FORMATS]   # helexa-node bench on the synthesized
#                                       # Qwen3-8B shapes (default bf16,q8_0,q4_k_m)
#   scripts/device/gpu-check.sh kernels [FORMAT]  # kernel launches and GPU time per decoded token (ncu)
#   scripts/device/gpu-check.sh prefill-kernels [FORMAT] [PROMPT]  # GPU time per kernel of one
#                                       # layer over one prompt (default bf16, 2048 tokens; ncu)
#   scripts/device/gpu-check.sh gemv-profile [FORMATS]  # Nsight Compute sections (throughput,
#                                       # memory, occupancy, warp stalls) per GEMV launch
#   scripts/device/gpu-check.sh gemv-sweep   # µs per launch of each quantized product of a
#                                       # Qwen3-8B layer at each launch shape (chunks in flight
#                                       # per warp, blocks per SM), replayed from a CUDA graph,
#                                       # then the dense BF16 products on the plain, rows-split
#                                       # and staged kernels (src/fused/launch_sweep.rs; ~2-3 min)
#   scripts/device/gpu-check.sh layer-sweep  # µs per Q8_0 layer (its four products in the
#                                       # step's order, launches overlapping as in the step)
#                                       # with one product's launch shape varied at a time
#   scripts/device/gpu-check.sh tests NAME...  # the GPU tests whose names hold any NAME
#   scripts/device/gpu-check.sh tune    # gemv-sweep, its choices as a launch table
#                                       # (launch_table.py), then switches at @0 over the
#                                       # table and TUNE_SWITCHES (~8 min)
#   scripts/device/gpu-check.sh omit-sweep   # decode step time (graph on) with each kernel
#                                       # class left out in turn (OMIT_VARIANTS), and without
#                                       # PDL (~5 min; ALL_CONTEXTS=0 halves it)
#   scripts/device/gpu-check.sh switches  # decode-only benches of the three formats
#                                       # (SWITCH_FORMATS) @0 and @4096 (ALL_CONTEXTS) with
#                                       # the defaults, then with each setting of
#                                       # ALL_SWITCHES (default: the attention split every 32
#                                       # positions, launches not overlapping in the graph,
#                                       # no step queued ahead, the cluster merge and the
#                                       # GEMVs' shared rows on;
#                                       # VAR=VALUE+VAR=VALUE flips two), greedy
#                                       # tokens compared with the defaults' (where they part, both
#                                       # builds' logit margins: parting_margins.py); outputs
#                                       # folded into three files (fold_outputs.py)
#   scripts/device/gpu-check.sh all     # a visit's first call (~9 min of the 10 a call
#                                       # may take): check, then switches at @0 (set
#                                       # ALL_CONTEXTS for more, or ALL_SWITCHES for fewer
#                                       # settings). The full `bench`, the sweeps and kernel
#                                       # breakdowns take further calls.
#
# The PTX JIT cache lives in /tmp/jc and is returned as $OUT/jitcache.tgz; carry it back in
# .carry/ to skip the ~13 s JIT on the next fresh machine. Synthesized models stay in
# /tmp/bench-models while the machine is warm, so a second `bench` only measures.
set -uo pipefail
mode=${1:-check}
bin=/tmp/helexa-bin
mkdir -p "$bin" "$OUT"
unpack() { # unpack NAME: .carry/NAME.xz -> $bin/NAME (skipped when already there)
  [ -s "$bin/$1" ] && [ "$bin/$1.commit" -nt ".carry/$1.xz" ] && return
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
    ".carry/$1.xz" "$bin/$1"
  chmod +x "$bin/$1"
  touch "$bin/$1.commit"
}
for f in engine-cpu.so helexa-node; do unpack "$f"; done
if [ ! -s "$bin/engine-cuda.so" ] || [ ".carry/engine-cuda.tar.xz" -nt "$bin/engine-cuda.so" ]; then
  python3 -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    .carry/engine-cuda.tar.xz "$bin"
  touch "$bin/engine-cuda.so"
fi
export CUDA_CACHE_PATH=/tmp/jc CUDA_CACHE_MAXSIZE=1073741824
if [ ! -d /tmp/jc ] && [ -f .carry/jitcache.tgz ]; then tar -C /tmp -xzf .carry/jitcache.tgz; fi
cp .carry/commit "$OUT/commit.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv > "$OUT/gpu.txt" 2>&1
status=0

case "$mode" in
all)
  # Each step is bounded so that one that hangs still leaves time to fold what the others wrote
  # (a call is cut at 10 minutes, and unfolded outputs are more files than come back).
  timeout 200 "$0" check || status=1
  # Seven decode-only benches of three formats fit the call at @0 only.
  ALL_CONTEXTS=${ALL_CONTEXTS:-0} timeout 340 "$0" switches || status=1
  # A switches run cut short never folded its outputs (and unfolded, they are more files than
  # come back).
  [ -f "$OUT/summary.txt" ] || python3 scripts/device/fold_outputs.py "$OUT"
  exit $status
  ;;
switches)
  # Greedy decode of the three formats with the defaults, then with one decode switch flipped
  # at a time (ALL_SWITCHES, space-separated VAR=VALUE settings): speed, and greedy tokens
  # against the defaults'. The first bench also synthesizes the models (~70 s).
  decode="--prefill 512 --decode-context ${ALL_CONTEXTS:-0,4096}"
  # SWITCH_FORMATS (default all three): e.g. q8_0 alone, a third of the device time a setting.
  formats=${SWITCH_FORMATS:-bf16,q8_0,q4_k_m}
  runs="$OUT/bench-${formats//,/-}"
  BENCH_ARGS="$decode" BENCH_TAG=defaults timeout 200 "$0" bench "$formats" > /dev/null || status=1
  grep -E "^model|decode 128|host queuing" "$runs-defaults.txt"
  # .carry/ref-switches.json (optional): an earlier build's defaults report from this mode (the
  # same bench arguments, so the same prompts), to check that changes meant to keep the
  # arithmetic kept the greedy tokens. (.carry/ref.json is a full bench's, for `bench` runs.)
  if [ -f .carry/ref-switches.json ]; then
    python3 scripts/device/compare_greedy.py .carry/ref-switches.json \
      "$runs-defaults.json" > "$OUT/greedy-defaults-vs-ref.txt" 2>&1
    tail -1 "$OUT/greedy-defaults-vs-ref.txt" | sed "s/^/defaults greedy vs .carry\/ref-switches.json: /"
  fi
  # By default each optional switch against the defaults: the attention split every 32
  # positions from the start, no step queued ahead and the graph's launches not overlapping
  # (the paths before the tenth and twelfth sessions), the cluster merge and the shared rows
  # of both GEMVs (off by default) on.
  default_settings="HELEXA_ENGINE_ATTENTION_ONE_SPLIT=32 HELEXA_ENGINE_GRAPH_KEEP=0"
  default_settings+=" HELEXA_ENGINE_ATTENTION_CLUSTER=1 HELEXA_ENGINE_QUANT_GEMV_SPLIT=1"
  default_settings+=" HELEXA_ENGINE_GEMV_SPLIT=1 HELEXA_ENGINE_GRAPH_AHEAD=0"
  for setting in ${ALL_SWITCHES:-$default_settings}; do
    # A setting is VAR=VALUE[+VAR=VALUE…]: flipped together (a value may hold commas: the
    # launch table). Its tag names the files; a long one is cut and told apart by a checksum.
    tag=$(echo "$setting" | sed 's/HELEXA_ENGINE_//g; s/+/-and-/g; s/[^A-Za-z0-9-]/-/g' | tr 'A-Z' 'a-z')
    [ ${#tag} -gt 48 ] && tag="${tag:0:40}-$(echo "$setting" | md5sum | cut -c1-6)"
    env ${setting//+/ } BENCH_ARGS="$decode" BENCH_TAG="$tag" timeout 100 "$0" bench "$formats" > /dev/null || status=1
    grep -E "decode 128|host queuing" "$runs-$tag.txt" | sed "s/^/$tag: /"
    python3 scripts/device/compare_greedy.py "$runs-defaults.json" \
      "$runs-$tag.json" > "$OUT/greedy-$tag.txt" 2>&1
    if [ $? -eq 1 ]; then
      # Where the tokens part, both builds' logit margins there (teacher-forced replays).
      mkdir -p /tmp/margins
      timeout 240 python3 scripts/device/parting_margins.py \
        "$runs-defaults.json" "$runs-$tag.json" \
        "${setting//+/ }" /tmp/bench-models "$bin/engine-cuda-tests" /tmp/margins \
        >> "$OUT/greedy-$tag.txt" 2>&1
    fi
    grep -E "identical, |parts at step|failed|not comparable" "$OUT/greedy-$tag.txt" \
      | sed "s/^/$tag greedy vs defaults: /"
  done
  python3 scripts/device/fold_outputs.py "$OUT"
  exit $status
  ;;
tune)
  # The launch sweep, its choices as a launch table (launch_table.py), then `switches` at @0
  # over that table and the other decode switches (TUNE_SWITCHES), in one call (~8 min).
  timeout 260 "$0" gemv-sweep > /dev/null || status=1
  table=$(python3 scripts/device/launch_table.py "$OUT/gemv-sweep.txt" 2> "$OUT/launch-table.txt")
  echo "launch table: ${table:-(nothing beats the default)}" >> "$OUT/launch-table.txt"
  cat "$OUT/launch-table.txt"
  settings=${TUNE_SWITCHES:-"HELEXA_ENGINE_QUANT_GEMV_SPLIT=1 HELEXA_ENGINE_GEMV_SPLIT=1 HELEXA_ENGINE_ATTENTION_ONE_SPLIT=32"}
  [ -n "$table" ] && settings+=" HELEXA_ENGINE_QUANT_GEMV_LAUNCH=$table"
  ALL_CONTEXTS=${ALL_CONTEXTS:-0} ALL_SWITCHES="$settings" timeout 330 "$0" switches || status=1
  [ -f "$OUT/summary.txt" ] || python3 scripts/device/fold_outputs.py "$OUT"
  exit $status
  ;;
tests)
  # The GPU tests whose names hold any of the further arguments (e.g. the ones a change added).
  shift
  "$bin/engine-cuda-tests" --test-threads 1 "$@" > "$OUT/tests.log" 2>&1
  status=$?
  echo "tests $*: exit $status ($(grep 'test result' "$OUT/tests.log"))"
  ;;
gemv-sweep)
  timeout 300 "$bin/engine-cuda-tests" --ignored --exact fused::launch_sweep::quant_gemv_launch_sweep \
    --nocapture --test-threads 1 > "$OUT/gemv-sweep.txt" 2>&1
  status=$?
  # The dense (BF16) products on each dense kernel (DENSE_SWEEP=0 skips it).
  if [ "${DENSE_SWEEP:-1}" = 1 ]; then
    timeout 150 "$bin/engine-cuda-tests" --ignored --exact fused::launch_sweep::dense_gemv_launch_sweep \
      --nocapture --test-threads 1 >> "$OUT/gemv-sweep.txt" 2>&1 || status=1
  fi
  grep -E "µs|test result|panicked" "$OUT/gemv-sweep.txt"
  ;;
layer-sweep)
  # Q8_0's layer products launched in the step's order, one product's launch shape varied at a
  # time, µs per layer (src/fused/launch_sweep.rs, quant_layer_launch_sweep).
  timeout 300 "$bin/engine-cuda-tests" --ignored --exact fused::launch_sweep::quant_layer_launch_sweep \
    --nocapture --test-threads 1 > "$OUT/layer-sweep.txt" 2>&1
  status=$?
  grep -E "µs|test result|panicked" "$OUT/layer-sweep.txt"
  ;;
omit-sweep)
  # What each kernel class costs inside a decode step replayed from a CUDA graph (the
  # default): the three formats decode-only, then again with one class's launches
  # skipped (HELEXA_ENGINE_OMIT, a measurement aid: the tokens are garbage then) and with
  # programmatic dependent launch off. Step time differences are each class's cost in the
  # stream, gaps included.
  decode="--prefill 512 --decode-context ${ALL_CONTEXTS:-0,4096}"
  run_variant() { # run_variant TAG [VAR=VALUE...]
    local tag=$1; shift
    env "$@" BENCH_ARGS="$decode" BENCH_TAG="$tag" timeout 150 "$0" bench \
      > /dev/null 2>&1 || status=1
    grep -E "^model|decode 128|host queuing" "$OUT/bench-bf16-q8_0-q4_k_m-$tag.txt" | sed "s/^/$tag: /"
  }
  # OMIT_VARIANTS (space-separated TAG[:VAR=VALUE]): the variants to run. By default the
  # classes of the landed step (the norms, the SwiGLU gate and the rope are folded into the
  # products and the attention, so each product role is a class of its own): the attention,
  # q/k/v, gate/up, and o + down + the output product (the plain products).
  gemv_only="add_rms_norm,silu_mul,qk_norm_rope_cache,decode_attention,attn_combine,gather_rows,argmax"
  for variant in ${OMIT_VARIANTS:-graph no-attention:HELEXA_ENGINE_OMIT=decode_attention,attn_combine \
    no-qkv:HELEXA_ENGINE_OMIT=quant_gemv_norm_q,quant_gemv_norm_split,gemv_norm_bf16,staged_gemv_norm_bf16 \
    no-gate-up:HELEXA_ENGINE_OMIT=quant_gemv_norm_swiglu,gemv_norm_swiglu,staged_gemv_norm_swiglu \
    no-o-down-output:HELEXA_ENGINE_OMIT=quant_gemv_q,quant_gemv_split,gemv_bf16,staged_gemv_bf16 \
    gemv-only:HELEXA_ENGINE_OMIT=$gemv_only no-pdl:HELEXA_ENGINE_PDL=0}; do
    if [ "${variant#*:}" = "$variant" ]; then run_variant "$variant"; else run_variant "${variant%%:*}" "${variant#*:}"; fi
  done
  python3 scripts/device/fold_outputs.py "$OUT"
  exit $status
  ;;
check)
  "$bin/engine-cuda-tests" --test-threads 1 gpu_tests > "$OUT/fused_kernels.log" 2>&1
  rc=$?
  echo "fused kernels vs candle: exit $rc ($(grep 'test result' "$OUT/fused_kernels.log"))"
  [ $rc -eq 0 ] || status=1
  for engine in cuda cpu; do
    python3 scripts/device/abi_check.py "$bin/engine-$engine.so" fixtures "$OUT/abi_check_$engine.json" \
      > "$OUT/abi_check_$engine.log" 2>&1
    rc=$?
    echo "abi_check $engine: exit $rc ($(tail -1 "$OUT/abi_check_$engine.log"))"
    [ $rc -eq 0 ] || status=1
  done
  python3 scripts/device/compare_runs.py "$OUT/abi_check_cpu.json" "$OUT/abi_check_cuda.json" \
    "$OUT/cpu_vs_gpu.json" > "$OUT/cpu_vs_gpu.log" 2>&1
  echo "cpu vs gpu: exit $? ($(tail -1 "$OUT/cpu_vs_gpu.log"))"
  python3 scripts/device/fault_check.py "$bin/helexa-node" "$bin/engine-cuda.so" fixtures \
    "$OUT/fault_check.json" > "$OUT/fault_check.log" 2>&1
  rc=$?
  echo "fault drill: exit $rc ($(tail -1 "$OUT/fault_check.log"))"
  [ $rc -eq 0 ] || status=1
  ;;
bench)
  formats=${2:-bf16,q8_0,q4_k_m}
  # BENCH_TAG: e.g. the switches set; BENCH_ARGS: more `helexa-node bench` flags.
  name="bench-${formats//,/-}${BENCH_TAG:+-$BENCH_TAG}"
  "$bin/helexa-node" bench --engine "$bin/engine-cuda.so" --synth qwen3-8b --formats "$formats" \
    --workdir /tmp/bench-models --label "h200${BENCH_TAG:+-$BENCH_TAG}" --json "$OUT/$name.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/$name.txt"
  status=${PIPESTATUS[0]}
  ;;
kernels)
  # Kernel launches and GPU time per decoded token, from Nsight Compute (one metric,
  # gpu__time_duration, so each kernel runs once; --clock-control none: the card's clocks are
  # left as they are, as the device rules ask) over short decodes of the Qwen3-8B shapes
  # cut to 1 and 2 layers, 4 and 8 tokens each. Differences isolate the launches per token
  # per layer and per token outside the layers; scripts/device/kernel_counts.py does the
  # arithmetic, groups GPU time by kernel and lists the last decoded token launch by launch.
  # BENCH_ARGS="--temperature 0.7 --top-p 0.95" profiles sampled decode (the device draw).
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  for layers in 1 2; do
    "$bin/helexa-node" synth --preset qwen3-8b --layers "$layers" --formats "${2:-bf16}" \
      --out "/tmp/kernel-models/l$layers" > /dev/null
    model=$(ls -d /tmp/kernel-models/l$layers/*-"${2:-bf16}"/ | head -1)
    for tokens in 4 8; do
      "$ncu" --clock-control none --csv --log-file "/tmp/ncu-l$layers-t$tokens.csv" --metrics gpu__time_duration.sum \
        "$bin/helexa-node" bench --engine "$bin/engine-cuda.so" --model "$model" --prefill 8 \
        --decode-context 0 --decode-tokens "$tokens" --warmup 0 --repeats 1 ${BENCH_ARGS:-} \
        > /dev/null 2>&1
    done
  done
  python3 scripts/device/kernel_counts.py /tmp 36 | tee "$OUT/kernels.txt"
  ;;
prefill-kernels)
  # One prompt on the Qwen3-8B shapes cut to 1 and 2 layers under Nsight Compute: the
  # difference is one layer's kernels (kernel_counts.py --prefill).
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  format=${2:-bf16}
  for layers in 1 2; do
    "$bin/helexa-node" synth --preset qwen3-8b --layers "$layers" --formats "$format" \
      --out "/tmp/kernel-models/l$layers" > /dev/null
    model=$(ls -d /tmp/kernel-models/l$layers/*-"$format"/ | head -1)
    "$ncu" --clock-control none --csv --log-file "/tmp/ncu-prefill-l$layers.csv" --metrics gpu__time_duration.sum \
      "$bin/helexa-node" bench --engine "$bin/engine-cuda.so" --model "$model" \
      --prefill "${3:-2048}" --decode-context 0 --decode-tokens 1 --warmup 0 --repeats 1 \
      ${BENCH_ARGS:-} > /dev/null 2>&1
  done
  python3 scripts/device/kernel_counts.py --prefill /tmp 36 | tee "$OUT/prefill-kernels-$format.txt"
  ;;
gemv-profile)
  # Why the batch-1 products run below the bandwidth: Nsight Compute's throughput, memory,
  # occupancy and warp-stall sections on each GEMV launch of two decoded tokens of the Qwen3-8B
  # shapes cut to one layer, per format (default all three).
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  for format in $(echo "${2:-bf16,q8_0,q4_k_m}" | tr , ' '); do
    "$bin/helexa-node" synth --preset qwen3-8b --layers 1 --formats "$format" \
      --out /tmp/profile-models > /dev/null
    model=$(ls -d /tmp/profile-models/*-"$format"/ | head -1)
    "$ncu" --clock-control none --kernel-name regex:gemv --launch-count 12 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section SchedulerStats --section WarpStateStats \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      "$bin/helexa-node" bench --engine "$bin/engine-cuda.so" --model "$model" --prefill 8 \
      --decode-context 0 --decode-tokens 2 --warmup 0 --repeats 1 > "$OUT/gemv-profile-$format.txt" 2>&1
    echo "gemv-profile $format: exit $? ($(grep -c '^  [a-z_0-9]*gemv' "$OUT/gemv-profile-$format.txt") launches)"
  done
  ;;
*)
  echo "unknown mode $mode (check | tests | bench | kernels | prefill-kernels | gemv-profile | gemv-sweep |"
  echo "  omit-sweep | switches | all)"
  exit 2
  ;;
esac
tar -C /tmp -czf "$OUT/jitcache.tgz" jc 2>/dev/null
exit $status
