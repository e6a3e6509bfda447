"""The run's directories, claimed before anything is built (`claims_run_dirs` wraps loop.run):

* `train.out_dir` and the checkpoint directory must be directories this process can create files
  in. Otherwise a run would train to the end and then fail with nothing saved.
* One run at a time: rank 0 holds an exclusive `flock` on `<dir>/.run.lock` for the whole run, so
  a second run in the same directory is refused instead of deleting the first one's partial saves
  and overwriting its metrics. The OS drops the lock when the holder dies, so a lock file left by
  a killed run never blocks the next one.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from config import ConfigError

LOCK = ".run.lock"


def checkpoint_root(recipe) -> Path:
    return Path(recipe.checkpoint.dir or Path(recipe.train.out_dir) / "checkpoints")


def ensure_writable(path: Path, field: str) -> None:
    """Create `path` if needed and create (and delete) a file in it: os.access misjudges root,
    ACLs and read-only mounts, a real file does not."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {path} is a file, not a directory; point {field} at a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{field}: cannot write to {path} ({e.strerror or e}); choose a writable directory "
                          f"or fix its permissions") from None


class RunLock:
    """An exclusive flock on `<directory>/.run.lock`, held until `release()` or the process ends."""

    def __init__(self, directory: Path, field: str):
        self.path = directory / LOCK
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(f"{field}: {directory} is in use by another run ({holder}, lock {self.path}); "
                              f"wait for it to finish or stop it, or use another {field}") from None
        self._file.truncate(0)  # the holder's identity, for the refusal message
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))  # torchrun sets it before the process group exists


@contextlib.contextmanager
def claimed(recipe) -> Iterator[None]:
    """Check that the run's directories are writable and, on rank 0, lock them for the block.
    Every rank writes checkpoint shards, so every rank checks the checkpoint directory."""
    out, ckpt = Path(recipe.train.out_dir), checkpoint_root(recipe)
    main = _rank() == 0
    if main:
        ensure_writable(out, "train.out_dir")
    ensure_writable(ckpt, "checkpoint.dir")
    with contextlib.ExitStack() as locks:
        if main:
            locks.callback(RunLock(out, "train.out_dir").release)
            if not ckpt.resolve().is_relative_to(out.resolve()):  # a checkpoint.dir of its own
                locks.callback(RunLock(ckpt, "checkpoint.dir").release)
        yield


def claims_run_dirs(run):
    """Decorator for `run(recipe, ...)`: the directories are claimed for the whole call."""
    @functools.wraps(run)
    def claiming(recipe, *args, **kwargs):
        with claimed(recipe):
            return run(recipe, *args, **kwargs)
    return claiming
