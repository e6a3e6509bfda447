"""Data parallelism: gradient averaging over the right group for each parameter, the global gradient
norm and clipping, and the per-step synchronisation of the routers' load counts.

Every rank's loss is the mean over its own micro-batch, and the reference loss is the mean over the
global batch (all `dp` micro-batches), so every gradient is summed over ranks and divided by `dp`:
- dense parameters are replicated on every data-parallel rank: all-reduce over the dp group;
- an expert parameter lives on one rank of each EP group, and its local gradient already sums the
  contributions of every token the EP group sent to it (the dispatcher's backward brings them
  back); the replicas of that expert form the expert-data-parallel (edp) group: all-reduce there.
With tensor parallelism, a replicated parameter outside the TP regions sees the same inputs and
the same output gradient on every TP rank, so its gradient is already identical there; parameters
replicated *inside* a TP region (MLA's latent projections, see tensor_parallel.py) back-propagate
only this rank's heads, so their gradients are first summed over the TP group. TP-split parameters
are reduced over the dp group like any dense parameter (its ranks hold the same slice).
The global norm counts each parameter once: replicated squares (identical on all ranks after the
reduction), TP-split squares summed over the TP group, expert squares summed over the EP group (and
over the expert-TP group when each expert is split).
Pipeline parallelism: each rank holds one stage's parameters, so the squares above are the
stage's; they are summed over the pipeline group. The embedding copy of the last stage (MTP or
a tied head) first has its gradient summed with the first stage's over the embedding group, and
is then left out of the last stage's squares, so it counts once.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.layer import MoELayer
from parallel.mesh import Meshes


def _all_reduce_mean(tensors: list[torch.Tensor], group, divisor: int) -> None:
    """Sum `tensors` over `group` in one flat bucket and divide by `divisor`, in place."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(divisor)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(reduced)


def local_grad_norm(params: list[torch.Tensor], max_norm: float = 0.0) -> float:
    """The gradient norm of one process (no data parallelism), clipped to `max_norm` when > 0:
    what `GradReducer` computes over ranks, as `torch.nn.utils.clip_grad_norm_` computes it."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


class GradReducer:
    """The `grad_reducer` hook of `launch.trainer.step.train_step`: call after backward, before the
    optimizer step. Returns the global gradient norm (before clipping)."""

    def __init__(self, model: nn.Module, meshes: Meshes, expert_param_names: list[str],
                 tp_split_names: Iterable[str] = (), tp_partial_names: Iterable[str] = (),
                 shared_embedding: Optional[nn.Parameter] = None, embedding_counted: bool = True):
        """`shared_embedding`: this pipeline rank's embedding when the first and last stages both
        hold it (its gradient is summed over `meshes.embedding_group`); `embedding_counted`: False
        on the last stage, whose copy the global norm leaves out."""
        self.meshes = meshes
        self.shared_embedding = shared_embedding
        expert, split, partial = set(expert_param_names), set(tp_split_names), set(tp_partial_names)
        named = list(model.named_parameters())
        unknown = (expert | split | partial) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"GradReducer: parameters not in the model: {sorted(unknown)}")
        # Fixed order on every rank: the flat buckets must line up element for element.
        self.dense = [p for n, p in named if n not in expert and p.requires_grad]
        self.expert = [p for n, p in named if n in expert and p.requires_grad]
        self.tp_split = [p for n, p in named if n in split and p.requires_grad]
        self.tp_partial = [p for n, p in named if n in partial and p.requires_grad]
        split_ids = {id(p) for p in self.tp_split}
        self.replicated = [p for p in self.dense if id(p) not in split_ids and
                           not (p is shared_embedding and not embedding_counted)]
        self.routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
        first = next(model.parameters(), None)  # a pipeline stage of no-op layers holds none
        self.device = first.device if first is not None else torch.device("cpu")

    def __call__(self, params=None, max_norm: float = 0.0) -> float:
        # `params` (what train_step saw with a gradient) is ignored: the reducer's own fixed list
        # keeps the buckets aligned across ranks. A parameter without a gradient counts as zero.
        layout = self.meshes.layout
        for p in self.dense + self.expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if layout.tp > 1:
            _all_reduce_mean([p.grad for p in self.tp_partial], self.meshes.tp_group, 1)
        if self.shared_embedding is not None:
            dist.all_reduce(self.shared_embedding.grad, op=dist.ReduceOp.SUM, group=self.meshes.embedding_group)
        _all_reduce_mean([p.grad for p in self.dense], self.meshes.dp_group, layout.dp)
        _all_reduce_mean([p.grad for p in self.expert], self.meshes.edp_group, layout.dp)
        norm = self.global_norm()
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))  # the formula of torch.nn.utils.clip_grad_norm_
            if coef < 1.0:
                for p in self.dense + self.expert:
                    p.grad.mul_(coef)
        self.sync_router_load()
        return norm

    def global_norm(self) -> float:
        device = self.device

        def sq(params):  # fp32 on the device: HCCL reduces neither fp64 nor host tensors
            if not params:
                return torch.zeros((), device=device)
            return torch.stack([p.grad.detach().float().norm() for p in params]).pow(2).sum()
        layout = self.meshes.layout
        expert_sq = sq(self.expert)
        if layout.ep > 1:
            dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=self.meshes.ep_group)
        if layout.etp > 1:
            dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=self.meshes.etp_group)
        split_sq = sq(self.tp_split)
        if layout.tp > 1:
            dist.all_reduce(split_sq, op=dist.ReduceOp.SUM, group=self.meshes.tp_group)
        if layout.pp == 1:
            return math.sqrt(float(sq(self.replicated)) + float(split_sq) + float(expert_sq))
        stage_sq = sq(self.replicated) + split_sq + expert_sq  # identical on every rank of the stage
        dist.all_reduce(stage_sq, op=dist.ReduceOp.SUM, group=self.meshes.pp_group)
        return math.sqrt(float(stage_sq))

    @torch.no_grad()
    def sync_router_load(self) -> None:
        """Sum the aux-loss-free load counts over the expert-data-parallel replicas; the router's
        `stats_reducer` then sums over the EP group, so every rank updates its bias from the load of
        the whole global batch and all replicas keep identical biases."""
        loads = [load for load in (r.pending_load() for r in self.routers) if load is not None]
        if loads and self.meshes.layout.edp > 1:
            _all_reduce_mean(loads, self.meshes.edp_group, 1)
