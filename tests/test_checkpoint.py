"""Checkpoints in one process: exact resume through the training loop, rotation and the latest
pointer, async saves, and rejection of missing, partial, corrupted, truncated, crafted and
incompatible checkpoints (with fallback to the previous good one where asked)."""
from __future__ import annotations

import functools
from dataclasses import replace
import math
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from launch.checkpoint import files as cf
from launch.checkpoint.checkpointer import MANIFEST, CheckpointError, Checkpointer, read_manifest
from launch.trainer.recipe import CheckpointConfig, DataConfig, Recipe, TrainConfig
from launch.trainer.loop import run
from launch.trainer.setup import build_optimizer
from moe.config import ModelConfig
from moe.model import MoETransformer

TINY = dict(vocab_size=256, hidden_size=32, num_layers=2, max_seq_len=64, num_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
            num_experts=4, top_k=2, expert_ffn_size=16, mtp_layers=1, expert_bias=True, bias_update_speed=0.01,
            score_func="sigmoid")


def recipe(out: Path, data_dir: Path, steps: int = 6, **ckpt) -> Recipe:
    t = TrainConfig(steps=steps, micro_batch_size=4, seq_len=32, device="cpu", out_dir=str(out), progress=False,
                    tensorboard=False, warmup_steps=1, eval_batches=1, lr=3e-3)
    c = dict(interval=2, keep_last=2)
    c.update(ckpt)
    return Recipe(model=ModelConfig(**TINY), train=t, data=DataConfig(cache_dir=str(data_dir), embedded_docs=300),
                  checkpoint=CheckpointConfig(**c))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One embedded-corpus cache for every checkpoint/resilience test (built once per session)."""
    return tmp_path_factory.getbasetemp() / "ckpt_data"


@functools.lru_cache(maxsize=None)
def _uninterrupted(out: Path, data: Path) -> list[dict]:
    return run(recipe(out, data), log=False)


@pytest.fixture
def uninterrupted(tmp_path_factory, data_dir) -> list[dict]:
    """The reference: the same 6 steps without interruption (run once per session, shared by the
    modules that import this fixture)."""
    return _uninterrupted(tmp_path_factory.getbasetemp() / "uninterrupted", data_dir)


KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm", "expert_load")


def test_resume_is_bitwise_exact(tmp_path, data_dir, uninterrupted):
    r = recipe(tmp_path / "run", data_dir)
    first = run(r, log=False, stop_after=3)  # as if SIGTERM arrived during step 3
    assert len(first) == 3
    root = tmp_path / "run" / "checkpoints"
    info = json.loads((root / "step-00000003" / "meta.json").read_text())
    assert info["step"] == 3 and info["tokens"] == 3 * 4 * 32 and info["data"] == {"next_sample": 12}
    second = run(r, log=False)  # the same command again: resumes from step 3
    assert len(second) == 3
    for step, (got, want) in enumerate(zip(first + second, uninterrupted), start=1):
        for key in KEYS:
            assert got[key] == want[key], f"step {step}: {key} {got[key]} != {want[key]} (must be bitwise equal)"
    # interval 2, keep_last 2: steps 2, 3 (the stop), 4 and 6 were saved; the two newest remain
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000006"
    assert run(r, log=False) == []  # finished: nothing to do


def test_fresh_run_refuses_a_directory_with_earlier_checkpoints(tmp_path, data_dir):
    r = recipe(tmp_path / "run", data_dir, steps=2)
    run(r, log=False)
    fresh = replace(r, checkpoint=replace(r.checkpoint, resume="never"))
    with pytest.raises(CheckpointError, match=r"checkpoint.resume: never, but .* already holds checkpoints of an "
                                              r"earlier run \(newest step-00000002\)"):
        run(fresh, log=False)


def test_resumed_run_keeps_earlier_metrics(tmp_path, data_dir):
    r = recipe(tmp_path / "run", data_dir)
    run(r, stop_after=3, progress=False)
    log = tmp_path / "run" / "metrics.jsonl"
    with log.open("a") as f:  # a record past the checkpoint, then one cut short by a crash
        f.write(json.dumps({"step": 4, "loss": 9.9}) + "\n" + '{"step": 5, "lo')
    run(r, progress=False)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(line).get("loss") != 9.9 for line in log.read_text().splitlines())


def _model_and_opt(seed: int = 0, **over):
    torch.manual_seed(seed)
    model = MoETransformer(ModelConfig(**{**TINY, **over}))
    opt = build_optimizer(model, TrainConfig())
    return model, opt


def _train(model, opt, n: int = 1) -> None:
    for _ in range(n):
        tok = torch.randint(0, 256, (2, 17))
        model(tok[:, :-1], tok[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_bias()


def _saved(tmp_path, steps=(1, 2), **cfg) -> tuple[Checkpointer, dict]:
    model, opt = _model_and_opt()
    ck = Checkpointer(CheckpointConfig(**cfg), tmp_path / "ck", log=False)
    states = {}
    for s in steps:
        _train(model, opt)
        ck.save(s, model, opt, {"tokens": s})
        states[s] = {k: v.clone() for k, v in model.state_dict().items()}
    return ck, states


def _load(tmp_path, **cfg):
    model, opt = _model_and_opt(seed=99)
    info = Checkpointer(CheckpointConfig(**cfg), tmp_path / "ck", log=True).load(model, opt)
    return info, model


def _assert_model(model, state) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_async_save_writes_what_sync_would(tmp_path):
    model, opt = _model_and_opt()
    _train(model, opt)
    ck = Checkpointer(CheckpointConfig(async_save=True), tmp_path / "ck", log=False)
    assert ck.save(1, model, opt, {"tokens": 1}) is None  # handed to the background thread
    want = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt)  # the loop goes on while the save is written
    assert ck.wait() == tmp_path / "ck" / "step-00000001"
    info, loaded = _load(tmp_path)
    assert info["step"] == 1
    _assert_model(loaded, want)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ck, states = _saved(tmp_path, steps=(1,))
    model, opt = _model_and_opt()

    def fail(self, plan, planner):
        super(cf.RecordingWriter, self).write_data(plan, planner)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(cf.RecordingWriter, "write_data", fail)
    with pytest.raises(CheckpointError, match="saving .*step-00000002 failed: OSError.*Input/output error; the "
                                              "partial save was removed and the previous checkpoints are untouched"):
        ck.save(2, model, opt, {"tokens": 2})
    root = tmp_path / "ck"
    assert not (root / ".tmp-step-00000002").exists() and not (root / "step-00000002").exists()
    assert (root / "latest").read_text().strip() == "step-00000001"
    info, loaded = _load(tmp_path)
    assert info["step"] == 1
    _assert_model(loaded, states[1])
    monkeypatch.undo()
    ck.save(3, model, opt, {"tokens": 3})
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("flip", r"__0_0\.distcp fails its sha256 check \(corrupted\)"),
    ("truncate", r"__0_0\.distcp has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    ("delete", r"__0_0\.distcp is missing"),
    ("no_manifest", r"no MANIFEST\.json, so the save never finished"),
], ids=["corrupted", "truncated", "missing-file", "partial"])
def test_damaged_checkpoint_is_rejected_or_skipped(tmp_path, capsys, damage, message):
    ck, states = _saved(tmp_path)
    newest = tmp_path / "ck" / "step-00000002"
    f = newest / "__0_0.distcp"
    if damage == "flip":
        _corrupt(f)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete":
        f.unlink()
    else:
        (newest / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no loadable checkpoint: step-00000002: .*" + message
                       + r".*set checkpoint\.resume: never"):
        _load(tmp_path, fallback_to_previous=False)
    info, model = _load(tmp_path)  # default: fall back to the previous good checkpoint
    assert info["step"] == 1
    _assert_model(model, states[1])
    out = capsys.readouterr().out
    assert re.search(r"WARNING: skipping .*step-00000002: .*" + message, out), out


def test_no_good_checkpoint_is_one_clear_error(tmp_path):
    _saved(tmp_path)
    for d in (tmp_path / "ck").glob("step-*"):
        _corrupt(d / "__0_0.distcp")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert "step-00000002: " in msg and "step-00000001: " in msg and "sha256" in msg
    assert "Traceback" not in msg


def test_crafted_metadata_cannot_run_code(tmp_path):
    _saved(tmp_path, steps=(1,))
    d = tmp_path / "ck" / "step-00000001"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = read_manifest(d)  # a forger would also fix the manifest
    manifest["files"][".metadata"] = cf.file_record(d / ".metadata")
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"unreadable DCP metadata .*(system|posix).* is not allowed"):
        _load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_different_model_is_an_error_not_a_fallback(tmp_path):
    _saved(tmp_path)
    (tmp_path / "ck" / "step-00000002" / "recipe.yaml").write_text("model:\n  hidden_size: 32\n")
    manifest = read_manifest(tmp_path / "ck" / "step-00000002")  # keep the manifest honest
    manifest["files"]["recipe.yaml"] = cf.file_record(tmp_path / "ck" / "step-00000002" / "recipe.yaml")
    (tmp_path / "ck" / "step-00000002" / MANIFEST).write_text(json.dumps(manifest))
    model, opt = _model_and_opt(hidden_size=64)
    with pytest.raises(CheckpointError, match=r"step-00000002 was written for a different model: model/embed.weight "
                       r"has shape \[256, 32\] in the checkpoint but \[256, 64\] here.*hidden_size=32 there, 64 here"):
        Checkpointer(CheckpointConfig(), tmp_path / "ck", log=False).load(model, opt)


def test_interruption_between_rename_and_pointer(tmp_path, monkeypatch):
    ck, states = _saved(tmp_path, steps=(2,))
    model, opt = _model_and_opt()
    _train(model, opt)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    original = cf.write_atomic

    def write_atomic(path, text):
        if path.name == "latest" and "step-00000004" in text:
            raise KeyboardInterrupt  # stands in for a kill: nothing of ours runs after this point
        return original(path, text)
    monkeypatch.setattr(cf, "write_atomic", write_atomic)
    with pytest.raises(KeyboardInterrupt):
        ck.save(4, model, opt, {"tokens": 4})
    root = tmp_path / "ck"
    assert (root / "latest").read_text().strip() == "step-00000002" and (root / "step-00000004" / MANIFEST).is_file()
    info, loaded = _load(tmp_path)  # the newer complete checkpoint wins over the stale pointer
    assert info["step"] == 4
    _assert_model(loaded, want)


def test_resume_choices(tmp_path):
    ck, states = _saved(tmp_path, steps=(1, 2, 3), keep_last=3)
    root = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="checkpoint.resume: never, but .* already holds checkpoints"):
        _load(tmp_path, resume="never")  # a fresh run must not mix its checkpoints with these
    assert _load(tmp_path, resume=str(root / "step-00000002"))[0]["step"] == 2
    assert _load(tmp_path, resume=str(root))[0]["step"] == 3
    with pytest.raises(CheckpointError, match="checkpoint.resume: .*nowhere does not exist"):
        _load(tmp_path, resume=str(tmp_path / "nowhere"))
    # A newer complete checkpoint wins over a stale pointer (killed between rename and pointer update).
    (root / "latest").write_text("step-00000001\n")
    assert _load(tmp_path)[0]["step"] == 3
    # An empty directory: a fresh start.
    model, opt = _model_and_opt()
    assert Checkpointer(CheckpointConfig(), tmp_path / "empty", log=False).load(model, opt) is None
    # A new run started from another run's checkpoint continues from its own once it has one.
    other = Checkpointer(CheckpointConfig(resume=str(root / "step-00000001")), tmp_path / "other", log=False)
    assert other.load(model, opt)["step"] == 1 and other.last_loaded == root / "step-00000001"
    other.save(5, model, opt, {"tokens": 5})
    assert other.load(model, opt)["step"] == 5  # a restart of the new run: its own checkpoint



@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_ensure_state_creates_only_missing_state_and_changes_nothing(fused):
    from launch.checkpoint.state import ensure_state
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.1, fused=fused)
    a.grad = torch.randn(3)
    opt.step()  # `a` has state, `b` none (it had no gradient)
    opt.zero_grad()
    before = {k: v.clone() for k, v in opt.state[a].items()}
    pa, pb = a.detach().clone(), b.detach().clone()
    ensure_state(opt)
    assert all(torch.equal(opt.state[a][k], before[k]) for k in before)
    assert torch.equal(a, pa) and torch.equal(b, pb) and float(opt.state[b]["step"]) == 0
    assert opt.param_groups[0]["lr"] == 0.1 and a.grad is None and b.grad is None
    b.grad = torch.ones(2, 2)
    opt.step()
    fresh = torch.nn.Parameter(pb.clone())
    ref = torch.optim.AdamW([fresh], lr=0.1, weight_decay=0.1, fused=fused)
    fresh.grad = torch.ones(2, 2)
    ref.step()
    assert torch.equal(fresh, b), "a step after ensure_state must equal a first step on a fresh optimizer"


def test_flat_ranges_become_contiguous_rectangles():
    from launch.checkpoint.state import flat_range_blocks
    for shape in [(7,), (3, 5), (2, 3, 4)]:
        n = math.prod(shape)
        full = torch.arange(n).view(shape)
        for a in range(n + 1):
            for b in range(a, n + 1):
                pos = a
                blocks = flat_range_blocks(shape, a, b)
                assert len(blocks) <= max(1, 2 * len(shape) - 1)
                for offs, sizes in blocks:
                    part = full[tuple(slice(o, o + z) for o, z in zip(offs, sizes))].reshape(-1)
                    assert torch.equal(part, torch.arange(pos, pos + part.numel())), (shape, a, b, offs, sizes)
                    pos += part.numel()
                assert pos == b
