#!/usr/bin/env bash
# Issue 23's GPU measurements in one device call (about 7 minutes), everything written to $OUT:
#   1. tests/test_rollout_cuda.py: the engine's CUDA graphs (StepGraphs) against the eager engine, plain and
#      speculating, T = 0 and T = 0.8, a second call reusing the kept pool and graphs (dynamo, eager kernels);
#   2. benchmarks/rollout.py --device cuda --wide: the static Generator vs continuous batching vs + shared prefixes
#      vs + 3 MTP drafts, T = 0 on the GRPO batch (16 prompts x 8) and at 4 sequences, on a V3-shaped model of
#      dim 1024 (6 layers, 16 experts, 184M parameters) trained in fp32 and rolled out in bf16 (a decode step at
#      128 sequences then reads 0.37 GB of weights, ~0.11 ms at 3.35 TB/s, against ~0.05 ms of bf16 tensor-core
#      arithmetic even with every expert run densely: memory-bound, the regime speculation is for), each engine
#      row also without CUDA graphs (speedup_cuda_graphs). Inductor compiles each step program once (Triton);
#      the fraction of sequences whose T = 0 tokens equal the static engine's is reported per row (bf16).
#
#   3. only if 2 fails before its first section is written: the same greedy rows without CUDA graphs (--no-graphs).
#
# From the session:  run(command="bash benchmarks/gpu_issue23.sh", timeout_s=600)
# then copy $OUT/rollout_gpu*.json to benchmarks/results/ and summarise it in docs/posttrain.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/issue23_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# 1. graphs against eager (~1-2 min)
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_rollout_cuda.py > "$OUT/test_rollout_cuda.log" 2>&1
echo "test_rollout_cuda rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"

# 2. the benchmark (its JSON is rewritten after each section: a run cut short keeps what it measured)
left=$(( 540 - ($(date +%s) - t0) ))
timeout $(( left > 240 ? left : 240 )) $PY benchmarks/rollout.py --device cuda --wide --lr 1e-3 --threads 8 \
    --dtype bfloat16 --sections greedy small --draft-tokens 3 --repeats 3 --compare-graphs --out "$OUT/rollout_gpu.json" \
    > "$OUT/rollout_gpu.log" 2>&1
rc=$?
echo "rollout rc=$rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"

# 3. only if 2 failed before its greedy section was written (a graph capture that fails, say) and 150 s are left:
#    the same rows compiled without CUDA graphs, so that the call still brings back the engine's GPU numbers
left=$(( 570 - ($(date +%s) - t0) ))
if [ $rc -ne 0 ] && ! grep -q '"temperature_0"' "$OUT/rollout_gpu.json" 2>/dev/null && [ $left -ge 150 ]; then
    timeout $left $PY benchmarks/rollout.py --device cuda --wide --lr 1e-3 --threads 8 --dtype bfloat16 \
        --sections greedy --draft-tokens 3 --repeats 2 --no-graphs --out "$OUT/rollout_gpu_no_graphs.json" \
        > "$OUT/rollout_gpu_no_graphs.log" 2>&1
    echo "fallback without graphs rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
    tail -25 "$OUT/rollout_gpu_no_graphs.log"
fi
tail -4 "$OUT/test_rollout_cuda.log"; tail -25 "$OUT/rollout_gpu.log"
