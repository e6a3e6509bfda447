"""The trainer runs a recipe's `placement:` section end to end under torchrun (2 gloo ranks, ep 2):
the skewed workload is applied, experts migrate, the per-layer before/after imbalance and the
migration bytes and time land in metrics.jsonl, the losses equal the single-process run on the same
workload (placement changes nothing the model computes), the final checkpoint records the
placement, and a resumed run continues with the single process's losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.trainer.loop import run
from launch.trainer.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/recipes/tiny_cpu.yaml"
STEPS, MORE, MBS, SEQ = 4, 6, 2, 32
SKEW = {"enabled": True, "alpha": 1.5, "strength": 1.0, "period": 3, "seed": 5}


def overrides(tmp: Path, name: str, mbs: int, steps: int) -> dict:
    return {"train.steps": steps, "train.micro_batch_size": mbs, "train.seq_len": SEQ, "train.eval_batches": 1,
            "train.tensorboard": False, "train.warmup_steps": 1, "train.lr": 3e-3, "train.min_lr": 3e-3,
            "train.out_dir": str(tmp / name), "data.embedded_docs": 300, "data.cache_dir": str(tmp / "data"),
            "model.aux_loss_coeff": 0.0, "model.hidden_size": 32, "model.dense_ffn_size": 64,
            "model.expert_ffn_size": 16, "model.q_lora_rank": 16, "model.kv_lora_rank": 16, "model.num_heads": 2,
            "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 4, "model.v_head_dim": 8, "placement.skew": SKEW}


def torchrun(tmp: Path, steps: int, name: str = "placed", extra: tuple = (), nproc: int = 2) -> subprocess.CompletedProcess:
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in overrides(tmp, name, MBS, steps).items()]
    args += ["parallel.ep=2", "parallel.dispatcher=alltoall", "placement.enabled=true", "placement.interval=2",
             "placement.margin=0.0", "placement.ema_decay=0.5", *extra]
    env = {**os.environ, "PYTHON": sys.executable, "RECIPE": str(RECIPE)}
    proc = subprocess.run(["bash", str(ROOT / "launch/run_cpu.sh"), str(nproc), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
def test_trainer_places_experts_and_keeps_losses(tmp_path):
    # dp = 2: the single process runs the doubled micro-batch (the same global batch)
    single = run(load_recipe(RECIPE, overrides(tmp_path, "single", 2 * MBS, MORE)), progress=False, log=False)
    torchrun(tmp_path, STEPS)
    logged = [json.loads(line) for line in (tmp_path / "placed" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == STEPS
    layers = load_recipe(RECIPE).model.num_moe_layers + load_recipe(RECIPE).model.mtp_layers
    for step, (got, want) in enumerate(zip(logged, single)):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), f"step {step + 1}: {got['loss']} vs {want['loss']}"
        assert len(got["placement_imbalance_before"]) == len(got["placement_imbalance_after"]) == layers
    assert sum(r["placement_migrations"] for r in logged) >= 1, "the skewed workload must trigger a migration"
    moved = [r for r in logged if r["placement_migrations"]]
    assert all(r["placement_bytes"] > 0 and r["placement_time_s"] > 0 for r in moved)
    after_moves = logged[logged.index(moved[0]) + 1:]
    assert any(a != b for r in after_moves for a, b in zip(r["placement_imbalance_after"],
                                                           r["placement_imbalance_before"]))
    meta = json.loads(next((tmp_path / "placed" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert any(t != list(range(len(t))) for t in meta["placement"]["expert_at_slot"])
    # the run's metrics are a load trace for the simulator (simulator/load_trace.py)
    from simulator.load_trace import read_load_trace
    trace = read_load_trace(tmp_path / "placed" / "metrics.jsonl")
    assert trace.steps == STEPS and trace.before >= 1 and trace.after >= 1 and trace.migrations >= 1

    torchrun(tmp_path, MORE)  # resumes from the final checkpoint of the first run
    logged = [json.loads(line) for line in (tmp_path / "placed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, MORE + 1))
    for step in range(STEPS, MORE):
        got, want = logged[step]["loss"], single[step]["loss"]
        assert abs(got - want) <= 1e-5 * abs(want), f"resumed step {step + 1}: {got} vs {want}"


@pytest.mark.timeout(600)
def test_trainer_places_experts_on_every_pipeline_stage(tmp_path):
    """pp2 x ep2 (4 ranks, dp 2): each stage plans and moves its own layers; metrics and the
    checkpoint's tables cover every MoE layer of the model; losses equal the same layout's without
    placement (the single process averages its micro-batches' masked means over another grouping
    of the sequences once grad_accum > 1), also after resuming."""
    accum = ("parallel.pp=2", "train.grad_accum=2")
    torchrun(tmp_path, MORE, "off", (*accum, "placement.enabled=false"), nproc=4)
    single = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    torchrun(tmp_path, STEPS, "pp", accum, nproc=4)
    logged = [json.loads(line) for line in (tmp_path / "pp" / "metrics.jsonl").read_text().splitlines()]
    layers = load_recipe(RECIPE).model.num_moe_layers + load_recipe(RECIPE).model.mtp_layers
    for step, (got, want) in enumerate(zip(logged, single)):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), f"step {step + 1}: {got['loss']} vs {want['loss']}"
        assert len(got["placement_imbalance_before"]) == len(got["placement_imbalance_after"]) == layers
    assert sum(r["placement_migrations"] for r in logged) >= 2
    meta = json.loads(next((tmp_path / "pp" / "checkpoints").glob("step-*/meta.json")).read_text())
    tables = meta["placement"]["expert_at_slot"]
    assert len(tables) == layers and any(t != list(range(len(t))) for t in tables)
    torchrun(tmp_path, MORE, "pp", accum, nproc=4)
    logged = [json.loads(line) for line in (tmp_path / "pp" / "metrics.jsonl").read_text().splitlines()]
    for step in range(STEPS, MORE):
        got, want = logged[step]["loss"], single[step]["loss"]
        assert abs(got - want) <= 1e-5 * abs(want), f"resumed step {step + 1}: {got} vs {want}"
