"""Reliability of a running job (issue 10): an abort on bad steps saves the last good state,
metrics.jsonl stays strict JSON through NaN steps, a hung or dead peer is named in one line
within `resilience.collective_timeout_s`, SIGTERM to the launcher saves and exits 0, and a
reshard that regroups micro-batches says which losses change."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from config import ConfigError, from_dict, to_dict
from launch.train import main
from launch.trainer.loop import run
from launch.trainer.metrics import MetricsLogger
from launch.trainer.recipe import ResilienceConfig, TrainConfig
from launch.trainer.setup import build_optimizer
from launch.trainer.step import train_step
from moe.config import ModelConfig
from moe.model import MoETransformer
from test_checkpoint import TINY, data_dir, recipe  # noqa: F401 (data_dir: shared fixture)

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def _write_recipe(path: Path, r) -> Path:
    path.write_text(yaml.safe_dump(to_dict(r)))
    return path


def _poisoned_forward(bad_calls: set[int]):
    """MoETransformer.forward whose n-th training call (1-based: step n) returns a NaN loss."""
    forward, calls = MoETransformer.forward, {"n": 0}

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * NAN
        return out
    return patched


@pytest.fixture(scope="module")
def aborted(tmp_path_factory, data_dir):
    """Steps 1-2 good, 3-4 NaN with max_nonfinite_in_row=2: the run aborts at step 4. Also the
    same recipe stopped after step 2, the state the abort must have saved."""
    tmp = tmp_path_factory.mktemp("aborted")
    r = replace(recipe(tmp / "run", data_dir, steps=8, interval=0),
                resilience=ResilienceConfig(max_nonfinite_in_row=2))
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(MoETransformer, "forward", _poisoned_forward({3, 4}))
        rc = main(["--recipe", str(_write_recipe(tmp / "r.yaml", r)), "--no-progress"])
    run(replace(r, train=replace(r.train, out_dir=str(tmp / "good"))), log=False, stop_after=2)
    return {"rc": rc, "err": err.getvalue(), "run": tmp / "run", "good": tmp / "good" / "checkpoints"}


def _tensors(step_dir: Path, tmp: Path) -> dict:
    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if "rng" not in k}


def test_abort_on_nonfinite_steps_saves_the_last_good_state(aborted, tmp_path):
    assert aborted["rc"] == 3
    lines = aborted["err"].strip().splitlines()
    saved = aborted["run"] / "checkpoints" / "step-00000004"
    assert len(lines) == 1 and lines[0].startswith("error: step 4: loss nan"), lines
    assert f"weights of step 2, data past the bad batches) is saved in {saved}" in lines[0], lines[0]
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["step"] == 4 and meta["data"]["next_sample"] == 4 * 4  # the bad batches are not retried
    got, want = _tensors(saved, tmp_path), _tensors(aborted["good"] / "step-00000002", tmp_path)
    assert got.keys() == want.keys() and any("optim" in k for k in got)
    for k in want:  # weights, router biases and AdamW moments are exactly those after step 2
        assert torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k], k


def test_metrics_jsonl_is_strict_json_through_nonfinite_steps(aborted, tmp_path):
    records = [_strict(line) for line in (aborted["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # step 4 aborted before it was logged
    assert records[2]["loss"] is None and "loss" in records[2]["nonfinite"] and records[2]["skipped"] == 1
    assert "nonfinite" not in records[1]
    logger = MetricsLogger(tmp_path, tensorboard=False)  # values inside lists too
    logger.log(7, {"grad_norm": math.inf, "layer_imbalance": [1.5, NAN]})
    logger.close()
    assert _strict((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 7, "grad_norm": None, "layer_imbalance": [1.5, None], "nonfinite": ["grad_norm", "layer_imbalance"]}


def test_collective_timeout_is_validated():
    assert from_dict(ResilienceConfig, {"collective_timeout_s": 2.5}).collective_timeout_s == 2.5
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=r"collective_timeout_s: must be a finite number of seconds > 0"):
            from_dict(ResilienceConfig, {"collective_timeout_s": bad})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_steps(metrics: Path, n: int, procs: list, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    outs = [p.communicate(timeout=30) if p.poll() is not None else "(running)" for p in procs]
    raise AssertionError(f"no {n} steps logged: {outs}")


TIMEOUT = 10


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_hung_or_dead_peer_is_named_in_one_line(tmp_path, data_dir, fault):
    """Two ranks on gloo (started as torchrun would: RANK, WORLD_SIZE, MASTER_*), a 10 s collective
    timeout (start-up on a loaded 2-core box can keep a rank waiting for 3 s); rank 1 is stopped (or
    killed) after step 1: rank 0 must name it in one line, soon."""
    r = recipe(tmp_path / "run", data_dir, steps=400, interval=0)
    r = replace(r, resilience=ResilienceConfig(collective_timeout_s=TIMEOUT))
    cfg = _write_recipe(tmp_path / "r.yaml", r)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--recipe", str(cfg), "--no-progress"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(k), "LOCAL_RANK": str(k), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for k in (0, 1)]
    try:
        _wait_for_steps(tmp_path / "run" / "metrics.jsonl", 1, procs)
        os.kill(procs[1].pid, getattr(signal, fault))
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    lines = err.strip().splitlines()
    print(f"{fault}: rank 0 exited {took:.1f} s after the fault: {lines}")
    assert procs[0].returncode == 4 and len(lines) == 1, err
    assert lines[0].startswith("error: rank 0: rank 1 of 2 stopped answering"), lines[0]
    why = f"no answer within resilience.collective_timeout_s={TIMEOUT} s" if fault == "SIGSTOP" else "closed its connection"
    assert why in lines[0], lines[0]
    assert took < TIMEOUT + 12, f"rank 0 took {took:.1f}s to report"  # timeout + heartbeat check + exit


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path, data_dir):
    """`python -m launch.torchrun` is torchrun whose SIGTERM/SIGINT reach the ranks as a stop
    request: they save and exit 0, and so does the launcher (plain torchrun exits 1)."""
    r = recipe(tmp_path / "run", data_dir, steps=400, interval=0)
    cfg = _write_recipe(tmp_path / "r.yaml", r)
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node", "2",
           "-m", "launch.train", "--recipe", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(tmp_path / "run" / "metrics.jsonl", 2, [proc])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "SignalException" not in out, out
    assert "stopped after step" in out, out
    done = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == [f"step-{done:08d}"]


def _first_step_loss(model, micro_batch_size: int, grad_accum: int) -> float:
    """The loss of one step over the same 4 samples, split into micro-batches; the step is vetoed
    (as a skipped one), so the model is unchanged for the next split."""
    t = TrainConfig(micro_batch_size=micro_batch_size, grad_accum=grad_accum)
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    batches = iter({"tokens": b[:, :-1], "labels": b[:, 1:]} for b in tokens.split(micro_batch_size))
    return train_step(model, build_optimizer(model, t), batches, t, "cpu", check_step=lambda *_: "probe")["loss"]


def test_same_losses_after_a_reshard_need_the_same_micro_batches():
    """What docs/DESIGN-NOTES.md states: with the global batch kept, the micro-batch balance loss
    depends on the micro-batch size (not on grad_accum x dp); the sequence-scope one does not."""
    for scope, same in (("micro_batch", False), ("sequence", True)):
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig(**{**TINY, "aux_loss_scope": scope, "aux_loss_coeff": 0.5}))
        whole, split = _first_step_loss(model, 4, 1), _first_step_loss(model, 2, 2)
        gap = abs(whole - split) / abs(whole)
        assert (gap < 1e-6) if same else (gap > 1e-4), (scope, gap)


def test_resume_with_other_micro_batches_says_which_losses_change(tmp_path, data_dir, capsys):
    r = recipe(tmp_path / "run", data_dir, steps=4, interval=0)
    run(r, log=False, stop_after=1)
    capsys.readouterr()
    run(replace(r, train=replace(r.train, micro_batch_size=2, grad_accum=2)), stop_after=2)
    out = capsys.readouterr().out
    assert ("note: train.micro_batch_size changed from 4 to 2: the balance loss (model.aux_loss_scope="
            "micro_batch) depends on which samples share a micro-batch") in out, out
    assert "keep micro_batch_size and change grad_accum instead" in out
