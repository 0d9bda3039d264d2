"""The main job until the training loop lands: the tiny DeepSeek-V3 preset (MLA, shared + routed
experts with aux-loss-free routing, one MTP module) trained for a few AdamW steps on an embedded
byte-level text, printing every loss term. `python -m model.demo [--steps N] [--preset NAME]`."""
from __future__ import annotations

import argparse
import time

import torch

from . import build_model, preset

TEXT = (
    "A mixture-of-experts language model routes every token to a few of its many experts. "
    "Shared experts see every token and hold common knowledge; routed experts specialise. "
    "Multi-head latent attention compresses keys and values into one small latent vector per token, "
    "so the cache that generation keeps is a fraction of what multi-head attention would need. "
    "A bias on each expert, nudged after every step against its load, keeps the experts balanced "
    "without an auxiliary loss that would fight the language modelling objective. "
    "Multi-token prediction asks each position to predict the token after next as well, "
    "densifying the training signal. "
) * 4


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny-deepseek-v3")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.seq < 2 or args.batch < 1:
        ap.error("--steps, --batch must be >= 1 and --seq >= 2")

    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    if cfg.vocab_size < 256:
        ap.error(f"preset {args.preset} has vocab_size {cfg.vocab_size}; the byte-level demo needs >= 256")
    net = build_model(cfg, seed=args.seed).train()
    counts = cfg.param_counts()
    print(f"{cfg.name}: {counts['total']:,} parameters, {counts['active']:,} active per token")

    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        start = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        window = torch.stack([data[s: s + args.seq + 1] for s in start.tolist()])
        t0 = time.perf_counter()
        out = net.loss(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        net.update_expert_bias()  # V3 §2.1.2, after the optimizer step
        dt = time.perf_counter() - t0
        terms = " ".join(f"{k}={v.item():.4f}" for k, v in out.items() if k != "loss")
        print(f"step {step:3d} loss={out['loss'].item():.4f} {terms} grad_norm={grad_norm.item():.3f} "
              f"tokens/s={args.batch * args.seq / dt:,.0f}")


if __name__ == "__main__":
    main()
