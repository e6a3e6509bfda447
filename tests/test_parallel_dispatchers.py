"""Token dispatchers on 4 gloo ranks (2 "nodes" x 2): an MoE layer with each dispatcher against the
unsharded layer on all ranks' tokens (uneven token counts per rank), the byte counts of the
hierarchical and flat all-to-all against values computed from the routing, and the asynchronous
dispatch that lets the shared expert overlap the exchange.

All checks run in one 4-process launch (start-up dominates on a small machine); the parent asserts.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist

from moe_kernels import get_kernels
from moe.config import ModelConfig
from moe.layer import MoELayer
from dist_utils import run_distributed

WORLD, NODE, E, K, D = 4, 2, 8, 4, 32
CFG = dict(hidden_size=D, num_experts=E, top_k=K, expert_ffn_size=16, num_shared_experts=1, aux_loss_coeff=0.0)
DISPATCHERS = ("alltoall", "allgather", "hierarchical")


def tokens_of(rank: int) -> int:
    return 5 + 3 * rank  # uneven on purpose: exercises the padded all-gather and uneven splits


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(1, tokens_of(rank), D, generator=g), torch.randn(1, tokens_of(rank), D, generator=g)


def routing(rank: int) -> torch.Tensor:
    """Top-K of random scores; even tokens strongly prefer this rank's node, so some tokens need no
    other node (a dispatcher that all-gathers every token would be caught by the byte count)."""
    g = torch.Generator().manual_seed(200 + rank)
    scores = torch.rand(tokens_of(rank), E, generator=g)
    own = torch.arange(E) // (E // (WORLD // NODE)) == rank // NODE
    scores[0::2] += own.float()
    return scores.topk(K, dim=-1).indices


def _runtime(dispatcher: str, overlap: bool = True):
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime
    return ParallelRuntime.setup(ParallelConfig(ep=WORLD, dispatcher=dispatcher, devices_per_node=NODE,
                                                overlap=overlap), ModelConfig(**CFG))


def _layer_vs_reference(dispatcher: str) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(**CFG), get_kernels("fast"))
    full = copy.deepcopy(layer)
    # Reference: the unsharded layer on every rank's tokens; loss = sum over ranks of <out, c>.
    xs, cs = zip(*(inputs(r) for r in range(WORLD)))
    x_all = torch.cat(xs, dim=1).requires_grad_()
    out_all, _ = full(x_all)
    (out_all * torch.cat(cs, dim=1)).sum().backward()
    lo = sum(tokens_of(r) for r in range(rank))
    sl = slice(lo, lo + tokens_of(rank))

    rt = _runtime(dispatcher)
    rt.parallelize(layer)
    x, c = inputs(rank)
    x.requires_grad_()
    out, _ = layer(x)
    (out * c).sum().backward()
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # each rank holds the gradient of its own tokens' terms
    per = E // WORLD
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {
        "out": rel(out, out_all[:, sl].detach()),
        "x_grad": rel(x.grad, x_all.grad[:, sl]),
        "router_grad": rel(router_grad, full.router.weight.grad),
        "expert_grad": max(rel(getattr(layer.experts, w).grad, getattr(full.experts, w).grad[rank * per:(rank + 1) * per])
                           for w in ("w1_EDF", "w3_EDF", "w2_EFD")),
        "local_experts": layer.experts.w1_EDF.shape[0],
        "tokens_received": rt.stats.tokens_received,
    }


@torch.no_grad()
def _bytes(dispatcher: str) -> dict:
    rank = dist.get_rank()
    rt = _runtime(dispatcher)
    layer = MoELayer(ModelConfig(**CFG), get_kernels("fast"))
    rt.parallelize(layer)
    d, stats = layer.dispatcher, rt.stats
    x = torch.randn(tokens_of(rank), D)
    idx = routing(rank)
    stats.reset()
    pending = d.dispatch(x, idx, torch.rand(tokens_of(rank), K))
    x_nd, counts = pending.wait()
    after_dispatch = (stats.intra_bytes, stats.inter_bytes, stats.tokens_received)
    d.combine(torch.randn_like(x_nd), pending)
    return {"dispatch": after_dispatch, "total": (stats.intra_bytes, stats.inter_bytes),
            "received_rows": x_nd.shape[0], "counts": counts.tolist()}


def _overlap(overlap: bool) -> dict:
    """Does dispatch return with the token exchange still owed (an async work), and does the MoE
    layer compute the shared expert's up-projections between dispatch and wait, its down-projection
    between combine start and wait?"""
    rt = _runtime("alltoall", overlap)
    layer = MoELayer(ModelConfig(**CFG), get_kernels("fast"))
    rt.parallelize(layer)
    events, inner = [], layer.dispatcher

    class Recording:
        num_local_experts = inner.num_local_experts

        def dispatch(self, *a):
            p = inner.dispatch(*a)
            events.append(("dispatch", int(p.recv.asynchronous)))
            orig_wait = p.wait
            p.wait = lambda: (events.append(("wait", 0)), orig_wait())[1]
            return p

        def combine_start(self, *a):
            c = inner.combine_start(*a)
            events.append(("combine_start", int(c.inner.asynchronous)))
            orig_wait = c.wait
            c.wait = lambda: (events.append(("combine_wait", 0)), orig_wait())[1]
            return c

    layer.dispatcher = Recording()
    layer.shared.w1.register_forward_hook(lambda *_: events.append(("shared_up", 0)))
    layer.shared.w2.register_forward_hook(lambda *_: events.append(("shared_down", 0)))
    layer(inputs(dist.get_rank())[0])
    return {"events": events}


def _backward_order(dispatcher: str, overlap: bool = True) -> list:
    """The backward's events: each asynchronous exchange's adjoint start and wait (tagged with the
    forward phase that created it: dispatch, or combine once the experts ran) and the backward of
    the shared expert's halves (w1: up-projection, w2: down-projection)."""
    from parallel import comm
    rt = _runtime(dispatcher, overlap)
    layer = MoELayer(ModelConfig(**CFG), get_kernels("fast"))
    rt.parallelize(layer)
    events, phase = [], ["dispatch"]
    begin_fwd, begin_bwd, end_bwd = comm._Begin.forward, comm._Begin.backward, comm._End.backward

    def tagged_forward(ctx, x, ex):
        ex.phase = phase[0]
        return begin_fwd(ctx, x, ex)

    def waited(ctx, g):
        events.append(("wait", ctx.ex.phase))
        return begin_bwd(ctx, g)

    def started(ctx, g):
        events.append(("start", ctx.ex.phase))
        return end_bwd(ctx, g)
    comm._Begin.forward, comm._Begin.backward, comm._End.backward = (
        staticmethod(tagged_forward), staticmethod(waited), staticmethod(started))
    try:
        layer.experts.register_forward_hook(lambda *_: phase.__setitem__(0, "combine"))
        layer.shared.w1.register_full_backward_hook(lambda *_: events.append(("up", "")))
        layer.shared.w2.register_full_backward_hook(lambda *_: events.append(("down", "")))
        x = inputs(dist.get_rank())[0].requires_grad_()
        out, _ = layer(x)
        out.square().sum().backward()
    finally:
        comm._Begin.forward, comm._Begin.backward, comm._End.backward = (
            staticmethod(begin_fwd), staticmethod(begin_bwd), staticmethod(end_bwd))
    return events


def _worker() -> dict:
    out = {}
    for name in DISPATCHERS:
        out[f"layer/{name}"] = _layer_vs_reference(name)
        out[f"bytes/{name}"] = _bytes(name)
        out[f"backward/{name}"] = _backward_order(name)
    out["backward/off"] = _backward_order("alltoall", overlap=False)
    out["overlap/on"], out["overlap/off"] = _overlap(True), _overlap(False)
    return out


@functools.lru_cache(maxsize=None)
def results() -> list[dict]:
    return run_distributed(_worker, WORLD, timeout=240)


def node(rank: int) -> int:
    return rank // NODE


def expert_node(e: torch.Tensor) -> torch.Tensor:
    return e // (E // (WORLD // NODE))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_moe_layer_matches_unsharded_layer(dispatcher):
    total_copies = sum(tokens_of(r) for r in range(WORLD)) * K
    received = 0
    for r, res in enumerate(results()):
        got = res[f"layer/{dispatcher}"]
        assert got["local_experts"] == E // WORLD
        for key in ("out", "x_grad", "router_grad", "expert_grad"):
            assert got[key] <= 1e-5, f"rank {r} {dispatcher}: {key} differs by {got[key]:.2e} (relative)"
        received += got["tokens_received"]
    assert received == total_copies  # dropless: every token copy arrives at exactly one rank


@pytest.mark.timeout(300)
def test_hierarchical_sends_each_token_once_per_remote_node():
    res = results()
    idx = [routing(r) for r in range(WORLD)]
    f32, i64 = 4, 8
    hier_inter = flat_inter = 0
    for r in range(WORLD):
        peer = (r + NODE) % WORLD  # same local rank on the other node
        me = node(r)
        # Tokens of r needing the other node: each crosses once with its row, K ids and K weights.
        crossing = int((expert_node(idx[r]) != me).any(1).sum())
        coming_back_from = int((expert_node(idx[peer]) == me).any(1).sum())
        want_dispatch = i64 + crossing * (D * f32 + K * i64 + K * f32)  # + the one count exchanged
        want_total = want_dispatch + coming_back_from * D * f32  # combine: one summed row per token
        got = res[r]["bytes/hierarchical"]
        assert got["dispatch"][1] == want_dispatch, f"rank {r}: {got['dispatch'][1]} vs {want_dispatch}"
        assert got["total"][1] == want_total, f"rank {r}: {got['total'][1]} vs {want_total}"
        # Flat all-to-all: one row per (token, expert) pair on the other node, both ways.
        remote_assign = int((expert_node(idx[r]) != me).sum())
        remote_in = sum(int(((idx[s] // (E // WORLD)) == r).sum()) for s in range(WORLD) if node(s) != me)
        want_flat = 2 * (E // WORLD) * i64 + (remote_assign + remote_in) * D * f32
        assert res[r]["bytes/alltoall"]["total"][1] == want_flat
        hier_inter += want_total
        flat_inter += want_flat
        # Both deliver the same token copies to this rank's experts.
        assert res[r]["bytes/hierarchical"]["counts"] == res[r]["bytes/alltoall"]["counts"]
        assert res[r]["bytes/allgather"]["total"][1] > 0
        stays = tokens_of(r) - crossing
        assert stays > 0, "the routing must keep some tokens on their node for the count to discriminate"
    assert hier_inter < 0.8 * flat_inter, (hier_inter, flat_inter)
    print(f"inter-node bytes over all ranks, one MoE layer forward (top-{K}, 2 nodes x {NODE}): "
          f"hierarchical {hier_inter}, flat all-to-all {flat_inter}")


@pytest.mark.timeout(300)
def test_shared_expert_overlaps_async_dispatch():
    for res in results():
        on, off = res["overlap/on"]["events"], res["overlap/off"]["events"]
        order = ["dispatch", "shared_up", "wait", "combine_start", "shared_down", "combine_wait"]
        assert [e for e, _ in on] == [e for e, _ in off] == order
        assert on[0][1] == on[3][1] == 1, "with overlap both exchanges must still be in flight after their start"
        assert off[0][1] == off[3][1] == 0, "without overlap each start finishes its exchange itself"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", DISPATCHERS)
def test_backward_exchanges_overlap_the_shared_expert(name):
    """In backward each half of the shared expert runs between its exchange's adjoint start and
    wait: the combine's adjoint behind the down-projection's backward, then the dispatch's behind
    the up-projections'."""
    for res in results():
        ev = res[f"backward/{name}"]
        down, up = ev.index(("down", "")), ev.index(("up", ""))
        assert down < up
        for phase, half in (("combine", down), ("dispatch", up)):
            starts = [i for i, e in enumerate(ev) if e == ("start", phase)]
            waits = [i for i, e in enumerate(ev) if e == ("wait", phase)]
            assert starts and len(starts) == len(waits), (phase, ev)
            assert max(starts) < half < min(waits), (name, phase, ev)
        assert res["backward/off"] == [("down", ""), ("up", "")], "overlap: false has no split exchanges"
