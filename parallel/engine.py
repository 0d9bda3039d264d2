"""One interface for a rank's part of the model, whatever pp is: `SingleStage` (pp = 1: gradient
accumulation over micro-batches) and `pipeline.Pipeline` (pp > 1: a schedule over stages) both offer

    engine.stages                          this rank's models (one at pp = 1)
    engine.init_weights(seed, device)      the seeded init, sharded (= build_model(cfg, seed=seed))
    engine.step(tokens, labels)            forward + backward of this dp rank's batch, micro-batch by
                                           micro-batch; gradients and the expert load end synchronised;
                                           returns the loss terms (mean over micro-batches and dp).
                                           Whole rows on every cp rank: the engine gives the model its
                                           chunks' positions (context_parallel.py)
    engine.evaluate(tokens, labels)        the same terms, forward only, in eval mode
    engine.clip_grad_norm_(max_norm)       the global gradient norm, clipped
    engine.update_expert_bias(gamma)       the aux-loss-free bias step from the load `step` synchronised
    engine.parameters()                    for the optimizer; `sharded_state(engine.stages, ...)` for checkpoints

so that a training loop has no pipeline branches. `build_engine` returns the one the layout needs.
"""
from __future__ import annotations

import torch
from torch import nn

from . import comm
from .apply import parallelize
from .context_parallel import cp_inputs
from .data_parallel import (clip_grad_norm_, finish_grad_sync, prime_unsharded, reshard, set_gradient_sync,
                            sync_expert_load)
from .mesh import Mesh
from .overlap import check_overlap, overlapped_losses
from .pipeline import Pipeline, attach_schedule, build_pipeline
from .recompute import apply_recompute
from .state import init_parallel_weights


# hooks read here (loss, update_expert_bias): parallel/protocols.py
class SingleStage:
    """The whole model on every rank of a pp = 1 layout (tp, ep and FSDP2 dp inside it). A step is
    the mean of `model.loss()` over micro-batches of `micro_batch_size` rows, FSDP2 reducing once,
    after the last; what one process computes with gradient accumulation over the same rows."""

    def __init__(self, model: nn.Module, mesh: Mesh, micro_batch_size: int, overlap: str = "none"):
        check_overlap(overlap, mesh.dims)
        self.stages, self.mesh, self.micro_batch_size = [model], mesh, micro_batch_size
        self.overlap = overlap   # "ep": micro-batch k+1's forward interleaved with k's backward (parallel/overlap.py)

    def parameters(self):
        return self.stages[0].parameters()

    def init_weights(self, seed: int = 0, device=None) -> None:
        init_parallel_weights(self.stages[0], self.mesh, seed, device)
        prime_unsharded(self.stages[0])   # a step may skip units (post-training's forward skips MTP)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, objective=None,
             **inputs: torch.Tensor) -> dict[str, float]:
        """Gradients of the mean micro-batch loss; `inputs` are more per-row tensors of `loss()`
        (e.g. doc_ids), split like the tokens. `objective`: a post-training objective in place of
        `loss()`, objective(model, None, tokens, labels, **inputs) -> {term: scalar} per micro-batch
        (Pipeline.step's contract); the terms of `objective.terms` are returned."""
        if objective is not None:
            out = self._losses(tokens, labels, inputs, backward=True, objective=objective)
        elif self.overlap == "ep":
            out = overlapped_losses(self.stages[0], self.mesh, self.micro_batch_size, tokens, labels, inputs)
        else:
            out = self._losses(tokens, labels, inputs, backward=True)
        sync_expert_load(self.stages[0], self.mesh)  # the step's global load, for the stats and the bias step
        return out

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, labels: torch.Tensor, fn, **inputs: torch.Tensor) -> torch.Tensor:
        """Forward only, in the model's current mode: fn(model, None, tokens, labels, **inputs) per
        micro-batch, concatenated [rows, seq] (fp32); Pipeline.score's contract."""
        net, mbs = self.stages[0], self.micro_batch_size
        try:
            return torch.cat([fn(net, None, tokens[i:i + mbs], labels[i:i + mbs],
                                 **{k: v[i:i + mbs] for k, v in inputs.items()}).float()
                              for i in range(0, tokens.shape[0], mbs)])
        finally:
            reshard(net)

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, labels: torch.Tensor, **inputs: torch.Tensor) -> dict[str, float]:
        """Forward only, in eval mode (no balance losses, no load counting); the same terms as `step`."""
        net = self.stages[0]
        net.eval()
        try:
            return self._losses(tokens, labels, inputs, backward=False)
        finally:
            net.train()
            reshard(net)  # a forward without backward leaves FSDP2's root gathered

    def _losses(self, tokens, labels, inputs: dict, backward: bool, objective=None) -> dict[str, float]:
        net, mbs = self.stages[0], self.micro_batch_size
        n = tokens.shape[0] // mbs
        sums: dict[str, torch.Tensor] = {}
        extra = cp_inputs(self.mesh, tokens.shape[1], net.cfg.is_moe, tokens.device)
        for i in range(n):
            rows = slice(i * mbs, (i + 1) * mbs)
            more = {k: v[rows] for k, v in inputs.items()}
            if objective is None:
                out = net.loss(tokens=tokens[rows], labels=labels[rows], **more, **extra)
            else:
                out = objective(net, None, tokens[rows], labels[rows], **more, **extra)
            if backward:
                set_gradient_sync(net, i == n - 1)
                (out["loss"] / n).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double() / n  # fp64: what all_sum reduces in
        if backward:
            finish_grad_sync(net, self.mesh)
        keys = sorted(sums) if objective is None else objective.terms
        total = comm.all_sum({k: sums[k] for k in keys}, self.mesh["dp"], self.mesh.device_type)
        return {k: v / self.mesh.dims.dp for k, v in total.items()}

    def clip_grad_norm_(self, max_norm: float, apart: str = "") -> torch.Tensor:
        return clip_grad_norm_(self.stages[0], max_norm, self.mesh, apart)

    @torch.no_grad()
    def update_expert_bias(self, gamma: float | None = None) -> None:
        self.stages[0].update_expert_bias(gamma)


def parallel_engine(model: nn.Module, mesh: Mesh, *, micro_batch_size: int, seq_len: int,
                    param_dtype: torch.dtype | None = None, fp8=None, recompute: str = "none", schedule: str = "1f1b",
                    n_microbatches: int = 1, vpp: int = 2, layer_split: list[list[int]] | None = None,
                    overlap: str = "none") -> SingleStage | Pipeline:
    """This rank's engine for `model` under the mesh's layout, parallelised (recompute, tp, ep, FP8, FSDP2,
    the pipeline cut) but not initialised: on a meta-device model nothing is allocated. `build_engine`
    runs it first; `launch.check` stops here, so what it reports is what a run builds."""
    if mesh.dims.pp == 1:
        if recompute != "none":
            apply_recompute(model, recompute)
        return SingleStage(parallelize(model, mesh, param_dtype=param_dtype, fp8=fp8), mesh, micro_batch_size,
                           overlap)
    return build_pipeline(model, mesh, schedule, n_microbatches, vpp=vpp, layer_split=layer_split, seq_len=seq_len,
                          recompute=recompute, param_dtype=param_dtype, fp8=fp8, overlap=overlap)


def build_engine(model: nn.Module, mesh: Mesh, *, micro_batch_size: int, seq_len: int, seed: int = 0, device=None,
                 param_dtype: torch.dtype | None = None, fp8=None, recompute: str = "none", schedule: str = "1f1b",
                 n_microbatches: int = 1, vpp: int = 2, layer_split: list[list[int]] | None = None,
                 overlap: str = "none") -> SingleStage | Pipeline:
    """This rank's engine for `model` (best on the meta device) under the mesh's layout, parallelised
    (`parallel_engine`) and initialised from `seed`: a `SingleStage` at pp = 1, else a `Pipeline` under
    `schedule` (n_microbatches is its first count; `step` rebuilds the schedule when a batch brings another)."""
    engine = parallel_engine(model, mesh, micro_batch_size=micro_batch_size, seq_len=seq_len, param_dtype=param_dtype,
                             fp8=fp8, recompute=recompute, schedule=schedule, n_microbatches=n_microbatches, vpp=vpp,
                             layer_split=layer_split, overlap=overlap)
    engine.init_weights(seed, device)
    if mesh.dims.pp == 1:
        return engine
    return attach_schedule(engine, micro_batch_size, seq_len, dtype=param_dtype, device=device)
