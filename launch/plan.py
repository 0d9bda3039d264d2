"""python -m launch.plan: which parallel layouts fit a cluster, and how fast each would train.

    python -m launch.plan --model deepseek-v3 --gpus 2048 --gpu h800 --global-batch 15360 --fp8
    python -m launch.plan --model deepseek-v3 --gpus 2048 --gpu h800 --global-batch 15360 --fp8 \\
        --layout pp=16,ep=64,tp=1 --schedule dualpipe --zero 1 --recompute selective --json

The model and its constants are plan/planner.py's (the GPU table plan/hardware.py's); docs/planner.md
explains every term.

    python -m launch.plan --posttrain configs/posttrain/recipes/r1_zero.yaml --gpus 512 --gpu h800

prints a post-training stage's memory per rank instead (plan/posttrain.py: the policy, its reference, the
rollout copy and the engine's cache), and exits 1 when it does not fit; the stage comes from the config's
sections (grpo, dpo, rejection, else sft) unless --stage names it; KEY=VALUE overrides apply as in the stage.
"""
from __future__ import annotations

import argparse
import json
import sys


def posttrain_main(argv: list[str]) -> int:
    """`--posttrain CONFIG`: the memory per rank of a post-training stage (plan/posttrain.py)."""
    from plan import posttrain as PT
    from plan.planner import GPUS

    ap = argparse.ArgumentParser(prog="python -m launch.plan --posttrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posttrain", required=True, metavar="CONFIG", help="a post-training YAML (posttrain.config)")
    ap.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    ap.add_argument("--gpu", default="H800", help=f"GPU kind: {', '.join(GPUS)} (default H800)")
    ap.add_argument("--stage", choices=PT.STAGES, help="default: from the config's sections")
    ap.add_argument("--prompt-tokens", type=int, help="the longest prompt (GRPO, rejection; default: data.seq_len - "
                    "rollout.max_new_tokens)")
    ap.add_argument("--gpus-per-node", type=int, help="default: parallel.node_size")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. parallel.pp=16")
    args = ap.parse_args(argv)

    from posttrain.config import load_config, user_errors
    try:
        stage = args.stage or PT.stage_of(args.posttrain)
        cfg = load_config(args.posttrain, args.overrides)
        m = PT.posttrain_memory(cfg, stage, args.gpus, args.gpu, prompt_tokens=args.prompt_tokens,
                                gpus_per_node=args.gpus_per_node)
    except (*user_errors(), ValueError, OSError) as e:   # ConfigError, PlanError: messages name the key
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m.as_dict(), indent=1) if args.json else PT.report(m))
    return 0 if m.fits else 1


def main(argv: list[str] | None = None) -> int:
    from plan import planner as P

    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--posttrain" or a.startswith("--posttrain=") for a in argv):
        return posttrain_main(argv)

    ap = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model preset, e.g. deepseek-v3")
    ap.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    ap.add_argument("--gpu", default="H100", help=f"GPU kind: {', '.join(P.GPUS)} (default H100)")
    ap.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    ap.add_argument("--layout", default="", help="pin tp/pp/ep/dp/vpp/cp, e.g. pp=16,ep=64,tp=1 (cp: context parallel, "
                    "searched by default where a rank keeps >= 4096 tokens of a sequence)")
    ap.add_argument("--schedule", choices=P.SCHEDULE_NAMES, help="pin the pipeline schedule")
    ap.add_argument("--zero", type=int, choices=P.ZERO, help="1: ZeRO-1 (optimizer states sharded); 3: FSDP")
    ap.add_argument("--recompute", choices=P.RECOMPUTE, help="pin activation recomputation")
    prec = ap.add_mutually_exclusive_group()
    prec.add_argument("--precision", choices=P.PRECISIONS, help="GEMM precision (default bf16)")
    prec.add_argument("--fp8", dest="precision", action="store_const", const="fp8", help="= --precision fp8")
    prec.add_argument("--no-fp8", dest="precision", action="store_const", const="bf16", help="= --precision bf16")
    ap.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    ap.add_argument("--nvlink-gbps", type=float, help="NVLink GB/s per GPU and direction (default: the GPU's)")
    ap.add_argument("--ib-gbps", type=float, help="InfiniBand GB/s per GPU and direction (default: the GPU's)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--ep-overlap", choices=P.EP_OVERLAP, default="runtime",
                    help="which expert all-to-all overlap to assume: runtime (what whaletron runs: micro-batch "
                         "pairing at pp = 1, parallel.overlap=ep), dualpipe (DeepSeek's DualPipe at pp > 1), none")
    ap.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object: the pinned or best layout")
    args = ap.parse_args(argv)

    from model import build_model, preset
    try:
        cfg = preset(args.model)
        if args.seq_len < 1:
            raise P.PlanError(f"--seq-len must be >= 1, got {args.seq_len}")
        if args.top < 1:
            raise P.PlanError(f"--top must be >= 1 (rows of the table), got {args.top}")
        cluster = P.Cluster(args.gpu, args.gpus, args.gpus_per_node, args.nvlink_gbps, args.ib_gbps)
        pin = P.parse_layout(args.layout)
        for key, value in (("schedule", args.schedule), ("zero", args.zero), ("recompute", args.recompute),
                           ("micro_batch", args.micro_batch)):
            if value is not None:
                pin[key] = value
        shape = P.model_shape(build_model(cfg, device="meta"), args.seq_len)
        plans = P.plan(shape, cluster, args.global_batch, precision=args.precision or "bf16", pin=pin,
                       ep_overlap=args.ep_overlap)
    except ValueError as e:   # PlanError, an unknown preset
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = dict(model=args.model, gpu=cluster.gpu, gpus=cluster.n_gpus, gpus_per_node=cluster.gpus_per_node,
                   nvlink_gbps=cluster.nvlink_gbps, ib_gbps=cluster.ib_gbps, global_batch=args.global_batch,
                   seq_len=args.seq_len, train_flops_per_token=shape.train_flops_per_token,
                   ep_overlap=args.ep_overlap, **plans[0].as_dict(), constants=P.constants())
        print(json.dumps(out, indent=1))
    else:
        print(P.report(plans, shape, cluster, args.global_batch, args.top, args.ep_overlap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
