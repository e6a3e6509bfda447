"""parallel.rank_order: how a pipeline stage's ranks are numbered, shared by the runtime's meshes
and the simulator's costs. Hand-computed groups for small layouts, the closed-form strides the
simulator uses against the grids the runtime builds its process groups from, the issue's
TP 8 x EP 2 case (the expert exchange leaves the node under Megatron's order, stays inside it with
tp outermost), and the orders check_world refuses. The runtime equivalence under tp outermost is in
tests/test_parallel_tp.py (its `tp-outer` scenarios)."""
from __future__ import annotations

import itertools

import pytest

from config import ConfigError
from moe.config import ModelConfig
from parallel.config import RANK_ORDERS, ParallelConfig
from parallel.layout import Layout, group_strides
from simulator import comm as C
from simulator.layout import Layout as SimLayout, derive
from simulator.search import LayoutSpace, search_layouts
from simulator.cost import Simulator
from simulator.hardware import load_hardware


def _stride(groups: list[list[int]]):
    steps = {b - a for g in groups for a, b in zip(sorted(g), sorted(g)[1:])}
    assert len(steps) <= 1, f"unevenly strided groups {groups}"
    return steps.pop() if steps else None


def test_tp_outermost_groups_by_hand():
    lay = Layout.build(ParallelConfig(tp=2, ep=2, rank_order="dp-cp-tp"), 4, ModelConfig())
    # rank = dp_index + 2 * tp_index
    assert lay.dense_grid()[0, :, 0, :].tolist() == [[0, 2], [1, 3]]
    assert lay.dp_groups() == [[0, 1], [2, 3]]
    assert lay.ep_groups() == [[0, 1], [2, 3]]  # EP peers are neighbours
    tp_groups = Layout._groups(lay.dense_grid(), 3)
    etp_groups = Layout._groups(lay.expert_grid(), 3)
    assert tp_groups == etp_groups == [[0, 2], [1, 3]]  # expert TP is the TP group
    default = Layout.build(ParallelConfig(tp=2, ep=2), 4, ModelConfig())
    assert default.ep_groups() == [[0, 2], [1, 3]] and Layout._groups(default.dense_grid(), 3) == [[0, 1], [2, 3]]


def test_strides_match_the_runtime_grids():
    checked = 0
    for world, tp, cp, pp, ep, tpx, order in itertools.product((8, 16), (1, 2, 4), (1, 2), (1, 2), (1, 2, 4),
                                                               (False, True), RANK_ORDERS):
        cfg = ParallelConfig(tp=tp, cp=cp, pp=pp, ep=ep, tp_extend_ep=tpx, rank_order=order)
        try:
            lay = Layout.build(cfg, world)
        except ConfigError:
            continue
        want = group_strides(lay.tp, lay.cp, lay.dp, lay.ep, lay.etp, order)
        dense, expert = lay.dense_grid(), lay.expert_grid()
        got = {"tp": _stride(Layout._groups(dense, 3)), "cp": _stride(Layout._groups(dense, 2)),
               "dp": _stride(Layout._groups(dense, 1)), "ddp": _stride(lay.dp_groups()),
               "etp": _stride(Layout._groups(expert, 3)), "ep": _stride(lay.ep_groups()),
               "edp": _stride(lay.edp_groups()), "pp": _stride(Layout._groups(dense, 0))}
        for kind, stride in got.items():
            if stride is not None:  # a group of one rank has no stride
                assert stride == want[kind], (world, tp, cp, pp, ep, tpx, order, kind)
        if tpx:  # TP-extend-EP: every EP group holds whole TP groups
            for g in lay.ep_groups():
                assert all(set(t) <= set(g) or not set(t) & set(g) for t in Layout._groups(dense, 3))
        checked += 1
    assert checked > 300


MODEL = ModelConfig(vocab_size=1024, hidden_size=1024, num_layers=4, max_seq_len=4096, num_heads=8,
                    num_experts=16, top_k=4, expert_ffn_size=512, dense_ffn_size=2048, first_k_dense=1,
                    mtp_layers=0)


def test_tp8_ep2_exchange_stays_on_the_node_with_tp_outermost():
    hw = load_hardware("ascend_910b_a2")
    spans = {}
    for order in ("tp-cp-dp", "dp-cp-tp"):
        lay = SimLayout(tp=8, ep=2, rank_order=order, seq_len=1024, global_batch_size=16, devices_per_node=8)
        d = derive(MODEL, lay, 16, 8)
        spans[order] = (C.group_span(d.ep, d.strides["ep"], 8), C.group_span(lay.tp, d.strides["tp"], 8))
    # Megatron's order: the 2 EP peers are 8 ranks apart, on two nodes; the TP group is one node
    assert spans["tp-cp-dp"] == ((1, 2), (8, 1))
    # tp outermost: EP peers are neighbours on one node; the TP group (stride 2) spans both nodes
    assert spans["dp-cp-tp"] == ((2, 1), (4, 2))
    # the token exchange: every byte over the inter-node link, then none
    for order, inter in (("tp-cp-dp", True), ("dp-cp-tp", False)):
        d = derive(MODEL, SimLayout(tp=8, ep=2, rank_order=order, seq_len=1024, global_batch_size=16), 16, 8)
        a2a = [c for c in C.ep_dispatch("alltoall", 1024, 4, 2048, d.ep, d.strides["ep"], 8) if c.kind == "all_to_all"]
        assert (a2a[0].inter_bytes > 0, a2a[0].intra_bytes > 0) == (inter, not inter)
    # The estimate follows (without sequence parallelism, whose expert-TP gathers would cross nodes
    # with tp outermost): less expert-exchange time, more TP time.
    sim = Simulator(MODEL, hw, 16)
    est = {o: sim.estimate(SimLayout(tp=8, ep=2, rank_order=o, seq_len=1024, global_batch_size=16,
                                     sequence_parallel=False)) for o in ("tp-cp-dp", "dp-cp-tp")}
    assert est["dp-cp-tp"].breakdown["ep_comm"] < est["tp-cp-dp"].breakdown["ep_comm"]
    assert est["dp-cp-tp"].breakdown["tp_comm"] > est["tp-cp-dp"].breakdown["tp_comm"]


def test_estimates_do_not_depend_on_what_the_simulator_costed_before():
    """The caches are keyed by every field a cost depends on: under tp outermost the TP stride is
    dp * cp, so two layouts that differ only in pp (hence dp) must not share a TP cost; nor layouts
    that differ only in the shared-expert overlap or in the order of their ranks."""
    hw = load_hardware("ascend_910b_a2")
    base = dict(tp=2, ep=2, seq_len=1024, global_batch_size=16, devices_per_node=8, micro_batch_size=1)
    layouts = [SimLayout(**base, pp=pp, rank_order=order, overlap=overlap, zero1=zero1)
               for pp in (1, 2) for order in ("tp-cp-dp", "dp-cp-tp") for overlap in (False, True)
               for zero1 in (False, True)]
    warm = Simulator(MODEL, hw, 16)
    for lay in layouts + layouts[::-1]:
        got, want = warm.estimate(lay), Simulator(MODEL, hw, 16).estimate(lay)
        assert got.step_time == want.step_time and got.breakdown == want.breakdown, lay
        assert got.peak_memory == want.peak_memory, lay
    # the check has teeth: the layouts differ in the parts the shared caches held
    times = {(lay.pp, lay.rank_order, lay.overlap): warm.estimate(lay).breakdown for lay in layouts}
    assert times[(1, "dp-cp-tp", False)]["tp_comm"] != times[(2, "dp-cp-tp", False)]["tp_comm"]
    assert times[(1, "tp-cp-dp", False)]["ep_comm"] != times[(1, "tp-cp-dp", True)]["ep_comm"]


def test_search_costs_both_orders_and_names_them():
    sim = Simulator(MODEL, load_hardware("ascend_910b_a2"), 16)
    space = LayoutSpace(tp=[1, 8], pp=[1], vpp=[1], ep=[1, 2], tp_extend_ep=[False], cp=[1], zero1=[True],
                        micro_batch_size=[1], recompute=["none"], swap=[False], optimizer_offload=[False],
                        dispatcher=["alltoall"], global_batch_size=16, seq_len=1024)
    rows = search_layouts(sim, space, rerank=0).rows
    orders = {(r["tp"], r["ep"]): set() for r in rows}
    for r in rows:
        orders[(r["tp"], r["ep"])].add(r["rank_order"])
    assert orders[(8, 2)] == {"tp-cp-dp", "dp-cp-tp"}  # both costed where they differ
    assert orders[(1, 2)] == {"tp-cp-dp"}  # tp = 1: every order is the same groups, costed once
    assert any("-dpcptp" in r["layout"] for r in rows if r["rank_order"] == "dp-cp-tp")


@pytest.mark.parametrize("par, message", [
    (dict(rank_order="dp-tp-cp"), "parallel.rank_order: 'dp-tp-cp' is not one of tp-cp-dp, tp-dp-cp, dp-cp-tp, "
                                  "cp-dp-tp"),
    (dict(tp=2, ep=2, tp_extend_ep=True, rank_order="dp-cp-tp"),
     "parallel.rank_order: dp-cp-tp puts tp outermost, which needs expert TP to be the TP group (etp = tp); "
     "tp_extend_ep needs tp innermost"),
    (dict(tp=2, etp=1, rank_order="cp-dp-tp"), "parallel.rank_order: cp-dp-tp puts tp outermost"),
])
def test_bad_rank_order_is_one_clear_error_on_both_sides(par, message):
    with pytest.raises(ConfigError) as runtime:
        ParallelConfig(**par).check_world(4, ModelConfig())
    assert str(runtime.value).startswith(message), str(runtime.value)
    with pytest.raises(ConfigError) as sim:
        SimLayout(**par).check_world(4, ModelConfig(), "parallel", devices_per_node=8)
    assert str(sim.value) == str(runtime.value)


def test_which_orders_change_the_groups():
    from parallel.layout import order_changes_groups
    from simulator.bands import layout_features
    # tp-dp-cp swaps dp and cp: other groups only when both have more than one rank
    assert not order_changes_groups(2, 1, 4, "tp-dp-cp") and not order_changes_groups(2, 4, 1, "tp-dp-cp")
    assert order_changes_groups(1, 2, 2, "tp-dp-cp") and order_changes_groups(2, 2, 2, "tp-dp-cp")
    # tp outermost: wherever tp and the data ranks both exceed 1
    assert order_changes_groups(2, 1, 2, "dp-cp-tp") and order_changes_groups(2, 2, 1, "cp-dp-tp")
    assert not order_changes_groups(1, 1, 4, "dp-cp-tp") and not order_changes_groups(4, 1, 1, "dp-cp-tp")
    # with tp = 1, dp-cp-tp is tp-dp-cp: dp goes inside cp
    assert order_changes_groups(1, 2, 4, "dp-cp-tp")
    # dp-cp-tp against cp-dp-tp: the same groups unless cp and dp both exceed 1
    assert not order_changes_groups(2, 1, 4, "cp-dp-tp", against="dp-cp-tp")
    assert order_changes_groups(2, 2, 2, "cp-dp-tp", against="dp-cp-tp")
    # the error bands name the feature exactly there
    assert "rank_order" not in layout_features(tp=2, dp=4, rank_order="tp-dp-cp")
    assert "rank_order" in layout_features(tp=2, dp=2, cp=2, rank_order="tp-dp-cp")
    assert "rank_order" in layout_features(tp=2, dp=2, ep=2, rank_order="dp-cp-tp")
