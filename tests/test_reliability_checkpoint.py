"""Nothing lost (issue 10): the documented checkpoint defaults, unwritable or busy run directories
refused before the model is built, no pruning on the strength of an unverified checkpoint, a full
disk named as such with the partial save removed, and no file read from outside a checkpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from torch.distributed.checkpoint.filesystem import FileSystem

from config import ConfigError, to_dict
from launch.checkpoint import files as cf
from launch.checkpoint.checkpointer import MANIFEST, CheckpointError, read_manifest
from launch.checkpoint.resume import load_model_weights
from launch.train import main
from launch.trainer import loop
from launch.trainer.recipe import CheckpointConfig
from launch.trainer.rundir import LOCK, claimed
from moe.config import ModelConfig
from moe.model import MoETransformer
from test_checkpoint import TINY, _assert_model, _load, _model_and_opt, _saved, data_dir, recipe  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_defaults_match_the_docs():
    text = (ROOT / "docs" / "CHECKPOINTS.md").read_text()
    block = re.search(r"### Settings\s+```yaml\n(.*?)```", text, re.S).group(1)
    documented = yaml.safe_load(block)["checkpoint"]
    defaults = CheckpointConfig()
    assert {k: getattr(defaults, k, "<no such field>") for k in documented} == documented
    assert defaults.interval == 500


@pytest.fixture
def never_build(monkeypatch):
    """The directory checks must come before the model (and the process group) are built."""
    def build_context(*args, **kwargs):
        raise AssertionError("the model was built before the run directories were checked")
    monkeypatch.setattr(loop, "build_context", build_context)


@pytest.mark.parametrize("where, field, message", [
    ("out_file", "train.out_dir", "is a file, not a directory"),
    ("ckpt_file", "checkpoint.dir", "is a file, not a directory"),
    ("ckpt_under_file", "checkpoint.dir", "cannot write to .*Not a directory"),
])
def test_unwritable_run_dirs_are_refused_before_the_model_is_built(tmp_path, data_dir, never_build,
                                                                   where, field, message):
    r = recipe(tmp_path / "run", data_dir)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    if where == "out_file":
        r = replace(r, train=replace(r.train, out_dir=str(blocker)))
    else:
        ckpt = blocker if where == "ckpt_file" else blocker / "checkpoints"
        r = replace(r, checkpoint=replace(r.checkpoint, dir=str(ckpt)))
    with pytest.raises(ConfigError, match=f"^{re.escape(field)}: .*{message}.*; "):
        loop.run(r, log=False)


def test_read_only_out_dir_is_one_clear_line(tmp_path, data_dir, never_build, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(recipe(out, data_dir))))
    real_open = os.open

    def read_only(path, *args, **kwargs):  # as a read-only mount would answer (we run as root here)
        if Path(path).parent == out:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    assert main(["--recipe", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert re.match(rf"error: train\.out_dir: cannot write to {re.escape(str(out))} \(Read-only file system\)", err)


def _flip_weights(step_dir: Path) -> None:
    """Change low mantissa bytes of the stored embedding: same size, plausible values, wrong data."""
    model = MoETransformer(ModelConfig(**TINY))
    load_model_weights(step_dir, model)
    stored = model.embed.weight.detach().numpy().tobytes()
    shard = step_dir / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    at = data.find(stored)
    assert at >= 0
    for i in range(at, at + 256, 4):
        data[i] ^= 0x01
    shard.write_bytes(bytes(data))


def test_size_verified_resume_never_prunes_the_last_good_checkpoint(tmp_path, data_dir):
    r = recipe(tmp_path / "run", data_dir, steps=4, verify="size")  # saves steps 2 and 4
    loop.run(r, log=False)
    root = tmp_path / "run" / "checkpoints"
    _flip_weights(root / "step-00000004")
    with pytest.raises(CheckpointError, match=r"not saving step-00000006: .*step-00000004, which this run resumed "
                                              r"from, .*fails its sha256 check.*nothing was pruned"):
        loop.run(replace(r, train=replace(r.train, steps=8)), log=False)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert not list(root.glob(".tmp-*"))


HOLD = ("import sys, time; from pathlib import Path; from launch.trainer.rundir import RunLock; "
        "held = RunLock(Path(sys.argv[1]), 'train.out_dir'); print('locked', flush=True); time.sleep(600)")


def test_second_run_in_one_out_dir_is_refused_and_a_dead_holder_does_not_block(tmp_path, data_dir, never_build):
    r = recipe(tmp_path / "run", data_dir)
    out = Path(r.train.out_dir)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"^train\.out_dir: .* is in use by another run \(pid {holder.pid} "
                                              r"on .*\); wait for it to finish"):
            loop.run(r, log=False)
        assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'  # untouched
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).exists()  # the killed run's lock file stays behind, but its lock is gone
    with claimed(r):
        pass


def test_a_shared_checkpoint_dir_is_locked_too(tmp_path, data_dir, never_build):
    first = recipe(tmp_path / "a", data_dir, dir=str(tmp_path / "shared"))
    second = recipe(tmp_path / "b", data_dir, dir=str(tmp_path / "shared"))
    with claimed(first):
        with pytest.raises(ConfigError, match=r"^checkpoint\.dir: .*shared is in use by another run"):
            loop.run(second, log=False)
    with claimed(second):  # released with the block
        pass


class _FullDisk:
    """A stream on a disk that fills up after `room` bytes (the write fails as the OS's would)."""

    def __init__(self, stream, room: int = 200):
        self._stream, self._room = stream, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._stream.write(bytes(data[:self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@pytest.mark.parametrize("stage", ["shard", "manifest"])
def test_disk_full_says_so_and_removes_the_partial_save(tmp_path, monkeypatch, stage):
    ck, states = _saved(tmp_path, steps=(1,))
    model, opt = _model_and_opt()
    if stage == "shard":  # torch.save inside DCP turns this into "unexpected pos ..."
        real = FileSystem.create_stream

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with real(self, path, mode) as stream:
                yield _FullDisk(stream)
        monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    else:
        real_write = cf.write_atomic

        def write_atomic(path, text):
            if path.name == MANIFEST:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(path, text)
        monkeypatch.setattr(cf, "write_atomic", write_atomic)
    root = tmp_path / "ck"
    with pytest.raises(CheckpointError) as e:
        ck.save(2, model, opt, {"tokens": 2})
    msg = str(e.value)
    assert re.match(rf".* {re.escape(str(root / 'step-00000002'))} failed: no space left on device in "
                    rf"{re.escape(str(root))}; ", msg), msg
    assert "\n" not in msg and "unexpected pos" not in msg
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no .tmp-* left
    monkeypatch.undo()
    info, loaded = _load(tmp_path)
    assert info["step"] == 1
    _assert_model(loaded, states[1])


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_manifest_paths_outside_the_checkpoint_are_refused(tmp_path, absolute):
    _saved(tmp_path, steps=(1,))
    d = tmp_path / "ck" / "step-00000001"
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any checkpoint")
    manifest = read_manifest(d)
    manifest["files"][str(secret) if absolute else "../../secret.txt"] = cf.file_record(secret)
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json: lists .*secret\.txt', a path outside the "
                                              r"checkpoint directory"):
        _load(tmp_path, fallback_to_previous=False)


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_metadata_paths_outside_the_checkpoint_are_refused(tmp_path, absolute):
    _saved(tmp_path, steps=(1, 2))
    d, other = tmp_path / "ck" / "step-00000002", tmp_path / "ck" / "step-00000001"
    target = str(other / "__0_0.distcp") if absolute else "../step-00000001/__0_0.distcp"
    md = pickle.loads((d / ".metadata").read_bytes())  # our own file: trusted here
    md.storage_data = {k: dataclasses.replace(v, relative_path=target) for k, v in md.storage_data.items()}
    (d / ".metadata").write_bytes(pickle.dumps(md))
    manifest = read_manifest(d)  # a forger would also fix the manifest
    manifest["files"][".metadata"] = cf.file_record(d / ".metadata")
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"\.metadata: points at .*step-00000001/__0_0\.distcp', a path "
                                              r"outside the checkpoint directory"):
        _load(tmp_path, fallback_to_previous=False)
