"""ZeRO-1: a distributed optimizer that keeps 1/n of the optimizer state on each data-parallel rank.

`ZeroOptimizer` wraps an optimizer built over the full model (e.g. launch.train.build_optimizer's
AdamW, before its first step) and replaces it by the same optimizer class over flat shards: for each
parameter group, the dense parameters are flattened and split over the dp group, the expert
parameters over the edp group (their replicas). A step copies this rank's slice of the (already
averaged and clipped) gradients into its shard, steps the inner optimizer there, and all-gathers the
updated shards back into the parameters. AdamW is element-wise, so this is the same update as the
unsharded optimizer, with the moments stored once per replica group instead of on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from parallel import emulated_links as links
from parallel.mesh import Meshes


class _Bucket:
    """The parameters of one (param group, replica group) pair, viewed as one flat vector split
    into equal shards (the last padded) over the replica group."""

    def __init__(self, params: list[nn.Parameter], group):
        self.params, self.group = params, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel = sum(p.numel() for p in params)
        self.shard_len = math.ceil(self.numel / self.size)
        self.lo = min(self.numel, self.rank * self.shard_len)
        self.hi = min(self.numel, self.lo + self.shard_len)
        self.shard = nn.Parameter(self._gather_slice([p.detach() for p in params]).float())

    def overlaps(self) -> Iterator[tuple[int, int, int, int]]:
        """(i, start, end, shard_pos) for each parameter i overlapping this rank's shard: elements
        [start, end) of its flat view are shard elements [shard_pos, shard_pos + end - start)."""
        offset = 0
        for i, p in enumerate(self.params):
            a, b = max(self.lo, offset), min(self.hi, offset + p.numel())
            if a < b:
                yield i, a - offset, b - offset, a - self.lo
            offset += p.numel()

    def _gather_slice(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Elements [lo, hi) of the concatenation of `tensors` (shaped as `params`), without
        flattening all of them."""
        parts = [tensors[i].reshape(-1)[a:b] for i, a, b, _ in self.overlaps()]
        if not parts:
            return tensors[0].new_zeros(0)
        return torch.cat(parts).clone()

    @torch.no_grad()
    def refresh_shard(self) -> None:
        """Copy this rank's slice of the parameters into the fp32 shard (after they were loaded)."""
        self.shard.data.copy_(self._gather_slice([p.detach() for p in self.params]))

    def load_grad(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.shard.grad = self._gather_slice(grads).float()

    @torch.no_grad()
    def publish(self) -> None:
        padded = self.shard.new_zeros(self.shard_len)
        padded[: self.hi - self.lo] = self.shard
        full = padded.new_empty(self.size * self.shard_len)
        links.all_gather_single(full, padded, group=self.group)
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


@dataclass
class ShardState:
    """One bucket's optimizer state on this rank, for checkpoints."""

    params: list[nn.Parameter]  # every parameter of the bucket: each shares the `scalars`
    scalars: dict[str, torch.Tensor]  # 0-dim state (AdamW's step), one per bucket
    # (param, start, end, per-element state): elements [start, end) of the parameter's flat view,
    # each state as the 1-D view of the shard's state that holds them
    pieces: list[tuple[nn.Parameter, int, int, dict[str, torch.Tensor]]] = field(default_factory=list)


class ZeroOptimizer:
    """Drop-in for the wrapped optimizer in the training loop: `param_groups` (set the lr there),
    `step()`, `zero_grad()`. For checkpoints, `state_blocks()` says which piece of which parameter
    each of this rank's optimizer states holds, `reload_shards()` refills the fp32 shards after the
    parameters were loaded, and `inner` is the torch optimizer over the shards."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, meshes: Meshes,
                 expert_param_names: list[str]):
        if optimizer.state:
            raise ValueError("ZeroOptimizer: wrap the optimizer before its first step (its state would be lost)")
        expert = {id(p) for n, p in model.named_parameters() if n in set(expert_param_names)}
        self.buckets: list[_Bucket] = []
        inner_groups = []
        for g in optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            for is_expert, group in ((False, meshes.dp_group), (True, meshes.edp_group)):
                params = [p for p in g["params"] if (id(p) in expert) == is_expert]
                if params:
                    bucket = _Bucket(params, group)
                    self.buckets.append(bucket)
                    inner_groups.append({"params": [bucket.shard], **hyper})
        self.inner = type(optimizer)(inner_groups)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self) -> None:
        for b in self.buckets:
            b.load_grad()
        self.inner.step()
        for b in self.buckets:
            b.publish()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.shard.grad = None
            for p in b.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_blocks(self) -> list[ShardState]:
        """This rank's optimizer state, bucket by bucket, as pieces of the parameters it covers
        (views of the live state: loading into them restores it). Call after the state exists."""
        out = []
        for b in self.buckets:
            state = self.inner.state[b.shard]
            for k, v in state.items():
                if not torch.is_tensor(v):
                    raise TypeError(f"optimizer state {k!r} is a {type(v).__name__}; only tensors are checkpointed")
            pieces = [(b.params[i], lo, hi, {k: v[pos:pos + hi - lo] for k, v in state.items() if v.dim()})
                      for i, lo, hi, pos in b.overlaps()]
            out.append(ShardState(list(b.params), {k: v for k, v in state.items() if not v.dim()}, pieces))
        return out

    @torch.no_grad()
    def reload_shards(self) -> None:
        """After the parameters were loaded (a checkpoint): refill the fp32 shards from them."""
        for b in self.buckets:
            b.refresh_shard()

    def state_numel(self) -> int:
        """Optimizer-state elements held by this rank (what ZeRO-1 divides)."""
        return sum(t.numel() for s in self.inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
