"""Emulated links (parallel/emulated_links.py).

- The one link model (parallel/link_model.py) gives hand-computed times; the emulated links and
  the simulator (simulator/comm.py) both time through it, but each counts the bytes per link
  class its own way (the runtime from the real group members' nodes, the simulator from rank
  arithmetic), so the two still agree collective by collective over 24 placements.
- On 2 gloo ranks on 2 "nodes": each collective the runtime uses takes at least its emulated time
  (and less than a generous upper bound: the machine is shared), its CPU time stays a small part of
  it (the wait sleeps), and an asynchronous one overlapped with other work is recorded as hidden.
- Training with emulation gives bitwise the losses and gradient norms of training without it.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from parallel.config import EmulateLinks, LinkSpec
from parallel import emulated_links as el
from parallel import link_model as LM
from simulator import comm as sim
from simulator.hardware import Link

LINKS = EmulateLinks(intra_node=LinkSpec(latency_us=200.0, bandwidth_gbps=0.4),
                     inter_node=LinkSpec(latency_us=2000.0, bandwidth_gbps=0.04))
HW = SimpleNamespace(collective_links={}, intra_node=Link(0.4, 200.0), inter_node=Link(0.04, 2000.0))


def test_link_model_hand_computed():
    fast, slow = LinkSpec(latency_us=10.0, bandwidth_gbps=2.0), LinkSpec(latency_us=100.0, bandwidth_gbps=0.5)
    # all-reduce of 4 MB over 4 ranks inside a node: 2 * 3/4 * 4e6 = 6e6 bytes at 2 GB/s + 6 steps of 10 us
    assert LM.ring(4e6, 4, False, passes=2) == (6e6, 0.0, 6)
    assert LM.transfer_time(6e6, 0.0, 6, False, fast, slow) == pytest.approx(3e-3 + 60e-6, rel=1e-12)
    # the same ring across nodes: all of it on the slow link, its latency per step
    assert LM.transfer_time(*LM.ring(4e6, 4, True, passes=2), True, fast, slow) == pytest.approx(12e-3 + 600e-6)
    # all-to-all: 1 MB on each class runs concurrently, the slow one sets the time; 8 ranks: 3 steps
    assert LM.all_to_all_steps(8) == 3 and LM.all_to_all_steps(2) == 1 and LM.all_to_all_steps(5) == 3
    assert LM.transfer_time(1e6, 1e6, 3, True, fast, slow) == pytest.approx(2e-3 + 300e-6)
    assert LM.transfer_time(*LM.p2p(1e6, False), False, fast, slow) == pytest.approx(0.5e-3 + 10e-6)
    assert LM.single_link_time(2e6, 2, 4.0, 25.0) == pytest.approx(0.5e-3 + 50e-6)
    assert LM.ring(4e6, 1, False) == (0.0, 0.0, 0) and LM.p2p(0, True) == (0.0, 0.0, 0)


@pytest.mark.parametrize("dpn", [1, 2, 4, 8])
@pytest.mark.parametrize("size, stride", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4)])
def test_charged_time_is_the_simulators(size, stride, dpn):
    node_of = lambda r: r // dpn  # noqa: E731
    ranks = [i * stride for i in range(size)]
    full = 3e6
    for ours, theirs in ((el.ring_time(full, ranks, node_of, LINKS), sim.all_gather(full, size, stride, dpn)),
                         (el.ring_time(full, ranks, node_of, LINKS), sim.reduce_scatter(full, size, stride, dpn)),
                         (el.ring_time(full, ranks, node_of, LINKS, passes=2), sim.all_reduce(full, size, stride, dpn))):
        assert ours == pytest.approx(theirs.time(HW), rel=1e-12)
    per_peer = [full / size] * size  # the simulator's all-to-all: even splits
    ours = el.all_to_all_time(per_peer, per_peer, ranks, ranks[0], node_of, LINKS)
    assert ours == pytest.approx(sim.all_to_all(full, size, stride, dpn).time(HW), rel=1e-12)
    counts = el.all_to_all_time([8] * size, [8] * size, ranks, ranks[0], node_of, LINKS, steps=1)
    assert counts == pytest.approx(sim._counts(size, stride, dpn).time(HW) + 8 * _a2a_share(ranks, node_of), rel=1e-12)
    crosses = node_of(ranks[0]) != node_of(ranks[1])
    assert el.p2p_time(full, ranks[0], ranks[1], node_of, LINKS) == pytest.approx(sim.p2p(full, crosses).time(HW))


def _a2a_share(ranks, node_of) -> float:
    """Seconds per byte-per-peer of the count exchange's payload (the simulator counts latency only)."""
    same = sum(node_of(r) == node_of(ranks[0]) for r in ranks[1:])
    return max(same / 0.4e9, (len(ranks) - 1 - same) / 0.04e9)


def _time(fn) -> tuple[float, float]:
    """Wall seconds and the calling thread's CPU seconds (a busy wait would spin here; gloo's own
    threads copying the bytes over loopback are not the wait's cost)."""
    dist.barrier()
    wall, cpu = time.monotonic(), time.thread_time()
    fn()
    return time.monotonic() - wall, time.thread_time() - cpu


def _collectives_worker() -> dict:
    el.install(LINKS, lambda r: r, dist.get_rank())  # 2 ranks, 2 "nodes": the slow link
    n, me = 2, dist.get_rank()
    x, x8 = torch.randn(1 << 20), torch.randn(2 << 20)  # 4 and 8 MB
    ranks = [0, 1]
    a2a_out = torch.empty(2 << 20)
    ag_out = torch.empty(2 << 20)
    rs_out = torch.empty(1 << 20)
    splits_in = [100_000, (2 << 20) - 100_000]  # rank 0 sends the large part, rank 1 receives it
    splits_out = [splits_in[me]] * 2
    uneven_in, uneven_out = torch.randn(sum(splits_in)), torch.empty(sum(splits_out))
    cases = {
        "all_reduce": (lambda: el.all_reduce(x.clone(), group=None),
                       el.ring_time(4 << 20, ranks, lambda r: r, LINKS, passes=2)),
        "all_gather": (lambda: el.all_gather_single(ag_out, x), el.ring_time(8 << 20, ranks, lambda r: r, LINKS)),
        "reduce_scatter": (lambda: el.reduce_scatter_single(rs_out, x8), el.ring_time(8 << 20, ranks, lambda r: r, LINKS)),
        "all_to_all": (lambda: el.all_to_all_single(a2a_out, x8),
                       el.all_to_all_time([4 << 20] * n, [4 << 20] * n, ranks, me, lambda r: r, LINKS)),
        "all_to_all_uneven": (lambda: el.all_to_all_single(uneven_out, uneven_in, splits_out, splits_in),
                              el.all_to_all_time([4 * s for s in splits_in], [4 * s for s in splits_out], ranks, me,
                                                 lambda r: r, LINKS)),
    }
    out = {}
    for name, (fn, expected) in cases.items():
        wall, cpu = _time(fn)
        out[name] = (wall, cpu, expected)
    el.take_exposure()

    def overlapped():  # issue, compute-like work (a sleep here), then wait
        work = el.all_reduce(x.clone(), async_op=True)
        time.sleep(0.1)
        work.wait()
    wall, _ = _time(overlapped)
    exp = el.take_exposure()
    out["overlap"] = (wall, exp.hidden_s, exp.exposed_s, el.ring_time(4 << 20, ranks, lambda r: r, LINKS, passes=2))
    el.uninstall()
    return out


def test_collectives_take_their_emulated_time_without_burning_cpu():
    results = run_distributed(_collectives_worker, 2, timeout=120)
    for rank, out in enumerate(results):
        for name, value in out.items():
            if name == "overlap":
                continue
            wall, cpu, expected = value
            assert expected > 0.1, name  # the link time must dominate gloo's own loopback time
            assert wall >= expected * 0.999, f"rank {rank} {name}: {wall:.3f}s < emulated {expected:.3f}s"
            assert wall <= expected + 3.0, f"rank {rank} {name}: {wall:.3f}s, emulated {expected:.3f}s"
            assert cpu <= 0.5 * expected, f"rank {rank} {name}: {cpu:.3f}s of CPU in {wall:.3f}s: a busy wait?"
        wall, hidden, exposed, expected = out["overlap"]
        assert wall >= expected * 0.999
        assert hidden >= 0.1 * 0.999 and hidden <= expected + 1e-3, (hidden, expected)
        assert exposed >= (expected - hidden) * 0.999, (exposed, expected, hidden)


def _losses_worker() -> dict:
    from moe_kernels import get_kernels
    from moe.config import ModelConfig
    from moe.model import MoETransformer
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime
    fast = EmulateLinks(intra_node=LinkSpec(20.0, 5.0), inter_node=LinkSpec(100.0, 1.0))
    model_cfg = dict(vocab_size=64, hidden_size=32, num_layers=2, max_seq_len=16, num_heads=2, q_lora_rank=16,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
                     first_k_dense=1, num_experts=4, top_k=2, expert_ffn_size=16, num_shared_experts=1)
    out = {}
    for name, links in (("plain", None), ("emulated", fast)):
        torch.manual_seed(7)
        model = MoETransformer(ModelConfig(**model_cfg), get_kernels("fast"))
        rt = ParallelRuntime.setup(ParallelConfig(ep=2, dispatcher="hierarchical", devices_per_node=1, zero1=True,
                                                  emulate_links=links), model.cfg)
        rt.parallelize(model)
        opt = rt.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
        g = torch.Generator().manual_seed(3 + rt.dp_rank)
        losses, norms = [], []
        for _ in range(3):
            tokens = torch.randint(0, 64, (2, 17), generator=g)
            res = model(tokens[:, :-1], tokens[:, 1:])
            res.loss.backward()
            norms.append(rt.grad_reducer(None, 0.5))
            losses.append(float(res.loss.detach()))
            opt.step()
            opt.zero_grad(set_to_none=True)
        metrics = rt.step_metrics()
        out[name] = (losses, norms, metrics)
    el.uninstall()
    return out


def _pipeline_worker() -> dict:
    """pp2 through the trainer's step: the schedules' sends and receives are charged as P2P."""
    from moe_kernels import get_kernels
    from launch.trainer.recipe import TrainConfig
    from launch.trainer.step import train_step
    from moe.config import ModelConfig
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime
    t = TrainConfig(grad_accum=2, micro_batch_size=2, seq_len=16, grad_clip=0.5)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, max_seq_len=16, num_heads=2, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
                      first_k_dense=1, num_experts=4, top_k=2, expert_ffn_size=16, num_shared_experts=1)
    slow = EmulateLinks(intra_node=LinkSpec(20.0, 5.0), inter_node=LinkSpec(2000.0, 0.01))
    out = {}
    for name, links in (("plain", None), ("emulated", slow)):
        torch.manual_seed(7)
        rt = ParallelRuntime.setup(ParallelConfig(pp=2, devices_per_node=1, emulate_links=links), cfg, micro_batches=2)
        model = rt.parallelize(rt.build_model(cfg, get_kernels("fast")))
        rt.attach_pipeline(model, 2, 2, 16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        batches = iter([{"tokens": x[:, :-1], "labels": x[:, 1:]} for x in torch.randint(0, 64, (4, 2, 17), generator=g)])
        el.take_exposure()
        losses = [train_step(model, opt, batches, t, "cpu", grad_reducer=rt.grad_reducer,
                             pipeline=rt.forward_backward)["loss"] for _ in range(2)]
        exp = el.take_exposure()
        out[name] = (losses, exp.by_kind.get("p2p"), exp.charged_s)
    el.uninstall()
    return out


def test_pipeline_p2p_is_emulated():
    for out in run_distributed(_pipeline_worker, 2, timeout=120):
        assert out["plain"][0] == out["emulated"][0]
        assert out["plain"][1] is None, "without emulation the schedules' works pass through untouched"
        hidden, exposed = out["emulated"][1]
        # each of 2 steps sends 2 micro-batches' activations (2x16x32 fp32 = 4 KB) one way: >= 2 ms each
        assert hidden + exposed >= 4 * 2e-3 and out["emulated"][2] > 0


def test_losses_bitwise_identical_with_emulation():
    for out in run_distributed(_losses_worker, 2, timeout=120):
        assert out["plain"][0] == out["emulated"][0]
        assert out["plain"][1] == out["emulated"][1]
        plain, emulated = out["plain"][2], out["emulated"][2]
        assert plain["comm_emulated_s"] == 0.0 and emulated["comm_emulated_s"] > 0.0
        # in flight before the wait + blocked in it covers at least the link time of every collective
        assert emulated["comm_exposed_s"] + emulated["comm_hidden_s"] >= emulated["comm_emulated_s"] * 0.999
