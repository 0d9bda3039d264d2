"""What one rank holds between steps: its parameters, their gradients and AdamW's state, in elements and
bytes, under the runtime's own placement rules. One function turns element counts into bytes
(`state_bytes`); the planner's memory terms use it, and so does `launch.check`, which counts the
elements of a layout it really builds (on the meta device, on a fake process group). The planner
counts them here from the rules instead (`rank_state`), so a test comparing the two catches any drift
between what the planner assumes and what the runtime builds.

The runtime's rules, as parallel/ applies them (tp = 1; the tp plan is the model's and not read here):
- pipeline: the stages of `schedule` (pp_schedules.rank_stages), layers cut by `layer_split` or by
  `split_layers(model.stage_costs(seq_len))`; the first stage holds the embedding, the last the final
  norm, the head and the MTP modules, plus a copy of the embedding when MTP (or a tied head) needs it
  there (pipeline.cut_stage);
- experts: each `ep_params` tensor [E, ...] split over ep in torch.chunk's rule (expert_parallel.apply_ep),
  then sharded by FSDP2 over edp along dim 0 when that divides, else dim 1 (data_parallel.apply_fsdp);
- everything else sharded by FSDP2 over dp along dim 0 (torch.chunk's rule: ceil-sized chunks, the
  last ones shorter or empty); under context parallelism over dp x cp (mesh.py's `dp_cp` group, shard
  dp_i x cp + cp_i), since cp ranks are data-parallel for everything but attention;
- parameters and their gradients are fp32 (FSDP2 keeps the fp32 shard as the master weight and reduces
  gradients in fp32); AdamW keeps two moments per element in `moment_dtype`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.mesh import ParallelDims
from parallel.pipeline import split_layers
from parallel.pp_schedules import n_stages, rank_stages
from parallel.tensor_parallel import chunk_range

PARAM_BYTES = 4      # fp32 parameters (the master weights) on every rank
GRAD_BYTES = 4       # fp32 gradients (FSDP2's reduce dtype)
MOMENT_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class RankState:
    """Elements and bytes one rank holds between steps; `shared` counts the elements of parameters it
    holds as a copy of another stage's (the embedding beside MTP), included in `params`."""

    params: int
    shared: int
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def state_bytes(params: int, moment_dtype: str = "fp32", *, param_bytes: float = PARAM_BYTES,
                grad_bytes: float = GRAD_BYTES) -> dict[str, float]:
    """Bytes of `params` parameter elements: weights, gradients and AdamW's two moments."""
    if moment_dtype not in MOMENT_BYTES:
        raise ValueError(f"moment dtype {moment_dtype!r}: use one of {', '.join(MOMENT_BYTES)}")
    return {"weights": params * param_bytes, "grads": params * grad_bytes,
            "optimizer": params * 2 * MOMENT_BYTES[moment_dtype]}


def rank_state_of(params: int, shared: int, moment_dtype: str) -> RankState:
    b = state_bytes(params, moment_dtype)
    return RankState(params, shared, int(b["weights"]), int(b["grads"]), int(b["optimizer"]))


def shard_numel(shape: tuple[int, ...], dim: int, parts: int, index: int) -> int:
    """Elements of chunk `index` of `parts` along `dim` (torch.chunk's rule, as DTensor's Shard)."""
    if not shape:
        return 1 if index == 0 else 0
    a, b = chunk_range(shape[dim], parts, index)
    return (b - a) * math.prod(shape[:dim] + shape[dim + 1:])


# model hooks read here (layers, embed, norm, head, mtp, stage_costs, ep_count, ep_params): parallel/protocols.py
def _stage_params(model, layers: list[int], first: bool, last: bool,
                  keep_embed: bool) -> list[tuple[str, object, bool]]:
    """(name, parameter, is a copy) of one stage, as pipeline.cut_stage keeps them."""
    out = []
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if top == "layers":
            keep, copy = int(name.split(".")[1]) in layers, False
        elif top == "embed":
            keep, copy = first or (last and keep_embed), not first
        else:                   # the final norm, the head, the MTP modules
            keep, copy = last, False
        if keep:
            out.append((name, p, copy))
    return out


def _expert_tensors(model) -> tuple[set[str], set[str]]:
    """(the parameters ep splits, every parameter inside an experts module), by name."""
    split, inside = set(), set()
    for path, m in model.named_modules():
        if getattr(type(m), "ep_count", None):
            for n, _ in m.named_parameters():
                inside.add(f"{path}.{n}")
            for n in type(m).ep_params:
                split.add(f"{path}.{n}")
    return split, inside


def rank_state(model, dims: ParallelDims, rank: int, *, schedule: str = "1f1b", vpp: int = 2,
               layer_split: list[list[int]] | None = None, seq_len: int = 4096, moment_dtype: str = "fp32",
               fsdp: bool = True) -> RankState:
    """What `rank` holds when `model` (on the meta device) is trained under `dims`: the planner's count,
    from the runtime's rules (module docstring). fsdp: whether FSDP2 is applied (a run applies it when
    dp > 1 or training in bf16)."""
    if dims.tp != 1:
        raise ValueError(f"rank_state counts tp = 1 layouts (the tp split is the model's plan); got tp = {dims.tp}")
    c = dims.coords(rank)
    if dims.pp == 1:
        held = _stage_params(model, list(range(len(model.layers))), True, True, False)
    else:
        total = n_stages(schedule, dims.pp, vpp)
        split = layer_split or split_layers(model.stage_costs(seq_len), total)
        keep_embed = len(getattr(model, "mtp", ())) > 0 or model.head.weight is model.embed.weight
        held = []
        for sid in rank_stages(schedule, dims.pp, c["pp"], vpp):
            held += _stage_params(model, split[sid], sid == 0, sid == total - 1, keep_embed)
    ep_split, in_experts = _expert_tensors(model)
    params = shared = 0
    for name, p, copy in held:
        shape = tuple(p.shape)
        if name in ep_split:           # this rank's experts, then its FSDP2 shard over edp
            a, b = chunk_range(shape[0], dims.ep, c["ep"])
            shape = (b - a, *shape[1:])
        if not fsdp:
            n = math.prod(shape)
        elif name in in_experts:
            dim = 0 if shape and shape[0] % dims.edp == 0 else 1
            n = shard_numel(shape, dim, dims.edp, c["edp"])
        else:   # over dp x cp (context parallelism's ranks shard the dense parameters too)
            cp = getattr(dims, "cp", 1)
            n = shard_numel(shape, 0, dims.dp * cp, c["dp"] * cp + c.get("cp", 0))
        params += n
        shared += n if copy else 0
    return rank_state_of(params, shared, moment_dtype)
