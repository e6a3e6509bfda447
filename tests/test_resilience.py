"""Failure handling: non-finite and spiking steps are skipped without touching the weights and abort
the run after too many in a row; SIGTERM ends a real training process with a final checkpoint."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from launch.trainer.recipe import ResilienceConfig, TrainConfig
from launch.trainer.resilience import GracefulStop, StepGuard, TrainingAborted
from launch.train import main
from launch.trainer.loop import run
from launch.trainer.setup import build_optimizer
from launch.trainer.step import train_step
from config import to_dict
from moe.config import ModelConfig
from moe.model import MoETransformer
from test_checkpoint import TINY, data_dir, recipe  # noqa: F401 (data_dir: shared fixture)

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def test_guard_skips_non_finite_and_aborts_after_n_in_row():
    g = StepGuard(ResilienceConfig(max_nonfinite_in_row=3))
    assert g.check(1, 2.0, 1.0) is None
    assert "non-finite" in g.check(2, NAN, 1.0)
    assert "non-finite" in g.check(3, 2.0, math.inf)
    assert g.check(4, 2.0, 1.0) is None  # a good step resets the run of bad ones
    assert g.check(5, NAN, NAN) and g.check(6, NAN, NAN)
    with pytest.raises(TrainingAborted, match=r"step 7: .*3 non-finite steps in a row \(resilience\.max_nonfinite_in_row=3\)"):
        g.check(7, math.inf, 1.0)
    assert g.counters() == {"skipped_nonfinite": 5, "skipped_spikes": 0}


def test_guard_spike_detector_and_its_state():
    cfg = ResilienceConfig(spike_factor=2.0, spike_window=4, spike_min_history=3, max_spikes_in_row=2)
    g = StepGuard(cfg)
    assert g.check(1, 10.0, 1.0) is None and g.check(2, 50.0, 1.0) is None  # not armed yet
    assert g.check(3, 9.0, 1.0) is None
    mean = (10 + 50 + 9) / 3
    assert "loss spike" in g.check(4, 2.1 * mean, 1.0)
    restored = StepGuard(cfg)
    restored.load_state_dict(json.loads(json.dumps(g.state_dict())))  # as it travels in meta.json
    for guard in (g, restored):
        with pytest.raises(TrainingAborted, match=r"step 5: loss .* 2 spikes in a row"):
            guard.check(5, 100.0, 1.0)
    assert StepGuard(replace(cfg, spike_factor=0.0)).recent_mean() is None  # disabled


def _tiny():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY))
    return model, build_optimizer(model, TrainConfig())


def _batch():
    tok = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def test_nan_injection_skips_the_step_and_leaves_everything_unchanged():
    model, opt = _tiny()
    t = TrainConfig(grad_clip=1.0)
    guard = StepGuard(ResilienceConfig(max_nonfinite_in_row=2))
    check = lambda loss, norm: guard.check(2, loss, norm)  # noqa: E731
    train_step(model, opt, iter([_batch()]), t, "cpu", check_step=check)  # a normal step: state exists
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    assert any(m.router.expert_bias.abs().sum() > 0 for m in model.moe_layers())

    hook = model.norm.register_forward_hook(lambda mod, inp, out: out * NAN)
    m = train_step(model, opt, iter([_batch()]), t, "cpu", check_step=check)
    assert m["skipped"] == 1 and math.isnan(m["loss"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"{k} changed on a skipped step"
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), f"optimizer {k} changed on a skipped step"
    assert all(p.grad is None for p in model.parameters())
    assert all(float(m.router.load_since_update.abs().sum()) == 0 for m in model.moe_layers())
    with pytest.raises(TrainingAborted, match="2 non-finite steps in a row"):
        train_step(model, opt, iter([_batch()]), t, "cpu", check_step=check)
    for k, v in model.state_dict().items():  # the abort leaves the last good weights
        assert torch.equal(v, params[k]), f"{k} changed before the abort"
    hook.remove()
    opt.zero_grad(set_to_none=True)  # the aborted step's gradients (a run would have ended here)
    assert train_step(model, opt, iter([_batch()]), t, "cpu", check_step=check)["skipped"] == 0


def _poison(monkeypatch, factor_of) -> None:
    """Multiply the loss of the n-th training forward pass (1-based) by factor_of(n)."""
    calls = {"n": 0}
    forward = MoETransformer.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            out.loss = out.loss * factor_of(calls["n"])
        return out
    monkeypatch.setattr(MoETransformer, "forward", patched)


def test_training_loop_skips_bad_steps_and_records_them(tmp_path, data_dir, monkeypatch):
    r = recipe(tmp_path / "run", data_dir, steps=8, interval=0)
    r = replace(r, resilience=ResilienceConfig(spike_factor=3.0, spike_window=4, spike_min_history=3))
    _poison(monkeypatch, lambda n: {3: NAN, 6: 100.0}.get(n, 1.0))  # a NaN at step 3, a spike at step 6
    history = run(r, log=False)
    assert [h["skipped"] for h in history] == [0, 0, 1, 0, 0, 1, 0, 0]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000008" / "meta.json").read_text())
    assert meta["resilience"]["skipped_nonfinite"] == 1 and meta["resilience"]["skipped_spikes"] == 1


def test_abort_after_n_nan_steps_is_one_clear_error(tmp_path, data_dir, monkeypatch, capsys):
    r = recipe(tmp_path / "run", data_dir, steps=8, interval=0)
    path = _write_recipe(tmp_path / "r.yaml", replace(r, resilience=ResilienceConfig(max_nonfinite_in_row=2)))
    _poison(monkeypatch, lambda n: NAN)
    assert main(["--recipe", str(path), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step 2: loss nan") and "max_nonfinite_in_row=2" in err[0]
    saved = tmp_path / "run" / "checkpoints" / "step-00000002"  # nothing applied yet: the initial weights
    assert f"(the initial weights, data past the bad batches) is saved in {saved}" in err[0] and saved.is_dir()


def test_graceful_stop_catches_sigterm_in_process():
    with GracefulStop() as stop:
        assert not stop.should_stop()
        signal.raise_signal(signal.SIGTERM)
        assert stop.should_stop() and stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _write_recipe(path: Path, r) -> Path:
    path.write_text(yaml.safe_dump(to_dict(r)))
    return path


def test_sigterm_saves_a_final_checkpoint_and_the_run_resumes(tmp_path, data_dir):
    r = recipe(tmp_path / "run", data_dir, steps=400, interval=0)
    cfg = _write_recipe(tmp_path / "r.yaml", r)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", "--recipe", str(cfg), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "stopped after step" in out, out
    done = len(metrics.read_text().splitlines())
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.glob("step-*")] == [f"step-{done:08d}"]
    more = run(r, log=False, stop_after=done + 2)  # resumes where the signal stopped it
    assert len(more) == 2
    assert json.loads((root / f"step-{done + 2:08d}" / "meta.json").read_text())["data"]["next_sample"] == (done + 2) * 4
