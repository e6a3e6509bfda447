"""Collectives with autograd, optional asynchrony, and byte accounting, for the token dispatchers.

Each op is a `torch.autograd.Function` whose backward is the adjoint collective (all-to-all ->
reverse all-to-all, all-gather -> reduce-scatter and back). Forward ops can run asynchronously: they
return the output buffer and a `Handle`; the buffer is only valid after `Handle.wait()`, which is
what lets the MoE layer compute the shared expert while tokens are in flight. Backward runs
synchronously (the autograd engine needs its result at once). Every exchange goes through
parallel/emulated_links.py (timed; delayed under `parallel.emulate_links`).

`CommStats` counts the logical payload each rank sends to each peer (what the collective has to
deliver, independent of its algorithm), split by whether the peer is on the same node.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from parallel import emulated_links as links


# Plain (not emulated, not timed) single-tensor all-gather / reduce-scatter, for bookkeeping such as
# the step metrics; the runtime's own collectives go through `links` (parallel/emulated_links.py).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommStats:
    """Bytes this rank sent since the last `reset`, intra-node vs inter-node, and tokens received."""

    def __init__(self, rank: int, node_of: Callable[[int], int]):
        self.rank, self.node_of = rank, node_of
        self.reset()

    def reset(self) -> None:
        self.intra_bytes = 0
        self.inter_bytes = 0
        self.tokens_received = 0  # token copies delivered to this rank's experts (forward)

    def record(self, peers: list[int], bytes_per_peer: list[int]) -> None:
        me = self.node_of(self.rank)
        for peer, nbytes in zip(peers, bytes_per_peer):
            if peer == self.rank:
                continue  # a copy to oneself crosses no link
            if self.node_of(peer) == me:
                self.intra_bytes += int(nbytes)
            else:
                self.inter_bytes += int(nbytes)


@functools.lru_cache(maxsize=None)
def _ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def group_ranks(group: dist.ProcessGroup) -> list[int]:
    return list(_ranks(group))


def _record(stats: Optional[CommStats], group, rows_per_peer: list[int], x: Tensor) -> None:
    if stats is not None:
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        stats.record(group_ranks(group), [r * row_bytes for r in rows_per_peer])


class Handle:
    """An in-flight collective. `wait()` is idempotent; a synchronous op gives a finished handle."""

    def __init__(self, works: Optional[list] = None):
        self._works = works or []

    def wait(self) -> None:
        for work, _keepalive in self._works:
            work.wait()
        self._works = []


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats, box):
        ctx.group, ctx.stats, ctx.splits = group, stats, (out_splits, in_splits)
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _record(stats, group, in_splits, x)
        work = links.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=box is not None)
        if box is not None:
            box.append((work, x))  # keep the send buffer alive until the exchange finishes
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad = grad.contiguous()
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        _record(ctx.stats, ctx.group, out_splits, grad)
        links.all_to_all_single(grad_in, grad, in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, stats: Optional[CommStats] = None,
               async_op: bool = False) -> tuple[Tensor, Handle]:
    """Rows [sum(in_splits[:j]), +in_splits[j]) of x go to group rank j; the result holds what every
    rank sent here, in group-rank order. Gloo accepts uneven splits in this single-tensor form."""
    box: Optional[list] = [] if async_op else None
    out = _AllToAll.apply(x, list(out_splits), list(in_splits), group, stats, box)
    return out, Handle(box)


def exchange_counts(send_counts: Tensor, group, stats: Optional[CommStats] = None) -> Tensor:
    """send_counts [n, ...] int64 (row j for group rank j) -> what each rank sent here, [n, ...]."""
    send = send_counts.contiguous()
    recv = torch.empty_like(send)
    _record(stats, group, [1] * send.shape[0], send)
    links.all_to_all_single(recv, send, group=group, kind="counts")
    return recv


def all_gather_sizes(n: int, group, stats: Optional[CommStats] = None, device="cpu") -> list[int]:
    size = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)  # HCCL/NCCL take device tensors only
    out = torch.empty(size, dtype=torch.int64, device=device)
    _record(stats, group, [1] * size, mine)
    links.all_gather_single(out, mine, group=group)
    return out.tolist()


class _AllGatherPadded(torch.autograd.Function):
    """x [m, ...] on every rank (padded to the same m) -> [n * m, ...]; backward sums (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, rows, group, stats, box):
        ctx.group, ctx.stats = group, stats
        n = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))
        _record(stats, group, [rows] * n, x)  # the padding is not payload
        work = links.all_gather_single(out, x, group=group, async_op=box is not None)
        if box is not None:
            box.append((work, x))
        return out

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        grad_in = grad.new_empty((grad.shape[0] // n, *grad.shape[1:]))
        _record(ctx.stats, ctx.group, [grad_in.shape[0]] * n, grad)
        links.reduce_scatter_single(grad_in, grad, group=ctx.group)
        return grad_in, None, None, None, None


class _ReduceScatterPadded(torch.autograd.Function):
    """x [n * m, ...] -> the sum over ranks of chunk `rank`, [m, ...]; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, rows_per_peer, group, stats):
        ctx.group, ctx.stats, ctx.rows = group, stats, rows_per_peer
        n = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
        _record(stats, group, rows_per_peer, x)
        links.reduce_scatter_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        grad_in = grad.new_empty((n * grad.shape[0], *grad.shape[1:]))
        me = dist.get_rank(ctx.group)
        _record(ctx.stats, ctx.group, [ctx.rows[me]] * n, grad)
        links.all_gather_single(grad_in, grad, group=ctx.group)
        return grad_in, None, None, None


def _pad_rows(x: Tensor, m: int) -> Tensor:
    return x if x.shape[0] == m else torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])


def all_gather(x: Tensor, sizes: list[int], group, stats: Optional[CommStats] = None,
               async_op: bool = False) -> tuple[Tensor, Handle, Callable[[Tensor], Tensor]]:
    """Concatenate every rank's x (group rank r holds sizes[r] rows) along dim 0. Returns the padded
    buffer, its handle, and `unpad` to apply after `wait()` (identity when all sizes are equal)."""
    m = max(sizes)
    box: Optional[list] = [] if async_op else None
    out = _AllGatherPadded.apply(_pad_rows(x, m), x.shape[0], group, stats, box)
    if all(s == m for s in sizes):
        return out, Handle(box), lambda t: t
    keep = torch.cat([torch.arange(r * m, r * m + s) for r, s in enumerate(sizes)]).to(x.device)
    return out, Handle(box), lambda t: t.index_select(0, keep)


def reduce_scatter(x: Tensor, sizes: list[int], group, stats: Optional[CommStats] = None) -> Tensor:
    """x [sum(sizes), ...] on every rank -> the sum over ranks of this rank's chunk [sizes[me], ...]."""
    m = max(sizes)
    me = dist.get_rank(group)
    if any(s != m for s in sizes):
        x = torch.cat([_pad_rows(chunk, m) for chunk in x.split(sizes)])
    return _ReduceScatterPadded.apply(x, list(sizes), group, stats)[: sizes[me]]
