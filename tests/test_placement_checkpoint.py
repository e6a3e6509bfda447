"""Placement is part of the checkpoint (issue 15): save after migrations, resume under the same and
under other EP sizes, and the losses continue within 1e-5 of the uninterrupted run.

The saving run (ep 4, drifting Zipf workload, placement checked every 3 steps, margin 0) writes
a checkpoint at step SAVE_AT inside `ExpertPlacement.canonical` (experts back in logical order,
tables and load EMA in meta.json) and trains on to STEPS; its losses must also equal a run without
placement (the save's round trip must not disturb training). Resumed: ep 4 (the saved tables are
restored: experts moved to their saved slots), ep 2 on 2 ranks (the same slot tables over fewer
ranks), and one process without placement (which reads the stacks as logical experts, so it only
matches if the checkpoint really is in logical order).
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from test_placement_dist import MODEL, adamw, batches, build

SAVE_AT, STEPS, INTERVAL, CLIP = 7, 12, 3, 0.2
TOL = 1e-5


def _train(par: dict, ckpt_dir: str, load: bool, placed: bool = True) -> dict:
    """Build layout `par` (None: one process, no placement); maybe resume; train to STEPS; the run
    that does not load saves at SAVE_AT."""
    from launch.checkpoint.checkpointer import Checkpointer
    from launch.trainer.recipe import CheckpointConfig
    from parallel.config import ParallelConfig
    from parallel.placement_runtime import ExpertPlacement
    from parallel.runtime import LocalRuntime, ParallelRuntime
    from parallel.skew import ZipfSkew
    model = build(MODEL)
    rt = ParallelRuntime.setup(ParallelConfig(**par), model.cfg) if par is not None else LocalRuntime.setup()
    rt.parallelize(model)
    opt = rt.wrap_optimizer(adamw(model), model)
    skew = ZipfSkew(MODEL["num_experts"], alpha=1.5, strength=1.0, period=6, seed=7)
    skew.install(model)
    placement = (ExpertPlacement(model, rt.meshes.ep_group, interval=INTERVAL, decay=0.5, margin=0.0)
                 if placed and par is not None else None)
    ck = Checkpointer(CheckpointConfig(), ckpt_dir, runtime=rt, log=False) if ckpt_dir else None
    first = 0
    if load:
        info = ck.load(model, opt)
        first = int(info["step"])
        if placement is not None:
            placement.restore(info["placement"], opt)
    out = {"loss": [], "tables_at_start": None if placement is None else [t.clone() for t in placement.tables]}
    reduce = (lambda: rt.grad_reducer(None, CLIP)) if par is not None else (
        lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    for step, tokens in enumerate(batches(rt.dp_rank, rt.dp_size)[first:], start=first):
        skew.set_step(step)
        res = model(tokens[:, :-1], tokens[:, 1:])
        res.loss.backward()
        reduce()
        out["loss"].append(rt.mean_over_dp({"loss": float(res.loss.detach())})["loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if placement is not None:
            placement.after_step([layer.routing_load() for layer in model.moe_layers()], opt)
        if ck is not None and not load and step + 1 == SAVE_AT:
            with placement.canonical(opt) as meta:
                ck.save(SAVE_AT, model, opt, {"placement": meta})
            out["tables_at_save"] = meta["expert_at_slot"]
            out["migrations_at_save"] = placement.migrations
    if ck is not None:
        ck.close()
    return out


def _saving_worker(ckpt_dir: str) -> dict:
    par = dict(ep=4, dispatcher="alltoall")
    return {"saved": _train(par, ckpt_dir, False), "off": _train(par, "", False, placed=False)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("placement") / "ckpt")
    return d, run_distributed(_saving_worker, 4, d, timeout=100)[0]


def _close(got: list, want: list, what: str) -> None:
    assert len(got) == len(want)
    for s, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= TOL * abs(b), f"{what}, step {s}: loss {a} vs uninterrupted {b}"


def test_saving_run_migrated_and_matches_placement_off(saved):
    _, out = saved
    run = out["saved"]
    assert run["migrations_at_save"] >= 2, "the checkpoint must come after at least two migrations"
    assert any(t != list(range(len(t))) for t in run["tables_at_save"]), "experts must be off their home slots"
    _close(run["loss"], out["off"]["loss"], "saving run vs placement off")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, par", [(4, dict(ep=4, dispatcher="alltoall")),
                                        (2, dict(ep=2, dispatcher="allgather")),
                                        (4, dict(tp=2, ep=2, dispatcher="alltoall")),
                                        (4, dict(tp=2, ep=2, tp_extend_ep=True, dispatcher="alltoall",
                                                 sequence_parallel=True))],
                         ids=["ep4", "ep2", "tp2xep2-etp", "tp2xep2-extend-sp"])
def test_resume_continues(saved, world, par):
    d, out = saved
    ranks = run_distributed(_train, world, par, d, True, timeout=100)
    for r, res in enumerate(ranks):
        assert [t.tolist() for t in res["tables_at_start"]] == out["saved"]["tables_at_save"], f"rank {r}"
        _close(res["loss"], out["saved"]["loss"][SAVE_AT:], f"rank {r} resumed under ep{par['ep']}")


def test_checkpoint_is_in_logical_expert_order(saved):
    d, out = saved
    res = _train(None, d, True)  # one process, no placement: row e of each stack must be expert e
    _close(res["loss"], out["saved"]["loss"][SAVE_AT:], "one process without placement")
