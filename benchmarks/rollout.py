"""Rollout speed on CPU: the static Generator vs the continuous-batching engine (posttrain/engine.py), then
+ shared prefixes, then + MTP speculation, measured in one run on a long-tailed length mix.

The model: the tiny V3 preset at the GRPO demonstration's width (dim 128, MLA, MoE, one MTP module), trained
here for --train-steps steps, MTP loss included (V3 §2.2), on a synthetic task whose reply lengths are
long-tailed: a hidden chain orders the tokens 2..255 and ends in end-of-document (0); a document is a
prompt (2-48 random tokens, then a start token) and a walk along the chain from the start (the next link
with probability 0.75, else a skip 2-9 links ahead) to the end. Starts are drawn so that the remaining
chain is log-uniform in 4..--max-len links: most replies are short, a few are long, as rollouts are. At
T = 0 the trained model follows the chain link by link and stops at its end.

Rows, each on the same --prompts prompts x --group samples (a GRPO batch, the demo's 16 x 8 by default):
  static          Generator.generate on the whole batch (every sequence waits for the longest)
  continuous      Engine(share_prefix=False): sequences leave when done, max_batch --max-batch
  shared_prefix   Engine(): + each group's prompt prefilled once, pages shared (copy on write)
  speculative     Engine(draft_tokens=k): + MTP drafts verified by the model (T = 0 rows must equal plain)
T = 0 for the headline (speedup_continuous = shared_prefix / static, speedup_speculative = speculative /
shared_prefix at the best k, acceptance = accepted / drafted); the same at --temperature, and at T = 0 on
--small-batch distinct prompts (low load, where a verify step costs little more than a decode step: SGLang's
and vLLM's speculation figures are at batch 1 and low load), with its own best k
(speedup_speculative_small_batch). Every engine row's tokens are checked against the static engine's at T = 0
before they count (in fp32; with --dtype bfloat16 the fraction of equal sequences is reported instead: another
batch shape rounds differently there, and a near-tie may flip). Memory-bound (`memory_bound_temperature_0`,
T = 0): --memory-bound-prompts x --group sequences (the headline's prompts first, 512 by default), more than
--max-batch: the static engine runs them
max_batch at a time, one batch after another (a cache for max_batch sequences; each batch waits for its
longest), the engine keeps max_batch running and refills (`speedup_continuous_memory_bound`, and the best k's
`speedup_speculative_memory_bound`).

Compiled (the default; --no-compile: eager only). At this width a decode forward's time is mostly fixed per-op
cost (a few hundred small kernels launched from Python), which continuous batching and speculation cannot
shrink; the GPU answer is CUDA graphs over fixed batch buckets, the CPU one here torch.compile. Both sides are
compiled alike: the static Generator's decode steps and the engine's decode, verify and MTP draft forwards of
at most COMPILE_TOKENS (512) tokens run through torch.compile(dynamic=True) (inductor's C++ kernels, built
with gcc and called from its C++ wrapper; symbolic batch, chunk and context sizes, so one program per function
and chunk of one or more serves every step), prefills stay eager. Each row runs once untimed first: that
warm-up (compilation included) is reported per row in the JSON's `compile`, and the timed rows are the fastest
of --repeats after it. The compiled static Generator's T = 0 tokens are checked against the eager one's, and
the T = 0 rows are run eagerly too (`eager_temperature_0`, with its own speedups), for context.

Usage: python benchmarks/rollout.py [--out PATH] [--train-steps N] [--prompts N] [--group G] [--repeats R]
                                    [--memory-bound-prompts N] [--no-compile]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from _machine import machine, roofline, write_result

from model import build_model, preset
from model.transformer import IGNORE_INDEX
from posttrain.engine import Engine
from posttrain.generate import COMPILE_TOKENS, Generator, SamplingParams

VOCAB, EOD = 256, 0
SECTIONS = ("greedy", "sampled", "small", "memory", "eager")


class ChainTokenizer:
    """Ids as text (the engine decodes only for stop strings and the completion text)."""
    eod_id, bos_id, vocab_size = EOD, None, VOCAB

    def decode(self, ids):
        return " ".join(map(str, ids))


class ChainTask:
    """The synthetic task: a chain over tokens 2..255 ending in EOD, walked with skips."""

    def __init__(self, seed: int, max_len: int):
        self.g = torch.Generator().manual_seed(seed)
        self.chain = (torch.randperm(VOCAB - 2, generator=self.g) + 2).tolist() + [EOD]
        self.where = {t: i for i, t in enumerate(self.chain)}
        self.max_len = max_len

    def _rand(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=self.g))

    def prompt(self) -> list[int]:
        remaining = int(math.exp(float(torch.empty(1).uniform_(math.log(4), math.log(self.max_len),
                                                                 generator=self.g))))
        start = self.chain[len(self.chain) - 1 - remaining]
        return [self._rand(2, VOCAB - 1) for _ in range(self._rand(2, 48))] + [start]

    def reply(self, start: int) -> list[int]:
        out, i = [], self.where[start]
        while self.chain[i] != EOD:
            i = min(len(self.chain) - 1, i + (1 if torch.rand(1, generator=self.g) < 0.75 else self._rand(2, 9)))
            out.append(self.chain[i])
        return out


def eval_prompts(seed: int, max_len: int, n: int, group: int) -> list[list[int]]:
    """n held-out prompts of the chain task (its chain, another generator seed), each repeated group times in a
    row: a GRPO batch."""
    task = ChainTask(seed, max_len)
    task.g.manual_seed(10_000 + seed)
    return [q for q in (task.prompt() for _ in range(n)) for _ in range(group)]


# --wide (the GPU run): V3's shape at a width where a decode step reads its weights from memory (184M parameters,
# 0.37 GB in bf16), not the CPU run's dim 128
WIDE = dict(dim=1024, n_layers=6, inter_dim=2816, n_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_activated_experts=4, moe_inter_dim=512)


def train(task: ChainTask, steps: int, batch: int, seed: int, device: str = "cpu", wide: bool = False,
          lr: float = 3e-3):
    cfg = preset("tiny-deepseek-v3", vocab_size=VOCAB, max_seq_len=256, **(WIDE if wide else dict(dim=128)))
    torch.manual_seed(seed)
    net = build_model(cfg, device=device, seed=seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    net.train()
    t0, last = time.perf_counter(), {}
    for step in range(steps):
        docs = []
        for _ in range(batch):
            q = task.prompt()
            docs.append((q, task.reply(q[-1])))
        n = max(len(q) + len(r) for q, r in docs)
        tokens = torch.full((batch, n), EOD, device=device)
        labels = torch.full((batch, n), IGNORE_INDEX, device=device)
        for b, (q, r) in enumerate(docs):
            seq = q + r
            tokens[b, :len(seq)] = torch.tensor(seq)
            labels[b, len(q) - 1:len(seq) - 1] = torch.tensor(r)   # the reply only, EOD included
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        out = net.loss(tokens, labels)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        net.update_expert_bias()
        last = {k: round(float(v.detach()), 4) for k, v in out.items() if k in ("lm_loss", "mtp_loss")}
    return net.eval(), cfg, {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 1), **last}


def static_chunks(gen: Generator, prompts: list[list[int]], params: SamplingParams, batch: int):
    """The static Generator over consecutive batches of `batch` prompts (what a cache for `batch` sequences
    allows), one after another: (every completion in order, the summed tokens over the wall time)."""
    t0, outs = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        outs += gen.generate(prompts[i:i + batch], params, seed=0)[0]
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.ids) for c in outs)
    return outs, {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def workload_args(ap: argparse.ArgumentParser, out: str) -> None:
    """The options rollout.py and rollout_steps.py share: where the result goes, the model's training, the
    prompts (the chain task's), and the machine's threads."""
    ap.add_argument("--out", default=out)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=160, help="the longest reply the task asks for")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)


def interleaved(runs: dict, repeats: int) -> dict:
    """name -> (outputs, stats) of the fastest of `repeats` runs of each, the runs interleaved (rotating the
    order each round) so that a slow spell of the machine does not fall on one row only."""
    best: dict = {}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            outs, stats = runs[name]()
            if name not in best or stats["seconds"] < best[name][1]["seconds"]:
                best[name] = (outs, stats)
    return best


def main(argv=None) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    workload_args(ap, os.path.join(here, "results", "rollout_cpu.json"))
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--small-batch", type=int, default=4, help="sequences of the low-load speculation rows")
    ap.add_argument("--memory-bound-prompts", type=int, default=64,
                    help="prompts (x --group samples) of the memory-bound rows: more sequences than --max-batch")
    ap.add_argument("--memory-bound-repeats", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="decode steps of the static Generator and of the engine through torch.compile (warmed up "
                         "untimed first); --no-compile: eager only")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run: engine steps replay CUDA graphs)")
    ap.add_argument("--wide", action="store_true", help=f"a wider V3-shaped model ({WIDE}) instead of dim 128")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the rollouts' precision (trained in fp32, then cast); bf16: T = 0 equality is reported, "
                         "not asserted")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="which blocks of rows to run (greedy: the headline, T = 0; sampled: --temperature; small: "
                         "--small-batch sequences; memory: memory-bound; eager: greedy uncompiled)")
    ap.add_argument("--compare-graphs", action="store_true",
                    help="with --device cuda: also each engine row without CUDA graphs (buckets=False), per section")
    ap.add_argument("--no-graphs", action="store_true",
                    help="with --device cuda: every engine row compiled but without CUDA graphs (buckets off): what "
                         "the device script falls back to when a graph capture fails")
    args = ap.parse_args(argv)
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device {args.device!r}: cpu, or cuda on a machine with a CUDA device")
    if "greedy" not in args.sections:
        ap.error("--sections must include greedy: the headline speedups and the best draft count come from it")
    if args.compare_graphs and (args.device != "cuda" or not args.compile):
        ap.error("--compare-graphs needs --device cuda and compiled steps (CUDA graphs replay compiled steps)")
    if args.no_graphs and (args.device != "cuda" or args.compare_graphs):
        ap.error("--no-graphs goes with --device cuda (steps replay CUDA graphs only there) and not with "
                 "--compare-graphs (which measures each engine row both ways)")
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    roof = roofline(args.device)   # GEMM and memory ceilings (bf16 on a GPU): what bounds a decode step
    task = ChainTask(args.seed, args.max_len)
    net, cfg, trained = train(task, args.train_steps, 16, args.seed, args.device, args.wide, args.lr)
    print(f"trained {trained}", file=sys.stderr)
    net = net.to(getattr(torch, args.dtype))
    tok = ChainTokenizer()
    prompts = eval_prompts(args.seed, args.max_len, args.prompts, args.group)
    new = args.max_len + 16

    warmup: dict = {}
    refs: dict = {}
    command = "python " + " ".join([os.path.relpath(__file__, os.path.dirname(here))] + sys.argv[1:])
    done: dict = {}   # the sections measured so far, written after each: a run cut short keeps them

    def rows_at(label: str, temperature: float, prompts: list[list[int]], compile: bool = args.compile,
                draft_tokens: list[int] = args.draft_tokens, chunked: bool = False,
                repeats: int = args.repeats) -> dict:
        params = SamplingParams(max_new_tokens=new, temperature=temperature)
        seeds = list(range(len(prompts)))
        engines = {"continuous": dict(share_prefix=False), "shared_prefix": dict()}
        engines.update({f"speculative_k{k}": dict(draft_tokens=k) for k in draft_tokens})
        if args.no_graphs:
            engines = {name: dict(kw, buckets=False) for name, kw in engines.items()}
        elif args.compare_graphs and compile:
            engines.update({f"{name}_no_graphs": dict(kw, buckets=False) for name, kw in engines.items()})
        static = Generator(net, tok, compile=compile)
        if chunked:   # the static engine holds max_batch sequences too: consecutive batches, each waits for its longest
            runs = {"static": lambda: static_chunks(static, prompts, params, args.max_batch)}
        else:
            runs = {"static": lambda: static.generate(prompts, params, seed=0)}
        for name, kw in engines.items():   # one engine per row, as a trainer keeps one (its CUDA graphs with it)
            runs[name] = (lambda engine: lambda: engine.generate(prompts, params, seeds=seeds))(
                Engine(net, tok, max_batch=args.max_batch, compile=compile, **kw))
        if compile:   # untimed: the first call of each program shape compiles it (inductor's C++ build)
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                warmup[name] = round(warmup.get(name, 0.0) + time.perf_counter() - t0, 1)
        best = interleaved(runs, repeats)
        ref = best["static"][0]
        refs[compile, temperature, len(prompts)] = [c.ids for c in ref]
        lengths = sorted(len(c.ids) for c in ref)
        out = {}
        for name, (outs, st) in best.items():
            # T = 0: the fraction of sequences whose tokens equal the static engine's; in fp32 all must (asserted),
            # in bf16 another batch shape rounds differently and a near-tie may flip (reported)
            same = sum(c.ids == r.ids for c, r in zip(outs, ref)) / len(ref) if temperature == 0 else None
            if same is not None and args.dtype == "float32":
                assert same == 1, f"{name} differs from the static engine at T=0"
            row = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()
                   if k in ("tokens", "seconds", "tokens_per_s", "forwards", "steps", "prefill_tokens", "pages")}
            if "graphs" in st:
                row["graphs"], row["graph_replays"] = st["graphs"], st["graph_replays"]
            if "acceptance" in st:
                row["acceptance"] = round(st["acceptance"], 3)
                row["acceptance_per_position"] = [round(a, 3) for a in st["acceptance_per_position"]]
            if name != "static" and same is not None:
                row["equal_to_static"] = same
            out[name] = row
        done[label] = {"rows": out, "reply_lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2],
                                                      "p90": lengths[int(0.9 * len(lengths))], "max": lengths[-1],
                                                      "mean": round(sum(lengths) / len(lengths), 1)}}
        write_result(args.out, {"benchmark": "rollout", "partial": "the run had not finished when this was written",
                                "command": command, "device": args.device, "dtype": args.dtype, "roofline": roof,
                                **done})
        return done[label]

    on = set(args.sections)
    greedy = rows_at("temperature_0", 0.0, prompts)
    sampled = rows_at(f"temperature_{args.temperature}", args.temperature, prompts) if "sampled" in on else None
    small = (rows_at(f"small_batch_{args.small_batch}_temperature_0", 0.0, prompts[::args.group][:args.small_batch])
             if "small" in on else None)   # distinct prompts, one sample each
    best_k = max(args.draft_tokens, key=lambda k: greedy["rows"][f"speculative_k{k}"]["tokens_per_s"])
    # memory-bound: a GRPO step of more sequences than a batch holds (the headline's prompts first, then more);
    # the static engine runs them max_batch at a time, the engine keeps max_batch running, refilling
    more = eval_prompts(args.seed, args.max_len, args.memory_bound_prompts, args.group)
    bound = (rows_at("memory_bound_temperature_0", 0.0, more, draft_tokens=[best_k], chunked=True,
                     repeats=args.memory_bound_repeats) if "memory" in on else None)
    eager = (rows_at("eager_temperature_0", 0.0, prompts, compile=False) if args.compile and "eager" in on
             else None)   # the same rows uncompiled, for context
    r = greedy["rows"]
    spec = r[f"speculative_k{best_k}"]
    result = {
        "benchmark": "rollout",
        "command": command,
        "machine": machine(load_before),
        "roofline": {**roof, "weight_bytes": sum(p.numel() * p.element_size() for p in net.parameters())},
        "device": args.device,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model": {"preset": "tiny-deepseek-v3", "vocab_size": VOCAB, "dim": cfg.dim, "n_layers": cfg.n_layers,
                  "n_routed_experts": cfg.n_routed_experts, "n_mtp": cfg.n_mtp,
                  "parameters": sum(p.numel() for p in net.parameters()), "trained": trained},
        "workload": {"prompts": args.prompts, "group": args.group, "sequences": len(prompts),
                     "max_new_tokens": new, "max_batch": args.max_batch,
                     "task": "chain walk, reply length log-uniform in 4..max_len (see the docstring)"},
        "speedup_continuous": round(r["shared_prefix"]["tokens_per_s"] / r["static"]["tokens_per_s"], 2),
        "speedup_continuous_without_sharing": round(r["continuous"]["tokens_per_s"] / r["static"]["tokens_per_s"], 2),
        "speedup_speculative": round(spec["tokens_per_s"] / r["shared_prefix"]["tokens_per_s"], 2),
        "speculative_draft_tokens": best_k,
        "acceptance": spec["acceptance"],
        "acceptance_per_position": spec["acceptance_per_position"],
    }
    if args.compare_graphs:   # what replaying CUDA graphs gives each engine row, measured in the same run
        result["speedup_cuda_graphs"] = {name[:-len("_no_graphs")]: round(
            r[name[:-len("_no_graphs")]]["tokens_per_s"] / row["tokens_per_s"], 2)
            for name, row in r.items() if name.endswith("_no_graphs")}
    if small is not None:
        best_small = max(args.draft_tokens, key=lambda k: small["rows"][f"speculative_k{k}"]["tokens_per_s"])
        sr = small["rows"]
        result["speedup_speculative_small_batch"] = round(
            sr[f"speculative_k{best_small}"]["tokens_per_s"] / sr["shared_prefix"]["tokens_per_s"], 2)
        result["speculative_draft_tokens_small_batch"] = best_small
    if bound is not None:
        b = bound["rows"]
        result["speedup_continuous_memory_bound"] = round(b["shared_prefix"]["tokens_per_s"]
                                                          / b["static"]["tokens_per_s"], 2)
        result["speedup_speculative_memory_bound"] = round(b[f"speculative_k{best_k}"]["tokens_per_s"]
                                                           / b["shared_prefix"]["tokens_per_s"], 2)
    result["compiled"] = args.compile
    graphs = ("; on the GPU the engine's steps padded to batch and context buckets and replayed from a CUDA graph per "
              "bucket (posttrain/engine.py StepGraphs), the static Generator's not" if args.device == "cuda" else "")
    result["compile"] = ({"what": "the static Generator's decode steps and the engine's decode forwards, "
                                  "speculation steps (verify + acceptance + MTP drafts, one program) and MTP draft "
                                  f"forwards of <= {COMPILE_TOKENS} tokens (prefills eager): "
                                  "torch.compile(dynamic=True), inductor "
                                  + ("Triton kernels" if args.device == "cuda" else
                                     "C++ kernels (gcc) called from its C++ wrapper") + graphs
                                  + "; every row warmed up untimed first",
                          "warmup_seconds_per_row_incl_compile": warmup} if args.compile else None)
    result["temperature_0"] = greedy
    if sampled is not None:
        result[f"temperature_{args.temperature}"] = sampled
    if small is not None:
        result[f"small_batch_{args.small_batch}_temperature_0"] = small
    if bound is not None:
        result["memory_bound_temperature_0"] = {"sequences": len(more), "max_batch": args.max_batch,
                                                "static": f"{-(-len(more) // args.max_batch)} batches of "
                                                          f"{args.max_batch}, one after another", **bound}
    if eager is not None:
        assert args.dtype != "float32" or refs[True, 0.0, len(prompts)] == refs[False, 0.0, len(prompts)], \
            "compiled static differs from eager"
        e = eager["rows"]
        best_e = max(args.draft_tokens, key=lambda k: e[f"speculative_k{k}"]["tokens_per_s"])
        result["eager_temperature_0"] = {
            "speedup_continuous": round(e["shared_prefix"]["tokens_per_s"] / e["static"]["tokens_per_s"], 2),
            "speedup_speculative": round(e[f"speculative_k{best_e}"]["tokens_per_s"]
                                         / e["shared_prefix"]["tokens_per_s"], 2),
            "speculative_draft_tokens": best_e, **eager,
            "compiled_equal_to_eager": refs[True, 0.0, len(prompts)] == refs[False, 0.0, len(prompts)]}
    write_result(args.out, result)
    blocks = [("T=0", greedy), (f"T={args.temperature}", sampled), (f"T=0, {args.small_batch} sequences", small),
              (f"T=0, {len(more)} sequences, batches of {args.max_batch}", bound), ("T=0, eager", eager)]
    for label, block in blocks:
        if block is None:
            continue
        print(f"{label}: reply lengths {block['reply_lengths']}")
        for name, row in block["rows"].items():
            print(f"  {name:<28}{row['tokens_per_s']:>10.1f} tokens/s  {row['seconds']:>8.2f} s"
                  + (f"  acceptance {row['acceptance']:.2f} {row['acceptance_per_position']}" if "acceptance" in row
                     else ""))
    print({k: v for k, v in result.items() if k.startswith(("speedup", "acceptance", "speculative"))})
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
