"""Token dispatchers for expert parallelism: all-gather, all-to-all and hierarchical all-to-all.

All implement `moe.dispatch.TokenDispatcher`: `dispatch` permutes locally and starts the exchange
(asynchronously when `overlap` is on) and returns a pending handle; `wait()` finishes the exchange and
yields this rank's tokens grouped by local expert; `combine_start` sends expert outputs back and
`wait()` on what it returns sums each token's weighted copies. Gradients flow through every exchange
(parallel/comm.py), so the routing weights and the expert inputs get exactly the single-device
gradients; with `overlap` each exchange's backward is asynchronous as well, and the work the MoE
layer did between start and wait (the shared expert) runs in backward while it is in flight.

Experts are split in order: EP rank r of the group holds experts [r * El, (r + 1) * El).

With tensor parallelism (tp > 1) every rank of a TP group holds the same tokens and routing, and
one of two wrappers goes around the EP dispatcher (with sequence parallelism each TP rank routes its
own tokens instead: expert TP gathers them over TP first, `SequenceExpertTPDispatcher`, and
TP-extend-EP needs no wrapper):
- `ExpertTPDispatcher` (expert tensor parallelism, etp = tp): each TP rank dispatches all tokens
  within its EP group (the ranks of the same TP index) to experts holding its 1/tp of the FFN width;
  partial outputs are summed over TP after combine. Inputs and routing weights enter through f
  (identity forward, gradient summed over TP), the output leaves through g (sum forward).
- `TokenSplitDispatcher` (TP-extend-EP, etp = 1): the EP group spans ep x tp ranks with whole
  experts, so TP rank r dispatches only its slice r of the tokens (no expert work is repeated)
  and the combined slices are all-gathered back over TP.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moe.dispatch import Combining, LocalDispatcher, Then
from parallel.comm import (CommStats, Inflight, all_gather, all_gather_sizes, all_to_all, exchange_counts,
                           reduce_scatter)
from parallel.config import DISPATCHERS
from parallel.sequence_parallel import gather_rows, scatter_rows
from parallel.tp_comm import copy_to_tp, gather_from_tp, reduce_from_tp, split_to_tp


def chunk_permutation(counts_SE: Tensor) -> Tensor:
    """Row order that turns source-major chunks (s, e) of sizes counts_SE[s, e] into expert-major
    (e, s) order: y = x[perm]."""
    s, e = counts_SE.shape
    flat = counts_SE.reshape(-1)
    src_start = torch.cumsum(flat, 0) - flat
    order = torch.arange(s * e).view(s, e).t().reshape(-1)
    lens = flat[order]
    dst_start = torch.cumsum(lens, 0) - lens
    total = int(lens.sum())
    return torch.arange(total) + torch.repeat_interleave(src_start[order] - dst_start, lens, output_size=total)


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _started(x, async_op: bool) -> Inflight:
    """A collective's result as an Inflight, whether it ran asynchronously or not."""
    return x if async_op else Inflight(x)


class _A2APending:
    def __init__(self, recv: Inflight, recv_SE: Tensor, state, weights_TK: Tensor,
                 in_splits: list[int], out_splits: list[int]):
        self.recv, self.recv_SE, self.state, self.weights_TK = recv, recv_SE, state, weights_TK
        self.in_splits, self.out_splits = in_splits, out_splits
        self.perm: Optional[Tensor] = None
        self._result = None

    def wait(self) -> tuple[Tensor, Tensor]:
        if self._result is None:
            x = self.recv.wait()
            if self.recv_SE.shape[1] > 1:  # group the received chunks by local expert
                self.perm = chunk_permutation(self.recv_SE).to(x.device)
                x = x.index_select(0, self.perm)
            self._result = (x, self.recv_SE.sum(0))
        return self._result


class AllToAllDispatcher(Combining):
    """Permute by expert (which orders copies by destination rank), exchange counts, then one
    all_to_all_single with split sizes; the receiver regroups (source, expert) chunks by expert."""

    def __init__(self, kernels, num_experts: int, group, stats: Optional[CommStats] = None, overlap: bool = True):
        self.kernels, self.group, self.stats, self.overlap = kernels, group, stats, overlap
        self.size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.size

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor) -> _A2APending:
        x_ND, counts_E, state = self.kernels.permute(x_TD, expert_idx_TK, self.num_experts)
        send_SE = counts_E.view(self.size, self.num_local_experts)
        recv_SE = exchange_counts(send_SE.to(x_TD.device), self.group, self.stats).cpu()
        in_splits, out_splits = send_SE.sum(1).tolist(), recv_SE.sum(1).tolist()
        recv = all_to_all(x_ND, out_splits, in_splits, self.group, self.stats, async_op=self.overlap)
        if self.stats is not None:
            self.stats.add_tokens(sum(out_splits))
        return _A2APending(_started(recv, self.overlap), recv_SE, state, weights_TK, in_splits, out_splits)

    def combine_start(self, y_ND: Tensor, pending: _A2APending) -> Then:
        if pending.perm is not None:
            y_ND = y_ND.index_select(0, _inverse(pending.perm))
        back = all_to_all(y_ND, pending.in_splits, pending.out_splits, self.group, self.stats, async_op=self.overlap)
        return Then(_started(back, self.overlap), lambda t: self.kernels.unpermute(t, pending.state, pending.weights_TK))


class _AGPending:
    def __init__(self, dispatcher: "AllGatherDispatcher", sizes, gathered: list[Inflight]):
        self.d, self.sizes, self.gathered = dispatcher, sizes, gathered
        self._result = None

    def wait(self) -> tuple[Tensor, Tensor]:
        if self._result is None:
            x_all, idx_all, self.weights_all = (g.wait() for g in self.gathered)
            d = self.d
            local = idx_all - d.rank * d.num_local_experts
            local = torch.where((idx_all >= 0) & (local >= 0) & (local < d.num_local_experts), local, -1)
            x_ND, counts, self.state = d.kernels.permute(x_all, local, d.num_local_experts)
            if d.stats is not None:
                d.stats.add_tokens(x_ND.shape[0])
            self._result = (x_ND, counts)
        return self._result


class AllGatherDispatcher(Combining):
    """Every rank gathers all tokens of the EP group (with their routing), keeps the copies for its
    own experts, and returns partial outputs through a reduce-scatter. Simple; sends every token to
    every rank, so it suits small EP groups or top-k close to the number of ranks."""

    def __init__(self, kernels, num_experts: int, group, stats: Optional[CommStats] = None, overlap: bool = True):
        self.kernels, self.group, self.stats, self.overlap = kernels, group, stats, overlap
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_local_experts = num_experts // self.size

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor) -> _AGPending:
        sizes = all_gather_sizes(x_TD.shape[0], self.group, self.stats, x_TD.device)
        gathered = [_started(all_gather(t, sizes, self.group, self.stats, async_op=self.overlap), self.overlap)
                    for t in (x_TD, expert_idx_TK, weights_TK)]
        return _AGPending(self, sizes, gathered)

    def combine_start(self, y_ND: Tensor, pending: _AGPending) -> Inflight:
        partial_TD = self.kernels.unpermute(y_ND, pending.state, pending.weights_all)
        return _started(reduce_scatter(partial_TD, pending.sizes, self.group, self.stats, async_op=self.overlap),
                        self.overlap)


class _HierPending:
    def __init__(self, dispatcher: "HierarchicalDispatcher", sel: Tensor, num_tokens: int, recv: list[Inflight],
                 in_splits: list[int], out_splits: list[int]):
        self.d, self.sel, self.num_tokens, self.recv = dispatcher, sel, num_tokens, recv
        self.in_splits, self.out_splits = in_splits, out_splits
        self.inner = None

    def wait(self) -> tuple[Tensor, Tensor]:
        if self.inner is None:
            x_recv, idx_recv, w_recv = (r.wait() for r in self.recv)
            d = self.d
            local = idx_recv - d.node * d.experts_per_node
            local = torch.where((idx_recv >= 0) & (local >= 0) & (local < d.experts_per_node), local, -1)
            self.inner = d.inner.dispatch(x_recv, local, w_recv)
        return self.inner.wait()


class HierarchicalDispatcher(Combining):
    """Two-level exchange for EP groups that span nodes.

    Inter-node: among the EP ranks with the same local rank on each node, each token goes to every
    other node that holds at least one of its experts, once, with its routing (a sparse all-gather:
    a token that needs every node is all-gathered). Intra-node: the received tokens are dispatched
    to this node's experts with an all-to-all over the node's fast links. Combine reverses both: the
    node sums its experts' weighted outputs per token, so one vector per token and node crosses
    back (a sparse reduce-scatter), and the source rank adds the per-node partial sums.
    """

    def __init__(self, kernels, num_experts: int, inter_group, intra_group, stats: Optional[CommStats] = None,
                 overlap: bool = True):
        self.kernels, self.inter_group, self.stats, self.overlap = kernels, inter_group, stats, overlap
        self.num_nodes, self.node = dist.get_world_size(inter_group), dist.get_rank(inter_group)
        self.experts_per_node = num_experts // self.num_nodes
        self.inner = AllToAllDispatcher(kernels, self.experts_per_node, intra_group, stats, overlap=False)
        self.num_local_experts = self.inner.num_local_experts

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor) -> _HierPending:
        node_TK = torch.div(expert_idx_TK, self.experts_per_node, rounding_mode="floor")  # -1 stays -1
        nodes = torch.arange(self.num_nodes, device=x_TD.device)
        need_TN = (node_TK.unsqueeze(-1) == nodes).any(1)
        # (node, token) pairs in node-major order: the send buffer grouped by destination node.
        sel = need_TN.t().nonzero()[:, 1]
        in_counts = need_TN.sum(0)
        out_counts = exchange_counts(in_counts.view(-1, 1), self.inter_group, self.stats).view(-1)
        in_splits, out_splits = in_counts.tolist(), out_counts.tolist()
        recv = [_started(all_to_all(t.index_select(0, sel), out_splits, in_splits, self.inter_group, self.stats,
                                    async_op=self.overlap), self.overlap) for t in (x_TD, expert_idx_TK, weights_TK)]
        return _HierPending(self, sel, x_TD.shape[0], recv, in_splits, out_splits)

    def combine_start(self, y_ND: Tensor, pending: _HierPending) -> Then:
        # the intra-node combine is synchronous; the inter-node exchange (the slow one) overlaps
        partial_RD = self.inner.combine(y_ND, pending.inner)
        back = _started(all_to_all(partial_RD, pending.in_splits, pending.out_splits, self.inter_group, self.stats,
                                   async_op=self.overlap), self.overlap)

        def node_sums(b: Tensor) -> Tensor:
            out_TD = b.new_zeros((pending.num_tokens, b.shape[1]), dtype=torch.promote_types(b.dtype, torch.float32))
            return out_TD.index_add(0, pending.sel, b.to(out_TD.dtype)).to(y_ND.dtype)
        return Then(back, node_sums)


class _AroundEP(Combining):
    """A tensor-parallel wrapper around an EP dispatcher over this rank's TP group."""

    def __init__(self, inner, tp_group):
        self.inner, self.tp_group = inner, tp_group
        self.num_local_experts = inner.num_local_experts


class ExpertTPDispatcher(_AroundEP):
    """Expert tensor parallelism around an EP dispatcher (see the module docstring)."""

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor):
        return self.inner.dispatch(copy_to_tp(x_TD, self.tp_group), expert_idx_TK,
                                   copy_to_tp(weights_TK, self.tp_group))

    def combine_start(self, y_ND: Tensor, pending) -> Then:
        return Then(self.inner.combine_start(y_ND, pending), lambda t: reduce_from_tp(t, self.tp_group))


class _SplitPending:
    def __init__(self, inner, num_tokens: int):
        self.inner, self.num_tokens = inner, num_tokens

    def wait(self) -> tuple[Tensor, Tensor]:
        return self.inner.wait()


class TokenSplitDispatcher(_AroundEP):
    """TP-extend-EP around an EP dispatcher over ep x tp ranks (see the module docstring)."""

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor) -> _SplitPending:
        g = self.tp_group
        pending = self.inner.dispatch(split_to_tp(x_TD, g), split_to_tp(expert_idx_TK, g), split_to_tp(weights_TK, g))
        return _SplitPending(pending, x_TD.shape[0])

    def combine_start(self, y_ND: Tensor, pending: _SplitPending) -> Then:
        return Then(self.inner.combine_start(y_ND, pending.inner),
                    lambda t: gather_from_tp(t, pending.num_tokens, self.tp_group))


class SequenceExpertTPDispatcher(_AroundEP):
    """Expert TP under sequence parallelism: each TP rank routed only its own tokens, but holds a
    slice of every expert, so the tokens (with their routing) are gathered over the TP group before
    the EP dispatch (backward: the partial gradients reduce-scattered), and the combined partial
    outputs are reduce-scattered back to the ranks that own the tokens."""

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor) -> _SplitPending:
        g = self.tp_group
        pending = self.inner.dispatch(gather_rows(x_TD, g), gather_rows(expert_idx_TK, g), gather_rows(weights_TK, g))
        return _SplitPending(pending, x_TD.shape[0])

    def combine_start(self, y_ND: Tensor, pending: _SplitPending) -> Then:
        return Then(self.inner.combine_start(y_ND, pending.inner), lambda t: scatter_rows(t, self.tp_group))


def _ep_dispatcher(name: str, kernels, num_experts: int, meshes, stats: Optional[CommStats], overlap: bool):
    if meshes.layout.ep == 1:
        return LocalDispatcher(kernels, num_experts)
    if name == "allgather":
        return AllGatherDispatcher(kernels, num_experts, meshes.ep_group, stats, overlap)
    if name == "hierarchical":
        return HierarchicalDispatcher(kernels, num_experts, meshes.ep_inter_group, meshes.ep_intra_group, stats, overlap)
    if name == "alltoall":
        return AllToAllDispatcher(kernels, num_experts, meshes.ep_group, stats, overlap)
    raise ValueError(f"dispatcher {name!r} needs ep = 1 (it keeps every expert local)")


def make_dispatcher(name: str, kernels, num_experts: int, meshes, stats: Optional[CommStats] = None,
                    overlap: bool = True, sequence_parallel: bool = False):
    """The dispatcher `name` for one MoE layer of `num_experts` experts over `meshes`' EP group,
    wrapped for tensor parallelism when tp > 1 (`sequence_parallel`: each TP rank routed its own tokens)."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; allowed: {', '.join(DISPATCHERS)}")
    inner = _ep_dispatcher(name, kernels, num_experts, meshes, stats, overlap)
    layout = meshes.layout
    if layout.etp > 1:
        return (SequenceExpertTPDispatcher if sequence_parallel else ExpertTPDispatcher)(inner, meshes.etp_group)
    if layout.tp > 1 and not sequence_parallel:  # TP-extend-EP: the TP ranks are inside the EP group
        return TokenSplitDispatcher(inner, meshes.tp_group)
    return inner  # (with sequence parallelism TP-extend-EP's tokens are split already)
