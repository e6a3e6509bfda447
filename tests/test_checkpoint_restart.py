"""torchrun --max-restarts: the worker dies (SIGKILL) mid-run, torchrun restarts it, and the
restarted trainer resumes by itself from the newest checkpoint (checkpoint.resume: auto).

A checkpoint every 2 steps; every worker kills itself after step 3 in the first attempt only
(TORCHELASTIC_RESTART_COUNT = 0), so step 2's checkpoint is the newest. With one worker the
restarted attempt's losses equal the uninterrupted run's bit for bit; with two (ep=2, ZeRO-1) they
agree within 1e-5 relative, as every N-process layout does. The metrics log keeps steps 1-2 of the
first attempt and continues from 3. Two ranks also exercise the per-attempt store prefix in
launch/trainer/distributed.py: without it a restarted rank could read the dead attempt's gloo addresses
from torchrun's agent store, which outlives the workers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dataclasses import replace

from launch.checkpoint.checkpointer import Checkpointer
from launch.trainer.recipe import CheckpointConfig
from config import to_dict
from parallel.config import ParallelConfig
from test_checkpoint import data_dir, recipe, uninterrupted  # noqa: F401 (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]

CRASH_ONCE = r"""
import os, signal, sys
if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import launch.trainer.resilience as res
    original = res.Recovery.end_of_step
    def end_of_step(self, done, tokens):
        stop = original(self, done, tokens)
        if done == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return stop
    res.Recovery.end_of_step = end_of_step
from launch.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_restart_resumes_from_latest(tmp_path, data_dir, uninterrupted, nproc):
    r = recipe(tmp_path / "run", data_dir)
    if nproc > 1:
        # The same global batch (micro_batch_size is per data-parallel rank), and EP-group balance
        # statistics over ep = world, which equal the one-process global-batch ones.
        r = replace(r, parallel=ParallelConfig(ep=2, dispatcher="alltoall", zero1=True),
                    model=replace(r.model, aux_loss_scope="group"),
                    train=replace(r.train, micro_batch_size=r.train.micro_batch_size // 2))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(r)))
    script = tmp_path / "crash_once.py"
    script.write_text(CRASH_ONCE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # same threads as this process: bitwise losses
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                           "--max-restarts", "1", str(script), "--recipe", str(cfg), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "exitcode: -9" in out, "the worker must have been killed once"
    root = tmp_path / "run" / "checkpoints"
    assert f"checkpoint: loaded {root / 'step-00000002'} (step 2)" in out, out[-4000:]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]  # attempt 1 kept to step 2, then the restart
    for m, want in zip(logged, uninterrupted):
        for key in ("loss", "lm_loss", "grad_norm"):
            if nproc == 1:
                assert m[key] == want[key], f"step {m['step']}: {key} {m[key]} != {want[key]} (uninterrupted)"
            else:
                assert m[key] == pytest.approx(want[key], rel=1e-5), f"step {m['step']}: {key}"
    ck = Checkpointer(CheckpointConfig(), root, log=False)
    assert ck.latest() == root / "step-00000006" and ck.verify(root / "step-00000006") is None
