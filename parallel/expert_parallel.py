"""Apply expert parallelism to a single-device MoE model, from the outside, through its hooks.

For every MoE layer: keep only this EP rank's slice of the stacked expert weights, install the
configured dispatcher, and point the router's `stats_reducer` at the EP group (EP-group balance
loss; bias-update counts, which `data_parallel.py` first sums over the replicas). The model must
have been built with the same seed on every rank, so the slices of one full initialisation are
exactly the single-device weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.layer import GroupedExperts, MoELayer
from parallel.comm import CommStats
from parallel.dispatchers import make_dispatcher
from parallel.mesh import Meshes

EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD")


def local_expert_range(num_experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    per = num_experts // ep
    return ep_rank * per, (ep_rank + 1) * per


def shard_experts(experts: GroupedExperts, lo: int, hi: int) -> None:
    for name in EXPERT_WEIGHTS:
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))


def _sum_over(group):
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        return counts
    return reduce


def apply_expert_parallel(model: nn.Module, meshes: Meshes, dispatcher: str, stats: Optional[CommStats] = None,
                          overlap: bool = True) -> list[str]:
    """Shard and rewire every MoE layer of `model` in place; return the names of the expert
    parameters (their gradients are reduced over the expert-data-parallel group)."""
    layout = meshes.layout
    ep_rank = meshes.ep_rank()
    names = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        num_experts = layer.cfg.num_experts
        if layout.ep > 1:
            shard_experts(layer.experts, *local_expert_range(num_experts, layout.ep, ep_rank))
            layer.router.stats_reducer = _sum_over(meshes.ep_group)
        layer.dispatcher = make_dispatcher(dispatcher, layer.experts.kernels, num_experts, meshes, stats, overlap)
        prefix = f"{module_name}.experts." if module_name else "experts."
        names += [prefix + w for w in EXPERT_WEIGHTS]
    return names
