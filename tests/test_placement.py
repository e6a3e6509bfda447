"""Expert placement planner (parallel/placement.py), the slot remap and the migration exchange plan
(parallel/placement_exec.py), and the skewed workload (parallel/skew.py), on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from parallel.placement import Planner, assign_slots, imbalance, lpt_pack, rank_loads
from parallel.placement_exec import PlacedDispatcher, _plan_exchange
from parallel.skew import ZipfSkew

LOADS = torch.tensor([10., 7., 5., 4., 3., 2., 1., 0.])  # identity at ep2: ranks 26 and 6, mean 16


def test_rank_loads_and_imbalance():
    ident = torch.arange(8)
    assert rank_loads(LOADS, ident, 2).tolist() == [26.0, 6.0]
    assert imbalance(rank_loads(LOADS, ident, 2)) == pytest.approx(26 / 16)
    table = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    assert rank_loads(LOADS, table, 4).tolist() == [1.0, 5.0, 9.0, 17.0]
    assert imbalance(torch.zeros(4)) == 1.0


def test_lpt_pack_by_hand():
    # 0(10)->b0; 1(7)->b1; 2(5)->b1 (7<10: 12); 3(4)->b0 (14); 4(3)->b1 (15); 5(2)->b0 (16);
    # 6(1)->b1 (16, full); 7(0)->b0.
    assert lpt_pack(LOADS, 2) == [[0, 3, 5, 7], [1, 2, 4, 6]]
    # Equal slots bind: the light expert 3 must share the hot expert's bin once bin 1 is full.
    assert lpt_pack(torch.tensor([9., 1., 1., 1.]), 2) == [[0, 3], [1, 2]]


def test_assign_slots_keeps_experts_in_place():
    ident = torch.arange(8)
    # Bin 0 overlaps rank 0 in {0, 3}: they keep slots 0 and 3, 5 and 7 fill slots 1 and 2.
    assert assign_slots([[0, 3, 5, 7], [1, 2, 4, 6]], ident).tolist() == [0, 5, 7, 3, 4, 1, 6, 2]
    # A bin that is exactly another rank's current set goes to that rank: nothing moves.
    old = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    assert torch.equal(assign_slots([[0, 1, 2, 3], [4, 5, 6, 7]], old), old)


def test_planner_ema_and_interval():
    p = Planner(num_layers=1, num_experts=4, ep=2, decay=0.5, interval=3, reduce=lambda t: t * 2)
    p.observe([torch.tensor([2., 0., 0., 0.])])  # first step initialises: reduced = [4, 0, 0, 0]
    p.observe([torch.tensor([0., 2., 0., 0.])])  # 0.5 * [4,0,0,0] + 0.5 * [0,4,0,0]
    assert p.ema.tolist() == [[2.0, 2.0, 0.0, 0.0]]
    assert not p.due()
    p.observe([torch.tensor([0., 0., 0., 0.])])
    assert p.due() and p.ema.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    p.observe([torch.tensor([0., 0., 0., 0.])])
    assert not p.due()
    with pytest.raises(ValueError, match="2 layers of load, expected 1"):
        p.observe([torch.zeros(4), torch.zeros(4)])


def test_migrate_rule_margin():
    # [3,2,2,2 | 2,2,2,1]: ranks 9 and 7, mean 8: current 1.125; LPT balances to 8 | 8 (1.0), an
    # 11.1 % drop: migrates under margin 0.10, not under 0.15 (1.0 > 0.85 * 1.125 = 0.956).
    load = torch.tensor([3., 2., 2., 2., 2., 2., 2., 1.])
    for margin, moves in ((0.10, True), (0.15, False)):
        p = Planner(1, 8, 2, decay=0.0, interval=1, margin=margin)
        p.observe([load])
        (d,) = p.decide([torch.arange(8)])
        assert d.current == pytest.approx(1.125) and d.planned == pytest.approx(1.0)
        assert d.migrate == moves
    p = Planner(1, 8, 2, interval=1, margin=0.0)  # already balanced: an equal plan is no migration
    p.observe([torch.ones(8)])
    assert not p.decide([torch.arange(8)])[0].migrate


def test_planner_rejects_unequal_slots():
    with pytest.raises(ValueError, match="6 experts do not split into ep = 4"):
        Planner(1, 6, 4)


def test_placed_dispatcher_remaps_to_slots():
    class Spy:
        num_local_experts = 2

        def dispatch(self, x, idx, w):
            self.seen = idx
    d = PlacedDispatcher(Spy(), 4)
    d.set_table(torch.tensor([2, 0, 3, 1]))  # slot 0 holds expert 2, ... so expert 0 sits in slot 1
    d.dispatch(None, torch.tensor([[0, 1], [2, -1], [3, 0]]), None)
    assert d.inner.seen.tolist() == [[1, 3], [0, -1], [2, 1]]


def test_exchange_plan_by_hand():
    # ep2, 2 slots each. old: rank0 {0,1}, rank1 {2,3}; new: rank0 {3,1}, rank1 {0,2}.
    old, new = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1, 0, 2])
    # rank 0 sends expert 1 (local row 1) to itself (new slot 1), expert 0 (row 0) to rank 1.
    assert _plan_exchange(old, new, 0, 2) == ([1, 0], [1, 1], [1, 0], [1, 1])
    # rank 1 sends expert 3 (row 1) to rank 0 and expert 2 (row 0) to itself; it receives expert 0
    # from rank 0 into local slot 0 first, then expert 2 from itself into local slot 1.
    assert _plan_exchange(old, new, 1, 2) == ([1, 0], [1, 1], [0, 1], [1, 1])


def test_zipf_popularity():
    s = ZipfSkew(8, alpha=1.0, period=4, seed=3)
    p0 = s.popularity(0, 0)
    order = s.order(0, 0)
    assert float(p0.sum()) == pytest.approx(1.0)
    harmonic = sum(1 / r for r in range(1, 9))
    assert float(p0[order[0]]) == pytest.approx(1 / harmonic)
    assert float(p0[order[0]] / p0[order[1]]) == pytest.approx(2.0)
    # Half-way through a period the log-popularity is the mean of the two periods' (drift).
    mid = s.log_popularity(0, 2)
    a = s.log_popularity(0, 0)
    b = s.log_popularity(0, 4)
    assert torch.allclose(mid, (a + b) / 2)
    assert not torch.equal(s.order(0, 0), s.order(0, 1)) or not torch.equal(s.order(1, 0), s.order(0, 0))
    with pytest.raises(ValueError, match="period must be >= 1"):
        ZipfSkew(8, period=0)


def test_zipf_skews_a_models_routing():
    from moe_kernels import get_kernels
    from moe.config import ModelConfig
    from moe.model import MoETransformer
    from test_parallel_equivalence import BASE_MODEL
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**dict(BASE_MODEL, mtp_layers=0)), get_kernels("reference"))
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))

    def top_share() -> float:
        model(tokens[:, :-1], tokens[:, 1:])
        load = model.moe_layers()[0].routing_load()
        return float(load.max() / load.sum())
    uniform = top_share()
    skew = ZipfSkew(8, alpha=1.5, seed=1)
    skew.install(model)
    hot = int(skew.order(0, 0)[0])
    skewed = top_share()
    assert skewed > 1.5 * uniform, (skewed, uniform)
    assert int(model.moe_layers()[0].routing_load().argmax()) == hot
    assert math.isclose(float(model.moe_layers()[0].routing_load().sum()), 8 * 16 * 2)
