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

from moe.layer import MoELayer
from parallel import emulated_links as links
from parallel.mesh import Meshes


class FlatBuffers:
    """Flat buffers for reducing many gradients in one collective, kept from step to step: a fresh
    buffer of the model's size page-faults on every step (glibc hands large blocks back to the OS
    on free): 8.8 ms to flatten 19 MB of gradients into a new buffer on the 2-core VM, 0.95 ms into
    a kept one."""

    def __init__(self):
        self.bufs: dict = {}

    def pack(self, key, tensors: list[torch.Tensor]) -> torch.Tensor:
        n = sum(t.numel() for t in tensors)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() != n or buf.dtype != tensors[0].dtype or buf.device != tensors[0].device:
            buf = self.bufs[key] = torch.empty(n, dtype=tensors[0].dtype, device=tensors[0].device)
        torch.cat([t.reshape(-1) for t in tensors], out=buf)
        return buf

    @staticmethod
    def views(buf: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """`buf`'s pieces shaped like `tensors` (views: copy them out before the buffer's next use)."""
        return [v.view_as(t) for v, t in zip(buf.split([t.numel() for t in tensors]), tensors)]


def _all_reduce_mean(tensors: list[torch.Tensor], group, divisor: int, flats: FlatBuffers, key) -> None:
    """Sum `tensors` over `group` in one flat bucket (`flats`' buffer `key`) and divide by
    `divisor`, in place. A group of one rank needs no bucket: only the division."""
    if not tensors:
        return
    if dist.get_world_size(group) == 1:
        if divisor != 1:
            torch._foreach_div_(tensors, divisor)
        return
    flat = flats.pack(key, tensors)
    links.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(divisor)
    for t, reduced in zip(tensors, flats.views(flat, tensors)):
        t.copy_(reduced)


class _GradBuckets:
    """Overlapped reduction (`parallel.grad_bucket_mb`): `params` in buckets of about `bucket_bytes`,
    in reverse order (the order backward produces their gradients). A post-accumulate-grad hook
    counts each parameter's gradients; when every parameter of the next bucket has all
    `micro_batches` of them, its flat copy is all-reduced asynchronously while backward goes on.
    Buckets start strictly in index order, so every rank issues the same collectives in the same
    order even when gradients arrive in a different order. `finish` starts the rest (a parameter
    without a gradient counts as zero), waits, divides and copies the sums back."""

    def __init__(self, params: list[nn.Parameter], group, divisor: int, bucket_bytes: int):
        self.group, self.divisor, self.micro_batches = group, divisor, 1
        self.flats = FlatBuffers()
        self.buckets: list[list[nn.Parameter]] = []
        current, size = [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self._reset()

    def _reset(self) -> None:
        self.seen: dict[int, int] = {}
        self.missing = [len(b) for b in self.buckets]
        self.next = 0
        self.inflight: list[tuple[list[nn.Parameter], torch.Tensor, object]] = []

    def _on_grad(self, p: nn.Parameter) -> None:
        n = self.seen.get(id(p), 0) + 1
        self.seen[id(p)] = n
        if n > self.micro_batches:  # its bucket may already be on the wire without this gradient
            raise RuntimeError(f"parallel.grad_bucket_mb: a gradient accumulated over more than the "
                               f"{self.micro_batches} micro-batch(es) the reducer expects; pass train.grad_accum "
                               f"to ParallelRuntime.attach_pipeline (the trainer does) or set grad_bucket_mb: 0")
        if n == self.micro_batches:
            self.missing[self.bucket_of[id(p)]] -= 1
            self._start(force=False)

    def _start(self, force: bool) -> None:
        while self.next < len(self.buckets) and (force or self.missing[self.next] == 0):
            params = self.buckets[self.next]
            flat = self.flats.pack(self.next, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            work = (links.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                    if dist.get_world_size(self.group) > 1 else None)
            self.inflight.append((params, flat, work))
            self.next += 1

    def start_rest(self) -> None:
        self._start(force=True)

    def finish(self) -> None:
        self.start_rest()
        for params, flat, work in self.inflight:
            if work is not None:
                work.wait()
            flat.div_(self.divisor)
            for p, reduced in zip(params, self.flats.views(flat, params)):
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
        self._reset()


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
                 shared_embedding: Optional[nn.Parameter] = None, embedding_counted: bool = True,
                 bucket_bytes: int = 0):
        """`shared_embedding`: this pipeline rank's embedding when the first and last stages both
        hold it (its gradient is summed over `meshes.embedding_group`); `embedding_counted`: False
        on the last stage, whose copy the global norm leaves out. `bucket_bytes` > 0: reduce
        dense and expert gradients during backward in buckets of that size (`_GradBuckets`);
        not under a pipeline, whose schedule rescales the gradients after backward."""
        self.meshes = meshes
        self.flats = FlatBuffers()  # kept bucket buffers of the blocking reduction
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
        uncounted = shared_embedding if not embedding_counted else None  # left out of the norm
        self.replicated = [p for p in self.dense if id(p) not in split_ids and p is not uncounted]
        self.split_counted = [p for p in self.tp_split if p is not uncounted]  # vocab-parallel copy
        self.routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
        first = next(model.parameters(), None)  # a pipeline stage of no-op layers holds none
        self.device = first.device if first is not None else torch.device("cpu")
        self.buckets: list[_GradBuckets] = []
        if bucket_bytes > 0 and meshes.layout.pp == 1:
            partial_ids = {id(p) for p in self.tp_partial}  # summed over TP first: after backward
            overlapped = [p for p in self.dense if id(p) not in partial_ids]
            self.buckets = [_GradBuckets(ps, g, meshes.layout.dp, bucket_bytes) for ps, g in
                            ((overlapped, meshes.dp_group), (self.expert, meshes.edp_group)) if ps]

    def set_micro_batches(self, n: int) -> None:
        """Backward passes that accumulate into the gradients of one step (train.grad_accum)."""
        for b in self.buckets:
            b.micro_batches = n

    def __call__(self, params=None, max_norm: float = 0.0) -> float:
        # `params` (what train_step saw with a gradient) is ignored: the reducer's own fixed list
        # keeps the buckets aligned across ranks. A parameter without a gradient counts as zero.
        if self.buckets:
            self._reduce_overlapped()
        else:
            self._reduce_blocking()
        norm = self.global_norm()
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))  # the formula of torch.nn.utils.clip_grad_norm_
            if coef < 1.0:
                for p in self.dense + self.expert:
                    p.grad.mul_(coef)
        self.sync_router_load()
        return norm

    def _reduce_blocking(self) -> None:
        layout = self.meshes.layout
        for p in self.dense + self.expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if layout.tp > 1:
            _all_reduce_mean([p.grad for p in self.tp_partial], self.meshes.tp_group, 1, self.flats, "tp_partial")
        if self.shared_embedding is not None:
            links.all_reduce(self.shared_embedding.grad, op=dist.ReduceOp.SUM, group=self.meshes.embedding_group)
        _all_reduce_mean([p.grad for p in self.dense], self.meshes.dp_group, layout.dp, self.flats, "dense")
        _all_reduce_mean([p.grad for p in self.expert], self.meshes.edp_group, layout.dp, self.flats, "expert")

    def _reduce_overlapped(self) -> None:
        layout = self.meshes.layout
        for b in self.buckets:  # same order on every rank: the buckets, then the TP-partial ones
            b.start_rest()
        for p in self.tp_partial:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.tp_partial:
            _all_reduce_mean([p.grad for p in self.tp_partial], self.meshes.tp_group, 1, self.flats, "tp_partial")
            _all_reduce_mean([p.grad for p in self.tp_partial], self.meshes.dp_group, layout.dp, self.flats, "tp_partial")
        for b in self.buckets:
            b.finish()

    def global_norm(self) -> float:
        device = self.device

        def sq(params):  # fp32 on the device: HCCL reduces neither fp64 nor host tensors
            if not params:
                return torch.zeros((), device=device)
            return torch.stack([p.grad.detach().float().norm() for p in params]).pow(2).sum()
        layout = self.meshes.layout
        expert_sq = sq(self.expert)
        if layout.ep > 1:
            links.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=self.meshes.ep_group)
        if layout.etp > 1:
            links.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=self.meshes.etp_group)
        split_sq = sq(self.split_counted)
        if layout.tp > 1:
            links.all_reduce(split_sq, op=dist.ReduceOp.SUM, group=self.meshes.tp_group)
        if layout.pp == 1:
            return math.sqrt(float(sq(self.replicated)) + float(split_sq) + float(expert_sq))
        stage_sq = sq(self.replicated) + split_sq + expert_sq  # identical on every rank of the stage
        links.all_reduce(stage_sq, op=dist.ReduceOp.SUM, group=self.meshes.pp_group)
        return math.sqrt(float(stage_sq))

    @torch.no_grad()
    def sync_router_load(self) -> None:
        """Sum the aux-loss-free load counts over the expert-data-parallel replicas; the router's
        `stats_reducer` then sums over the EP group, so every rank updates its bias from the load of
        the whole global batch and all replicas keep identical biases."""
        loads = [load for load in (r.pending_load() for r in self.routers) if load is not None]
        if loads and self.meshes.layout.edp > 1:
            _all_reduce_mean(loads, self.meshes.edp_group, 1, self.flats, "router_load")
