"""One decode step against one speculation step, per running batch size: where MTP speculation pays on this machine.

benchmarks/rollout.py measures whole rollouts; its batch shrinks from 128 sequences to 1 as replies finish, so its
speculative speedup is an average over batch sizes. This script takes the same trained model and prompts
(rollout.py's `train` and chain task), runs the engine once plainly and once with --draft-tokens drafts, captures the
arguments of the first step at each running batch size near --batches (the block tables, positions, a copy of the
pages), and times the two compiled step programs the engine runs (`decode_step`, `speculation_step`, through
posttrain/generate.py `compiled`) on them, interleaved, best of --repeats rounds of --calls calls each.

Per batch size: ms per decode step, ms per speculation step, and the speculative speedup a step at that batch gives,
tokens per verify step x decode ms / speculation ms, where tokens per verify step = 1 + the run's mean accepted
drafts per step (1 + the sum of its per-position acceptance). The crossover is where it falls below 1.

Why it falls (the roofline): the machine's GEMM FLOP/s and memory bandwidth are measured (`_machine.roofline`), and
each step's matmul FLOPs counted (torch's FlopCounterMode, once, eagerly). A step's FLOPs per byte of weights it
reads, against the machine's ridge point, says whether reading the weights (paid once per step, whatever the tokens:
what speculation amortises) or the arithmetic (paid per token) bounds it.

Usage: python benchmarks/rollout_steps.py [--out PATH] [--batches 8 32 64 128] [--draft-tokens 3] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import posttrain.engine as engine
from model.moe import Experts
from _machine import machine, roofline, write_result
from posttrain.engine import Engine
from posttrain.generate import Generator, SamplingParams, compiled
from rollout import ChainTask, ChainTokenizer, eval_prompts, train, workload_args


def capture(net, tok, prompts, params, draft_tokens: int, batches: list[int]):
    """({batch wanted: (batch, the step function's arguments)}, the completions, the stats) of an eager run of the
    engine: the arguments of the first step whose running batch b lies in (want / 2, want] for each wanted size
    (speculating, a step whose rows all verify the full draft count: lens None)."""
    name = "speculation_step" if draft_tokens else "decode_step"
    step, found = getattr(engine, name), {}

    def grab(**kw):
        b = kw["tokens"].shape[0]
        for want in batches:
            if want // 2 < b <= want and want not in found and kw.get("lens") is None:
                copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                copy["pages"] = [{k: v.clone() for k, v in layer.items()} for layer in kw["pages"]]
                found[want] = (b, copy)
        return step(**kw)

    setattr(engine, name, grab)
    try:
        outs, stats = Engine(net, tok, max_batch=max(batches), draft_tokens=draft_tokens).generate(prompts, params)
    finally:
        setattr(engine, name, step)
    return found, outs, stats


def best_ms(fn, kwargs: dict, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn(**kwargs)
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def step_flops(fn, kwargs: dict) -> int:
    """The matmul FLOPs of one eager call of a step function, with the routed experts run densely as the compiled
    program runs them (model/moe.py `dense_products`)."""
    dense, Experts.dense_products = Experts.dense_products, 2 ** 62
    try:
        with FlopCounterMode(display=False) as counter:
            fn(**kwargs)
    finally:
        Experts.dense_products = dense
    return counter.get_total_flops()


def main(argv=None) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    workload_args(ap, os.path.join(here, "results", "rollout_steps_cpu.json"))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args(argv)
    if args.draft_tokens < 1 or min(args.batches) < 2:
        ap.error("--draft-tokens must be >= 1 and every --batches size >= 2")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    net, cfg, trained = train(ChainTask(args.seed, args.max_len), args.train_steps, 16, args.seed)
    tok = ChainTokenizer()
    prompts = eval_prompts(args.seed, args.max_len, args.prompts, args.group)
    params = SamplingParams(max_new_tokens=args.max_len + 16, temperature=0.0)
    ref, _ = Generator(net, tok).generate(prompts, params)
    plain, _, _ = capture(net, tok, prompts, params, 0, args.batches)
    spec, outs, stats = capture(net, tok, prompts, params, args.draft_tokens, args.batches)
    assert [c.ids for c in outs] == [c.ids for c in ref], "the speculative engine's greedy tokens differ from static"
    per_step = 1 + sum(stats["acceptance_per_position"])
    roof = roofline()
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    programs = {"decode": compiled(engine.decode_step), "speculation": compiled(engine.speculation_step)}
    rows = {}
    with torch.no_grad():
        for want in sorted(set(plain) & set(spec)):
            cases = {"decode": plain[want], "speculation": spec[want]}
            compile_s, gflop = {}, {}
            for kind, (_, a) in cases.items():
                gflop[kind] = step_flops(getattr(engine, f"{kind}_step"), a) / 1e9
            for kind, (_, a) in cases.items():   # the first call of a shape class compiles
                t = time.perf_counter()
                programs[kind](**a)
                compile_s[kind] = round(time.perf_counter() - t, 1)
            ms = {kind: float("inf") for kind in cases}
            for _ in range(args.repeats):   # interleaved, so a slow spell does not fall on one side only
                for kind, (_, a) in cases.items():
                    ms[kind] = min(ms[kind], best_ms(programs[kind], a, args.calls))
            rows[str(want)] = {
                "batch_decode": cases["decode"][0], "batch_speculation": cases["speculation"][0],
                "keys_decode": cases["decode"][1]["keys"], "keys_speculation": cases["speculation"][1]["keys"],
                "ms_decode_step": round(ms["decode"], 3), "ms_speculation_step": round(ms["speculation"], 3),
                "speculation_over_decode": round(ms["speculation"] / ms["decode"], 2),
                "speedup_speculative_at_this_batch": round(per_step * ms["decode"] / ms["speculation"], 2),
                "gflop_decode_step": round(gflop["decode"], 4),
                "gflop_speculation_step": round(gflop["speculation"], 4),
                # the decode step's arithmetic intensity against its weights, and its ms at the GEMM ceiling
                "decode_flop_per_weight_byte": round(gflop["decode"] * 1e9 / weight_bytes, 1),
                "ms_decode_at_gemm_peak": round(gflop["decode"] / roof["gemm_tflops"], 3),
                "first_call_seconds": compile_s}
            print(want, rows[str(want)], flush=True)
    result = {
        "benchmark": "rollout_steps",
        "command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(here))] + sys.argv[1:]),
        "machine": machine(load_before),
        "torch": torch.__version__,
        "dtype": "float32",
        "model": {"preset": "tiny-deepseek-v3", "dim": cfg.dim, "n_layers": cfg.n_layers, "n_mtp": cfg.n_mtp,
                  "trained": trained},
        "roofline": {**roof, "weight_bytes": weight_bytes,
                     "ms_weights_from_memory": round(weight_bytes / roof["memory_tb_per_s"] / 1e9, 4)},
        "draft_tokens": args.draft_tokens,
        "acceptance_per_position": stats["acceptance_per_position"],
        "tokens_per_verify_step": round(per_step, 3),
        "equal_to_static": True,   # asserted above
        "compiled": "torch.compile(dynamic=True), inductor C++ kernels and C++ wrapper (posttrain/generate.py)",
        "rows": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
