"""Learning-rate schedules and the piecewise-constant schedules of the MTP weight and the
expert-bias step.

Every schedule is a pure function of the optimizer step (for the warmup, counted in steps as
in the papers) and of `progress`, the fraction of the run's training tokens consumed before
this step (for everything after the warmup, counted in tokens as in the papers, which is what
keeps the decay points in place under a batch-size ramp). The trainer computes both.

    lr = peak * warmup(step) * shape(progress)

warmup(step) = min(1, (step + 1) / warmup_steps) rises linearly so that step 0 trains at
peak / warmup_steps and step warmup_steps - 1 at the full value (a step at lr 0 would be
wasted). shape(progress) is 1 wherever the papers' schedules warm up, so there the product is
exactly their linear 0 -> peak ramp; for "cosine", whose decay starts at progress 0, the
product is a smooth ramp into the cosine.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "wsd", "multistep", "v3")

# V3 §4.2: 14.8T tokens; constant to 10T, cosine over 4.3T to 14.3T, 2.2e-5 for 333B, then
# 7.3e-6 for the final 167B. Milestones are fractions of the run's tokens.
_V3_TOKENS = 14.8e12
V3_MILESTONES = [10e12 / _V3_TOKENS, 14.3e12 / _V3_TOKENS, 14.633e12 / _V3_TOKENS]
V3_FACTORS = [2.2e-5 / 2.2e-4, 2.2e-5 / 2.2e-4, 7.3e-6 / 2.2e-4]  # cosine end, constant, final

# Defaults when train.lr_milestones / train.lr_factors are empty. Factors are relative to the
# peak, not cumulative.
DEFAULT_MILESTONES = {
    "constant": [], "cosine": [],
    "wsd": [0.8],  # stable for 80% of the tokens, then linear decay (MiniCPM's WSD)
    "multistep": [0.8, 0.9],  # DeepSeek LLM §2.3 (V2 §3.1.2 uses [0.6, 0.9])
    "v3": V3_MILESTONES,
}
DEFAULT_FACTORS = {
    "constant": [], "cosine": [], "wsd": [],
    "multistep": [0.316, 0.1],  # DeepSeek LLM §2.3: x0.316 after 80%, x0.1 after 90% (V2: [0.316, 0.316**2])
    "v3": V3_FACTORS,
}
_COUNTS = {"constant": (0, 0), "cosine": (0, 0), "wsd": (1, 0), "v3": (3, 3)}  # multistep: n and n

# V3 §4.2: the MTP loss weight is 0.3 for the first 10T tokens, then 0.1.
V3_MTP_LAMBDA = [[0.0, 0.3], [10 / 14.8, 0.1]]
# V3 §4.2: the bias update speed gamma is 0.001 for the first 14.3T tokens, 0.0 for the last 500B.
V3_BIAS_GAMMA = [[0.0, 0.001], [14.3 / 14.8, 0.0]]


def _cosine(x: float, end: float) -> float:
    """1 at x = 0 down to `end` at x = 1, along half a cosine."""
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(x, 0.0), 1.0)))


def _resolve(schedule: str, milestones, factors) -> tuple[list[float], list[float]]:
    return (list(milestones) if milestones else DEFAULT_MILESTONES[schedule],
            list(factors) if factors else DEFAULT_FACTORS[schedule])


def shape(progress: float, schedule: str, min_ratio: float = 0.1,
          milestones: list[float] | None = None, factors: list[float] | None = None) -> float:
    """The schedule's multiplier of the peak lr at `progress` (no warmup)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule = {schedule!r} is not one of {', '.join(SCHEDULES)}")
    m, f = _resolve(schedule, milestones, factors)
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return _cosine(p, min_ratio)
    if schedule == "wsd":  # warmup-stable-decay: constant, then linear to min_ratio at the end
        if p < m[0]:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * (p - m[0]) / (1.0 - m[0])
    if schedule == "multistep":  # DeepSeek LLM §2.3: the factor of the last milestone passed
        out = 1.0
        for at, factor in zip(m, f):
            if p >= at:
                out = factor
        return out
    # v3, V3 §4.2: constant, cosine to f[0] between m[0] and m[1], constant f[1], then f[2]
    if p < m[0]:
        return 1.0
    if p < m[1]:
        return _cosine((p - m[0]) / (m[1] - m[0]), f[0])
    return f[1] if p < m[2] else f[2]


def lr_at(step: int, progress: float, *, peak: float, schedule: str, warmup_steps: int,
          min_ratio: float, milestones: list[float], factors: list[float]) -> float:
    """The lr for optimizer step `step` (0-based), `progress` = fraction of the run's tokens
    consumed before it. Empty milestones/factors take the schedule's defaults."""
    warm = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return peak * warm * shape(progress, schedule, min_ratio, milestones, factors)


def check_lr_schedule(schedule: str, warmup_steps: int, steps: int, min_ratio: float,
                      milestones: list[float], factors: list[float]) -> None:
    """Raise ValueError naming the config key and the fix for an unusable lr schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule = {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"train.warmup_steps = {warmup_steps!r} must be an integer >= 0")
    if warmup_steps > steps:
        raise ValueError(f"train.warmup_steps = {warmup_steps} exceeds train.steps = {steps}; "
                         f"lower train.warmup_steps")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio = {min_ratio!r} must lie in [0, 1] "
                         f"(the final lr as a fraction of train.lr)")
    milestones, factors = list(milestones or []), list(factors or [])
    if schedule in _COUNTS:
        n_m, n_f = _COUNTS[schedule]
        if milestones and len(milestones) != n_m:
            raise ValueError(f"train.lr_milestones = {milestones}: lr_schedule {schedule!r} takes "
                             f"{n_m} milestone(s) (or [] for the default {DEFAULT_MILESTONES[schedule]})")
        if factors and len(factors) != n_f:
            raise ValueError(f"train.lr_factors = {factors}: lr_schedule {schedule!r} takes "
                             f"{n_f} factor(s) (or [] for the default {DEFAULT_FACTORS[schedule]})")
    elif schedule == "multistep" and (milestones or factors):
        m, f = _resolve(schedule, milestones, factors)
        if len(m) != len(f):
            raise ValueError(f"train.lr_milestones = {m} and train.lr_factors = {f}: lr_schedule "
                             f"'multistep' needs one factor per milestone")
    m, f = _resolve(schedule, milestones, factors)
    if any(not 0.0 < x < 1.0 for x in m) or any(b <= a for a, b in zip(m, m[1:])):
        raise ValueError(f"train.lr_milestones = {m} must be increasing fractions of the run's "
                         f"tokens, each in (0, 1)")
    if any(not (math.isfinite(x) and 0.0 <= x) for x in f):
        raise ValueError(f"train.lr_factors = {f} must be finite and >= 0 (multipliers of train.lr)")


def check_piecewise(points: list[list[float]], key: str = "schedule") -> None:
    """Raise ValueError (naming `key`) unless points is [[0, v0], [p1, v1], ...], p increasing."""
    ok = (isinstance(points, (list, tuple)) and len(points) > 0
          and all(isinstance(pt, (list, tuple)) and len(pt) == 2 for pt in points))
    if not ok:
        raise ValueError(f"{key} = {points!r} must be a non-empty list of [progress_from, value] pairs, "
                         f"e.g. [[0.0, 0.3], [0.676, 0.1]]")
    froms = [float(pt[0]) for pt in points]
    if froms[0] != 0.0:
        raise ValueError(f"{key} = {points!r}: the first point must start at progress 0.0")
    if any(b <= a for a, b in zip(froms, froms[1:])) or froms[-1] > 1.0:
        raise ValueError(f"{key} = {points!r}: progress_from values must increase and lie in [0, 1]")
    if any(not math.isfinite(float(pt[1])) for pt in points):
        raise ValueError(f"{key} = {points!r}: values must be finite numbers")


def piecewise(progress: float, points: list[list[float]]) -> float:
    """Piecewise-constant schedule: the value of the last point whose progress_from <= progress.
    Used for the MTP lambda (V3_MTP_LAMBDA) and the bias-update gamma (V3_BIAS_GAMMA)."""
    check_piecewise(points)
    value = float(points[0][1])
    for at, v in points:
        if progress >= at:
            value = float(v)
    return value
