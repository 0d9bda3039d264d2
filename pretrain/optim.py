"""AdamW on local shards, with optional BF16 moments, and an EMA of the parameters in CPU memory.

fp32 master weights: the trainer keeps the parameters themselves in fp32 under train.dtype=bf16
(FSDP2's MixedPrecisionPolicy casts them to bf16 for compute and reduces gradients in fp32), so
the parameters ARE the master weights and the optimizer updates them in place. V3 §3.3.3 keeps
master weights and gradients in FP32 and the AdamW moments in BF16 (moment_dtype=torch.bfloat16).

Parameters may be FSDP2/TP DTensors or plain tensors. The runtime has already reduced and clipped
the gradients (parallel.finish_grad_sync, parallel.clip_grad_norm_), and AdamW is elementwise, so
the optimizer works on each parameter's local shard and issues no collectives.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Megatron's convention: no weight decay on 1-D parameters (RMSNorm scales, biases), decay on
    every matrix (linears, experts, embedding, output head). Frozen parameters are left out.
    Groups carry "param_names", which torch's Optimizer keeps in its state_dict."""
    decay, no_decay = ([], []), ([], [])
    for name, p in named_params:
        if not p.requires_grad:
            continue
        names, params = no_decay if p.ndim <= 1 else decay  # DTensor.ndim is the global rank
        names.append(name)
        params.append(p)
    groups = [{"params": ps, "param_names": ns, "weight_decay": wd}
              for (ns, ps), wd in ((decay, weight_decay), (no_decay, 0.0))]
    return [g for g in groups if g["params"]]


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) on local shards.

    The state of a parameter is exactly {"exp_avg", "exp_avg_sq"}, tensors of its local shape in
    `moment_dtype`; the step count is one int, `self.step_count`, shared by all parameters (the
    checkpoint reads opt.state[p] and opt.step_count directly). Unlike torch's per-parameter step,
    a parameter skipped for a missing gradient still sees the shared count in its bias correction.
    The math runs in the parameter's dtype (fp32 master weights); bf16 moments are widened for the
    update and rounded to nearest on store. The lr is set per step in param_group["lr"].
    """

    _CHUNK = 1 << 26  # elements per foreach call with narrow moments: bounds the fp32 temporaries

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, moment_dtype: torch.dtype = torch.float32):
        if not lr >= 0.0:
            raise ValueError(f"AdamW lr = {lr!r} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW betas = {betas!r} must lie in [0, 1)")
        if not eps > 0.0:
            raise ValueError(f"AdamW eps = {eps!r} must be > 0")
        if not moment_dtype.is_floating_point:
            raise ValueError(f"AdamW moment_dtype = {moment_dtype} must be a floating dtype")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype
        self.step_count = 0

    def _init_param(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            local = _local(p)
            state["exp_avg"] = torch.zeros_like(local, dtype=self.moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        return state

    def init_state(self) -> None:
        """Zero moments for every parameter, so that a checkpoint can be loaded before step 1."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_param(p)
                local = _local(p)
                params.append(local)
                grads.append(_local(p.grad).to(local.dtype))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            if params:
                self._update(params, grads, exp_avgs, exp_avg_sqs, group)
        return loss

    def _update(self, params, grads, exp_avgs, exp_avg_sqs, group) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if all(m.dtype == p.dtype for m, p in zip(exp_avgs, params)):  # moments stored at full precision
            _adamw(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, wd, self.step_count)
            return
        # V3 §3.3.3: BF16 moments; widen a chunk, update at full precision, round back on store.
        for chunk in _chunks([p.numel() for p in params], self._CHUNK):
            p = [params[i] for i in chunk]
            m = [exp_avgs[i].to(params[i].dtype) for i in chunk]
            v = [exp_avg_sqs[i].to(params[i].dtype) for i in chunk]
            _adamw(p, [grads[i] for i in chunk], m, v, lr, beta1, beta2, eps, wd, self.step_count)
            torch._foreach_copy_([exp_avgs[i] for i in chunk], m)
            torch._foreach_copy_([exp_avg_sqs[i] for i in chunk], v)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, plus the shared step count; torch casts floating state to the parameter's
        dtype, so the moments are cast back to moment_dtype."""
        state_dict = dict(state_dict)
        self.step_count = int(state_dict.pop("step_count", 0))
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k] = state[k].to(self.moment_dtype)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step_count": self.step_count}


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group holds at most `limit` elements (or one tensor)."""
    out, total = [[]], 0
    for i, n in enumerate(sizes):
        if out[-1] and total + n > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def _adamw(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, wd, step) -> None:
    """torch.optim.AdamW's foreach update (non-amsgrad), in place on lists of same-dtype tensors."""
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


class EMA:
    """Exponential moving average of the parameters' local shards, fp32, in CPU memory.

    V3 §3.2.3: "EMA parameters are stored in CPU memory and are updated asynchronously after each
    training step". update() takes a snapshot of the parameters (on CUDA a non-blocking copy into
    pinned CPU buffers plus an event; on CPU a plain copy, since the next optimizer step changes
    the parameters in place) and returns; one worker thread waits for the copy and applies
    ema = decay * ema + (1 - decay) * param. The first update sets ema to the parameters.

    Build it after the weights are materialised. The checkpoint saves state() under each
    parameter's layout and loads by copying into those same tensors; after state() has been
    handed out the EMA counts as initialised, so a loaded EMA is continued, not reset.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay = {decay!r} must lie strictly between 0 and 1 (e.g. 0.999)")
        self.decay = decay
        self.names, self.params = [], []
        for name, p in named_params:
            self.names.append(name)
            self.params.append(p)
        locals_ = [_local(p).detach() for p in self.params]
        if any(t.is_meta for t in locals_):
            raise ValueError("EMA: parameters are on the meta device; build the EMA after the weights "
                             "are materialised (parallel.init_parallel_weights)")
        self.ema = [t.to("cpu", torch.float32, copy=True) for t in locals_]
        self._pinned = any(t.is_cuda for t in locals_)
        self._snap = [torch.empty(t.shape, dtype=torch.float32, pin_memory=self._pinned) for t in locals_]
        self.initialized = False
        self._future: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")

    @torch.no_grad()
    def update(self) -> Future:
        """Snapshot the parameters and fold them into the EMA in the background; returns the
        worker's Future (the trainer needs not keep it: the next update/wait/state waits)."""
        self.wait()  # the snapshot buffers are free once the previous update is done
        for snap, p in zip(self._snap, self.params):
            snap.copy_(_local(p).detach(), non_blocking=self._pinned)
        event = None
        if self._pinned:  # the worker waits on this, not the training stream
            event = torch.cuda.Event()
            event.record()
        self._future = self._pool.submit(self._apply, event)
        return self._future

    def _apply(self, event) -> None:
        if event is not None:
            event.synchronize()  # the device-to-host copies have landed
        with torch.no_grad():
            if not self.initialized:
                torch._foreach_copy_(self.ema, self._snap)
                self.initialized = True
            else:  # ema + (1 - decay) * (param - ema) = decay * ema + (1 - decay) * param
                torch._foreach_lerp_(self.ema, self._snap, 1.0 - self.decay)

    def wait(self) -> None:
        """Block until the pending update is applied (re-raises its error, if any)."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def state(self) -> dict[str, torch.Tensor]:
        """The CPU fp32 EMA of each parameter's local shard, by parameter name (live tensors)."""
        self.wait()
        self.initialized = True  # whoever holds these may load into them
        return dict(zip(self.names, self.ema))

    @torch.no_grad()
    def copy_to(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the EMA into parameters with the same names and local shapes (for evaluation)."""
        self.wait()
        ema = dict(zip(self.names, self.ema))
        for name, p in named_params:
            if name not in ema:
                raise KeyError(f"EMA.copy_to: no EMA for parameter {name!r}")
            _local(p).copy_(ema[name])

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
