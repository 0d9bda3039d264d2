"""The model/runtime contract on one page: every hook the runtime reads from a model, its kind, who
reads it and what it must mean.

`parallel/` turns a plain network into a parallel one from outside and imports no model: it reads
what the model's classes declare (`getattr(type(m), "tp_plan")`, `hasattr(model, ...)`), calls a
few methods, and swaps a few seams. The loops (`pretrain/`, `posttrain/`) and the planner (`plan/`)
read some more. This module writes all of it down, in three forms:

  - `typing.Protocol`s, one per role a class can play (below: `TensorParallelModule`, `Block`,
    `ExpertGroup`, `TokenSplitModule`, `Model`);
  - `HOOKS`, the table: one `Hook` per name, with its kind, role, readers (file:function) and
    contract (shape of the value, invariants), and an example in model/;
  - `check_model(model)`, which checks a built model (the meta device will do) against the table and
    returns its problems, one sentence each (an empty list when it conforms).

Adding a model family starts here: declare the hooks of each role on its classes, then run
`check_model` on it (tests/test_protocols.py does it for every tiny preset). Adding a parallelism
starts here too: a new hook gets a row, or tests/test_protocols.py fails (it parses parallel/, pretrain/,
posttrain/ and plan/ for `getattr(type(x), "name")`, `hasattr(x, "name")` and attribute writes on
models, and checks that each row's readers exist and name it). `python -m parallel.protocols` prints
the table as docs/contract.md has it.

Roles
    module              any nn.Module class; may carry a tensor-parallel plan
    block               the repeated layer: one FSDP2 unit and one activation-recomputation unit
    expert group        a module holding routed experts' weights stacked [n_experts, ...]
    token-split module  a module that, under tp, works on its rank's share of the tokens (model/: MoE)
    model               the top-level network the loops hold; the pipeline cuts it into stages
    stage               a pipeline stage: a copy of the model holding some layers (the runtime makes it)

Kinds
    class attribute     declared on the class and read with getattr(type(m), name): a plan, not state
    method              the runtime or a loop calls it
    seam                a callable attribute with a one-process default that the runtime replaces on the
                        instance (tp, FP8); the model calls it through `self.<name>`, never directly
    attribute           an instance attribute (child module, config, buffer, value a loop sets)
    runtime             written by the runtime onto the model's objects; a model class must not declare it

The hooks (HOOKS has each one's readers and full contract; docs/contract.md prints both):

    hook                  kind             role                meaning in one line
    tp_plan               class attribute  module              child name ("" = itself) -> tp style(s)
    tp_divide             class attribute  module              int attributes divided by tp (head counts)
    cp_plan               class attribute  module              child name -> cp style: where attention exchanges keys
    ep_count              class attribute  expert group        name of the expert-count attribute; marks the group
    ep_params             class attribute  expert group        parameters stacked [n_experts, ...], split on dim 0
    forward               method           expert group        (x, indices, weights, partial) -> sum_k w * FFN(x)
    grouped_gemm          seam             expert group        (x, w, counts) -> per-expert x @ w[e]^T; FP8 swaps it
    fsdp_unit             class attribute  block               True: an FSDP2 unit and a recomputation unit
    recompute_selective   class attribute  block               submodule paths selective recomputation re-runs
    forward               runtime          block               instance forward set by activation recomputation
    _recompute_mode       runtime          block               "none" | "full" | "selective"
    moe_pre               method           block               moe phases: attention + router, up to the dispatch
    moe_shared            method           block               moe phases: the shared experts (no dispatch needed)
    moe_post              method           block               moe phases: residual (+ shared experts), after combine
    reduce_token_stats    seam             token-split module  sums per-token statistics over tp (identity alone)
    _tokens_split         runtime          token-split module  this forward's tokens were split over tp
    tokens_per_expert     attribute        module              buffer [n_experts]: tokens routed since the update
    fsdp_forward_methods  class attribute  model               methods besides forward that FSDP2 must wrap
    cross_entropy         seam             model               token loss; vocab-parallel under tp
    reduce_sequence_stats seam             model               sums per-rank token sums over cp (identity alone)
    entropy               seam             model               entropy per position; vocab-parallel under tp
    restrict_vocab        seam             model               logits outside allowed token sets masked; per tp slice
    gather_logits         seam             model               full-vocabulary logits; an all-gather under tp
    set_expert_placement  method           model               (n_devices, devices_per_node) for limited routing
    trunk_moe_layers      method           model               the decoder stack's MoE modules, in layer order
    replay_routing        method           model               force recorded experts until clear_routing (R3)
    record_routing        method           model               record every forward's chosen experts
    recorded_routing      method           model               the recorded experts, used or the routers' own
    clear_routing         method           model               stop replaying and recording
    update_expert_bias    method           model               aux-loss-free bias step from the summed load
    init_value            method           model               the fp32 global initial value of one parameter
    init_buffers          method           model               rebuild non-persistent buffers after to_empty
    loss                  method           model               (tokens, labels, h=...) -> {"loss", terms}
    hidden                method           model               (tokens, h=...) -> hidden states of the layers held
    _blocks               seam             model               the layer loop of hidden and loss; overlap skips it
    balance_losses        method           model               balance losses of the last forward, by name
    stage_costs           method           model               forward FLOPs/token: (before, [per layer], after)
    new_cache             method           model               per-layer KV caches for incremental decoding
    decode                method           model               (logits, h) at per-sequence positions, paged caches
    draft                 method           model               (logits, h) of the first MTP module (speculation)
    token_logprobs        method           model               log-probs (and entropy) of targets, per position
    layers                attribute        model               ModuleDict of blocks keyed by global index
    embed                 attribute        model               input embedding; None on later stages
    norm                  attribute        model               final norm; None before the last stage
    head                  attribute        model               output linear; None before the last stage
    mtp                   attribute        model               ModuleList run after the head on the last stage
    cfg                   attribute        model               the config (ModelConfig's field names)
    mtp_lambda            attribute        model               weight of the mtp losses; the loop sets it each step
    param_layouts         runtime          model               {name: ParamLayout} of every local parameter
    grad_norm_skip        runtime          stage               names counted by another stage in the norm
    is_first              runtime          stage               the stage holds the embedding input
    is_last               runtime          stage               the stage computes the loss
    stage_metrics         runtime          stage               loss terms recorded per micro-batch
    aux_scale             runtime          stage               weight of a micro-batch's balance losses
    cp_positions          runtime          stage               this cp rank's global positions (None at cp = 1)
    objective             runtime          stage               this step's post-training objective (None: loss)
    objective_terms       runtime          stage               the objective's terms, one dict per micro-batch
    moe_columns           runtime          stage               the stage's MoE layers among the model's (replay)
    route_replay          runtime          stage               a forward given routes forces them
    route_counts          runtime          stage               router-vs-given disagreements, pairs compared
    stage_index           runtime          stage               global index of the stage
    ep_levels             runtime          expert group        the ep group(s) tokens are dispatched over
    ep_total              runtime          expert group        experts in the whole ep group
    fp8_dispatch          runtime          expert group        the recipe whose FP8 tiles the dispatch carries
    fp8_recipe            runtime          module              the FP8 recipe of a converted linear
    _fsdp                 runtime          model               apply_fsdp has wrapped the model
    _overlap_entry        runtime          module              a part of a block run inside its FSDP2 unit (overlap)
    __class__             runtime          module              a runtime mixin put in front of the class

Not in this contract: what pretrain/metrics.py's `expert_state` reads (model.moe's MoE and Gate,
model.transformer's Block, by isinstance: pretrain may know the model), and getattr/hasattr on objects
that are no model (`NOT_HOOKS`).
"""
from __future__ import annotations

import ast
import functools
import inspect
import numbers
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Union

import torch
from torch import nn

# -- the styles of a tp_plan (tensor_parallel.py's docstring has the full meaning of each) --------------
TP_STYLES: dict[str, str] = {
    "colwise": "an nn.Linear split by output features; `colwise:attr` in units of the int attribute attr",
    "rowwise": "an nn.Linear split by input features, its output summed over tp",
    "region_input": "the input of the module (or of the child) enters the tp region",
    "region_output": "the output of the child enters the tp region (small latents, not hidden states)",
    "vocab_embed": "an nn.Embedding split by vocabulary rows",
    "vocab_head": "the output nn.Linear split by vocabulary; the owner's cross_entropy, entropy, "
                  "gather_logits and restrict_vocab seams become the vocab-parallel ones",
    "token_split": "the module itself (key \"\") works on its rank's share of the tokens",
    "partial_grad": "the child's parameters get partial gradients, summed over tp after backward",
}
SELF_STYLES = ("region_input", "token_split")          # the only styles the key "" (the module itself) takes
LINEAR_STYLES = ("colwise", "rowwise", "vocab_head")   # their child is an nn.Linear
VOCAB_SEAMS = ("cross_entropy", "entropy", "gather_logits", "restrict_vocab")
# -- the styles of a cp_plan (context_parallel.py's docstring has the full meaning) ------------------------
CP_STYLES: dict[str, str] = {
    "gather_sequence": "the child, an identity module forward(*xs) -> xs of the keys' per-token tensors [b, s, ...], "
                       "becomes an all-gather over cp returning them for every position 0..S-1 in order",
}
ROLES = ("module", "block", "expert group", "token-split module", "model", "stage")
KINDS = ("class attribute", "method", "seam", "attribute", "runtime")


@dataclass(frozen=True)
class Hook:
    """One row of the contract. `used_by` names "file:function" (or "file:Class.method") of every place
    that reads or writes it; `call` is how the runtime calls a method or seam (args, kwargs), so that
    check_model can bind it against the model's signature."""

    name: str
    kind: str
    role: str
    used_by: tuple[str, ...]
    contract: str
    example: str = ""
    required: bool = False          # a model (or a class of that role) cannot run without it
    call: tuple[tuple, dict] | None = None


_TP = "parallel/tensor_parallel.py"
_EP = "parallel/expert_parallel.py"
_DP = "parallel/data_parallel.py"
_RC = "parallel/recompute.py"
_PP = "parallel/pipeline.py"
_ST = "parallel/state.py"
_FP8 = "parallel/fp8.py"
_PLAN = "plan/planner.py"
_OV = "parallel/overlap.py"

HOOKS: tuple[Hook, ...] = (
    # -- any module: tensor parallelism -----------------------------------------------------------------
    Hook("tp_plan", "class attribute", "module",
         (f"{_TP}:check_tp_plan", f"{_TP}:_replicable", f"{_TP}:apply_tp", f"{_FP8}:apply_fp8"),
         "dict: child name (a direct child; \"\" = the module itself) -> a style or a tuple of styles, from "
         "TP_STYLES. colwise, rowwise and vocab_head take an nn.Linear child (weight [out, in]), vocab_embed an "
         "nn.Embedding; \"\" takes only region_input and token_split, and token_split only \"\". `colwise:attr` "
         "splits in units of the int attribute `attr` (listed in tp_divide); when tp exceeds the units each is "
         "replicated. A child that is None or absent on an instance is skipped (a configuration without it), "
         "but the class must be able to hold it (assign self.<child>). FP8 keeps vocab_embed/vocab_head "
         "children in high precision.",
         "model/layers.py MLP; model/attention.py Attention, MLA; model/moe.py MoE (token_split); "
         "model/transformer.py Transformer (vocab_embed, vocab_head)"),
    Hook("tp_divide", "class attribute", "module", (f"{_TP}:check_tp_plan", f"{_TP}:apply_tp"),
         "tuple of names of int attributes that count tp-split units (heads); after the split each becomes "
         "max(1, n // tp), what the forward then reshapes by. Each must be divisible by tp, or, when it is a "
         "colwise unit, divide tp.",
         "model/attention.py Attention (n_heads, n_kv_heads), MLA (n_heads)"),
    Hook("cp_plan", "class attribute", "module",
         ("parallel/context_parallel.py:check_cp_plan", "parallel/context_parallel.py:apply_cp"),
         "dict: child name -> \"gather_sequence\" (CP_STYLES). The child is a module whose forward(*xs) takes the "
         "keys' per-token tensors [b, s, ...] of this process's tokens and returns them for every key position "
         "0..S-1 (the identity in one process, model/layers.py KeyExchange); attention calls it on its "
         "training path and attends its queries to what comes back. Under cp the runtime replaces the child "
         "with an all-gather over cp (backward: reduce-scatter). A model with cp > 1 must declare at least one.",
         "model/attention.py Attention (k, v heads), MLA (c^KV after kv_norm and the rotated k^R)"),
    # -- expert group: expert parallelism, FSDP over edp, FP8 grouped GEMMs --------------------------------
    Hook("ep_count", "class attribute", "expert group",
         (f"{_EP}:check_ep_plan", f"{_EP}:apply_ep", f"{_TP}:apply_tp", f"{_DP}:apply_fsdp",
          f"{_PLAN}:_expert_params"),
         "the name of the int attribute holding the number of experts; set (truthy) it marks the module as "
         "an expert group: its ep_params are split over ep (the count must divide by ep and becomes the local "
         "count), FSDP2 shards it over edp, tp sums none of its gradients, and the planner counts its "
         "parameters as routed. An expert group holds no other expert group.",
         "model/moe.py Experts (\"n_experts\")", required=True),
    Hook("ep_params", "class attribute", "expert group",
         (f"{_EP}:apply_ep", f"{_FP8}:apply_fp8", f"{_PLAN}:_expert_params"),
         "tuple of names of the group's own nn.Parameters stacked by expert on dim 0 ([n_experts, ...], "
         "shape[0] == the ep_count attribute); each ep rank keeps its contiguous block of experts, under the "
         "same names.",
         "model/moe.py Experts (w1, w2, w3)", required=True),
    Hook("forward", "method", "expert group", (f"{_EP}:ExpertParallel.ep_local",),
         "forward(x [T, dim], indices [T, K], weights [T, K], partial=True) -> [T, dim] = sum_k weights[t, k] "
         "* FFN_{indices[t, k]}(x_t) over the experts held here; an index >= the local count means absent "
         "(dropped, or on another rank). Under ep the runtime puts a dispatching forward in front (a class "
         "mixin) that calls this one on the tokens each rank receives.",
         "model/moe.py Experts.forward", required=True,
         call=(("x", "indices", "weights"), {"partial": True})),
    Hook("grouped_gemm", "seam", "expert group", (f"{_FP8}:apply_fp8",),
         "(x [rows sorted by expert, in], w [n_experts, out, in], counts [n_experts]) -> [rows, out]: "
         "x_e @ w[e]^T for each expert's block of rows. Every expert GEMM goes through self.grouped_gemm; "
         "FP8 replaces it on the instance.",
         "model/moe.py Experts.grouped_gemm = staticmethod(grouped_mm)", required=True,
         call=(("x", "w", "counts"), {})),
    # -- block: FSDP2 unit and recomputation unit --------------------------------------------------------
    Hook("fsdp_unit", "class attribute", "block", (f"{_DP}:apply_fsdp", f"{_RC}:is_recompute_unit"),
         "bool; True on the repeated layer: FSDP2 gathers and frees its parameters as one unit, and "
         "activation recomputation treats it (the outermost one) as one unit.",
         "model/transformer.py Block", required=True),
    Hook("recompute_selective", "class attribute", "block",
         (f"{_RC}:apply_recompute", f"{_RC}:_selective_forward", f"{_RC}:_find", f"{_PLAN}:model_shape"),
         "tuple of dotted paths of submodules whose outputs selective recomputation drops and re-runs in "
         "backward. A path absent on an instance is skipped; a present one is an nn.Module that is "
         "deterministic, RNG-free and stateless and does not modify its inputs. None or undeclared: mode "
         "'selective' is refused for the block. Only read on fsdp_unit classes.",
         "model/transformer.py Block (the norms and MLA's up-projections, V3 §3.2.3)"),
    Hook("forward", "runtime", "block", (f"{_RC}:apply_recompute",),
         "recomputation sets an instance `forward` that wraps the class's; callers call the block (module(x)), "
         "and the block's forward must be re-runnable (full mode restores its buffers and public attributes)."),
    Hook("_recompute_mode", "runtime", "block", (f"{_RC}:apply_recompute", f"{_RC}:recompute_mode"),
         "the block's recomputation mode, \"none\" | \"full\" | \"selective\"."),
    # -- block: the moe phases (the overlap runtime cuts a MoE block where its token dispatch sits) ----------
    Hook("moe_pre", "method", "block", (f"{_OV}:_MicroBatch._moe_block",),
         "optional, on blocks whose `ffn` holds an expert group at `ffn.experts`; (x, rope, start_pos, cache, "
         "mask) -> (h, u [T, dim], weights [T, K], routed indices [T, K], partial, stats): the block's forward up "
         "to the routed experts (attention and residual, the ffn norm, the router). The forward equals "
         "moe_post(h, u, ffn.experts(u, routed, weights, partial=partial), stats) op for op, so that the runtime "
         "may run the experts' dispatch, the experts and the combine in between, as parts of their own "
         "(parallel/overlap.py; V3 §3.2.1's attention | dispatch | MLP | combine). Deterministic given the "
         "same inputs and RNG state (full recomputation re-runs it).",
         "model/transformer.py Block.moe_pre (MoE.route)", call=(("x", "rope", 0, None, None), {})),
    Hook("moe_shared", "method", "block", (f"{_OV}:_MicroBatch._moe_block",),
         "optional, with moe_pre; (u [T, dim]) -> the shared experts' output on u, or None without them: "
         "what moe_post adds when given it (the runtime computes it while the dispatch is in flight).",
         "model/transformer.py Block.moe_shared (MoE.shared)", call=(("u",), {})),
    Hook("moe_post", "method", "block", (f"{_OV}:_MicroBatch._moe_block",),
         "optional, with moe_pre; (h, u, y [T, dim], stats, shared=None) -> the block's output: the shared "
         "experts on u (`shared` when computed already by moe_shared), plus the routed output y, plus the "
         "residual h; in training it records the load count and balance losses of this forward (what forward "
         "records).",
         "model/transformer.py Block.moe_post (MoE.merge)", call=(("h", "u", "y", "stats"), {"shared": None})),
    # -- token-split module -------------------------------------------------------------------------------
    Hook("reduce_token_stats", "seam", "token-split module", (f"{_TP}:apply_tp",),
         "callable t -> t, identity by default (an instance attribute set in __init__). The module passes every "
         "statistic summed over tokens (token counts, score sums) through it; under tp each rank routes a "
         "share of the tokens and the runtime makes it an all-reduce over tp.",
         "model/moe.py MoE", required=True, call=(("t",), {})),
    Hook("_tokens_split", "runtime", "token-split module", (f"{_TP}:_split_tokens", f"{_TP}:_gather_tokens"),
         "whether this forward's tokens were split over tp (decoding a length that does not split runs whole)."),
    Hook("tokens_per_expert", "attribute", "module", (f"{_DP}:sync_expert_load", "pretrain/metrics.py:expert_state"),
         "a registered buffer [n_experts]: tokens this rank routed to each expert since the last "
         "update_expert_bias (a count, not a mean). The runtime sums every tensor of this name over dp x tp "
         "before the bias update and the load statistics.",
         "model/moe.py MoE"),
    # -- model: methods -----------------------------------------------------------------------------------
    Hook("fsdp_forward_methods", "class attribute", "model", (f"{_DP}:apply_fsdp", f"{_PP}:StageModel"),
         "tuple of names of the model's methods besides forward that are called from outside (FSDP2 entry "
         "points, `register_fsdp_forward_method`); read on the top-level model only. Pipeline stages set ().",
         "model/transformer.py Transformer (\"loss\", \"hidden\", \"decode\", \"draft\")"),
    Hook("cross_entropy", "seam", "model", (f"{_TP}:apply_tp",),
         "(logits [..., vocab] in at least fp32, labels [...], reduction=\"sum\" | \"none\") -> the summed loss, "
         "or per token (flattened, 0 at ignored labels). Every token loss goes through self.cross_entropy; "
         "the module with the vocab_head child gets the vocab-parallel one under tp (logits stay split).",
         "model/transformer.py Transformer.cross_entropy",
         call=(("logits", "labels"), {"reduction": "none"})),
    Hook("reduce_sequence_stats", "seam", "model",
         ("parallel/context_parallel.py:check_cp_plan", "parallel/context_parallel.py:apply_cp"),
         "callable t -> t, the identity by default: every sum over this process's tokens that the loss needs "
         "(the token losses) passes through it; under cp the runtime makes it an all-reduce over cp with an "
         "identity backward, so every cp rank's loss terms are the whole rows' and each rank's gradient is its "
         "tokens'. The token count stays the whole rows' (loss(positions=...) gets whole rows).",
         "model/transformer.py Transformer.reduce_sequence_stats", call=(("t",), {})),
    Hook("entropy", "seam", "model", (f"{_TP}:apply_tp",),
         "logits [..., vocab] -> the softmax entropy per position, flattened; vocab-parallel under tp.",
         "model/transformer.py Transformer.entropy", call=(("logits",), {})),
    Hook("restrict_vocab", "seam", "model", (f"{_TP}:apply_tp",),
         "(logits [b, s, vocab or vocab/tp], allowed [2, n] long: flat position in b x s, global token id, "
         "vocab_start=0) -> the logits with every token outside its position's allowed set at a finite minus "
         "infinity (positions absent from allowed keep all); under tp the runtime binds vocab_start to the rank's "
         "first column, so each rank masks its own slice (Transformer.token_logprobs(allowed=...), DeepSeek-V3.2's "
         "Keep Sampling Mask).",
         "model/transformer.py Transformer.restrict_vocab", call=(("logits", "allowed"), {})),
    Hook("gather_logits", "seam", "model", (f"{_TP}:apply_tp", "posttrain/generate.py:Generator.generate",
                                            "posttrain/engine.py:Engine._logits"),
         "logits [..., vocab or vocab/tp] -> [..., vocab], the whole vocabulary (for sampling); identity in "
         "one process, an all-gather of the vocab-parallel shards under tp.",
         "model/transformer.py Transformer.gather_logits", call=(("logits",), {})),
    Hook("set_expert_placement", "method", "model", ("parallel/apply.py:parallelize",),
         "optional; (n_devices, devices_per_node), called before the split with (ep, ep // ep_nodes): experts "
         "lie in contiguous equal blocks per device, devices in blocks per node; device- and node-limited "
         "routing and device-level losses use it. Raises ValueError for a placement it cannot route "
         "(reported as a LayoutError).",
         "model/transformer.py Transformer.set_expert_placement", call=((1, 1), {})),
    Hook("trunk_moe_layers", "method", "model", (f"{_PP}:cut_stage",),
         "optional; () -> the decoder stack's MoE modules in layer order (the MTP modules' excluded): the "
         "layers a routes tensor [..., n, k] lists, in that order.",
         "model/transformer.py Transformer.trunk_moe_layers", call=((), {})),
    Hook("replay_routing", "method", "model", (f"{_PP}:StageModel.forward",),
         "optional; (routes [*tokens' shape, n_moe_layers, k]) forces those experts (-1: route normally) in "
         "every forward until clear_routing, the gates still scoring (routing replay, R3).",
         "model/transformer.py Transformer.replay_routing"),
    Hook("record_routing", "method", "model", (f"{_PP}:StageModel.forward",),
         "optional; (on=True) from now on every forward records, per trunk MoE layer, the experts chosen.",
         "model/transformer.py Transformer.record_routing", call=((), {})),
    Hook("recorded_routing", "method", "model", (f"{_PP}:StageModel.forward",),
         "optional; (forced=True) -> per recorded forward [*tokens' shape, n_moe_layers, k]: the experts used, "
         "or (forced=False) those the routers chose themselves.",
         "model/transformer.py Transformer.recorded_routing", call=((), {})),
    Hook("clear_routing", "method", "model", (f"{_PP}:StageModel.forward",),
         "optional; () stops recording and replaying and drops what was recorded.",
         "model/transformer.py Transformer.clear_routing", call=((), {})),
    Hook("update_expert_bias", "method", "model",
         ("parallel/apply.py:update_expert_bias", "parallel/engine.py:SingleStage.update_expert_bias",
          "pretrain/train.py:Trainer.train_step"),
         "(gamma=None) after each optimizer step: move the routing biases against the load counted since the "
         "last call (tokens_per_expert, already summed over dp x tp), then zero the counts; gamma 0 only "
         "resets them; does nothing without experts. Identical on every rank.",
         "model/transformer.py Transformer.update_expert_bias", required=True, call=((None,), {})),
    Hook("init_value", "method", "model", (f"{_ST}:init_parallel_weights",),
         "(name, global shape, seed, experts: range | None) -> the fp32 initial value of parameter `name` "
         "(global name) of that global shape; only the rows `experts` of an expert-stacked weight when given. "
         "Depends on nothing but its arguments, so each rank builds its shards alone, equal to one process.",
         "model/transformer.py Transformer.init_value", required=True, call=(("name", (1,), 0, None), {})),
    Hook("init_buffers", "method", "model", (f"{_ST}:materialize",),
         "optional; () re-creates the non-persistent buffers after `to_empty` (rotary frequencies, zeroed "
         "load counters and routing biases).",
         "model/transformer.py Transformer.init_buffers", call=((), {})),
    Hook("loss", "method", "model", (f"{_PP}:StageModel._forward", "parallel/engine.py:SingleStage._losses"),
         "(tokens [b, s], labels [b, s], h=None, doc_ids=None, positions=None, ...) -> dict with \"loss\" (the "
         "scalar to backpropagate) and its terms (lm_loss, mtp_loss, balance_*, aux_loss). Given h (hidden "
         "states from the previous stage) it starts from them instead of the embedding; tokens still give "
         "positions. Given positions [n] (context parallelism) it computes only the tokens at those global "
         "positions of the whole rows tokens/labels/doc_ids, normalised by the whole rows' token count.",
         "model/transformer.py Transformer.loss", required=True,
         call=(("tokens", "labels"), {"h": None, "doc_ids": None, "positions": None})),
    Hook("hidden", "method", "model", (f"{_PP}:StageModel._forward",),
         "(tokens, h=None, doc_ids=None, positions=None) -> the hidden states after the layers held (before the "
         "final norm); from h when given, else from the embedding; with positions those of the tokens there.",
         "model/transformer.py Transformer.hidden", required=True,
         call=(("tokens",), {"h": None, "doc_ids": None, "positions": None})),
    Hook("_blocks", "seam", "model", (f"{_OV}:_layers_skipped",),
         "optional; (h, rope, start_pos=0, caches=None, mask=None) -> h after every layer held: the layer loop "
         "that hidden and loss call through self._blocks. The overlap runtime replaces it on the instance for "
         "one call by one that returns h (and records rope, start_pos, mask), so that hidden gives the "
         "embedding and loss(h=...) the loss from the last layer's output, while it runs the layers itself.",
         "model/transformer.py Transformer._blocks"),
    Hook("balance_losses", "method", "model", (f"{_PP}:StageModel._forward",),
         "() -> {name: scalar} of the balance losses of the last forward of the layers held (names "
         "balance_expert, balance_device, balance_comm); empty without experts or in eval mode.",
         "model/transformer.py Transformer.balance_losses", required=True, call=((), {})),
    Hook("stage_costs", "method", "model",
         (f"{_PP}:build_pipeline", f"{_PLAN}:model_shape", "pretrain/metrics.py:train_flops_per_token"),
         "(seq_len) -> (before the first layer, [one per entry of layers, in order], after the last layer): "
         "forward FLOPs per token, what pipeline stages are balanced by, MFU and the planner count. Works on "
         "the meta device.",
         "model/transformer.py Transformer.stage_costs", required=True, call=((8,), {})),
    Hook("new_cache", "method", "model",
         ("posttrain/generate.py:Generator.generate", "posttrain/engine.py:PagePool.__init__"),
         "post-training; (batch, max_len, dtype=None, device=None, mtp=False) -> per-layer caches that "
         "forward(tokens, start_pos, caches) fills and reads, with mtp the MTP blocks' after the layers'. "
         "Each is an object with write(name, start_pos, value [b, s, ...]) -> everything cached [b, t, ...] "
         "whose buffers are [batch, max_len, ...]: the rollout engine allocates pages as batch rows.",
         "model/transformer.py Transformer.new_cache", call=((1, 8), {"device": None})),
    Hook("decode", "method", "model", ("posttrain/engine.py:Engine._forward",),
         "post-training; (tokens [b, s], positions [b, s], caches, mask [b, s, keys]) -> (logits, h): every "
         "sequence at its own positions, attending through caches (any object with new_cache's write) under "
         "the mask; h the final hidden states after the output norm; logits vocab-split under tp.",
         "model/transformer.py Transformer.decode", call=(("tokens", "positions", "caches", "mask"), {})),
    Hook("draft", "method", "model", ("posttrain/engine.py:Engine._forward",),
         "post-training; (h [b, s, dim], tokens [b, s] one ahead, positions, cache, mask) -> (logits, h^1) of the "
         "first MTP module (V3 eq. 21-22), for speculative decoding; ValueError on a model without one.",
         "model/transformer.py Transformer.draft", call=(("h", "tokens", "positions", "cache", "mask"), {})),
    Hook("token_logprobs", "method", "model",
         ("posttrain/grpo.py:GRPOTrainer.update", "posttrain/grpo.py:GRPOObjective.__call__",
          "posttrain/dpo.py:token_logprobs"),
         "post-training; (tokens, targets, doc_ids=None, entropy=False, temperature=1.0, mtp=False, allowed=None) "
         "-> {\"logprobs\": [b, s]} (and \"entropy\"; with mtp, \"mtp_ce\": the MTP modules' summed CE on the main "
         "model's detached outputs, for grpo.mtp_weight; with allowed, renormalised over each position's allowed "
         "tokens through restrict_vocab), through the cross_entropy and entropy seams so that it works on "
         "vocab-split logits.",
         "model/transformer.py Transformer.token_logprobs",
         call=(("tokens", "targets"), {"doc_ids": None, "entropy": True, "temperature": 1.0})),
    # -- model: what the pipeline cuts --------------------------------------------------------------------
    Hook("layers", "attribute", "model", (f"{_PP}:cut_stage", f"{_PP}:build_pipeline", f"{_PLAN}:model_shape"),
         "nn.ModuleDict of the blocks keyed by global index \"0\", \"1\", ... in order; a stage keeps a "
         "subset, so parameter names stay global.",
         "model/transformer.py Transformer.layers", required=True),
    Hook("embed", "attribute", "model", (f"{_PP}:cut_stage", f"{_PP}:_needs_embed_on_last", f"{_PLAN}:model_shape"),
         "the input embedding (a module with `weight`); None on the stages that do not hold it, where hidden "
         "and loss start from h.",
         "model/transformer.py Transformer.embed", required=True),
    Hook("norm", "attribute", "model", (f"{_PP}:cut_stage", f"{_PLAN}:model_shape"),
         "the final norm; None on the stages before the last.", "model/transformer.py Transformer.norm",
         required=True),
    Hook("head", "attribute", "model", (f"{_PP}:cut_stage", f"{_PP}:_needs_embed_on_last", f"{_PLAN}:model_shape"),
         "the output linear (weight [vocab, dim]); None on the stages before the last. A tied head shares "
         "embed.weight, so the last stage keeps a copy of the embedding.",
         "model/transformer.py Transformer.head", required=True),
    Hook("mtp", "attribute", "model", (f"{_PP}:cut_stage", f"{_PP}:_needs_embed_on_last", f"{_PLAN}:model_shape"),
         "nn.ModuleList of the modules run after the head on the last stage (emptied on the others); "
         "non-empty means the last stage needs the embedding too. The planner reads each one's `block`.",
         "model/transformer.py Transformer.mtp (V3 §2.2)"),
    Hook("cfg", "attribute", "model",
         (f"{_PP}:build_pipeline", f"{_PP}:attach_schedule", f"{_PP}:Pipeline._metrics", f"{_PLAN}:model_shape",
          "posttrain/generate.py:Generator.__init__", "posttrain/engine.py:Engine.__init__"),
         "the configuration, with ModelConfig's field names: the pipeline reads dim, max_seq_len and n_mtp; "
         "the planner and plan/cost.py the shape fields; generation max_seq_len (the rollout engine also "
         "n_layers and n_mtp).",
         "model/config.py ModelConfig", required=True),
    Hook("mtp_lambda", "attribute", "model", ("pretrain/train.py:Trainer.train_step",),
         "float: the weight of the mtp modules' losses that loss() uses when none is given; the loop sets it "
         "on every model or stage each step (a schedule may change it during training).",
         "model/transformer.py Transformer.mtp_lambda"),
    # -- written by the runtime -------------------------------------------------------------------------
    Hook("param_layouts", "runtime", "model",
         ("parallel/apply.py:parallelize", f"{_DP}:finish_grad_sync", f"{_DP}:clip_grad_norm_",
          f"{_ST}:materialize", f"{_ST}:load_full_state_dict", f"{_ST}:full_state",
          "parallel/checkpoint.py:sharded_state"),
         "{parameter name: ParamLayout}: every local parameter's global shape, splits and gradient sums."),
    Hook("grad_norm_skip", "runtime", "stage", (f"{_PP}:build_pipeline", f"{_DP}:clip_grad_norm_"),
         "names of the parameters another stage also holds and counts in the gradient norm."),
    Hook("is_first", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:Pipeline._sum_shared_grads"),
         "the stage is the pipeline's first (holds the embedding input)."),
    Hook("is_last", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel._forward", f"{_PP}:Pipeline.step"),
         "the stage is the pipeline's last (computes the loss)."),
    Hook("stage_metrics", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel.record",
                                               f"{_PP}:Pipeline._metrics"),
         "the loss terms the stage recorded, one dict per micro-batch."),
    Hook("aux_scale", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel._forward", f"{_PP}:Pipeline.step"),
         "the weight of one micro-batch's balance losses in the objective (1 / micro-batches)."),
    Hook("cp_positions", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel._forward",
                                              f"{_PP}:Pipeline._set_positions"),
         "this cp rank's global positions [seq / cp] for the step's rows (None at cp = 1): the stage passes them "
         "to loss/hidden and sends on the hidden states of those positions."),
    Hook("objective", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel._forward", f"{_PP}:Pipeline.step",
                                           f"{_PP}:Pipeline.score"),
         "the post-training objective of this step (Pipeline.step's objective=, Pipeline.score's recorder), "
         "which the last stage calls in place of loss; None otherwise."),
    Hook("objective_terms", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel._forward",
                                                 f"{_PP}:Pipeline._objective_metrics"),
         "the objective's terms the last stage recorded, one dict per micro-batch."),
    Hook("moe_columns", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel.forward"),
         "the stage's trunk MoE layers as indices into the whole model's (trunk_moe_layers order): the columns "
         "of a routes tensor that this stage replays."),
    Hook("route_replay", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel.forward"),
         "True: a forward given routes forces them (routing replay); False: it only compares (route_pairs)."),
    Hook("route_counts", "runtime", "stage", (f"{_PP}:cut_stage", f"{_PP}:StageModel.forward"),
         "fp64 [2]: (token, layer) pairs whose router choice differed from the given routes, and pairs compared."),
    Hook("stage_index", "runtime", "stage", (f"{_PP}:build_pipeline",),
         "the stage's global index (for callers and tests)."),
    Hook("ep_levels", "runtime", "expert group", (f"{_EP}:apply_ep", f"{_EP}:ExpertParallel._dispatch"),
         "the ep group, or its cross-node then in-node groups, that tokens are dispatched over."),
    Hook("ep_total", "runtime", "expert group", (f"{_EP}:apply_ep", f"{_EP}:ExpertParallel.forward"),
         "experts in the whole ep group (the ep_count attribute becomes the local count)."),
    Hook("fp8_dispatch", "runtime", "expert group", (f"{_FP8}:apply_fp8", f"{_EP}:ExpertParallel._dispatch",
                                                     f"{_EP}:ExpertParallel.dispatch_issue",
                                                     f"{_OV}:_MicroBatch._moe_block"),
         "the FP8 recipe whose 1x128 tiles the dispatch carries (train.fp8=blockwise), None: the rows' dtype."),
    Hook("fp8_recipe", "runtime", "module", (f"{_FP8}:apply_fp8", f"{_FP8}:Fp8Linear.forward"),
         "the FP8 recipe of a converted linear layer."),
    Hook("_fsdp", "runtime", "model", (f"{_DP}:apply_fsdp",), "set when apply_fsdp has wrapped the model."),
    Hook("_overlap_entry", "runtime", "module", (f"{_OV}:_entry",),
         "the overlap runtime's entry into a block or expert group for one part (mode, fn, *args), registered "
         "as an FSDP2 forward method (gathers the unit's parameters, registers its backward hooks)."),
    Hook("__class__", "runtime", "module", (f"{_EP}:apply_ep", f"{_FP8}:apply_fp8", f"{_PP}:cut_stage"),
         "the runtime puts a mixin in front of a class, type(name, (Mixin, cls), {}) (ExpertParallel, Fp8Linear, "
         "StageModel), as FSDP2 does: __init__ is not run again and names and state-dict keys do not change, "
         "so a model class must not depend on type(self) being its own class."),
)

# Names read with getattr/hasattr (or written) in the runtime's code that are no model hook.
NOT_HOOKS: dict[str, str] = {
    "ScalingType": "torch.nn.functional feature probe (parallel/fp8.py)",
    "BlockWise1x128": "torch.nn.functional feature probe (parallel/fp8.py)",
    "stages": "a parallel.pipeline.Pipeline (parallel/checkpoint.py _modules)",
    "init_state": "the optimizer's (parallel/checkpoint.py sharded_state)",
    "set_requires_gradient_sync": "FSDP2's FSDPModule method (parallel/data_parallel.py set_gradient_sync)",
    "check": "a reward function's build-time check of the machine (posttrain/rewards.py Reward)",
    "unshare": "os.unshare, on Python >= 3.12 (posttrain/sandbox_child.py)",
    "numpy": "megatron-core's dataset modules, given a pickle-free numpy (pretrain/data.py _import_megatron)",
    "group": "RowParallelLinear's own attribute, read by the Fp8Linear mixin",
    "sp": "RowParallelLinear's own attribute, read by the Fp8Linear mixin",
}

HOOK_NAMES = frozenset(h.name for h in HOOKS)
# written by the runtime: a model class that declares one of these would be overwritten or misread
RESERVED = frozenset(h.name for h in HOOKS if h.kind == "runtime") - {"forward", "__class__"}

Style = Union[str, tuple[str, ...]]


# -- the roles as protocols ----------------------------------------------------------------------------
class TensorParallelModule(Protocol):
    """Any module class that tensor parallelism splits: `tp_plan` (and `tp_divide` when head counts change)."""

    tp_plan: ClassVar[Mapping[str, Style]]
    tp_divide: ClassVar[tuple[str, ...]]          # optional


class Block(Protocol):
    """The repeated layer: one FSDP2 unit, one recomputation unit."""

    fsdp_unit: ClassVar[bool]
    recompute_selective: ClassVar[tuple[str, ...] | None]   # optional; None: no selective recomputation

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class ExpertGroup(Protocol):
    """Routed experts' weights stacked [n_experts, ...] and the routed path over the experts held here."""

    ep_count: ClassVar[str]
    ep_params: ClassVar[tuple[str, ...]]

    def grouped_gemm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                partial: bool = True) -> torch.Tensor: ...


class TokenSplitModule(Protocol):
    """A module whose tp_plan has {"": "token_split"}: under tp it sees its rank's share of the tokens."""

    reduce_token_stats: Callable[[torch.Tensor], torch.Tensor]


class Model(Protocol):
    """The top-level network. Besides these it is an nn.Module whose forward(tokens, start_pos=0, caches=None,
    doc_ids=None) gives logits [batch, seq, vocab] (post-training's generator calls it with caches)."""

    fsdp_forward_methods: ClassVar[tuple[str, ...]]
    cfg: Any
    layers: nn.ModuleDict
    embed: nn.Module | None
    norm: nn.Module | None
    head: nn.Module | None
    mtp: nn.ModuleList
    mtp_lambda: float

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, *, h: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...

    def hidden(self, tokens: torch.Tensor, *, h: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor: ...

    def reduce_sequence_stats(self, t: torch.Tensor) -> torch.Tensor: ...

    def balance_losses(self) -> dict[str, torch.Tensor]: ...

    def stage_costs(self, seq_len: int) -> tuple[float, list[float], float]: ...

    def init_value(self, name: str, shape: tuple[int, ...], seed: int = 0,
                   experts: range | None = None) -> torch.Tensor: ...

    def init_buffers(self) -> None: ...                                         # optional

    def set_expert_placement(self, n_devices: int, devices_per_node: int = 1) -> None: ...   # optional

    def update_expert_bias(self, gamma: float | None = None) -> None: ...

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor,
                      reduction: str = "sum") -> torch.Tensor: ...

    def entropy(self, logits: torch.Tensor) -> torch.Tensor: ...

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor: ...

    def restrict_vocab(self, logits: torch.Tensor, allowed: torch.Tensor, vocab_start: int = 0) -> torch.Tensor: ...

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None,
                  mtp: bool = False) -> list: ...                                                  # post-training

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...                       # post-training

    def draft(self, h: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, cache,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...                        # optional

    def token_logprobs(self, tokens: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
                       entropy: bool = False, temperature: float = 1.0,
                       mtp: bool = False, allowed: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...


# -- checking a model against the table ------------------------------------------------------------------
def _hook(name: str, role: str) -> Hook:
    return next(h for h in HOOKS if h.name == name and h.role == role)


def _binds(fn, call: tuple[tuple, dict]) -> str | None:
    """None when fn accepts the runtime's call, else why not."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or C callable: nothing to check
    try:
        sig.bind(*call[0], **call[1])
    except TypeError as e:
        return str(e)
    return None


def _styles(value) -> tuple | None:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(s, str) for s in value):
        return tuple(value)
    return None


@functools.lru_cache(maxsize=None)
def _assigned(cls: type) -> frozenset[str]:
    """Attribute names a class (and its bases outside torch) assigns to `self` anywhere in its source, or
    declares in its body: the children it can hold, whether or not an instance does."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        names.update(getattr(klass, "__annotations__", {}))
        names.update(vars(klass))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for t in targets:
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        names.add(e.attr)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("register_module", "add_module", "register_buffer",
                                           "register_parameter")
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return frozenset(names)


def _check_tp(path: str, m: nn.Module, out: list[str]) -> None:
    cls = type(m)
    plan = getattr(cls, "tp_plan", None)
    divide = getattr(cls, "tp_divide", None)
    where = f"{path or '<model>'} ({cls.__name__})"
    if divide is not None:
        if not isinstance(divide, (tuple, list)) or not all(isinstance(a, str) for a in divide):
            out.append(f"{where}: tp_divide must be a tuple of attribute names, got {divide!r}")
            divide = ()
        for a in divide:
            n = getattr(m, a, None)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                out.append(f"{where}: tp_divide names {a!r}, which is not a positive int attribute ({n!r})")
    if plan is None:
        return
    if not isinstance(plan, Mapping):
        out.append(f"{where}: tp_plan must be a dict child -> style(s), got {type(plan).__name__}")
        return
    for child, value in plan.items():
        styles = _styles(value)
        if not isinstance(child, str) or (child and not child.isidentifier()):
            out.append(f"{where}: tp_plan key {child!r} is not \"\" or a direct child's name")
            continue
        if styles is None:
            out.append(f"{where}: tp_plan[{child!r}] must be a style or a tuple of styles, got {value!r}")
            continue
        for style in styles:
            name, _, unit = style.partition(":")
            if name not in TP_STYLES:
                out.append(f"{where}: tp_plan[{child!r}] has unknown style {style!r}; known: {', '.join(TP_STYLES)}")
            if not child and name in TP_STYLES and name not in SELF_STYLES:
                out.append(f"{where}: style {name!r} needs a child; the key \"\" (the module itself) takes only "
                           f"{' or '.join(SELF_STYLES)}")
            if child and name == "token_split":
                out.append(f"{where}: token_split applies to the module itself: use the key \"\", not {child!r}")
            if unit and name != "colwise":
                out.append(f"{where}: tp_plan[{child!r}] style {style!r}: only colwise takes a unit attribute")
            if unit:
                n = getattr(m, unit, None)
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    out.append(f"{where}: {style!r} splits in units of {unit!r}, not a positive int attribute")
                elif unit not in (divide or ()):
                    out.append(f"{where}: {style!r} splits in units of {unit!r}, which tp_divide does not list")
        if not child:
            continue
        target = getattr(m, child, None)
        if target is None:
            if child not in _assigned(cls):
                out.append(f"{where}: tp_plan names child {child!r}, which the instance lacks and the class "
                           f"never assigns (self.{child})")
            continue
        if not isinstance(target, nn.Module):
            out.append(f"{where}: tp_plan names {child!r}, a {type(target).__name__}, not a child module")
            continue
        names = {s.partition(":")[0] for s in styles}
        if names & set(LINEAR_STYLES) and not isinstance(target, nn.Linear):
            out.append(f"{where}: {child!r} is a {type(target).__name__}; styles {sorted(names & set(LINEAR_STYLES))} "
                       "need an nn.Linear")
        if "vocab_embed" in names and not isinstance(target, nn.Embedding):
            out.append(f"{where}: {child!r} is a {type(target).__name__}; vocab_embed needs an nn.Embedding")
        if "partial_grad" in names and not any(True for _ in target.parameters()):
            out.append(f"{where}: {child!r} has no parameters to mark partial_grad")
    all_styles = {s.partition(":")[0] for v in plan.values() for s in (_styles(v) or ())}
    if "vocab_head" in all_styles:
        for seam in VOCAB_SEAMS:
            problem = _seam_problem(m, _hook(seam, "model"))
            if problem:
                out.append(f"{where}: has a vocab_head child, so {problem}")
    if "token_split" in all_styles:
        problem = _seam_problem(m, _hook("reduce_token_stats", "token-split module"))
        if problem:
            out.append(f"{where}: is token_split, so {problem}")


def _seam_problem(m, hook: Hook) -> str | None:
    fn = getattr(m, hook.name, None)
    if not callable(fn):
        return f"{hook.name} must be callable ({hook.kind}: {hook.contract.split(';')[0]})"
    why = _binds(fn, hook.call) if hook.call else None
    return f"{hook.name} does not accept the runtime's call {_call_str(hook)}: {why}" if why else None


def _call_str(hook: Hook) -> str:
    args = [repr(a) if not isinstance(a, str) else a for a in hook.call[0]]
    args += [f"{k}={v!r}" for k, v in hook.call[1].items()]
    return f"{hook.name}({', '.join(args)})"


def _check_ep(path: str, m: nn.Module, out: list[str]) -> None:
    cls = type(m)
    count, params = getattr(cls, "ep_count", None), getattr(cls, "ep_params", None)
    where = f"{path or '<model>'} ({cls.__name__})"
    if params and not count:
        out.append(f"{where}: declares ep_params without ep_count; expert parallelism finds groups by ep_count")
    if not count:
        return
    if not isinstance(count, str):
        out.append(f"{where}: ep_count must name the expert-count attribute, got {count!r}")
        return
    n = getattr(m, count, None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        out.append(f"{where}: ep_count names {count!r}, which is not a positive int attribute ({n!r})")
        n = None
    if not params or not isinstance(params, (tuple, list)) or not all(isinstance(p, str) for p in params):
        out.append(f"{where}: ep_params must be a non-empty tuple of parameter names, got {params!r}")
        params = ()
    for p in params:
        t = m._parameters.get(p)
        if not isinstance(t, nn.Parameter):
            out.append(f"{where}: ep_params names {p!r}, which is not a parameter of the module itself")
        elif n is not None and (t.dim() < 1 or t.shape[0] != n):
            out.append(f"{where}: {p} has shape {tuple(t.shape)}; ep_params are stacked [{count} = {n}, ...]")
    for hook in (_hook("grouped_gemm", "expert group"),):
        problem = _seam_problem(m, hook)
        if problem:
            out.append(f"{where}: {problem}")
    why = _binds(cls.forward.__get__(m), _hook("forward", "expert group").call)
    if why:
        out.append(f"{where}: forward does not accept (x, indices, weights, partial=True): {why}")
    for sub_path, sub in m.named_modules():
        if sub_path and getattr(type(sub), "ep_count", None):
            out.append(f"{where}: holds another expert group at {sub_path}")


def _resolve(unit: nn.Module, path: str):
    m = unit
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _check_block(path: str, m: nn.Module, out: list[str]) -> None:
    cls = type(m)
    unit = getattr(cls, "fsdp_unit", None)
    sel = getattr(cls, "recompute_selective", None)
    where = f"{path or '<model>'} ({cls.__name__})"
    if unit is not None and not isinstance(unit, bool):
        out.append(f"{where}: fsdp_unit must be a bool, got {unit!r}")
    if sel is None:
        return
    if not unit:
        out.append(f"{where}: declares recompute_selective but is no fsdp_unit; only blocks' lists are read")
    if not isinstance(sel, (tuple, list)) or not all(
            isinstance(p, str) and all(q.isidentifier() for q in p.split(".")) for p in sel):
        out.append(f"{where}: recompute_selective must be a tuple of dotted submodule paths, got {sel!r}")
        return
    found = 0
    for p in sel:
        sub = _resolve(m, p)
        if sub is None:
            continue
        if not isinstance(sub, nn.Module):
            out.append(f"{where}: recompute_selective names {p!r}, a {type(sub).__name__}, not a submodule")
            continue
        found += 1
    if sel and not found:
        out.append(f"{where}: none of recompute_selective {tuple(sel)} exists in this block; selective "
                   "recomputation would recompute nothing")


def _check_reserved(path: str, m: nn.Module, out: list[str]) -> None:
    package = __name__.rpartition(".")[0]
    for klass in type(m).__mro__:
        top = klass.__module__.split(".")[0]
        if top in ("torch", "builtins", package):
            continue
        clash = RESERVED & set(vars(klass))
        if clash:
            out.append(f"{path or '<model>'} ({klass.__name__}): declares {sorted(clash)}, which the runtime writes")


def _check_buffers(path: str, m: nn.Module, out: list[str]) -> None:
    load = getattr(m, "tokens_per_expert", None)
    if isinstance(load, torch.Tensor) and (m._buffers.get("tokens_per_expert") is not load or load.dim() != 1):
        out.append(f"{path or '<model>'} ({type(m).__name__}): tokens_per_expert must be a registered 1-D buffer "
                   "[n_experts] (the runtime sums it over dp x tp)")


def _check_top(model: nn.Module, out: list[str]) -> None:
    cls = type(model)
    name = f"<model> ({cls.__name__})"
    methods = getattr(cls, "fsdp_forward_methods", ())
    if not isinstance(methods, (tuple, list)) or not all(isinstance(n, str) for n in methods):
        out.append(f"{name}: fsdp_forward_methods must be a tuple of method names, got {methods!r}")
        methods = ()
    for n in methods:
        if n == "forward" or not callable(getattr(cls, n, None)):
            out.append(f"{name}: fsdp_forward_methods names {n!r}, which is not a method besides forward")
    for hook in HOOKS:
        if hook.role != "model" or hook.kind not in ("method", "seam"):
            continue
        present = callable(getattr(model, hook.name, None))
        if not present:
            if hook.required:
                out.append(f"{name}: lacks {hook.kind} {hook.name} ({', '.join(hook.used_by)})")
            continue
        why = _binds(getattr(model, hook.name), hook.call) if hook.call else None
        if why:
            out.append(f"{name}: {hook.name} does not accept the runtime's call {_call_str(hook)}: {why}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        out.append(f"{name}: layers must be an nn.ModuleDict keyed by global layer index")
        layers = None
    elif list(layers.keys()) != [str(i) for i in range(len(layers))]:
        out.append(f"{name}: layers keys {list(layers.keys())[:4]}... are not \"0\", \"1\", ... in order")
    if layers is not None:
        for key, block in layers.items():
            if not getattr(type(block), "fsdp_unit", False):
                out.append(f"{name}: layers[{key!r}] ({type(block).__name__}) is no block (fsdp_unit)")
    for attr in ("embed", "norm", "head"):
        if not isinstance(getattr(model, attr, None), nn.Module):
            out.append(f"{name}: {attr} must be a module (the pipeline sets it to None on the stages without it)")
    for attr in ("embed", "head"):
        if not isinstance(getattr(getattr(model, attr, None), "weight", None), torch.Tensor):
            out.append(f"{name}: {attr} must have a weight (the pipeline compares embed.weight and head.weight)")
    mtp = getattr(model, "mtp", None)
    if mtp is not None and not isinstance(mtp, nn.ModuleList):
        out.append(f"{name}: mtp must be an nn.ModuleList, got {type(mtp).__name__}")
    cfg = getattr(model, "cfg", None)
    for field_name in ("dim", "max_seq_len", "n_mtp"):
        if not isinstance(getattr(cfg, field_name, None), int):
            out.append(f"{name}: cfg.{field_name} must be an int (the pipeline reads it)")
    lam = getattr(model, "mtp_lambda", 0.0)
    if not isinstance(lam, numbers.Real):
        out.append(f"{name}: mtp_lambda must be a number, got {lam!r}")
    if layers is not None and callable(getattr(model, "stage_costs", None)):
        try:
            costs = model.stage_costs(8)
        except Exception as e:  # noqa: BLE001 (reported, not raised: this is a check)
            out.append(f"{name}: stage_costs(8) raised {type(e).__name__}: {e}")
            return
        ok = (isinstance(costs, tuple) and len(costs) == 3 and isinstance(costs[1], list)
              and len(costs[1]) == len(layers)
              and all(isinstance(c, numbers.Real) for c in (costs[0], costs[2], *costs[1])))
        if not ok:
            out.append(f"{name}: stage_costs(seq_len) must give (before, [one per layer: {len(layers)}], after)")


def check_model(model: nn.Module, *, top_level: bool = True) -> list[str]:
    """The ways `model` (a plain, not yet parallelised network; the meta device will do) breaks the
    contract, one sentence each; [] when it conforms. Every module is checked for the roles its class
    declares (tp_plan/tp_divide, ep_count/ep_params, fsdp_unit/recompute_selective, token_split's seam,
    tokens_per_expert, no runtime-owned names); with `top_level` the model itself is checked as the
    `Model` role too (required methods and seams accept the runtime's calls, layers/embed/norm/head/mtp/cfg,
    stage_costs per layer, fsdp_forward_methods)."""
    out: list[str] = []
    for path, m in model.named_modules():
        _check_tp(path, m, out)
        _check_ep(path, m, out)
        _check_block(path, m, out)
        _check_reserved(path, m, out)
        _check_buffers(path, m, out)
        if path and "fsdp_forward_methods" in vars(type(m)):
            out.append(f"{path} ({type(m).__name__}): fsdp_forward_methods is read on the top-level model only")
    if top_level:
        _check_top(model, out)
    return out


# -- the table for people --------------------------------------------------------------------------------
def render_markdown(width: int = 110) -> str:
    """HOOKS as docs/contract.md shows it: a summary table, then each hook's readers and contract."""
    lines = ["| hook | kind | role | used in (parallel/ unless named) |", "|---|---|---|---|"]
    for h in HOOKS:
        files = dict.fromkeys(u.partition(":")[0].removeprefix("parallel/").removesuffix(".py") for u in h.used_by)
        lines.append(f"| `{h.name}` | {h.kind} | {h.role} | {', '.join(files)} |")
    for h in HOOKS:
        lines += ["", f"#### `{h.name}` ({h.kind}, {h.role}{', required' if h.required else ''})", ""]
        lines += textwrap.wrap(h.contract, width)
        if h.call:
            lines += ["", f"Called as `{_call_str(h)}`."]
        lines += [""] + textwrap.wrap("Used by: " + ", ".join(f"`{u}`" for u in h.used_by) + ".", width)
        if h.example:
            lines += textwrap.wrap(f"In model/: {h.example}.", width)
    return "\n".join(lines) + "\n"


__all__ = ["Hook", "HOOKS", "HOOK_NAMES", "NOT_HOOKS", "RESERVED", "TP_STYLES", "ROLES", "KINDS",
           "TensorParallelModule", "Block", "ExpertGroup", "TokenSplitModule", "Model", "check_model",
           "render_markdown"]

if __name__ == "__main__":
    print(render_markdown(), end="")
