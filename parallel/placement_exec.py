"""Expert placement executor: route through the expert -> slot map, and move experts between EP ranks.

Every dispatcher sends a token copy to the rank that owns its *slot* index (rank = slot // slots per
rank: the contiguous split of parallel/dispatchers.py). `PlacedDispatcher` wraps a layer's
dispatcher (outermost, around any TP wrapper) and rewrites logical expert ids into slots through
`slot_of_expert` before dispatching, so alltoall, allgather and hierarchical all work unchanged; the
router, its bias and its load counts stay in logical expert ids. A layer's local expert stacks hold
the experts of its slots in slot order.

`migrate_layer` moves whole experts to their new slots with one `all_to_all_single` per layer over
the EP group (uneven splits: gloo rejects the uneven list form): each expert's row packs its three
weight stacks and every tensor shaped like them that must follow it (its gradient, Adam moments;
under ZeRO-1 the fp32 master and moments, first gathered over the expert-data-parallel group by
`ZeroCompanions` and re-sliced after). Replicas of an EP group (edp) run the same plan from the same
all-reduced loads, so they stay replicas.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel import emulated_links as links
from parallel.expert_parallel import EXPERT_WEIGHTS


class PlacedDispatcher:
    """A dispatcher whose routing decisions are logical expert ids; the inner one sees slots."""

    def __init__(self, inner, num_experts: int):
        self.inner = inner
        self.num_local_experts = inner.num_local_experts
        self.slot_of_expert = torch.arange(num_experts)

    def set_table(self, expert_at_slot: Tensor) -> None:
        inverse = torch.empty_like(expert_at_slot)
        inverse[expert_at_slot] = torch.arange(expert_at_slot.numel())
        self.slot_of_expert = inverse

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor):
        table = self.slot_of_expert.to(expert_idx_TK.device)
        slots_TK = torch.where(expert_idx_TK >= 0, table[expert_idx_TK.clamp(min=0)], expert_idx_TK)
        return self.inner.dispatch(x_TD, slots_TK, weights_TK)

    def combine_start(self, y_ND: Tensor, pending):
        return self.inner.combine_start(y_ND, pending)

    def combine(self, y_ND: Tensor, pending) -> Tensor:
        return self.combine_start(y_ND, pending).wait()


def _plan_exchange(old: Tensor, new: Tensor, rank: int, size: int):
    """What this rank sends (local rows of the old slots, grouped by destination rank) and where
    the received rows go (local new slots, in arrival order: by source rank, then by slot)."""
    per = old.numel() // size
    old_slot = torch.empty_like(old)
    old_slot[old] = torch.arange(old.numel())
    send_rows, in_splits = [], [0] * size
    for s in range(new.numel()):  # ascending slots: grouped by destination, as all_to_all wants
        o = int(old_slot[new[s]])
        if o // per == rank:
            send_rows.append(o - rank * per)
            in_splits[s // per] += 1
    mine = range(rank * per, (rank + 1) * per)
    src = {s: int(old_slot[new[s]]) // per for s in mine}
    recv_slots = [s - rank * per for s in sorted(mine, key=lambda s: (src[s], s))]
    out_splits = [sum(1 for s in mine if src[s] == r) for r in range(size)]
    return send_rows, in_splits, recv_slots, out_splits


@torch.no_grad()
def migrate_layer(stacks: list[Tensor], old: Tensor, new: Tensor, group) -> int:
    """Move rows of every [slots_per_rank, ...] tensor in `stacks` (all following the same experts)
    from placement `old` to `new` over the EP `group`, in place. Returns bytes sent to other ranks."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    send_rows, in_splits, recv_slots, out_splits = _plan_exchange(old, new, rank, size)
    common = torch.promote_types(torch.float32, stacks[0].dtype)
    for t in stacks[1:]:
        common = torch.promote_types(common, t.dtype)
    widths = [t[0].numel() for t in stacks]
    rows = torch.tensor(send_rows, dtype=torch.long)
    send = torch.cat([t.detach().index_select(0, rows.to(t.device)).reshape(len(send_rows), -1).to(common)
                      for t in stacks], dim=1) if send_rows else stacks[0].new_zeros((0, sum(widths)), dtype=common)
    recv = send.new_empty((sum(out_splits), sum(widths)))
    links.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=group, kind="placement")
    dst = torch.tensor(recv_slots, dtype=torch.long)
    offset = 0
    for t, w in zip(stacks, widths):
        t.index_copy_(0, dst.to(t.device), recv[:, offset:offset + w].reshape(-1, *t.shape[1:]).to(t.dtype))
        offset += w
    row_bytes = recv.element_size() * recv.shape[1]
    return row_bytes * sum(n for r, n in enumerate(in_splits) if r != rank)


def plain_companions(optimizer) -> Callable[[nn.Parameter], list[Tensor]]:
    """Tensors that follow a parameter's experts under an unsharded torch optimizer: its gradient and
    every per-element optimizer state (AdamW's exp_avg, exp_avg_sq; 0-dim `step` stays)."""
    def follow(p: nn.Parameter) -> list[Tensor]:
        state = optimizer.state.get(p, {})
        out = [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]
        return out + ([p.grad] if p.grad is not None else [])
    return follow


class ZeroCompanions:
    """ZeRO-1's fp32 masters and moments of the expert buckets, gathered whole over the edp group
    for a migration (`follow(p)`: views shaped like p) and sliced back into the shards by `finish`."""

    def __init__(self, optimizer, expert_params: set[int]):
        self.optimizer = optimizer
        self.views: dict[int, list[Tensor]] = {}
        self.full: list[tuple[object, dict[str, Tensor]]] = []
        for b in optimizer.buckets:
            if not any(id(p) in expert_params for p in b.params):
                continue
            tensors = {"master": b.shard.data}
            tensors.update({k: v for k, v in optimizer.inner.state.get(b.shard, {}).items() if torch.is_tensor(v) and v.dim()})
            gathered = {k: self._gather(b, v) for k, v in tensors.items()}
            self.full.append((b, gathered))
            offset = 0
            for p in b.params:
                self.views[id(p)] = [g[offset:offset + p.numel()].view_as(p) for g in gathered.values()]
                offset += p.numel()

    @staticmethod
    def _gather(bucket, shard: Tensor) -> Tensor:
        padded = shard.new_zeros(bucket.shard_len)
        padded[: bucket.hi - bucket.lo] = shard
        full = padded.new_empty(bucket.size * bucket.shard_len)
        links.all_gather_single(full, padded, group=bucket.group)
        return full[: bucket.numel]

    def follow(self, p: nn.Parameter) -> list[Tensor]:
        return self.views.get(id(p), []) + ([p.grad] if p.grad is not None else [])

    @torch.no_grad()
    def finish(self) -> None:
        for b, gathered in self.full:
            state = self.optimizer.inner.state.get(b.shard, {})
            for k, g in gathered.items():
                (b.shard.data if k == "master" else state[k]).copy_(g[b.lo:b.hi])


def migrate_layers(layers: Iterable, olds: list[Tensor], news: list[Optional[Tensor]], group, optimizer,
                   expert_params: set[int]) -> tuple[int, float]:
    """Migrate each layer whose `news` entry is a table; returns (bytes sent, seconds)."""
    start = time.perf_counter()
    zero = ZeroCompanions(optimizer, expert_params) if hasattr(optimizer, "buckets") else None
    follow = zero.follow if zero is not None else plain_companions(optimizer)
    sent = 0
    for layer, old, new in zip(layers, olds, news):
        if new is None:
            continue
        params = [getattr(layer.experts, w) for w in EXPERT_WEIGHTS]
        stacks = [p.data for p in params] + [t for p in params for t in follow(p)]
        sent += migrate_layer(stacks, old, new, group)
        layer.dispatcher.set_table(new)
    if zero is not None:
        zero.finish()
    return sent, time.perf_counter() - start
