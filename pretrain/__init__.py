"""Pretraining: tokenizers, data preprocessing and loading (Megatron indexed datasets),
LR/batch schedules, the optimizer, the training loop, metrics (W&B, jsonl, MFU),
scaling-law fits and sweep generation, and the `python -m pretrain` CLI. It contains no
model math. Not implemented yet: it arrives with issue 5.
"""
