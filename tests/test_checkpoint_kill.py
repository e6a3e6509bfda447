"""A training process killed with SIGKILL in the middle of a save: the previous checkpoint stays
loadable, and the next start resumes from it and reproduces the uninterrupted run bit for bit.

The child is the real trainer (`launch.train.main`) with one function wrapped to stop after its
second save (step 4) has written all data into `.tmp-step-00000004` and published nothing, so the
kill lands there deterministically. (The later point, renamed but `latest` not yet updated, is
tested in test_checkpoint.py::test_interruption_between_rename_and_pointer.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.checkpoint.checkpointer import Checkpointer
from launch.trainer.recipe import CheckpointConfig
from launch.trainer.loop import run
from config import to_dict
from test_checkpoint import KEYS, data_dir, recipe  # noqa: F401 (data_dir: shared fixture)

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
from pathlib import Path
import launch.checkpoint.files as cf
recipe, marker = sys.argv[1], Path(sys.argv[2])
original, calls = cf.RecordingWriter.write_data, []
def write_data(self, plan, planner):
    fut = original(self, plan, planner)
    calls.append(1)
    if len(calls) == 2:
        marker.write_text("data written")
        time.sleep(600)
    return fut
cf.RecordingWriter.write_data = write_data
from launch.train import main
sys.exit(main(["--recipe", recipe, "--no-progress"]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> list[dict]:
    return run(recipe(tmp_path_factory.mktemp("full") / "run", data_dir), log=False)


def _check_resume(r, root: Path, uninterrupted: list, resumes_at: int) -> None:
    assert (root / "latest").read_text().strip() == "step-00000002"
    ck = Checkpointer(CheckpointConfig(), root, log=False)
    assert ck.verify(root / "step-00000002") is None  # the previous checkpoint is intact
    assert ck.latest() == root / f"step-{resumes_at:08d}"
    resumed = run(r, log=False)  # the next start
    assert len(resumed) == 6 - resumes_at
    for step, (got, want) in enumerate(zip(resumed, uninterrupted[resumes_at:]), start=resumes_at + 1):
        for key in KEYS:
            assert got[key] == want[key], f"step {step}: {key} {got[key]} != {want[key]}"
    assert not list(root.glob(".tmp-*")), "the interrupted save's directory is cleared by the next save"
    assert (root / "latest").read_text().strip() == "step-00000006"


def test_sigkill_while_writing(tmp_path, data_dir, uninterrupted):
    r = recipe(tmp_path / "run", data_dir)  # 6 steps, a checkpoint every 2
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(r)))
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # same thread count as this process: bitwise losses
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg), str(marker)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and marker.exists(), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".tmp-step-00000004").is_dir() and not (root / "step-00000004").exists()
    _check_resume(r, root, uninterrupted, resumes_at=2)
