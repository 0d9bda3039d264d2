"""Building blocks shared by every architecture: RMSNorm, rotary embedding with YaRN, SwiGLU."""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: where the reference implementations compute in fp32 (norms, routing,
    rotary products, the loss); fp64 stays fp64 so that a float64 model is float64 throughout."""
    return x if x.dtype == torch.float64 else x.float()


class FP32Buffers:
    """Mixin: the buffers named in `fp32_buffers` stay fp32 when the module is cast (`.to(bf16)`):
    routing biases moved by 1e-3 steps, load counters and rotary frequencies lose too much in bf16."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        keep = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self


# NVIDIA apex is not on the package index: use its fused RMSNorm kernel on CUDA when it is present.
HAVE_APEX = importlib.util.find_spec("apex") is not None
_apex_rms_norm = None
if HAVE_APEX:
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
    except ImportError:  # apex built without its CUDA extensions
        HAVE_APEX = False


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as the reference implementations do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _apex_rms_norm is not None and x.is_cuda:
            return _apex_rms_norm(x, self.weight, self.weight.shape, self.eps)
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # inference in fp32: the same products in one call (a decode step's cost is mostly per-op overhead)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # fp32 normalisation, then the weight in the input dtype: transformers' DeepseekV3RMSNorm
        return self.weight * F.rms_norm(at_least_fp32(x), (x.shape[-1],), eps=self.eps).to(x.dtype)


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies; YaRN-corrected when rope_factor > 1 (V2 §3.1.4, V3 §4.3)."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_factor <= 1:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # low dimensions (fast rotations) keep their frequency, high ones are interpolated by 1/factor
    return inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(FP32Buffers, nn.Module):
    """cos/sin tables for given positions.

    YaRN also scales cos/sin by mscale(s, mscale) / mscale(s, mscale_all_dim) and the softmax by
    mscale(s, mscale_all_dim)^2 (see `softmax_scale`); both factors are 1 for the released configs'
    cos/sin, which is why DeepSeek's own inference code applies only the softmax correction.
    """

    fp32_buffers = ("inv_freq",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.interleave = cfg.rope_interleave
        self.register_buffer("inv_freq", yarn_inv_freq(cfg), persistent=False)
        self.attention_factor = 1.0
        if cfg.rope_factor > 1:
            if cfg.mscale and cfg.mscale_all_dim:
                self.attention_factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(
                    cfg.rope_factor, cfg.mscale_all_dim)
            else:
                self.attention_factor = yarn_mscale(cfg.rope_factor)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after `to_empty`."""
        self.inv_freq = yarn_inv_freq(self.cfg).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """freqs_cis [seq, d/2]: attention_factor * exp(i * position * inv_freq), complex64."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [batch, seq, heads, d] by freqs_cis [seq, d/2] as a complex product in fp32.

    interleave=True rotates pairs (x0, x1), (x2, x3), ... (DeepSeek's MLA checkpoints, as its
    reference `apply_rotary_emb`); otherwise the first half against the second (Llama/Qwen
    checkpoints, `rotate_half`).
    """
    freqs_cis = freqs_cis[None, :, None, :]
    if interleave:
        y = torch.view_as_complex(at_least_fp32(x).unflatten(-1, (-1, 2))) * freqs_cis
        return torch.view_as_real(y).flatten(-2).to(x.dtype)
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    y = torch.complex(x1, x2) * freqs_cis
    return torch.cat([y.real, y.imag], dim=-1).to(x.dtype)


def softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    """1/sqrt(d_qk), times mscale^2 under YaRN (V2 §3.1.4; V3 inference/model.py MLA.__init__)."""
    scale = qk_head_dim ** -0.5
    if cfg.rope_factor > 1 and cfg.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
    return scale


class KeyExchange(nn.Module):
    """Where attention exchanges its keys' per-token tensors: forward(*xs) with xs [b, s, ...] for this
    process's tokens returns them for every key position 0..S-1. In one process the tokens are all of them,
    so it is the identity; context parallelism replaces it from outside (an attention class's `cp_plan`)."""

    def forward(self, *xs: torch.Tensor):
        return xs[0] if len(xs) == 1 else xs


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    # tp_plan styles: parallel/protocols.py
    tp_plan = {"": "region_input", "w1": "colwise", "w3": "colwise", "w2": "rowwise"}

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
