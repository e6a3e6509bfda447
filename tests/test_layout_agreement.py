"""One layout definition: the simulator and the trainer accept and reject the same layouts.

The simulator's `Layout` is the runtime's `ParallelConfig` plus simulator-only fields, and both run
`ParallelConfig.check_world`. These tests hold the two sides to it over grids of layouts, restricted
to layouts without a pipeline (pp = cp = 1, no sequence parallelism, expert TP = TP): a layout
the simulator searches but the runtime cannot run yet is named by `check_runtime_support` instead.
"""
from __future__ import annotations

import itertools

import pytest

from config import ConfigError
from moe.config import ModelConfig
from parallel.config import DISPATCHERS, ParallelConfig
from parallel.runtime import validate_layout
from simulator.cost import SimOptions, Simulator
from simulator.hardware import HardwareProfile, Link
from simulator.layout import Layout, derive
from simulator.search import LayoutSpace, search_layouts

# CPU-sized models with widths that some TP sizes do not split (heads 4, dense FFN 96, experts 8)
MODELS = {
    "mla": ModelConfig(hidden_size=64, num_heads=4, dense_ffn_size=96, num_experts=8, expert_ffn_size=24),
    "gqa": ModelConfig(attention="gqa", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       dense_ffn_size=128, num_experts=6, top_k=2, expert_ffn_size=32, num_shared_experts=2),
}


def cpu_profile(devices_per_node: int) -> HardwareProfile:
    return HardwareProfile(name="cpu-test", device="cpu", peak_tflops={"fp32": 0.2, "bf16": 0.4}, memory_gb=24.0,
                           memory_bandwidth_gbps=10.0, devices_per_node=devices_per_node,
                           intra_node=Link(5.0, 20.0), inter_node=Link(1.0, 50.0), host_link=Link(5.0, 5.0))


def runtime_error(par: ParallelConfig, model: ModelConfig, world: int):
    try:
        validate_layout(par, model, world)
    except ConfigError as e:
        return str(e)
    return None


def simulator_error(par: ParallelConfig, model: ModelConfig, world: int):
    """derive() on the same layout, with a batch and sequence that raise nothing of their own."""
    shared = {k: getattr(par, k) for k in ("tp", "pp", "ep", "cp", "etp", "tp_extend_ep", "dispatcher",
                                           "devices_per_node", "zero1", "overlap", "rank_order")}
    lay = Layout(**shared, sequence_parallel=False, micro_batch_size=1, global_batch_size=world, seq_len=64)
    try:
        derive(model, lay, world, devices_per_node=par.devices_per_node, pad_layers=False)
    except ConfigError as e:
        return str(e)
    return None


GRID = list(itertools.product(MODELS, (1, 2, 3, 4, 6, 8), (1, 2, 3, 4), (1, 2, 3, 4, 8), (False, True),
                              DISPATCHERS, (1, 2, 4), ("tp-cp-dp", "dp-cp-tp")))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_trainer_and_simulator_reject_the_same_layouts_with_the_same_message(model_name):
    model = MODELS[model_name]
    checked = rejected = 0
    for name, world, tp, ep, tpx, dispatcher, dpn, order in GRID:
        if name != model_name or (tpx and tp == 1):
            continue
        par = ParallelConfig(tp=tp, ep=ep, tp_extend_ep=tpx, dispatcher=dispatcher, devices_per_node=dpn,
                             rank_order=order)
        rt = runtime_error(par, model, world)
        sim = simulator_error(par, model, world)
        # the same rule, named in the section each reads: `parallel:` in a recipe, `layout:` in the simulator
        expected = None if rt is None else rt.replace("parallel.", "layout.", 1)
        assert sim == expected, (par, world)
        checked += 1
        rejected += rt is not None
    assert rejected > 100 and checked - rejected > 50  # both kinds of layout were tried


@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_layout_the_search_returns_passes_the_trainer(model_name):
    model, world = MODELS[model_name], 8
    hw = cpu_profile(devices_per_node=4)
    sim = Simulator(model, hw, world, SimOptions(dtype="fp32"))
    space = LayoutSpace(tp=[1, 2, 4], pp=[1], vpp=[1], cp=[1], ep=[1, 2, 4, 8], tp_extend_ep=[False, True],
                        sequence_parallel=[False, True], zero1=[False, True], micro_batch_size=[1, 2],
                        recompute=["none"], swap=[False], optimizer_offload=[False],
                        dispatcher=["alltoall", "allgather", "hierarchical"], global_batch_size=16, seq_len=64)
    res = search_layouts(sim, space, rerank=5, keep_infeasible=False)
    assert res.feasible > 20
    assert {r["rank_order"] for r in res.rows} == {"tp-cp-dp", "dp-cp-tp"}  # both orders searched
    for row in res.rows:
        lay = Layout(tp=row["tp"], pp=row["pp"], ep=row["ep"], tp_extend_ep=row["tp_extend_ep"], cp=row["cp"],
                     sequence_parallel=row["sequence_parallel"], zero1=row["zero1"], dispatcher=row["dispatcher"],
                     micro_batch_size=row["micro_batch_size"], rank_order=row["rank_order"], global_batch_size=16,
                     seq_len=64)
        assert runtime_error(lay.parallel(hw.devices_per_node), model, world) is None, row["layout"]
    # and the search leaves out what the trainer rejects: 'hierarchical' under expert TP, ep not splitting experts
    kinds = {(r["tp"], r["tp_extend_ep"], r["dispatcher"]) for r in res.rows}
    assert not any(tp > 1 and not tpx and d == "hierarchical" for tp, tpx, d in kinds)


def test_runtime_names_what_it_cannot_run_yet():
    model = MODELS["mla"]
    assert runtime_error(ParallelConfig(pp=2), model, 4) is None  # pipeline parallelism runs (tests/test_pipeline.py)
    # sequence parallelism runs (tests/test_parallel_tp.py); without TP it is one clear error
    assert runtime_error(ParallelConfig(tp=2, sequence_parallel=True), model, 4) is None
    err = runtime_error(ParallelConfig(sequence_parallel=True), model, 4)
    assert err.startswith("parallel.sequence_parallel: splits the tokens over the TP ranks, but tp=1"), err
    for par, field in ((ParallelConfig(cp=2), "parallel.cp"),
                       (ParallelConfig(tp=2, etp=1), "parallel.etp")):
        err = runtime_error(par, model, 4)
        assert err is not None and err.startswith(field) and "not supported by the training runtime yet" in err
        # the simulator costs these layouts (they are simulator-side features today)
        lay = Layout(**{k: getattr(par, k) for k in ("tp", "pp", "cp", "etp", "sequence_parallel")},
                     global_batch_size=8, seq_len=64, dispatcher="local")
        derive(model, lay, 4, devices_per_node=4)
