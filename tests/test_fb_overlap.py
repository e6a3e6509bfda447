"""Cross-micro-batch overlap without a pipeline (`parallel.fb_overlap`, parallel/fb_overlap.py,
parallel/lanes.py; with pp > 1, parallel/pipeline_overlap.py is tested in tests/test_pipeline.py).

Equivalence: the trainer's step with each backward running beside the next forward (on its own
thread and lane of process groups) gives the losses, gradient norms and final parameters of the
plain loop within 1e-6 relative over 4 AdamW steps with clipping active, on ep2 (2 and 3
micro-batches, every dispatcher, overlapped gradient buckets), ep4 over 2 nodes with the
hierarchical dispatcher and ZeRO-1, tp2 x ep2 with sequence parallelism (TP collectives and
re-gathers in backward) and with recomputation + swap (collectives re-run in backward), on 4 ranks.
That the pairing happens: every backward ran on the backward lane, beside the next forward, with
its collectives on the twin groups. The exposure accounting with two lanes (only time every lane is
blocked is exposed) and the links shared by the lanes, on fake collectives with known times. How
much it hides is a benchmark's job (bench/bench_fb_overlap.py). Bad configurations are one clear
error each.
"""
from __future__ import annotations

import functools

import pytest
import torch

from dist_utils import assert_same_training, run_distributed

MODEL = dict(vocab_size=64, hidden_size=32, num_layers=3, max_seq_len=16, num_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
             first_k_dense=1, num_experts=8, top_k=2, expert_ffn_size=16, num_shared_experts=1, mtp_layers=1)
STEPS, MBS, SEQ, CLIP = 4, 2, 16, 0.2
TOL = 1e-6


def run(par: dict, micro_batches: int, memory: dict | None = None, steps: int = STEPS, warmup: int = 0,
        model: dict | None = None, seq: int = SEQ) -> dict:
    """Train on this rank through the trainer's step; returns losses, norms, final parameters and
    the communication exposure of the steps after the first `warmup` (gloo connects lazily)."""
    from moe_kernels import get_kernels
    from launch.trainer.recipe import TrainConfig
    from launch.trainer.step import train_step
    from moe.config import ModelConfig
    from parallel import emulated_links, lanes
    from parallel.config import ParallelConfig
    from parallel.memory import MemoryManager
    from parallel.memory_config import MemoryConfig
    from parallel.runtime import ParallelRuntime
    t = TrainConfig(grad_accum=micro_batches, micro_batch_size=MBS, seq_len=seq, grad_clip=CLIP)
    torch.manual_seed(11)
    cfg = ModelConfig(**(model or MODEL))
    rt = ParallelRuntime.setup(ParallelConfig(**par), cfg, micro_batches=micro_batches)
    model = rt.parallelize(rt.build_model(cfg, get_kernels("fast")))
    if memory:
        MemoryManager(model, MemoryConfig(**memory), "cpu")
    rt.attach_pipeline(model, micro_batches, MBS, seq)
    opt = rt.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model)
    g = torch.Generator().manual_seed(5 + rt.dp_rank)
    data = torch.randint(0, 64, (steps * micro_batches, MBS, seq + 1), generator=g)
    batches = iter([{"tokens": x[:, :-1], "labels": x[:, 1:]} for x in data])
    out = {"loss": [], "norm": []}
    emulated_links.take_exposure()
    before = lanes.backward_collectives
    for step in range(steps):
        if step == warmup:
            emulated_links.take_exposure()
        m = train_step(model, opt, batches, t, "cpu", grad_reducer=rt.grad_reducer,
                       pipeline=rt.forward_backward, backward_lane=rt.backward_lane)
        out["loss"].append(m["loss"])
        out["norm"].append(m["grad_norm"])
    exp = emulated_links.take_exposure()
    out["exposure"] = (exp.hidden_s, exp.exposed_s, exp.charged_s)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["lane"] = rt.backward_lane.take_metrics() if rt.backward_lane is not None else None
    out["backward_collectives"] = lanes.backward_collectives - before
    if rt.backward_lane is not None:
        rt.backward_lane.close()
    return out


def _worker(cases: list) -> list:
    return [run(*case) for case in cases]


SP_MEMORY = dict(recompute=["core_attention", "moe_permute"], swap=["attention"])
CASES = {
    2: [("ep2-alltoall", dict(ep=2), 2, None),
        ("ep2-alltoall-3mb-buckets", dict(ep=2, grad_bucket_mb=0.01), 3, None),
        ("ep2-allgather", dict(ep=2, dispatcher="allgather"), 2, None),
        ("ep2-no-overlap", dict(ep=2, overlap=False), 2, None)],
    4: [("ep4-2nodes-hierarchical-zero1", dict(ep=4, dispatcher="hierarchical", devices_per_node=2, zero1=True,
                                               grad_bucket_mb=0.01), 2, None),
        ("tp2-ep2-sp", dict(tp=2, ep=2, sequence_parallel=True), 2, None),
        ("tp2-extend-ep-sp-recompute-swap", dict(tp=2, tp_extend_ep=True, sequence_parallel=True), 2, SP_MEMORY)],
}


@functools.lru_cache(maxsize=None)
def results(world: int) -> list:
    cases = []
    for _, par, mb, mem in CASES[world]:
        cases += [(par, mb, mem), ({**par, "fb_overlap": True}, mb, mem)]
    return run_distributed(_worker, world, cases, timeout=400)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("world, index", [(w, i) for w, cs in CASES.items() for i in range(len(cs))],
                         ids=[c[0] for cs in CASES.values() for c in cs])
def test_fb_overlap_matches_plain_loop(world, index):
    for rank, per_case in enumerate(results(world)):
        plain, overlapped = per_case[2 * index], per_case[2 * index + 1]
        assert max(plain["norm"]) > CLIP, "clipping must be active"
        assert_same_training(overlapped, plain, TOL, f"rank {rank}, against the plain run")


def test_fb_overlap_runs_each_backward_beside_the_next_forward():
    """The overlapped runs really pair: every micro-batch's backward ran on the backward lane, issued
    its collectives on the twin groups, and ran while the main thread was in the next forward."""
    for rank, per_case in enumerate(results(2)):
        for index, (_, _, mb, _) in enumerate(CASES[2]):
            plain, overlapped = per_case[2 * index], per_case[2 * index + 1]
            assert plain["lane"] is None and plain["backward_collectives"] == 0
            assert overlapped["lane"]["fb_overlap_backwards"] == STEPS * mb
            assert overlapped["lane"]["fb_overlap_concurrent_s"] > 0.0
            assert overlapped["backward_collectives"] > 0


class _FakeWork:
    """A collective that is already done (the emulated deadline is what the wait sleeps for)."""

    def wait(self):
        return True

    def get_future(self):
        raise RuntimeError("no future")


def _timed(charged: float):
    import time

    from parallel import emulated_links as el
    return el._Timed(_FakeWork(), "all_to_all", time.monotonic(), charged, el._state)


def test_exposure_counts_only_time_every_lane_is_blocked():
    """One lane: a wait is exposed in full. A second lane running beside it (not in a wait): the
    same wait is hidden. Both lanes waiting: exposed while both wait."""
    import threading
    import time

    from parallel import emulated_links as el
    el.install(None, lambda r: 0, 0)
    try:
        el.take_exposure()
        _timed(0.1).wait()
        alone = el.take_exposure()
        assert 0.09 <= alone.exposed_s <= 0.2 and alone.hidden_s <= 0.01

        def computes():  # another lane computes for 0.3 s (no wait)
            with el.lane_running():
                time.sleep(0.3)
        worker = threading.Thread(target=computes)
        worker.start()
        time.sleep(0.01)
        _timed(0.1).wait()
        worker.join()
        beside = el.take_exposure()
        assert beside.exposed_s <= 0.02 and beside.hidden_s >= 0.08, beside

        def waits():  # the other lane waits too, for 0.2 s, from the start
            with el.lane_running():
                _timed(0.2).wait()
        worker = threading.Thread(target=waits)
        worker.start()
        time.sleep(0.01)
        _timed(0.1).wait()  # both blocked for ~0.09 s of it
        worker.join()  # the other's last ~0.1 s: this lane is in join, not running
        both = el.take_exposure()
        assert 0.07 <= both.exposed_s <= 0.35, both
    finally:
        el.uninstall()


def test_the_two_lanes_share_the_links():
    """A collective issued while the other lane's is on the wire starts when that one ends; one
    lane's own collectives in flight together do not queue (as without lanes)."""
    from parallel import emulated_links as el
    from parallel import lanes
    el.install(None, lambda r: 0, 0)
    try:
        state = el._state
        assert state.occupy(0.0, 1.0) == 1.0
        assert state.occupy(0.2, 0.5) == 0.7  # same lane: no queue
        with lanes.backward_lane():
            assert state.occupy(0.1, 0.5) == 1.5  # after the main lane's last deadline
        assert state.occupy(0.3, 0.2) == 1.7  # after the backward lane's
    finally:
        el.uninstall()


def test_fb_overlap_bad_configs():
    from config import ConfigError
    from launch.trainer.recipe import Recipe
    from moe.config import ModelConfig
    from parallel.config import ParallelConfig, check_pipeline
    from parallel.memory_config import MemoryConfig
    with pytest.raises(ConfigError, match="train.grad_accum: parallel.fb_overlap .* at least 2 micro-batches"):
        check_pipeline(ParallelConfig(ep=2, fb_overlap=True), ModelConfig(**MODEL), 1)
    with pytest.raises(ConfigError, match="memory.recompute: layer: recomputing whole layers"):
        Recipe(model=ModelConfig(**MODEL), parallel=ParallelConfig(ep=2, fb_overlap=True),
               memory=MemoryConfig(recompute=["layer"])).validate()


def test_fb_overlap_in_one_process_matches_the_plain_loop():
    """One process has no exchange to hide, but the setting runs the same loop (backwards on the
    worker thread) with the same numbers, through the trainer's set-up."""
    from launch.trainer.recipe import TrainConfig
    from launch.trainer.step import train_step
    from moe.config import ModelConfig
    from moe_kernels import get_kernels
    from parallel.config import ParallelConfig
    from parallel.runtime import LocalRuntime
    t = TrainConfig(grad_accum=3, micro_batch_size=MBS, seq_len=SEQ, grad_clip=CLIP)
    data = torch.randint(0, 64, (2 * 3, MBS, SEQ + 1), generator=torch.Generator().manual_seed(5))
    runs = {}
    for fb in (False, True):
        rt = LocalRuntime.setup(ParallelConfig(fb_overlap=fb), ModelConfig(**MODEL))
        assert (rt.backward_lane is not None) == fb
        torch.manual_seed(11)
        model = rt.build_model(ModelConfig(**MODEL), get_kernels("fast"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        it = iter([{"tokens": x[:, :-1], "labels": x[:, 1:]} for x in data])
        runs[fb] = [train_step(model, opt, it, t, "cpu", grad_reducer=rt.grad_reducer,
                               backward_lane=rt.backward_lane)["loss"] for _ in range(2)]
        if fb:
            assert rt.backward_lane.take_metrics()["fb_overlap_backwards"] == 6
            rt.backward_lane.close()
    assert runs[True] == runs[False]
