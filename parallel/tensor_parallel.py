"""Tensor parallelism for attention and dense SwiGLU MLPs, applied from outside the single-device model.

Each attention module and each SwiGLU (dense layers and the MoE layers' shared expert) becomes a
TP region: its input passes through `copy_to_tp` ("f") and its output through `reduce_from_tp`
("g"), installed as forward hooks so the module's code and parameter names stay those of `moe/`.
Inside a region:

- column-parallel (split the output rows of the Linear weight): MLA's wq_b (or wq) and wkv_b, GQA's
  wq, wk, wv, SwiGLU's w1 and w3. Heads are contiguous blocks of rows, so TP rank r keeps heads
  [r * h / tp, (r + 1) * h / tp) (and the matching key/value heads for GQA).
- row-parallel (split the input columns): wo and SwiGLU's w2; their partial outputs are what g sums.
- replicated inside the region: MLA's low-rank down-projections and their norms (wq_a, q_norm,
  wkv_a, kv_norm), as Megatron does for MLA: they are small, and splitting them would need an
  all-gather of the latents. Each rank back-propagates only its own heads through them, so their
  gradients are partial sums: the gradient reducer sums them over the TP group ("tp_partial").
  The shared RoPE key channels (k_rope, split from wkv_a's output) are the reason f cannot move
  further in: every head reads them, so there is no single tensor after wkv_a whose gradient is
  complete on every rank.

The attention module's `cfg` is replaced by a copy with the local head counts (its forward reads
`cfg.num_heads` / `cfg.num_kv_heads`); the model's own `cfg` keeps the global shape.

The model must have been built with the same seed on every rank: the slices of one full
initialisation are exactly the single-device weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from moe.attention import GQA, MLA
from moe.layers import SwiGLU
from parallel.layout import Shard
from parallel.method_wrap import wrap_outer
from parallel.sequence_parallel import (apply_sequence_parallel, in_split_layers, region_input, scatter_rows,
                                        scatter_sequence)
from parallel.tp_comm import copy_to_tp, reduce_from_tp

COLUMN, ROW = 0, 1  # the dimension of nn.Linear.weight ([out, in]) that is split


@dataclass
class TPPlan:
    """What tensor parallelism did to the parameters, by name."""
    shards: dict[str, tuple[Shard, ...]] = field(default_factory=dict)  # split over the TP group
    partial: list[str] = field(default_factory=list)  # replicated, gradient summed over the TP group


def _split_linear(linear: nn.Linear, dim: int, rank: int, tp: int) -> Shard:
    if linear.bias is not None:  # moe/ uses none; a row-parallel bias would be added tp times
        raise ValueError("tensor parallelism: Linear layers with a bias are not supported")
    full = linear.weight.detach()
    size = full.shape[dim] // tp
    linear.weight = nn.Parameter(full.narrow(dim, rank * size, size).clone(), requires_grad=linear.weight.requires_grad)
    if dim == COLUMN:
        linear.out_features = size
    else:
        linear.in_features = size
    return Shard(dim, rank, tp)


def _make_region(module: nn.Module, group, sequence_parallel: bool) -> None:
    """f on the (first positional) input, g on the output. A SwiGLU gets them on its halves (f on
    `gate_up`'s input, g on `act_down`'s output): the MoE layer calls those apart, around its
    exchanges; recompute and swap wrappers applied later go inside them. With sequence parallelism
    f gathers the tokens and g reduce-scatters them (parallel/sequence_parallel.py)."""
    if sequence_parallel:
        mlp = isinstance(module, SwiGLU)
        region = region_input(module, group, along_sequence=not mlp)
        scatter = scatter_rows if mlp else scatter_sequence

        def enter(x, _group):
            return region.enter(x)

        def leave(y, _group):
            region.leave()
            return scatter(y, group)
    else:
        enter, leave = copy_to_tp, reduce_from_tp
    if isinstance(module, SwiGLU):
        wrap_outer(module, "gate_up", lambda inner, x: inner(enter(x, group)))
        wrap_outer(module, "act_down", lambda inner, a, b: leave(inner(a, b), group))
        return
    module.register_forward_pre_hook(lambda _m, args: (enter(args[0], group), *args[1:]))
    module.register_forward_hook(lambda _m, _args, out: leave(out, group))


def _region_layout(module: nn.Module, tp: int) -> tuple[dict[str, int], list[nn.Module]]:
    """(Linear child name -> split dimension, replicated children) of one region; writes the local
    head counts into an attention module's cfg."""
    if isinstance(module, MLA):
        cfg = module.cfg
        module.cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // tp)
        if cfg.q_lora_rank > 0:
            split, replicated = {"wq_b": COLUMN}, [module.wq_a, module.q_norm]
        else:
            split, replicated = {"wq": COLUMN}, []
        split.update(wkv_b=COLUMN, wo=ROW)
        return split, replicated + [module.wkv_a, module.kv_norm]
    if isinstance(module, GQA):
        cfg = module.cfg
        module.cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp)
        return {"wq": COLUMN, "wk": COLUMN, "wv": COLUMN, "wo": ROW}, []
    if isinstance(module, SwiGLU):
        return {"w1": COLUMN, "w3": COLUMN, "w2": ROW}, []
    raise TypeError(f"no tensor-parallel layout for {type(module).__name__}")


def apply_tensor_parallel(model: nn.Module, group, rank: int, tp: int, sequence_parallel: bool = False) -> TPPlan:
    """Shard every attention module and SwiGLU of `model` in place over the TP group (this rank is
    `rank` of `tp`); return which parameters are split and which have partial gradients. With
    `sequence_parallel` the regions of `model.layers` take sequence-split inputs (MTP blocks keep
    whole sequences); parallel/sequence_parallel.py does the rest."""
    plan = TPPlan()
    regions = [(name, m) for name, m in model.named_modules() if isinstance(m, (MLA, GQA, SwiGLU))]
    for name, module in regions:
        prefix = f"{name}." if name else ""
        split, replicated = _region_layout(module, tp)
        for child, dim in split.items():
            plan.shards[f"{prefix}{child}.weight"] = (_split_linear(getattr(module, child), dim, rank, tp),)
        owned = {id(p) for sub in replicated for p in sub.parameters()}
        plan.partial += [f"{prefix}{n}" for n, p in module.named_parameters() if id(p) in owned]
        _make_region(module, group, sequence_parallel and in_split_layers(name))
    if sequence_parallel:
        plan.partial += apply_sequence_parallel(model, group)
    return plan
