"""Apply expert parallelism to a single-device MoE model, from the outside, through its hooks.

For every MoE layer: keep only this EP rank's slice of the stacked expert weights (and, with expert
tensor parallelism, this etp rank's slice of each expert's FFN width), install the configured
dispatcher (wrapped for tensor parallelism by `make_dispatcher`), and point the router's
`stats_reducer` at the EP group (EP-group balance loss; bias-update counts, which
`data_parallel.py` first sums over the replicas). The model must have been built with the same seed
on every rank, so the slices of one full initialisation are exactly the single-device weights.

The router runs on every rank of a TP group on the same tokens, so its counts are the same there.
With TP-extend-EP the EP group holds tp such copies of each data-parallel rank's counts; the
reducer divides them out so the counts stay those of the global batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.layer import GroupedExperts, MoELayer
from parallel import lanes
from parallel.comm import CommStats
from parallel.dispatchers import make_dispatcher
from parallel.layout import Shard, take_shard
from parallel.mesh import Meshes
from parallel.sequence_parallel import in_split_layers

EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD")
FFN_DIM = {"w1_EDF": 2, "w3_EDF": 2, "w2_EFD": 1}  # the F axis of each stack (expert TP splits it)


def shard_experts(experts: GroupedExperts, shards: dict[str, tuple[Shard, ...]]) -> None:
    for name, spec in shards.items():
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(take_shard(full.detach(), spec).clone(), requires_grad=full.requires_grad))


def expert_shards(meshes: Meshes) -> dict[str, tuple[Shard, ...]]:
    """How this rank's part of each expert stack sits in the full stack (empty: not sharded)."""
    layout = meshes.layout
    out = {}
    for name in EXPERT_WEIGHTS:
        spec = []
        if layout.ep > 1:  # EP rank r holds experts [r * E / ep, (r + 1) * E / ep)
            spec.append(Shard(0, meshes.ep_rank(), layout.ep))
        if layout.etp > 1:
            spec.append(Shard(FFN_DIM[name], meshes.etp_rank(), layout.etp))
        out[name] = tuple(spec)
    return out


def _sum_over(group, copies: int = 1):
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=lanes.route(group))
        return counts.div_(copies) if copies > 1 else counts  # exact: `copies` equal integer terms
    return reduce


def apply_expert_parallel(model: nn.Module, meshes: Meshes, dispatcher: str, stats: Optional[CommStats] = None,
                          overlap: bool = True, sequence_parallel: bool = False) -> dict[str, tuple[Shard, ...]]:
    """Shard and rewire every MoE layer of `model` in place; return every expert parameter's name
    (their gradients are reduced over the expert-data-parallel group) with its shards."""
    layout = meshes.layout
    # TP-extend-EP: the EP group holds every TP rank of its data-parallel ranks (same counts each).
    copies = layout.tp if layout.etp == 1 else 1
    names = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        num_experts = layer.cfg.num_experts
        shards = expert_shards(meshes)
        shard_experts(layer.experts, {n: s for n, s in shards.items() if s})
        if layout.ep > 1:
            layer.router.stats_reducer = _sum_over(meshes.ep_group, copies)
        layer.dispatcher = make_dispatcher(dispatcher, layer.experts.kernels, num_experts, meshes, stats, overlap,
                                           sequence_parallel and in_split_layers(module_name))
        prefix = f"{module_name}.experts." if module_name else "experts."
        names.update({prefix + w: shards[w] for w in EXPERT_WEIGHTS})
    return names
