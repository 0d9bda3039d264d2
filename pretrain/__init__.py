"""Pretraining: tokenizers, data preprocessing and loading (Megatron indexed datasets),
LR/batch schedules, the optimizer, the training loop, metrics (W&B, jsonl, MFU),
the training session kit (session.py), the `python -m pretrain` CLI, and scaling-law sweeps, fits and
plots (scaling/). It contains no model math.
"""
