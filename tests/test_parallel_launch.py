"""End to end under torchrun: `launch/run_cpu.sh` with 2 gloo ranks trains the tiny recipe on the
embedded corpus and logs, from rank 0 only, the same global-batch losses as `run(recipe)` in one
process on the same global batch, plus the runtime's communication metrics. Layouts: ep=2 over 2
"nodes" of one rank with the hierarchical dispatcher and ZeRO-1 (dp = 2: the single process runs
the doubled micro-batch), and tp=2 with TP-extend-EP (dp = 1: both ranks read the same micro-batch,
each dispatches half of its tokens to the experts split over the two ranks; no checkpoints, which
cannot record TP shards yet)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.trainer.recipe import load_recipe
from launch.trainer.loop import run

ROOT = Path(__file__).resolve().parents[1]
STEPS, MBS, SEQ = 3, 2, 32


def overrides(tmp: Path, mbs: int, name: str) -> dict:
    return {"train.steps": STEPS, "train.micro_batch_size": mbs, "train.seq_len": SEQ, "train.eval_batches": 1,
            "train.tensorboard": False, "train.warmup_steps": 1, "train.out_dir": str(tmp / name),
            "data.embedded_docs": 300, "data.cache_dir": str(tmp / "data"), "model.aux_loss_coeff": 0.0}


NO_CHECKPOINTS = ["checkpoint.save_at_end=false", "checkpoint.interval=0", "checkpoint.resume=never",
                  "resilience.handle_signals=false"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dp, layout", [
    (2, ["parallel.ep=2", "parallel.dispatcher=hierarchical", "parallel.devices_per_node=1", "parallel.zero1=true"]),
    (1, ["parallel.tp=2", "parallel.tp_extend_ep=true", "parallel.dispatcher=alltoall", "parallel.devices_per_node=1",
         *NO_CHECKPOINTS]),
], ids=["ep2-hier-zero1", "tp2-extend-ep"])
def test_torchrun_matches_single_process(tmp_path, dp, layout):
    recipe_path = ROOT / "configs/recipes/tiny_cpu.yaml"
    single = run(load_recipe(recipe_path, overrides(tmp_path, dp * MBS, "single")), progress=False, log=False)

    args = [f"{k}={v}" for k, v in overrides(tmp_path, MBS, "torchrun").items()] + layout
    env = {**os.environ, "PYTHON": sys.executable, "RECIPE": str(recipe_path)}
    proc = subprocess.run(["bash", str(ROOT / "launch/run_cpu.sh"), "2", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 1, "only rank 0 prints"

    logged = [json.loads(line) for line in (tmp_path / "torchrun" / "metrics.jsonl").read_text().splitlines()]
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
        copies = dp * MBS * cfg.top_k * (cfg.num_moe_layers * SEQ + cfg.mtp_layers * (SEQ - 1))
        assert sum(got["tokens_per_ep_rank"]) == copies and len(got["tokens_per_ep_rank"]) == 2
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert abs(summary["final_eval_loss"] - single[-1]["eval_loss"]) <= 1e-5 * single[-1]["eval_loss"]
