"""Post-training: chat/think templates, SFT, the generation engine (KV cache), rewards,
GRPO, rejection sampling, distillation and DPO, each stage a `python -m posttrain.<stage>`
CLI that reuses `pretrain`'s loop pieces instead of a second runtime or model. Not
implemented yet: it arrives with issue 7.
"""
