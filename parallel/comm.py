"""Collectives with autograd, optional asynchrony, and byte accounting, for the token dispatchers.

Each op is a `torch.autograd.Function` whose backward is the adjoint collective (all-to-all ->
reverse all-to-all, all-gather -> reduce-scatter and back). An asynchronous op (`async_op=True`)
returns an `Inflight`: the exchange has started, and `Inflight.wait()` gives its result. It is
split into two autograd nodes, so the backward is asynchronous too: the node `wait()` creates
starts the adjoint exchange in backward and returns at once, and the node made at the start waits
for it. Whatever the forward computed between start and wait (the shared expert) is newer than
the start node, so the autograd engine (newest ready node first) runs its backward while the
adjoint exchange is in flight. Every exchange goes through parallel/emulated_links.py (timed;
delayed under `parallel.emulate_links`).

`CommStats` counts the logical payload each rank sends to each peer (what the collective has to
deliver, independent of its algorithm), split by whether the peer is on the same node.
"""
from __future__ import annotations

import functools
import math
import threading
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
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.intra_bytes = 0
        self.inter_bytes = 0
        self.tokens_received = 0  # token copies delivered to this rank's experts (forward)

    def record(self, peers: list[int], bytes_per_peer: list[int]) -> None:
        me = self.node_of(self.rank)
        intra = inter = 0
        for peer, nbytes in zip(peers, bytes_per_peer):
            if peer == self.rank:
                continue  # a copy to oneself crosses no link
            if self.node_of(peer) == me:
                intra += int(nbytes)
            else:
                inter += int(nbytes)
        with self._lock:  # a backward lane (parallel/lanes.py) records from its own thread
            self.intra_bytes += intra
            self.inter_bytes += inter

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens_received += int(n)


@functools.lru_cache(maxsize=None)
def _ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def group_ranks(group: dist.ProcessGroup) -> list[int]:
    return list(_ranks(group))


def _record(stats: Optional[CommStats], group, rows_per_peer: list[int], x: Tensor) -> None:
    if stats is not None:
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        stats.record(group_ranks(group), [r * row_bytes for r in rows_per_peer])


class _Exchange:
    """One collective split into start and wait in both directions: `run(x)` and `adjoint(grad)`
    start the forward and the backward exchange and return (output buffer, work)."""

    def __init__(self, run: Callable, adjoint: Callable):
        self.run, self.adjoint = run, adjoint
        self.work = self.keep = self.grad_in = None


class _Begin(torch.autograd.Function):
    """Forward: start the exchange. Backward: wait for the adjoint exchange `_End` started."""

    @staticmethod
    def forward(ctx, x, ex: _Exchange):
        ctx.ex = ex
        x = x.contiguous()
        out, ex.work = ex.run(x)
        ex.keep = x  # the send buffer lives until the exchange finishes
        return out

    @staticmethod
    def backward(ctx, _passed):
        ex = ctx.ex
        ex.work.wait()
        grad_in, ex.grad_in, ex.work, ex.keep = ex.grad_in, None, None, None
        return grad_in, None


class _End(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: start the adjoint exchange and return at once (the
    gradient passes through unchanged; `_Begin` returns the exchanged one)."""

    @staticmethod
    def forward(ctx, out, ex: _Exchange):
        ctx.ex = ex
        ex.work.wait()
        ex.work = ex.keep = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.ex
        grad = grad.contiguous()
        ex.grad_in, ex.work = ex.adjoint(grad)
        ex.keep = grad
        return grad, None


class Inflight:
    """A started exchange; `wait()` (idempotent) gives its result."""

    def __init__(self, out: Tensor, ex: Optional[_Exchange] = None, finish: Callable = lambda t: t):
        self._out, self._ex, self._finish, self._result = out, ex, finish, None

    @property
    def asynchronous(self) -> bool:
        """Whether the exchange was started without waiting for it."""
        return self._ex is not None

    def wait(self) -> Tensor:
        if self._result is None:
            out = _End.apply(self._out, self._ex) if self._ex is not None else self._out
            self._result = self._finish(out)
        return self._result


def _start(x: Tensor, run: Callable, adjoint: Callable, finish: Callable = lambda t: t) -> Inflight:
    ex = _Exchange(run, adjoint)
    return Inflight(_Begin.apply(x, ex), ex, finish)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):
        ctx.group, ctx.stats, ctx.splits = group, stats, (out_splits, in_splits)
        return _a2a(x.contiguous(), out_splits, in_splits, group, stats, False)[0]

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad.contiguous(), in_splits, out_splits, ctx.group, ctx.stats, False)[0], None, None, None, None


def _a2a(x: Tensor, out_splits, in_splits, group, stats, async_op: bool):
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    _record(stats, group, in_splits, x)
    return out, links.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=async_op)


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, stats: Optional[CommStats] = None,
               async_op: bool = False):
    """Rows [sum(in_splits[:j]), +in_splits[j]) of x go to group rank j; the result holds what every
    rank sent here, in group-rank order. Gloo accepts uneven splits in this single-tensor form.
    Synchronous: the result tensor; `async_op`: an `Inflight` (forward and backward overlap)."""
    out_splits, in_splits = list(out_splits), list(in_splits)
    if not async_op:
        return _AllToAll.apply(x, out_splits, in_splits, group, stats)
    return _start(x, lambda t: _a2a(t, out_splits, in_splits, group, stats, True),
                  lambda g: _a2a(g, in_splits, out_splits, group, stats, True))


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


def _ag(x: Tensor, rows: int, group, stats, async_op: bool):
    """x [m, ...] (padded to the same m on every rank) -> [n * m, ...]; `rows` of m are payload."""
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    _record(stats, group, [rows] * n, x)
    return out, links.all_gather_single(out, x, group=group, async_op=async_op)


def _rs(x: Tensor, rows_per_peer: list[int], group, stats, async_op: bool):
    """x [n * m, ...] -> the sum over ranks of chunk `rank`, [m, ...]."""
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    _record(stats, group, rows_per_peer, x)
    return out, links.reduce_scatter_single(out, x, group=group, async_op=async_op)


class _AllGatherPadded(torch.autograd.Function):
    """All-gather of padded rows; backward sums (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, rows, group, stats):
        ctx.group, ctx.stats = group, stats
        return _ag(x.contiguous(), rows, group, stats, False)[0]

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        return _rs(grad.contiguous(), [grad.shape[0] // n] * n, ctx.group, ctx.stats, False)[0], None, None, None


class _ReduceScatterPadded(torch.autograd.Function):
    """Reduce-scatter of padded chunks; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, rows_per_peer, group, stats):
        ctx.group, ctx.stats, ctx.rows = group, stats, rows_per_peer
        return _rs(x.contiguous(), rows_per_peer, group, stats, False)[0]

    @staticmethod
    def backward(ctx, grad):
        rows = ctx.rows[dist.get_rank(ctx.group)]
        return _ag(grad.contiguous(), rows, ctx.group, ctx.stats, False)[0], None, None, None


def _pad_rows(x: Tensor, m: int) -> Tensor:
    return x if x.shape[0] == m else torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])


def all_gather(x: Tensor, sizes: list[int], group, stats: Optional[CommStats] = None, async_op: bool = False):
    """Concatenate every rank's x (group rank r holds sizes[r] rows) along dim 0. Synchronous: the
    result; `async_op`: an `Inflight` whose `wait()` gives it."""
    m = max(sizes)
    n, rows = len(sizes), x.shape[0]
    if all(s == m for s in sizes):
        unpad = lambda t: t  # noqa: E731
    else:
        keep = torch.cat([torch.arange(r * m, r * m + s) for r, s in enumerate(sizes)]).to(x.device)
        unpad = lambda t: t.index_select(0, keep)  # noqa: E731
    x = _pad_rows(x, m)
    if not async_op:
        return unpad(_AllGatherPadded.apply(x, rows, group, stats))
    return _start(x, lambda t: _ag(t, rows, group, stats, True),
                  lambda g: _rs(g, [m] * n, group, stats, True), finish=unpad)


def reduce_scatter(x: Tensor, sizes: list[int], group, stats: Optional[CommStats] = None, async_op: bool = False):
    """x [sum(sizes), ...] on every rank -> the sum over ranks of this rank's chunk [sizes[me], ...].
    Synchronous: the result; `async_op`: an `Inflight` whose `wait()` gives it."""
    m = max(sizes)
    me = dist.get_rank(group)
    if any(s != m for s in sizes):
        x = torch.cat([_pad_rows(chunk, m) for chunk in x.split(sizes)])
    mine = sizes[me]
    if not async_op:
        return _ReduceScatterPadded.apply(x, list(sizes), group, stats)[:mine]
    return _start(x, lambda t: _rs(t, list(sizes), group, stats, True),
                  lambda g: _ag(g, mine, group, stats, True), finish=lambda t: t[:mine])
