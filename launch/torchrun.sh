#!/usr/bin/env bash
# One node: launch/torchrun.sh NPROC [python -m pretrain arguments...]
#   launch/torchrun.sh 4 --config configs/pretrain/tiny_v3.yaml train.steps=50
# Uses the repository's .venv when present. MAX_RESTARTS (default 0) restarts failed workers,
# which resume from the last checkpoint (checkpoint.resume=auto). MODULE picks another entry point
# (e.g. MODULE=posttrain.sft).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC --config FILE [key=value ...]}
shift
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    --max-restarts "${MAX_RESTARTS:-0}" -m "${MODULE:-pretrain}" "$@"
