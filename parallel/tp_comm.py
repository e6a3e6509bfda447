"""The four autograd collectives of tensor parallelism (Megatron's "mappings"), over the TP group.

Inside a TP group every rank holds the same activations outside the sharded regions, and every rank
runs backward from the same loss, so a gradient arriving at a region's output is identical on all
TP ranks. That fixes the adjoints:

- `copy_to_tp` ("f", at a region's input): identity forward; backward sums the ranks' partial input
  gradients (each rank's shard saw the input through different weights).
- `reduce_from_tp` ("g", at a region's output): sums the ranks' partial outputs; backward is the
  identity (the output gradient is already the same on every rank).
- `split_to_tp`: keep this rank's slice of the rows; backward all-gathers the slices' gradients, so
  the replicated input gets the whole gradient on every rank.
- `gather_from_tp`: concatenate every rank's rows; backward keeps this rank's slice (the gradient of
  the replicated output is the same everywhere, so nothing is summed).

Row slices may be uneven (`split_sizes`): the all-gather pads to the largest and drops the padding.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from parallel import emulated_links as links


def split_sizes(rows: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first rows % parts slices get one row more."""
    return [rows // parts + (1 if i < rows % parts else 0) for i in range(parts)]


def _gather_rows(x: Tensor, sizes: list[int], group) -> Tensor:
    m = max(sizes)
    x = x.contiguous()
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * m, *x.shape[1:]))
    links.all_gather_single(out, x, group=group)
    if all(s == m for s in sizes):
        return out
    return torch.cat([out[r * m:r * m + s] for r, s in enumerate(sizes)])


def _own_rows(x: Tensor, sizes: list[int], rank: int) -> Tensor:
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]]


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        links.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        links.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.sizes = split_sizes(x.shape[0], dist.get_world_size(group))
        return _own_rows(x, ctx.sizes, dist.get_rank(group)).clone()

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.sizes, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.rank = sizes, dist.get_rank(group)
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_rows(grad, ctx.sizes, ctx.rank).contiguous(), None, None


def copy_to_tp(x: Tensor, group) -> Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return _ReduceFromTP.apply(x, group)


def split_to_tp(x: Tensor, group) -> Tensor:
    """Rows of this TP rank's slice (split_sizes(rows, tp)); differentiable when x is."""
    if not x.requires_grad:  # routing indices: a plain slice, no collective in backward
        sizes = split_sizes(x.shape[0], dist.get_world_size(group))
        return _own_rows(x, sizes, dist.get_rank(group))
    return _SplitToTP.apply(x, group)


def gather_from_tp(x: Tensor, total_rows: int, group) -> Tensor:
    """Inverse of split_to_tp: every rank's slice, concatenated in TP-rank order (total_rows rows)."""
    return _GatherFromTP.apply(x, split_sizes(total_rows, dist.get_world_size(group)), group)
