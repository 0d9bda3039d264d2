"""Pretraining: tokenizers, data preprocessing and loading (Megatron indexed datasets),
LR/batch schedules, the optimizer, the training loop, metrics (W&B, jsonl, MFU),
and the `python -m pretrain` CLI (scaling-law fits and sweep generation arrive with the scaling
issue). It contains no model math.
"""
