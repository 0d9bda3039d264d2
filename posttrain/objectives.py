"""The post-training objectives as functions of per-token log-probs: GRPO (DeepSeekMath §4.1,
R1 §2.2.1), its common variants, and DPO. Everything here is local arithmetic on [rows, seq]
tensors; the trainers decide what the normaliser is across micro-batches and data-parallel ranks.

Per-token tensors are aligned with `targets`: position t holds log pi(o_t | q, o_<t), and `mask`
is 1 on completion tokens that count in the loss, 0 on prompt tokens and padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "constant")


def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantages [groups, G]: A_i = (r_i - mean(r)) / std(r) over each group of G samples of
    one prompt (DeepSeekMath §4.1.2); std_normalize=False leaves out the division (Dr. GRPO, Liu et al.
    2025: it weights prompts by how uncertain their rewards are). std is the unbiased sample std."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2 samples per prompt, got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """The k3 estimator of KL(pi_theta || pi_ref) per token (DeepSeekMath eq. 4, Schulman 2020):
    pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, >= 0 and unbiased. The log-ratio is clamped to
    [-clamp, clamp]: exp of a large log-ratio (a token the reference finds far likelier) overflows
    and NaNs the whole batch, the failure verl and OpenRLHF users report most."""
    log_ratio = (ref_logp - logp).clamp(-clamp, clamp)
    return log_ratio.exp() - log_ratio - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, norm: float | torch.Tensor) -> torch.Tensor:
    """Sum of the per-token terms over the rows, normalised the `how` way; `norm` is the normaliser of
    the whole (global) batch, computed by the caller so micro-batches and ranks add up:
      token_mean  sum over all tokens / total tokens (DAPO: every token counts the same)
      seq_mean    sum_i (1/|o_i|) sum_t / number of sequences (GRPO as written)
      constant    sum over all tokens / (sequences x max new tokens) (Dr. GRPO: no length bias)
    norm: total tokens (token_mean) or sequences (seq_mean) or sequences x max_new_tokens (constant)."""
    if how not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation {how!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    per_token = per_token * mask
    if how == "seq_mean":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm
    return per_token.sum() / norm


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float,
                         clamp: float = 20.0) -> torch.Tensor:
    """Token-level truncated importance sampling (TIS: Yao et al. 2025; verl's rollout correction,
    slime's --use-tis). The rollout engine samples from pi_rollout while the surrogate is written for
    the trainer's pi_old; numerics (kernels, precision, batch composition) make them differ, so each
    token's term is weighted by w_t = min(pi_old / pi_rollout, cap), a constant (no gradient)."""
    return (old_logp - rollout_logp).clamp(-clamp, clamp).exp().clamp(max=cap).detach()


def offpolicy_sequence_keep(rollout_logp: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor,
                            mask: torch.Tensor, delta: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence masking: a sequence with a negative advantage whose mean
    per-token log(pi_rollout / pi_theta) (the k1 estimate of KL(pi_rollout || pi_theta)) exceeds delta
    is left out of the loss; positive ones stay (learning from a good sample the policy has drifted away
    from is what RL wants). Returns the keep mask [rows] (1.0 keep, 0.0 masked)."""
    kl = ((rollout_logp - logp.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return (~((advantages < 0) & (kl > delta))).to(logp.dtype)


def grpo_token_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
                     eps_low: float = 0.2, eps_high: float = 0.2, ref_logp: torch.Tensor | None = None,
                     beta: float = 0.0, kl_clamp: float = 10.0, ratio_clamp: float = 20.0,
                     is_weight: torch.Tensor | None = None):
    """Per-token GRPO loss (to minimise) and its parts.

    -[min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) - beta * D_KL] with r = pi_theta / pi_old
    (DeepSeekMath eq. 3; separate epsilons are DAPO's clip-higher). `advantages` [rows] is broadcast
    over the row's tokens (outcome supervision). The log-ratio is clamped before exp for the same
    reason as k3's: a stale or mismatched old log-prob must not produce inf * 0 = NaN. `is_weight`
    [rows, seq] (truncated_is_weights) scales the surrogate, not the KL term (which is to the reference).
    Returns (loss [rows, seq], clipped [rows, seq] bool, kl [rows, seq] or None)."""
    log_ratio = (logp - old_logp).clamp(-ratio_clamp, ratio_clamp)
    ratio = log_ratio.exp()
    a = advantages[:, None]
    unclipped = ratio * a
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(unclipped, clipped_ratio * a)
    clipped = (surrogate != unclipped).detach()
    loss = -surrogate if is_weight is None else -surrogate * is_weight
    kl = None
    if ref_logp is not None and beta:
        kl = k3_kl(logp, ref_logp, kl_clamp)
        loss = loss + beta * kl
    return loss, clipped, kl


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7; DeepSeek LLM §5.2 aligns with it) on summed sequence
    log-probs [pairs]: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). label_smoothing > 0
    is the conservative variant (cDPO). Returns (loss per pair, reward margin per pair)."""
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    logits = beta * margin
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, beta * margin.detach()
