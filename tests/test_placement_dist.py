"""Placement changes where experts live, not what the model computes (issue 15's acceptance).

On gloo processes, the tiny MoE of test_parallel_equivalence trains on a drifting Zipf workload
(parallel/skew.py) for STEPS AdamW steps twice from the same seed: placement off, then on (check
every INTERVAL steps, margin 0 so any predicted gain migrates). Per step the global losses must
agree within 1e-6 relative, and at the end every expert's weights, gathered and put back in
logical order, within 1e-4 relative (WEIGHT_TOL: a moved expert sees its tokens in another order,
so its gradients differ in the last bits, and AdamW's normalised step magnifies that where a
gradient is near zero; measured 7.6e-7 to 1.4e-5 over the scenarios, the negative control 0.34); the placement run must really have migrated (>= 2 layer
migrations, tables not the identity, bytes moved). The identity comparison can fail: an expert
moved without its Adam moments, or routed to the wrong slot, changes the losses after the next step.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import rel_diff, run_distributed
from test_parallel_equivalence import BASE_MODEL, adamw, build

STEPS, INTERVAL, GLOBAL_BATCH, SEQ, CLIP, SEED = 20, 4, 8, 16, 0.2, 4321
TOL = 1e-6
WEIGHT_TOL = 1e-4
MODEL = dict(BASE_MODEL, mtp_layers=0)


def batches(dp_rank: int, dp: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    full = torch.randint(0, MODEL["vocab_size"], (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)
    b = GLOBAL_BATCH // dp
    return [step[dp_rank * b:(dp_rank + 1) * b] for step in full]


def logical_experts(model, rt, placement) -> list[torch.Tensor]:
    """Every layer's w1 stack over all experts in logical order (gathered over the EP group)."""
    from parallel.comm import all_gather_single
    out = []
    for i, layer in enumerate(model.moe_layers()):
        local = layer.experts.w1_EDF.detach().contiguous()
        full = local.new_empty((local.shape[0] * rt.layout.ep, *local.shape[1:]))
        all_gather_single(full, local, group=rt.meshes.ep_group)
        table = placement.tables[i] if placement is not None else torch.arange(full.shape[0])
        slot_of = torch.empty_like(table)
        slot_of[table] = torch.arange(table.numel())
        out.append(full.index_select(0, slot_of))
    return out


def run_one(par: dict, placed: bool) -> dict:
    from parallel.config import ParallelConfig
    from parallel.placement_runtime import ExpertPlacement
    from parallel.runtime import ParallelRuntime
    from parallel.skew import ZipfSkew
    model = build(MODEL)
    rt = ParallelRuntime.setup(ParallelConfig(**par), model.cfg)
    rt.parallelize(model)
    optimizer = rt.wrap_optimizer(adamw(model), model)
    skew = ZipfSkew(MODEL["num_experts"], alpha=1.5, strength=1.0, period=6, seed=7)
    skew.install(model)
    placement = ExpertPlacement(model, rt.meshes.ep_group, interval=INTERVAL, decay=0.5, margin=0.0) if placed else None
    out = {"loss": [], "bytes": 0}
    for step, tokens in enumerate(batches(rt.dp_rank, rt.dp_size)):
        skew.set_step(step)
        res = model(tokens[:, :-1], tokens[:, 1:])
        res.loss.backward()
        rt.grad_reducer(None, CLIP)
        out["loss"].append(rt.mean_over_dp({"loss": float(res.loss.detach())})["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if placement is not None:
            m = placement.after_step([layer.routing_load() for layer in model.moe_layers()], optimizer)
            out["bytes"] += m["placement_bytes"]
    out["experts"] = logical_experts(model, rt, placement)
    if placement is not None:
        out["migrations"], out["tables"] = placement.migrations, [t.clone() for t in placement.tables]
    return out


def _worker(par: dict, drop_moments: bool = False) -> dict:
    if drop_moments:  # the negative control: experts move, their Adam moments stay behind
        import parallel.placement_exec as executor
        executor.plain_companions = lambda optimizer: (lambda p: [])
    return {"off": run_one(par, False), "on": run_one(par, True)}


def check(ranks: list[dict]) -> float:
    worst = 0.0
    for r, res in enumerate(ranks):
        off, on = res["off"], res["on"]
        assert on["migrations"] >= 2, f"rank {r}: only {on['migrations']} layer migrations in {STEPS} steps"
        assert any(not torch.equal(t, torch.arange(t.numel())) for t in on["tables"]), "experts never moved"
        for step, (a, b) in enumerate(zip(on["loss"], off["loss"])):
            rel = abs(a - b) / abs(b)
            assert rel <= TOL, f"rank {r} step {step}: loss {a} with placement vs {b} without ({rel:.1e})"
            worst = max(worst, rel)
        for i, (a, b) in enumerate(zip(on["experts"], off["experts"])):
            assert rel_diff(a, b) <= WEIGHT_TOL, f"rank {r} layer {i}: expert weights differ by {rel_diff(a, b):.1e}"
    assert sum(res["on"]["bytes"] for res in ranks) > 0, "a migration must move bytes between ranks"
    return worst


SCENARIOS = [
    ("ep4-alltoall", 4, dict(ep=4, dispatcher="alltoall")),
    ("ep4-hierarchical-2x2", 4, dict(ep=4, dispatcher="hierarchical", devices_per_node=2)),
    ("ep4-allgather", 4, dict(ep=4, dispatcher="allgather")),
    ("ep2xdp2-alltoall-zero1", 4, dict(ep=2, dispatcher="alltoall", zero1=True)),
    # tensor parallelism: expert TP (each TP index's EP group moves its slices by the same plan) and
    # TP-extend-EP (whole experts over ep x tp ranks), with and without sequence parallelism
    ("tp2xep2-etp-alltoall", 4, dict(tp=2, ep=2, dispatcher="alltoall")),
    ("tp2xep2-extend-hierarchical-sp", 4, dict(tp=2, ep=2, tp_extend_ep=True, dispatcher="hierarchical",
                                                devices_per_node=2, sequence_parallel=True)),
    ("tp2xep2-etp-allgather-sp-zero1", 4, dict(tp=2, ep=2, dispatcher="allgather", sequence_parallel=True,
                                               zero1=True)),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sid, world, par", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_placement_keeps_losses(sid, world, par):
    ranks = run_distributed(_worker, world, par, timeout=100)
    worst = check(ranks)
    print(f"{sid}: {ranks[0]['on']['migrations']} migrations, worst loss difference {worst:.1e}")


@pytest.mark.timeout(120)
def test_check_fails_when_moments_stay_behind():
    ranks = run_distributed(_worker, 4, dict(ep=4, dispatcher="alltoall"), True, timeout=100)
    with pytest.raises(AssertionError, match="with placement vs"):
        check(ranks)
