"""torchrun --max-restarts: the worker dies (SIGKILL) mid-run, torchrun restarts it, and the
restarted trainer resumes by itself from the newest checkpoint (checkpoint.resume: auto).

One worker, a checkpoint every 2 steps; it kills itself after step 3 in the first attempt only
(TORCHELASTIC_RESTART_COUNT = 0), so step 2's checkpoint is the newest; the restarted attempt's
losses equal the uninterrupted run's bit for bit. One worker keeps the test
fast and deterministic: multi-rank loading is covered by test_checkpoint_reshard.py. With several
ranks the same flow works (checked by hand with 2 gloo ranks, ep=2, ZeRO-1), but in about 1 restart
in 4 a restarted rank fails in init_process_group ("connectFullMesh ... Connection refused"): the
torchrun agent keeps one TCPStore for all attempts (same MASTER_PORT), so a new rank can read the
dead attempt's gloo address keys. The fix belongs in launch/distributed.py (prefix the store with
TORCHELASTIC_RESTART_COUNT); until then torchrun simply retries, given restarts to spare.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from launch.checkpoint import Checkpointer
from launch.recipe import CheckpointConfig
from moe.config import to_dict
from test_checkpoint import data_dir, recipe, uninterrupted  # noqa: F401 (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]

CRASH_ONCE = r"""
import os, signal, sys
if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import launch.resilience as res
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


def test_torchrun_restart_resumes_from_latest(tmp_path, data_dir, uninterrupted):
    r = recipe(tmp_path / "run", data_dir)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(r)))
    script = tmp_path / "crash_once.py"
    script.write_text(CRASH_ONCE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # same threads as this process: bitwise losses
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "--max-restarts", "1", str(script), "--recipe", str(cfg), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "exitcode: -9" in out, "the worker must have been killed once"
    root = tmp_path / "run" / "checkpoints"
    assert f"checkpoint: loaded {root / 'step-00000002'} (step 2)" in out, out[-4000:]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [3, 4, 5, 6]  # the restarted attempt ran from step 3 on
    for m, want in zip(logged, uninterrupted[2:]):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert m[key] == want[key], f"step {m['step']}: {key} {m[key]} != {want[key]} (uninterrupted)"
    ck = Checkpointer(CheckpointConfig(), root, log=False)
    assert ck.latest() == root / "step-00000006" and ck.verify(root / "step-00000006") is None
