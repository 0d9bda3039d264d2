#!/usr/bin/env bash
# Issue 26's GPU measurements in one device call, all well under 8 minutes, everything written to $OUT:
#   1. the CUDA FP8 tests (tests/test_fp8_cuda.py): the Triton grouped GEMM, the fused quantisers and the
#      fused linear plumbing against the emulation, plus the existing scaled_mm / quantiser checks;
#   2. benchmarks/gpu_proxy.py at V3's widths: BF16 and FP8 steps, eager and compiled, MFU, memory, kernel
#      breakdown, experts alone, each linear shape, and torchtitan 0.3.0's DeepSeek-V3 at the same shape.
#
# From the session (the wheels are ignored by git, so they travel only when carried):
#   run(command="bash benchmarks/gpu_issue26.sh", carry=["benchmarks/.wheels"], timeout_s=600)
# then copy $OUT/gpu_proxy_*.json to benchmarks/results/ and summarise it in docs/performance.md, docs/fp8.md.
#
# Here, once, with network access (2.6 MB: torchtitan 0.3.0 and what the H200 image lacks of its needs):
#   bash benchmarks/gpu_issue26.sh --fetch-wheels
set -u
cd "$(dirname "$0")/.."
WHEELS=benchmarks/.wheels

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS" && printf '*\n' > "$WHEELS/.gitignore"   # the folder ignores itself
    PY=${PY:-.venv/bin/python}
    PIP_FIND_LINKS= $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" torchtitan==0.3.0 torchdata==0.11.0 torch_checkpointing==0.1.1 datasets==4.7.0 tyro==1.0.17 \
        spmd_types==0.2.3 docstring-parser==0.18.0 typeguard==4.6.1 dill==0.4.0 multiprocess==0.70.18
    du -sh "$WHEELS"
    exit
fi

OUT=${OUT:-/tmp/issue26_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
t0=$(date +%s)
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)"
    $PY -c "import deep_gemm" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1

# torchtitan and its missing dependencies, offline (no package index there)
if ls $WHEELS/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ttsite $WHEELS/*.whl \
        >> "$OUT/env.txt" 2>&1 && export PYTHONPATH=/tmp/ttsite${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no wheels in $WHEELS: torchtitan will be reported as missing (carry benchmarks/.wheels)" >> "$OUT/env.txt"
fi

# 1. kernel correctness against the emulation, on the GPU (~1-2 min: Triton compiles each kernel once)
timeout 170 $PY -m pytest -q -p no:cacheprovider tests/test_fp8_cuda.py > "$OUT/test_fp8_cuda.log" 2>&1
echo "test_fp8_cuda rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"

# 2. the proxy (JSON rewritten after each stage: a run cut short keeps what it measured)
left=$(( 450 - ($(date +%s) - t0) ))
timeout $(( left > 120 ? left : 120 )) $PY benchmarks/gpu_proxy.py --out "$OUT" --time-budget 170 \
    > "$OUT/gpu_proxy.log" 2>&1
echo "gpu_proxy rc=$? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
tail -5 "$OUT/test_fp8_cuda.log"; grep -E "^\[" "$OUT/gpu_proxy.log" | tail -30
