"""End to end under torchrun: `launch/run_cpu.sh` with 2 gloo ranks (ep=2 over 2 "nodes" of one
rank, hierarchical dispatcher, ZeRO-1) trains the tiny recipe on the embedded corpus and logs, from
rank 0 only, the same global-batch losses as `run(recipe)` in one process with the doubled
micro-batch (the same global batch), plus the runtime's communication metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.recipe import load_recipe
from launch.train import run

ROOT = Path(__file__).resolve().parents[1]
STEPS, MBS, SEQ = 3, 2, 32


def overrides(tmp: Path, mbs: int) -> dict:
    return {"train.steps": STEPS, "train.micro_batch_size": mbs, "train.seq_len": SEQ, "train.eval_batches": 1,
            "train.tensorboard": False, "train.warmup_steps": 1, "train.out_dir": str(tmp / f"run{mbs}"),
            "data.embedded_docs": 300, "data.cache_dir": str(tmp / "data"), "model.aux_loss_coeff": 0.0}


@pytest.mark.timeout(240)
def test_torchrun_matches_single_process(tmp_path):
    recipe_path = ROOT / "configs/recipes/tiny_cpu.yaml"
    single = run(load_recipe(recipe_path, overrides(tmp_path, 2 * MBS)), progress=False, log=False)

    args = [f"{k}={v}" for k, v in overrides(tmp_path, MBS).items()]
    args += ["parallel.ep=2", "parallel.dispatcher=hierarchical", "parallel.devices_per_node=1", "parallel.zero1=true"]
    env = {**os.environ, "PYTHON": sys.executable, "RECIPE": str(recipe_path)}
    proc = subprocess.run(["bash", str(ROOT / "launch/run_cpu.sh"), "2", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 1, "only rank 0 prints"

    logged = [json.loads(line) for line in (tmp_path / f"run{MBS}" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == STEPS
    for step, (got, want) in enumerate(zip(logged, single)):
        for key in ("loss", "lm_loss", "mtp_loss"):
            assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), f"step {step + 1} {key}: {got[key]} vs {want[key]}"
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"]
        # Two "nodes" of one rank: every byte the dispatcher moves crosses the node boundary.
        assert got["comm_inter_node_bytes"] > 0 and got["comm_intra_node_bytes"] == 0
        # Every token copy of every MoE layer lands on exactly one EP rank (dropless): 3 MoE layers on
        # the global batch, plus the MTP module's MoE layer on SEQ - 1 positions.
        cfg = load_recipe(recipe_path).model
        copies = 2 * MBS * cfg.top_k * (cfg.num_moe_layers * SEQ + cfg.mtp_layers * (SEQ - 1))
        assert sum(got["tokens_per_ep_rank"]) == copies and len(got["tokens_per_ep_rank"]) == 2
    summary = json.loads((tmp_path / f"run{MBS}" / "summary.json").read_text())
    assert abs(summary["final_eval_loss"] - single[-1]["eval_loss"]) <= 1e-5 * single[-1]["eval_loss"]
