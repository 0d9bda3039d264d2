"""The parallel runtime: the device mesh and process groups, collective autograd functions with
byte accounting, column/row/vocab-parallel layers, sequence parallelism, expert-parallel token
dispatch, data parallelism (FSDP2), and the layouts that relate each local shard to its global
tensor. It turns a plain network into a parallel one from outside, reading the plans that model
classes declare (`tp_plan`, `tp_divide`, `ep_count`/`ep_params`, `fsdp_unit`), and knows
nothing about DeepSeek beyond "a layer". Pipeline stages and schedules: `pipeline.py`; one
interface for a rank's part of the model at pp = 1 and pp > 1: `engine.py`. Every hook a model declares
for the runtime, and who reads it: `protocols.py`. This module only hands names on.

    mesh = build_mesh(ParallelConfig(tp=2, ep=2, sp=True))
    net = parallelize(build_model(cfg, device="meta"), mesh)
    init_parallel_weights(net, mesh, seed=0)        # equals build_model(cfg, seed=0), sharded
    loss = net.loss(tokens, labels)["loss"]; loss.backward()
    finish_grad_sync(net, mesh); clip_grad_norm_(net, 1.0, mesh); opt.step()
    update_expert_bias(net, mesh)
"""
from __future__ import annotations

from .apply import parallelize, sequence_multiple, update_expert_bias
from .comm import STATS, Group, all_sum
from .data_parallel import clip_grad_norm_, finish_grad_sync, set_gradient_sync, sync_expert_load
from .engine import SingleStage, build_engine, parallel_engine
from .fp8 import Fp8Recipe, apply_fp8
from .mesh import LayoutError, Mesh, ParallelConfig, ParallelDims, build_mesh
from .pipeline import Pipeline, attach_schedule, build_pipeline
from .recompute import apply_recompute
from .state import full_state, full_tensor, init_parallel_weights, load_full_state_dict, materialize

__all__ = ["STATS", "Group", "LayoutError", "Mesh", "ParallelConfig", "ParallelDims", "build_mesh",
           "parallelize", "init_parallel_weights", "load_full_state_dict", "materialize", "full_state",
           "full_tensor", "finish_grad_sync", "clip_grad_norm_", "set_gradient_sync", "sync_expert_load",
           "update_expert_bias", "Fp8Recipe", "apply_fp8", "Pipeline", "build_pipeline", "attach_schedule",
           "apply_recompute", "SingleStage", "build_engine", "parallel_engine", "all_sum", "sequence_multiple"]
