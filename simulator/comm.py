"""Collective communication: bytes each device moves, split by link, and the time that takes.

Conventions (pinned by tests/test_simulator_parts.py):
- all-gather / reduce-scatter of a buffer whose *full* size is S bytes: ring, each device sends
  (n-1)/n * S in n-1 steps; all-reduce is reduce-scatter + all-gather, 2 (n-1)/n * S in 2 (n-1) steps.
- all-to-all where each device holds S bytes addressed evenly to the n members: it sends (n-1)/n * S,
  the part for peers in its own node over the fast link, the rest over the inter-node link, both at
  once; the messages are concurrent, so latency grows with log2(n), not n.
- A group spanning nodes runs ring collectives at the inter-node bandwidth: the achievable bus
  bandwidth of a multi-node ring is the per-device NIC bandwidth.
- Time = max(intra bytes / intra bandwidth, inter bytes / inter bandwidth) + steps * latency, or,
  where the profile measured that kind of collective (`collective_links`, CPU calibrations),
  bytes / its bandwidth + steps * its latency.

The time formulas are parallel/link_model.py's, shared with the runtime's emulated links; this
module owns the placement arithmetic (which bytes cross nodes) and the token-exchange messages.
Group placement follows `layout.py`'s rank order: a group of `size` members with rank `stride`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel import link_model as LM
from simulator.hardware import HardwareProfile


@dataclass(frozen=True)
class Comm:
    kind: str
    intra_bytes: float  # sent per device over the fast (intra-node) link
    inter_bytes: float  # sent per device over the inter-node link
    steps: int  # latency-bound steps
    spans_nodes: bool

    def time(self, hw: HardwareProfile) -> float:
        if self.steps == 0:
            return 0.0
        own = hw.collective_links.get(_MEASURED_AS.get(self.kind, self.kind)) if hw.collective_links else None
        if own:  # measured for this kind of collective (one box: every link is the same)
            return LM.single_link_time(self.bytes, self.steps, own[0], own[1])
        return LM.transfer_time(self.intra_bytes, self.inter_bytes, self.steps, self.spans_nodes,
                                hw.intra_node, hw.inter_node)

    def scaled(self, factor: float) -> "Comm":
        return Comm(self.kind, self.intra_bytes * factor, self.inter_bytes * factor, self.steps, self.spans_nodes)

    @property
    def bytes(self) -> float:
        return self.intra_bytes + self.inter_bytes


NONE = Comm("none", 0.0, 0.0, 0, False)
_MEASURED_AS = {"counts": "all_to_all"}  # the count exchange is a tiny all-to-all


def group_span(size: int, stride: int, devices_per_node: int) -> tuple[int, int]:
    """(members per node, nodes spanned) of a group of `size` ranks `stride` apart."""
    if size <= 1:
        return 1, 1
    if stride >= devices_per_node:
        return 1, size
    per_node = min(size, max(1, devices_per_node // stride))
    return per_node, math.ceil(size / per_node)


def _ring(kind: str, full_bytes: float, size: int, stride: int, dpn: int, passes: int) -> Comm:
    if size <= 1 or full_bytes <= 0:
        return NONE
    spans = group_span(size, stride, dpn)[1] > 1
    return Comm(kind, *LM.ring(full_bytes, size, spans, passes), spans)


def all_gather(full_bytes: float, size: int, stride: int, dpn: int) -> Comm:
    return _ring("all_gather", full_bytes, size, stride, dpn, 1)


def reduce_scatter(full_bytes: float, size: int, stride: int, dpn: int) -> Comm:
    return _ring("reduce_scatter", full_bytes, size, stride, dpn, 1)


def all_reduce(full_bytes: float, size: int, stride: int, dpn: int) -> Comm:
    return _ring("all_reduce", full_bytes, size, stride, dpn, 2)


def all_to_all(send_bytes: float, size: int, stride: int, dpn: int) -> Comm:
    """`send_bytes`: what one device holds for all members (its own share included)."""
    if size <= 1 or send_bytes <= 0:
        return NONE
    per_node, nodes = group_span(size, stride, dpn)
    intra = send_bytes * (per_node - 1) / size
    inter = send_bytes * (size - per_node) / size
    return Comm("all_to_all", intra, inter, LM.all_to_all_steps(size), nodes > 1)


def p2p(nbytes: float, crosses_nodes: bool) -> Comm:
    if nbytes <= 0:
        return NONE
    return Comm("p2p", *LM.p2p(nbytes, crosses_nodes), crosses_nodes)


# ----------------------------------------------------------------------------------------------
# Expert-parallel token exchange


def node_need(num_experts: int, top_k: int, nodes: int) -> float:
    """Expected number of *other* nodes a token's top-k experts touch, for uniform routing over
    experts split evenly across `nodes` nodes: (nodes - 1) * P(a given node holds one of them)."""
    if nodes <= 1:
        return 0.0
    per = num_experts // nodes
    p_none = math.comb(num_experts - per, top_k) / math.comb(num_experts, top_k)
    return (nodes - 1) * (1 - p_none)


def ep_dispatch(dispatcher: str, tokens: float, top_k: int, token_bytes: float, ep: int, stride: int,
                dpn: int, imbalance: float = 1.0, num_experts: int = 0) -> list[Comm]:
    """The messages of one dispatch (forward) for `tokens` tokens on this device, one `Comm` per
    collective the runtime issues (`parallel/dispatchers.py`), each paying its own latency.

    `token_bytes` is one hidden vector. Where the receiver routes locally (all-gather based schemes)
    the routing travels too, as two more messages: int64 expert ids and fp32 weights per choice.
    Exchanges with split sizes first swap per-expert counts (a latency-bound step). The slowest
    rank sets the pace, so receive-side volume is scaled by `imbalance` (max / mean expert-rank load).
    Hierarchical: each token crosses to every other node holding one of its experts once (with its
    routing), then an all-to-all inside the node; with `num_experts` unknown (0) every other node is
    assumed needed, i.e. a plain all-gather across nodes.
    """
    if ep <= 1 or dispatcher == "local":
        return []
    ids, weights = 8 * top_k, 4 * top_k
    if dispatcher == "allgather":
        return [_counts(ep, stride, dpn)] + [all_gather(ep * tokens * b, ep, stride, dpn)
                                             for b in (token_bytes, ids, weights)]
    per_node, nodes = group_span(ep, stride, dpn)
    copies = tokens * top_k * token_bytes
    if dispatcher == "alltoall" or nodes == 1:
        return [_counts(ep, stride, dpn), all_to_all(copies, ep, stride, dpn).scaled(imbalance)]
    if dispatcher != "hierarchical":
        raise ValueError(f"unknown dispatcher {dispatcher!r}")
    # sent (tokens * need) vectors; as an all-to-all over the nodes that is `need/(nodes-1)` of an
    # all-gather's volume. Group members: the same local rank on each node.
    inter_stride, sent = stride * per_node, tokens * _node_share(num_experts, top_k, nodes)
    out = [_counts(nodes, inter_stride, dpn)] + [all_to_all(sent * b, nodes, inter_stride, dpn)
                                                 for b in (token_bytes, ids, weights)]
    if per_node > 1:
        out += [_counts(per_node, stride, dpn), all_to_all(copies, per_node, stride, dpn).scaled(imbalance)]
    return out


def ep_combine(dispatcher: str, tokens: float, top_k: int, token_bytes: float, ep: int, stride: int,
               dpn: int, imbalance: float = 1.0, num_experts: int = 0) -> list[Comm]:
    """The messages of one combine (forward), the way back of `ep_dispatch`: the expert outputs
    return as hidden vectors only (split sizes already known). All-gather: a reduce-scatter of the
    partial sums of every gathered token; all-to-all: the copies back; hierarchical: the intra-node
    all-to-all back, then one partial sum per token and node across nodes."""
    if ep <= 1 or dispatcher == "local":
        return []
    if dispatcher == "allgather":
        return [reduce_scatter(ep * tokens * token_bytes, ep, stride, dpn)]
    per_node, nodes = group_span(ep, stride, dpn)
    copies = tokens * top_k * token_bytes
    if dispatcher == "alltoall" or nodes == 1:
        return [all_to_all(copies, ep, stride, dpn).scaled(imbalance)]
    out = [all_to_all(copies, per_node, stride, dpn).scaled(imbalance)] if per_node > 1 else []
    sent = tokens * _node_share(num_experts, top_k, nodes)
    return out + [all_to_all(sent * token_bytes, nodes, stride * per_node, dpn)]


def _node_share(num_experts: int, top_k: int, nodes: int) -> float:
    """Per token, the all-to-all payload factor of the inter-node step: the token goes to `need`
    other nodes, which as an all-to-all over `nodes` members is need * nodes / (nodes - 1)."""
    need = node_need(num_experts, top_k, nodes) if num_experts else nodes - 1
    return need * nodes / (nodes - 1)


def _counts(size: int, stride: int, dpn: int) -> Comm:
    """The per-expert count exchange before an exchange with split sizes: latency only."""
    _, nodes = group_span(size, stride, dpn)
    return Comm("counts", 0.0, 0.0, 1, nodes > 1)


def comm_time(comms: list[Comm], hw: HardwareProfile) -> float:
    return sum(c.time(hw) for c in comms)
