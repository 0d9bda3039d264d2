"""Distillation (R1 §2.4: SFT only, on a teacher's verified outputs, into a smaller dense student):
`python -m posttrain.distill --teacher TEACHER.yaml --config STUDENT.yaml [key=value ...]`.

The two stages it is made of, in one job: posttrain.rejection with the teacher's config writes its
rejection.output, then posttrain.sft with the student's config trains on it. The student's
data.train_files must include that file (empty: that file alone); the overrides apply to the
student. An existing teacher output is reused rather than sampled again (sampling is the expensive
half, and a failed student run can be rerun); rejection.overwrite=true in the teacher's config
samples anew.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch.distributed as dist

from pretrain.config import ConfigError
from pretrain.session import join_job

from .config import PosttrainConfig, load_config
from .rejection import RejectionSampler
from .stage import StageError, guarded
from .sft import SFTTrainer


def distill(teacher: PosttrainConfig, student: PosttrainConfig) -> int:
    out = teacher.rejection.output
    if not out:
        raise ConfigError("the teacher's rejection.output is empty: name the jsonl the student trains on")
    files = [os.path.abspath(f) for f in student.data.train_files]
    if not files:
        student.data.train_files = [out]
    elif os.path.abspath(out) not in files:
        raise ConfigError(f"the student's data.train_files {student.data.train_files} do not include the teacher's "
                          f"rejection.output {out}")
    join_job(teacher)
    exists = [os.path.exists(out) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(exists, src=0)      # every rank takes the same branch
    if exists[0] and not teacher.rejection.overwrite:
        if dist.get_rank() == 0:
            print(f"distill: reusing the teacher's {out} (rejection.overwrite=true samples anew)", flush=True)
    else:
        sampler = RejectionSampler(teacher)
        sampler.run()
        del sampler                                 # the teacher's weights go before the student's arrive
        gc.collect()
    empty = [_no_records(out) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(empty, src=0)
    if empty[0]:
        raise StageError(f"{out}: no records: the teacher's rejection sampling kept no verified reply ("
                         f"{teacher.logging.run_dir}/metrics.jsonl counts the drops); raise rejection.samples, loosen "
                         "rejection.max_response_tokens / min_language_consistency or use a stronger teacher, and "
                         "sample again with rejection.overwrite=true in the teacher's config")
    return SFTTrainer(student).run()


def _no_records(path: str) -> bool:
    """Whether a jsonl file holds no record (empty, or blank lines only)."""
    with open(path, encoding="utf-8") as f:
        return not any(line.strip() for line in f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posttrain.distill", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="the teacher's rejection-sampling config (posttrain.rejection)")
    ap.add_argument("--config", required=True, help="the student's SFT config (posttrain.sft)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the student's config")
    args = ap.parse_args(argv)
    return guarded(lambda: distill(load_config(args.teacher), load_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
