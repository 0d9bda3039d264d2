"""Scaling laws (DeepSeek LLM §3) as data, the model scale M, the compute budget C and budget parsing.

    M = 72·n_layer·d² + 12·n_layer·d·l_seq    non-embedding FLOPs per token (attention included)
    C = M·D                                   compute budget of D training tokens
    B_opt = 0.2920·C^0.3271 (tokens)   η_opt = 0.3118·C^-0.1250
    M_opt = 0.1715·C^0.5243            D_opt = 5.8316·C^0.4757
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


# here, in the package's base module, because every other module raises it
class SweepError(ValueError):
    """A sweep problem (bad budget, missing manifest, bad point config, ...); the message names the
    problem and the fix."""


# -- the laws --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLaw:
    """y = k · x^a."""

    k: float
    a: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a if np.ndim(x) else self.k * float(x) ** self.a

    def to_dict(self) -> dict:
        return {"k": self.k, "a": self.a}

    @classmethod
    def from_dict(cls, d: dict) -> "PowerLaw":
        return cls(k=float(d["k"]), a=float(d["a"]))


@dataclass(frozen=True)
class ScalingLaws:
    """Compute-optimal hyperparameters and allocation as power laws of the compute budget C."""

    batch: PowerLaw        # B_opt(C), tokens per step
    lr: PowerLaw           # η_opt(C), peak learning rate
    model: PowerLaw        # M_opt(C), non-embedding FLOPs per token
    data: PowerLaw         # D_opt(C), tokens
    name: str = "custom"

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: getattr(self, k).to_dict() for k in ("batch", "lr", "model", "data")}}

    @classmethod
    def from_dict(cls, d: dict) -> "ScalingLaws":
        return cls(name=d.get("name", "custom"),
                   **{k: PowerLaw.from_dict(d[k]) for k in ("batch", "lr", "model", "data")})


DEEPSEEK_LLM = ScalingLaws(
    batch=PowerLaw(0.2920, 0.3271),    # DeepSeek LLM §3.1: B_opt = 0.2920·C^0.3271
    lr=PowerLaw(0.3118, -0.1250),      # DeepSeek LLM §3.1: η_opt = 0.3118·C^-0.1250
    model=PowerLaw(0.1715, 0.5243),    # DeepSeek LLM §3.2: M_opt = 0.1715·C^0.5243
    data=PowerLaw(5.8316, 0.4757),     # DeepSeek LLM §3.2: D_opt = 5.8316·C^0.4757
    name="deepseek-llm")


def model_scale(n_layers: int, dim: int, seq_len: int) -> int:
    """M, the non-embedding FLOPs per token of a dense decoder (attention included, vocabulary not)."""
    return 72 * n_layers * dim * dim + 12 * n_layers * dim * seq_len  # DeepSeek LLM §3.2, M


def compute_budget(m: float, tokens: float) -> float:
    return m * tokens  # DeepSeek LLM §3.2: C = M·D


# -- budgets ---------------------------------------------------------------------------------------
_BUDGET_HELP = ("write budgets in FLOPs as comma-separated numbers (--budgets 1e11,3e11,1e12) or as "
                "a log-spaced range START:STOP:N (--budgets 1e11:1e12:3)")


def _number(text: str, what: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise SweepError(f"budget {text!r} in {what!r} is not a number; {_BUDGET_HELP}") from None
    if not math.isfinite(x) or x <= 0:
        raise SweepError(f"budget {text!r} in {what!r} must be a positive finite number of FLOPs; {_BUDGET_HELP}")
    return x


def parse_budgets(text: str | Sequence) -> list[float]:
    """'1e11,3e11,1e12' or '1e11:1e12:3' (log-spaced) or a list of numbers -> sorted unique budgets."""
    if not isinstance(text, str):
        items = [str(x) for x in text]
        out = [_number(x, ",".join(items)) for x in items]
    elif ":" in text:
        parts = text.split(":")
        if len(parts) != 3 or not parts[2].strip().isdigit() or int(parts[2]) < 1:
            raise SweepError(f"budget range {text!r} must be START:STOP:N with N a positive integer; {_BUDGET_HELP}")
        lo, hi, n = _number(parts[0].strip(), text), _number(parts[1].strip(), text), int(parts[2])
        if hi < lo:
            raise SweepError(f"budget range {text!r}: STOP must be >= START; {_BUDGET_HELP}")
        out = list(np.geomspace(lo, hi, n)) if n > 1 else [lo]
        out = [float(f"{x:.4g}") for x in out]
    else:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise SweepError(f"no budgets in {text!r}; {_BUDGET_HELP}")
        out = [_number(x, text) for x in items]
    if len(set(out)) != len(out):
        raise SweepError(f"budgets {text!r} repeat a value; give each budget once")
    return sorted(out)


def budget_label(c: float) -> str:
    """1e11 -> '1e11', 3e11 -> '3e11', 1.5e12 -> '1.5e12' (file-name friendly)."""
    mant, exp = f"{c:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"

